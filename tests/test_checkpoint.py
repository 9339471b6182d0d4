"""The checkpoint map and loader: coverage of the real key sets, round trips, EMA, bad files.

Models are the tiny preset with random weights; the real SD key sets come from the manifests of
the released files (tests/data/manifests), checked on the meta device without any weights.
"""
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ldm
import ldm.loader
from ldm.loader import pipeline_class
from ldm import checkpoint
from ldm.config import PRESETS
from ldm.pipeline import StableDiffusion

from helpers import TINY_SD2, fresh_seed, randomize_, read_manifest

NOT_LOADED = {"model_ema.decay", "model_ema.num_updates",
              "cond_stage_model.transformer.text_model.embeddings.position_ids"}


def meta_networks(preset):
    with torch.device("meta"):
        return pipeline_class(PRESETS[preset])(PRESETS[preset]).networks()


def expected_shapes(networks):
    return {f"{c}.{n}": tuple(t.shape) for c, m in networks.items()
            for n, t in m.state_dict().items()}


# Every manifest and the preset that loads it; the full-EMA file twice, once per U-Net copy.
RELEASES = [("sd15", "sd15_emaonly", False), ("sd15", "sd14", False),
            ("sd15", "sd15_pruned_full_ema", False), ("sd15", "sd15_pruned_full_ema", True),
            ("sd15-inpainting", "sd15_inpainting", False),
            ("sd21", "sd21_768v", False), ("sd21-base", "sd21_768v", False),
            ("sdxl", "sdxl_base", False), ("sdxl-refiner", "sdxl_refiner", False)]


@pytest.mark.parametrize("preset, manifest, use_ema", RELEASES)
def test_map_covers_every_real_tensor_exactly_once(preset, manifest, use_ema):
    """The model's state dict through the name map is the release's tensor set, names and
    shapes, exactly: nothing missing, nothing extra but checkpoint.IGNORED and, in a full-EMA
    file, the U-Net copy not loaded."""
    real = {name: shape for name, (shape, _) in read_manifest(manifest).items()}
    networks = meta_networks(preset)
    rows = checkpoint.name_map(networks, use_ema=use_ema, family=PRESETS[preset].text_encoder)
    assert len(set(rows.values())) == len(rows), "two parameters map to one original name"
    shapes = expected_shapes(networks)
    ours = {original: shapes[name] for name, original in rows.items()}
    other_copy = checkpoint.PREFIXES["unet"] if use_ema else checkpoint.EMA_PREFIX
    theirs = {name: shape for name, shape in real.items()
              if name not in checkpoint.IGNORED and not name.startswith(other_copy)}
    assert sorted(set(theirs) - set(ours)) == [], "tensors of the release the model lacks"
    assert sorted(set(ours) - set(theirs)) == [], "tensors of the model the release lacks"
    assert {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]} == {}


