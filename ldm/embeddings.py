"""Textual-inversion embeddings: the files people download, read safely, and written back.

An embedding is n learned token vectors, (n, D), that stand for one trigger word in a prompt;
D is the width of the text encoder's token embedding it was trained for. The files in the wild:

    A1111 .pt      {"string_to_param": {"*": (n, D)}, "string_to_token": {"*": 265},
                    "name": str, "step": int, "sd_checkpoint": str, "sd_checkpoint_name": str}
    kohya          .safetensors {"emb_params": (n, D)}
    diffusers      .bin or .safetensors {token: (n, D) or (D,)}
    SDXL           .safetensors {"clip_l": (n, 768), "clip_g": (n, 1280)}   (kohya, A1111)

Read, an embedding's vectors are keyed by the text encoder they are for: "clip_l" and "clip_g"
as SDXL files name their two encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14), and `ANY` ("*",
A1111's own placeholder key) for a file of one tensor, which names no encoder and so serves a
model with one text encoder of its width: 768 for SD 1.x (CLIP ViT-L/14), 1024 for SD 2.x
(OpenCLIP ViT-H/14), another for a model of other sizes. `vectors_for` hands a model the vectors
of each of its encoders, or says why the file is not for that model.

The trigger word is the file's stem (`charturner.pt` -> "charturner"), as in AUTOMATIC1111,
unless `token` is given. diffusers' `load_textual_inversion` instead takes the name stored inside
the file (an A1111 file's "name", a diffusers file's only key; a kohya file's is "emb_params"),
which is why a file that works in A1111 under its file name may do nothing there; that name is
kept as `TextualInversion.stored_name`.

`.pt` and `.bin` files are pickles, which can run any code when unpickled. They are read with
`torch.load(weights_only=True)`, which builds only tensors and plain containers, plus one inert
stand-in for `torch.nn.ParameterDict` (files of the original textual-inversion code and of A1111
under torch 1.11 pickled one): a pickle that asks for anything else is refused, naming what it
asked for, and nothing in it runs. Sizes are checked before any tensor is read.
"""
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, _check_zip_sizes

# The key of a one-tensor file's vectors: for whichever single text encoder a model has.
ANY = "*"
# SDXL's two text encoders, as its embedding files name them, with their widths.
SDXL_ENCODERS = {"clip_l": 768, "clip_g": 1280}
# The encoder key of each text encoder of each model family (ModelConfig.text_encoder), by the
# pipeline's attribute for it: SD 1.x's CLIP ViT-L/14, SD 2.x's OpenCLIP ViT-H/14, SDXL's pair.
ENCODERS = {"clip": {"text_encoder": "clip_l"},
            "open_clip": {"text_encoder": "open_clip_h"},
            "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
            "sdxl-refiner": {"text_encoder_2": "clip_g"}}
# Widths of the known text encoders, to say in an error which model a file is for.
KNOWN_WIDTHS = {768: "CLIP ViT-L/14: SD 1.x, and SDXL's first encoder",
                1024: "OpenCLIP ViT-H/14: SD 2.x",
                1280: "OpenCLIP ViT-bigG/14: SDXL's second encoder"}
# A prompt chunk holds 75 tokens besides its start and end, so no embedding can be longer.
MAX_VECTORS = 75
MAX_WIDTH = 8192
# An embedding file is at most 75 * 2048 float32 values (~600 KB) plus a little pickle; anything
# far larger is a model or a LoRA given by mistake, or a file built to exhaust memory.
MAX_FILE_BYTES = 64 * 2**20
# The image formats A1111 also reads embeddings from (hidden in the pixels or a text chunk).
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class TextualInversion:
    """One embedding file, read.

    token: the trigger word (the file's stem unless given); vectors: {encoder: (n, D) float32 on
    the CPU}, keyed "clip_l" + "clip_g" (SDXL) or ANY (one tensor); stored_name: the name inside
    the file that diffusers would use as the trigger, if it has one.
    """
    token: str
    vectors: dict
    path: Path
    stored_name: str | None = None

    @property
    def num_vectors(self):
        """n, the prompt tokens the trigger word stands for (the same for every encoder)."""
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self):
        """{encoder: D}."""
        return {encoder: v.shape[1] for encoder, v in self.vectors.items()}


class _ParameterDict:
    """Stands in for `torch.nn.ParameterDict` in an old embedding's pickle: it keeps the pickled
    state ({"_parameters": {"*": tensor}, hooks, ...}) and runs nothing, where the real class
    would build a Module."""

    def __setstate__(self, state):
        self.state = state


