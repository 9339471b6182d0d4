"""Taking the host out of the loop: the models trace whole under torch.compile, and the U-Net
replays from CUDA graphs (ldm/cuda_graph.py) with the same results as eager calls.

torch.compile runs here with the "aot_eager" backend: Dynamo traces each model into one graph
(fullgraph=True fails on any graph break or host sync: .item(), data-dependent Python
branches) and AOTAutograd functionalises it, without Inductor's code generation, so it takes
seconds on a CPU. The CUDA graph tests need a GPU.
"""
from dataclasses import replace

import pytest
import torch

from helpers import randomize_, rel_error
from ldm.config import PRESETS
from ldm.cuda_graph import CUDAGraphed
from ldm.models.clip_text import CLIPTextModel
from ldm.models.unet import UNET_TINY, UNet
from ldm.models.vae import VAE_TINY, AutoencoderKL
from test_pipeline import random_pipe

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TEXT = PRESETS["tiny"].text


def unet_inputs(g, batch=2, size=8, device="cpu", dtype=torch.float32):
    """(x (B, 4, h, w), t (B,), context (B, 77, D)), random."""
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 77, UNET_TINY.context_dim, generator=g)
    return x.to(device, dtype), t.to(device), context.to(device, dtype)


def traced(fn, *inputs):
    """The compiled (one graph, aot_eager) and the eager outputs of fn(*inputs)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    return compiled(*inputs), fn(*inputs)


@torch.no_grad()
def test_models_trace_as_one_graph():
    seed = int(torch.randint(1 << 20, ()))
    g = torch.Generator().manual_seed(seed)
    unet = randomize_(UNet(UNET_TINY), seed).eval()
    vae = randomize_(AutoencoderKL(VAE_TINY), seed + 1).eval()
    text = randomize_(CLIPTextModel(TEXT), seed + 2).eval()
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    tokens = torch.randint(0, TEXT.vocab_size, (2, 77), generator=g)
    latents = torch.randn(2, VAE_TINY.z_channels, 8, 8, generator=g)
    for compiled, eager in [traced(unet, *unet_inputs(g)), traced(text, tokens),
                            traced(vae.decode, latents),
                            traced(lambda x: vae.encode(x).mean, images)]:
        assert rel_error(compiled, eager) <= 1e-6


def test_cuda_graphed_calls_cpu_tensors_directly():
    """Off the GPU the wrapper is the function itself: nothing is recorded."""
    seed = int(torch.randint(1 << 20, ()))
    unet = randomize_(UNet(UNET_TINY), seed).eval()
    step = CUDAGraphed(unet)
    inputs = unet_inputs(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(step(*inputs), unet(*inputs))
    assert step.graphs == {}


@needs_cuda
@torch.inference_mode()
def test_unet_replays_from_cuda_graphs(monkeypatch):
    """Replays match eager calls on fresh inputs; a new shape records a second graph; moving the
    weights (.half()) drops the graphs and records anew."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    seed = int(torch.randint(1 << 20, ()))
    g = torch.Generator().manual_seed(seed)
    unet = randomize_(UNet(UNET_TINY), seed).eval().cuda()
    step = CUDAGraphed(unet)
    for size in (8, 8, 12):
        inputs = unet_inputs(g, size=size, device="cuda")
        assert rel_error(step(*inputs), unet(*inputs)) <= 1e-6
    assert len(step.graphs) == 2
    unet.half()
    inputs = unet_inputs(g, device="cuda", dtype=torch.float16)
    assert rel_error(step(*inputs), unet(*inputs)) <= 1e-3
    assert len(step.graphs) == 1


@needs_cuda
@pytest.mark.parametrize("task", ["txt2img", "inpaint 9-channel"])
def test_pipeline_with_cuda_graphs_draws_the_same_latents(task):
    seed = int(torch.randint(1 << 20, ()))
    config = PRESETS["tiny"]
    if task != "txt2img":
        config = replace(config, unet=replace(config.unet, in_channels=9))
    pipe = random_pipe(config, seed).cuda()
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 32, 32, generator=g) > 0.5).float()

    def generate():
        kwargs = dict(steps=4, seed=seed, output_type="latent", progress=False)
        if task == "txt2img":
            return pipe.txt2img("a red circle", height=32, width=32, **kwargs)
        return pipe.inpaint(image, mask, "a red circle", **kwargs)

    eager = generate()
    pipe.cuda_graphs = True
    assert rel_error(generate(), eager) <= 1e-5
    assert len(pipe._unet_graphs.graphs) == 1
