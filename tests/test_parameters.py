"""ldm.parameters: AUTOMATIC1111 "parameters" texts read into task keywords, and ldm's own
lines written so that they read back to the settings that made them.

The A1111 texts below are real ones: the example in A1111's own parse_generation_parameters
docstring (modules/infotext_utils.py), and lines A1111 wrote that were published in other
projects' tests and model cards (found through code search), some shortened.
"""
import re
import warnings

import pytest

from ldm.lora import Loaded, LoRATag
from ldm.parameters import Parameters, format_parameters, parse_parameters
from ldm.samplers.registry import SAMPLERS

# A1111 modules/infotext_utils.py, parse_generation_parameters' docstring (A1111 < 1.0).
A1111_DOCSTRING = """girl with an artist's beret, determined, blue eyes, desert scene, computer \
monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), \
detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, \
poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""

# A1111 1.9.4, SDXL with LoRA tags and "Schedule type" (its sampler, a fork's "DPM++ 3M", made
# "DPM++ 2M").
A1111_SDXL_LORAS = """magical fantasy forest, epic oak trees, beautiful detailed face,  \
CosmicStyle <lora:CosmicStyleSDXL:1.2> <lora:add-detail-xl:0.8>
Negative prompt: ugly, bad anatomy, watermark, user name, poorly drawn, simple background
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 2921279476, \
Size: 888x1184, Model hash: 501235c0cd, Model: jibMixRealisticXL_v180SkinSupreme, VAE hash: \
f03e48fe77, VAE: sdxl-vae-fp16-fix.safetensors, Lora hashes: "CosmicStyleSDXL: ccfe5cfff7, \
add-detail-xl: 0d9bd1b873", Version: v1.9.4"""

# A1111 1.2.1: old-style sampler name, ENSD, clip skip (a model card's example).
A1111_OLD_SDE = """masterpiece, best quality, 1boy, chibi, (beautiful detailed face), standing in \
kitchen, rendered in blender
Negative prompt: (low quality:1.3), (worst quality:1.3), pointy ears, watermark, logo, text
Steps: 25, Sampler: DPM++ SDE Karras, CFG scale: 7, Seed: 2040493799, Size: 728x728, Model hash: \
d725be5d18, Model: revAnimated_v11, Clip skip: 2, ENSD: 31337, Version: v1.2.1"""

# A1111 (early 2023): hires fix, whose "Denoising strength" is the hires pass's.
A1111_HIRES = """1girl, solo, looking at viewer
Negative prompt: lowres, bad anatomy, bad hands
Steps: 36, Sampler: DPM++ 2M Karras, CFG scale: 11, Seed: 2627504816, Size: 576x768, Model hash: \
dc892b15, Model: EerieOrangeMix2, Denoising strength: 0.57, Clip skip: 2, ENSD: 31337, \
Hires upscale: 2, Hires upscaler: Latent"""

# A1111 1.9.4 img2img (inpainting: "Mask blur").
A1111_IMG2IMG = """product shoot in sand with beach elements, warm weather, studio lighting
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3001968073, Size: \
985x1266, Model hash: b513c6287d, Model: realism_engine, Denoising strength: 0.75, Mask blur: 2, \
Version: v1.9.4"""

# A1111 1.10: "Hashes" written as a JSON object, unquoted.
A1111_HASHES = """a beautiful futuristic city at sunset, highly detailed, cinematic lighting
Steps: 30, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 1010752383, Size: \
512x512, Model hash: f47e942ad4, Model: realisticVisionV60B1_v51HyperVAE, Hashes: {"model": \
"f47e942ad4", "vae": "63aeecb90f"}, Version: v1.10.1"""


def parse_quietly(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parse_parameters(text, strict=False)


# ------------------------------------------------------------------------------ A1111's texts
def test_a1111_docstring_example():
    p = parse_parameters(A1111_DOCSTRING)
    assert p.kwargs == {
        "prompt": A1111_DOCSTRING.split("\n")[0], "negative_prompt": A1111_DOCSTRING.split(
            "\n")[1].removeprefix("Negative prompt: "),
        "steps": 20, "sampler": "euler_a", "schedule": "normal", "cfg_scale": 7.0,
        "seed": 965400086, "width": 512, "height": 512, "rng": "nv",
        "pad_conds": False}  # A1111's defaults: the GPU's numbers, no padding
    assert p.info == {"Model hash": "45dee52b"}
    assert p.loras == () and p.unsupported == {} and p.task == "txt2img"


def test_new_style_schedule_type_loras_and_hashes():
    p = parse_parameters(A1111_SDXL_LORAS)
    assert (p.kwargs["sampler"], p.kwargs["schedule"]) == ("dpmpp_2m", "karras")
    assert p.kwargs["prompt"] == ("magical fantasy forest, epic oak trees, beautiful detailed "
                                  "face,  CosmicStyle")
    assert p.loras == (LoRATag("CosmicStyleSDXL", 1.2, 1.2), LoRATag("add-detail-xl", 0.8, 0.8))
    assert p.lora_hashes == {"CosmicStyleSDXL": "ccfe5cfff7", "add-detail-xl": "0d9bd1b873"}
    assert p.info["VAE"] == "sdxl-vae-fp16-fix.safetensors"
    assert p.info["Version"] == "v1.9.4"
    assert (p.kwargs["width"], p.kwargs["height"]) == (888, 1184)


def test_old_sampler_names_fold_the_schedule_in():
    p = parse_parameters(A1111_HIRES.replace(", Hires upscale: 2, Hires upscaler: Latent", ""))
    assert (p.kwargs["sampler"], p.kwargs["schedule"]) == ("dpmpp_2m", "karras")
    assert p.kwargs["clip_skip"] == 2
    # without the hires fix, Denoising strength would be img2img's
    assert p.task == "img2img" and p.kwargs["strength"] == 0.57
    # ENSD only moves the per-step noise, which DPM++ 2M has none of
    assert p.info["ENSD"] == "31337" and "ENSD" not in p.unsupported


def test_what_ldm_does_not_reproduce_is_refused_by_name():
    with pytest.raises(ValueError) as info:
        parse_parameters(A1111_OLD_SDE)
    message = str(info.value)
    for key in ("ENSD", "Sampler", "Version", "Brownian", "float16", "strict=False"):
        assert key in message
    with pytest.warns(UserWarning, match="ENSD"):
        p = parse_parameters(A1111_OLD_SDE, strict=False)
    assert set(p.unsupported) == {"ENSD", "Sampler", "Version"}
    assert (p.kwargs["sampler"], p.kwargs["schedule"]) == ("dpmpp_sde", "karras")


def test_hires_fix_maps_to_the_hires_keywords():
    p = parse_parameters(A1111_HIRES)
    assert p.task == "txt2img" and "strength" not in p.kwargs
    assert (p.kwargs["hires_scale"], p.kwargs["hires_upscale"], p.kwargs["hires_strength"]) == \
        (2.0, "latent", 0.57)
    assert "hires_steps" not in p.kwargs  # absent: as many as the first pass
    assert (p.kwargs["width"], p.kwargs["height"]) == (576, 768)  # the first pass's
    assert p.unsupported == {} and "Denoising strength" not in p.info
    line = A1111_HIRES.replace("Latent", "Latent (bicubic antialiased), Hires steps: 0")
    assert parse_parameters(line).kwargs["hires_upscale"] == "latent-bicubic-antialiased"
    assert "hires_steps" not in parse_parameters(line).kwargs
    line = A1111_HIRES.replace("Latent", "Lanczos, Hires steps: 12, Hires sampler: DPM++ 2M "
                               "Karras, Hires CFG Scale: 11, Hires resize: 0x0")
    p = parse_parameters(line)  # a hires sampler and guidance equal to the first pass's
    assert (p.kwargs["hires_upscale"], p.kwargs["hires_steps"]) == ("pixel", 12)


@pytest.mark.parametrize("entries, key, why", [
    ("Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+", "Hires upscaler", "'R-ESRGAN 4x+'"),
    ("Hires upscale: 1, Hires upscaler: Latent", "Hires upscale", "scale 1"),
    ("Hires upscale: 2, Hires sampler: Euler", "Hires sampler", "sampler of its own"),
    ("Hires upscale: 2, Hires prompt: a castle", "Hires prompt", "prompt of its own"),
    ("Hires resize: 1024x1024", "Hires resize", "a target size"),
    ("First pass size: 256x256", "First pass size", "before 1.0"),
])
def test_hires_fixes_ldm_does_not_run_are_named(entries, key, why):
    text = f"a\n{SETTINGS}, Denoising strength: 0.5, {entries}"
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_parameters(text)
    p = parse_quietly(text)
    assert key in p.unsupported and "strength" not in p.kwargs  # never img2img's


def test_pad_conds():
    """Absent from A1111's line: not padded, its default; "Pad conds: True": ldm's default."""
    assert parse_parameters(f"a\n{SETTINGS}").kwargs["pad_conds"] is False
    p = parse_parameters(f"a\n{SETTINGS}, Pad conds: True")
    assert "pad_conds" not in p.kwargs and p.unsupported == {} and "Pad conds" not in p.info
    for pad in (True, False):
        text = format_parameters({**BASE, "pad_conds": pad})
        assert ("Pad conds: False" in text) is not pad  # ldm's lines: only when it differs
        assert parse_parameters(text).kwargs.get("pad_conds", True) is pad
    assert "Pad conds" in parse_quietly(f"a\n{SETTINGS}, Pad conds: maybe").unsupported

def test_hires_round_trip():
    for hires in ({"hires_scale": 2, "hires_strength": 0.55},
                  {"hires_scale": 1.5, "hires_strength": 0.3, "hires_steps": 4,
                   "hires_upscale": "pixel"},
                  {"hires_scale": 2.25, "hires_upscale": "latent-nearest-exact"}):
        text = format_parameters({**BASE, **hires})
        p = parse_parameters(text)
        assert p.kwargs == {**BASE, "hires_upscale": "latent", **hires}, text
    assert "Hires upscale: 2, Hires upscaler: Latent" in format_parameters(
        {**BASE, "hires_scale": 2.0})
    with pytest.raises(ValueError, match="without hires_scale"):
        format_parameters({**BASE, "hires_steps": 3})
    with pytest.raises(ValueError, match="strength .img2img's. and a hires fix"):
        format_parameters({**BASE, "strength": 0.5, "hires_scale": 2})


def test_img2img_line():
    p = parse_quietly(A1111_IMG2IMG)
    assert p.task == "img2img" and p.kwargs["strength"] == 0.75
    assert p.kwargs["negative_prompt"] == ""
    assert (p.kwargs["sampler"], p.kwargs["schedule"]) == ("euler_a", "normal")  # Automatic
    assert set(p.unsupported) == {"Mask blur"}


def test_hashes_json_object():
    p = parse_parameters(A1111_HASHES)
    assert p.info["Hashes"] == '{"model": "f47e942ad4", "vae": "63aeecb90f"}'
    assert p.info["Version"] == "v1.10.1" and p.kwargs["cfg_scale"] == 7.0


SETTINGS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512"


def test_multi_line_prompts_and_missing_negative():
    p = parse_parameters(f"line one,\n  line two (x:1.2)\nNegative prompt: bad,\nworse\n{SETTINGS}")
    assert p.kwargs["prompt"] == "line one,\nline two (x:1.2)"
    assert p.kwargs["negative_prompt"] == "bad,\nworse"
    assert parse_parameters(f"just a prompt\n{SETTINGS}").kwargs["negative_prompt"] == ""
    assert parse_parameters(SETTINGS).kwargs["prompt"] == ""  # an empty prompt
    assert parse_parameters(f"a cat\r\n{SETTINGS}\r\n").kwargs["prompt"] == "a cat"


def test_quoted_values_keep_commas_colons_and_quotes():
    text = f'a\n{SETTINGS}, Template: "a \\"quoted\\": thing, x", Model: m'
    p = parse_quietly(text)
    assert p.info["Template"] == 'a "quoted": thing, x' and p.info["Model"] == "m"


@pytest.mark.parametrize("entry, want", [
    ("", {"rng": "nv"}),  # A1111's default, GPU: CUDA's torch.randn
    (", RNG: GPU", {"rng": "nv"}),
    (", RNG: NV", {"rng": "nv"}),
    (", RNG: CPU", {"rng": "cpu"}),
    (", Emphasis: Original", {}),
    (", Emphasis: No norm", {"emphasis": "no_norm"}),
    (", Emphasis: None", {"prompt_syntax": "plain"}),
    (", Clip skip: 3", {"clip_skip": 3}),
    (", Eta: 1", {}),          # Euler a's default η
    (", Eta DDIM: 0.3", {}),   # DDIM's η, no effect on Euler a
])
def test_entries_to_keywords(entry, want):
    p = parse_parameters(f"a\n{SETTINGS}{entry}")
    extra = {k: v for k, v in p.kwargs.items() if k in
             ("rng", "emphasis", "prompt_syntax", "clip_skip", "eta")}
    assert {"rng": "nv", **want} == extra


@pytest.mark.parametrize("sampler, entry", [("DDIM", "Eta DDIM: 0.5"), ("DDIM", "Eta: 0.5")])
def test_ddim_eta(sampler, entry):
    p = parse_parameters(f"a\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 5, Size: 512x512, "
                         f"{entry}")
    assert p.kwargs["sampler"] == "ddim" and p.kwargs["eta"] == 0.5


@pytest.mark.parametrize("entry, key", [
    ("Eta: 0.67", "Eta"),
    ("RNG: Mac", "RNG"),
    ("Emphasis: Ignore", "Emphasis"),
    ("ADetailer model: face_yolov8n.pt", "ADetailer model"),
    ('Variation seed: 1, Variation seed strength: 0.3', "Variation seed strength"),
    ("Seed resize from: 640x640", "Seed resize from"),
    ("Token merging ratio: 0.3", "Token merging ratio"),
    ("NGMS: 0.5", "NGMS"),
    ("Discard penultimate sigma: True", "Discard penultimate sigma"),
    ("Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8", "Refiner"),
    ("Hires upscale: 2, Hires upscaler: ESRGAN_4x", "Hires upscaler"),
    ("Tiling", "Tiling"),  # a bare entry, A1111's writing of an entry equal to its key
])
def test_each_difference_is_named(entry, key):
    text = f"a\n{SETTINGS}, {entry}"
    with pytest.raises(ValueError, match=key):
        parse_parameters(text)
    assert key in parse_quietly(text).unsupported


@pytest.mark.parametrize("entry", ["Seed resize from: -1x-1", "ENSD: 0", "Variation seed: 7, "
                                   "Variation seed strength: 0", "NGMS: 0",
                                   "TI hashes: \"x: 1\"", "FP8 weight: Disable"])
def test_neutral_entries_are_information(entry):
    p = parse_parameters(f"a\n{SETTINGS}, {entry}")
    assert p.unsupported == {} and entry.split(":")[0] in p.info


@pytest.mark.parametrize("version, old", [("v1.7.0-224-gabc123", True), ("v1.7.0", True),
                                          ("v1.7.0-RC-5-gabc", True), ("v1.6.0", True),
                                          ("v1.7.0-225-g1234", False), ("v1.10.1", False),
                                          ("f0.0.17v1.8.0rc-latest-276-g29be1da7", False)])
def test_versions_before_the_float64_alphas_are_flagged(version, old):
    p = parse_quietly(f"a\n{SETTINGS}, Version: {version}")
    assert ("Version" in p.unsupported) == old


@pytest.mark.parametrize("name", ["DPM2", "DPM2 a Karras", "DPM++ 2M SDE", "DPM++ 3M SDE", "UniPC"])
def test_a1111_samplers_that_run_differently_are_named(name):
    with pytest.raises(ValueError, match="Sampler"):
        parse_parameters(f"a\nSteps: 20, Sampler: {name}, CFG scale: 7, Seed: 5, Size: 64x64")


def test_unknown_sampler():
    text = "a\nSteps: 20, Sampler: DPM fast, CFG scale: 7, Seed: 5, Size: 64x64"
    with pytest.raises(ValueError, match="DPM fast"):
        parse_parameters(text)
    p = parse_quietly(text)
    assert "sampler" not in p.kwargs and p.info["Sampler"] == "DPM fast"


@pytest.mark.parametrize("text, words", [
    ("a red circle", ["no settings line"]),
    ("a prompt\nSteps: 20, Seed: 3", ["no settings line"]),  # A1111 needs 3 entries
    ("", ["no settings line"]),
    ("a\nSteps: 20, Sampler: Euler, CFG scale: 7, Size: 64x64", ["no Seed"]),
    ("a\nSteps: 20, Sampler: Euler, CFG scale: 7", ["no Seed, Size"]),
    ("a\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", ["Steps", "many"]),
    ("a\nSteps: 0, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64", ["Steps", "at least 1"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: high, Seed: 1, Size: 64x64", ["CFG scale"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1.5, Size: 64x64", ["Seed", "1.5"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512", ["Size", "WIDTHxHEIGHT"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 0x64", ["Size"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Clip skip: 0",
     ["Clip skip"]),
    ('a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model: "open',
     ["quoted"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Seed: 2, Size: 64x64", ["Seed",
                                                                                "twice"]),
    ("a\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Denoising strength: 2",
     ["Denoising strength"]),
    ("a <lora:x:heavy>\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64",
     ["lora", "numbers"]),
])
def test_malformed_text_is_a_value_error_naming_the_problem(text, words):
    with pytest.raises(ValueError) as info:
        parse_parameters(text, strict=False)
    for word in words:
        assert word in str(info.value)


def test_not_text():
    with pytest.raises(TypeError, match="str"):
        parse_parameters(b"Steps: 20")


# ------------------------------------------------------------------------------ round trips
BASE = dict(prompt="a castle on a hill, (masterpiece:1.2), [blurry]", negative_prompt="",
            steps=25, sampler="dpmpp_2m", schedule="karras", cfg_scale=7.5, seed=1234,
            width=512, height=768, rng="cpu")


@pytest.mark.parametrize("changes", [
    {},
    {"negative_prompt": "lowres, bad: hands\nsecond line", "prompt": "line one\nline two"},
    {"clip_skip": 2, "emphasis": "no_norm"},
    {"emphasis": "comfy"},
    {"prompt_syntax": "plain"},
    {"rng": "nv", "seed": 2**64 - 1},
    {"strength": 0.55},
    {"sampler": "ddim", "schedule": "ddim_uniform", "eta": 0.25},
    {"sampler": "euler_a", "schedule": "normal", "cfg_scale": 1 / 3},
    {"prompt": ""},
])
def test_ldm_lines_parse_back_to_their_settings(changes):
    settings = {**BASE, **changes}
    text = format_parameters(settings, info={"Model hash": "0123456789", "Model": "m.safetensors"})
    p = parse_parameters(text)
    assert p.kwargs == settings
    assert p.info == {"Model hash": "0123456789", "Model": "m.safetensors",
                      "Version": p.info["Version"]}
    assert p.info["Version"].startswith("ldm ")


def test_loras_round_trip_as_tags_and_hashes():
    loras = [Loaded("style", "style.safetensors", 0.8, 0.8, "1a2b3c4d5e6f"),
             Loaded("detail", "detail.pt", 1.0, 0.5, "0f9e8d7c6b5a")]
    text = format_parameters(BASE, loras=loras)
    assert "<lora:style:0.8> <lora:detail:0.5:1>" in text
    p = parse_parameters(text)
    assert p.kwargs == BASE
    assert p.loras == (LoRATag("style", 0.8, 0.8), LoRATag("detail", 0.5, 1.0))
    assert p.lora_hashes == {"style": "1a2b3c4d5e6f", "detail": "0f9e8d7c6b5a"}
    # and through format again, tags (without hashes) and the "Lora hashes" entry from info
    again = format_parameters(p.kwargs, loras=p.loras, info={k: v for k, v in p.info.items()
                                                             if k != "Version"})
    assert again == text


def test_refiner_round_trip():
    settings = {**BASE, "refiner_start": 0.7}
    text = format_parameters(settings, info={"Refiner": "sd_xl_refiner_1.0.safetensors"})
    assert "Refiner: sd_xl_refiner_1.0.safetensors, Refiner switch at: 0.7" in text
    p = parse_parameters(text)  # ldm's own line: its refiner semantics are ldm's
    assert p.kwargs == settings and p.info["Refiner"] == "sd_xl_refiner_1.0.safetensors"


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_and_schedule_round_trips(name):
    for schedule in SAMPLERS[name].schedules:
        settings = {**BASE, "sampler": name, "schedule": schedule}
        p = parse_parameters(format_parameters(settings))
        assert (p.kwargs["sampler"], p.kwargs["schedule"]) == (name, schedule)


def test_a1111_lines_round_trip_through_format():
    """An A1111 text's settings written again, as ldm would for its reproduction (without
    A1111's Version and what ldm did not reproduce)."""
    for text in (A1111_DOCSTRING, A1111_SDXL_LORAS, A1111_IMG2IMG, A1111_HASHES):
        p = parse_quietly(text)
        info = {k: v for k, v in p.info.items() if k != "Version" and k not in p.unsupported}
        again = parse_parameters(format_parameters(p.kwargs, loras=p.loras, info=info))
        assert again.kwargs == p.kwargs and again.loras == p.loras
        assert {k: v for k, v in again.info.items() if k != "Version"} == info


