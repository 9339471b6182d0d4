"""SDXL 1.0 (Podell et al. 2023, arXiv:2307.01952): what it changes in Stable Diffusion.

The same family: the KL autoencoder (other weights, latents scaled by 0.13025), a U-Net with
cross-attention (deeper, see ldm/models/unet.py), SD's noise schedule and ε-prediction. What is
new is the conditioning, built here:

    context (B, 77, 2048) = [ CLIP ViT-L/14 state after 11 of 12 blocks  (B, 77, 768)
                            | OpenCLIP ViT-bigG/14 state after 31 of 32  (B, 77, 1280) ]
    y       (B, 2816)     = [ pooled bigG text (B, 1280)                      (its EOT token,
                                                                               projected)
                            | emb(original h, w) | emb(crop top, left) | emb(target h, w) ]

with emb(n) the 256-wide sinusoidal embedding of each number (`size_embedding`). The sizes
("micro-conditioning") tell the U-Net how large the training image was and how it was cropped,
so that asking for original = target = the output size and crop (0, 0) asks for a sharp,
centred picture. `y` goes through the U-Net's `label_emb` into the time embedding.

The refiner, trained on the last steps of the schedule, has only bigG (context (B, 77, 1280))
and conditions on an aesthetic score instead of the target size:
    y (B, 2560) = [ pooled (1280) | emb(original h, w) | emb(crop top, left) | emb(score) ]

    base = ldm.load("sd_xl_base_1.0.safetensors")
    refiner = ldm.load("sd_xl_refiner_1.0.safetensors")
    image, = base.txt2img("a lighthouse at dawn", refiner=refiner, refiner_start=0.8)
    cond, uncond = base.encode_prompt("a lighthouse")   # {"context": …, "y": …} each

Names follow diffusers: `text_encoder` (CLIP-L) and `text_encoder_2` (bigG; the refiner's only
one), `original_size`, `crops_coords_top_left`, `target_size`, `aesthetic_score`.
"""
import torch

from ldm import arguments
from ldm import prompts as prompt_lib
from ldm.models.clip_text import CLIPTextModel
from ldm.models.open_clip_text import OpenCLIPTextModel
from ldm.models.unet import timestep_embedding
from ldm.pipeline import PROMPT_OPTIONS, StableDiffusion, _check_bool, _per_prompt
from ldm.tokenizer import CLIPTokenizer

SIZE_EMBED_DIM = 256
# What each model's encode_prompt takes besides the prompts (diffusers' names and defaults).
BASE_CONDITIONING = frozenset({"original_size", "crops_coords_top_left", "target_size"})
REFINER_CONDITIONING = frozenset({"original_size", "crops_coords_top_left", "aesthetic_score",
                                  "negative_aesthetic_score"})


def size_embedding(numbers):
    """numbers (B, K) -> (B, K · 256): each number's own sinusoidal embedding (cosines first,
    as the timestep's), side by side in order."""
    batch, count = numbers.shape
    return timestep_embedding(numbers.flatten(), SIZE_EMBED_DIM).reshape(batch,
                                                                         count * SIZE_EMBED_DIM)


def big_g(encoder, ids):
    """bigG, ids (B, 77) -> (its state after 31 of 32 blocks as it is (B, 77, 1280), pooled
    text (B, 1280))."""
    states = encoder.hidden_states(ids)  # all 32 blocks, for the pooled text
    return states[-2], encoder.pooled(states[-1], ids)


def clip_l(encoder, ids):
    """CLIP-L, ids (B, 77) -> its state after 11 of 12 blocks, without the final norm
    (B, 77, 768)."""
    layers = encoder.cfg.layers - 1  # the last block is never used
    return encoder.hidden_states(ids, layers)[-1]


def conditioning(text_encoder, text_encoder_2, ids, ids_2, numbers):
    """The base's conditioning of one 77-token chunk, with gradients (what training needs; the
    encoders are arguments so that a training objective that holds them as submodules runs
    them): CLIP-L ids (B, 77), bigG ids_2 (B, 77), numbers (B, 6) = (original h, w, crop top,
    left, target h, w) per image -> {"context": (B, 77, 2048), "y": (B, 2816)}. For a prompt
    of one chunk without emphasis, `encode_prompt` builds the same."""
    context, pooled = big_g(text_encoder_2, ids_2)
    context = torch.cat([clip_l(text_encoder, ids), context], dim=-1)
    sizes = size_embedding(numbers.float()).to(pooled.dtype)  # (B, 6 · 256)
    return {"context": context, "y": torch.cat([pooled, sizes], dim=-1)}


