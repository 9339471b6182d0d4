"""Offloading: keep the weights in CPU memory and bring them to the GPU only while they run.

    pipe.enable_offload("model")        # one network at a time on the GPU
    pipe.enable_offload("sequential")   # one layer at a time: the least memory, the slowest
    pipe.disable_offload()              # every network on the GPU again

A txt2img runs its networks in turn: the text encoder(s) once, the U-Net at every step, the
VAE once. "model" keeps on the device only the network running: the first call into another
moves that one there whole and sends the one there back to the CPU, so the U-Net stays for the
whole sampling loop and each network crosses the bus once per task. The device holds the
largest network (the U-Net: 0.86 G parameters for SD 1.5, 2.6 G for SDXL) and the
activations, instead of all of them (SD 1.5: 1.07 G, SDXL: 3.5 G).

"sequential" keeps on the device only the weights a running forward reads: each module's own
and its direct children's are copied there just before its forward and dropped just after, at
every call. The device holds a few layers' weights (the largest: SDXL's bigG token embedding
table, 63 M parameters) and the activations; every sampling step copies the whole U-Net again,
so it runs at the speed of the bus (PCIe).

Both are forward hooks, on the modules that hold weights (and, for "sequential", their
parents), so they see every way the pipeline calls a network (forward, vae.decode, the tiled
decoder's pieces, SDXL's text_encoder_2.hidden_states): their state lives in the object
`enable` returns, one per pipeline; nothing is global. The moves run outside inference mode,
so the weights stay ordinary tensors that LoRA loading can still write to. Not for two threads
at once: a network moved away by one thread's call may be in use by the other's.
"""
from contextlib import contextmanager

import torch
from torch import nn

MODES = ("model", "sequential")
CPU = torch.device("cpu")


def enable(networks, mode, device):
    """Offload `networks` ({name: module}) in `mode`, running them on `device`; returns the
    hooks' owner (`.device`, `.remove(device)`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    device = torch.device(device)
    return (ModelOffload if mode == "model" else SequentialOffload)(networks, device)


def default_device():
    """The accelerator to run on: CUDA, else Apple's MPS; ValueError on a machine with neither."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    raise ValueError("enable_offload: this torch sees no GPU to run on; give device= "
                     "(device='cpu' runs the hooks on the CPU, which only tests need)")


class ModelOffload:
    """One network on `device` at a time, the others in CPU memory.

    A network off the device has a forward pre-hook on every module holding weights: the first
    call into any of them brings the whole network (`bring`). The network on the device has no
    hooks, so the sampling loop calls the U-Net with nothing in between.
    """

    def __init__(self, networks, device):
        self.networks, self.device = dict(networks), device
        self.resident = None  # the name of the network on the device
        self.hooks = {}  # name -> hook handles, for each network off the device
        for name, network in self.networks.items():
            move(network, CPU)
            self._arm(name)

    def _arm(self, name):
        def bring(module, args):
            self.bring(name)
        # prepend: before any other pre-hook, which may read the weights
        self.hooks[name] = [module.register_forward_pre_hook(bring, prepend=True)
                            for module in weight_holders(self.networks[name])]

    def bring(self, name):
        """Move network `name` to the device, and the one there back to the CPU. Each is
        armed while it moves, so a move cut short (Ctrl-C) is finished by the next call."""
        previous, self.resident = self.resident, None
        if previous is not None:
            self._arm(previous)
            move(self.networks[previous], CPU)
        move(self.networks[name], self.device)
        for handle in self.hooks.pop(name):
            handle.remove()
        self.resident = name

    def remove(self, device=None):
        """Take the hooks off; every network to `device` (default: the execution device)."""
        for handles in self.hooks.values():
            for handle in handles:
                handle.remove()
        self.hooks, self.resident = {}, None
        for network in self.networks.values():
            move(network, self.device if device is None else device)