# The one global beyond weights_only's tensors and containers that real embedding files need.
_ALLOWED = [(_ParameterDict, "torch.nn.modules.container.ParameterDict")]


def read_embedding(path, token=None):
    """Read an embedding file (.pt, .bin, .safetensors; the container is told by its bytes).

    token: the trigger word; None takes the file's stem (A1111's rule).
    Raises FileNotFoundError, IsADirectoryError, ValueError (a bad token) or CheckpointError
    naming the file and what is wrong with it, refusing any pickle that asks for code.
    """
    path = Path(path)
    token = _trigger(path, token)
    _require_file(path)
    data = _read(path)
    vectors, stored_name = _parse(path, data)
    return TextualInversion(token, vectors, path, stored_name)


def _trigger(path, token):
    if token is None:
        token, source = path.stem, f"the file name of {path}"
    elif not isinstance(token, str):
        raise ValueError(f"token must be a string (the trigger word), got {type(token).__name__}")
    else:
        source = "token"
    if not token.strip() or token != token.strip():
        raise ValueError(f"{source} gives the trigger word {token!r}; a trigger word is not empty "
                         "and has no spaces at its ends (pass token=...)")
    return token


def _require_file(path):
    if path.is_dir():
        raise IsADirectoryError(f"embedding {path} is a directory, not an embedding file")
    if not path.exists():
        raise FileNotFoundError(f"embedding {path} does not exist")
    if not path.is_file():
        raise CheckpointError(path, "is not a regular file (a pipe or a device?); copy it to "
                                    "a file first")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise CheckpointError(path, "is an image; ldm does not read embeddings stored in "
                                    "images (A1111's .png embeddings), only .pt, .bin and "
                                    ".safetensors files")


def _read(path):
    """The file's contents: {name: tensor or other value}, or one tensor (a pickled tensor)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # torch.save's zip container (torch >= 1.6)
        return _read_pickle(path)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return _read_safetensors(path)
    if head[:1] == b"\x80":
        raise CheckpointError(path, "is a bare pickle (torch < 1.6's format, or no torch file "
                                    "at all), which ldm does not unpickle; only torch zip "
                                    "files and safetensors are read")
    raise CheckpointError(path, "is neither a torch .pt/.bin (zip) file nor a safetensors file")


def _read_pickle(path):
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CheckpointError(path, f"is {size:,} bytes; an embedding is well under "
                                    f"{MAX_FILE_BYTES:,} (is it a model or a LoRA?)")
    _check_zip_sizes(path)  # each entry's declared size, before torch allocates it
    _check_unpacked_size(path)
    try:
        with torch.serialization.safe_globals(_ALLOWED), open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know, so nothing in the file has run.
        raise CheckpointError(path, f"refused: its pickle asks for {_unsafe_globals(path)}, "
                                    "which an embedding does not need; nothing was run") from e
    except Exception as e:
        raise CheckpointError(path, f"is not a readable torch file ({e})") from e


def _check_unpacked_size(path):
    # A compressed entry may declare up to 1032 times its size, which _check_zip_sizes allows a
    # checkpoint; an embedding unpacks to about its file size (torch.save stores, not deflates).
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(entry.file_size for entry in archive.infolist())
    if unpacked > MAX_FILE_BYTES:
        raise CheckpointError(path, f"its entries unpack to {unpacked:,} bytes; an embedding's "
                                    f"are well under {MAX_FILE_BYTES:,}; refused unread")


def _unsafe_globals(path):
    try:
        with torch.serialization.safe_globals(_ALLOWED), open(path, "rb") as f:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # a damaged pickle: say so rather than guess
        return "globals it could not even list"
    return ", ".join(names) or "unknown globals"


def _read_safetensors(path):
    """Every tensor of the file, after its header says it holds at most two small ones."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            _check_safetensors_shapes(path, shapes)
            return {name: f.get_tensor(name) for name in shapes}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(path, f"is not a readable safetensors file ({e})") from e


def _check_safetensors_shapes(path, shapes):
    if len(shapes) > len(SDXL_ENCODERS):
        names = ", ".join(list(shapes)[:3])
        raise CheckpointError(path, f"holds {len(shapes)} tensors ({names}, ...); an embedding "
                                    "holds one, or clip_l and clip_g (is it a LoRA or a model?)")
    for name, shape in shapes.items():
        count = 1
        for n in shape:
            count *= n
        if count > MAX_VECTORS * MAX_WIDTH:
            raise CheckpointError(path, f"tensor {name} has shape {shape}, far larger than an "
                                        f"embedding's (n <= {MAX_VECTORS}, D)")


