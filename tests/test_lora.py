"""LoRA files (ldm/lora.py) against diffusers + PEFT, which nobody here wrote.

Small random models with SD 1.5's block layout (4 levels, attention at 0, 1, 2, so kohya's names
are those of the real SD 1.5) and SD 2's (linear projections, OpenCLIP text with its fused q; k; v
weight). A random kohya file over every default kohya target (attention, feed-forward,
proj_in/out, ResBlock and down/up-sampler convolutions: "LoCon", 3×3 and 1×1, text attention and
MLP) is loaded by diffusers' `load_lora_weights` into diffusers' twin of the model (built by
diffusers' own checkpoint converters) and by `ldm.lora.load_lora`; the U-Net and text-encoder
outputs must agree to 1e-5 relative in fp32, and the LoRA must move them far more than that.
A PEFT file is written by diffusers/PEFT themselves. Fresh seeds each run.
"""
import dataclasses
import hashlib
import math
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm import lora
from ldm.checkpoint import CheckpointError
from ldm.models.unet import UNet, UNetConfig
from ldm.pipeline import StableDiffusion

from helpers import TINY_SD2, fresh_seed, randomize_, rel_error

TOLERANCE = 1e-5
# SD 1.5's U-Net layout at toy width (kohya names depend on the layout only), and text
# encoders with a 1000-token vocabulary (the tokens play no part; the full one is slow to fill).
VOCAB = 1000
SD15_LAYOUT = dataclasses.replace(
    ldm.PRESETS["tiny"], unet=UNetConfig(model_channels=32, context_dim=32, num_heads=2,
                                         norm_groups=8),
    text=dataclasses.replace(ldm.PRESETS["tiny"].text, vocab_size=VOCAB))
SD2_LAYOUT = dataclasses.replace(TINY_SD2, text=dataclasses.replace(TINY_SD2.text,
                                                                    vocab_size=VOCAB))


def random_pipe(config):
    pipe = StableDiffusion(config).eval()
    return randomize_(pipe, fresh_seed())


def param(networks, target):
    weight = dict(networks[target.network].named_parameters())[target.param]
    return weight[slice(*target.rows)] if target.rows else weight


def kohya_default(name):
    """kohya's default targets (networks/lora.py): every Linear / Conv2d in the transformers,
    with conv_dim ("LoCon") those of the ResBlocks and down/up-samplers, and the text MLP and
    attention; not conv_in, conv_out or the time embedding."""
    return not name.startswith("lora_unet_") or any(
        part in name for part in ("attentions", "resnets", "samplers", "_blocks_"))


def random_kohya_lora(networks, g, *, rank=4, names=None, size=0.3, alphas=(1.0, 2.0, 8.0),
                      select=kohya_default):
    """{key: tensor} of a kohya LoRA over the layers `select` picks: down (r, in[, kh, kw]), up
    (out, r[, 1, 1]) as kohya's LoRAModule builds them, alphas taken in turn (None: no alpha,
    which means alpha = rank). ΔW is about `size` × W."""
    names = names or lora.original_name_map(networks, "kohya")
    tensors = {}
    for i, (name, target) in enumerate(names.items()):
        if not select(name):
            continue
        weight = param(networks, target)
        out, fan_in, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, fan_in, *kernel, generator=g)
                                               / math.sqrt(fan_in * math.prod(kernel)))
        tensors[f"{name}.lora_up.weight"] = size * torch.randn(out, rank, *(1,) * len(kernel),
                                                               generator=g)
        alpha = alphas[i % len(alphas)]
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return tensors


