r"""AUTOMATIC1111's "parameters" text, the PNG chunk its "PNG Info" shows: read into ldm's task
keywords (`parse_parameters`), and written from them (`format_parameters`).

    a castle on a hill, (masterpiece:1.2) <lora:castle:0.8>
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768,
    Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "castle: 5e6b",
    Version: v1.10.1                                        (one line in the file)

    p = ldm.parse_parameters(text)
    images = pipe.txt2img(**p.kwargs)         # p.loras: the <lora:…> tags, for pipe.load_lora

The grammar (A1111 modules/infotext_utils.py parse_generation_parameters, processing.py
create_infotext): the last line holds the settings when it has at least three `Key: value`
entries; the lines before it are the prompt, up to a line beginning "Negative prompt:", which
starts the negative prompt. Entries are separated by commas; a value with a comma, colon or
newline is written JSON-quoted ("…"), and a few (Hashes) as a JSON object. A1111 writes an
entry only when it differs from its default.

How each entry maps to the task keywords:
    Steps, CFG scale, Seed       steps, cfg_scale, seed
    CFG interval: LOW-HIGH       cfg_interval=(LOW, HIGH), guidance only at those timesteps
                                 (ldm's own entry; absent: the model's default)
    Size: WxH                    width, height
    Sampler [+ Schedule type]    sampler, schedule (samplers.registry.from_a1111: "DPM++ 2M Karras"
                                 of A1111 < 1.9, or "DPM++ 2M" + "Schedule type: Karras")
    Clip skip                    clip_skip (absent: the model's own, which is A1111's 1)
    Emphasis                     "No norm" -> emphasis="no_norm"; "None" -> prompt_syntax="plain";
                                 absent or "Original": A1111's default, ldm's too; "Comfy" is
                                 ldm's own name for emphasis="comfy", which A1111 lacks
    RNG                          rng: "CPU" -> "cpu", "NV" -> "nv", and "GPU" or absent -> "nv".
                                 Absent means A1111's default, "GPU": torch.randn on the GPU,
                                 on the NVIDIA cards nearly all A1111 images come from exactly
                                 the numbers "nv" computes (ldm.rng). A1111 on a Mac draws on
                                 the CPU under the same label: pass rng="cpu" for those.
    Denoising strength           strength: the image was img2img'd (`Parameters.task`);
                                 with hires-fix entries it is the hires pass's, hires_strength
    Hires upscale, Hires steps,  hires_scale, hires_steps (absent or 0: the first pass's
    Hires upscaler               steps), hires_upscale (`hires.UPSCALERS` by A1111's name:
                                 "Latent", "Latent (bicubic)", …, "Lanczos"; absent: "Latent").
                                 "Size" is then the first pass's, as A1111 writes it. Other
                                 upscalers (ESRGAN, …), "Hires resize" (a target size, not a
                                 factor) and a second pass with its own sampler, guidance or
                                 prompt are unsupported; old A1111's "First pass size" too
    Pad conds                    pad_conds: absent from an A1111 line -> False, A1111's default
                                 (a prompt and negative prompt of different 75-token chunk
                                 counts encoded as they are, guidance in two U-Net calls);
                                 "True" -> ldm's default, padded with empty chunks
    Eta DDIM (DDIM only)         eta
    Refiner switch at            refiner_start, with the refiner's name in `info`
The prompt's `<lora:name:weight>` tags are taken out into `loras` (A1111 removes them before
encoding, lora.prompt_loras); the other entries (Model hash, Model, VAE, Lora hashes, Version,
…) stay in `info`, as written. Matching the files they name is the caller's part.

Never silently: an entry that changes the image in a way ldm does not reproduce (variation
seeds, ENSD with a noisy sampler, token merging, an extension's entry ldm does not
know, …), and an A1111 sampler that runs differently there (DPM2's dropped σ, …), is refused
with a ValueError naming every such entry and why; with strict=False they are a warning
instead, listed in `Parameters.unsupported`. Text that cannot be read (no settings line, a
number that is not one, a missing Seed) is a ValueError either way.

One A1111 behaviour is not an entry and is not reproduced: its img2img samples the encoded
image's posterior from torch's global generator, which it does not seed (processing.py,
StableDiffusionProcessingImg2Img.init), so A1111 itself does not repeat that sample; ldm draws
it from the image's own generator. The posterior's spread is small next to the noise img2img
adds, so images stay close, not identical.

ldm's own lines end with "Version: ldm <version>" and always carry RNG (ldm's default is "CPU",
not A1111's "GPU"); they parse back to the keywords that made them, A1111's sampler
differences aside, since they are ldm's samplers.
"""
import importlib.metadata
import json
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field

