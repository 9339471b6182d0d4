"""Offloading (ldm/offload.py, pipe.enable_offload): the same outputs as without it, the weights
where they should be when each module runs, and nothing left behind.

No GPU here: the moves run CPU -> CPU (the hooks and their bookkeeping, not the copies), a
recorder stands in for `offload.move` to see the order of whole-network moves, and the
sequential mode runs its networks on the meta device under a dispatch mode that refuses any op
mixing devices, as a GPU would (meta alone lets F.linear take a CPU weight). Peak GPU memory is
not measured here.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ldm
from ldm import offload
from ldm.sdxl import StableDiffusionXL

from helpers import fresh_seed, randomize_
from test_sdxl import tiny

PROMPT = "a red circle in the top left"
MODES = ["model", "sequential"]


@pytest.fixture(scope="module")
def pipe():
    return ldm.load(dtype=torch.float32)  # weights/tiny-shapes.safetensors


@pytest.fixture(scope="module")
def xl():
    return randomize_(StableDiffusionXL(tiny("sdxl", 6)).eval(), fresh_seed())


def generate(pipe, **kwargs):
    kwargs = {"steps": 3, "seed": 1, "progress": False, "output_type": "tensor", **kwargs}
    return pipe.txt2img(PROMPT, **kwargs)


def no_hooks_left(pipe):
    return all(not m._forward_pre_hooks and not m._forward_hooks
               for network in pipe.networks().values() for m in network.modules())


@pytest.mark.parametrize("mode", MODES)
def test_same_images_with_offload(pipe, xl, mode):
    for model in (pipe, xl):
        image = generate(model, sampler="euler_a", hires_scale=1.5, hires_upscale="pixel")
        model.enable_offload(mode, device="cpu")
        try:
            assert model.device == torch.device("cpu")
            assert torch.equal(generate(model, sampler="euler_a", hires_scale=1.5,
                                        hires_upscale="pixel"), image)
        finally:
            model.disable_offload()
        assert no_hooks_left(model)


@pytest.mark.parametrize("mode", MODES)
def test_img2img_and_tiled_vae_with_offload(pipe, mode):
    source = generate(pipe, steps=2)
    pipe.vae_tile_size = 32  # 64-px images in 4 tiles: the tiled decoder calls pieces, not forward
    try:
        expected = pipe.img2img(source, PROMPT, steps=4, seed=2, progress=False,
                                output_type="tensor")
        pipe.enable_offload(mode, device="cpu")
        out = pipe.img2img(source, PROMPT, steps=4, seed=2, progress=False, output_type="tensor")
    finally:
        pipe.disable_offload()
        pipe.vae_tile_size = "auto"
    assert torch.equal(out, expected)


# The execution device of the recorded runs: the CPU under another name (tensors moved there
# are ordinary CPU tensors), so that a move there and a move back can be told apart.
DEVICE = torch.device("cpu", 0)


class MoveRecorder:
    """Stands in for offload.move, which then still runs: records each whole-network move and
    which networks are on DEVICE."""

    def __init__(self, pipe, move):
        self.names = {id(net): name for name, net in pipe.networks().items()}
        self.move, self.moves, self.on_device, self.most_at_once = move, [], set(), 0

    def __call__(self, module, device):
        name, device = self.names[id(module)], torch.device(device)
        self.moves.append((name, device))
        (self.on_device.add if device == DEVICE else self.on_device.discard)(name)
        self.most_at_once = max(self.most_at_once, len(self.on_device))
        self.move(module, device)

    def brought(self):
        return [name for name, device in self.moves if device == DEVICE]


def watch(pipe, recorder):
    """Pre-hooks, after offload's own, on every module holding weights: a call into a network
    that is not on DEVICE is recorded in `outside`."""
    calls, outside, handles = [0], [], []
    for name, network in pipe.networks().items():
        def probe(module, args, name=name):
            calls[0] += 1
            if name not in recorder.on_device:
                outside.append((name, type(module).__name__))
        handles += [m.register_forward_pre_hook(probe) for m in offload.weight_holders(network)]
    return calls, outside, handles


@pytest.mark.parametrize("model, order", [
    ("pipe", ["text_encoder", "unet", "vae"]),
    ("xl", ["text_encoder_2", "text_encoder", "unet", "vae"])])  # SDXL encodes with bigG first
def test_model_offload_moves_one_network_at_a_time_in_order(request, monkeypatch, model, order):
    pipe = request.getfixturevalue(model)
    recorder = MoveRecorder(pipe, offload.move)
    monkeypatch.setattr(offload, "move", recorder)
    pipe.enable_offload("model", device=DEVICE)
    calls, outside, handles = watch(pipe, recorder)
    try:
        assert recorder.moves == [(name, torch.device("cpu")) for name in pipe.networks()]
        assert pipe.device == DEVICE  # where the tasks send their inputs
        recorder.moves.clear()
        generate(pipe)
        assert recorder.brought() == order and recorder.most_at_once == 1
        assert recorder.on_device == {"vae"}  # it stays until another network is called
        assert calls[0] > 0 and outside == []
        recorder.moves.clear()
        generate(pipe)  # again: the VAE leaves for the text encoder, and so on
        assert recorder.brought() == order and recorder.most_at_once == 1 and outside == []
        # the U-Net came once for all its steps, and left once
        assert [name for name, _ in recorder.moves].count("unet") == 2
    finally:
        for handle in handles:
            handle.remove()
        pipe.disable_offload(device="cpu")
    assert no_hooks_left(pipe) and pipe.device == torch.device("cpu")


class OneDevice(TorchDispatchMode):
    """Refuses any op whose tensors are on more than one device, as CUDA kernels do (a 0-dim
    CPU tensor counts as a scalar, which they take); moves and copies may cross."""

    CROSSING = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.CROSSING:
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                       and not (t.device.type == "cpu" and t.ndim == 0)}
            if len(devices) > 1:
                raise RuntimeError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def run_networks(pipe, device):
    """Each network once on inputs on `device`, called as the pipeline calls it."""
    ids = pipe.tokenizer([PROMPT]).to(device)
    if isinstance(pipe, StableDiffusionXL):
        states = pipe.text_encoder_2.hidden_states(ids)
        pooled = pipe.text_encoder_2.pooled(states[-1], ids)
        context = torch.cat([pipe.text_encoder.hidden_states(ids, 1)[-1], states[-2]], dim=-1)
        sizes = torch.zeros(1, pipe.unet.config.adm_in_channels - pooled.shape[1])
        cond = {"context": context, "y": torch.cat([pooled, sizes.to(device)], dim=-1)}
    else:
        cond = {"context": pipe.text_encoder(ids)}
    x = torch.randn(1, 4, 8, 8).to(device)
    eps = pipe.unet(x, torch.tensor([500.0]).to(device), **cond)
    image = pipe.vae.decode(x)
    return cond["context"], eps, image, pipe.vae.encode(image).mean


def test_sequential_offload_brings_every_weight_a_forward_reads(pipe, xl):
    """On the meta device under OneDevice: a weight left on the CPU while a forward reads it
    fails the run (CLIP's position table, read without calling its Embedding, did)."""
    for model in (pipe, xl):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        reference = run_networks(model, "cpu")
        model.enable_offload("sequential", device="meta")
        try:
            with OneDevice(), torch.inference_mode():
                outputs = run_networks(model, "meta")
            assert [o.shape for o in outputs] == [r.shape for r in reference]
            assert all(o.device.type == "meta" for o in outputs)
            # at rest every weight is on the CPU, but a network's own (OpenCLIP's few)
            kept = {f"{network}.{name}" for network, module in model.networks().items()
                    for name, _ in module.named_parameters(recurse=False)}
            for name, tensor in model.state_dict().items():
                assert (tensor.device.type == "meta") == (name in kept), name
        finally:
            model.disable_offload(device="cpu")
        assert no_hooks_left(model)
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)  # nothing lost on the way


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_sequential_offload_puts_the_weights_back_when_a_forward_raises(pipe, error):
    """At once after an Exception (torch's always-call hooks); after Ctrl-C, which they do not
    see, when the offload is removed."""
    def fail(module, args):
        raise error
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    pipe.enable_offload("sequential", device="meta")
    handle = pipe.vae.decoder.mid.register_forward_pre_hook(fail)  # after offload's own
    try:
        with pytest.raises(error):
            pipe.vae.decode(torch.zeros(1, 4, 8, 8, device="meta"))
        on_cpu = all(p.device.type == "cpu" for p in pipe.vae.parameters())
        assert on_cpu == (error is RuntimeError)
    finally:
        handle.remove()
        pipe.disable_offload(device="cpu")
    after = pipe.vae.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("mode", MODES)
