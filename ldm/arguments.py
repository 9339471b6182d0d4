"""Checks of the pipeline's public arguments, and of the memory a request needs, before any work.

Each check returns the value in the form the pipeline uses (a NumPy integer becomes an int, a
seed is reduced mod 2**64, a prompt becomes a list of strings) or raises:

    TypeError    the wrong kind of value: a str for a number, a float for a seed, None for a prompt
    ValueError   the right kind out of range: a NaN guidance scale, strength 0, a size the device
                 cannot hold (`check_memory`)

and the message names the argument, the value given and what is allowed.

Numbers are what Python and NumPy call numbers (`numbers.Integral`, `numbers.Real`), never a
bool (True as steps=1 is a slip, not a request) and never a string: "7" may be meant as 7, but
guessing is how a CLI's "7.5" becomes a silent 7.

Memory: `estimate_memory` is the peak a request's largest stage needs, from the model config
alone (the U-Net's activations and skips, the VAE's full-resolution activations and its
mid-block attention scores, the conditioning); `available_memory` what the device has now;
`check_memory` refuses a request above it, before anything is allocated.
"""
import math
import numbers
import os

import torch

from ldm import vae_tiling
from ldm.schedule import NUM_TRAIN_STEPS

# torch.Generator.manual_seed takes [-2**63, 2**64) and reads a negative seed as its value mod
# 2**64 (-1 is 2**64 - 1); reducing every int mod 2**64 extends that reading to all of them.
SEED_MODULUS = 2**64


def _describe(value):
    """`value!r (type)`, cut short for huge values (a prompt list, an array)."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_int(name, value, *, minimum=None):
    """An integer (Python or NumPy, not bool) >= minimum, returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {rule}, got {value}")
    return value


def check_float(name, value, low, high, *, low_open=False, why=""):
    """A finite real number (Python or NumPy, not bool) in [low, high] ((low, high] when
    `low_open`), returned as a float; `why` says in the message what the range is for."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_describe(value)}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and value <= high
    if not inside:  # NaN fails every comparison, so it lands here too
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        why = f" ({why})" if why else ""
        raise ValueError(f"{name} must be in {interval}{why}, got {value!r}")
    return value


def check_cfg_scale(cfg_scale):
    """Classifier-free guidance scale: finite, in [-100, 100].

    1 is the conditional model alone, 0 the unconditional one, negative pushes away from the
    prompt. Past about 30 every pixel saturates already (A1111's slider stops there); the bound
    leaves room for that and refuses a misplaced decimal point (750 for 7.5) and the huge
    scales (1e30) that overflow the guided ε to inf, so that the image comes out black.
    """
    return check_float("cfg_scale", cfg_scale, -100, 100, why="guidance strength; SD uses 7.5")


def check_eta(eta):
    """DDIM's η, in [0, 1]: 0 is deterministic DDIM, 1 DDPM's ancestral noise. Above 1 the fresh
    noise σ_t can outgrow the step (1 − ᾱ_t' − σ_t² < 0), whose square root is not real."""
    return check_float("eta", eta, 0, 1, why="DDIM's η: 0 deterministic, 1 as DDPM")


def check_cfg_interval(interval):
    """None (guidance at every step) or (low, high): guidance only at the steps whose timestep t
    has low ≤ t ≤ high, 0 ≤ low < high ≤ 1000 (the schedule's timesteps; (200, 1000): all but
    the last fifth of the noise schedule). Returned as a tuple of two floats."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or not isinstance(interval, (tuple, list)) \
            or len(interval) != 2:
        raise TypeError(f"cfg_interval must be None or a pair (low, high) of timesteps, got "
                        f"{_describe(interval)}")
    # the schedule's timesteps are 0 … 999; a high of 1000 closes the interval at the top
    low, high = (check_float(f"cfg_interval[{i}]", value, 0, NUM_TRAIN_STEPS,
                             why="a timestep of the noise schedule")
                 for i, value in enumerate(interval))
    if not low < high:
        raise ValueError(f"cfg_interval must be (low, high) with low < high, got ({low:g}, "
                         f"{high:g})")
    return low, high


def check_strength(strength):
    """img2img's strength, in (0, 1]: the share of the schedule re-run on the noised image
    (0 would run no step and return the input)."""
    return check_float("strength", strength, 0, 1, low_open=True,
                       why="the share of the steps re-run")


def check_seed(seed):
    """None (a random seed) or any integer, Python or NumPy, reduced mod 2**64.

    The rule is torch's own for the negative seeds it takes: seed=-1 is 2**64 - 1 (as in
    torch.manual_seed(-1)), not "random" as in AUTOMATIC1111's interface; random is None.
    A float is refused, even 1.0: seed=1.5 would otherwise silently be seed 1.
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer (any, taken mod 2**64) or None, "
                        f"got {_describe(seed)}")
    return int(seed) % SEED_MODULUS