from ldm.arguments import check_cfg_interval
from ldm.hires import UPSCALERS
from ldm.lora import prompt_loras
from ldm.rng import check_rng
from ldm.samplers.registry import a1111_names, from_a1111, resolve

NEGATIVE = "Negative prompt:"
REQUIRED = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
RNG_NAMES = {"CPU": "cpu", "NV": "nv", "GPU": "nv"}
EMPHASIS_NAMES = {"Original": {}, "No norm": {"emphasis": "no_norm"},
                  "None": {"prompt_syntax": "plain"}, "Comfy": {"emphasis": "comfy"}}

# A key: word characters, spaces, hyphens and slashes (A1111's), before its colon.
KEY = re.compile(r"\s*(?P<key>\w[\w \-/]*?)\s*:\s*")
# The start of an entry, to tell a settings line from a prompt line as A1111 does.
ENTRY_START = re.compile(r"(?:^|,)\s*\w[\w \-/]*:")

# Entries that change nothing given the same model files, or that ldm reads elsewhere.
INFO_KEYS = {"Model hash", "Model", "VAE hash", "VAE", "Lora hashes", "TI hashes", "Hashes",
             "Version", "User", "Init image hash", "Template", "Negative Template",
             "Cache FP16 weight for LoRA", "Refiner"}

# Entries that change the image in a way ldm does not reproduce, and why.
DIFFERENCES = {
    "Variation seed": "variation seeds (noise slerped with another seed's)",
    "Variation seed strength": "variation seeds (noise slerped with another seed's)",
    "Seed resize from": "noise drawn at another size and pasted centred",
    "ENSD": "eta noise seed delta (the per-step noise drawn from seed + ENSD)",
    "Discard penultimate sigma": "the next-to-last σ dropped from the schedule",
    "Schedule rho": "a Karras schedule with its own ρ",
    "Schedule max sigma": "a schedule with its own σ_max",
    "Schedule min sigma": "a schedule with its own σ_min",
    "Eta": "an ancestral noise scale η other than 1",
    "NGMS": "the negative prompt skipped below a σ (negative guidance minimum sigma)",
    "Token merging ratio": "token merging (ToMe) in the U-Net",
    "Tiling": "seamless tiling (circular padding)",
    "Face restoration": "a face-restoration pass",
    "Downcast alphas_cumprod": "ᾱ rounded to float16",
    "Old prompt editing timelines": "A1111's pre-1.6 prompt-editing timelines",
    "Noise multiplier": "img2img's extra noise multiplier",
    "Conditional mask weight": "an inpainting model's mask-conditioning weight",
    "Image CFG scale": "instruct-pix2pix image guidance",
    "FP8 weight": "U-Net weights in fp8",
    "Sigma churn": "stochastic churn (s_churn)", "Sigma tmin": "stochastic churn (s_tmin)",
    "Sigma tmax": "stochastic churn (s_tmax)", "Sigma noise": "stochastic churn (s_noise)",
    "Mask blur": "A1111's inpainting mask processing", "Masked content": "A1111's inpainting "
    "mask processing", "Inpaint area": "A1111's inpainting mask processing",
    "Hypernet": "a hypernetwork", "Hypernet strength": "a hypernetwork",
}
HIRES = ("Hires ", "First pass size")  # key prefixes of A1111's hires fix
HIRES_WHY = "a hires fix other than ldm's (A1111 before 1.0, or a target size, not a factor)"
HIRES_UPSCALERS = {a1111: name for name, (a1111, *_) in UPSCALERS.items()}
# Hires entries that change nothing when they equal the first pass's entry (A1111 writes them
# only when they differ; others might not).
HIRES_SAME_AS = {"Hires sampler": "Sampler", "Hires schedule type": "Schedule type",
                 "Hires CFG Scale": "CFG scale"}