# ------------------------------------------------------------------ diffusers' twins of our models
def diffusers_unet(unet):
    """diffusers' UNet2DConditionModel with `unet`'s weights, through diffusers' converter."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    c = unet.config
    levels = range(c.num_levels)
    attention = [level in c.attention_levels for level in levels]
    config = dict(
        sample_size=16, in_channels=c.in_channels, out_channels=c.out_channels,
        layers_per_block=c.num_res_blocks, block_out_channels=[c.level_channels(i) for i in levels],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
        cross_attention_dim=c.context_dim, norm_num_groups=c.norm_groups,
        attention_head_dim=[c.attention_shape(c.level_channels(i))[0] for i in levels],
        use_linear_projection=c.use_linear_proj)
    checkpoint = {f"model.diffusion_model.{k}": v.clone() for k, v in unet.state_dict().items()}
    model = diffusers.UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def diffusers_text_encoder(text_encoder):
    """transformers' CLIPTextModel with our CLIP's or OpenCLIP's weights (diffusers' converters;
    OpenCLIP's run to the penultimate block, as SD 2 uses it)."""
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders import single_file_utils as convert

    cfg = text_encoder.cfg
    state = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    if hasattr(text_encoder, "transformer"):  # OpenCLIP
        weights = convert.convert_open_clip_checkpoint(
            None, {f"cond_stage_model.model.{k}": v for k, v in state.items()})
        layers, act = cfg.layers - cfg.skip_last, "gelu"
    else:
        weights = convert.convert_ldm_clip_checkpoint(
            {f"cond_stage_model.transformer.text_model.{k}": v for k, v in state.items()})
        layers, act = cfg.layers, "quick_gelu"
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, hidden_act=act, layer_norm_eps=cfg.eps,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    if not hasattr(model, "text_model"):  # transformers 5 dropped the `text_model.` level
        weights = {k.removeprefix("text_model."): w for k, w in weights.items()}
    weights = {k: w for k, w in weights.items()
               if not k.endswith(("position_ids", "text_projection.weight"))
               and not any(f"layers.{i}." in k for i in range(layers, cfg.layers))}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def diffusers_holder(pipe):
    """The smallest object diffusers' `load_lora_weights` (StableDiffusionLoraLoaderMixin) runs
    on: a U-Net and a text encoder, twins of `pipe`'s."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")

    class Holder(diffusers.loaders.StableDiffusionLoraLoaderMixin):
        lora_scale = 1.0
        hf_device_map = None
        components = {}

    holder = Holder()
    holder.unet = diffusers_unet(pipe.unet)
    holder.text_encoder = diffusers_text_encoder(pipe.text_encoder)
    return holder


@pytest.fixture(scope="module")
def sd15_twins():
    """(our pipe, diffusers' twin) in SD 1.5's layout, shared: each test unloads what it loads."""
    pipe = random_pipe(SD15_LAYOUT)
    return pipe, diffusers_holder(pipe)


@pytest.fixture(scope="module")
def sd2_twins():
    pipe = random_pipe(SD2_LAYOUT)
    return pipe, diffusers_holder(pipe)


@pytest.fixture
def fresh(request):
    """Undo, after the test, the LoRAs loaded into the twins it used."""
    yield
    for name in ("sd15_twins", "sd2_twins"):
        if name in request.fixturenames:
            pipe, holder = request.getfixturevalue(name)
            lora.unload_loras(pipe)
            adapters = list(getattr(holder.unet, "peft_config", {}))
            if adapters:
                holder.unet.delete_adapters(adapters)
            # (transformers' delete_adapter wants a newer PEFT; a new twin costs little)
            holder.text_encoder = diffusers_text_encoder(pipe.text_encoder)


def inputs(pipe, g):
    c = pipe.unet.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, c.context_dim, generator=g)
    ids = torch.randint(3, VOCAB, (2, 77), generator=g)
    return x, t, context, ids


@torch.no_grad()
def outputs(pipe, x, t, context, ids):
    return pipe.unet(x, t, context), pipe.text_encoder(ids)


@torch.no_grad()
def reference_outputs(holder, x, t, context, ids):
    return (holder.unet(x, t, encoder_hidden_states=context).sample,
            holder.text_encoder(ids).last_hidden_state)


def quiet(fn, *args, **kwargs):
    """Run diffusers/transformers code with their loading reports silenced."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def assert_matches(ours, ref, before, what):
    error, change = rel_error(ours, ref), rel_error(before, ref)
    print(f"{what}: relative error vs diffusers+PEFT {error:.2e} (the LoRA moves it {change:.2e})")
    assert error <= TOLERANCE
    assert change > 1e3 * TOLERANCE  # the LoRA matters: the comparison can fail


# ------------------------------------------------------------------------------------------ names
def test_unet_names_are_diffusers_own():
    """Each U-Net layer's diffusers name holds, after diffusers' checkpoint converter, exactly
    that layer's weight: the block rule against diffusers' own map (SD 1.5 and SD 2 layouts,
    and one with 3 ResBlocks per level)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for config in (SD15_LAYOUT.unet, SD2_LAYOUT.unet,
                   dataclasses.replace(SD15_LAYOUT.unet, num_res_blocks=3,
                                       attention_levels=(1, 3))):
        unet = randomize_(UNet(config), fresh_seed())
        levels = range(unet.config.num_levels)
        converted = convert_ldm_unet_checkpoint(
            {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
            {"layers_per_block": unet.config.num_res_blocks})
        names = lora.original_name_map({"unet": unet}, "peft")
        assert len(names) == sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                                 for m in unet.modules())
        for name, target in names.items():
            theirs = converted[name.removeprefix("unet.") + ".weight"]
            assert torch.equal(theirs.reshape(-1), param({"unet": unet}, target).reshape(-1)), name
        assert levels  # (the loop ran over every level's blocks above)


def test_sd15_kohya_names():
    """Spot checks against names in real kohya SD 1.5 files (community-formats.md §1a)."""
    with torch.device("meta"):
        pipe = StableDiffusion(ldm.PRESETS["sd15"])
    names = {k: str(v) for k, v in lora.original_name_map(pipe.networks()).items()}
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == \
        "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert names["lora_unet_mid_block_attentions_0_proj_in"] == "unet.middle_block.1.proj_in.weight"
    assert names["lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj"] == \
        "unet.output_blocks.5.1.transformer_blocks.0.ff.net.0.proj.weight"
    assert names["lora_unet_up_blocks_2_upsamplers_0_conv"] == "unet.output_blocks.8.2.conv.weight"
    assert names["lora_unet_up_blocks_0_upsamplers_0_conv"] == "unet.output_blocks.2.1.conv.weight"
    assert names["lora_unet_down_blocks_1_downsamplers_0_conv"] == "unet.input_blocks.6.0.op.weight"
    assert names["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == \
        "unet.input_blocks.4.0.skip_connection.weight"
    assert names["lora_unet_mid_block_resnets_1_time_emb_proj"] == \
        "unet.middle_block.2.emb_layers.1.weight"
    assert names["lora_te_text_model_encoder_layers_11_mlp_fc2"] == \
        "text_encoder.encoder.layers.11.mlp.fc2.weight"
    # kohya's SD 1.5 file has 192 U-Net LoRA-LierLa layers (16 transformers × 12) and 72 text
    # ones (12 layers × 6); LoCon adds 22 ResBlocks' convs, 3 down- and 3 upsamplers.
    transformer_layers = [n for n in names if "attentions" in n]
    assert len(transformer_layers) == 16 * 12
    assert len([n for n in names if n.startswith("lora_te_")]) == 12 * 6


# ---------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("twins", ["sd15_twins", "sd2_twins"])
def test_kohya_lora_matches_diffusers(twins, request, fresh, tmp_path):
    """Alpha is one value per file here: diffusers' kohya converter collapses per-layer alphas
    (its alpha patterns for q/k/v/out land on the attention module), where kohya and A1111
    keep each layer's; per-layer alphas are checked against PEFT's own file below."""
    pipe, holder = request.getfixturevalue(twins)
    config = pipe.config
    g = torch.Generator().manual_seed(fresh_seed())
    networks = pipe.networks()
    names = lora.original_name_map(networks, "kohya")
    if config.text_encoder == "open_clip":  # kohya's SD 2 text model stops at the penultimate
        last = config.text.layers - config.text.skip_last
        names = {k: v for k, v in names.items() if f"_layers_{last}_" not in k}
    path = tmp_path / "kohya.safetensors"
    save_file(random_kohya_lora(networks, g, names=names, alphas=(2.0,)), str(path))

    data = inputs(pipe, g)
    before = outputs(pipe, *data)
    quiet(holder.load_lora_weights, str(path), adapter_name="a")
    reference = reference_outputs(holder, *data)
    loaded = lora.load_lora(pipe, path)
    ours = outputs(pipe, *data)
    assert loaded.name == "kohya" and loaded.multiplier == 1.0
    assert_matches(ours[0], reference[0], before[0], f"{config.text_encoder} U-Net")
    assert_matches(ours[1], reference[1], before[1], f"{config.text_encoder} text encoder")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT, on its 2nd adapter
def test_multipliers_and_two_loras_match_diffusers(sd15_twins, fresh, tmp_path):
    """Two LoRAs at 0.7 and -0.4 (text encoder 0.7 and 1.5) against diffusers' set_adapters."""
    pipe, holder = sd15_twins
    g = torch.Generator().manual_seed(fresh_seed())
    networks = pipe.networks()
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    save_file(random_kohya_lora(networks, g, alphas=(2.0,)), str(paths[0]))
    save_file(random_kohya_lora(networks, g, rank=2, alphas=(8.0,),
                                select=lambda n: "attn" in n or "te_" in n), str(paths[1]))
    data = inputs(pipe, g)
    before = outputs(pipe, *data)
    for name, path in zip("ab", paths):
        quiet(holder.load_lora_weights, str(path), adapter_name=name)
    holder.unet.set_adapters(["a", "b"], weights=[0.7, -0.4])
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder
    set_adapters_for_text_encoder(["a", "b"], holder.text_encoder, [0.7, 1.5])
    reference = reference_outputs(holder, *data)
    lora.load_lora(pipe, paths[0], 0.7)
    lora.load_lora(pipe, paths[1], -0.4, text_multiplier=1.5)
    ours = outputs(pipe, *data)
    assert_matches(ours[0], reference[0], before[0], "two LoRAs, U-Net")
    assert_matches(ours[1], reference[1], before[1], "two LoRAs, text encoder")


def test_peft_file_written_by_diffusers(sd15_twins, fresh, tmp_path):
    """A LoRA trained the diffusers way: PEFT adapters added to diffusers' U-Net and
    transformers' CLIP (alpha 8 at rank 4, attn2.to_k at alpha 2: alpha_pattern), random,
    saved by diffusers' save_lora_weights (alpha only in the file's metadata)."""
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    pipe, holder = sd15_twins
    g = torch.Generator().manual_seed(fresh_seed())
    unet_config = peft.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"attn2.to_k": 2},
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                  "ff.net.2", "conv1", "conv_shortcut"])
    text_config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "fc1"])
    holder.unet.add_adapter(unet_config)
    peft.inject_adapter_in_model(text_config, holder.text_encoder)
    with torch.no_grad():
        for model in (holder.unet, holder.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3 / math.sqrt(p[0].numel()))
    layers = {m: peft.get_peft_model_state_dict(getattr(holder, m))
              for m in ("unet", "text_encoder")}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"

    data = inputs(pipe, g)
    before = outputs(pipe, *data)
    reference = reference_outputs(holder, *data)
    lora.load_lora(pipe, path)
    ours = outputs(pipe, *data)
    assert_matches(ours[0], reference[0], before[0], "PEFT file, U-Net")
    assert_matches(ours[1], reference[1], before[1], "PEFT file, text encoder")


