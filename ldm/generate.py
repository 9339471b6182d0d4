"""Generation at scale: a file of prompts -> a folder of PNGs and a manifest, across processes,
restartable. The way to make 10 000 images for an evaluation.

    python -m ldm.generate --prompts prompts.txt --out DIR [--ckpt FILE] [--num-images N] …
    torchrun --nproc_per_node 8 -m ldm.generate --prompts prompts.jsonl --out DIR …

    summary = ldm.generate.generate(ldm.load(), ["a red circle", {"prompt": "a blue square",
                                                 "steps": 10}], "out/", num_images=4)

Prompts: one per line (blank lines are skipped), or, in a file named *.jsonl, one JSON object
per line: {"prompt": "a red circle", "steps": 10, "cfg_scale": 5, …}, the prompt plus any of
txt2img's keyword arguments a file can hold (LINE_KEYS: negative_prompt, steps, sampler,
schedule, cfg_scale, cfg_interval ([low, high]), height, width, num_images, seed, eta; rng,
clip_skip, prompt_syntax, emphasis, pad_conds, which reproducing AUTOMATIC1111's images takes;
and the hires fix's hires_scale, hires_strength, hires_steps, hires_upscale). The command line's
values are every line's defaults, txt2img's and the model's own (config.sampling, image_size)
theirs; hires_* without a hires_scale is an error, as they would change nothing. A line that is
no JSON object, an unknown key, or a value of the wrong type or range is a ValueError naming the
file, the line and the key, raised before the model loads.

LoRAs: A1111's `<lora:name:m>` tags in a prompt merge the LoRA file `name` of --lora-dir
(`lora_dir=`) while that prompt's images are made (ldm.lora.tags_applied), as txt2img does.
Images whose prompts name the same LoRAs at the same multipliers are batched together; the
record gives each LoRA's A1111 hash ("lora_hashes"), so a LoRA file changed between two runs is
a changed setting, not a skipped image. Every tag's file is found before the first image.

Seeds: image i of prompt k (both from 0; k counts prompts, not lines) takes seed
    base + k · N + i            base = --seed (default 0), N = --num-images (default 1),
or s + i when its line gives its own "seed" s. An image's seed depends on nothing else: not the
batch size, the process count, nor what was made before. A line asking for more than N images
must give its own seed, or its seeds would run into the next prompt's.

Files: DIR/{k:06d}-{i:03d}.png, each carrying its record (below) as the PNG text "ldm_generate"
and AUTOMATIC1111's "parameters" line. A PNG is written to a temporary file and renamed into
place (ldm.outputs.write_png), so it is complete or absent.

Restart: an image whose file is there with the same record is skipped, so a run interrupted and
started again ends with the set an uninterrupted one makes. A file there with another record
(another prompt, seed, setting or model) is a ValueError naming it: never replaced, never mixed.

Batches: images whose settings agree (all but prompt, negative prompt and seed) are grouped in
prompt order and cut into batches of --batch-size; each image draws its noise from a generator
of its own seed. The networks' arithmetic still rounds differently for different batch shapes
(tests/test_seeds.py), so the batches are fixed by the prompts and the batch size alone: a
process count or a restart never changes which images are computed together (a batch with any
image missing is computed again whole, and only the missing ones written). Same prompts, batch
size, model, device type and dtype: byte-identical PNGs.

Processes: under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) process r of W takes
batches r, r + W, r + 2W, … of the whole plan, whatever is already there, so no two processes
ever make the same image. They never communicate: no process group is created, so neither NCCL
nor gloo is needed. On CUDA each process uses GPU LOCAL_RANK; on the CPU each takes
cpu_count / LOCAL_WORLD_SIZE threads.

Manifest: a record per image, {"file", "prompt", "negative_prompt", "seed", "prompt_index",
"image", "line", "steps", "sampler", "schedule", "cfg_scale", "cfg_interval", "eta", "height",
"width", "rng", "clip_skip", "prompt_syntax", "emphasis", "pad_conds", "hires_scale",
"hires_strength", "hires_steps", "hires_upscale", "lora_hashes", "model", "model_sha256"} (the
prompt as written, tags included; height and width are the first pass's under a hires fix, as
A1111 writes them; a record written before a key existed reads as that key's default,
RECORD_DEFAULTS). Each process appends the records of the images it writes to
DIR/manifest-rank{r}.jsonl (with "rank", "world_size", "device", "dtype", "time"); a process
that finds every image of the plan present writes DIR/manifest.jsonl, all records in prompt
order, through a temporary file (several processes finishing together write the same bytes).
`read_manifest(DIR)` merges the rank files (one record per file, the last written).
"""
import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ldm import arguments, hires, lora, parameters, prompts as prompt_lib, samplers
from ldm.checkpoint import CheckpointError
from ldm.outputs import remove_stale_temporaries, write_png
from ldm.config import PRESETS
from ldm.loader import DEFAULT_CHECKPOINT, load
from ldm.rng import RNGS, generator as seeded_generator
from ldm.samplers.registry import sampler_names