# Values at which those entries change nothing (A1111 writes some even then).
NEUTRAL = {"ENSD": "0", "Eta": "1", "NGMS": "0", "Token merging ratio": "0",
           "Noise multiplier": "1", "Schedule rho": "0", "Schedule max sigma": "0",
           "Schedule min sigma": "0", "Variation seed strength": "0",
           "Conditional mask weight": "1", "Sigma churn": "0", "Sigma tmin": "0",
           "Sigma noise": "1", "Mask blur": "0", "FP8 weight": "Disable", "Tiling": "False",
           "Discard penultimate sigma": "False", "Downcast alphas_cumprod": "False",
           "Old prompt editing timelines": "False", "Seed resize from": ("-1x-1", "0x0"),
           "Hires resize": "0x0"}
# A1111's samplers that do not run as ldm's do (the A1111 file named in each).
A1111_SAMPLER_DIFFERENCES = {
    "dpm2": "A1111 drops DPM2's next-to-last σ (sd_samplers_kdiffusion.py)",
    "dpm2_a": "A1111 drops DPM2 a's next-to-last σ (sd_samplers_kdiffusion.py)",
    "dpmpp_3m_sde": "A1111 drops DPM++ 3M SDE's next-to-last σ, and seeds its Brownian trees "
                    "with the image seeds on its device",
    "dpmpp_sde": "A1111 seeds DPM++ SDE's Brownian trees with the image seeds on its device",
    "dpmpp_2m_sde": "A1111 seeds DPM++ 2M SDE's Brownian trees with the image seeds on its "
                    "device",
    "unipc": "A1111's UniPC is its own variant (sd_samplers_timesteps.py, uni_pc options)",
}
REFINER_WHY = ("A1111 hands over to the refiner after a share of the steps, ldm at a share of "
               "the noise schedule (diffusers' denoising_end): pass refiner= for a close image")
DOWNCAST_BEFORE = (1, 7, 0, 225)  # A1111 infotext_versions.py: v1.7.0-225 stopped it


@dataclass(frozen=True)
class Parameters:
    """What an A1111 "parameters" text says.

    kwargs: the task's keywords, `pipe.txt2img(**kwargs)` (`img2img` when `task` says so, with
    its image); loras: a `lora.LoRATag` per `<lora:…>` tag of the prompt; info: the other
    entries, as written ({"Model hash": "6ce0161689", …}); unsupported: {entry: why} for what
    changes the image and ldm does not reproduce (filled with strict=False).
    """
    kwargs: dict
    loras: tuple = ()
    info: dict = field(default_factory=dict)
    unsupported: dict = field(default_factory=dict)

    @property
    def task(self):
        """"img2img" when the text has a denoising strength of its own, else "txt2img"."""
        return "img2img" if "strength" in self.kwargs else "txt2img"

    @property
    def lora_hashes(self):
        """{LoRA name: A1111 hash} from the "Lora hashes" entry."""
        pairs = (item.rpartition(":") for item in self.info.get("Lora hashes", "").split(","))
        return {name.strip(): digest.strip() for name, _, digest in pairs if name.strip()}