# ----------------------------------------------------------------------- merge maths and undo
def test_linear_in_the_multiplier_and_sd2_thirds(tmp_path):
    """W(m) − W = m · (W(1) − W) for the merge, including the OpenCLIP q/k/v thirds; alpha
    missing means alpha = rank."""
    pipe = random_pipe(SD2_LAYOUT)
    g = torch.Generator().manual_seed(fresh_seed())
    tensors = random_kohya_lora(pipe.networks(), g, alphas=(None,))
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path))
    original = {k: v.clone() for k, v in pipe.state_dict().items()}
    lora.load_lora(pipe, path, 1.0)
    once = {k: v.clone() for k, v in pipe.state_dict().items()}
    lora.unload_loras(pipe)
    lora.load_lora(pipe, path, -2.5)
    for name, weight in pipe.state_dict().items():
        expected = original[name] - 2.5 * (once[name] - original[name])
        assert torch.allclose(weight, expected, atol=1e-5), name
    # the q third of layer 0's fused weight moved by exactly up @ down (alpha = rank)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
    width = SD2_LAYOUT.text.width
    fused = "text_encoder.transformer.resblocks.0.attn.in_proj_weight"
    assert torch.allclose(once[fused][:width] - original[fused][:width], delta, atol=1e-6)
    name = name.replace("q_proj", "v_proj")
    delta = tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
    assert torch.allclose(once[fused][2 * width:] - original[fused][2 * width:], delta, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unload_restores_bit_for_bit(dtype, tmp_path):
    pipe = random_pipe(SD2_LAYOUT).to(dtype)  # (with OpenCLIP: fused q; k; v thirds too)
    g = torch.Generator().manual_seed(fresh_seed())
    original = {k: v.clone() for k, v in pipe.state_dict().items()}
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for path in paths:
        save_file(random_kohya_lora(pipe.networks(), g), str(path))
    a = lora.load_lora(pipe, paths[0], 0.8)
    changed = [k for k, v in pipe.state_dict().items() if not torch.equal(v, original[k])]
    assert len(changed) > 50
    b = lora.load_lora(pipe, paths[1], 1.3, text_multiplier=0.5)
    assert lora.loaded_loras(pipe) == [a, b]
    both = {k: v.clone() for k, v in pipe.state_dict().items()}
    lora.unload_lora(pipe, a)  # leaves exactly what loading b alone makes
    only_b = {k: v.clone() for k, v in pipe.state_dict().items()}
    lora.unload_loras(pipe)
    assert all(torch.equal(v, original[k]) for k, v in pipe.state_dict().items())
    lora.load_lora(pipe, paths[1], 1.3, text_multiplier=0.5)
    assert all(torch.equal(v, only_b[k]) for k, v in pipe.state_dict().items())
    lora.unload_loras(pipe)
    lora.load_lora(pipe, paths[0], 0.8)
    lora.load_lora(pipe, paths[1], 1.3, text_multiplier=0.5)
    assert all(torch.equal(v, both[k]) for k, v in pipe.state_dict().items())
    lora.unload_loras(pipe)
    assert all(torch.equal(v, original[k]) for k, v in pipe.state_dict().items())
    assert lora.loaded_loras(pipe) == []
    with pytest.raises(ValueError, match="not loaded"):
        lora.unload_lora(pipe, a)


def test_pt_file_and_in_memory_dict(tmp_path):
    pipe = random_pipe(SD2_LAYOUT)
    tensors = random_kohya_lora(pipe.networks(), torch.Generator().manual_seed(fresh_seed()))
    save_file(tensors, str(tmp_path / "x.safetensors"))
    torch.save(tensors, tmp_path / "x.pt")
    lora.load_lora(pipe, tmp_path / "x.safetensors")
    from_safetensors = {k: v.clone() for k, v in pipe.state_dict().items()}
    lora.unload_loras(pipe)
    loaded = lora.load_lora(pipe, tmp_path / "x.pt")
    assert loaded.name == "x"
    assert all(torch.equal(v, from_safetensors[k]) for k, v in pipe.state_dict().items())
    lora.unload_loras(pipe)
    lora.load_lora(pipe, tensors)
    assert all(torch.equal(v, from_safetensors[k]) for k, v in pipe.state_dict().items())


def test_locon_tucker_mid_matches_its_formula():
    """LoCon with a Tucker core (lora_mid): ΔW = einsum(mid, up, down) (A1111's
    rebuild_cp_decomposition), checked against the convolution it stands for: up ∘ mid ∘ down
    applied to an input equals conv(x, ΔW)."""
    g = torch.Generator().manual_seed(fresh_seed())
    r, cin, cout = 3, 5, 6
    down, mid, up = (torch.randn(r, cin, 1, 1, generator=g), torch.randn(r, r, 3, 3, generator=g),
                     torch.randn(cout, r, 1, 1, generator=g))
    adapter = lora.Adapter("lora", {"down": down, "mid": mid, "up": up})
    x = torch.randn(1, cin, 8, 8, generator=g)
    chained = torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up)
    merged = torch.nn.functional.conv2d(x, adapter.delta(), padding=1)
    assert rel_error(merged, chained) < 1e-6
    assert adapter.out_in() == (cout, cin * 9)


