"""Count the PyTorch operators one SD 1.5 U-Net forward dispatches: ldm against diffusers.

On a GPU nearly every operator is a kernel launch, and at batch 2 SD 1.5 was bound by the
host issuing them (benchmarks/RESULTS.md: ~31 ms of host time per forward for ~14 ms of GPU
work on an H100), so fewer operators is less host time, whatever the GPU. The count needs no
GPU: both U-Nets are built with SD 1.5's shapes on the CPU (weights left uninitialised: values
do not change which operators run), fed an 8x8 latent at batch 2, and every aten operator is
counted with a TorchDispatchMode, per dtype. View operators (reshape, permute, …) launch no
kernel and are counted apart. CUDA graphs (pipe.cuda_graphs) replace all launches of a
forward by one.

    python benchmarks/op_count.py [--top 8]
    python benchmarks/op_count.py --smoke    # the tiny preset's U-Net, the same counts, seconds
                                             # (CI: the script must still run)
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_unet import diffusers_config  # noqa: E402  (the same network, in diffusers' terms)

from ldm.models.unet import UNET_TINY, UNet, UNetConfig  # noqa: E402


class OperatorCount(TorchDispatchMode):
    """Counts each aten operator called while active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def is_view(name):
    return name in {"view", "reshape", "_reshape_alias", "permute", "transpose", "t", "expand",
                    "unsqueeze", "squeeze", "split", "chunk", "slice", "select", "unbind",
                    "alias", "detach", "_unsafe_view", "as_strided", "split_with_sizes"}


def build(name, dtype, config):
    """One U-Net of `config`, forward(x, t, context) -> ε, weights uninitialised on the CPU."""
    with torch.device("meta"):
        if name == "ldm":
            model = UNet(config)
        else:
            import diffusers
            model = diffusers.UNet2DConditionModel(**diffusers_config(config))
    model = model.to_empty(device="cpu").to(dtype).eval()
    if name == "ldm":
        return model
    return lambda x, t, context: model(x, t, context, return_dict=False)[0]


def count(name, dtype, config):
    """{aten operator: calls} of one forward at batch 2 on an 8x8 latent, 77 tokens."""
    forward = build(name, dtype, config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 8, 8, generator=g).to(dtype)
    context = torch.randn(2, 77, config.context_dim, generator=g).to(dtype)
    t = torch.tensor([981, 981])
    with torch.inference_mode(), OperatorCount() as ops:
        eps = forward(x, t, context)
    if eps.shape != (2, config.out_channels, 8, 8):
        raise AssertionError(f"{name}: output of shape {tuple(eps.shape)}")
    return ops.counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--top", type=int, default=8, help="list the most called operators")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset's U-Net (CI)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # "modules … kept in float32: []" on .to()
    config, title = (UNET_TINY, "tiny preset") if args.smoke else (UNetConfig(), "SD 1.5")
    print(f"{title} U-Net, one forward at batch 2 (8x8 latent, 77 tokens), on the CPU; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}\n")
    print(f"{'U-Net':10} {'dtype':8} {'operators':>9} {'non-view':>9}   most called (non-view)")
    for dtype in (torch.float16, torch.float32):
        for name in ("ldm", "diffusers"):
            counts = count(name, dtype, config)
            compute = {op: n for op, n in counts.items() if not is_view(op)}
            top = sorted(compute.items(), key=lambda kv: -kv[1])[:args.top]
            print(f"{name:10} {str(dtype).split('.')[1]:8} {sum(counts.values()):9d} "
                  f"{sum(compute.values()):9d}   " + ", ".join(f"{op} {n}" for op, n in top))


if __name__ == "__main__":
    main()
