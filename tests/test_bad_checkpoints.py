"""Hostile and broken checkpoint files, and bad arguments to `ldm.load` (issue 14).

Each test builds the bad file from the shipped model (weights/tiny-shapes.safetensors) in
tmp_path and checks the whole failure: the error type (`ldm.CheckpointError` for a bad file,
FileNotFoundError / IsADirectoryError for a path that is no file, ValueError for a bad argument),
a message that names the file and the tensor, field or argument, and that nothing was written.
"""
import dataclasses
import json
import math
import os
import signal
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import ldm
from ldm import checkpoint
from ldm.config import TINY_SHAPES, ConfigError, ModelConfig
from ldm.models.unet import UNetConfig
from ldm.pipeline import StableDiffusion

UNET_OUT = "model.diffusion_model.out.2.weight"


@pytest.fixture(scope="module")
def shipped():
    """The shipped model's file contents: ({original name: tensor}, its embedded config JSON).

    Weights in float32 (the file stores float16), the dtype ldm.load defaults to: loading then
    casts nothing, and only the mmap policy decides between copies and views of the file."""
    with safe_open(str(ldm.loader.DEFAULT_CHECKPOINT), "pt") as f:
        return ({name: f.get_tensor(name).to(torch.float32 if f.get_tensor(name).is_floating_point()
                                             else None).clone() for name in f.keys()},
                f.metadata()[checkpoint.CONFIG_KEY])


def write(path, tensors, config_json):
    """`tensors` and the config as ldm.save writes them; the container follows the suffix."""
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tensors, checkpoint.CONFIG_KEY: config_json}, path)
    else:
        save_file(tensors, str(path), metadata={"format": "pt", checkpoint.CONFIG_KEY: config_json})
    return path


def edited(shipped, path, **changes):
    """The shipped model written to `path` with `changes` {original name: tensor} applied."""
    tensors, config_json = shipped
    return write(path, {**tensors, **changes}, config_json)


def refused(path, error, *named, **load_args):
    """ldm.load(path) raises `error` whose message names `path` and each of `named`, and the
    folder holding `path` is left as it was. Returns the message."""
    folder = path.parent if path.parent.is_dir() else path
    before = sorted(folder.iterdir()) if folder.is_dir() else None
    with pytest.raises(error) as caught:
        ldm.load(path, **load_args)
    message = str(caught.value)
    for part in (str(path), *named):
        assert part in message, f"{part!r} not in {message!r}"
    if before is not None:
        assert sorted(folder.iterdir()) == before, "loading wrote something"
    return message


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)


# ---------------------------------------------------------------- 1. compressed .ckpt entries
@pytest.mark.parametrize("mmap", [False, True])
def test_a_deflated_ckpt_loads_the_same_weights(shipped, tmp_path, mmap):
    """Re-zipped with DEFLATE, a .ckpt's records are no longer the tensors' bytes: mapping them
    would take compressed bytes for weights, so such a file is read (and inflated) instead."""
    stored = write(tmp_path / "stored.ckpt", *shipped)
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(stored) as src, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    assert deflated.stat().st_size < stored.stat().st_size
    assert same_weights(ldm.load(deflated, mmap=mmap), ldm.load(stored))


# ---------------------------------------------------------------- 2. a file replaced under a model
GENERATE_AFTER_REPLACING = """
import sys, shutil, torch, ldm
path, how, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "mmap"
pipe = ldm.load(path, mmap=mmap, dtype=torch.float32)  # the file's: weights stay views
before = pipe.txt2img("a red square", steps=2, seed=0, output_type="tensor")
if how == "truncate":
    open(path, "r+b").truncate(0)
else:  # `cp other.safetensors path`: rewritten in place, same inode
    shutil.copyfile(sys.argv[4], path)
after = pipe.txt2img("a red square", steps=2, seed=0, output_type="tensor")
assert torch.equal(before, after), "the weights changed with the file"
print("same image")
"""


