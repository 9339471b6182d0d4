"""Training LoRAs (ldm/lora_training.py, ldm.finetune): only the adapters learn, and the
file they are saved in means the same to ldm's loader and to diffusers + PEFT, which nobody
here wrote.

Models with SD 1.5's block layout (4 levels, attention at 0, 1, 2: kohya's names are the real
SD 1.5 ones) and SD 2's (linear projections, OpenCLIP text with its fused q; k; v weight,
v-prediction), at toy width and random weights; 32×32 random images with captions. A LoRA is
trained a few steps (a high learning rate, so that it matters), saved in fp32 and merged:
by ldm's `load_lora`, and by diffusers' `load_lora_weights` into diffusers' twin of the base
model; U-Net and text-encoder outputs must equal the trained adapters' to 1e-5 relative.
"""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import ldm
from ldm import lora, train, training
from ldm.finetune import finetune
from ldm.config import PRESETS
from ldm.data.folder import Batch
from ldm.lora_training import LoRAConfig, LoRANetwork, kohya_training_metadata
from ldm.models.unet import UNetConfig
from ldm.pipeline import StableDiffusion

from helpers import TINY_SD2, fresh_seed, in_processes, randomize_, rel_error

TOLERANCE = 1e-5
SD15_LAYOUT = dataclasses.replace(PRESETS["tiny"], unet=UNetConfig(
    model_channels=32, context_dim=32, num_heads=2, norm_groups=8))
LAYOUTS = {"sd15": SD15_LAYOUT, "sd2": TINY_SD2}
CAPTIONS = ["a red circle", "a blue square on a yellow background", "a cat", "two dogs"]
FEW_STEPS = training.TrainConfig(steps=3, batch=4, lr=2e-2, warmup=1, checkpoint_every=2)
EVERYTHING = LoRAConfig(rank=4, alpha=2.0, text_encoder=True, conv_rank=2, conv_alpha=1.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pipe(config, seed):
    return randomize_(StableDiffusion(config), seed).float()


def data(batch_size, generator):
    """32×32 random images with captions: the data(batch_size, generator) finetune takes."""
    picks = torch.randint(len(CAPTIONS), (batch_size,), generator=generator).tolist()
    images = torch.rand(batch_size, 3, 32, 32, generator=generator) * 2 - 1
    return Batch([CAPTIONS[i] for i in picks], [None] * batch_size, images)


def weights(pipe):
    return {f"{c}.{k}": v.clone() for c, m in pipe.networks().items()
            for k, v in m.state_dict().items()}


def inputs(pipe, seed):
    g = torch.Generator().manual_seed(seed)
    c = pipe.unet.config
    return (torch.randn(2, c.in_channels, 16, 16, generator=g),
            torch.randint(0, 1000, (2,), generator=g),
            torch.randn(2, 77, c.context_dim, generator=g),
            pipe.tokenizer(CAPTIONS[:2]))


@torch.no_grad()
def outputs(pipe, x, t, context, ids):
    return pipe.unet(x, t, context), pipe.text_encoder(ids)


def trained_lora(layout, config=EVERYTHING, tmp_path=None):
    """(base pipe, the same pipe with its trained LoRA attached, the training state)."""
    seed = fresh_seed()
    base = random_pipe(LAYOUTS[layout], seed)
    pipe = random_pipe(LAYOUTS[layout], seed)
    state = finetune(pipe, dataclasses.replace(FEW_STEPS, seed=seed % 1000), data,
                           lora=config, progress=False)
    return base, pipe, state


# ------------------------------------------------------------------------------------- targets
def test_default_targets_are_kohyas_on_sd15():
    """kohya's SD 1.5 LoRA: 192 U-Net layers (16 transformers × 12), 72 text layers (12 × 6);
    LoCon adds every layer of the 22 ResBlocks and the 3 down- and 3 upsamplers, 3×3 convs at
    the conv rank with a 3×3 down and a 1×1 up."""
    with torch.device("meta"):
        pipe = StableDiffusion(PRESETS["sd15"])
    names = LoRANetwork(pipe, LoRAConfig(rank=8)).targets()
    assert len(names) == 192
    assert str(names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]) \
        == "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert "lora_unet_mid_block_attentions_0_proj_in" in names
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2" in names
    network = LoRANetwork(pipe, LoRAConfig(rank=8, text_encoder=True, conv_rank=4))
    names = network.targets()
    assert len([n for n in names if n.startswith("lora_te_")]) == 72
    # conv1, conv2, time_emb_proj; and a 1×1 skip conv where the width changes: 2 input
    # ResBlocks and all 12 output ones (they take the skip's channels too)
    resnet_layers = 22 * 3 + 14
    assert len(names) == 192 + 72 + resnet_layers + 3 + 3
    state = network.state_dict()
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert state[f"{conv}.lora_down.weight"].shape == (4, 320, 3, 3)
    assert state[f"{conv}.lora_up.weight"].shape == (640, 4, 1, 1)
    shortcut = "lora_unet_down_blocks_1_resnets_0_conv_shortcut"  # 1×1: the network's rank
    assert state[f"{shortcut}.lora_down.weight"].shape == (8, 320, 1, 1)
    assert state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"].shape \
        == (768, 8)
    assert getattr(network, conv).scale == 1.0  # conv_alpha defaults to the conv rank