# ---------------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def small_pipe():
    return random_pipe(SD15_LAYOUT)


def test_unknown_modules_are_listed(small_pipe, tmp_path):
    tensors = random_kohya_lora(small_pipe.networks(), torch.Generator().manual_seed(0))
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    before = {k: v.clone() for k, v in small_pipe.state_dict().items()}
    with pytest.raises(lora.LoRAError, match=r"odd\.safetensors.*1 of its .* match no layer.*"
                                             r"down_blocks_9_attentions_0_proj_in"):
        lora.load_lora(small_pipe, path)
    assert all(torch.equal(v, before[k]) for k, v in small_pipe.state_dict().items())
    with pytest.warns(UserWarning, match="down_blocks_9"):
        lora.load_lora(small_pipe, path, strict=False)
    lora.unload_loras(small_pipe)


def test_lora_of_another_family_is_refused_by_shape(small_pipe, tmp_path):
    """A LoRA made for a model whose cross-attention reads 2048-wide text (SDXL) on one that
    reads 32: the file, the module, both shapes and the families are named."""
    wide = dataclasses.replace(SD15_LAYOUT, unet=dataclasses.replace(SD15_LAYOUT.unet,
                                                                     context_dim=2048))
    with torch.device("meta"):
        other = StableDiffusion(wide).networks()
    g = torch.Generator().manual_seed(0)
    tensors = random_kohya_lora({"unet": other["unet"]}, g,
                                select=lambda n: "attn2_to_k" in n,
                                names=lora.original_name_map({"unet": other["unet"]}))
    path = tmp_path / "xl.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(lora.LoRAError) as error:
        lora.load_lora(small_pipe, path)
    message = str(error.value)
    assert "xl.safetensors" in message and "SDXL" in message
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k updates a " \
           "(32, 2048) weight, but unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight " \
           "is (32, 32)" in message


