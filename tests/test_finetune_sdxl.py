"""Fine-tuning SDXL base (ldm.finetune, ldm.training.SDXLObjective): in full and as a LoRA.

The model has SDXL base's structure (3 levels, no attention at level 0, two text encoders,
y = pooled bigG text + six size embeddings) at toy width and depth: CLIP-L 3 blocks of 32,
bigG 3 blocks of 48, one transformer block where SDXL has 2 and 10, the tiny VAE (its latents
are half the image's size). The objective's conditioning must be what `encode_prompt` builds for
the same captions and sizes; a trained LoRA must mean the same to ldm's loader and to diffusers'
SDXL loader + PEFT, which nobody here wrote. fp32 CPU, random weights, fresh seeds.
"""
import dataclasses

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import ldm
from ldm import train, training
from ldm.config import PRESETS
from ldm.data.folder import ImageFolder
from ldm.finetune import finetune
from ldm.lora_training import LoRAConfig
from ldm.models.clip_text import CLIPTextConfig
from ldm.models.open_clip_text import OpenCLIPTextConfig
from ldm.sdxl import StableDiffusionXL
from ldm.tokenizer import CLIPTokenizer

from helpers import fresh_seed, in_processes, randomize_, rel_error

TOLERANCE = 1e-5
CLIP_WIDTH, BIGG_WIDTH = 32, 48
CAPTIONS = ["a red circle", "a blue square on a yellow background", "a cat", "two dogs"]
FEW_STEPS = training.TrainConfig(steps=3, batch=4, lr=2e-2, warmup=1, checkpoint_every=2)
# (height, width) of the folder's images, and where ImageFolder's centred 32×32 crop of the
# image resized to cover 32×32 starts: worked out by hand.
IMAGE_SIZES = [(48, 32), (32, 64), (64, 64), (50, 40)]
CROPS = [(8, 0), (0, 16), (0, 0), (4, 0)]  # (50, 40) is resized to (40, 32)


def small_sdxl():
    config = PRESETS["sdxl"]
    unet = dataclasses.replace(config.unet, model_channels=32, head_dim=16, norm_groups=8,
                               context_dim=CLIP_WIDTH + BIGG_WIDTH, transformer_depth=(0, 1, 1),
                               middle_transformer_depth=1, adm_in_channels=BIGG_WIDTH + 6 * 256)
    return dataclasses.replace(
        config, unet=unet, vae=PRESETS["tiny"].vae, image_size=32,
        text=CLIPTextConfig(width=CLIP_WIDTH, layers=3, heads=2),
        text_2=OpenCLIPTextConfig(width=BIGG_WIDTH, layers=3, heads=2))


LAYOUT = small_sdxl()


pytestmark = pytest.mark.usefixtures("one_thread")


def random_pipe(seed):
    return randomize_(StableDiffusionXL(LAYOUT), seed).float()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four random images of IMAGE_SIZES with captions: ImageFolder(folder, 32)."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(fresh_seed())
    for i, ((h, w), caption) in enumerate(zip(IMAGE_SIZES, CAPTIONS)):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(caption)
    return root


def weights(pipe):
    return {f"{c}.{k}": v.clone() for c, m in pipe.networks().items()
            for k, v in m.state_dict().items()}


def inputs(seed):
    """Random U-Net and text-encoder inputs: x, t, context, y, CLIP-L ids, bigG ids."""
    g = torch.Generator().manual_seed(seed)
    c = LAYOUT.unet
    ids = CLIPTokenizer()(CAPTIONS[:2])
    ids_2 = CLIPTokenizer.open_clip()(CAPTIONS[2:])
    return (torch.randn(2, 4, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g),
            torch.randn(2, 77, c.context_dim, generator=g),
            torch.randn(2, c.adm_in_channels, generator=g), ids, ids_2)


@torch.no_grad()
def outputs(pipe, x, t, context, y, ids, ids_2):
    """U-Net output, CLIP-L's last state, bigG's last state (before ln_final)."""
    return (pipe.unet(x, t, context, y=y), pipe.text_encoder(ids),
            pipe.text_encoder_2.hidden_states(ids_2)[-1])