class StableDiffusionXL(StableDiffusion):
    """SDXL base or refiner (`config.text_encoder` "sdxl" / "sdxl-refiner"): the pipeline of SD
    with two text encoders and conditioning {"context", "y"}. Everything else (sampling, the
    tasks, img2img, inpainting by latent blending) is StableDiffusion's.

    fp16: SDXL's VAE overflows float16 at the output resolution (black or NaN images);
    `decode_latents` then decodes that batch again with a temporary float32 copy of the VAE,
    which is freed at once (see StableDiffusion.decode_latents).
    """

    def _build_text_encoders(self, config):
        self.is_refiner = config.text_encoder == "sdxl-refiner"
        self.conditioning_keys = PROMPT_OPTIONS | (REFINER_CONDITIONING if self.is_refiner
                                                   else BASE_CONDITIONING)
        self.tokenizer = self.text_encoder = None  # the refiner has no CLIP-L
        if config.text is not None:
            self.tokenizer = CLIPTokenizer()  # pads with end-of-text, as sgm's CLIP-L does
            self.text_encoder = CLIPTextModel(config.text)
        self.tokenizer_2 = CLIPTokenizer.open_clip()  # pads with 0, as open_clip.tokenize
        self.text_encoder_2 = OpenCLIPTextModel(config.text_2)

    def networks(self):
        """The modules a checkpoint holds: unet, vae, text_encoder (base only), text_encoder_2."""
        networks = {"unet": self.unet, "vae": self.vae, "text_encoder_2": self.text_encoder_2}
        if self.text_encoder is not None:
            networks["text_encoder"] = self.text_encoder
        return networks

    # ---------------------------------------------------------------- prompt -> conditioning
    def encode_text(self, prompts):
        """B prompts -> (context (B, 77, 2048) (refiner: 1280), pooled (B, 1280))."""
        return self._encode_texts([prompts])[0]

    def _encode_texts(self, texts, syntax="a1111", emphasis="original", pad=True):
        """Lists of prompts -> a (context (B, 77 · n, D), pooled (B, 1280)) for each list, all
        chunked alike (n the largest count, of either tokenizer; pad=False: of each list's
        two tokenizers only): the two encoders' contexts side by side, the pooled text of
        bigG's first chunk."""
        vectors_g = self._embedding_vectors("text_encoder_2")
        tokens = [self._tokenize(self.tokenizer_2, t, syntax, vectors_g) for t in texts]
        if self.text_encoder is not None:
            vectors_l = self._embedding_vectors("text_encoder")
            tokens += [self._tokenize(self.tokenizer, t, syntax, vectors_l) for t in texts]
        if pad:
            tokens = prompt_lib.pad_chunks(*tokens)
        elif self.text_encoder is not None:  # the two encoders of one list still agree
            pairs = [prompt_lib.pad_chunks(g, l) for g, l in zip(tokens[:len(texts)],
                                                                  tokens[len(texts):])]
            tokens = [g for g, _ in pairs] + [l for _, l in pairs]
        encode_g = self._chunk_encoder(self.text_encoder_2, self._big_g, vectors_g, emphasis)
        encoded = [encode_g(t) for t in tokens[:len(texts)]]
        if self.text_encoder is None:
            return encoded
        encode_l = self._chunk_encoder(self.text_encoder, self._clip_l, vectors_l, emphasis)
        return [(torch.cat([encode_l(t), context], dim=-1), pooled)
                for t, (context, pooled) in zip(tokens[len(texts):], encoded)]

    def _big_g(self, ids):
        return big_g(self.text_encoder_2, ids)

    def _clip_l(self, ids):
        return clip_l(self.text_encoder, ids)

    def encode_prompt(self, prompt, negative_prompt="", *, num_images=1, image_size=None,
                      original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                      aesthetic_score=None, negative_aesthetic_score=None, clip_skip=None,
                      prompt_syntax="a1111", emphasis="original", pad_conds=True):
        """(cond, uncond): {"context": (B, 77 · n, D), "y": (B, adm)} each, B = prompts ·
        num_images. prompt_syntax, emphasis, pad_conds: as StableDiffusion.encode_prompt
        (long prompts in chunks, both encoders alike); clip_skip is SD 1.x's only.

        image_size: the output (height, width), the default of original_size and target_size
        (diffusers' defaults; the default image_size is the native 1024²). crops_coords_top_left
        (top, left), default (0, 0). The refiner takes aesthetic_score (6.0) for the prompt and
        negative_aesthetic_score (2.5) for the negative prompt instead of target_size.
        An empty negative prompt is all zeros for the base (context and pooled text, as sgm's
        base and diffusers' force_zeros_for_empty_prompt); the refiner encodes it.
        """
        num_images = arguments.check_int("num_images", num_images, minimum=1)
        prompts = arguments.check_prompts("prompt", prompt)
        negatives = _per_prompt(negative_prompt, len(prompts))
        given = {"target_size": target_size, "aesthetic_score": aesthetic_score,
                 "negative_aesthetic_score": negative_aesthetic_score}
        for name, value in given.items():
            if value is not None and name not in self.conditioning_keys:
                kind = "refiner" if self.is_refiner else "base"
                raise TypeError(f"the SDXL {kind} takes no {name} (it conditions on "
                                f"{', '.join(sorted(self.conditioning_keys))})")
        image_size = _pair("image_size", image_size or (self.config.image_size,) * 2)
        original = _pair("original_size", original_size or image_size)
        crop = _pair("crops_coords_top_left", crops_coords_top_left, minimum=0)
        if self.is_refiner:
            score = _score("aesthetic_score", 6.0 if aesthetic_score is None else aesthetic_score)
            negative_score = _score("negative_aesthetic_score", 2.5 if negative_aesthetic_score
                                    is None else negative_aesthetic_score)
            numbers, negative_numbers = [*original, *crop, score], [*original, *crop,
                                                                   negative_score]
        else:
            target = _pair("target_size", target_size or image_size)
            numbers = negative_numbers = [*original, *crop, *target]
        self.clip_skip_layers(clip_skip)  # refuses any but None
        text, negative_text = self._encode_texts([prompts, negatives], prompt_syntax, emphasis,
                                                 _check_bool("pad_conds", pad_conds))
        cond = self._conditioning(prompts, text, numbers, num_images)
        uncond = self._conditioning(negatives, negative_text, negative_numbers, num_images,
                                    zero_empty=not self.is_refiner)
        return cond, uncond

    def _conditioning(self, prompts, text, numbers, num_images, zero_empty=False):
        context, pooled = text
        if zero_empty:
            keep = torch.tensor([p != "" for p in prompts], device=self.device)
            context = context * keep[:, None, None]
            pooled = pooled * keep[:, None]
        sizes = torch.tensor([numbers] * len(prompts), dtype=torch.float32, device=self.device)
        y = torch.cat([pooled, size_embedding(sizes).to(pooled.dtype)], dim=-1)
        return {"context": context.repeat_interleave(num_images, dim=0).to(self.dtype),
                "y": y.repeat_interleave(num_images, dim=0).to(self.dtype)}

    def _conditioning_inputs(self, task, options, height, width):
        unknown = set(options) - self.conditioning_keys
        if unknown:
            raise TypeError(f"{task}() got unexpected keyword argument(s) "
                            f"{', '.join(sorted(unknown))}; the SDXL "
                            f"{'refiner' if self.is_refiner else 'base'} takes "
                            f"{', '.join(sorted(self.conditioning_keys))}")
        return {**options, "image_size": (height, width)}


def _pair(name, value, minimum=1):
    """(a, b) of integers >= minimum, from any pair (tuple, list, NumPy)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(f"{name} must be a pair of integers (height, width) or (top, left), "
                        f"got {value!r}")
    return tuple(arguments.check_int(f"{name}[{i}]", v, minimum=minimum)
                 for i, v in enumerate(value))


def _score(name, value):
    return arguments.check_float(name, value, 0, 10, why="the LAION aesthetic score, 0 to 10")