def generate_after_replacing(path, how, mmap, other):
    return subprocess.run([sys.executable, "-c", GENERATE_AFTER_REPLACING, str(path), how,
                           "mmap" if mmap else "copy", str(other)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_a_loaded_model_outlives_its_file(shipped, tmp_path, suffix, how):
    """By default the weights are copied into memory: truncating or rewriting the file in place
    while the model is loaded changes nothing (a mapped file would die with SIGBUS). Run in a
    subprocess, so that a SIGBUS fails the test instead of killing pytest."""
    path = write(tmp_path / f"model{suffix}", *shipped)
    other = edited(shipped, tmp_path / f"other{suffix}",
                   **{UNET_OUT: torch.zeros_like(shipped[0][UNET_OUT])})
    run = generate_after_replacing(path, how, False, other)
    assert run.returncode == 0, f"died with {run.returncode}: {run.stderr[-2000:]}"
    assert "same image" in run.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="SIGBUS on a truncated mapping is Linux's")
def test_mmap_true_means_the_file_must_not_change(shipped, tmp_path):
    """The contract of mmap=True, shown: a .ckpt's weights are views of the file, and truncating
    it under a loaded model kills the process at its next generation."""
    path = write(tmp_path / "model.ckpt", *shipped)
    run = generate_after_replacing(path, "truncate", True, path)
    assert run.returncode == -signal.SIGBUS


# ---------------------------------------------------------------- 7. NaN and infinite weights
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_named(shipped, tmp_path, value):
    weight = shipped[0][UNET_OUT].clone()
    weight[1, 2, 0, 0] = value
    path = edited(shipped, tmp_path / "nan.safetensors", **{UNET_OUT: weight})
    refused(path, ldm.CheckpointError, UNET_OUT, "1 NaN or infinite value(s)")


def test_a_weight_that_overflows_the_asked_dtype_is_named(shipped, tmp_path):
    weight = shipped[0][UNET_OUT].clone()
    weight[0, 0, 0, 0] = 1e6  # finite in float32, infinity in float16 (max 65504)
    path = edited(shipped, tmp_path / "big.safetensors", **{UNET_OUT: weight})
    assert ldm.load(path).unet.out[2].weight[0, 0, 0, 0] == 1e6
    refused(path, ldm.CheckpointError, UNET_OUT, "does not fit in torch.float16", dtype="fp16")


# ---------------------------------------------------------------- 9. container told by its bytes
@pytest.mark.parametrize("written, named", [(".ckpt", ".safetensors"),
                                            (".safetensors", ".ckpt")])
def test_the_container_is_told_by_its_bytes_not_its_suffix(shipped, tmp_path, written, named):
    path = write(tmp_path / f"model{written}", *shipped)
    misnamed = path.rename(tmp_path / f"misnamed{named}")
    for mmap in (False, True):
        assert same_weights(ldm.load(misnamed, mmap=mmap), ldm.load())


# ---------------------------------------------------------------- 10. dtypes and devices
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_a_non_float_tensor_where_a_weight_belongs_is_named(shipped, tmp_path, dtype):
    weight = shipped[0][UNET_OUT].to(dtype)
    path = edited(shipped, tmp_path / "ints.safetensors", **{UNET_OUT: weight})
    refused(path, ldm.CheckpointError, UNET_OUT, str(dtype), "floating-point weight")


def test_the_integer_tensors_the_releases_store_still_load(shipped, tmp_path):
    """position_ids (int64) and model_ema.num_updates (int32) are in every SD 1.x release
    (tests/data/manifests); ldm ignores them, so they are no reason to refuse a file."""
    path = edited(shipped, tmp_path / "release-like.safetensors",
                  **{"model_ema.num_updates": torch.tensor(470000, dtype=torch.int32)})
    position_ids = checkpoint.PREFIXES["text_encoder"] + checkpoint.POSITION_IDS
    assert shipped[0][position_ids].dtype == torch.int64
    assert same_weights(ldm.load(path), ldm.load())


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float8", "half", None])
def test_a_dtype_that_cannot_generate_is_refused(dtype):
    with pytest.raises(ValueError, match=r"^dtype must be 'auto', torch.float32, torch.float16 "
                                         r"or torch.bfloat16 \(or one of \['float32', 'fp32'"):
        ldm.load(dtype=dtype)


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16),
                                         ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_names_are_accepted(name, dtype):
    assert {p.dtype for p in ldm.load(dtype=name).parameters()} == {dtype}