# ------------------------------------------------------------------------------------ reading
def parse_parameters(text, *, strict=True):
    """The `Parameters` of an A1111 "parameters" text (module docstring).

    Raises ValueError for text that cannot be read, naming what is wrong, and (strict=True)
    for entries ldm cannot reproduce, naming each and why; strict=False warns about those
    instead and lists them in `unsupported`.
    """
    if not isinstance(text, str):
        raise TypeError(f"parameters must be a str, got {type(text).__name__}")
    prompt, negative, line = _split(text)
    entries = _entries(line)
    missing = [key for key in REQUIRED if key not in entries]
    if missing:
        raise ValueError(f"parameters: the settings line has no {', '.join(missing)} (it must "
                         f"give {', '.join(REQUIRED)}): {line[:80]!r}")
    prompt, loras = prompt_loras(prompt)
    kwargs, used, unsupported = _keywords(prompt.strip(), negative, entries)
    if unsupported:
        listing = "; ".join(f"{key}: {why}" for key, why in unsupported.items())
        if strict:
            raise ValueError(f"parameters: ldm does not reproduce {listing} (strict=False to "
                             "generate without them)")
        warnings.warn(f"parameters: ignoring what ldm does not reproduce: {listing}",
                      stacklevel=2)
    info = {key: value for key, value in entries.items() if key not in used}
    return Parameters(kwargs, tuple(loras), info, unsupported)


def _split(text):
    """(prompt, negative prompt, settings line) of the text, lines stripped as A1111 does."""
    lines = [line.strip() for line in text.strip().split("\n")]
    settings = lines.pop()
    if len(ENTRY_START.findall(settings)) < 3:
        raise ValueError("parameters: no settings line (the last line must read like "
                         f"'Steps: 20, Sampler: Euler a, CFG scale: 7, …'), got {settings[:80]!r}")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative, line = True, line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), settings


def _entries(line):
    """{key: value} of a settings line, in order. Text that is no `Key: value` counts as a key
    whose value is itself (A1111 writes an entry whose value equals its key as the bare key)."""
    entries, position = {}, 0
    while position < len(line):
        match = KEY.match(line, position)
        if match is None:
            end = _comma(line, position)
            key = value = line[position:end].strip()
        else:
            key = match["key"]
            value, end = _value(line, match.end())
        if key:
            if entries.get(key, value) != value:
                raise ValueError(f"parameters: {key} is given twice, {entries[key]!r} and "
                                 f"{value!r}")
            entries[key] = value
        position = end + 1
    return entries


def _value(line, start):
    """(the value starting at `start`, the index of the comma ending it or len(line)). A value
    opening with a quote or brace is JSON (a JSON object stays its JSON text)."""
    if line[start:start + 1] not in ('"', "{"):
        end = _comma(line, start)
        return line[start:end].strip(), end
    try:
        value, end = json.JSONDecoder().raw_decode(line, start)
    except json.JSONDecodeError as e:
        raise ValueError(f"parameters: unreadable quoted value {line[start:start + 40]!r}… "
                         f"({e.msg})") from None
    after = _comma(line, end)
    if line[end:after].strip():
        raise ValueError(f"parameters: text after a quoted value: {line[start:after]!r}")
    return (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)), after


def _comma(line, start):
    end = line.find(",", start)
    return len(line) if end < 0 else end


def _keywords(prompt, negative, entries):
    """(task keywords, the entries they used, {entry: why} ldm does not reproduce)."""
    used = set(REQUIRED)
    width, height = _size(entries["Size"])
    kwargs = {"prompt": prompt, "negative_prompt": negative,
              "steps": _integer("Steps", entries["Steps"], 1),
              "cfg_scale": _number("CFG scale", entries["CFG scale"]),
              "seed": _integer("Seed", entries["Seed"]), "width": width, "height": height}
    unsupported = {}
    from_ldm = entries.get("Version", "").startswith("ldm")
    entry = _sampler(entries, kwargs, used, unsupported, from_ldm)
    _prompt_options(entries, kwargs, used, unsupported)
    _pad_conds(entries, kwargs, used, unsupported, from_ldm)
    _noise_options(entries, kwargs, used, unsupported, entry)
    _hires_options(entries, kwargs, used, unsupported)
    if "CFG interval" in entries:
        used.add("CFG interval")
        kwargs["cfg_interval"] = _interval("CFG interval", entries["CFG interval"])
    if "Refiner switch at" in entries:
        used.add("Refiner switch at")
        kwargs["refiner_start"] = _number("Refiner switch at", entries["Refiner switch at"],
                                          0, 1)
    if "Refiner" in entries and not from_ldm:
        unsupported["Refiner"] = REFINER_WHY
    for key, value in entries.items():
        why = _difference(key, value, entries, entry)
        if why and key not in used:
            unsupported.setdefault(key, why)
    if not from_ldm and _version(entries.get("Version")) < DOWNCAST_BEFORE:
        unsupported["Version"] = (f"{entries['Version']}: A1111 before 1.7.0-225 rounded ᾱ to "
                                  "float16 ('Downcast alphas_cumprod')")
    return kwargs, used, unsupported