def test_sdxl_text_encoder_2_keys_on_sd15(small_pipe, tmp_path):
    path = tmp_path / "te2.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)},
              str(path))
    with pytest.raises(lora.LoRAError, match="none of its modules match.*lora_te2|lora_te2"):
        lora.load_lora(small_pipe, path)


@pytest.mark.parametrize("keys, problem", [
    ({"lora_unet_x.lora_down.weight": (4, 8)}, r"lacks up"),
    ({"lora_unet_x.lora_down.weight": (4, 8), "lora_unet_x.lora_up.weight": (8, 4),
      "lora_unet_x.dora_scale": (8, 1)}, r"DoRA"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, r"no LoRA part"),
    ({"lora_unet_x.diff": (4, 4)}, r"no LoRA part.*lora_unet_x\.diff"),
    ({"lora_unet_x.lora_down.weight": (4, 8), "lora_unet_x.lora_up.weight": (8, 4),
      "lora_unet_x.alpha": ()}, r"lora_unet_x's alpha holds .* not all finite"),
])
def test_broken_files(small_pipe, tmp_path, keys, problem):
    path = tmp_path / "broken.safetensors"
    save_file({k: torch.zeros(shape) if shape else torch.tensor(math.nan)
               for k, shape in keys.items()}, str(path))
    with pytest.raises(lora.LoRAError, match=rf"broken\.safetensors.*{problem}"):
        lora.load_lora(small_pipe, path)


def test_not_a_lora_file(small_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lora.load_lora(small_pipe, tmp_path / "missing.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.safetensors"):
        lora.load_lora(small_pipe, text)
    with pytest.raises(lora.LoRAError, match="no tensors"):
        lora.read({})
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="multiplier"):
            lora.load_lora(small_pipe, text, bad)


class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickle_asking_for_code_is_refused(small_pipe, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.alpha": torch.tensor(1.0), "payload": Payload()}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused.*print"):
        lora.load_lora(small_pipe, path)
    assert "this ran" not in capsys.readouterr().out
    assert pickle  # (the payload above is what pickle would run)