@pytest.mark.parametrize("device, problem", [
    ("meta", "device 'meta' holds no weights"),
    ("nonsense", "device must be a torch device such as 'cpu' or 'cuda', got 'nonsense'"),
    pytest.param("cuda", "device 'cuda' cannot hold the weights here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_a_device_that_cannot_hold_weights_is_refused(device, problem):
    with pytest.raises(ValueError, match="^" + problem):
        ldm.load(device=device)


# ---------------------------------------------------------------- 11. the embedded config
def config_with(text, path, value):
    """The shipped config JSON with the field at dotted `path` set to `value` (None: removed)."""
    raw = json.loads(text)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is REMOVE:
        del node[last]
    else:
        node[last] = value
    return json.dumps(raw)


REMOVE = object()
BAD_FIELDS = [  # (field, value) -> the field named in the error, and how
    ("unet.model_channels", "32", "must be int"),
    ("unet.model_channels", 32.0, "must be int"),
    ("unet.use_linear_proj", 1, "must be bool"),
    ("unet.channel_mult", [1, "2"], "must be a list of integers"),
    ("unet.channel_mult", [], "1 to 8 positive multipliers"),
    ("unet.attention_levels", [5], "level 5 is not one of the 3 levels"),
    ("unet.num_heads", 0, "must be positive"),
    ("unet.num_heads", 5, "5 does not divide the 96 channels of level 1"),
    ("unet.head_dim", 16, "set exactly one of unet.num_heads and unet.head_dim"),
    ("unet.norm_groups", 7, "7 does not divide the 48 channels of level 0"),
    ("unet.norm_groups", 0, "must be positive"),
    ("unet.num_res_blocks", 10**6, "must be in [1, 1024]"),
    ("unet.dropout", 1.5, "must be in [0, 1)"),
    ("unet.extra", 1, "is not a field of UNetConfig"),
    ("unet", None, "must be a JSON object, got null"),
    ("vae.ch", REMOVE, "is missing"),
    ("vae.norm_groups", 5, "5 does not divide the 32 channels of level 0"),
    ("vae.norm_eps", 0.0, "must be positive"),
    ("text.heads", 0, "must be positive"),
    ("text.heads", 3, "3 does not divide the 64 channels of text.width"),
    ("text.eps", None, "must be float"),
    ("text_encoder", "t5", "must be one of ['clip', 'open_clip', 'sdxl', 'sdxl-refiner']"),
    ("prediction", "x0", "must be 'eps' or 'v', got 'x0'"),
    ("scale_factor", -1.0, "must be positive"),
    ("scale_factor", 10**400, "must be float"),
    ("image_size", 0, "must be in [1, 16384]"),
    ("image_size", math.nan, "must be int"),
    ("scale_factor", math.inf, "must be float"),
    ("image_size", 65, "must be a multiple of 16"),
    ("sampling.sampler", "nope", "sampler"),
    ("sampling.steps", 0, "must be in [1, 1000]"),
    ("sampling.cfg_scale", "7.5", "must be float"),
    ("sampling.cfg_interval", [300, 200], "low < high, got (300, 200)"),
    ("sampling.cfg_interval", [0, 2000], "cfg_interval[1] must be in [0, 1000]"),
    ("sampling.cfg_interval", [200], "must be None or a pair (low, high)"),
    ("sampling.cfg_interval", [200.5, 1000], "must be a list of integers or null"),
]


@pytest.mark.parametrize("field, value, problem", BAD_FIELDS,
                         ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD_FIELDS])
def test_a_bad_config_field_is_named(shipped, tmp_path, field, value, problem):
    text = config_with(shipped[1], field, value)
    path = write(tmp_path / "bad-config.safetensors", shipped[0], text)
    refused(path, ldm.CheckpointError, f"embedded config (ldm.config) is invalid: {field}",
            problem)


@pytest.mark.parametrize("text, problem", [
    ("{not json", "is not valid JSON"),
    ("[" * 100_000, "is not valid JSON"),  # nested deeper than Python's stack
    ("[]", "must be a JSON object, got []"),
    ("", "is not valid JSON"),
])
def test_a_config_that_is_no_config_object_is_named(shipped, tmp_path, text, problem):
    path = write(tmp_path / "bad-config.safetensors", shipped[0], text)
    refused(path, ldm.CheckpointError, "embedded config (ldm.config) is invalid", problem)


def test_a_config_pickled_as_no_string_is_named(shipped, tmp_path):
    path = tmp_path / "int-config.ckpt"
    torch.save({"state_dict": shipped[0], checkpoint.CONFIG_KEY: 64}, path)
    refused(path, ldm.CheckpointError, "embedded config (ldm.config) is invalid: is a int")


def test_a_config_without_the_added_fields_means_what_it_meant(shipped):
    """Files written before text_encoder, prediction and SDXL's fields existed (the first
    shipped model's) still load, as what they meant; the shipped file has every field."""
    raw = json.loads(shipped[1])
    assert set(ModelConfig.__dataclass_fields__) == set(raw)
    assert set(UNetConfig.__dataclass_fields__) == set(raw["unet"])
    # TINY_SHAPES keeps the scale factor of the architecture before training measured it
    assert ModelConfig.from_json(shipped[1]) == \
        dataclasses.replace(TINY_SHAPES, scale_factor=raw["scale_factor"])
    for name in ("text_encoder", "prediction", "text_2"):
        del raw[name]
    for name in ("middle_transformer_depth", "adm_in_channels"):
        del raw["unet"][name]
    assert ModelConfig.from_json(json.dumps(raw)) == ModelConfig.from_json(shipped[1])


def test_a_config_written_before_cfg_interval_means_guidance_at_every_step(shipped):
    """The shipped file's sampling says (200, 1000) (its card's default since 2026-12-04); a file
    written before the field existed lacks it, and meant guidance at every step."""
    raw = json.loads(shipped[1])
    assert raw["sampling"]["cfg_interval"] == [200, 1000]
    del raw["sampling"]["cfg_interval"]
    assert ModelConfig.from_json(json.dumps(raw)).sampling.cfg_interval is None


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
    st.text(max_size=8), st.lists(st.integers(-2, 8), max_size=5),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def field_paths(raw, prefix=""):
    for key, value in raw.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from field_paths(value, prefix + key + ".")


SHIPPED_CONFIG = TINY_SHAPES.to_json()
FIELDS = sorted(field_paths(json.loads(SHIPPED_CONFIG)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES), min_size=1, max_size=3))
def test_any_edited_config_is_refused_as_such_or_builds(edits):
    """Whatever a file's config says, from_json either refuses it with a ConfigError or returns
    a config from which the model builds (on the meta device: no memory)."""
    text = SHIPPED_CONFIG
    for field, value in edits:
        try:
            text = config_with(text, field, value)
        except (KeyError, TypeError):  # an earlier edit replaced the parent with a non-object
            pass
    try:
        config = ModelConfig.from_json(text)
    except ConfigError:
        return
    with torch.device("meta"):
        StableDiffusion(config)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=40))