def _sampler(entries, kwargs, used, unsupported, from_ldm):
    """Set sampler and schedule from "Sampler" and "Schedule type"; the registry entry or None."""
    schedule_type = entries.get("Schedule type")
    used.add("Schedule type")
    try:
        entry, schedule = from_a1111(entries["Sampler"], schedule_type)
    except ValueError as e:
        unsupported["Sampler"] = str(e)
        used.discard("Sampler")
        used.discard("Schedule type")
        return None
    kwargs.update(sampler=entry.name, schedule=schedule)
    if entry.name in A1111_SAMPLER_DIFFERENCES and not from_ldm:
        unsupported["Sampler"] = A1111_SAMPLER_DIFFERENCES[entry.name]
    return entry


def _prompt_options(entries, kwargs, used, unsupported):
    """clip_skip, and emphasis or prompt_syntax from "Emphasis"."""
    if "Clip skip" in entries:
        used.add("Clip skip")
        kwargs["clip_skip"] = _integer("Clip skip", entries["Clip skip"], 1)
    if "Emphasis" in entries:
        name = entries["Emphasis"]
        if name in EMPHASIS_NAMES:
            used.add("Emphasis")
            kwargs.update(EMPHASIS_NAMES[name])
        else:
            unsupported["Emphasis"] = (f"emphasis {name!r} (ldm has "
                                       f"{', '.join(EMPHASIS_NAMES)})")


def _pad_conds(entries, kwargs, used, unsupported, from_ldm):
    """pad_conds=False unless "Pad conds: True" (A1111's default; an ldm line's is ldm's)."""
    value = entries.get("Pad conds", "True" if from_ldm else "False")
    if value not in ("True", "False"):
        unsupported["Pad conds"] = f"{value!r} (True or False)"
        return
    used.add("Pad conds")
    if value == "False":
        kwargs["pad_conds"] = False


def _noise_options(entries, kwargs, used, unsupported, entry):
    """rng, strength (not a hires pass's), and DDIM's eta."""
    name = entries.get("RNG", "GPU")
    if name in RNG_NAMES:
        used.add("RNG")
        kwargs["rng"] = RNG_NAMES[name]
    else:
        unsupported["RNG"] = f"random source {name!r} (ldm has CPU, NV, and GPU read as NV)"
    hires = any(key.startswith(HIRES) for key in entries)
    if "Denoising strength" in entries and not hires:
        used.add("Denoising strength")
        kwargs["strength"] = _number("Denoising strength", entries["Denoising strength"], 0, 1)
    if entry is not None and entry.takes_eta:
        # older A1111 wrote DDIM's η as "Eta" (ancestral samplers' η has the same key), newer
        # versions as "Eta DDIM"
        for key in ("Eta", "Eta DDIM"):
            if key in entries:
                used.add(key)
                kwargs["eta"] = _number(key, entries[key], 0)