log = logging.getLogger(__name__)

HIRES_KEYS = ("hires_scale", "hires_strength", "hires_steps", "hires_upscale")
PROMPT_KEYS = ("clip_skip", "prompt_syntax", "emphasis", "pad_conds")  # how a prompt is read
# txt2img's keyword arguments that a prompts file can hold (tests/test_generate.py checks that
# txt2img takes each); the others are objects, not values.
LINE_KEYS = ("negative_prompt", "steps", "sampler", "schedule", "cfg_scale", "cfg_interval",
             "height", "width", "num_images", "seed", "eta", "rng", *PROMPT_KEYS, *HIRES_KEYS)
# Record keys added after the first release, with the value a record without them meant: an
# image made before is no other image for lacking them.
RECORD_DEFAULTS = {"rng": "cpu", "clip_skip": None, "prompt_syntax": "a1111",
                   "emphasis": "original", "pad_conds": True, **dict.fromkeys(HIRES_KEYS),
                   "cfg_interval": None}
NOT_IN_FILES = ("generator", "latents", "output_type", "callback", "progress", "refiner")
RECORD_KEY = "ldm_generate"  # the PNG text chunk holding an image's record
SEED_END = 2**64             # torch.Generator.manual_seed takes seeds in [0, 2**64)
SIZE_MULTIPLE = 8            # the SD VAEs downsample by 8 (the pipeline checks its own factor)
DESCRIPTION = ("Generate images for every prompt of a file (one a line, or JSON objects with "
               "their own settings in a .jsonl), across processes (torchrun), skipping the "
               "images already there.")
RUN_KEYS = ("rank", "world_size", "device", "dtype", "time")  # in the rank manifests only
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