# ---------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("dropped", [False, True])
def test_objective_builds_what_encode_prompt_builds(folder, dropped):
    """The loss of a step's micro-batch equals the loss computed by hand with the conditioning
    `encode_prompt` builds for each image's caption (the empty one when dropped) and its sizes
    (original size, crop, training size, from ImageFolder)."""
    pipe = random_pipe(fresh_seed())
    data = ImageFolder(folder, 32)
    config = dataclasses.replace(FEW_STEPS, seed=fresh_seed() % 1000, uncond_prob=float(dropped))
    seen = []

    def batches(batch_size, generator):
        seen.append(data.batch(batch_size, generator))
        return seen[-1]
    trainer = training.Trainer(training.TrainingState(pipe, None), config, batches, None, False,
                               finetuning=True)
    (latents, text, t, noise), = trainer.diffusion_inputs(5)
    batch, = seen

    crops = dict(zip(IMAGE_SIZES, CROPS))
    assert batch.crop_coords == [crops[size] for size in batch.original_sizes]
    ids, ids_2, numbers = text
    assert numbers.tolist() == [[*o, *crops[o], 32, 32] for o in batch.original_sizes]

    objective = training.diffusion_objective(pipe)
    assert isinstance(objective, training.SDXLObjective)
    with torch.no_grad():
        loss = objective(latents, text, t, noise)
        conds = [pipe.encode_prompt("" if dropped else caption, original_size=o,
                                    crops_coords_top_left=crops[o], target_size=(32, 32))[0]
                 for caption, o in zip(batch.captions, batch.original_sizes)]
        cond = {key: torch.cat([c[key] for c in conds]) for key in ("context", "y")}
        assert cond["context"].shape == (4, 77, CLIP_WIDTH + BIGG_WIDTH)
        alpha_bar = pipe.alphas_cumprod[t].float()[:, None, None, None]
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        by_hand = torch.nn.functional.mse_loss(pipe.unet(noisy, t, **cond), noise)
        conditioning = objective.conditioning(text)
    for key in ("context", "y"):
        error = rel_error(conditioning[key], cond[key])
        print(f"dropped={dropped} {key}: objective vs encode_prompt {error:.2e}")
        assert error <= 1e-6
    error = rel_error(loss, by_hand)
    print(f"dropped={dropped} loss: objective vs by hand {error:.2e}")
    assert error <= 1e-6


def test_size_conditioning_defaults_without_folder_sizes():
    """A batch that does not know its images' sizes (shapes world, a latent list) conditions on
    the training size, uncropped."""
    pipe = random_pipe(fresh_seed())

    def data(batch_size, generator):
        images = torch.rand(batch_size, 3, 32, 24, generator=generator) * 2 - 1
        return ldm.data.folder.Batch(CAPTIONS[:batch_size], [None] * batch_size, images)
    state = training.TrainingState(pipe, None)
    trainer = training.Trainer(state, dataclasses.replace(FEW_STEPS, batch=2, grad_accum=2),
                               data, None, False, finetuning=True)
    pieces = trainer.diffusion_inputs(0)
    assert len(pieces) == 2
    for latents, (ids, ids_2, numbers), t, noise in pieces:
        assert latents.shape == (1, 4, 16, 12)
        assert numbers.tolist() == [[32, 24, 0, 0, 32, 24]]