def _parse(path, data):
    """({encoder: (n, D)}, the name diffusers would use) from a file's contents, recognised in
    A1111's order: string_to_param, an SDXL pair, one tensor."""
    if isinstance(data, torch.Tensor):  # a bare pickled tensor (diffusers accepts it, with token=)
        return {ANY: _vectors(path, "the pickled tensor", data)}, None
    if not isinstance(data, dict) or not data:
        raise CheckpointError(path, f"holds {_kind(data)}, not an embedding")
    if "string_to_param" in data:
        return _parse_a1111(path, data)
    if "clip_l" in data or "clip_g" in data:
        return _parse_sdxl(path, data), None
    tensors = [name for name, value in data.items() if isinstance(value, torch.Tensor)]
    if len(data) == 1 and tensors:
        name = tensors[0]
        return {ANY: _vectors(path, name, data[name])}, name
    keys = ", ".join(repr(k) for k in list(data)[:10])
    raise CheckpointError(path, f"is no embedding format ldm knows: its keys are {keys}; an "
                                "embedding holds string_to_param (A1111), one tensor (diffusers, "
                                "kohya's emb_params) or clip_l and clip_g (SDXL)")


def _parse_a1111(path, data):
    params = data["string_to_param"]
    if isinstance(params, _ParameterDict):  # pickled by torch.nn.ParameterDict
        params = params.state.get("_parameters") if isinstance(params.state, dict) else None
    if not isinstance(params, dict) or len(params) != 1:
        found = f"{len(params)} entries" if isinstance(params, dict) else _kind(params)
        raise CheckpointError(path, f"string_to_param holds {found}; an embedding file holds "
                                    "exactly one (A1111 refuses others too)")
    (key, tensor), = params.items()
    name = data.get("name")
    return ({ANY: _vectors(path, f"string_to_param[{key!r}]", tensor)},
            name if isinstance(name, str) else None)


def _parse_sdxl(path, data):
    missing = [name for name in SDXL_ENCODERS if name not in data]
    if missing:
        raise CheckpointError(path, f"holds {' and '.join(n for n in SDXL_ENCODERS if n in data)} "
                                    f"but not {missing[0]}; an SDXL embedding holds both")
    extra = [repr(name) for name in data if name not in SDXL_ENCODERS]
    if extra:
        raise CheckpointError(path, f"holds clip_l and clip_g and also {', '.join(extra[:10])}, "
                                    "which no SDXL embedding has")
    vectors = {name: _vectors(path, name, data[name]) for name in SDXL_ENCODERS}
    counts = {name: v.shape[0] for name, v in vectors.items()}
    if len(set(counts.values())) > 1:
        raise CheckpointError(path, f"holds {counts['clip_l']} clip_l vector(s) but "
                                    f"{counts['clip_g']} clip_g; both encoders need one per "
                                    "prompt token")
    return vectors


def _vectors(path, name, tensor):
    """`tensor` as (n, D) float32 on the CPU, or CheckpointError saying why it cannot be."""
    if not isinstance(tensor, torch.Tensor):
        raise CheckpointError(path, f"{name} is {_kind(tensor)}, not a tensor of vectors")
    if not tensor.is_floating_point():
        raise CheckpointError(path, f"{name} holds {tensor.dtype} values, not vectors of floats")
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        raise CheckpointError(path, f"{name} is a {tensor.layout} tensor on {tensor.device}, "
                                    "not vectors of values")
    if tensor.dim() == 1:  # one vector saved without its axis (diffusers' single-token files)
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or not 1 <= tensor.shape[0] <= MAX_VECTORS or not tensor.shape[1]:
        raise CheckpointError(path, f"{name} has shape {tuple(tensor.shape)}; embedding vectors "
                                    f"are (n, D) with 1 <= n <= {MAX_VECTORS}, the tokens one "
                                    "prompt chunk holds")
    vectors = tensor.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(vectors).all():
        bad = int((~torch.isfinite(vectors)).sum())
        raise CheckpointError(path, f"{name} holds {bad} NaN or infinite value(s)")
    return vectors


def _kind(value):
    empty = value is None or (isinstance(value, dict) and not value)
    return "nothing" if empty else f"a {type(value).__name__}"