# --------------------------------------------------------------------------------- A1111 bits
def test_a1111_hash(tmp_path):
    """The addnet hash A1111 writes as "Lora hashes": sha256 of what follows the header."""
    path = tmp_path / "h.safetensors"
    save_file({"a.alpha": torch.tensor(1.0)}, str(path), metadata={"ss_network_dim": "4"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora.file_hash(path) == hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    torch.save({"a": torch.zeros(1)}, tmp_path / "h.pt")
    assert lora.file_hash(tmp_path / "h.pt") == \
        hashlib.sha256((tmp_path / "h.pt").read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("prompt, clean, tags", [
    ("a cat <lora:ink:0.8>", "a cat ", [("ink", 0.8, 0.8)]),
    ("<lora:ink>, a cat", ", a cat", [("ink", 1.0, 1.0)]),
    ("x <lora:a:0.5:1.2> y <lora:b:te=0.3:unet=0.9>", "x  y ", [("a", 0.5, 1.2), ("b", 0.3, 0.9)]),
    ("<lora:a:unet=0.2>", "", [("a", 1.0, 0.2)]),
    ("no tags (a:1.2)", "no tags (a:1.2)", []),
])
def test_prompt_tags_as_a1111_reads_them(prompt, clean, tags):
    """`<lora:name:te[:unet]>`: A1111's first number is the text encoders' multiplier."""
    got_clean, got = lora.prompt_loras(prompt)
    assert got_clean == clean
    assert [(t.name, t.text_multiplier, t.multiplier) for t in got] == tags


def test_find_lora(tmp_path):
    (tmp_path / "ink.safetensors").write_bytes(b"")
    assert lora.find_lora("ink", tmp_path) == tmp_path / "ink.safetensors"
    with pytest.raises(FileNotFoundError, match="'paper' not found.*paper.pt"):
        lora.find_lora("paper", tmp_path)


# ------------------------------------------------------------------------------------------- SDXL
def sdxl_layout():
    """SDXL base's layout (3 levels, no attention at level 0, two text encoders) at toy width
    and with 2 transformer blocks where SDXL has 10: kohya's names depend on the layout only."""
    if "sdxl" not in ldm.PRESETS:
        pytest.skip("this ldm has no SDXL yet")
    from ldm.models.open_clip_text import OpenCLIPTextConfig

    config = ldm.PRESETS["sdxl"]
    clip, bigg = 32, 48
    unet = dataclasses.replace(config.unet, model_channels=32, head_dim=16, norm_groups=8,
                               context_dim=clip + bigg, transformer_depth=(0, 2, 2),
                               middle_transformer_depth=2, adm_in_channels=bigg + 6 * 256)
    return dataclasses.replace(
        config, unet=unet, vae=ldm.PRESETS["tiny"].vae, image_size=64,
        text=dataclasses.replace(SD15_LAYOUT.text, layers=2),
        text_2=OpenCLIPTextConfig(vocab_size=VOCAB, width=bigg, layers=3, heads=2))


def diffusers_sdxl_unet(unet):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    c = unet.config
    levels = range(c.num_levels)
    attention = [c.depth(level) > 0 for level in levels]
    config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=c.num_res_blocks,
        block_out_channels=tuple(c.level_channels(i) for i in levels),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                             for a in reversed(attention)),
        transformer_layers_per_block=tuple(max(c.depth(level), 1) for level in
                                           range(c.num_levels - 1)) + (c.depth("middle"),),
        attention_head_dim=tuple(c.level_channels(i) // c.head_dim for i in levels),
        cross_attention_dim=c.context_dim, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=c.adm_in_channels)
    checkpoint = {f"model.diffusion_model.{k}": v.clone() for k, v in unet.state_dict().items()}
    model = diffusers.UNet2DConditionModel(**config)
    model.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return model.eval()


def diffusers_bigg(text_encoder):
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    cfg = text_encoder.cfg
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, hidden_act="gelu",
        max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.eps,
        projection_dim=cfg.width, bos_token_id=0, eos_token_id=2, pad_token_id=1))
    prefix = "conditioner.embedders.1.model."
    weights = convert_open_clip_checkpoint(
        model, {prefix + k: v.clone() for k, v in text_encoder.state_dict().items()}, prefix)
    if not hasattr(model, "text_model"):
        weights = {k.removeprefix("text_model."): w for k, w in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.mark.slow  # ~60 s on a busy 2-core machine: two text towers and the SDXL U-Net, twice
def test_sdxl_kohya_lora_matches_diffusers(tmp_path):
    """A kohya SDXL file (original U-Net names, lora_te1_ / lora_te2_) through diffusers' SDXL
    loader (its SGM-to-diffusers block map) vs ours: U-Net and both text encoders."""
    layout = sdxl_layout()  # (skips where ldm has no SDXL)
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from ldm.sdxl import StableDiffusionXL, size_embedding

    pipe = randomize_(StableDiffusionXL(layout).eval(), fresh_seed())
    networks = pipe.networks()
    g = torch.Generator().manual_seed(fresh_seed())
    names = lora.original_name_map(networks, "kohya")
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in names
    assert "lora_te2_text_model_encoder_layers_2_self_attn_v_proj" in names
    path = tmp_path / "xl.safetensors"
    save_file(random_kohya_lora(networks, g, names=names, alphas=(2.0,), select=lambda n: not any(
        n.startswith(f"lora_unet_{p}") for p in ("input_blocks_0_", "out_", "time_", "label_"))),
              str(path))

    class Holder(diffusers.loaders.StableDiffusionXLLoraLoaderMixin):
        lora_scale = 1.0
        hf_device_map = None
        components = {}

    holder = Holder()
    holder.unet = diffusers_sdxl_unet(pipe.unet)
    holder.text_encoder = diffusers_text_encoder(pipe.text_encoder)
    holder.text_encoder_2 = diffusers_bigg(pipe.text_encoder_2)

    c = pipe.unet.config
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, c.context_dim, generator=g)
    pooled = torch.randn(2, pipe.text_encoder_2.cfg.width, generator=g)
    time_ids = torch.randint(0, 1024, (2, 6), generator=g).float()
    ids = torch.randint(3, VOCAB, (2, 77), generator=g)

    @torch.no_grad()
    def ours():
        bigg = pipe.text_encoder_2
        return (pipe.unet(x, t, context, y=torch.cat([pooled, size_embedding(time_ids)], -1)),
                pipe.text_encoder(ids), bigg.ln_final(bigg.hidden_states(ids)[-1]))

    @torch.no_grad()
    def theirs():
        return (holder.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=dict(
                    text_embeds=pooled, time_ids=time_ids)).sample,
                holder.text_encoder(ids).last_hidden_state,
                holder.text_encoder_2(ids).last_hidden_state)

    before = ours()
    for part, a, b in zip(("U-Net", "CLIP-L", "bigG"), before, theirs()):
        assert rel_error(a, b) <= TOLERANCE, part  # the twins agree before any LoRA
    quiet(holder.load_lora_weights, str(path), adapter_name="xl")
    reference = theirs()
    lora.load_lora(pipe, path)
    for part, a, b, c0 in zip(("U-Net", "CLIP-L", "bigG"), ours(), reference, before):
        assert_matches(a, b, c0, f"SDXL {part}")
    lora.unload_loras(pipe)
    assert all(torch.equal(a, b) for a, b in zip(ours(), before))


