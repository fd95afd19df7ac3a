"""The fused solver step: validation and backend dispatch.

Every solver step is `out = sum_k c_k in_k + c_z z` with a per-sample rate reduction (see
_reference.py for the exact contract and the Philox noise stream). Three backends implement it:

- "torch":  thermosample._reference, any device (the oracle)
- "cpp":    thermosample._C via thermosample._cpp, CPU tensors
- "triton": thermosample.kernels.fused_step, CUDA tensors

"auto" picks cpp on CPU and triton on CUDA; a missing backend falls back to torch with one warning.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import torch

from . import reference
from ..errors import BackendUnavailableWarning

BACKENDS = ("auto", "torch", "cpp", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_INPUTS = 4
_UINT32 = 2 ** 32
_UINT64 = 2 ** 64


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, BackendUnavailableWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (computed once, lazily)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        from ..kernels import fused_step  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def cpp_available() -> bool:
    """True when the compiled CPU extension thermosample._C loaded."""
    from . import cpp
    return cpp.available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a backend request into the backend that will run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        elif device.type == "cpu":
            backend = "cpp"
        else:
            return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got device {device}")
        if not cpp_available():
            _warn_once("thermosample._C is not built; the 'cpp' backend falls back to 'torch' "
                       "(reinstall with a C++ compiler present to get the fused CPU kernels)")
            return "torch"
    if backend == "triton":
        if device.type != "cuda":
            raise ValueError(f"backend='triton' runs on CUDA tensors, got device {device}")
        if not triton_available():
            _warn_once("Triton is not available; the 'triton' backend falls back to 'torch'")
            return "torch"
    return backend


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_step_args(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, out):
    """Raise ValueError/TypeError for anything a kernel could misread; return the inputs as a tuple."""
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
        if t.layout != torch.strided:
            raise TypeError(f"inputs[{k}] has layout {t.layout}; expected a dense (torch.strided) tensor")
        if t.device.type == "meta":
            raise ValueError(f"inputs[{k}] is on the meta device (no data); sample on a real device")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"inputs[{k}] is {tuple(t.shape)} {t.dtype} on {t.device}; every input must "
                             f"match inputs[0]: {tuple(first.shape)} {first.dtype} on {first.device}")
    if first.dim() < 1 or first.shape[0] < 1:
        raise ValueError(f"inputs must have shape [B, ...] with B >= 1, got {tuple(first.shape)}")
    for k, c in enumerate(list(coeffs) + [noise, alpha, beta]):
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
            raise TypeError(f"coefficients must be finite Python floats, got {c!r} (position {k})")
    if not _is_int(seed) or not 0 <= seed < _UINT64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not _is_int(step) or not 0 <= step < _UINT32:
        raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
    if not _is_int(sample_offset) or sample_offset < 0 or sample_offset + first.shape[0] > _UINT32:
        raise ValueError(f"sample_offset must be an int >= 0 with sample_offset + B <= 2**32, got {sample_offset!r}")
    if track and not (_is_int(u) and _is_int(d) and 0 <= u < len(inputs) and 0 <= d < len(inputs)):
        raise ValueError(f"u and d must index inputs (0..{len(inputs) - 1}), got u={u!r}, d={d!r}")
    if out is not None:
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
    return tuple(t if t.is_contiguous() else t.contiguous() for t in inputs)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()
    b0, b1 = b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()
    return a0 < b1 and b0 < a1


def fused_step(inputs: Sequence[torch.Tensor], coeffs: Sequence[float], *, noise: float = 0.0, seed: int = 0,
               step: int = 0, sample_offset: int = 0, track: bool = False, alpha: float = 0.0,
               beta: float = 0.0, u: int = 0, d: int = 1, out: torch.Tensor | None = None,
               backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One fused solver step: out = sum_k coeffs[k] inputs[k] + noise z, with the per-sample rate.

    Args:
        inputs: 1-4 tensors [B, ...] of one shape, dtype (float32/64, float16, bfloat16) and device.
        coeffs: Python floats, one per input.
        noise: coefficient of Philox normal noise keyed by (seed, sample_offset + b, step, element).
        track: reduce rate[b] = ||alpha inputs[u][b] + beta inputs[d][b]||^2 (THEORY.md §2); without
            it rate[b] is 0, or NaN where out[b] holds a non-finite value.
        out: optional output tensor; may be one of the inputs (in-place update).
        backend: "auto" | "torch" | "cpp" | "triton".
    Returns:
        (out [B, ...], rate [B] float32).
    """
    inputs = validate_step_args(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, out)
    kwargs = dict(noise=float(noise), seed=seed, step=step, sample_offset=sample_offset, track=bool(track),
                  alpha=float(alpha), beta=float(beta), u=u, d=d, out=out)
    coeffs = [float(c) for c in coeffs]
    chosen = resolve_backend(backend, inputs[0].device)
    if chosen == "cpp":
        from . import cpp
        return cpp.fused_step(inputs, coeffs, **kwargs)
    if chosen == "triton":
        from ..kernels import fused_step as triton_fused_step
        return triton_fused_step.fused_step(inputs, coeffs, **kwargs)
    return reference.fused_step_reference(inputs, coeffs, **kwargs)


def randn(shape, *, seed: int, step: int, sample_offset: int = 0, dtype=torch.float32, device=None,
          backend: str = "auto") -> torch.Tensor:
    """Standard normal tensor [B, ...] from the Philox stream (the fused op on a zero input)."""
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    out, _ = fused_step([zeros], [0.0], noise=1.0, seed=seed, step=step, sample_offset=sample_offset,
                        out=zeros, backend=backend)
    return out
