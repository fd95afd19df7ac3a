"""The fused step's arguments: one object, checked in one place, that every backend launches.

`StepArgs` mirrors the C++ struct of the same name in csrc/fused_step.h, field for field (the struct's
n_inputs, batch, numel and dtype are read off the tensors). `check` is the only validation of those
arguments: the public op, the torch.library ops and the backends' keyword entries all go through it, and
a backend's `launch(args)` trusts what it returns. `is_plain_call` is the same rules, as one cheap test,
for a run's calls after its first passed `check` (issue 15: host time per step).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from ..validate import UINT64 as _UINT64
from ..validate import check_seed
from ..validate import is_int as _is_int

MAX_INPUTS = 6       # input slots of the op; thermosample/ops/cpp.py checks the extension has as many
MAX_THREADS = 1024   # most CPU threads one step may ask for (csrc kMaxThreads; cpp.py checks it too)
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_UINT32 = 2 ** 32
_STRIDED = torch.strided


class StepArgs(NamedTuple):
    """One fused step: out = sum_k coeffs[k] inputs[k] + noise z, and the per-sample rate (the contract is
    thermosample/ops/reference.py's). A NamedTuple: immutable, and built in about a microsecond, which a
    run pays once per step (a frozen dataclass takes several).

    Attributes:
        inputs: 1 to MAX_INPUTS tensors [B, ...] of one shape, dtype (SUPPORTED_DTYPES) and device.
        coeffs: one finite Python float per input.
        out: None (a new tensor) or a contiguous [B, ...] tensor, possibly one of the inputs (in place).
        rate: None or a contiguous float32 [B] tensor on the inputs' device that receives the rate.
        noise: coefficient of the Philox normals keyed by (seed, sample_offset + b, step, element).
        seed, step, sample_offset: seed in [0, 2**64), step in [0, 2**32), sample_offset + B <= 2**32.
        track, alpha, beta, u, d: rate[b] = ||alpha inputs[u][b] + beta inputs[d][b]||^2 with track
            (docs/theory.md §2); without it rate[b] is 0, or NaN where out[b] holds a non-finite value.
        num_threads: CPU threads of the cpp backend, 0 to MAX_THREADS (0: torch.get_num_threads() at launch).
    """

    inputs: Sequence[torch.Tensor]
    coeffs: Sequence[float]
    out: torch.Tensor | None = None
    rate: torch.Tensor | None = None
    noise: float = 0.0
    seed: int = 0
    step: int = 0
    sample_offset: int = 0
    track: bool = False
    alpha: float = 0.0
    beta: float = 0.0
    u: int = 0
    d: int = 1
    num_threads: int = 0


def check(a: StepArgs) -> StepArgs:
    """Raise ValueError/TypeError for anything a kernel could misread; return `a` as backends take it:
    inputs contiguous and without a lazy neg/conj bit, coefficients, noise, alpha and beta as floats, the
    seed as a Python int, track as a bool."""
    inputs, coeffs = a.inputs, a.coeffs
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError("inputs must be a list or tuple of tensors")
    if not 1 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"inputs must hold 1 to {MAX_INPUTS} tensors, got {len(inputs)}")
    if isinstance(coeffs, torch.Tensor) or not isinstance(coeffs, (list, tuple)):
        raise TypeError(f"coeffs must be a list or tuple of Python floats, got {type(coeffs).__name__}")
    if len(coeffs) != len(inputs):
        raise ValueError(f"coeffs must have one value per input ({len(inputs)}), got {len(coeffs)}")
    first = inputs[0]
    for k, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"inputs[{k}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"inputs[{k}] has dtype {t.dtype}; expected one of {SUPPORTED_DTYPES}")
        if t.layout != _STRIDED:
            raise TypeError(f"inputs[{k}] has layout {t.layout}; expected a dense (torch.strided) tensor")
        if t.device.type == "meta":
            raise ValueError(f"inputs[{k}] is on the meta device (no data); sample on a real device")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"inputs[{k}] is {tuple(t.shape)} {t.dtype} on {t.device}; every input must "
                             f"match inputs[0]: {tuple(first.shape)} {first.dtype} on {first.device}")
    if first.dim() < 1 or first.shape[0] < 1:
        raise ValueError(f"inputs must have shape [B, ...] with B >= 1, got {tuple(first.shape)}")
    batch = first.shape[0]
    for k, c in enumerate(list(coeffs) + [a.noise, a.alpha, a.beta]):
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not _finite(c):
            raise TypeError(f"coefficients must be finite Python floats, got {c!r} (position {k})")
    seed = check_seed(a.seed)
    if not _is_int(a.step) or not 0 <= a.step < _UINT32:
        raise ValueError(f"step must be an int in [0, 2**32), got {a.step!r}")
    if not _is_int(a.sample_offset) or a.sample_offset < 0 or a.sample_offset + batch > _UINT32:
        raise ValueError(f"sample_offset must be an int >= 0 with sample_offset + B <= 2**32, "
                         f"got {a.sample_offset!r}")
    if a.track and not (_is_int(a.u) and _is_int(a.d) and 0 <= a.u < len(inputs) and 0 <= a.d < len(inputs)):
        raise ValueError(f"u and d must index inputs (0..{len(inputs) - 1}), got u={a.u!r}, d={a.d!r}")
    if not _is_int(a.num_threads) or not 0 <= a.num_threads <= MAX_THREADS:
        raise ValueError(f"num_threads must be an int in [0, {MAX_THREADS}] (0: torch's thread count), "
                         f"got {a.num_threads!r}")
    _check_out(a.out, inputs)
    if a.rate is not None:
        r = a.rate
        if not isinstance(r, torch.Tensor):
            raise TypeError(f"rate must be a torch.Tensor, got {type(r).__name__}")
        if r.shape != (batch,) or r.dtype != torch.float32 or r.device != first.device or not r.is_contiguous() \
                or r.is_neg():
            raise ValueError(f"rate must be a contiguous float32 tensor [{batch}] on {first.device}, got "
                             f"{tuple(r.shape)} {r.dtype} on {r.device}")
        for k, t in enumerate(list(inputs) + ([a.out] if a.out is not None else [])):
            if _overlaps(r, t):
                what = f"inputs[{k}]" if k < len(inputs) else "out"
                raise ValueError(f"rate shares memory with {what}; pass a separate tensor")
    return a._replace(inputs=tuple(_plain(t) for t in inputs), coeffs=tuple(float(c) for c in coeffs), seed=seed,
                      noise=float(a.noise), alpha=float(a.alpha), beta=float(a.beta), track=bool(a.track))


def _check_out(out, inputs) -> None:
    if out is None:
        return
    first = inputs[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != first.shape or out.dtype != first.dtype or out.device != first.device:
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype} on {out.device}; expected "
                         f"{tuple(first.shape)} {first.dtype} on {first.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    for k, t in enumerate(inputs):
        # Writing over an input element for element is fine (each element is read before written).
        same = t.data_ptr() == out.data_ptr() and t.is_contiguous()
        if not same and _overlaps(t, out):
            raise ValueError(f"out partially overlaps inputs[{k}]; pass a separate tensor or the input itself")


def is_plain_call(a: StepArgs, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> bool:
    """True when `check(a)` would pass and return `a` unchanged, for a run whose inputs of this shape, dtype
    and device passed `check` before: plain contiguous tensors of that kind, Python float coefficients, ints
    in range, no `out` or `rate`. It also asks for no autograd and no torch.compile tracing, so that the
    caller may launch `a` as it is; anything else takes `check` (and its messages) and the torch.library op."""
    threads = a.num_threads
    if a.out is not None or a.rate is not None or type(threads) is not int or not 0 <= threads <= MAX_THREADS:
        return False
    return is_plain_step(a.inputs, a.coeffs, a.noise, a.seed, a.step, a.sample_offset, a.track, a.alpha, a.beta,
                         a.u, a.d, shape, dtype, device)


def is_plain_step(inputs, coeffs, noise, seed, step, offset, track, alpha, beta, u, d, shape: torch.Size,
                  dtype: torch.dtype, device: torch.device) -> bool:
    """is_plain_call on the fields of a step without `out`, `rate` and `num_threads`, as a run passes them."""
    n = len(inputs)
    if not (0 < n <= MAX_INPUTS and len(coeffs) == n and type(step) is int and 0 <= step < _UINT32):
        return False
    if not (type(seed) is int and 0 <= seed < _UINT64 and type(offset) is int and 0 <= offset <= _UINT32 - shape[0]):
        return False
    if type(track) is not bool or track and not (type(u) is int and type(d) is int and 0 <= u < n and 0 <= d < n):
        return False
    if type(noise) is not float or type(alpha) is not float or type(beta) is not float:
        return False
    total = noise + alpha + beta  # finite floats sum to a finite value, or overflow: then the full check
    for c in coeffs:
        if type(c) is not float:
            return False
        total += c
    if not math.isfinite(total):
        return False
    grad = torch.is_grad_enabled()
    for t in inputs:
        if (type(t) is not torch.Tensor or t.shape != shape or t.dtype != dtype or t.device != device
                or t.layout is not _STRIDED or not t.is_contiguous() or t.is_neg() or (grad and t.requires_grad)):
            return False
    return not torch.compiler.is_compiling()


def launch_checked(launch: Callable[[StepArgs], tuple], a: StepArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """`launch(a)` for arguments `check` returned. The kernels write raw memory, so an `out` with a lazy
    neg/conj bit (torch._neg_view) receives the result through copy_, which honours the bit."""
    out = a.out
    if out is None or not (out.is_neg() or out.is_conj()):
        return launch(a)
    result, rate = launch(a._replace(out=None))
    out.copy_(result)
    return out, rate


def keyword_entry(launch: Callable[[StepArgs], tuple]) -> Callable:
    """A backend's `launch(StepArgs)` as fused_step(inputs, coeffs, **fields), checked: how tests and
    benchmarks call one backend directly (ops.fused_step picks the backend by device)."""
    def fused_step(inputs, coeffs, **fields) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_checked(launch, check(StepArgs(inputs, coeffs, **fields)))
    fused_step.__doc__ = f"{launch.__module__}.launch on check(StepArgs(inputs, coeffs, **fields))."
    return fused_step


def _plain(t: torch.Tensor) -> torch.Tensor:
    """t as a contiguous tensor whose memory holds its values (kernels read raw memory, not lazy bits)."""
    if t.is_neg() or t.is_conj():
        t = t.resolve_conj().resolve_neg()
    return t if t.is_contiguous() else t.contiguous()


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:          # an int too large for a float (10**400)
        return False


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [lo, hi) that t's elements occupy, whatever storage object it came through (two
    storages may share memory: from_numpy, frombuffer, DLPack); empty for a tensor without elements."""
    if t.numel() == 0:
        return 0, 0
    if t.is_contiguous():
        lo = t.data_ptr()
        return lo, lo + t.nbytes
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    size = t.element_size()
    return t.data_ptr() + lo * size, t.data_ptr() + (hi + 1) * size


def memory_extent(t: torch.Tensor) -> tuple:
    """(device, storage address, first byte, end byte) of t's elements: what `shares_memory` compares, taken
    once per tensor (a run keeps these for its model's recent outputs, not the outputs themselves)."""
    return (t.device, t.untyped_storage().data_ptr(), *_span(t))


def extents_share(a: tuple, b: tuple) -> bool:
    """True when two memory_extent()s are of one storage (its address; 0 is no storage) or their elements'
    bytes overlap on one device."""
    return a[0] == b[0] and (a[1] == b[1] != 0 or a[2] < b[3] and b[2] < a[3])


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b live in one storage (whichever elements they cover) or their elements' memory
    overlaps through different storage objects: how a run tells that a model returns views of a buffer it
    keeps (`buf[:B]`, `buf.view(...)`, halves in turn) rather than new tensors."""
    return extents_share(memory_extent(a), memory_extent(b))


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b share memory (compared by address range on one device, not by storage object)."""
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a.device == b.device and a0 < b1 and b0 < a1
