"""Textual-inversion embedding files (ldm/embeddings.py): each format in the wild written as its
tool writes it, read back exactly; diffusers' own parser (test-only) agrees on the tensors;
hostile pickles are refused without running; a file for another model is refused by width.

Formats, as their writers make them:
  A1111 (modules/textual_inversion/textual_inversion.py Embedding.save): torch.save of
    {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name", "step",
     "sd_checkpoint", "sd_checkpoint_name"}, vec (n, D) trained with requires_grad;
  the original textual-inversion code (EmbeddingManager.save): a torch.nn.ParameterDict and
    token ids as tensors;
  kohya sd-scripts (train_textual_inversion.py save_weights): safetensors {"emb_params": (n, D)}
    in the save dtype; SDXL {"clip_l": (n, 768), "clip_g": (n, 1280)};
  diffusers (textual_inversion example): {token: (D,)} as learned_embeds.bin / .safetensors.
"""
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm import embeddings
from ldm.checkpoint import CheckpointError
from ldm.embeddings import ANY, check_width, read_embedding, save_embedding, vectors_for

SD1 = {"clip_l": 768}
SD2 = {"open_clip_h": 1024}
SDXL = {"clip_l": 768, "clip_g": 1280}
REFINER = {"clip_g": 1280}


def vecs(n, width, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    return torch.randn(n, width, generator=g)


def a1111_file(path, vec, name="trained-name", step=1500):
    """An embedding as A1111's Embedding.save writes it, vec still requiring grad from training."""
    vec = vec.clone().requires_grad_(True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name,
                "step": step, "sd_checkpoint": "6ce0161689",
                "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path


class _NoVocab:
    """The tokenizer diffusers' parser consults only for clashes with its vocabulary."""

    def get_vocab(self):
        return {}

    added_tokens_encoder = {}


def diffusers_parse(path_or_tensor, token=None):
    """diffusers' own reading of one file: (trigger tokens, (n, D) vectors), as its
    load_textual_inversion gets them before touching a model (multi-vector: tok, tok_1, ...)."""
    loader = pytest.importorskip("diffusers.loaders.textual_inversion")
    mixin = loader.TextualInversionLoaderMixin
    if isinstance(path_or_tensor, torch.Tensor):
        state_dicts = [path_or_tensor]
    else:
        state_dicts = loader.load_textual_inversion_state_dicts([str(path_or_tensor)])
    tokens, embeds = mixin._retrieve_tokens_and_embeddings([token], state_dicts, _NoVocab())
    tokens, embeds = mixin._extend_tokens_and_embeddings(tokens, embeds, _NoVocab())
    return tokens, torch.stack(embeds).float()


# --- each format, read back -------------------------------------------------------------------

def test_a1111_pt_multi_vector_trigger_is_the_file_stem(tmp_path):
    vec = vecs(3, 768)
    path = a1111_file(tmp_path / "charturner.pt", vec)
    emb = read_embedding(path)
    assert emb.token == "charturner"          # A1111: the file name, not the name inside
    assert emb.stored_name == "trained-name"  # what diffusers would use
    assert emb.num_vectors == 3 and emb.widths == {ANY: 768}
    got = emb.vectors[ANY]
    assert got.dtype == torch.float32 and not got.requires_grad and got.device.type == "cpu"
    assert torch.equal(got, vec)
    assert read_embedding(path, token="<my-style>").token == "<my-style>"


def test_a1111_pt_matches_diffusers_parser(tmp_path):
    vec = vecs(4, 768)
    path = a1111_file(tmp_path / "style.pt", vec, name="style-2000")
    tokens, reference = diffusers_parse(path)
    emb = read_embedding(path)
    assert tokens == ["style-2000", "style-2000_1", "style-2000_2", "style-2000_3"]
    assert emb.stored_name == tokens[0] and emb.token == "style"  # the documented difference
    assert torch.equal(emb.vectors[ANY], reference)


def test_original_textual_inversion_parameter_dict(tmp_path):
    """The original code (and A1111 under torch 1.11) pickled a ParameterDict, which plain
    weights_only refuses; the inert stand-in reads it without building a Module."""
    vec = vecs(2, 768)
    path = tmp_path / "fumo.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)})}, path)
    with pytest.raises(pickle.UnpicklingError, match="ParameterDict"):
        torch.load(path, weights_only=True)
    emb = read_embedding(path)
    assert emb.token == "fumo" and emb.stored_name is None
    assert torch.equal(emb.vectors[ANY], vec) and not emb.vectors[ANY].requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kohya_emb_params_safetensors(tmp_path, dtype):
    vec = vecs(5, 768).to(dtype)  # kohya saves in its save_dtype
    path = tmp_path / "kohya-style.safetensors"
    save_file({"emb_params": vec}, str(path), metadata={"ss_output_name": "kohya-style"})
    emb = read_embedding(path)
    assert emb.token == "kohya-style" and emb.stored_name == "emb_params"
    assert torch.equal(emb.vectors[ANY], vec.float())
    tokens, reference = diffusers_parse(path)
    assert tokens[0] == "emb_params"  # diffusers' trigger for kohya files: the key
    assert torch.equal(emb.vectors[ANY], reference)


@pytest.mark.parametrize("shape", [(768,), (1, 768), (3, 1024)])
def test_diffusers_bin_single_key(tmp_path, shape):
    vec = torch.randn(shape)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": vec}, path)
    emb = read_embedding(path, token="cat-toy")
    assert emb.token == "cat-toy" and emb.stored_name == "<cat-toy>"
    assert emb.vectors[ANY].shape == (shape[0] if len(shape) == 2 else 1, shape[-1])
    tokens, reference = diffusers_parse(path)
    assert tokens[0] == "<cat-toy>" and len(tokens) == emb.num_vectors
    assert torch.equal(emb.vectors[ANY], reference)


def test_diffusers_safetensors_single_key(tmp_path):
    vec = vecs(1, 1024)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<sd2-concept>": vec}, str(path))
    emb = read_embedding(path)
    assert emb.token == "learned_embeds" and emb.stored_name == "<sd2-concept>"
    tokens, reference = diffusers_parse(path)
    assert tokens == ["<sd2-concept>"] and torch.equal(emb.vectors[ANY], reference)


def test_sdxl_pair(tmp_path):
    clip_l, clip_g = vecs(2, 768), vecs(2, 1280)
    path = tmp_path / "unaestheticXL.safetensors"
    save_file({"clip_l": clip_l.half(), "clip_g": clip_g.half()}, str(path))
    emb = read_embedding(path)
    assert emb.token == "unaestheticXL" and emb.widths == {"clip_l": 768, "clip_g": 1280}
    got = vectors_for(emb, SDXL)
    assert torch.equal(got["clip_l"], clip_l.half().float())
    assert torch.equal(got["clip_g"], clip_g.half().float())
    # diffusers' documented SDXL recipe: each tensor loaded on its own, into its own encoder.
    assert list(vectors_for(emb, REFINER)) == ["clip_g"]  # the refiner has only bigG
    assert torch.equal(vectors_for(emb, REFINER)["clip_g"], got["clip_g"])
    with safe_open(str(path), "pt") as f:
        for encoder in SDXL:
            tokens, reference = diffusers_parse(f.get_tensor(encoder), token="unaestheticXL")
            assert tokens == ["unaestheticXL", "unaestheticXL_1"]
            assert torch.equal(got[encoder], reference)


# --- which model a file is for ---------------------------------------------------------------

def test_single_encoder_files_serve_their_width(tmp_path):
    sd1 = read_embedding(a1111_file(tmp_path / "sd1.pt", vecs(1, 768)))
    sd2 = read_embedding(a1111_file(tmp_path / "sd2.pt", vecs(1, 1024)))
    assert torch.equal(vectors_for(sd1, SD1)["clip_l"], sd1.vectors[ANY])
    assert torch.equal(vectors_for(sd2, SD2)["open_clip_h"], sd2.vectors[ANY])
    tiny = read_embedding(a1111_file(tmp_path / "tiny.pt", vecs(2, 32)))
    assert vectors_for(tiny, {"clip_l": 32})["clip_l"].shape == (2, 32)  # any one-encoder model


@pytest.mark.parametrize("file_width, model", [(768, SD2), (1024, SD1), (32, SD1)])
def test_wrong_width_names_file_and_both_widths(tmp_path, file_width, model):
    emb = read_embedding(a1111_file(tmp_path / "other-model.pt", vecs(2, file_width)))
    (encoder, width), = model.items()
    with pytest.raises(CheckpointError) as e:
        vectors_for(emb, model)
    message = str(e.value)
    assert "other-model.pt" in message and f"{file_width} wide" in message
    assert f"{encoder} is {width} wide" in message
    with pytest.raises(CheckpointError, match=f"{file_width} wide"):
        check_width(emb, width, encoder)


def test_sdxl_and_single_files_refused_by_the_other_kind_of_model(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": vecs(1, 768), "clip_g": vecs(1, 1280)}, str(path))
    xl = read_embedding(path)
    with pytest.raises(CheckpointError,
                       match=r"xl.safetensors.*SDXL embedding.*model has clip_l 768 wide$"):
        vectors_for(xl, SD1)
    with pytest.raises(CheckpointError, match="no vectors for the text encoder open_clip_h"):
        check_width(xl, 1024, "open_clip_h")
    sd1 = read_embedding(a1111_file(tmp_path / "sd1.pt", vecs(1, 768)))
    with pytest.raises(CheckpointError, match=r"sd1.pt: holds one set of vectors 768 wide.*2 "
                                              r"text encoders"):
        vectors_for(sd1, SDXL)


def test_sdxl_widths_checked_per_encoder(tmp_path):
    path = tmp_path / "swapped.safetensors"
    save_file({"clip_l": vecs(1, 1280), "clip_g": vecs(1, 768)}, str(path))
    with pytest.raises(CheckpointError, match=r"1280 wide.*clip_l is 768 wide"):
        vectors_for(read_embedding(path), SDXL)


# --- hostile pickles ---------------------------------------------------------------------------

class _Payload:
    """Unpickled by plain pickle, this runs a shell command: the classic malicious .pt."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "innocent.pt"
    # Where A1111 would look: the vectors are fine, the payload rides in "name".
    torch.save({"string_to_param": {"*": vecs(1, 768)}, "name": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        read_embedding(path)
    assert "innocent.pt" in str(e.value) and "system" in str(e.value)  # posix.system / nt.system
    assert "nothing was run" in str(e.value)
    assert not marker.exists()
    # The control: the file is truly malicious, as an unsafe load shows.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_bare_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "learned_embeds.bin"
    path.write_bytes(pickle.dumps({"<tok>": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="learned_embeds.bin: is a bare pickle"):
        read_embedding(path)
    assert not marker.exists()


def test_oversized_files_refused_unread(tmp_path, monkeypatch):
    path = a1111_file(tmp_path / "big.pt", vecs(75, 768))
    monkeypatch.setattr(embeddings, "MAX_FILE_BYTES", 100_000)
    with pytest.raises(CheckpointError, match=r"big.pt: is [\d,]+ bytes"):
        read_embedding(path)
    lora = tmp_path / "lora.safetensors"
    save_file({f"lora_unet_{i}.lora_down.weight": torch.zeros(4, 8) for i in range(3)}, str(lora))
    with pytest.raises(CheckpointError, match="lora.safetensors: holds 3 tensors.*LoRA"):
        read_embedding(lora)
    huge = tmp_path / "model.safetensors"
    save_file({"emb_params": torch.zeros(1, 76 * embeddings.MAX_WIDTH)}, str(huge))
    with pytest.raises(CheckpointError, match="far larger than an embedding"):
        read_embedding(huge)


# --- broken files and bad arguments ------------------------------------------------------------

@pytest.mark.parametrize("contents, problem", [
    ({"string_to_param": {"*": vecs(1, 768), "+": vecs(1, 768)}}, "holds 2 entries"),
    ({"string_to_param": {}}, "string_to_param holds 0 entries"),
    ({"string_to_param": {"*": torch.zeros(1, 768, dtype=torch.int64)}}, "torch.int64"),
    ({"string_to_param": {"*": torch.zeros(2, 3, 768)}}, r"shape \(2, 3, 768\)"),
    ({"string_to_param": {"*": torch.zeros(76, 32)}}, r"1 <= n <= 75"),
    ({"string_to_param": {"*": torch.full((1, 768), float("nan"))}}, "768 NaN"),
    ({"string_to_param": {"*": "not a tensor"}}, "is a str, not a tensor"),
    ({"string_to_param": {"*": torch.zeros(1, 768, device="meta")}}, "on meta"),
    ({"string_to_param": {"*": torch.eye(4).to_sparse()}}, "sparse_coo"),
    ({"a": vecs(1, 768), "b": vecs(1, 768)}, "is no embedding format ldm knows"),
    ({"clip_l": vecs(1, 768)}, "holds clip_l but not clip_g"),
    ({"clip_l": vecs(2, 768), "clip_g": vecs(3, 1280)}, "2 clip_l vector.*3 clip_g"),
    ({"clip_l": vecs(1, 768), "clip_g": vecs(1, 1280), "t5": vecs(1, 8)}, "also 't5'"),
    ([vecs(1, 768)], "holds a list, not an embedding"),
])
def test_broken_files_name_the_problem(tmp_path, contents, problem):
    path = tmp_path / "broken.pt"
    torch.save(contents, path)
    with pytest.raises(CheckpointError, match=f"broken.pt: .*{problem}"):
        read_embedding(path)


def test_paths_that_are_no_embedding_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        read_embedding(tmp_path / "missing.pt")
    with pytest.raises(IsADirectoryError):
        read_embedding(tmp_path)
    image = tmp_path / "embedding.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(CheckpointError, match="embedding.png: is an image"):
        read_embedding(image)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: is neither"):
        read_embedding(text)
    truncated = tmp_path / "cut.pt"
    a1111_file(truncated, vecs(2, 768))
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pt"):
        read_embedding(truncated)


@pytest.mark.parametrize("token", ["", "  ", " padded", 7])
def test_bad_token(tmp_path, token):
    path = a1111_file(tmp_path / "x.pt", vecs(1, 768))
    with pytest.raises(ValueError, match="token"):
        read_embedding(path, token=token)


# --- writing -----------------------------------------------------------------------------------

def test_save_single_and_sdxl_round_trip_in_a1111_layout(tmp_path):
    vec = vecs(3, 768)
    path = tmp_path / "mine.safetensors"
    save_embedding(path, vec)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["emb_params"]  # kohya's layout, which A1111 reads
    emb = read_embedding(path)
    assert emb.token == "mine" and torch.equal(emb.vectors[ANY], vec)
    assert torch.equal(diffusers_parse(path)[1], vec)

    pair = {"clip_l": vecs(2, 768), "clip_g": vecs(2, 1280)}
    xl = tmp_path / "mine-xl.safetensors"
    save_embedding(xl, pair)
    back = read_embedding(xl)
    assert all(torch.equal(back.vectors[k], pair[k]) for k in pair)
    copy = tmp_path / "copy.safetensors"
    save_embedding(copy, back)  # a TextualInversion, as read
    assert torch.equal(read_embedding(copy).vectors["clip_g"], pair["clip_g"])


def test_save_refuses_overwrite_and_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "kept.safetensors"
    save_embedding(path, vecs(1, 768, seed=1))
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_embedding(path, vecs(1, 768, seed=2))
    assert path.read_bytes() == before
    save_embedding(path, vecs(1, 768, seed=2), overwrite=True)
    assert torch.equal(read_embedding(path).vectors[ANY], vecs(1, 768, seed=2))

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(embeddings, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(path, vecs(1, 768, seed=3), overwrite=True)
    assert torch.equal(read_embedding(path).vectors[ANY], vecs(1, 768, seed=2))  # the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]


@pytest.mark.parametrize("path, vectors, error, problem", [
    ("x.pt", torch.zeros(1, 768), ValueError, "must end in .safetensors"),
    ("no-dir/x.safetensors", torch.zeros(1, 768), FileNotFoundError, "does not exist"),
    ("x.safetensors", torch.zeros(1, 768, dtype=torch.int32), ValueError, "torch.int32"),
    ("x.safetensors", torch.zeros(80, 768), ValueError, r"1 <= n <= 75"),
    ("x.safetensors", {"clip_l": torch.zeros(1, 768)}, ValueError, "keys"),
    ("x.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(2, 1280)}, ValueError,
     "1 clip_l vector"),
    ("x.safetensors", [1.0], ValueError, "a list"),
])
def test_save_bad_arguments(tmp_path, path, vectors, error, problem):
    with pytest.raises(error, match=problem):
        save_embedding(tmp_path / path, vectors)
    assert list(tmp_path.iterdir()) == []


# --- end to end, against diffusers' load_textual_inversion -------------------------------------

@torch.no_grad()
def test_a1111_pt_conditions_as_diffusers_load_textual_inversion(tmp_path):
    """An A1111 .pt with three vectors, loaded by pipe.load_embedding and by diffusers'
    load_textual_inversion into transformers' CLIP with the same weights: the prompt's
    conditioning agrees. diffusers is given the file's stem as its token (it would use the name
    stored inside: the documented difference)."""
    transformers = pytest.importorskip("transformers")
    textual_inversion = pytest.importorskip("diffusers.loaders.textual_inversion")
    import ldm

    class _TextualInversionLoader(textual_inversion.TextualInversionLoaderMixin):
        """diffusers' loader as a pipeline holds it, with nothing else in the pipeline (no
        accelerate hooks to take off): tokenizer and text encoder are passed in."""
        hf_device_map, components = None, {}

    from helpers import rel_error, write_clip_vocab_files
    from test_clip_text import reference_from

    pipe = ldm.load()  # the shipped model: SD 1's CLIP text encoder at width 64
    path = a1111_file(tmp_path / "lighthousestyle.pt", vecs(3, pipe.text_encoder.cfg.width))
    pipe.load_embedding(path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_clip_vocab_files(tmp_path), pad_token="<|endoftext|>", model_max_length=77)
    text_encoder = reference_from(pipe.text_encoder)
    loader = _TextualInversionLoader()
    loader.load_textual_inversion(str(path), token="lighthousestyle", tokenizer=tokenizer,
                                  text_encoder=text_encoder)
    prompt = "a red circle, lighthousestyle, on a blue background"
    ids = tokenizer(loader.maybe_convert_prompt(prompt, tokenizer), padding="max_length",
                    max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = text_encoder(ids).last_hidden_state
    ours = pipe.encode_prompt(prompt)[0]["context"]
    error = rel_error(ours, expected)
    print(f"A1111 .pt embedding, conditioning vs diffusers: {error:.1e}")
    assert error <= 1e-5
    without = pipe.encode_prompt(prompt.replace("lighthousestyle", "lighthouse style"))[0]
    assert rel_error(without["context"], expected) > 1e-2  # the embedding made the difference