# ------------------------------------------------------------------------------ full fine-tune
def test_full_finetuning_trains_the_unet_and_both_text_encoders():
    """A few steps with train_text_encoder: the U-Net and both encoders move, the VAE does not;
    every trained parameter gets a gradient (DDP's condition), which rules out CLIP-L's last
    block and final norm (SDXL takes its penultimate state) but not bigG's last block and
    projection (its pooled text)."""
    pipe = random_pipe(fresh_seed())
    before = weights(pipe)
    grads = {}

    def capture(stage, step, loss, state):
        if step == 1:
            grads.update({id(p): p.grad for p in pipe.parameters() if p.requires_grad})
    config = dataclasses.replace(FEW_STEPS, steps=2, lr=1e-3, seed=fresh_seed() % 1000,
                                 grad_checkpointing=True)  # its wrapping of both encoders too
    finetune(pipe, config, random_data, train_text_encoder=True,
             progress=False, on_step=capture)
    after = weights(pipe)
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
    named = {name: p for name, p in pipe.named_parameters()}
    trained = {name for name, p in named.items() if p.requires_grad}
    assert all(grads[id(named[n])] is not None for n in trained)
    for encoder in ("text_encoder", "text_encoder_2"):
        norm = torch.cat([grads[id(named[n])].flatten() for n in trained
                          if n.startswith(encoder + ".")]).norm()
        assert norm > 0, encoder
    assert "text_encoder.encoder.layers.2.mlp.fc1.weight" not in trained  # CLIP-L's last
    assert "text_encoder.final_layer_norm.weight" not in trained
    assert "text_encoder.encoder.layers.1.mlp.fc1.weight" in trained
    assert {"text_encoder_2.transformer.resblocks.2.mlp.c_fc.weight",
            "text_encoder_2.text_projection", "text_encoder_2.ln_final.weight"} <= trained
    assert "text_encoder_2.logit_scale" not in trained
    assert not any(name.startswith("vae.") for name in trained)


def random_data(batch_size, generator):
    """32×32 random images with captions: the data(batch_size, generator) finetune takes."""
    picks = torch.randint(len(CAPTIONS), (batch_size,), generator=generator).tolist()
    images = torch.rand(batch_size, 3, 32, 32, generator=generator) * 2 - 1
    return ldm.data.folder.Batch([CAPTIONS[i] for i in picks], [None] * batch_size, images)


# ----------------------------------------------------------------------------------- LoRA
def trained_lora(config=LoRAConfig(rank=4, alpha=2.0, text_encoder=True)):
    """(base pipe, the same pipe with its trained LoRA attached, the training state)."""
    seed = fresh_seed()
    base, pipe = random_pipe(seed), random_pipe(seed)
    state = finetune(pipe, dataclasses.replace(FEW_STEPS, seed=seed % 1000), random_data,
                     lora=config, progress=False)
    return base, pipe, state


@pytest.fixture(scope="module")
def lora_run():
    return trained_lora()


