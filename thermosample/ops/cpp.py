"""Loads the compiled CPU extension thermosample._C once; a flag and one warning when it is missing.

`fused_step` wraps `_C.fused_step`: it allocates `out` and `rate` with torch (unless given) and passes raw
data pointers, sizes and a dtype code to the C++ kernel (csrc/fused_step.cpp), which runs without the GIL
on torch's intra-op thread count.

The in-kernel noise runs on one of several CPU paths chosen at run time from the CPU's features
(csrc/noise.h): "avx512", "avx2" or "generic" (the portable loops at the build's -march). `cpu_path()` says
which; the environment variable THERMOSAMPLE_CPU=avx512|avx2|generic|scalar|auto, read once when the
extension loads, forces one (a path this CPU lacks falls back to the best one, with a warning here).
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch

try:
    from .. import _C  # type: ignore[attr-defined]
    _LOAD_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    _LOAD_ERROR = exc

# Storage dtype -> code understood by csrc/fused_step.h (enum DType).
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def available() -> bool:
    """True when thermosample._C imported and provides the fused step."""
    return _C is not None and hasattr(_C, "fused_step")


def version() -> str | None:
    return getattr(_C, "version", lambda: None)() if _C is not None else None


def cpu_path() -> str | None:
    """The CPU path of the in-kernel noise: "avx512", "avx2" or "generic"; None without the extension."""
    fn = getattr(_C, "cpu_path", None)
    return fn() if fn is not None else None


def cpu_paths() -> list[str]:
    """The noise paths this build and CPU can run, best first (empty without the extension)."""
    fn = getattr(_C, "cpu_paths", None)
    return list(fn()) if fn is not None else []


def _check_requested_path() -> None:
    """Warn once when THERMOSAMPLE_CPU names a path that is not the one running (unknown or unsupported)."""
    want = os.environ.get("THERMOSAMPLE_CPU", "")
    if not want or want == "auto" or not available():
        return
    active = cpu_path()
    if active is not None and active != {"scalar": "generic"}.get(want, want):
        warnings.warn(f"THERMOSAMPLE_CPU={want!r}: not available here (paths: {cpu_paths()}); "
                      f"the in-kernel noise runs on {active!r}", RuntimeWarning, stacklevel=2)


_check_requested_path()


def _require() -> None:
    if not available():
        raise RuntimeError(f"thermosample._C is not built or is outdated ({_LOAD_ERROR!r}); "
                           "run `pip install --no-build-isolation -e .` with a C++ compiler present")


def _lazy(t: torch.Tensor) -> bool:
    """True for a view whose values differ from its memory by a lazy conj/neg bit."""
    return t.is_neg() or t.is_conj()


def _resolved(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().resolve_neg() if _lazy(t) else t


def fused_step(inputs: Sequence[torch.Tensor], coeffs: Sequence[float], *, noise: float = 0.0, seed: int = 0,
               step: int = 0, sample_offset: int = 0, track: bool = False, alpha: float = 0.0,
               beta: float = 0.0, u: int = 0, d: int = 1, out: torch.Tensor | None = None,
               rate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused solver step on CPU tensors, same contract as `_reference.fused_step_reference`.

    Inputs are expected validated by ops.py (same shape/dtype, contiguous, CPU); only what would make the
    kernel read or write out of bounds is re-checked here.

    Args:
        inputs: 1 to 6 contiguous CPU tensors [B, ...] (float32, float64, float16, bfloat16).
        coeffs: one Python float per input.
        noise: coefficient of the Philox normal stream (0 draws none).
        track: reduce rate[b] = ||alpha inputs[u][b] + beta inputs[d][b]||^2.
        out: optional contiguous [B, ...] tensor written in place (may be one of the inputs). Inputs
            that are neg/conj views are resolved first; a neg/conj view `out` gets the values through
            copy_.
        rate: optional contiguous float32 [B] tensor the rate is written into (a Run's rate buffer row).
    Returns:
        (out [B, ...], rate [B] float32)
    """
    _require()
    # The kernel reads raw memory: a conj/neg view (torch._neg_view, x.conj()) stores its values with a
    # lazy bit the pointer does not carry, so materialise it first (a no-op for ordinary tensors).
    inputs = [_resolved(t) for t in inputs]
    if out is not None and _lazy(out):
        result, rate = fused_step(inputs, coeffs, noise=noise, seed=seed, step=step, sample_offset=sample_offset,
                                  track=track, alpha=alpha, beta=beta, u=u, d=d, rate=rate)
        out.copy_(result)                      # copy_ honours the view's bit
        return out, rate
    x0 = inputs[0]
    code = _DTYPE_CODES.get(x0.dtype)
    if code is None:
        raise TypeError(f"inputs have dtype {x0.dtype}; expected one of {tuple(_DTYPE_CODES)}")
    shape, dtype = x0.shape, x0.dtype
    for k, t in enumerate(inputs):
        if not t.is_cpu or not t.is_contiguous() or t.shape != shape or t.dtype != dtype:
            raise ValueError(f"inputs[{k}] must be a contiguous CPU tensor matching inputs[0]")
    if out is None:
        out = torch.empty_like(x0, memory_format=torch.contiguous_format)
    elif not out.is_cpu or not out.is_contiguous() or out.shape != shape or out.dtype != dtype:
        raise ValueError("out must be a contiguous CPU tensor matching inputs[0]")
    batch = shape[0]
    if rate is None:
        rate = torch.empty(batch, dtype=torch.float32)
    elif not rate.is_cpu or not rate.is_contiguous() or rate.dtype != torch.float32 or rate.numel() != batch:
        raise ValueError(f"rate must be a contiguous float32 CPU tensor of {batch} elements")
    _C.fused_step([t.data_ptr() for t in inputs], [float(c) for c in coeffs], out.data_ptr(), rate.data_ptr(),
                  batch, x0.numel() // batch if batch else 0, code, float(noise), int(seed), int(step),
                  int(sample_offset), bool(track), float(alpha), float(beta), int(u), int(d),
                  torch.get_num_threads())
    return out, rate


def launch(inputs, coeffs, rates, row, noise, seed, step, sample_offset, track, alpha, beta, u, d) -> torch.Tensor:
    """`fused_step` for arguments ops.CheckedStep accepted (contiguous CPU tensors of one shape and a
    supported dtype, no neg views, Python floats), the rate written into row `row` of `rates` (a Run's
    contiguous float32 [rows, B] buffer): only the pointer work and the kernel call, ~4 us less host time
    per call than the re-checking wrapper with a rate tensor of its own."""
    x0 = inputs[0]
    out = torch.empty_like(x0)                              # x0 is contiguous: out too
    batch = x0.shape[0]
    rate_ptr = rates.data_ptr() + 4 * batch * row          # no row view: its creation alone costs ~0.7 us
    _C.fused_step([t.data_ptr() for t in inputs], coeffs, out.data_ptr(), rate_ptr, batch,
                  x0.numel() // batch, _DTYPE_CODES[x0.dtype], noise, seed, step, sample_offset, track, alpha,
                  beta, u, d, torch.get_num_threads())
    return out


def philox_normal(batch: int, numel: int, *, seed: int, step: int, sample_offset: int = 0) -> torch.Tensor:
    """Standard normal noise [batch, numel] float32 from the C++ Philox stream (as _reference.philox_normal)."""
    _require()
    z = torch.empty(batch, numel, dtype=torch.float32)
    for b in range(batch):
        _C.philox_normal(z[b].data_ptr(), 0, numel, sample_offset + b, step, seed)
    return z