def test_sdxl_names_are_diffusers_own():
    """SDXL's U-Net names (3 levels, attention from level 1, the upsampler at index 2 of
    output_blocks.2 and .5) against diffusers' converter, as for SD 1.5 above."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = randomize_(UNet(sdxl_layout().unet), fresh_seed())
    converted = convert_ldm_unet_checkpoint(
        {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
        {"layers_per_block": unet.config.num_res_blocks, "addition_embed_type": "text_time"})
    for name, target in lora.original_name_map({"unet": unet}, "peft").items():
        theirs = converted[name.removeprefix("unet.") + ".weight"]
        assert torch.equal(theirs.reshape(-1), param({"unet": unet}, target).reshape(-1)), name
    from ldm.sdxl import StableDiffusionXL

    with torch.device("meta"):
        networks = StableDiffusionXL(sdxl_layout()).networks()
    names = {str(v): k for k, v in lora.original_name_map(networks, "kohya").items()}
    assert names["unet.output_blocks.2.2.conv.weight"] == "lora_unet_output_blocks_2_2_conv"
    assert names["text_encoder.encoder.layers.1.mlp.fc1.weight"] == \
        "lora_te1_text_model_encoder_layers_1_mlp_fc1"
    assert names["text_encoder_2.transformer.resblocks.0.attn.in_proj_weight[48:96]"] == \
        "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"


# ---------------------------------------------------------------------------------- LyCORIS
LYCORIS_CASES = [  # (module, layer, LyCORIS options)
    ("loha", "linear", {}), ("loha", "conv", {}), ("loha", "conv", {"use_tucker": True}),
    ("lokr", "linear", {"factor": 4}), ("lokr", "linear", {"factor": 4, "decompose_both": True}),
    ("lokr", "conv", {"factor": 4}), ("lokr", "conv", {"factor": 4, "use_tucker": True}),
    ("lokr", "conv", {"factor": 8, "lora_dim": 64}),  # both factors whole: scale 1
]


@pytest.mark.parametrize("kind, layer, options", LYCORIS_CASES)
def test_lycoris_matches_its_own_forward(kind, layer, options):
    """A LyCORIS LoHa/LoKr module (lycoris-lora's own, random factors, alpha 3) wrapped around a
    layer: its state dict is what files store; our merged ΔW must give the output LyCORIS's
    forward gives."""
    modules = pytest.importorskip("lycoris.modules")
    torch.manual_seed(fresh_seed())
    base = torch.nn.Linear(32, 48) if layer == "linear" else torch.nn.Conv2d(32, 48, 3, padding=1)
    x = torch.randn(2, 32) if layer == "linear" else torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        plain = base(x)
    cls = modules.loha.LohaModule if kind == "loha" else modules.lokr.LokrModule
    options = {"lora_dim": 4, **options}
    adapter_module = cls("lora_unet_x", base, 1.0, alpha=3.0, **options)
    with torch.no_grad():
        for p in adapter_module.parameters():
            if p is not base.weight and p is not base.bias:
                p.copy_(torch.randn_like(p) * 0.5)
    tensors = {k: v.clone() for k, v in adapter_module.state_dict().items() if "org" not in k}
    adapter_module.apply_to()
    with torch.no_grad():
        reference = base(x)
        adapter = lora.Adapter(kind, tensors)
        merged = base.weight + adapter.delta().reshape(base.weight.shape)
        ours = (torch.nn.functional.linear(x, merged, base.bias) if layer == "linear" else
                torch.nn.functional.conv2d(x, merged, base.bias, padding=1))
    assert adapter.out_in() == (48, base.weight[0].numel())
    error, change = rel_error(ours, reference), rel_error(plain, reference)
    print(f"{kind} {layer} {options}: relative error vs LyCORIS {error:.2e} (moves {change:.2e})")
    assert error <= TOLERANCE and change > 1e-2


def test_lycoris_file_loads_by_kohya_names(small_pipe, tmp_path):
    """LoHa and LoKr keys (`<kohya name>.hada_w1_a`, `.lokr_w1`, …) in one file, merged into
    exactly the layers they name, and only those."""
    modules = pytest.importorskip("lycoris.modules")
    torch.manual_seed(fresh_seed())
    networks = small_pipe.networks()
    names = {str(v): k for k, v in lora.original_name_map(networks).items()}
    chosen = {"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
              (modules.loha.LohaModule, {}),
              "unet.input_blocks.1.0.in_layers.2.weight": (modules.lokr.LokrModule, {"factor": 4}),
              "text_encoder.encoder.layers.0.mlp.fc1.weight": (modules.loha.LohaModule, {})}
    tensors, expected = {}, {}
    for ours, (cls, options) in chosen.items():
        layer = small_pipe.get_submodule(ours.removesuffix(".weight"))
        module = cls(names[ours], layer, 1.0, lora_dim=2, alpha=1.0, **options)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "org" not in name:
                    p.copy_(torch.randn_like(p) * 0.3)
        state = {k: v.clone() for k, v in module.state_dict().items() if "org" not in k}
        tensors.update({f"{names[ours]}.{k}": v for k, v in state.items()})
        # ΔW as checked against LyCORIS's forward above (its get_diff_weight applies alpha/r
        # twice, its forward once)
        kind = "loha" if cls is modules.loha.LohaModule else "lokr"
        expected[ours] = lora.Adapter(kind, state).delta().reshape(layer.weight.shape)
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, str(path))
    before = {k: v.clone() for k, v in small_pipe.state_dict().items()}
    lora.load_lora(small_pipe, path, 0.5)
    after = small_pipe.state_dict()
    for ours, delta in expected.items():
        assert torch.allclose(after[ours] - before[ours], 0.5 * delta, atol=1e-6), ours
    assert sum(not torch.equal(after[k], before[k]) for k in before) == len(chosen)
    lora.unload_loras(small_pipe)


def test_old_diffusers_processor_names(small_pipe):
    """diffusers' pre-PEFT files: `…attn1.processor.to_out_lora.down.weight`, text
    `…self_attn.to_q_lora.up.weight` (state_dict_utils' UNET_TO_DIFFUSERS table)."""
    g = torch.Generator().manual_seed(fresh_seed())
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    text = "text_encoder.text_model.encoder.layers.1.self_attn.to_q_lora"
    tensors = {f"{unet}.down.weight": torch.randn(2, 32, generator=g),
               f"{unet}.up.weight": torch.randn(32, 2, generator=g),
               f"{text}.down.weight": torch.randn(2, 32, generator=g),
               f"{text}.up.weight": torch.randn(32, 2, generator=g)}
    loaded = lora.load_lora(small_pipe, tensors)
    assert sorted(map(str, loaded.targets)) == [
        "text_encoder.encoder.layers.1.self_attn.q_proj.weight",
        "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"]
    lora.unload_loras(small_pipe)


# ---------------------------------------------------------------------- at full size
@pytest.mark.slow
def test_kohya_lora_on_full_size_sd15_matches_diffusers(tmp_path):
    """The same comparison on SD 1.5 at full size (random weights, the release's every layer):
    a kohya LoRA over every default target, LoCon convolutions and text encoder included."""
    pipe = random_pipe(ldm.PRESETS["sd15"])
    holder = diffusers_holder(pipe)
    g = torch.Generator().manual_seed(fresh_seed())
    networks = pipe.networks()
    path = tmp_path / "kohya-sd15.safetensors"
    save_file(random_kohya_lora(networks, g, alphas=(2.0,)), str(path))
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    ids = torch.randint(3, 49406, (2, 77), generator=g)
    before = outputs(pipe, x, t, context, ids)
    quiet(holder.load_lora_weights, str(path), adapter_name="a")
    reference = reference_outputs(holder, x, t, context, ids)
    del holder
    lora.load_lora(pipe, path)
    ours = outputs(pipe, x, t, context, ids)
    assert_matches(ours[0], reference[0], before[0], "full-size SD 1.5 U-Net")
    assert_matches(ours[1], reference[1], before[1], "full-size SD 1.5 text encoder")


# ------------------------------------------------------------------- <lora:…> tags in a prompt
@pytest.fixture(scope="module")
def shipped_with_lora_dir(tmp_path_factory):
    """The shipped model with pipe.lora_dir holding two random kohya LoRAs, ink and paper."""
    pipe = ldm.load()
    folder = tmp_path_factory.mktemp("Lora")
    g = torch.Generator().manual_seed(fresh_seed())
    for name in ("ink", "paper"):
        save_file(random_kohya_lora(pipe.networks(), g), str(folder / f"{name}.safetensors"))
    pipe.lora_dir = folder
    return pipe


def test_prompt_tags_merge_for_the_call_only(shipped_with_lora_dir):
    pipe = shipped_with_lora_dir
    original = {k: v.clone() for k, v in pipe.state_dict().items()}
    seed = fresh_seed()
    run = dict(steps=3, seed=seed, output_type="latent", negative_prompt="a blue square")
    tagged = pipe.txt2img(["a red circle <lora:ink:0.7:1.3>"] * 2, **run)
    assert all(torch.equal(v, original[k]) for k, v in pipe.state_dict().items())
    assert pipe.loras == []
    plain = pipe.txt2img(["a red circle "] * 2, **run)
    pipe.load_lora(pipe.lora_dir / "ink.safetensors", 1.3, text_multiplier=0.7)
    by_hand = pipe.txt2img(["a red circle "] * 2, **run)
    # A tag naming a LoRA merged already with its multipliers is in effect: not merged twice
    again = pipe.txt2img(["a red circle <lora:ink:0.7:1.3>"] * 2, **run)
    with pytest.raises(ValueError, match="ink is loaded with"):
        pipe.txt2img("a red circle <lora:ink:0.5>", **run)
    pipe.unload_loras()
    assert torch.equal(tagged, by_hand) and torch.equal(again, by_hand)
    assert rel_error(tagged, plain) > 1e-3
    # img2img and inpaint read them too
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    a = pipe.img2img(image, "a red circle <lora:paper:0.9>", strength=0.6, **run)
    pipe.load_lora(pipe.lora_dir / "paper.safetensors", 0.9)
    b = pipe.img2img(image, "a red circle ", strength=0.6, **run)
    mask = (torch.rand(1, 1, 64, 64) > 0.5).float()
    c = pipe.inpaint(image, mask, "a red circle ", **run)
    pipe.unload_loras()
    d = pipe.inpaint(image, mask, "a red circle <lora:paper:0.9>", **run)
    assert torch.equal(a, b) and torch.equal(c, d)
    assert all(torch.equal(v, original[k]) for k, v in pipe.state_dict().items())


def test_prompt_tags_errors(shipped_with_lora_dir):
    pipe = shipped_with_lora_dir
    original = {k: v.clone() for k, v in pipe.state_dict().items()}
    run = dict(steps=1, seed=0, output_type="latent")
    with pytest.raises(ValueError, match="prompt 1 has other <lora:…> tags"):
        pipe.txt2img(["a <lora:ink:1>", "b <lora:paper:1>"], **run)
    with pytest.raises(ValueError, match="negative_prompt: <lora:…> tags"):
        pipe.txt2img("a", negative_prompt="<lora:ink:1>", **run)
    with pytest.raises(FileNotFoundError, match="'glue' not found"):
        pipe.txt2img("a <lora:ink:1> <lora:glue:1>", **run)  # all found before any merge
    with pytest.raises(ValueError, match="encode_prompt: <lora:…> tags"):
        pipe.encode_prompt("a <lora:ink:1>")
    folder, pipe.lora_dir = pipe.lora_dir, None
    try:
        with pytest.raises(ValueError, match="tags name ink: set pipe.lora_dir"):
            pipe.txt2img("a <lora:ink:1>", **run)
    finally:
        pipe.lora_dir = folder
    # prompt_syntax="plain" reads a tag as words, as CompVis would
    pipe.txt2img("a <lora:ink:1>", prompt_syntax="plain", **run)
    assert pipe.loras == []
    assert all(torch.equal(v, original[k]) for k, v in pipe.state_dict().items())
