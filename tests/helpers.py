"""Shared test utilities: the real checkpoint manifests, random weights, relative error."""
import gzip
import json
import secrets
import shutil
import struct
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ldm.config import PRESETS, ModelConfig
from ldm.models.open_clip_text import OPEN_CLIP_TINY
from ldm.tokenizer import VOCAB_PATH

# Name, shape and dtype of every tensor of the released checkpoints (README.md there): small
# facts about the real files, kept in the repository so that a fresh clone tests without them.
MANIFESTS = Path(__file__).resolve().parent / "data" / "manifests"

DTYPES = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}


# SD 2.x at toy size: 16-wide heads, linear projections, OpenCLIP text, v-prediction.
TINY_SD2 = ModelConfig(
    unet=replace(PRESETS["tiny"].unet, num_heads=None, head_dim=16, use_linear_proj=True),
    vae=PRESETS["tiny"].vae, text=OPEN_CLIP_TINY, text_encoder="open_clip", prediction="v")


def read_manifest(name):
    """{tensor name: (shape tuple, torch dtype)} of a real checkpoint, e.g. "sd15_emaonly"."""
    rows = {}
    for line in (MANIFESTS / f"{name}.tsv").read_text().splitlines():
        tensor, shape, dtype = line.split("\t")
        rows[tensor] = (tuple(int(n) for n in shape.split(",")) if shape else (), DTYPES[dtype])
    return rows


def randomize_(module, seed):
    """Give every parameter random values, norms and biases included, so that a wrong name
    mapping or a transposed weight cannot hide behind default initialisations (ones, zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if p.ndim <= 1:  # norm scales near 1, biases near 0: realistic but not default
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                fan_in = p[0].numel()
                p.copy_(noise / fan_in ** 0.5)
    return module


# The seeds fresh_seed() gave in the running test: conftest.py prints them when it fails, so
# that a failure seen once can be run again with the same inputs.
DRAWN = []


def fresh_seed():
    """A seed drawn anew at each run, so that every run checks other random inputs: from the
    OS, since torch's global generator is seeded by some tests (torch.manual_seed(0)) and would
    give every later test of the run the same "fresh" seed. Recorded in DRAWN."""
    seed = secrets.randbelow(1 << 30)
    DRAWN.append(seed)
    return seed


def rel_error(out, ref):
    """‖out − ref‖ / ‖ref‖, computed in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@contextmanager
def large_temporary_file(path, write, nbytes):
    """`write(path)`, yield the path, then delete the file.

    The full-size parity tests keep at most one checkpoint (4-5 GB) on disk at a time this way;
    where the disk has not that much room, the test is skipped with a message that says so.
    """
    free = shutil.disk_usage(path.parent).free
    if free < nbytes + 2**30:  # a GiB to spare for everything else
        pytest.skip(f"a full-size checkpoint needs {nbytes / 2**30:.1f} GiB in {path.parent}, "
                    f"which has {free / 2**30:.1f} GiB free")
    try:
        write(path)
        yield path
    finally:
        path.unlink(missing_ok=True)


def tensor_bytes(tensors):
    """Bytes taken by the tensors of a state dict."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_clip_vocab_files(folder):
    """vocab.json + merges.txt for transformers' CLIPTokenizer, made from the BPE merges file as
    openai/clip-vit-large-patch14's were: 256 byte symbols, the same with "</w>", one token per
    merge, then the two special tokens. Returns the folder."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(VOCAB_PATH).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    return folder


def write_random_safetensors(path, manifest, seed, float_dtype=torch.float32):
    """A safetensors file of `manifest`'s tensors, floats as `float_dtype` (float32 or float16)
    with realistic scales, generated and written one tensor at a time (never all in memory).
    Returns the file's data size in bytes."""
    g = torch.Generator().manual_seed(seed)
    float_kind, float_size = {torch.float32: ("F32", 4), torch.float16: ("F16", 2)}[float_dtype]
    header, offset = {}, 0
    for name, (shape, dtype) in manifest.items():
        kind, size = (float_kind, float_size) if dtype.is_floating_point else ("I64", 8)
        nbytes = size * int(torch.tensor(shape).prod()) if shape else size
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [offset,
                                                                              offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, (shape, dtype) in manifest.items():
            tensor = random_tensor(name, shape, dtype, g)
            f.write((tensor.to(float_dtype) if dtype.is_floating_point else tensor).numpy()
                    .tobytes())
    return offset


def random_tensor(name, shape, dtype, g):
    """A tensor of a release's name and shape with values of realistic scale: weights
    ~ 1/sqrt(fan_in), norm scales ~ 1, biases ~ 0; integer tensors (position_ids) 0, 1, 2, …
    along their last axis, integer scalars 0."""
    if not dtype.is_floating_point:
        if not shape:
            return torch.zeros((), dtype=torch.int64)
        return torch.arange(shape[-1]).reshape(shape)
    noise = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return noise / noise[0].numel() ** 0.5
    if len(shape) == 1 and "norm" in name and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    return 0.1 * noise


def in_processes(fn, world, folder, *args):
    """[fn(*args) as each of `world` gloo processes computes it, rank by rank]: what a
    data-parallel test compares with one process. `fn` is a module-level function (the child
    processes import it) returning tensors or dicts of them; `folder` a fresh directory."""
    import torch.multiprocessing as mp

    out = Path(folder) / "result"
    mp.spawn(_gloo_worker, args=(world, Path(folder) / "store", out, fn, args), nprocs=world)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]


def _gloo_worker(rank, world, store, out, fn, args):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(fn(*args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
