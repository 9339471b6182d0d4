"""The OpenCLIP text encoder of SD 2: checkpoint names, parity with transformers through
diffusers' converter, the penultimate layer, input checks."""
import pytest
import torch

from ldm.models.open_clip_text import OPEN_CLIP_TINY, OpenCLIPTextConfig, OpenCLIPTextModel

from helpers import randomize_, read_manifest, rel_error

PREFIX = "cond_stage_model.model."
BOS, EOS, PAD = 49406, 49407, 0  # open_clip's tokenizer pads with 0, not with end-of-text


def prompt_like_ids(lengths, generator, total=77):
    """(B, total) ids as open_clip's tokenizer makes them: BOS, random words, EOS, 0 padding."""
    ids = torch.full((len(lengths), total), PAD)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n] = torch.randint(1, BOS, (n,), generator=generator)
        ids[row, 1 + n] = EOS
    return ids


def test_names_and_shapes_match_the_sd21_checkpoint():
    with torch.device("meta"):
        model = OpenCLIPTextModel(OpenCLIPTextConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k.removeprefix(PREFIX): shape
                for k, (shape, _) in read_manifest("sd21_768v").items() if k.startswith(PREFIX)}
    assert ours == expected
    assert len(ours) == 294
    assert sum(p.numel() for p in model.parameters()) == 354_032_641


def reference_from(model):
    """transformers' CLIPTextModel with our weights, renamed by diffusers' own converter.

    The converter leaves out `resblocks.23` by name (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE), so a
    full-size model comes out with 23 blocks, while the tiny one keeps all of its blocks."""
    transformers = pytest.importorskip("transformers")
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = model.cfg
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    # in_proj is split into q, k, v by text_projection's first dimension: (C, C) here
    converted = single_file_utils.convert_open_clip_checkpoint(None, checkpoint, prefix=PREFIX)
    blocks = len({k.split(".")[3] for k in converted if k.startswith("text_model.encoder.")})
    with torch.device("meta"):  # no second copy of the weights: assign ours below
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions,
            hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=blocks,
            num_attention_heads=cfg.heads, hidden_act="gelu", layer_norm_eps=cfg.eps,
            projection_dim=cfg.width,
            attn_implementation="eager"))  # the explicit softmax, not the same SDPA kernel as ours
    # transformers >= 5.6 flattened CLIPTextModel; diffusers' loader then drops the prefix too
    if not hasattr(ref, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True, assign=True)
    # position_ids is a buffer outside the state dict: still on meta, so make it again
    embeddings = getattr(ref, "text_model", ref).embeddings
    embeddings.position_ids = torch.arange(cfg.max_positions).unsqueeze(0)
    assert not any(t.is_meta for t in [*ref.parameters(), *ref.buffers()])
    return ref.eval()


def check_parity(model, seed):
    """Relative error of our default (penultimate) output against transformers'."""
    cfg = model.cfg
    ref = reference_from(model)
    ids = prompt_like_ids([5, 75, 0], torch.Generator().manual_seed(seed))
    run = cfg.layers - cfg.skip_last
    with torch.no_grad():
        out = model(ids)
        expected = ref(input_ids=ids, output_hidden_states=True)
    assert out.shape == (3, 77, cfg.width)
    if ref.config.num_hidden_layers == run:
        # what diffusers' SD 2 pipelines use: the converted model's last state is the penultimate
        reference = expected.last_hidden_state
    else:
        # SD 2's definition, spelled out: the state after `run` blocks, then the final LayerNorm
        final_layer_norm = getattr(ref, "text_model", ref).final_layer_norm
        with torch.no_grad():
            reference = final_layer_norm(expected.hidden_states[run])
    return rel_error(out, reference)


def test_parity_with_transformers_tiny():
    """Measured: 2.6e-7 to 3.2e-7 (fp32, CPU)."""
    seed = int(torch.randint(1 << 20, ()))
    model = randomize_(OpenCLIPTextModel(OPEN_CLIP_TINY), seed).eval()
    err = check_parity(model, seed + 1)
    assert err <= 1e-5, f"relative error {err:.2e} (seed {seed})"


@pytest.mark.slow
def test_parity_with_transformers_vit_h():
    """Full size, where the converter drops the 24th block. Measured: 4.9e-7 (fp32, CPU)."""
    seed = int(torch.randint(1 << 20, ()))
    with torch.device("meta"):  # skip the init of 354M parameters: randomize overwrites them
        model = OpenCLIPTextModel(OpenCLIPTextConfig())
    model = randomize_(model.to_empty(device="cpu"), seed).eval()
    err = check_parity(model, seed + 1)
    assert err <= 1e-5, f"relative error {err:.2e} (seed {seed})"


def test_penultimate_is_the_default_and_differs_from_the_last_layer():
    seed = int(torch.randint(1 << 20, ()))
    model = randomize_(OpenCLIPTextModel(OPEN_CLIP_TINY), seed).eval()
    ids = prompt_like_ids([7, 30], torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        default, last = model(ids), model(ids, layers=OPEN_CLIP_TINY.layers)
        penultimate = model(ids, layers=OPEN_CLIP_TINY.layers - 1)
    torch.testing.assert_close(default, penultimate, rtol=0, atol=0)
    assert rel_error(last, default) > 0.1, f"seed {seed}"


def test_shorter_sequences_and_bad_ids():
    model = OpenCLIPTextModel(OPEN_CLIP_TINY)
    assert model(torch.tensor([[BOS, 320, EOS]])).shape == (1, 3, OPEN_CLIP_TINY.width)
    with pytest.raises(ValueError, match="rank 1"):
        model(torch.tensor([BOS, EOS]))
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.full((1, 78), EOS))
    with pytest.raises(ValueError, match="integer"):
        model(torch.rand(1, 77) * EOS)