def test_targets_choose_layers_and_bad_configs_are_refused():
    pipe = StableDiffusion(SD15_LAYOUT)
    names = LoRANetwork(pipe, LoRAConfig(targets=("to_q", "to_v"))).targets()
    assert names and all(n.endswith(("to_q", "to_v")) for n in names)
    with pytest.raises(ValueError, match="no layer of this model matches"):
        LoRANetwork(pipe, LoRAConfig(targets=("to_qq",)))
    for bad in ({"rank": 0}, {"rank": 2.5}, {"alpha": -1.0}, {"conv_rank": True},
                {"targets": "to_q"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoRAConfig(**bad)


# ---------------------------------------------------------------------------- what is trained
def test_only_the_adapters_are_trained():
    """The base model's weights are bit for bit what they were; the optimiser held the
    adapters' parameters and nothing else; the adapters moved."""
    base, pipe, state = trained_lora("sd15")
    after = weights(pipe)
    assert all(torch.equal(after[k], v) for k, v in weights(base).items())
    adapters = list(state.network.parameters())
    optimized = state.optimizer_state["state"]
    groups = state.optimizer_state["param_groups"]
    assert len(optimized) == len(adapters) == len(groups[0]["params"]) and len(groups) == 1
    assert [optimized[i]["exp_avg"].shape for i in range(len(adapters))] == \
        [p.shape for p in adapters]
    assert all(p.grad is None or not p.requires_grad for p in pipe.parameters())
    ups = [p for n, p in state.network.named_parameters() if "lora_up" in n]
    assert all(p.abs().max() > 0 for p in ups), "every adapter's up started at 0 and must move"


# ---------------------------------------------------------------------------- the file, merged
@pytest.mark.parametrize("layout", ["sd15", "sd2"])
def test_saved_lora_merges_to_the_trained_adapters(layout, tmp_path):
    """ldm's load_lora on the base model gives what the attached adapters give."""
    base, pipe, state = trained_lora(layout)
    data_in = inputs(base, fresh_seed())
    trained = outputs(pipe, *data_in)
    before = outputs(base, *data_in)
    path = state.network.save(tmp_path / "trained.safetensors", dtype=torch.float32)
    base.load_lora(path)
    merged = outputs(base, *data_in)
    for ours, ref, old, what in zip(merged, trained, before, ("U-Net", "text encoder")):
        error, change = rel_error(ours, ref), rel_error(old, ref)
        print(f"{layout} {what}: merged vs trained {error:.2e} (the LoRA moves it {change:.2e})")
        assert error <= TOLERANCE
        assert change > 1e2 * TOLERANCE  # the LoRA matters: the comparison can fail


def test_file_is_kohyas(tmp_path):
    """Keys, alpha and the ss_* / sshs_* metadata as kohya's train_network writes them."""
    _, pipe, state = trained_lora("sd15", LoRAConfig(rank=4, conv_rank=2))
    facts = kohya_training_metadata(FEW_STEPS, state.network, state.step, started_at=1.5,
                                    output_name="trained", resolution=(32, 48), num_images=10)
    path = state.network.save(tmp_path / "trained.safetensors", metadata=facts)
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        dtypes = {f.get_tensor(k).dtype for k in keys}
    modules = {k.removesuffix(".lora_down.weight") for k in keys if k.endswith("down.weight")}
    assert {f"{m}.{part}" for m in modules for part in
            ("lora_down.weight", "lora_up.weight", "alpha")} == keys
    assert modules == set(state.network.targets())
    assert alphas == {4.0, 2.0} and dtypes == {torch.float16}  # fp16 by default, as usual
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "4.0")
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_training_started_at"] == "1.5" and metadata["ss_steps"] == "3"
    assert metadata["ss_resolution"] == "(48, 32)"  # kohya's (width, height)
    assert metadata["ss_num_train_images"] == "10"
    assert metadata["ss_output_name"] == "trained"
    assert all(isinstance(v, str) for v in metadata.values())
    # sshs_model_hash is A1111's addnet hash of the file (sha256 after the header)
    assert metadata["sshs_model_hash"][:12] == lora.file_hash(path)
    assert lora.read(path).metadata == metadata  # and ldm's reader takes it


@pytest.mark.parametrize("layout", ["sd15", "sd2"])
def test_diffusers_loads_the_trained_lora(layout, tmp_path):
    """diffusers' load_lora_weights, on diffusers' twin of the base model, gives the U-Net and
    text encoder outputs of ldm's trained adapters."""
    from test_lora import diffusers_holder, quiet

    base, pipe, state = trained_lora(layout)
    holder = diffusers_holder(base)
    path = state.network.save(tmp_path / "trained.safetensors", dtype=torch.float32)
    x, t, context, ids = inputs(base, fresh_seed())
    with torch.no_grad():
        before = holder.unet(x, t, encoder_hidden_states=context).sample
    quiet(holder.load_lora_weights, str(path), adapter_name="trained")
    with torch.no_grad():
        theirs = (holder.unet(x, t, encoder_hidden_states=context).sample,
                  holder.text_encoder(ids).last_hidden_state)
    ours = outputs(pipe, x, t, context, ids)
    for mine, ref, what in zip(ours, theirs, ("U-Net", "text encoder")):
        error = rel_error(mine, ref)
        print(f"{layout} {what}: ldm's trained LoRA vs diffusers+PEFT {error:.2e}")
        assert error <= TOLERANCE
    assert rel_error(before, theirs[0]) > 1e2 * TOLERANCE


# ------------------------------------------------------------------------------ resuming a run
class Interrupted(Exception):
    pass


def _die_at(step):
    def on_step(stage, done, loss, state):
        if done == step:
            raise Interrupted
    return on_step


@pytest.mark.parametrize("mode", ["lora", "full", "full+ema"])
def test_resumed_finetuning_is_bit_exact(mode, tmp_path):
    """2 steps, killed, resumed for 2 more == 4 steps straight, bit for bit (the adapters or the
    weights, the U-Net's EMA, the optimiser), with the state written every 2 steps."""
    seed = fresh_seed()
    config = dataclasses.replace(FEW_STEPS, steps=4, seed=seed % 1000, lr=1e-3, ema_decay=0.9)
    lora_config = LoRAConfig(rank=2, text_encoder=True) if mode == "lora" else None

    def run(**kwargs):
        pipe = random_pipe(SD15_LAYOUT, seed)
        state = finetune(pipe, config, data, lora=lora_config, progress=False,
                               train_text_encoder=mode != "lora", ema=mode == "full+ema",
                               **kwargs)
        trained = state.network.state_dict() if state.network else weights(pipe)
        return state, {k: v.clone() for k, v in trained.items()}

    folder = tmp_path / "state"
    with pytest.raises(Interrupted):
        run(state_dir=folder, on_step=_die_at(3))  # the state of step 2 is on disk
    resumed, a = run(state_dir=folder, resume=folder)
    straight, b = run()
    assert resumed.step == straight.step == 4
    if mode == "full+ema":  # the pipes hold the EMA: resumed with its update count
        assert resumed.ema.num_updates == straight.ema.num_updates == 4
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    for x, y in zip(resumed.optimizer_state["state"].values(),
                    straight.optimizer_state["state"].values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


def _first_gradients(seed):
    """{adapter parameter: its gradient in finetune's first step} (the up weights'; the downs'
    are 0 there, the ups starting at 0)."""
    seen = {}

    def capture(stage, step, loss, state):
        seen.update({n: p.grad.clone() for n, p in state.network.named_parameters()})
    finetune(random_pipe(SD15_LAYOUT, seed), dataclasses.replace(
        FEW_STEPS, steps=1, seed=seed % 1000), data, lora=EVERYTHING, progress=False,
        on_step=capture)
    return seen


def test_data_parallel_lora_gradients_are_the_batch_gradients(tmp_path):
    """Two gloo processes, each with half of every batch, get the whole batch's adapter
    gradients: DDP averages the LoRA's (a submodule of what it wraps). (Weights after several
    steps are not compared: Adam's first update is lr·sign(g), which turns rounding noise in
    near-zero gradients into whole steps.)"""
    seed = fresh_seed()
    ranks = in_processes(_first_gradients, 2, tmp_path, seed)
    single = _first_gradients(seed)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in single), "ranks disagree"
    names = sorted(single)
    flat = [torch.cat([g[k].flatten() for k in names]) for g in (ranks[0], single)]
    error = rel_error(*flat)
    print(f"2 processes vs 1: adapter gradients {error:.2e}")
    assert error <= TOLERANCE and flat[1].norm() > 0


def test_resume_refuses_another_run(tmp_path, caplog):
    config = dataclasses.replace(FEW_STEPS, steps=1)
    finetune(random_pipe(SD15_LAYOUT, 1), config, data, lora=LoRAConfig(rank=2),
                   state_dir=tmp_path, progress=False)
    longer = dataclasses.replace(config, steps=2)
    state = finetune(random_pipe(SD15_LAYOUT, 1), longer, data, lora=LoRAConfig(rank=2),
                           resume=tmp_path, progress=False)
    assert state.step == 2 and "'steps': (1, 2)" in caplog.text  # allowed, and said
    with pytest.raises(ValueError, match="lora"):
        finetune(random_pipe(SD15_LAYOUT, 1), config, data, lora=LoRAConfig(rank=4),
                       resume=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="state.pt"):
        finetune(random_pipe(SD15_LAYOUT, 1), config, data, resume=tmp_path / "none",
                       progress=False)


def test_what_finetune_refuses():
    config = dataclasses.replace(FEW_STEPS, steps=1)
    with pytest.raises(ValueError, match="ema is for full fine-tuning"):
        finetune(StableDiffusion(SD15_LAYOUT), config, data, lora=LoRAConfig(), ema=True)
    with pytest.raises(ValueError, match="float32"):
        finetune(StableDiffusion(SD15_LAYOUT).to(torch.bfloat16), config, data)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        finetune(StableDiffusion(SD15_LAYOUT), dataclasses.replace(config, precision="fp16"),
                       data, lora=LoRAConfig(), progress=False)
    with pytest.raises(ValueError, match="inpainting"):
        inpainting = dataclasses.replace(SD15_LAYOUT, unet=dataclasses.replace(
            SD15_LAYOUT.unet, in_channels=9))
        finetune(StableDiffusion(inpainting), config, data)


def test_detach_restores_the_model():
    """Detached, the adapters act no more (also OpenCLIP's parametrized q; k; v weight, whose
    name comes back); attached again, they do."""
    pipe = random_pipe(TINY_SD2, fresh_seed())
    names = set(pipe.state_dict())
    data_in = inputs(pipe, fresh_seed())
    plain = outputs(pipe, *data_in)
    network = LoRANetwork(pipe, EVERYTHING)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.normal_(0, 0.1)
    adapted = outputs(pipe, *data_in)
    network.detach()
    assert set(pipe.state_dict()) == names
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe, *data_in), plain))
    network.attach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe, *data_in), adapted))
    assert rel_error(adapted[0], plain[0]) > 1e-3 and rel_error(adapted[1], plain[1]) > 1e-3


