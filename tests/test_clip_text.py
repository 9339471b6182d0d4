"""The CLIP text encoder: checkpoint names, parity with transformers, causality, input checks."""
import pytest
import torch

from ldm.models.clip_text import CLIP_TINY, CLIPTextConfig, CLIPTextModel

from helpers import MANIFESTS, randomize_

PREFIX = "cond_stage_model.transformer.text_model."
BOS, EOS = 49406, 49407  # start of text; end of text, which SD's tokenizer also pads with


def manifest_rows(name):
    """{name without PREFIX: shape} of the text encoder rows of a manifest."""
    rows = {}
    for line in (MANIFESTS / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith(PREFIX):
            rows[key.removeprefix(PREFIX)] = tuple(int(s) for s in shape.split(",") if s)
    return rows


def prompt_like_ids(lengths, generator, total=77):
    """(B, total) ids as the tokenizer makes them: BOS, random words, EOS, EOS padding."""
    ids = torch.full((len(lengths), total), EOS)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n] = torch.randint(0, BOS, (n,), generator=generator)
    return ids


def reference_from(model):
    """transformers' CLIPTextModel with our weights, renamed by diffusers' own converter."""
    transformers = pytest.importorskip("transformers")
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = model.cfg
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_positions,
        hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, hidden_act="quick_gelu", layer_norm_eps=cfg.eps,
        attn_implementation="eager"))  # the explicit softmax, not the same SDPA kernel as ours
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    converted = single_file_utils.convert_ldm_clip_checkpoint(checkpoint)  # -> "text_model.*"
    # transformers >= 5.6 flattened CLIPTextModel; diffusers' loader then drops the prefix too
    if not hasattr(ref, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def relative_error(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def test_names_and_shapes_match_the_sd15_checkpoint():
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = manifest_rows("sd15_emaonly.tsv")
    assert expected.pop("embeddings.position_ids") == (1, 77)
    assert ours == expected
    assert len(ours) == 196
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def check_parity(cfg, seed):
    model = randomize_(CLIPTextModel(cfg), seed).eval()
    ref = reference_from(model)
    ids = prompt_like_ids([5, 75, 0], torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        out = model(ids)
        expected = ref(input_ids=ids, output_hidden_states=True)
        penultimate = model(ids, layers=cfg.layers - 1)
        # clip-skip as A1111 and SD 2 do it: the penultimate hidden state, then final LayerNorm
        final_layer_norm = getattr(ref, "text_model", ref).final_layer_norm
        expected_penultimate = final_layer_norm(expected.hidden_states[-2])
    assert out.shape == (3, 77, cfg.width)
    err = relative_error(out, expected.last_hidden_state)
    assert err <= 1e-5, f"relative error {err:.2e}"
    err = relative_error(penultimate, expected_penultimate)
    assert err <= 1e-5, f"penultimate relative error {err:.2e}"


def test_parity_with_transformers_tiny():
    check_parity(CLIP_TINY, seed=1234)


@pytest.mark.slow
def test_parity_with_transformers_vit_l():
    check_parity(CLIPTextConfig(), seed=4321)


def test_causal_mask_hides_later_tokens():
    model = randomize_(CLIPTextModel(CLIP_TINY), seed=7).eval()
    ids = prompt_like_ids([20], torch.Generator().manual_seed(8))
    changed, j = ids.clone(), 10
    changed[0, j] = (ids[0, j] + 1) % BOS
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :j], before[:, :j])
    per_position = (after - before).abs().amax(dim=-1)[0]  # (T,)
    assert (per_position[j:] > 1e-3).all()


def test_shorter_sequences_and_bad_ids():
    model = CLIPTextModel(CLIP_TINY)
    assert model(torch.tensor([[BOS, 320, EOS]])).shape == (1, 3, CLIP_TINY.width)
    with pytest.raises(ValueError, match="rank 1"):
        model(torch.tensor([BOS, EOS]))
    with pytest.raises(ValueError, match="78 tokens"):
        model(torch.full((1, 78), EOS))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 77))