# ---------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """One prompt of the file: its text, its own settings (LINE_KEYS, checked), and where it
    stands (`where`: "prompts.jsonl:3", for messages; `line`: the file's line number)."""
    text: str
    options: dict
    line: int
    where: str


def read_prompts(path):
    """The prompts of a file: one per line, or JSON objects per line in a .jsonl file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"prompts file {path} does not exist (prompts themselves are "
                                "given as a list)") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            where = f"{path}:{number}"
            item = _json_line(line, where) if jsonl else line.strip()
            prompts.append(to_prompt(item, where, number))
    if not prompts:
        raise ValueError(f"{path}: holds no prompt")
    return prompts


def to_prompt(item, where, line=0):
    """A Prompt from a string or a {"prompt": …, setting: value, …} dict, every key and value
    checked (ValueError or TypeError naming `where` and the key)."""
    if isinstance(item, str):
        return Prompt(item, {}, line, where)
    if not isinstance(item, dict):
        raise TypeError(f"{where}: a prompt is a string or an object with a \"prompt\", got "
                        f"{type(item).__name__}")
    for key in item:
        if key != "prompt" and key not in LINE_KEYS:
            hint = (" (an object, not a value a file can hold)" if key in NOT_IN_FILES else "")
            raise ValueError(f"{where}: unknown key {key!r}{hint}; a prompt takes \"prompt\" and "
                             + ", ".join(LINE_KEYS))
    if not isinstance(item.get("prompt"), str):
        problem = "has no" if "prompt" not in item else "needs a string as its"
        raise ValueError(f"{where}: {problem} \"prompt\"")
    options = {key: check_option(key, value, f"{where}: {key}")
               for key, value in item.items() if key != "prompt" and value is not None}
    return Prompt(item["prompt"], options, line, where)


def _json_line(line, where):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from e


def check_option(key, value, name):
    """One setting (a LINE_KEYS key) checked as txt2img will; `name` heads the message."""
    def fail(problem):
        return ValueError(f"{name}: {problem}, got {value!r}")
    if key == "negative_prompt":
        if not isinstance(value, str):
            raise fail("must be a string")
        return value
    choices = {"sampler": sampler_names(), "schedule": list(samplers.SCHEDULES), "rng": RNGS,
               "prompt_syntax": prompt_lib.SYNTAXES, "emphasis": prompt_lib.EMPHASES,
               "hires_upscale": list(hires.UPSCALERS)}
    if key in choices:
        if value not in choices[key]:
            raise fail("must be one of " + ", ".join(choices[key]))
        return value
    if key == "pad_conds":
        if not isinstance(value, bool):
            raise fail("must be true or false")
        return value
    try:
        if key == "cfg_scale":
            return arguments.check_cfg_scale(value)
        if key == "cfg_interval":
            return arguments.check_cfg_interval(value)
        if key == "eta":
            return arguments.check_eta(value)
        if key == "hires_scale":
            return hires.Hires.check(value, hires.DEFAULT_STRENGTH, None, "latent").scale
        if key == "hires_strength":
            return arguments.check_float(key, value, 0, 1, low_open=True)
        value = arguments.check_int(key, value, minimum=0 if key == "seed" else 1)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from e
    if key == "seed" and value >= SEED_END:
        raise fail("must be below 2**64")
    if key in ("height", "width") and value % SIZE_MULTIPLE:
        raise fail(f"must be a multiple of {SIZE_MULTIPLE}")
    return value


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Job:
    """One image to make: its prompt, seed and settings (txt2img's keyword arguments)."""
    prompt_index: int
    image: int
    line: int
    prompt: str
    negative_prompt: str
    seed: int
    # ((name, value), …): txt2img's settings, every LINE_KEYS key but negative_prompt and seed
    # (fields of their own) and num_images (which made the jobs)
    settings: tuple
    loras: tuple = ()  # (LoRATag, A1111 hash) of each <lora:…> tag of the prompt, sorted

    @property
    def file(self):
        return f"{self.prompt_index:06d}-{self.image:03d}.png"

    def record(self, model=None, model_sha256=None):
        """What makes this image, as the manifest and its PNG hold it."""
        return {"file": self.file, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "seed": self.seed, "prompt_index": self.prompt_index, "image": self.image,
                "line": self.line,
                **{key: list(v) if isinstance(v, tuple) else v for key, v in self.settings},
                "lora_hashes": ", ".join(f"{tag.name}: {h}" for tag, h in self.loras) or None,
                "model": model, "model_sha256": model_sha256}


def plan(pipe, prompts, *, seed=0, num_images=1, lora_dir=None, **defaults):
    """Every image of `prompts` (Prompt list), in prompt order, each with its seed and its
    settings resolved: the prompt's own, else `defaults` (LINE_KEYS), else the model's; and the
    LoRA files its `<lora:…>` tags name in `lora_dir`, found and hashed."""
    jobs, hashes = [], {}
    for k, prompt in enumerate(prompts):
        options = {**{key: v for key, v in defaults.items() if v is not None}, **prompt.options}
        if options.get("hires_scale") is None:  # defaults' hires_* serve the prompts that use it
            options = {key: v for key, v in options.items()
                       if key not in HIRES_KEYS or key in prompt.options}
        count = options.pop("num_images", num_images)
        first = options.pop("seed", None)
        if first is None:
            if count > num_images:
                raise ValueError(f"{prompt.where}: num_images {count} is more than the "
                                 f"{num_images} images of every prompt (--num-images), so its "
                                 "seeds would run into the next prompt's: give it its own "
                                 "\"seed\", or raise --num-images")
            first = seed + k * num_images
        if first + count > SEED_END:
            raise ValueError(f"{prompt.where}: seeds {first} … {first + count - 1} go past "
                             "2**64 - 1")
        negative = options.pop("negative_prompt", "")
        settings = tuple(_settings(pipe, options, prompt.where).items())
        loras = _loras(prompt, negative, lora_dir, hashes)
        jobs += [Job(k, i, prompt.line, prompt.text, negative, first + i, settings, loras)
                 for i in range(count)]
    _check_hires_defaults(prompts, defaults)
    return jobs


def _check_hires_defaults(prompts, defaults):
    """hires_* defaults serve the prompts with a hires_scale: refused when no prompt has one."""
    unused = [key for key in HIRES_KEYS if defaults.get(key) is not None]
    if unused and not any(prompt.options.get("hires_scale", defaults.get("hires_scale"))
                          for prompt in prompts):
        raise ValueError(f"{', '.join(unused)} given, but no prompt has a hires_scale: they "
                         "would change nothing")


def _loras(prompt, negative, lora_dir, hashes):
    """((LoRATag, hash), …) of the prompt's `<lora:…>` tags, sorted; `hashes` caches the
    hash of each file (path -> hash) across prompts."""
    tags, paths = _lora_files(prompt, negative, lora_dir)
    for path in paths:
        if path not in hashes:
            hashes[path] = lora.file_hash(path)
    pairs = [(tag, hashes[path]) for tag, path in zip(tags, paths)]
    return tuple(sorted(pairs, key=lambda pair: (pair[0].name, pair[0].text_multiplier,
                                                 pair[0].multiplier)))


def _lora_files(prompt, negative, lora_dir):
    """([LoRATag], [path]): the prompt's `<lora:…>` tags and the files of `lora_dir` they name;
    errors name the prompt's place."""
    if lora.LORA_TAG.search(negative):
        raise ValueError(f"{prompt.where}: negative_prompt: <lora:…> tags are read in the "
                         "prompt only (as A1111)")
    try:
        _, tags = lora.prompt_loras(prompt.text)
        if tags and lora_dir is None:
            raise ValueError(f"<lora:…> tags name {', '.join(t.name for t in tags)}: give the "
                             "folder of LoRA files (--lora-dir, lora_dir=)")
        paths = [lora.find_lora(tag.name, lora_dir) for tag in tags]
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{prompt.where}: {e}") from e
    return tags, paths


def _settings(pipe, options, where):
    """txt2img's settings for one prompt, its and the model's defaults filled in."""
    sampling, size = pipe.config.sampling, pipe.config.image_size
    try:
        entry, schedule = samplers.resolve(options.get("sampler", sampling.sampler),
                                           options.get("schedule"))
        steps = options.get("steps", sampling.steps)
        samplers.timesteps(entry, schedule, steps, pipe.alphas_cumprod)  # steps it can take
        pipe.clip_skip_layers(options.get("clip_skip"))  # SD 1.x's CLIP only, its block count
        upscaling = _hires(options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return {"steps": steps, "sampler": entry.name, "schedule": schedule,
            "cfg_scale": options.get("cfg_scale", sampling.cfg_scale),
            "cfg_interval": arguments.check_cfg_interval(options.get("cfg_interval",
                                                                     sampling.cfg_interval)),
            "eta": options.get("eta", 0.0), "height": options.get("height", size),
            "width": options.get("width", size),
            **{key: options.get(key, default) for key, default in RECORD_DEFAULTS.items()
               if key not in HIRES_KEYS and key != "cfg_interval"},
            **upscaling}


def _hires(options):
    """The hires_* settings, checked together and filled in (all None when hires is off)."""
    if options.get("hires_scale") is None:
        given = [key for key in HIRES_KEYS if key in options]
        if given:
            raise ValueError(f"{', '.join(given)} without hires_scale would change nothing: "
                             "give hires_scale (> 1) to turn the hires fix on")
        return dict.fromkeys(HIRES_KEYS)
    upscaling = hires.Hires.check(
        options["hires_scale"], options.get("hires_strength", hires.DEFAULT_STRENGTH),
        options.get("hires_steps"), options.get("hires_upscale", "latent"))
    return dict(zip(HIRES_KEYS, (upscaling.scale, upscaling.strength, upscaling.steps,
                                 upscaling.upscaler)))


def batches(jobs, batch_size):
    """The jobs cut into batches of at most `batch_size` sharing their settings and LoRAs:
    grouped by both in order of first appearance, each group in prompt order."""
    batch_size = arguments.check_int("batch_size", batch_size, minimum=1)
    groups = {}
    for job in jobs:
        groups.setdefault((job.settings, job.loras), []).append(job)
    return [group[i:i + batch_size] for group in groups.values()
            for i in range(0, len(group), batch_size)]


# ---------------------------------------------------------------- making the images
@dataclass
class Summary:
    """What one process did: images made and found already there, its batches, the time."""
    made: int = 0
    skipped: int = 0
    batches: int = 0
    seconds: float = 0.0
    complete: bool = False  # every image of the plan is there, and manifest.jsonl written


def generate(pipe, prompts, out, *, seed=0, num_images=1, batch_size=8, rank=None,
             world_size=None, model=None, lora_dir=None, **defaults):
    """Make this process's share of the images of `prompts` in the folder `out`; returns a
    Summary.

    prompts: a prompts file (path), or a list of strings, {"prompt": …, setting: …} dicts and
    Prompts (`read_prompts`).
    seed, num_images: the seed rule's base and N (module docstring). batch_size: images per
    txt2img call. rank, world_size: this process's share (default: the environment's RANK and
    WORLD_SIZE, as torchrun sets them; else 0 of 1). model: the checkpoint file, named in the
    records with its SHA-256 (None: the pipe's own origin is not recorded). lora_dir: the
    folder of the LoRA files that `<lora:name:m>` tags in the prompts name. defaults: txt2img
    settings for every prompt (LINE_KEYS), each prompt's own taking precedence.
    """
    if rank is None or world_size is None:
        rank, world_size, _ = shard()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, "
                         f"world_size={world_size}")
    prompts = _prompts(prompts)
    unknown = sorted(set(defaults) - set(LINE_KEYS))
    if unknown:
        raise TypeError(f"generate() got unknown settings {unknown}; it takes "
                        + ", ".join(LINE_KEYS))
    defaults = {key: check_option(key, value, key) for key, value in defaults.items()
                if value is not None}
    seed = check_option("seed", seed, "seed")
    num_images = check_option("num_images", num_images, "num_images")
    jobs = plan(pipe, prompts, seed=seed, num_images=num_images, lora_dir=lora_dir, **defaults)
    model_info = _model_info(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    mine = batches(jobs, batch_size)[rank::world_size]
    writer = _Writer(out, model_info, dict(zip(RUN_KEYS, (rank, world_size, str(pipe.device),
                                                          str(pipe.dtype)))))
    before, pipe.lora_dir = pipe.lora_dir, lora_dir  # where txt2img finds the tags' files
    try:
        summary = _make_batches(pipe, mine, writer)
    finally:
        pipe.lora_dir = before
    summary.complete = writer.finish(jobs)
    return summary


def _make_batches(pipe, batches, writer):
    """Make the missing images of each batch (computing the whole batch, so that its images
    come out as in any other run), write them; returns the Summary."""
    summary, start = Summary(batches=len(batches)), time.monotonic()
    for number, batch in enumerate(batches, 1):
        todo = [job for job in batch if not writer.done(job)]
        summary.skipped += len(batch) - len(todo)
        if todo:
            for job, image in zip(batch, _make(pipe, batch)):
                if job in todo:
                    writer.write(job, image)
            summary.made += len(todo)
        summary.seconds = time.monotonic() - start
        log.info("rank %d/%d: batch %d/%d, %d made, %d already there, %.2f images/s",
                 writer.run_info["rank"], writer.run_info["world_size"], number, len(batches),
                 summary.made, summary.skipped, summary.made / max(summary.seconds, 1e-9))
    return summary


def _prompts(prompts):
    if isinstance(prompts, (str, os.PathLike)):
        return read_prompts(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a prompts file or a non-empty list of strings and "
                        f"{{\"prompt\": …}} dicts, got {prompts!r:.60}")
    return [item if isinstance(item, Prompt) else to_prompt(item, f"prompts[{i}]", i + 1)
            for i, item in enumerate(prompts)]


def _make(pipe, batch):
    """One txt2img call for a batch of jobs sharing their settings; image i from its seed, by
    the settings' rng."""
    settings = dict(batch[0].settings)
    rng = settings.pop("rng")
    return pipe.txt2img([job.prompt for job in batch],
                        negative_prompt=[job.negative_prompt for job in batch],
                        generator=[seeded_generator(job.seed, rng) for job in batch],
                        progress=False, **settings)


def _model_info(model):
    """(file name, SHA-256) of the checkpoint, for the records."""
    if model is None:
        return {"model": None, "model_sha256": None}
    digest = hashlib.sha256()
    with open(model, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"model": Path(model).name, "model_sha256": digest.hexdigest()}


class _Writer:
    """The files of one process in `out`: PNGs, its manifest, and the merged manifest."""

    def __init__(self, out, model_info, run_info):
        self.out, self.model_info, self.run_info = out, model_info, run_info
        self.manifest = out / f"manifest-rank{run_info['rank']}.jsonl"

    def record(self, job):
        return job.record(**self.model_info)

    def done(self, job):
        """Whether job's image is there; ValueError if another image has its name."""
        path = self.out / job.file
        if not path.exists():
            return False
        try:
            with Image.open(path) as image:
                stored = json.loads(image.info[RECORD_KEY])
        except (OSError, KeyError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path} is there but is no image of `ldm.generate` ({e!r}): "
                             "remove it, or use another --out") from e
        expected = self.record(job)
        stored = {**RECORD_DEFAULTS, **stored}
        differ = [f"{key} {stored.get(key)!r}, now {value!r}" for key, value in expected.items()
                  if key != "line" and stored.get(key) != value]  # a moved line is no change
        if differ:
            raise ValueError(f"{path} is there but was made with other settings "
                             f"({'; '.join(differ)}): use another --out, or remove the old images")
        return True

    def write(self, job, image):
        record = self.record(job)
        text = {RECORD_KEY: json.dumps(record), "parameters": _a1111_parameters(record, job)}
        write_png(image, self.out / job.file, text, overwrite=True)
        row = {**record, **self.run_info, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(self.manifest, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def finish(self, jobs):
        """Write manifest.jsonl if every image of the plan is there; whether it was written."""
        if not all((self.out / job.file).exists() for job in jobs):
            return False
        path = self.out / "manifest.jsonl"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            tmp.write_text("".join(json.dumps(self.record(job)) + "\n" for job in jobs),
                           encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return True


def _a1111_parameters(record, job):
    """AUTOMATIC1111's "parameters" text, which its PNG Info and `ldm.parse_parameters` read
    back to the settings that made the image; the prompt's LoRA tags at its end with their
    "Lora hashes", as A1111 writes them."""
    settings = {key: value for key, value in record.items()
                if key in parameters.SETTINGS and value is not None}
    settings["prompt"] = lora.prompt_loras(job.prompt)[0].strip()
    loras = [_Hashed(tag.name, tag.multiplier, tag.text_multiplier, hash_)
             for tag, hash_ in job.loras]
    model = ({"Model hash": record["model_sha256"][:10], "Model": record["model"]}
             if record["model"] else {})
    return parameters.format_parameters(settings, loras=loras, info=model)


@dataclass(frozen=True)
class _Hashed:
    """A LoRA as format_parameters writes it (lora.Loaded's fields it reads)."""
    name: str
    multiplier: float
    text_multiplier: float
    hash: str


def read_manifest(out):
    """The records of the images in `out`, from its manifest-rank*.jsonl files: one per file
    (the last written), those whose file is there, in file-name (= prompt) order."""
    out, records = Path(out), {}
    for path in sorted(out.glob("manifest-rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["file"]] = record
    return [records[name] for name in sorted(records) if (out / name).exists()]


def shard():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, str(default))
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name}={text!r} is not an integer") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: "
                         "need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


# ---------------------------------------------------------------- the command
def add_arguments(parser):
    """The options of `generate` (python -m ldm generate, python -m ldm.generate)."""
    add = parser.add_argument
    add("--prompts", required=True, type=Path, help="a text file, one prompt per line, or a "
        ".jsonl file, one {\"prompt\": …, setting: value} object per line (settings: "
        + ", ".join(LINE_KEYS) + ")")
    add("--out", required=True, type=Path, help="the folder of the images and manifests")
    add("--ckpt", type=Path, help="a .safetensors or .ckpt checkpoint (default: "
        f"{DEFAULT_CHECKPOINT.name}, shipped with ldm)")
    add("--config", choices=PRESETS, help="the model preset, instead of telling it from the file")
    add("--seed", type=int, default=0, help="base seed: image i of prompt k takes seed + k·N + i "
        "(N = --num-images), unless its line gives its own (default 0)")
    add("--num-images", type=int, default=1, help="images per prompt, N (default 1)")
    add("--batch-size", type=int, default=8, help="images per model call (default 8)")
    add("--negative-prompt", help="what to steer away from (default: nothing)")
    add("--steps", type=int, help="denoising steps (default: the model's)")
    add("--sampler", choices=sampler_names(), metavar="SAMPLER", help="default: the model's; "
        "one of " + ", ".join(samplers.SAMPLERS))
    add("--schedule", choices=samplers.SCHEDULES, help="default: the sampler's")
    add("--cfg-scale", type=float, help="classifier-free guidance scale (default: the model's)")
    add("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"), help="guidance only at "
        "the timesteps from LOW to HIGH (default: the model's; 0 1000: every step)")
    add("--eta", type=float, help="DDIM noise (default 0)")
    add("--height", type=int, help="image height (default: the model's native size)")
    add("--width", type=int, help="image width (default: the model's native size)")
    add("--rng", choices=RNGS, help="the numbers a seed gives: cpu (default; torch's CPU "
        "generator, A1111's CPU) or nv (CUDA's, A1111's GPU/NV)")
    add("--clip-skip", type=int, help="A1111's CLIP skip (SD 1.x; default: the model's own)")
    add("--prompt-syntax", choices=prompt_lib.SYNTAXES, help="a1111 (default: (word:1.2), "
        "[word], BREAK) or plain")
    add("--emphasis", choices=prompt_lib.EMPHASES, help="how weights apply (default original, "
        "A1111's)")
    add("--pad-conds", action=argparse.BooleanOptionalAction, help="pad prompt and negative "
        "prompt to the same 75-token chunk count (default), or not (A1111's default)")
    add("--hires-scale", type=float, help="A1111's hires fix: draw at the size given, upscale "
        "by this factor (> 1) and denoise again (default: off)")
    add("--hires-strength", type=float, help=f"the hires pass's denoising strength (default "
        f"{hires.DEFAULT_STRENGTH})")
    add("--hires-steps", type=int, help="steps of the hires pass (default: --steps)")
    add("--hires-upscale", "--hires-upscaler", dest="hires_upscale", choices=hires.UPSCALERS,
        help="latent (default) or another of ldm.hires.UPSCALERS")
    add("--lora-dir", type=Path, help="the folder of the LoRA files that <lora:name:m> tags in "
        "the prompts name (A1111's models/Lora)")
    add("--device", help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    add("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
        help="auto (default), as ldm.load: bfloat16 on a CPU with AMX, float32 on other "
        "CPUs, float16 on CUDA; each rank manifest records the dtype used")
    add("--threads", type=int, help="CPU threads per process (default: cores / processes)")
    add("--no-progress", action="store_true", help="no line per batch on stderr")
    add("--debug", action="store_true", help="on an error, show the traceback")
    return parser


def execute(args):
    """Run a parsed `generate` command line: returns 0, or raises (ValueError for user errors,
    found before the model loads where they can be)."""
    rank, world, local_rank = shard()
    for flag, path, kind in (("--prompts", args.prompts, "a file"),
                             ("--ckpt", args.ckpt, "a file"), ("--out", args.out, "a folder"),
                             ("--lora-dir", args.lora_dir, "a folder")):
        if path is not None and (not path.is_file() if kind == "a file" else
                                 (path.exists() or flag == "--lora-dir") and not path.is_dir()):
            raise ValueError(f"argument {flag}: {path} is not {kind}")
    prompts = read_prompts(args.prompts)
    defaults = {key: getattr(args, key) for key in LINE_KEYS
                if key not in ("seed", "num_images") and getattr(args, key) is not None}
    for key, value in [*defaults.items(), ("seed", args.seed), ("num_images", args.num_images)]:
        check_option(key, value, f"argument --{key.replace('_', '-')}")
    if args.batch_size < 1:
        raise ValueError(f"argument --batch-size: must be at least 1, got {args.batch_size}")
    try:
        _check_hires_defaults(prompts, defaults)
    except ValueError as e:
        raise ValueError(f"arguments --hires-*: {e}") from e
    for prompt in prompts:  # the LoRA files the tags name, found before the load
        negative = prompt.options.get("negative_prompt", defaults.get("negative_prompt", ""))
        try:
            _lora_files(prompt, negative, args.lora_dir)
        except FileNotFoundError as e:  # a file the command line names: bad input
            raise ValueError(str(e)) from e
    device = _device(args.device, local_rank)
    _threads(args.threads, device)
    if not args.no_progress and not log.handlers:  # a line per batch, this module's only
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    pipe = load(args.ckpt, device=device, dtype=args.dtype, config=args.config)
    summary = generate(pipe, prompts, args.out, seed=args.seed, num_images=args.num_images,
                       batch_size=args.batch_size, rank=rank, world_size=world,
                       model=args.ckpt or DEFAULT_CHECKPOINT, lora_dir=args.lora_dir, **defaults)
    print(f"rank {rank}/{world}: {summary.made} images made, {summary.skipped} already there, "
          f"in {args.out} ({summary.made / max(summary.seconds, 1e-9):.2f} images/s)"
          + ("; manifest.jsonl written" if summary.complete else ""))
    return 0


def _device(name, local_rank):
    """--device, or each process its own GPU (LOCAL_RANK) where CUDA is there."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"argument --device: {e}") from e
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank}, but this process sees {count} GPU(s)")
        device = torch.device("cuda", local_rank)
    return device


def _threads(threads, device):
    """Share the cores among the processes of this machine (torchrun's LOCAL_WORLD_SIZE)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads is not None:
        torch.set_num_threads(arguments.check_int("--threads", threads, minimum=1))
    elif device.type == "cpu" and local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def build_parser():
    return add_arguments(argparse.ArgumentParser(prog="python -m ldm.generate",
                                                 description=DESCRIPTION))


def main(argv=None):
    """For callers in Python: 0 on success; errors raise."""
    return execute(build_parser().parse_args(argv))


def run(argv=None):
    """The command: 0, or one line on stderr and an exit code (2 bad input, 1 failure, 130
    interrupted), as `python -m ldm` reports; --debug raises instead."""
    args = build_parser().parse_args(argv)
    try:
        return execute(args)
    except BaseException as e:
        code = _exit_code(e)
        if code is None or args.debug:
            raise
        print(f"python -m ldm.generate: error: {e}" if code != EXIT_INTERRUPTED else
              "python -m ldm.generate: interrupted", file=sys.stderr)
        return code


def _exit_code(error):
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, CheckpointError):
        return EXIT_FAILED
    if isinstance(error, (ValueError, TypeError)):
        return EXIT_USAGE
    if isinstance(error, (OSError, MemoryError, torch.OutOfMemoryError)):
        return EXIT_FAILED
    return None


if __name__ == "__main__":
    sys.exit(run())