def test_the_cli_line_with_rng_and_version():
    """The CLI's own line (ldm/cli.py `_with_seed`, as it writes it now) and format_parameters'
    for the same run: the same entries, plus RNG and Version, and no empty negative line."""
    cli_line = ('a red circle <lora:style:0.8> <lora:detail:1>\nNegative prompt: blurry, dark\n'
                'Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 43, '
                'Size: 64x48, Model hash: 0123456789, Model: tiny.safetensors, Clip skip: 2, '
                'Emphasis: No norm, Lora hashes: "style: 1a2b3c4d5e6f, detail: 0f9e8d7c6b5a"')
    loras = [Loaded("style", "s", 0.8, 0.8, "1a2b3c4d5e6f"),
             Loaded("detail", "d", 1.0, 1.0, "0f9e8d7c6b5a")]
    settings = dict(prompt="a red circle", negative_prompt="blurry, dark", steps=20,
                    sampler="dpmpp_2m", schedule="karras", cfg_scale=7.5, seed=43, width=64,
                    height=48, clip_skip=2, emphasis="no_norm", prompt_syntax="a1111")
    ours = format_parameters(settings, loras=loras,
                             info={"Model hash": "0123456789", "Model": "tiny.safetensors"})
    version = ours.rsplit(", ", 1)[1]
    assert version.startswith("Version: ldm ")
    assert ours == cli_line.replace("Clip skip: 2, ", "Clip skip: 2, RNG: CPU, ") + ", " + version
    legacy = parse_parameters(cli_line)  # made before RNG was written: read as A1111's default
    assert legacy.kwargs["rng"] == "nv" and legacy.kwargs["pad_conds"] is False
    assert {k: v for k, v in legacy.kwargs.items() if k not in ("rng", "pad_conds")} == {
        k: v for k, v in settings.items() if k != "prompt_syntax"}