def _hires_options(entries, kwargs, used, unsupported):
    """hires_scale, hires_strength, hires_steps and hires_upscale from A1111's hires fix."""
    if "Hires upscale" not in entries:
        return  # no hires pass, or one ldm does not run (_difference names its entries)
    scale = _number("Hires upscale", entries["Hires upscale"], 0)
    upscaler = entries.get("Hires upscaler", "Latent")
    if scale <= 1:
        unsupported["Hires upscale"] = f"a hires pass at scale {scale:g} (ldm's is above 1)"
    elif upscaler not in HIRES_UPSCALERS:
        unsupported["Hires upscaler"] = (f"upscaler {upscaler!r} (ldm has "
                                         f"{', '.join(HIRES_UPSCALERS)})")
    else:
        used.update({"Hires upscale", "Hires upscaler"})
        kwargs.update(hires_scale=scale, hires_upscale=HIRES_UPSCALERS[upscaler])
        if "Denoising strength" in entries:
            used.add("Denoising strength")
            kwargs["hires_strength"] = _number("Denoising strength",
                                               entries["Denoising strength"], 0, 1)
        if "Hires steps" in entries:
            used.add("Hires steps")
            steps = _integer("Hires steps", entries["Hires steps"], 0)
            if steps:  # 0: A1111's "as many as the first pass"
                kwargs["hires_steps"] = steps
    for key, first in HIRES_SAME_AS.items():
        if key in entries and entries[key] == entries.get(first):
            used.add(key)


def _difference(key, value, entries, entry):
    """Why entry `key` changes the image in a way ldm does not reproduce, or None."""
    if key in INFO_KEYS or key in ("Eta DDIM", "Schedule type") or _neutral(key, value):
        return None  # (an unknown sampler's schedule type: "Sampler" names the difference)
    if key in ("Hires prompt", "Hires negative prompt"):
        return "a hires pass with a prompt of its own"
    if key in HIRES_SAME_AS or key == "Hires checkpoint":
        return f"a hires pass with a {key[len('Hires '):]} of its own"
    if key.startswith(HIRES):
        return HIRES_WHY
    if key == "Denoising strength":
        return None  # a hires pass's: the hires entries name the difference
    if key == "Variation seed" and _neutral("Variation seed strength",
                                            entries.get("Variation seed strength", "0")):
        return None
    if key == "ENSD" and entry is not None and not entry.noisy:
        return None  # only the per-step noise comes from seed + ENSD
    return DIFFERENCES.get(key, "an entry ldm does not know (an extension's?), which may "
                                "change the image")


def _neutral(key, value):
    neutral = NEUTRAL.get(key)
    if neutral is None:
        return False
    if isinstance(neutral, tuple):
        return value in neutral
    try:
        return float(value) == float(neutral)
    except ValueError:
        return value == neutral


def _version(text):
    """A1111's "Version" as (major, minor, patch, commits after the tag; -1 for a release
    candidate); None or unreadable (Forge's, ldm's) reads as new: A1111's own rule."""
    match = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:-(\w+))?", text or "")
    if match is None:
        return (math.inf,)
    major, minor, patch, suffix = match.groups()
    after = int(suffix) if suffix and suffix.isdigit() else (-1 if suffix else 0)
    return int(major), int(minor), int(patch or 0), after


def _integer(key, text, minimum=None):
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"parameters: {key}: {text!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"parameters: {key}: must be at least {minimum}, got {value}")
    return value


def _number(key, text, low=-math.inf, high=math.inf):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"parameters: {key}: {text!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"parameters: {key}: must be in [{low}, {high}], got {value}")
    return value


def _interval(key, text):
    match = re.fullmatch(r"([^-]+)-([^-]+)", text)
    if match is None:
        raise ValueError(f"parameters: {key}: {text!r} is not LOW-HIGH in timesteps")
    low, high = _number(key, match[1]), _number(key, match[2])
    try:
        return check_cfg_interval((low, high))
    except ValueError as e:
        raise ValueError(f"parameters: {key}: {e}") from None


def _size(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise ValueError(f"parameters: Size: {text!r} is not WIDTHxHEIGHT in pixels")
    return int(match[1]), int(match[2])


# ------------------------------------------------------------------------------------ writing
SETTINGS = {"prompt", "negative_prompt", "steps", "sampler", "schedule", "cfg_scale",
            "cfg_interval", "seed", "width", "height", "clip_skip", "prompt_syntax", "emphasis",
            "strength", "eta", "rng", "refiner_start", "hires_scale", "hires_strength",
            "hires_steps", "hires_upscale", "pad_conds"}
# A1111's order of the entries (processing.py create_infotext); info's others follow.
# "CFG interval" is ldm's own, beside the scale it qualifies.
ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "CFG interval", "Seed", "Size",
         "Model hash", "Model", "VAE hash", "VAE", "Denoising strength", "Clip skip", "RNG",
         "Eta DDIM", "Refiner", "Refiner switch at", "Emphasis", "Pad conds", "Hires upscale",
         "Hires steps", "Hires upscaler")