def vectors_for(embedding, encoders):
    """{encoder: (n, D)} for every text encoder of a model, all or none.

    encoders: {name: width} of the model's text encoders, e.g. {"clip_l": 768} (SD 1.x),
    {"open_clip_h": 1024} (SD 2.x), {"clip_l": 768, "clip_g": 1280} (SDXL), {"clip_g": 1280}
    (SDXL's refiner); ENCODERS names them for each model family. A one-tensor file serves a
    model with one text encoder of its width; an SDXL file, SDXL's base and refiner. Anything
    else raises CheckpointError naming the file, its widths and the model's.
    """
    if not isinstance(encoders, dict) or not encoders:
        raise ValueError(f"encoders must be a dict {{name: width}} of the model's text encoders, "
                         f"got {encoders!r}")
    if ANY in embedding.vectors:
        if len(encoders) != 1:
            raise CheckpointError(embedding.path, f"holds one set of vectors "
                                  f"{embedding.widths[ANY]} wide, but this model has "
                                  f"{len(encoders)} text encoders ({_listing(encoders)}): an "
                                  "embedding for it holds vectors for each "
                                  f"({_listing(encoders, False)})")
        (encoder, width), = encoders.items()
        return {encoder: check_width(embedding, width, encoder)}
    # An SDXL file serves SDXL's models: the base (both encoders) and the refiner (clip_g only).
    # ComfyUI also puts its clip_l vectors into SD 1.x's encoder; A1111 refuses, as here.
    if "clip_g" not in encoders or not set(encoders) <= set(embedding.vectors):
        raise CheckpointError(embedding.path, f"holds vectors for "
                              f"{_listing(embedding.widths)} (an SDXL embedding), but this "
                              f"model has {_listing(encoders)}")
    return {encoder: check_width(embedding, width, encoder) for encoder, width in encoders.items()}


def check_width(embedding, width, encoder):
    """The (n, width) vectors `embedding` holds for the text encoder `encoder` of `width`.

    Raises CheckpointError naming the file, its width and the model's when they differ (an
    SD 1.x embedding in SD 2.x, say), or when the file has no vectors for `encoder`.
    """
    vectors = embedding.vectors.get(encoder, embedding.vectors.get(ANY))
    if vectors is None:
        raise CheckpointError(embedding.path, f"holds no vectors for the text encoder {encoder} "
                                              f"(it holds {_listing(embedding.widths)})")
    if vectors.shape[1] != width:
        raise CheckpointError(embedding.path, f"its vectors are {vectors.shape[1]} wide "
                              f"{_known(vectors.shape[1])}, but this model's text encoder "
                              f"{encoder} is {width} wide {_known(width)}; an embedding works "
                              "only with the text encoder it was trained for")
    return vectors


def _known(width):
    return f"({KNOWN_WIDTHS[width]})" if width in KNOWN_WIDTHS else "(no SD release's width)"


def _listing(widths, with_widths=True):
    names = [name if name != ANY else "one encoder" for name in widths]
    if with_widths:
        names = [f"{name} {width} wide" for name, width in zip(names, widths.values())]
    return ", ".join(names)


def save_embedding(path, vectors, *, overwrite=False):
    """Write an embedding as A1111 and kohya do, atomically, as `.safetensors`.

    vectors: a tensor (n, D) or (D,), written as {"emb_params": ...}; {"clip_l": ..., "clip_g":
    ...} for SDXL; or a TextualInversion. The trigger word of the file is its stem, in A1111 as
    in `read_embedding`, so name the file after the word. An existing file is kept unless
    `overwrite`; the data goes to a temporary file renamed only once complete.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path {path} must end in .safetensors (ldm writes no pickles)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    try:
        tensors = _tensors_to_save(path, vectors)
    except CheckpointError as e:  # the checks read_embedding makes, here of an argument
        raise ValueError(f"vectors cannot be saved as an embedding: {e}") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tensors_to_save(path, vectors):
    """{file key: (n, D)} checked by the rules `read_embedding` applies, so the file reads back."""
    if isinstance(vectors, TextualInversion):
        vectors = vectors.vectors
    if isinstance(vectors, dict) and set(vectors) == {ANY}:
        vectors = vectors[ANY]
    if isinstance(vectors, torch.Tensor):
        return {"emb_params": _vectors(path, "vectors", vectors)}
    if isinstance(vectors, dict) and set(vectors) == set(SDXL_ENCODERS):
        return _parse_sdxl(path, vectors)
    raise ValueError(f"vectors must be a tensor (n, D), a dict with clip_l and clip_g, or a "
                     f"TextualInversion, got {_kind(vectors)}"
                     + (f" with keys {list(vectors)}" if isinstance(vectors, dict) else ""))
