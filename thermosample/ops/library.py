"""The fused step as a torch.library custom op, so a sampling loop compiles and graph-captures whole.

Two ops, both dispatching to ops.fused_step (and so to the torch / cpp / triton backends):

- ``thermosample::fused_step``   functional: returns a new (out, rate).
- ``thermosample::fused_step_``  in place: writes the result over one of the inputs (``x``, sitting at
  ``position`` in the input order) and returns rate. Its schema says exactly what it mutates, so
  functionalization (torch.compile) and inductor's re-inplacing handle it without copies of the others.

Both have fake (meta) implementations, read no device value on the host and allocate only their outputs,
so a loop of them runs under ``torch.compile(fullgraph=True)`` and inside a CUDA graph. Call them through
``fused_step_op``, which picks the op from ``out`` and keeps the public argument conventions (a seed in
[0, 2**64) travels through the int64 schema as its two's complement).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import ops
from ..validate import UINT64 as _UINT64
from ..validate import check_seed

_INT64_MAX = 2 ** 63 - 1


def _seed_to_schema(seed: int) -> int:
    check_seed(seed)
    return seed - _UINT64 if seed > _INT64_MAX else seed


def _seed_from_schema(seed: int) -> int:
    return seed % _UINT64


@torch.library.custom_op("thermosample::fused_step", mutates_args=())
def _fused_step(inputs: list[Tensor], coeffs: list[float], noise: float, seed: int, step: int,
                sample_offset: int, track: bool, alpha: float, beta: float, u: int, d: int,
                backend: str) -> tuple[Tensor, Tensor]:
    out, rate = ops.fused_step(list(inputs), coeffs, noise=noise, seed=_seed_from_schema(seed), step=step,
                               sample_offset=sample_offset, track=track, alpha=alpha, beta=beta, u=u, d=d,
                               backend=backend)
    return out, rate


@_fused_step.register_fake
def _fused_step_fake(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, backend):
    x0 = inputs[0]
    out = x0.new_empty(x0.shape)                                   # contiguous, as every backend returns
    return out, x0.new_empty((x0.shape[0],), dtype=torch.float32)


@torch.library.custom_op("thermosample::fused_step_", mutates_args=("x",))
def _fused_step_(x: Tensor, others: list[Tensor], position: int, coeffs: list[float], noise: float, seed: int,
                 step: int, sample_offset: int, track: bool, alpha: float, beta: float, u: int, d: int,
                 backend: str) -> Tensor:
    inputs = list(others[:position]) + [x] + list(others[position:])
    _, rate = ops.fused_step(inputs, coeffs, noise=noise, seed=_seed_from_schema(seed), step=step,
                             sample_offset=sample_offset, track=track, alpha=alpha, beta=beta, u=u, d=d,
                             out=x, backend=backend)
    return rate


@_fused_step_.register_fake
def _fused_step_inplace_fake(x, others, position, coeffs, noise, seed, step, sample_offset, track, alpha, beta,
                             u, d, backend):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _needs_op(inputs) -> bool:
    """True when the call must go through torch.library: under torch.compile / export tracing, for
    tensor subclasses (FakeTensor, functional tensors) and for inputs that require grad."""
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    return any(type(t) is not torch.Tensor or (grad and t.requires_grad) for t in inputs)


def fused_step_op(inputs: Sequence[Tensor], coeffs: Sequence[float], *, noise: float = 0.0, seed: int = 0,
                  step: int = 0, sample_offset: int = 0, track: bool = False, alpha: float = 0.0,
                  beta: float = 0.0, u: int = 0, d: int = 1, out: Tensor | None = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The fused solver step (ops.fused_step) through the torch.library ops: compile- and graph-safe.

    Args:
        inputs: 1-6 tensors [B, ...] of one shape, dtype and device.
        coeffs: Python floats, one per input.
        noise, seed, step, sample_offset: Philox noise coefficient and stream key (ops/reference.py).
        track, alpha, beta, u, d: rate[b] = ||alpha inputs[u][b] + beta inputs[d][b]||^2 (docs/theory.md §2).
        out: None (a new tensor), one of `inputs` (updated in place: the cheap path for a sampler's
            state), or another tensor [B, ...] (filled with a copy of the result).
        backend: "auto" | "torch" | "cpp" | "triton".
    Returns:
        (out [B, ...], rate [B] float32)
    """
    inputs = list(inputs)
    if not _needs_op(inputs):
        # Plain eager call: skip the dispatcher (~100 us of host time per step, more than a small
        # state's kernel); torch.compile tracing and autograd inputs still go through the registered op.
        return ops.fused_step(inputs, coeffs, noise=noise, seed=seed, step=step, sample_offset=sample_offset,
                              track=track, alpha=alpha, beta=beta, u=u, d=d, out=out, backend=backend)
    args = (coeffs if isinstance(coeffs, list) else list(coeffs), float(noise), _seed_to_schema(seed), step,
            sample_offset, bool(track), float(alpha), float(beta), u, d, backend)
    if out is not None:
        hits = [k for k, t in enumerate(inputs) if t is out]
        if len(hits) == 1:
            position = hits[0]
            rate = _fused_step_(out, inputs[:position] + inputs[position + 1:], position, *args)
            return out, rate
    result, rate = _fused_step(inputs, *args)
    if out is None:
        return result, rate
    out.copy_(result)              # out is a separate buffer (or listed twice among the inputs)
    return out, rate