def test_sd2_inpainting_is_sd21_with_nine_input_channels():
    """No manifest of 512-inpainting-ema is at hand: as SD 1.5 inpainting is to SD 1.5, it is
    taken to be the SD 2 tensor set with a 9-channel input convolution."""
    real = {name: shape for name, (shape, _) in read_manifest("sd21_768v").items()}
    real["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    networks = meta_networks("sd2-inpainting")
    rows = checkpoint.name_map(networks, family="open_clip")
    shapes = expected_shapes(networks)
    assert {original: shapes[ours] for ours, original in rows.items()} == \
        {original: real[original] for original in rows.values()}


def test_ema_names_match_the_full_ema_release():
    real = read_manifest("sd15_pruned_full_ema")
    ema_rows = checkpoint.name_map(meta_networks("sd15"), use_ema=True)
    ema_unet = {o for ours, o in ema_rows.items() if ours.startswith("unet.")}
    assert ema_unet == {n for n in real if n.startswith("model_ema.")} - NOT_LOADED
    plain_rows = checkpoint.name_map(meta_networks("sd15"))
    for ours, ema in ema_rows.items():  # each EMA copy has the shape of its raw twin
        assert real[ema][0] == real[plain_rows[ours]][0]


def test_schedule_buffers_match_a_release_manifest_and_the_closed_form():
    buffers = ldm.schedule.checkpoint_buffers()
    real = read_manifest("sd15_emaonly")
    assert {n: (tuple(t.shape), t.dtype) for n, t in buffers.items()} == \
        {n: real[n] for n in buffers}
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(buffers["alphas_cumprod"].double(), torch.cumprod(1 - betas, 0),
                          rtol=1e-6)
    assert buffers["alphas_cumprod_prev"][0] == 1.0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    pipe = StableDiffusion(PRESETS["tiny"])
    for module in pipe.networks().values():
        randomize_(module, seed=fresh_seed())
    return pipe


def assert_same_weights(a, b):
    for component, module in a.networks().items():
        other = b.networks()[component].state_dict()
        for name, tensor in module.state_dict().items():
            assert torch.equal(tensor, other[name]), f"{component}.{name} differs"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd2_round_trip_uses_the_open_clip_names(tmp_path, suffix):
    pipe = StableDiffusion(TINY_SD2)
    for module in pipe.networks().values():
        randomize_(module, seed=fresh_seed())
    ldm.save(pipe, tmp_path / f"sd2{suffix}")
    names = checkpoint.open_checkpoint(tmp_path / f"sd2{suffix}").shapes
    text = {n for n in names if n.startswith("cond_stage_model.")}
    assert text and all(n.startswith("cond_stage_model.model.") for n in text)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in text
    loaded = ldm.load(tmp_path / f"sd2{suffix}")
    assert loaded.config == TINY_SD2
    assert_same_weights(pipe, loaded)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_save_load_round_trip_is_lossless(tiny, tmp_path, suffix):
    first = tmp_path / f"a{suffix}"
    ldm.save(tiny, first)
    loaded = ldm.load(first)
    assert loaded.config == tiny.config
    assert_same_weights(tiny, loaded)
    second = tmp_path / f"b{suffix}"
    ldm.save(loaded, second)
    a, b = checkpoint.open_checkpoint(first), checkpoint.open_checkpoint(second)
    assert a.shapes == b.shapes
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.shapes)