class SequentialOffload:
    """Each module's weights on `device` only while a forward that reads them runs.

    The weights rest in CPU memory. A module's pre-hook puts device copies of its own
    parameters and buffers, and of those of its direct children, in their places; its
    post-hook (run even when the forward raises) puts the resting CPU tensors back, and the
    copies are freed (after a KeyboardInterrupt, which torch's hooks do not see, at `remove`).
    The children's come too because a forward may read a child's weight
    without calling the child (CLIP's position embedding table); a count per weight keeps one
    brought by both a module and its parent until both are done. Nothing is copied back: a
    weight changed at rest (a LoRA merged) is what the next call copies. A network's own
    tensors outside any submodule (OpenCLIP's positional embedding and text projection, read
    by its methods rather than in a forward) stay on the device: a few MB.

    The copies replace the Parameter objects for the forward's duration (as accelerate's
    hooks do), which works for every device, the meta device included; at rest the original
    objects are back in place.
    """

    def __init__(self, networks, device):
        self.networks, self.device = dict(networks), device
        self.handles = []
        self.resting = {}  # (module, name) -> (the resting tensor, forwards holding a copy)
        self.kept = []  # (network, name, its resting tensor) of the tensors kept on the device
        for network in self.networks.values():
            move(network, CPU)
            with _plain():
                for owner, name in _slots(network):
                    self.kept.append((owner, name, getattr(owner, name)))
                    setattr(owner, name, _copy_to(getattr(owner, name), device))
            for module in network.modules():
                slots = _slots(module) if module is not network else []
                slots += [slot for child in module.children() for slot in _slots(child)]
                if slots:
                    self._hook(module, slots)

    def _hook(self, module, slots):
        def bring(module, args):
            with _plain():
                for owner, name in slots:
                    resting, count = self.resting.get((owner, name), (getattr(owner, name), 0))
                    if count == 0:
                        setattr(owner, name, _copy_to(resting, self.device))
                    self.resting[owner, name] = (resting, count + 1)

        def drop(module, args, output):
            for owner, name in slots:
                if (owner, name) not in self.resting:  # bring never ran: a hook before it raised
                    continue
                resting, count = self.resting.pop((owner, name))
                if count > 1:
                    self.resting[owner, name] = (resting, count - 1)
                else:
                    setattr(owner, name, resting)
        # prepend: before any other pre-hook, which may read the weights
        self.handles += [module.register_forward_pre_hook(bring, prepend=True),
                         module.register_forward_hook(drop, always_call=True)]

    def remove(self, device=None):
        """Take the hooks off; every network to `device` (default: the execution device)."""
        for handle in self.handles:
            handle.remove()
        # torch runs always-call hooks after an Exception only: a KeyboardInterrupt inside a
        # forward leaves its weights' copies in place, until now
        left = [(owner, name, resting) for (owner, name), (resting, _) in self.resting.items()]
        for owner, name, resting in self.kept + left:
            setattr(owner, name, resting)
        self.handles, self.kept, self.resting = [], [], {}
        for network in self.networks.values():
            move(network, self.device if device is None else device)


def weight_holders(network):
    """The modules of `network` (itself included) that hold parameters or buffers of their own."""
    return [module for module in network.modules() if own_tensors(module)]


def own_tensors(module):
    """The parameters and buffers a module holds itself, not through its submodules."""
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def _slots(module):
    """(module, name) of each parameter and buffer the module holds itself."""
    return [(module, name) for name, tensor in [*module.named_parameters(recurse=False),
                                                *module.named_buffers(recurse=False)]]


def _copy_to(tensor, device):
    """A copy of a parameter (as a Parameter) or buffer on `device`."""
    copy = tensor.detach().to(device, non_blocking=True)
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(copy, requires_grad=tensor.requires_grad)
    return copy


def move(module, device):
    """module.to(device) outside inference mode: tasks run under torch.inference_mode, and a
    weight created there could never again be written outside it (LoRA, training)."""
    with _plain():
        module.to(device)


@contextmanager
def _plain():
    """Neither inference mode nor autograd: weights moved here are ordinary tensors."""
    with torch.inference_mode(False), torch.no_grad():
        yield
