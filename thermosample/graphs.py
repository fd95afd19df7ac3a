"""CUDA-graph capture of a whole sampling loop, cached per configuration (ts.sample(cuda_graph=True)).

A captured graph replays fixed device addresses with fixed host-side values, so the cache key holds
everything the graph reads that is not copied in before each replay:

- the denoiser object itself (the entry keeps a reference, so its id cannot be recycled by another model
  while the entry lives; a model whose parameters are replaced by new tensors needs a new denoiser),
- the state's shape, dtype and device, the solver, its options, the sigma grid, the seed (of a run that
  injects noise: a deterministic run draws none in the loop) and sample offset, the backend and tracking,
- the structure of `extra_args`: for a tensor its shape, dtype and device, for any other value the value.

The initial state and the values of `extra_args` tensors (class labels, text embeddings) are copied into
static buffers before each replay, so a call with new conditioning of the same shape replays the graph
with that conditioning, never with the tensors of the capture. When the model is a torch.nn.Module (the
denoiser, or its `.model`), the key also holds the addresses of its parameters and buffers: weights
updated in place replay correctly, and weights replaced by new tensors (`.to()`, `.half()`, assigning a
new Parameter) make a new key, not a stale replay.

`ts.sample` on CUDA uses this cache by itself (`cuda_graph=None`, `GraphCache.run_auto`) where capture is
safe: a run without Python hooks, without autograd, of a torch.nn.Module model; the first run of a
configuration runs eagerly, a repeat captures and replays it; a capture that fails is remembered for the
configuration, which then runs eagerly, and the reason is logged at debug level (logger "thermosample").
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

MAX_GRAPHS = 4
MAX_REMEMBERED = 64          # configurations remembered as seen once, or as failing to capture
log = logging.getLogger("thermosample")


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


def model_module(den) -> torch.nn.Module | None:
    """The torch.nn.Module a denoiser runs: the denoiser itself or its `.model`; None for other callables."""
    for candidate in (den, getattr(den, "model", None)):
        if isinstance(candidate, torch.nn.Module):
            return candidate
    return None


def weights_signature(den) -> tuple:
    """The addresses of the model's parameters and buffers (empty when it is not a torch.nn.Module)."""
    module = model_module(den)
    if module is None:
        return ()
    return tuple(t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers()))


def graph_key(run, x: torch.Tensor, options: dict) -> tuple:
    """The cache key of a run (see the module docstring); the denoiser enters by identity."""
    return (id(run.den), tuple(x.shape), x.dtype, x.device, run.solver, tuple(sorted(options.items())),
            tuple(run.sigmas), run.seed if run.stochastic else None, run.sample_offset, run.backend, run.track,
            extra_args_signature(run.extra_args), weights_signature(run.den))


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
        self.seen: OrderedDict[tuple, None] = OrderedDict()      # run once eagerly (run_auto)
        self.failed: OrderedDict[tuple, str] = OrderedDict()     # capture failed: eager from then on

    def run_auto(self, run, x: torch.Tensor, solve: Callable, options: dict, make_run: Callable):
        """`run` for ts.sample's automatic graphs: (samples, run) replayed from a graph, or None when this
        call should run eagerly: the configuration's first run (a one-off call pays no capture), or one
        whose capture failed before. A capture that fails now is remembered and logged at debug level;
        the caller then runs eagerly on a fresh Run (the failed capture may have used this one)."""
        try:
            key = graph_key(run, x, options)
        except ValueError as exc:                     # unhashable extra_args
            log.debug("thermosample: no CUDA graph: %s", exc)
            return None
        if key not in self.entries:
            if key in self.failed:
                return None
            if key not in self.seen:
                _remember(self.seen, key, None)
                return None
        try:
            return self.run(run, x, solve, options, make_run)
        except Exception as exc:                      # the model cannot be captured (host sync, CPU work)
            _remember(self.failed, key, f"{type(exc).__name__}: {exc}")
            log.debug("thermosample: CUDA graph capture failed, running eagerly from now on for this "
                      "configuration (%s: %s)", type(exc).__name__, exc)
            return None

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
        self.seen.clear()
        self.failed.clear()


def _remember(table: OrderedDict, key: tuple, value) -> None:
    table[key] = value
    while len(table) > MAX_REMEMBERED:
        table.popitem(last=False)


GRAPHS = GraphCache()