def test_saved_file_has_the_original_layout(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    ldm.save(tiny, path)
    names = set(checkpoint.open_checkpoint(path).shapes)
    sd15 = set(read_manifest("sd15_emaonly")) - {"model_ema.decay", "model_ema.num_updates"}
    # Same names as a real release: only the sizes differ in the tiny model.
    assert {n for n in names if "blocks" not in n and "layers." not in n and ".up." not in n
            and ".down." not in n} <= sd15
    assert {n.split(".")[0] for n in names} <= {n.split(".")[0] for n in sd15}


def test_load_casts_and_places_every_tensor(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    ldm.save(tiny, path)
    pipe = ldm.load(path, dtype=torch.float16)
    dtypes = {p.dtype for p in pipe.parameters()}
    assert dtypes == {torch.float16}
    assert not any(p.is_meta for p in pipe.parameters())
    assert not any(b.is_meta for b in pipe.buffers())


def test_a_state_dict_in_memory_loads_like_its_file(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    ldm.save(tiny, path)
    ckpt = checkpoint.open_checkpoint(path)
    tensors = {name: ckpt.read(name) for name in ckpt.shapes}
    tensors["global_step"] = 470000  # a non-tensor entry, as Lightning keeps beside the weights
    loaded = ldm.load(tensors, config=tiny.config)
    assert_same_weights(loaded, tiny)
    out_conv = "model.diffusion_model.out.2.weight"
    assert loaded.unet.state_dict()["out.2.weight"].data_ptr() == tensors[out_conv].data_ptr()
    del tensors[out_conv]
    with pytest.raises(ldm.CheckpointError, match=rf"^state dict: 1 missing.*{out_conv}"):
        ldm.load(tensors, config=tiny.config)


def rewrite(path, out, edit):
    """Copy a safetensors checkpoint with `edit(dict)` applied to its tensors (no metadata)."""
    with safe_open(str(path), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata()
    edit(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_ema_weights_are_loaded_by_default(tiny, tmp_path):
    plain = tmp_path / "plain.safetensors"
    ldm.save(tiny, plain)
    ema_values = {}

    def add_ema(tensors):
        for name in [n for n in tensors if n.startswith("model.diffusion_model.")]:
            ema_values[name] = torch.randn_like(tensors[name])
            tensors[checkpoint.ema_name(name)] = ema_values[name]
    both = rewrite(plain, tmp_path / "ema.safetensors", add_ema)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the raw/EMA twin is expected, not "unexpected"
        ema, raw = ldm.load(both), ldm.load(both, use_ema=False)
    assert_same_weights(raw, tiny)
    for name, value in ema.unet.state_dict().items():
        assert torch.equal(value, ema_values["model.diffusion_model." + name]), name
    assert_same_weights_except_unet(ema, tiny)


def assert_same_weights_except_unet(a, b):
    for component in ("vae", "text_encoder"):
        for name, tensor in a.networks()[component].state_dict().items():
            assert torch.equal(tensor, b.networks()[component].state_dict()[name])


def test_older_text_encoder_layout_loads(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    ldm.save(tiny, path)
    official = checkpoint.PREFIXES["text_encoder"]

    def drop_text_model_level(tensors):
        for name in [n for n in tensors if n.startswith(official)]:
            tensors[checkpoint.LEGACY_TEXT_PREFIX + name[len(official):]] = tensors.pop(name)
    legacy = rewrite(path, tmp_path / "legacy.safetensors", drop_text_model_level)
    assert_same_weights(ldm.load(legacy), tiny)


def tiny_file(tiny, tmp_path, edit, name="edited.safetensors"):
    path = tmp_path / "tiny.safetensors"
    if not path.exists():
        ldm.save(tiny, path)
    return rewrite(path, tmp_path / name, edit)


def test_missing_tensor_is_named(tiny, tmp_path):
    gone = "model.diffusion_model.out.2.weight"
    path = tiny_file(tiny, tmp_path, lambda t: t.pop(gone))
    with pytest.raises(ldm.CheckpointError, match=rf"{path}.*1 missing.*{gone}"):
        ldm.load(path)


def test_misshapen_tensor_is_named_with_both_shapes(tiny, tmp_path):
    name = "first_stage_model.quant_conv.weight"
    path = tiny_file(tiny, tmp_path, lambda t: t.update({name: torch.randn(8, 8, 3, 3)}))
    with pytest.raises(ldm.CheckpointError, match=r"quant_conv.weight: expected \(8, 8, 1, 1\), "
                                                  r"found \(8, 8, 3, 3\)"):
        ldm.load(path)


def test_unexpected_tensor_warns_or_refuses_in_strict_mode(tiny, tmp_path):
    path = tiny_file(tiny, tmp_path, lambda t: t.update({"model.extra_head.weight": torch.ones(3)}))
    with pytest.warns(UserWarning, match="1 unexpected tensor.*model.extra_head.weight"):
        ldm.load(path)
    with pytest.raises(ldm.CheckpointError, match="unexpected.*model.extra_head.weight"):
        ldm.load(path, strict=True)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint")
    with pytest.raises(ldm.CheckpointError, match="notes.ckpt.*neither"):
        ldm.load(text)
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        ldm.load(tmp_path / "nowhere.safetensors")
    empty = tmp_path / "empty.safetensors"
    save_file({"some.other.model": torch.ones(2)}, str(empty))
    with pytest.raises(ldm.CheckpointError, match="no Stable Diffusion U-Net"):
        ldm.load(empty)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_files_are_refused(tiny, tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    ldm.save(tiny, whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ldm.CheckpointError, match=f"cut{suffix}"):
        ldm.load(cut)


class RunsCode:
    """A pickle payload that would create a file if unpickled with code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)},
                "payload": RunsCode(marker)}, path)
    with pytest.raises(ldm.CheckpointError, match="evil.ckpt.*refused.*system"):
        ldm.load(path)
    assert not marker.exists()


def test_lightning_extras_beside_the_state_dict_load(tiny, tmp_path, monkeypatch):
    import sys
    import types

    # A stand-in for the pickled Lightning callback found in real LDM training checkpoints.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    callback = ModelCheckpoint()
    callback.best_model_score = 0.5

    saved = tmp_path / "tiny.safetensors"
    ldm.save(tiny, saved)
    with safe_open(str(saved), "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
        config = f.metadata()[checkpoint.CONFIG_KEY]
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": tensors, "global_step": 470000, "epoch": 5,
                "callbacks": {ModelCheckpoint: callback}, checkpoint.CONFIG_KEY: config}, path)
    for name in names:
        monkeypatch.delitem(sys.modules, name)  # the loader must not need Lightning itself
    assert_same_weights(ldm.load(path), tiny)


def test_save_never_overwrites_unasked(tiny, tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="mine.safetensors"):
        ldm.save(tiny, path)
    assert path.read_bytes() == b"precious"
    ldm.save(tiny, path, overwrite=True)
    assert_same_weights(ldm.load(path), tiny)
    with pytest.raises(ValueError, match="must end in"):
        ldm.save(tiny, tmp_path / "model.bin")
    with pytest.raises(ValueError, match="extra_entries need a .ckpt"):
        checkpoint.save_checkpoint(tmp_path / "other.safetensors", tiny.networks(), "{}",
                                   extra_entries={"global_step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["mine.safetensors"]  # no partial files


def write_shapes(path, shapes):
    save_file({name: torch.randn(shape) for name, shape in shapes.items()}, str(path))
    return checkpoint.open_checkpoint(path)


def test_family_is_told_from_shapes(tmp_path):
    unet = "model.diffusion_model."
    first = unet + "input_blocks.0.0.weight"
    cross = unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    v1 = write_shapes(tmp_path / "v1.safetensors", {first: (320, 4, 3, 3), cross: (320, 768)})
    inpaint = write_shapes(tmp_path / "in.safetensors", {first: (320, 9, 3, 3), cross: (320, 768)})
    assert ldm.loader.detect_config(v1) == PRESETS["sd15"]
    assert ldm.loader.detect_config(inpaint) == PRESETS["sd15-inpainting"]
    v2 = {first: (320, 4, 3, 3), cross: (320, 1024)}
    # The files do not say v or ε: the release names do (v2-1_768-ema-pruned, v2-1_512-…).
    for name, preset in [("v2-1_768-ema-pruned", "sd21"), ("v2-1_512-ema-pruned", "sd21-base"),
                         ("sd21-base-finetune", "sd21-base"), ("my-sd2-model", "sd21"),
                         ("sd2-768-v-5120-steps", "sd21")]:
        found = ldm.loader.detect_config(write_shapes(tmp_path / f"{name}.safetensors", v2))
        assert found == PRESETS[preset], name
    inpaint_v2 = write_shapes(tmp_path / "512-inpainting-ema.safetensors",
                              {first: (320, 9, 3, 3), cross: (320, 1024)})
    assert ldm.loader.detect_config(inpaint_v2) == PRESETS["sd2-inpainting"]
    depth = write_shapes(tmp_path / "depth.safetensors", {first: (320, 5, 3, 3)})
    with pytest.raises(ldm.CheckpointError, match="5 input channels"):
        ldm.load(depth.path)
    with pytest.raises(ValueError, match="config must be a ModelConfig or one of"):
        ldm.load(depth.path, config="sd3")


def test_a_real_key_set_with_one_tensor_missing_names_it(tmp_path):
    """The sd15 key set (shapes shrunk to scalars would fail the shape check, so only the
    missing-name path is exercised here; the full-size files are loaded in test_parity_sd15)."""
    real = read_manifest("sd15_emaonly")
    networks = meta_networks("sd15")
    rows = checkpoint.name_map(networks)
    present = {name: shape for name, (shape, _) in real.items()}
    gone = "first_stage_model.decoder.up.2.upsample.conv.weight"
    del present[gone]
    ckpt = checkpoint.Checkpoint(tmp_path / "fake.safetensors", present, None)
    with pytest.raises(ldm.CheckpointError, match=rf"fake.safetensors: 1 missing tensor\(s\): {gone}$"):
        checkpoint.check_tensors(ckpt, rows, expected_shapes(networks))