# ------------------------------------------------------------------------------ command line
@pytest.mark.skipif(not ldm.loader.DEFAULT_CHECKPOINT.exists(), reason="no shipped model")
def test_command_line_trains_a_lora_on_a_folder(tmp_path):
    """python -m ldm.train --init the shipped model --data a folder --cache-latents … --lora-rank
    writes a kohya LoRA that ldm loads, the resumable state, and sample grids."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(fresh_seed())
    for i, caption in enumerate(CAPTIONS):
        pixels = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    out = tmp_path / "mine.safetensors"
    train.main(["--init", str(ldm.loader.DEFAULT_CHECKPOINT), "--data", str(folder),
                "--cache-latents", str(tmp_path / "cache"), "--lora-rank", "2",
                "--lora-text-encoder", "--steps", "2", "--batch", "2", "--grad-accum", "2",
                "--out", str(out), "--sample-every", "2", "--sample-prompts", "a red circle",
                "a blue square", "--threads", "1"])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    assert (tmp_path / "mine.state" / "state.pt").is_file()
    grid = Image.open(tmp_path / "mine.samples" / "step-000002.png")
    assert grid.size == (128, 64)  # two 64×64 images side by side
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_num_train_images"] == "4" and metadata["ss_cache_latents"] == "True"
    assert metadata["ss_sd_model_name"] == "tiny-shapes.safetensors"
    assert metadata["ss_gradient_accumulation_steps"] == "2"
    loaded = ldm.load().load_lora(out)
    assert any(t.network == "text_encoder" for t in loaded.targets)


def test_command_line_refuses_mixed_modes(capsys):
    for argv, message in ((["--lora-rank", "4"], "needs --init"),
                          (["--init", "x", "--vae-steps", "3"], "from scratch"),
                          (["--init", "x", "--lora-alpha", "3"], "need --lora-rank"),
                          (["--init", "x", "--resolution", "64"], "need --data"),
                          (["--ema"], "needs --init"),
                          (["--init", "x", "--ema", "--lora-rank", "4"], "not with --lora-rank"),
                          (["--init", "x", "--ema-decay", "0.99"], "needs --ema"),
                          (["--sample-every", "3"], "needs --sample-prompts")):
        with pytest.raises(SystemExit):
            train.main(argv + ["--out", "o.safetensors"])
        assert message in capsys.readouterr().err, argv

