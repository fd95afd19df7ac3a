"""The fused step as a torch.library custom op, so a sampling loop compiles and graph-captures whole.

Two ops, both dispatching to ops.fused_step (and so to the torch / cpp / triton backends):

- ``thermosample::fused_step``   functional: returns a new (out, rate).
- ``thermosample::fused_step_``  in place: writes the result over one of the inputs (``x``, sitting at
  ``position`` in the input order) and returns rate. Its schema says exactly what it mutates, so
  functionalization (torch.compile) and inductor's re-inplacing handle it without copies of the others.

Both have fake (meta) implementations, read no device value on the host and allocate only their outputs,
so a loop of them runs under ``torch.compile(fullgraph=True)`` and inside a CUDA graph. Call them through
``fused_step_op``, which picks the op from ``out`` and keeps the public argument conventions (a seed in
[0, 2**64) travels through the int64 schema as its two's complement). The op's arguments are checked
where every call's are, in ops.launch (thermosample/ops/contract.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..validate import UINT64 as _UINT64
from ..validate import check_seed
from .contract import StepArgs

_INT64_MAX = 2 ** 63 - 1


def _seed_to_schema(seed: int) -> int:
    check_seed(seed)
    return seed - _UINT64 if seed > _INT64_MAX else seed


def _seed_from_schema(seed: int) -> int:
    return seed % _UINT64


# The schemas spell out StepArgs (thermosample/ops/contract.py) as torch.library types, less `out`, `rate`
# and `num_threads`: the in-place op's `x` is the out, and the rate is the op's result.
@torch.library.custom_op("thermosample::fused_step", mutates_args=())
def _fused_step(inputs: list[Tensor], coeffs: list[float], noise: float, seed: int, step: int,
                sample_offset: int, track: bool, alpha: float, beta: float, u: int, d: int,
                backend: str) -> tuple[Tensor, Tensor]:
    args = StepArgs(list(inputs), coeffs, noise=noise, seed=_seed_from_schema(seed), step=step,
                    sample_offset=sample_offset, track=track, alpha=alpha, beta=beta, u=u, d=d)
    return ops.launch(args, backend)


@_fused_step.register_fake
def _fused_step_fake(inputs, *scalars):
    x0 = inputs[0]
    out = x0.new_empty(x0.shape)                                   # contiguous, as every backend returns
    return out, x0.new_empty((x0.shape[0],), dtype=torch.float32)


@torch.library.custom_op("thermosample::fused_step_", mutates_args=("x",))
def _fused_step_(x: Tensor, others: list[Tensor], position: int, coeffs: list[float], noise: float, seed: int,
                 step: int, sample_offset: int, track: bool, alpha: float, beta: float, u: int, d: int,
                 backend: str) -> Tensor:
    _check_position(position, others)
    inputs = list(others[:position]) + [x] + list(others[position:])
    args = StepArgs(inputs, coeffs, out=x, noise=noise, seed=_seed_from_schema(seed), step=step,
                    sample_offset=sample_offset, track=track, alpha=alpha, beta=beta, u=u, d=d)
    return ops.launch(args, backend)[1]


@_fused_step_.register_fake
def _fused_step_inplace_fake(x, others, position, *rest):
    _check_position(position, others)
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _check_position(position: int, others) -> None:
    """`x` goes at `position` among the inputs: 0 to len(others) (Python slicing would take any int)."""
    if not 0 <= position <= len(others):
        raise ValueError(f"position must be in [0, {len(others)}] (the index of x among the {len(others) + 1} "
                         f"inputs), got {position}")


def _needs_op(inputs) -> bool:
    """True when the call must go through torch.library: under torch.compile / export tracing, for
    tensor subclasses (FakeTensor, functional tensors) and for inputs that require grad."""
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    return any(type(t) is not torch.Tensor or (grad and t.requires_grad) for t in inputs)


def fused_step_op(inputs, coeffs, *, backend: str = "auto", **fields) -> tuple[Tensor, Tensor]:
    """The fused solver step (ops.fused_step, same arguments) through the torch.library ops: compile- and
    graph-safe.

    `out` may be None (a new tensor), one of `inputs` (updated in place: the cheap path for a sampler's
    state), or another tensor [B, ...] (filled with a copy of the result). Returns (out [B, ...], rate [B]
    float32).
    """
    inputs = list(inputs)
    if not _needs_op(inputs):
        # Plain eager call: skip the dispatcher (~100 us of host time per step, more than a small
        # state's kernel); torch.compile tracing and autograd inputs still go through the registered op.
        return ops.fused_step(inputs, coeffs, backend=backend, **fields)
    a = StepArgs(inputs, coeffs, **fields)
    if a.rate is not None or a.num_threads:
        raise ValueError("rate= and num_threads= are for eager calls (ops.fused_step), not the torch.library op")
    scalars = (list(a.coeffs), float(a.noise), _seed_to_schema(a.seed), a.step, a.sample_offset, bool(a.track),
               float(a.alpha), float(a.beta), a.u, a.d, backend)
    out = a.out
    if out is not None:
        hits = [k for k, t in enumerate(inputs) if t is out]
        if len(hits) == 1:
            position = hits[0]
            rate = _fused_step_(out, inputs[:position] + inputs[position + 1:], position, *scalars)
            return out, rate
    result, rate = _fused_step(inputs, *scalars)
    if out is None:
        return result, rate
    out.copy_(result)              # out is a separate buffer (or listed twice among the inputs)
    return out, rate