LAST = ("Lora hashes", "Version")


def format_parameters(settings, *, loras=(), info=None):
    """The A1111 "parameters" text of `settings` (the task keywords of `Parameters.kwargs`:
    prompt, negative_prompt, steps, sampler, schedule, cfg_scale, seed, width, height and the
    optional cfg_interval, clip_skip, prompt_syntax, emphasis, pad_conds, strength, eta, rng,
    refiner_start, and the
    hires_* of txt2img's hires fix, whose width and height are the first pass's), the
    LoRAs merged (`lora.Loaded` or `LoRATag`: name, multiplier, text_multiplier, and a
    `hash` to write "Lora hashes") and `info`, other entries written as given (Model hash,
    Model, Refiner, …).

    `parse_parameters` reads the text back to the same settings, with defaults that change
    nothing left out: A1111's emphasis and syntax, η for a sampler without one, refiner_start
    without a "Refiner" in info. An entry comes from `settings` or from `info`, not both
    (ValueError). The line is an ldm image's: "Version: ldm <version>", which tells
    parse_parameters not to apply A1111's sampler differences (info may not give a Version).
    """
    unknown = set(settings) - SETTINGS
    if unknown:
        raise TypeError(f"format_parameters: unknown setting(s) {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(SETTINGS))}")
    info = {key: str(value) for key, value in (info or {}).items()}
    for key in info:
        if not re.fullmatch(r"\w[\w \-/]*", key):
            raise ValueError(f"format_parameters: info key {key!r} is not an A1111 key (word "
                             "characters, spaces, - and /)")
    written = _settings_entries(settings, info, loras)
    clash = set(written) & set(info)
    if clash:
        raise ValueError(f"format_parameters: {', '.join(sorted(clash))} given both in settings "
                         "and in info")
    if "Version" in info:
        raise ValueError("format_parameters: info may not give Version: the line is ldm's "
                         "(\"Version: ldm …\"), whatever made the settings")
    entries = {**written, **info, "Version": f"ldm {_ldm_version()}"}
    missing = [key for key in REQUIRED if key not in entries]
    if missing:
        raise ValueError(f"format_parameters: settings must give {', '.join(missing)}")
    keys = [k for k in ORDER if k in entries] + [k for k in entries
                                                 if k not in ORDER and k not in LAST]
    line = ", ".join(f"{key}: {_quote(entries[key])}" for key in keys + [k for k in LAST
                                                                          if k in entries])
    prompt = " ".join(filter(None, [settings.get("prompt", ""), *map(_tag, loras)]))
    return "\n".join(filter(None, [_check_prompt(prompt), _negative(settings), line]))


def _settings_entries(settings, info, loras):
    """{A1111 key: text} of what `settings` gives."""
    entries = {}
    if "steps" in settings:
        entries["Steps"] = _text(settings["steps"])
    if "sampler" in settings:
        entry, schedule = resolve(getattr(settings["sampler"], "name", settings["sampler"]),
                                  settings.get("schedule"))
        entries["Sampler"], schedule_type = a1111_names(entry, schedule)
        if schedule_type:
            entries["Schedule type"] = schedule_type
        if entry.takes_eta and settings.get("eta"):
            entries["Eta DDIM"] = _text(settings["eta"])
    for key, name in (("CFG scale", "cfg_scale"), ("Seed", "seed"),
                      ("Denoising strength", "strength"), ("Clip skip", "clip_skip")):
        if settings.get(name) is not None:
            entries[key] = _text(settings[name])
    if settings.get("cfg_interval") is not None:
        low, high = check_cfg_interval(settings["cfg_interval"])
        entries["CFG interval"] = f"{_short(low)}-{_short(high)}"
    entries.update(_hires_entries(settings))
    if "width" in settings or "height" in settings:
        if settings.get("width") is None or settings.get("height") is None:
            raise ValueError("format_parameters: settings must give both width and height")
        entries["Size"] = f"{_text(settings['width'])}x{_text(settings['height'])}"
    if "rng" in settings or "RNG" not in info:  # ldm's default, "cpu", is not A1111's
        entries["RNG"] = {"cpu": "CPU", "nv": "NV"}[check_rng(settings.get("rng", "cpu"))]
    emphasis = _emphasis(settings)
    if emphasis:
        entries["Emphasis"] = emphasis
    if settings.get("pad_conds", True) is False:  # ldm's default pads; A1111's does not
        entries["Pad conds"] = "False"
    if "Refiner" in info and settings.get("refiner_start") is not None:
        entries["Refiner switch at"] = _text(settings["refiner_start"])
    hashes = [f"{lora.name}: {lora.hash}" for lora in loras if getattr(lora, "hash", None)]
    if hashes:
        entries["Lora hashes"] = ", ".join(hashes)
    return entries


