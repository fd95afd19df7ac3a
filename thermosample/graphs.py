"""CUDA-graph capture of a whole sampling loop, cached per configuration (ts.sample(cuda_graph=True)).

A captured graph replays fixed device addresses with fixed host-side values, so the cache key holds
everything the graph reads that is not copied in before each replay:

- the denoiser object itself (the entry keeps a reference, so its id cannot be recycled by another model
  while the entry lives; a model whose parameters are replaced by new tensors needs a new denoiser),
- the state's shape, dtype and device, the solver, its options, the sigma grid, the seed and sample
  offset, the backend and tracking,
- the structure of `extra_args`: for a tensor its shape, dtype and device, for any other value the value.

The initial state and the values of `extra_args` tensors (class labels, text embeddings) are copied into
static buffers before each replay, so a call with new conditioning of the same shape replays the graph
with that conditioning, never with the tensors of the capture.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

MAX_GRAPHS = 4


def extra_args_signature(extra_args: dict) -> tuple:
    """What a captured graph depends on in `extra_args`: tensor shapes/dtypes/devices and other values."""
    sig = []
    for name in sorted(extra_args):
        value = extra_args[name]
        if isinstance(value, torch.Tensor):
            sig.append((name, "tensor", tuple(value.shape), value.dtype, value.device))
            continue
        try:
            hash(value)
        except TypeError:
            raise ValueError(f"cuda_graph=True needs extra_args of tensors and hashable values; "
                             f"extra_args[{name!r}] is a {type(value).__name__}") from None
        sig.append((name, "value", value))
    return tuple(sig)


def graph_key(run, x: torch.Tensor, options: dict) -> tuple:
    """The cache key of a run (see the module docstring); the denoiser enters by identity."""
    return (id(run.den), tuple(x.shape), x.dtype, x.device, run.solver, tuple(sorted(options.items())),
            tuple(run.sigmas), run.seed, run.sample_offset, run.backend, run.track,
            extra_args_signature(run.extra_args))


@dataclass
class _Entry:
    den: object                 # strong reference: the key's id(den) stays this object's
    graph: object               # has .replay()
    static_x: torch.Tensor
    static_args: dict           # the extra_args tensors the graph reads
    static_out: torch.Tensor
    run: object                 # the captured Run (its rates live in the graph's buffers)


def _capture_cuda(run, static_x: torch.Tensor, solve: Callable, options: dict, make_run: Callable):
    """Warm up on a side stream (lazy inits, Triton compilation), then capture solve() into a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        solve(make_run(), static_x.clone(), run.sigmas, **options)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = solve(run, static_x, run.sigmas, **options)
    return graph, static_out


class GraphCache:
    """LRU cache of captured sampling loops (at most `max_graphs`, each holding its static buffers)."""

    def __init__(self, max_graphs: int = MAX_GRAPHS, capture: Callable = _capture_cuda):
        self.max_graphs = max_graphs
        self.capture = capture
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def run(self, run, x: torch.Tensor, solve: Callable, options: dict, make_run: Callable):
        """Replay (capturing first if needed) the loop of `run` from state `x`; returns (samples, run).

        `make_run()` builds a fresh Run of the same configuration (for the warm-up)."""
        key = graph_key(run, x, options)
        entry = self.entries.get(key)     # id(den) in the key is this den's: the entry holds a reference to it
        if entry is None:
            static_x = x.clone()
            static_args = {k: v.clone() for k, v in run.extra_args.items() if isinstance(v, torch.Tensor)}
            run.extra_args = dict(run.extra_args, **static_args)
            graph, static_out = self.capture(run, static_x, solve, options, make_run)
            entry = self.entries[key] = _Entry(run.den, graph, static_x, static_args, static_out, run)
            while len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        entry.static_x.copy_(x)
        for name, buf in entry.static_args.items():   # this call's conditioning, into the graph's buffers
            buf.copy_(run.extra_args[name])
        entry.graph.replay()
        return entry.static_out.clone(), entry.run

    def clear(self) -> None:
        self.entries.clear()


GRAPHS = GraphCache()
