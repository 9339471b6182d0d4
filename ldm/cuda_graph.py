"""Take the host out of the denoising loop: record the U-Net's forward once as a CUDA graph,
then replay it at every step.

Why: one SD 1.5 U-Net forward at batch 2 is about a thousand kernel launches. On an H100 the
GPU ran them in ~14 ms, but Python and the launch path took ~31 ms to issue them
(benchmarks/RESULTS.md): the GPU waited on the host. A CUDA graph is that sequence of launches
with every argument recorded; replaying it is one call, so the host's share all but vanishes.

A recorded graph reads and writes fixed addresses, so
  - inputs are copied into the static tensors it was recorded with, and its static output is
    cloned before it is returned (the next replay overwrites it);
  - one graph is recorded per input signature (shapes, dtypes, device): a new image size or
    batch records another, each keeping one forward's activations on the GPU until `reset()`;
  - the weights must stay where they were: if a parameter moves (`.half()`, `.to(…)`), the
    graphs are dropped and recorded again;
  - nothing in the forward may wait on the host (no .item(), no CPU tensors): the models have
    no such call, and tests/test_compile_and_graphs.py traces them whole to keep it so;
  - cuDNN, cuBLAS and Triton choose and compile kernels on their first calls, which cannot
    happen while recording: two warm-up calls run first, on a side stream, as PyTorch's CUDA
    graph notes prescribe.

CPU tensors pass straight through to the wrapped function.
"""
import torch


class CUDAGraphed:
    """fn(*tensors, **tensors) -> tensor, replayed from a CUDA graph recorded per input
    signature (positions, keyword names, shapes, dtypes, devices).

    module: the nn.Module whose parameters fn reads (checked for moves before each call);
    fn: defaults to the module itself. Example, for the U-Net's (x, t, **cond):
        unet_step = CUDAGraphed(unet)      # x (B, 4, h, w), t (B,), context (B, 77, D)
        eps = unet_step(x, t, **cond)      # the same ε as unet(x, t, **cond)
    """

    def __init__(self, module, fn=None, warmup_calls=2):
        self.module = module
        self.fn = module if fn is None else fn
        self.warmup_calls = warmup_calls
        self.graphs = {}  # signature -> (graph, static inputs, static output)
        self._weights = None  # the parameters' addresses the graphs were recorded with

    def __call__(self, *args, **kwargs):
        inputs = [*args, *kwargs.values()]
        if not all(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
            return self.fn(*args, **kwargs)
        weights = [p.data_ptr() for p in self.module.parameters()]
        if weights != self._weights:
            self.reset()
            self._weights = weights
        signature = (len(args), *kwargs, *((x.shape, x.dtype, x.device) for x in inputs))
        if signature not in self.graphs:
            self.graphs[signature] = self._record(args, kwargs)
        graph, static_inputs, static_output = self.graphs[signature]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return static_output.clone()

    def reset(self):
        """Drop every recorded graph and the GPU memory it holds."""
        self.graphs.clear()
        self._weights = None

    def _record(self, args, kwargs):
        with torch.cuda.device(args[0].device):
            static_args = [x.clone() for x in args]
            static_kwargs = {name: x.clone() for name, x in kwargs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup_calls):
                    self.fn(*static_args, **static_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.fn(*static_args, **static_kwargs)
        return graph, [*static_args, *static_kwargs.values()], static_output