def _hires_entries(settings):
    """A1111's entries of the hires fix: "Hires upscale", "Hires steps" (when given), "Hires
    upscaler", and "Denoising strength" (the hires pass's)."""
    hires = {key for key in settings if key.startswith("hires_")}
    if not hires:
        return {}
    if "hires_scale" not in hires:
        raise ValueError(f"format_parameters: {', '.join(sorted(hires))} without hires_scale")
    if "strength" in settings:
        raise ValueError("format_parameters: strength (img2img's) and a hires fix: A1111's "
                         "'Denoising strength' would be both")
    upscale = settings.get("hires_upscale", "latent")
    if upscale not in UPSCALERS:
        raise ValueError(f"format_parameters: hires_upscale {upscale!r} is not one of "
                         f"{', '.join(UPSCALERS)}")
    entries = {"Hires upscale": _short(_number_setting(settings["hires_scale"])),
               "Hires upscaler": UPSCALERS[upscale][0]}
    if settings.get("hires_steps") is not None:
        entries["Hires steps"] = _text(settings["hires_steps"])
    if settings.get("hires_strength") is not None:
        entries["Denoising strength"] = _text(settings["hires_strength"])
    return entries


def _emphasis(settings):
    """A1111's "Emphasis" name for prompt_syntax / emphasis; None for its default."""
    if settings.get("prompt_syntax", "a1111") == "plain":
        return "None"
    wanted = {"emphasis": settings.get("emphasis", "original")}
    return next((name for name, options in EMPHASIS_NAMES.items()
                 if options == wanted and name != "Original"), None)


def _tag(lora):
    """`<lora:name:weight>` as A1111 writes it, `<lora:name:te:unet>` when the text encoders'
    weight differs from the U-Net's."""
    weights = [lora.text_multiplier] + ([lora.multiplier]
                                        if lora.multiplier != lora.text_multiplier else [])
    return f"<lora:{lora.name}:{':'.join(map(_short, weights))}>"


def _negative(settings):
    negative = settings.get("negative_prompt", "")
    return f"{NEGATIVE} {negative}" if negative else ""


def _check_prompt(prompt):
    if any(line.strip().startswith(NEGATIVE) for line in prompt.split("\n")):
        raise ValueError(f"format_parameters: a prompt line may not begin with {NEGATIVE!r}, "
                         "which would start the negative prompt")
    return prompt


def _number_setting(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"format_parameters: a number expected, got {value!r}")
    return value


def _text(value):
    """A number as Python writes it, which reads back to the same number (7.0 -> "7.0")."""
    return str(_number_setting(value))


def _short(value):
    """A number as A1111 users write a LoRA weight or an upscale factor: 0.8, 1, 2 (Python's
    text when %g would round)."""
    short = f"{value:g}"
    return short if float(short) == value else _text(value)


def _quote(value):
    """A1111's quoting: JSON for a value with a comma, colon or newline."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value


def _ldm_version():
    try:
        return importlib.metadata.version("ldm")
    except importlib.metadata.PackageNotFoundError:
        return "dev"