@pytest.mark.parametrize("call, error, words", [
    (lambda: format_parameters({**BASE, "num_images": 2}), TypeError, ["num_images"]),
    (lambda: format_parameters({k: v for k, v in BASE.items() if k != "seed"}), ValueError,
     ["Seed"]),
    (lambda: format_parameters({**BASE, "width": None}), ValueError, ["width and height"]),
    (lambda: format_parameters({**BASE, "rng": "gpu"}), ValueError, ["rng"]),
    (lambda: format_parameters({**BASE, "sampler": "nope"}), ValueError, ["nope"]),
    (lambda: format_parameters({**BASE, "prompt": "a\nNegative prompt: b"}), ValueError,
     ["Negative prompt:"]),
    (lambda: format_parameters(BASE, info={"Seed": "3"}), ValueError, ["Seed", "both"]),
    (lambda: format_parameters(BASE, info={"Version": "v1.10.1"}), ValueError, ["Version"]),
    (lambda: format_parameters(BASE, info={"bad, key": "x"}), ValueError, ["bad, key"]),
    (lambda: format_parameters({**BASE, "steps": "20"}), TypeError, ["number"]),
])
def test_format_refuses_what_would_not_read_back(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_parameters_is_a_plain_record():
    p = Parameters({"prompt": "x"})
    assert p.task == "txt2img" and p.loras == () and p.lora_hashes == {}


# ------------------------------------------------------------------ the CLI's use (once wired)
def _cli_takes_from_png():
    import contextlib
    import io

    from ldm import cli
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli.build_parser().parse_args(["txt2img", "--from-png", "x.png"])
    except SystemExit:  # argparse: unrecognized arguments
        return False
    return True


@pytest.mark.slow  # three runs of the shipped model, ~20 s
@pytest.mark.skipif(not _cli_takes_from_png(), reason="--from-png not wired in yet")
def test_cli_regenerates_its_own_png(tmp_path):
    """python -m ldm txt2img --from-png: the same image, bit for bit, and the same text; an
    explicit option overrides the PNG's."""
    import numpy as np
    from PIL import Image

    from ldm import cli
    first, again, other = (tmp_path / f"{name}.png" for name in ("first", "again", "other"))
    cli.main(["txt2img", "a red circle, (big:1.2)", "--negative-prompt", "blue", "--seed", "5",
              "--steps", "2", "--sampler", "euler_a", "--rng", "nv", "--emphasis", "no_norm",
              "--device", "cpu", "--no-progress", "--out", str(first)])
    cli.main(["txt2img", "--from-png", str(first), "--device", "cpu", "--no-progress",
              "--out", str(again)])
    cli.main(["txt2img", "--from-png", str(first), "--seed", "6", "--device", "cpu",
              "--no-progress", "--out", str(other)])
    a, b, c = (Image.open(path) for path in (first, again, other))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert a.info["parameters"] == b.info["parameters"]
    p = parse_parameters(c.info["parameters"])
    assert p.kwargs["seed"] == 6 and p.kwargs["rng"] == "nv"
    assert p.kwargs["emphasis"] == "no_norm" and p.kwargs["negative_prompt"] == "blue"
    assert not np.array_equal(np.asarray(a), np.asarray(c))