def test_lora_trains_only_the_adapters_and_writes_kohyas_sdxl_names(lora_run, tmp_path):
    """The base weights are bit for bit what they were; the file has lora_unet_, lora_te1_ and
    lora_te2_ modules (none on CLIP-L's last block, which SDXL never runs); ldm's load_lora on
    the base gives the trained model's U-Net and text-encoder outputs."""
    base, pipe, state = lora_run
    state.network.detach()
    try:
        assert all(torch.equal(weights(pipe)[k], v) for k, v in weights(base).items())
    finally:
        state.network.attach()
    assert all(p.grad is None or not p.requires_grad for p in pipe.parameters())
    path = state.network.save(tmp_path / "xl.safetensors", dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    modules = {key.split(".")[0] for key in keys}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    assert "lora_te2_text_model_encoder_layers_2_self_attn_k_proj" in modules
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc2" in modules
    assert not any(m.startswith("lora_te1_text_model_encoder_layers_2_") for m in modules)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in modules
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"

    data_in = inputs(fresh_seed())
    trained, before = outputs(pipe, *data_in), outputs(base, *data_in)
    fresh = random_pipe(0)
    fresh.load_state_dict(base.state_dict())
    fresh.load_lora(path)
    for what, ours, ref, old in zip(("U-Net", "CLIP-L", "bigG"), outputs(fresh, *data_in),
                                    trained, before):
        error, change = rel_error(ours, ref), rel_error(old, ref)
        print(f"SDXL {what}: load_lora vs trained {error:.2e} (the LoRA moves it {change:.2e})")
        assert error <= TOLERANCE
        assert change > 1e2 * TOLERANCE  # the LoRA matters: the comparison can fail


def test_diffusers_loads_the_trained_sdxl_lora(lora_run, tmp_path):
    """diffusers' StableDiffusionXL load_lora_weights (+ PEFT), on diffusers' twins of the base
    model, gives the U-Net and both text encoders' outputs of ldm's trained adapters."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from test_lora import diffusers_bigg, diffusers_sdxl_unet, diffusers_text_encoder, quiet

    base, pipe, state = lora_run
    path = state.network.save(tmp_path / "xl.safetensors", dtype=torch.float32)

    class Holder(diffusers.loaders.StableDiffusionXLLoraLoaderMixin):
        lora_scale = 1.0
        hf_device_map = None
        components = {}

    holder = Holder()
    holder.unet = diffusers_sdxl_unet(base.unet)
    holder.text_encoder = diffusers_text_encoder(base.text_encoder)
    holder.text_encoder_2 = diffusers_bigg(base.text_encoder_2)
    x, t, context, y, ids, ids_2 = inputs(fresh_seed())
    pooled = y[:, :BIGG_WIDTH]
    time_ids = torch.randint(0, 1024, (2, 6)).float()  # diffusers embeds the numbers itself
    y = torch.cat([pooled, ldm.sdxl.size_embedding(time_ids)], dim=-1)

    @torch.no_grad()
    def theirs():
        return (holder.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=dict(
                    text_embeds=pooled, time_ids=time_ids)).sample,
                holder.text_encoder(ids).last_hidden_state,
                holder.text_encoder_2(ids_2, output_hidden_states=True).hidden_states[-1])

    before = theirs()
    quiet(holder.load_lora_weights, str(path), adapter_name="trained")
    for what, ours, ref, old in zip(("U-Net", "CLIP-L", "bigG"),
                                    outputs(pipe, x, t, context, y, ids, ids_2), theirs(), before):
        error = rel_error(ours, ref)
        print(f"SDXL {what}: ldm's trained LoRA vs diffusers+PEFT {error:.2e}")
        assert error <= TOLERANCE
        assert rel_error(old, ref) > 1e2 * TOLERANCE


# ------------------------------------------------------------------------------ resuming a run
class Interrupted(Exception):
    pass


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resumed_sdxl_finetuning_is_bit_exact(mode, tmp_path):
    """2 steps, killed, resumed for 2 more == 4 steps straight, bit for bit (the adapters, or
    the U-Net's and both text encoders' weights, and the optimiser)."""
    seed = fresh_seed()
    config = dataclasses.replace(FEW_STEPS, steps=4, seed=seed % 1000, lr=1e-3)
    lora_config = LoRAConfig(rank=2, text_encoder=True) if mode == "lora" else None

    def die_at_3(stage, done, loss, state):
        if done == 3:
            raise Interrupted

    def run(**kwargs):
        pipe = random_pipe(seed)
        state = finetune(pipe, config, random_data, lora=lora_config, progress=False,
                         train_text_encoder=mode != "lora", **kwargs)
        trained = state.network.state_dict() if state.network else weights(pipe)
        return state, {k: v.clone() for k, v in trained.items()}

    folder = tmp_path / "state"
    with pytest.raises(Interrupted):
        run(state_dir=folder, on_step=die_at_3)  # the state of step 2 is on disk
    resumed, a = run(state_dir=folder, resume=folder)
    straight, b = run()
    assert resumed.step == straight.step == 4
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    if mode == "full":
        assert any(k.startswith("text_encoder_2.") and not torch.equal(a[k], v)
                   for k, v in weights(random_pipe(seed)).items())  # bigG was trained
    for x, y in zip(resumed.optimizer_state["state"].values(),
                    straight.optimizer_state["state"].values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])


# ------------------------------------------------------------------------------ data parallel
def _first_gradients(seed):
    """{trained parameter's name: its gradient in the first step} of a full fine-tune with both
    text encoders."""
    pipe, seen = random_pipe(seed), {}

    def capture(stage, step, loss, state):
        seen.update({n: p.grad.clone() for n, p in pipe.named_parameters() if p.requires_grad})
    finetune(pipe, dataclasses.replace(FEW_STEPS, steps=1, seed=seed % 1000), random_data,
             train_text_encoder=True, progress=False, on_step=capture)
    return seen


def test_data_parallel_gradients_are_the_batch_gradients(tmp_path):  # ~17 s: 2 processes
    """Two gloo processes, each with half of every batch, get the whole batch's gradients of
    the U-Net and both text encoders: DDP reaches every trained parameter (it raises on one
    without a gradient) through the objective's submodules and its tuple of text inputs."""
    seed = fresh_seed()
    ranks = in_processes(_first_gradients, 2, tmp_path, seed)
    single = _first_gradients(seed)
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    assert {name.split(".")[0] for name in single} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in single), "ranks disagree"
    names = sorted(single)
    flat = [torch.cat([g[k].flatten() for k in names]) for g in (ranks[0], single)]
    error = rel_error(*flat)
    print(f"2 processes vs 1: gradients {error:.2e}")
    assert error <= TOLERANCE and flat[1].norm() > 0


# ------------------------------------------------------------------------------ what is refused
def test_the_refiner_is_refused_by_name():
    refiner = dataclasses.replace(LAYOUT, text=None, text_encoder="sdxl-refiner",
                                  unet=dataclasses.replace(LAYOUT.unet, context_dim=BIGG_WIDTH,
                                                           adm_in_channels=BIGG_WIDTH + 5 * 256))
    with torch.device("meta"):
        pipe = StableDiffusionXL(refiner)
    with pytest.raises(ValueError, match="SDXL refiner"):
        finetune(pipe, FEW_STEPS, random_data, progress=False)
    with pytest.raises(ValueError, match="not the refiner"):
        training.diffusion_objective(pipe)


# ------------------------------------------------------------------------------ command line
def test_command_line_trains_an_sdxl_lora_on_a_folder(folder, tmp_path):
    """python -m ldm.train --init a small SDXL file --data a folder --lora-rank … writes a kohya
    SDXL LoRA that ldm loads onto the base."""
    init = tmp_path / "small-sdxl.safetensors"
    ldm.save(random_pipe(fresh_seed()), init)
    out = tmp_path / "xl-lora.safetensors"
    train.main(["--init", str(init), "--data", str(folder), "--resolution", "32",
                "--lora-rank", "4", "--lora-text-encoder", "--steps", "2", "--batch", "2",
                "--out", str(out), "--threads", "1"])
    assert (tmp_path / "xl-lora.state" / "state.pt").is_file()
    with safe_open(str(out), "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_num_train_images"] == "4"
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    loaded = ldm.load(init).load_lora(out)
    assert {t.network for t in loaded.targets} == {"unet", "text_encoder", "text_encoder_2"}


def test_command_line_fine_tunes_all_of_sdxl_from_cached_latents(folder, tmp_path):
    """--train-text-encoder --cache-latents without --lora-rank: the exported file loads as
    SDXL, with a trained U-Net and text encoders and the VAE as it was."""
    init = tmp_path / "small-sdxl.safetensors"
    ldm.save(random_pipe(fresh_seed()), init)
    out = tmp_path / "xl-full.safetensors"
    train.main(["--init", str(init), "--data", str(folder), "--resolution", "32",
                "--cache-latents", str(tmp_path / "cache"), "--train-text-encoder",
                "--steps", "2", "--batch", "2", "--lr", "1e-3", "--dtype", "float32",
                "--out", str(out), "--threads", "1"])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    before, after = ldm.load(init), ldm.load(out)
    assert isinstance(after, StableDiffusionXL) and after.config == before.config
    a, b = weights(before), weights(after)
    assert a.keys() == b.keys()
    changed = {name.split(".")[0] for name in a if not torch.equal(a[name], b[name])}
    assert changed == {"unet", "text_encoder", "text_encoder_2"}