def test_any_text_is_refused_as_a_config_or_read(text):
    try:
        ModelConfig.from_json(text)
    except ConfigError:
        pass


# ---------------------------------------------------------------- 12. zip sizes that lie
def declare(path, entry_suffix, *, size=None, packed=None):
    """Rewrite the sizes a zip declares for its entry ending in `entry_suffix` (local header and
    central directory) without changing its data: how a bomb claims what it would expand to."""
    data = bytearray(path.read_bytes())
    for signature, sizes_at, name_len_at, name_at in [(b"PK\x03\x04", 18, 26, 30),
                                                     (b"PK\x01\x02", 20, 28, 46)]:
        start = data.find(signature)
        while start != -1:
            name_len = struct.unpack_from("<H", data, start + name_len_at)[0]
            name = data[start + name_at: start + name_at + name_len].decode()
            if name.endswith(entry_suffix):
                old_packed, old_size = struct.unpack_from("<II", data, start + sizes_at)
                struct.pack_into("<II", data, start + sizes_at,
                                 old_packed if packed is None else packed,
                                 old_size if size is None else size)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def no_torch_load(monkeypatch):
    """Refusals must come before torch reads (and allocates) any entry."""
    def fail(*args, **kwargs):
        raise AssertionError("torch.load was reached")
    monkeypatch.setattr(torch, "load", fail)