def test_weights_stay_ordinary_tensors_that_lora_can_write(pipe, mode):
    """Moves made inside txt2img (inference mode) must not leave inference tensors, which no
    in-place update (a LoRA merge) could touch afterwards."""
    pipe.enable_offload(mode, device=DEVICE)
    try:
        generate(pipe, steps=1)
        assert not any(p.is_inference() for p in pipe.parameters())
        with torch.no_grad():
            for p in pipe.parameters():
                p.add_(0)  # raises for an inference tensor
    finally:
        pipe.disable_offload(device="cpu")


def test_bad_mode_and_device_are_named(pipe):
    with pytest.raises(ValueError, match="mode must be one of 'model', 'sequential'"):
        pipe.enable_offload("layers", device="cpu")
    assert pipe._offload is None and no_hooks_left(pipe)
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        with pytest.raises(ValueError, match="no GPU .* give device="):
            pipe.enable_offload("model")


def test_switching_modes_leaves_one_set_of_hooks(pipe):
    image = generate(pipe)
    pipe.enable_offload("model", device="cpu")
    pipe.enable_offload("sequential", device="cpu")
    try:
        assert isinstance(pipe._offload, offload.SequentialOffload)
        assert torch.equal(generate(pipe), image)
    finally:
        pipe.disable_offload()
    pipe.disable_offload()  # twice is harmless
    assert no_hooks_left(pipe)


@pytest.mark.parametrize("mode", MODES)
def test_load_with_offload(pipe, mode):
    """ldm.load(offload=...) reads the weights into CPU memory and sets the hooks up."""
    offloaded = ldm.load(dtype=torch.float32, offload=mode)
    kind = offload.ModelOffload if mode == "model" else offload.SequentialOffload
    assert isinstance(offloaded._offload, kind) and offloaded.device == torch.device("cpu")
    assert torch.equal(generate(offloaded, sampler="euler_a"), generate(pipe, sampler="euler_a"))
    offloaded.disable_offload()
    assert no_hooks_left(offloaded)
    with pytest.raises(ValueError, match="offload must be None or one of 'model', 'sequential'"):
        ldm.load(offload="layers")


def test_cli_offload_needs_a_gpu_device(tmp_path, capsys):
    from ldm import cli
    assert cli.run(["txt2img", "a", "--offload", "model", "--device", "cpu", "--out",
                    str(tmp_path / "o.png")]) == cli.EXIT_USAGE
    assert "argument --offload: moves the networks to a GPU" in capsys.readouterr().err