def check_prompts(name, prompt):
    """A string, or a non-empty list or tuple of strings -> a list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a list of strings, got {_describe(prompt)}")
    if not prompts:
        raise ValueError(f"{name} is an empty list: give at least one prompt")
    return list(prompts)


def check_optional(name, value, kind, allowed):
    """None or an instance of `kind`; `allowed` says what, for the message."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{name} must be {allowed} or None, got {_describe(value)}")
    return value


def check_hooks(callback, progress):
    """A step callback (a function or None) and progress (a bool or None)."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function (i, t, x, x0) or None, got "
                        f"{_describe(callback)}")
    check_optional("progress", progress, (bool, int), "True or False")


def check_latents(latents):
    """None, or starting latents as a tensor, NumPy array or nested list -> a finite float
    tensor (its shape is checked where the expected shape is known)."""
    if latents is None or isinstance(latents, torch.Tensor):
        tensor = latents
    else:
        try:
            tensor = torch.as_tensor(latents)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"latents must be a tensor, a NumPy array or nested lists of "
                            f"numbers, got {_describe(latents)}") from error
    if tensor is None:
        return None
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ValueError("latents hold NaN or infinite values")
    return tensor


# ---------------------------------------------------------------- memory
def estimate_memory(config, batch, height, width, dtype=torch.float32):
    """Bytes that generating `batch` images of height × width pixels needs at its peak.

    The largest of its stages, each counted from the model config (activations of `dtype`):

    U-Net, at latent size h × w on the guidance batch 2B: the skips every input block keeps for
    its output block, (num_res_blocks + 1) · C_l · N_l per level l (N_l = h·w / 4**l tokens of
    C_l channels), plus the widest working set, a transformer's GEGLU (8 C_l · N_l in, 4 out).
    Its attention maps are not counted: SDPA runs its heads on fused kernels (CPU and CUDA)
    that never hold the N_l² scores.
    VAE, on B images: `vae_tiling.estimate_memory` of the whole decode, or, when that is
    larger, of the smallest tiles the decode falls back to (tile_size "auto": 4 halos, the
    statistics of one sampled tile), since decoding tiles when the whole does not fit.
    Conditioning: B · 77 · context_dim per half, twice over in guidance's batched copy.

    This is the least a request can run in, what it is refused below: with memory to spare
    the VAE decodes whole and the peak is higher. Measured on the first shipped 64-px model
    (a 16-channel VAE), CPU, float32, decoding whole: 256 px peaks at 73 MB (estimate 11 MB),
    384 px at 154 MB (22 MB).
    """
    size = torch.tensor([], dtype=dtype).element_size()
    unet, vae = config.unet, config.vae
    f = vae.downsampling_factor
    h, w = height // f, width // f
    skips, work = 0, 0
    for level in range(unet.num_levels):
        tokens, channels = h * w / 4**level, unet.level_channels(level)
        skips += (unet.num_res_blocks + 1) * channels * tokens
        widest = 12 if level in unet.attention_levels else 4  # GEGLU in and out, or a ResBlock
        work = max(work, widest * channels * tokens)
    unet_bytes = 2 * batch * (skips + work) * size
    smallest_tile = 4 * vae_tiling.decoder_halo(vae)
    vae_bytes = min(vae_tiling.estimate_memory(vae, height, width, dtype, batch=batch),
                    vae_tiling.estimate_memory(vae, height, width, dtype, batch=batch,
                                               tile_size=smallest_tile, exact=False))
    text_bytes = 4 * batch * 77 * unet.context_dim * size
    return int(max(unet_bytes, vae_bytes) + text_bytes)


def available_memory(device):
    """Bytes free for tensors on `device` now, or None where ldm cannot tell.

    CPU: MemAvailable of /proc/meminfo (what the kernel can give without swapping), else the
    free physical pages. CUDA: free device memory, plus what torch's caching allocator holds
    reserved but unused (it reuses that before asking the driver).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(request, needed, device, limit=None):
    """Refuse (ValueError) a request needing more than `limit` bytes.

    request: the arguments that set the size, for the message ("height=1024, width=1024, …").
    limit: None for what `device` has available now (no check where that is unknown),
    math.inf to never refuse.
    """
    if limit is None:
        limit = available_memory(device)
        where = f"the {_gb(limit)} available on {device}" if limit is not None else ""
    else:
        where = f"memory_limit ({_gb(limit)})"
    if limit is None or needed <= limit:
        return
    raise ValueError(f"{request} needs about {_gb(needed)} on {device}, more than {where}; "
                     "ask for fewer or smaller images, or set pipe.memory_limit (bytes, "
                     "math.inf: never refuse) to go ahead anyway")


def _gb(nbytes):
    return "unlimited" if math.isinf(nbytes) else f"{nbytes / 1e9:.2f} GB"