def deflated_ckpt(shipped, path):
    stored = write(path.with_suffix(".stored.ckpt"), *shipped)
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry.filename))
    stored.unlink()
    return path


def test_a_pickle_declared_huge_is_refused_unread(shipped, tmp_path, no_torch_load):
    """A 1.5 GB pickle in a small file (a pickle bomb) is refused from its declared size alone."""
    path = declare(deflated_ckpt(shipped, tmp_path / "bomb.ckpt"), "data.pkl",
                   size=1_500_000_000)
    assert path.stat().st_size < 30 * 2**20  # the shipped weights in float32, deflated
    refused(path, ldm.CheckpointError, "data.pkl", "declares 1,500,000,000 bytes",
            "pickle bomb", "refused unread")


def test_an_entry_larger_than_deflate_can_expand_is_refused(shipped, tmp_path, no_torch_load):
    path = deflated_ckpt(shipped, tmp_path / "ratio.ckpt")
    with zipfile.ZipFile(path) as archive:
        entry = next(e for e in archive.infolist() if "/data/" in e.filename)
    declare(path, entry.filename, size=min(2**32 - 1, entry.compress_size * 2000))
    refused(path, ldm.CheckpointError, entry.filename, "more than DEFLATE can expand to")


def test_stored_entries_whose_sizes_do_not_add_up_are_refused(shipped, tmp_path, no_torch_load):
    path = write(tmp_path / "lies.ckpt", *shipped)
    with zipfile.ZipFile(path) as archive:
        entry = next(e for e in archive.infolist() if "/data/" in e.filename)
    declare(path, entry.filename, size=entry.file_size + 4)
    refused(path, ldm.CheckpointError, entry.filename, "stored uncompressed but declares")
    declare(path, entry.filename, size=3_000_000_000, packed=3_000_000_000)
    refused(path, ldm.CheckpointError, "declare", "more than the", "the file holds")


# ---------------------------------------------------------------- 13. paths that are no file
def test_a_directory_is_named_as_such(tmp_path):
    folder = tmp_path / "sd15-diffusers"
    folder.mkdir()
    refused(folder, IsADirectoryError, "is a directory")


def test_a_symlink_loop_and_a_dangling_link_are_named(tmp_path):
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    refused(tmp_path / "a.safetensors", ldm.CheckpointError, "symbolic link loop")
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "deleted.safetensors")
    refused(tmp_path / "gone.safetensors", FileNotFoundError, "deleted.safetensors",
            "does not exist")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_fifo_is_named_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.ckpt"
    os.mkfifo(fifo)
    signal.alarm(30)  # reading a FIFO blocks until a writer comes: fail rather than hang
    try:
        refused(fifo, ldm.CheckpointError, "is a named pipe (FIFO), not a regular file")
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------- ldm.save
def test_save_into_a_missing_directory_names_it(tmp_path):
    target = tmp_path / "missing" / "model.safetensors"
    with pytest.raises(FileNotFoundError) as caught:
        ldm.save(ldm.load(), target)
    assert str(caught.value) == (f"cannot write {target}: the directory {target.parent} "
                                 "does not exist")
    assert list(tmp_path.iterdir()) == []
