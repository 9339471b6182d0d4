"""Full-size SD 2.1 (768-v) parity: `ldm.load` on original-layout tensors vs diffusers.

A random state dict with exactly the tensor names, shapes and dtypes of the released
v2-1_768-ema-pruned (tests/data/manifests/sd21_768v.tsv) is loaded by ldm from memory (the SD 1.5
parity shows that files load as their tensors) and, through diffusers' own original-to-diffusers
converters, into diffusers' StableDiffusionPipeline with a DDIM scheduler predicting v as the
original's 768-v config does. Everything SD 2 adds is on the path: the OpenCLIP text encoder's
penultimate layer and 0-padding, the U-Net's 64-wide heads and linear projections,
v-prediction. fp32 on CPU, random inputs, fresh seeds.
"""
import re

import pytest
import torch

import ldm
from ldm import schedule

from helpers import fresh_seed, read_manifest, write_clip_vocab_files

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as convert  # noqa: E402
from helpers import random_tensor  # noqa: E402
from test_parity_sd15 import compare_txt2img, original_tensors  # noqa: E402


def random_sd21_tensor(name, shape, dtype, g):
    """As the SD 1.5 parity's, with OpenCLIP's LayerNorm scales (ln_1, ln_2, ln_final) near 1."""
    if re.search(r"\.ln_\w+\.weight$", name):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return random_tensor(name, shape, dtype, g)


def sd21_tensors():
    """A random state dict with the release's names, shapes and dtypes (5.2 GB, kept in memory)."""
    g = torch.Generator().manual_seed(fresh_seed())
    tensors = {name: random_sd21_tensor(name, shape, dtype, g)
               for name, (shape, dtype) in read_manifest("sd21_768v").items()}
    tensors.update(schedule.checkpoint_buffers())
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(1, dtype=torch.int32)
    return tensors


def reference_pipeline(tensors, folder):
    """diffusers' StableDiffusionPipeline from the same file, components converted by diffusers."""
    unet_config = dict(
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),  # diffusers' name for the number of heads
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert.convert_ldm_unet_checkpoint(
        original_tensors(tensors, "model.diffusion_model."), unet_config), strict=True)
    vae_config = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert.convert_ldm_vae_checkpoint(
        original_tensors(tensors, "first_stage_model."), vae_config), strict=True)
    # The converter leaves out the 24th block (SD 2 conditions on the 23rd) and the projection.
    text_weights = convert.convert_open_clip_checkpoint(
        None, original_tensors(tensors, "cond_stage_model.model."))
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
        num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=1024))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 dropped the `text_model.` level
        text_weights = {k.removeprefix("text_model."): w for k, w in text_weights.items()}
    text_encoder.load_state_dict(text_weights, strict=True)
    # SD 2's tokenizer pads with id 0, which is "!" in CLIP's vocabulary.
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_clip_vocab_files(folder), pad_token="!", model_max_length=77)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type="v_prediction")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_sd21_v_prediction_txt2img_matches_diffusers(tmp_path):
    """The same starting latents, prompt and negative prompt through 4 DDIM steps with guidance:
    final latents within 1e-5 (relative), decoded images within 1/255 on average."""
    tensors = sd21_tensors()
    ours = ldm.load(tensors)  # uses the tensors as they are: no second copy
    assert ours.config == ldm.PRESETS["sd21"]  # told SD 2 by shapes; v, as a dict has no name
    reference = reference_pipeline(tensors, tmp_path)
    del tensors
    # Its prompts have no "!": transformers makes the pad token "!" a special token, so it reads
    # every "!" as id 0, where open_clip (SD 2's tokenizer, test_tokenizer.py) has "!</w>" 256.
    error, difference = compare_txt2img(ours, reference, "ddim", dict(num_inference_steps=4))
    print(f"SD 2.1 v-prediction DDIM: latents relative error {error:.2e}, "
          f"mean absolute pixel difference {difference:.4f} / 255")
    assert error <= 1e-5 and difference <= 1.0
