"""Loads the compiled CPU extension thermosample._C once; a flag and one warning when it is missing.

`launch(StepArgs)` calls `_C.fused_step` (csrc/module.cpp): it allocates `out` and `rate` with torch
(unless given) and passes raw data pointers, sizes and a dtype code to the C++ kernel
(csrc/fused_step.cpp), which runs without the GIL on torch's intra-op thread count.

The in-kernel noise runs on one of several CPU paths chosen at run time from the CPU's features
(csrc/noise.h): "avx512", "avx2" or "generic" (the portable loops at the build's -march). `cpu_path()` says
which; the environment variable THERMOSAMPLE_CPU=avx512|avx2|generic|scalar|auto, read once when the
extension loads, forces one (a path this CPU lacks falls back to the best one, with a warning here).
"""
from __future__ import annotations

import os
import warnings

import torch

from .contract import MAX_INPUTS, MAX_THREADS, StepArgs, keyword_entry

try:
    from .. import _C  # type: ignore[attr-defined]
    if _C.MAX_INPUTS != MAX_INPUTS:      # kMaxInputs of csrc/fused_step.h
        raise ImportError(f"thermosample._C takes {_C.MAX_INPUTS} inputs, thermosample.ops {MAX_INPUTS}")
    if getattr(_C, "MAX_THREADS", None) != MAX_THREADS:     # kMaxThreads of csrc/fused_step.h
        raise ImportError(f"thermosample._C is outdated (MAX_THREADS {getattr(_C, 'MAX_THREADS', None)}, "
                          f"thermosample.ops {MAX_THREADS})")
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


def launch(a: StepArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused step on CPU tensors for arguments contract.check passed (contiguous, of one shape and a
    supported dtype): `out` and `rate` allocated with torch unless given, then raw pointers, sizes and
    a dtype code to the C++ kernel. Returns (out [B, ...], rate [B] float32)."""
    _require()
    x0 = a.inputs[0]
    batch = x0.shape[0]
    out = torch.empty_like(x0) if a.out is None else a.out      # x0 is contiguous: out too
    rate = torch.empty(batch, dtype=torch.float32) if a.rate is None else a.rate
    _C.fused_step([t.data_ptr() for t in a.inputs], a.coeffs, out.data_ptr(), rate.data_ptr(), batch,
                  x0.numel() // batch, _DTYPE_CODES[x0.dtype], a.noise, a.seed, a.step, a.sample_offset, a.track,
                  a.alpha, a.beta, a.u, a.d, a.num_threads or min(torch.get_num_threads(), MAX_THREADS))
    return out, rate


def run_step(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, rates: torch.Tensor,
             row: int) -> torch.Tensor:
    """`launch` for a run's accepted call (ops.run_steps): the rate straight into rates[row] of the run's
    contiguous float32 [rows, B] buffer, by address (no view of it, no StepArgs). Returns out."""
    x0 = inputs[0]
    batch = x0.shape[0]
    out = torch.empty_like(x0)
    _C.fused_step([t.data_ptr() for t in inputs], coeffs, out.data_ptr(), rates.data_ptr() + 4 * batch * row, batch,
                  x0.numel() // batch, _DTYPE_CODES[x0.dtype], noise, seed, step, sample_offset, track, alpha, beta,
                  u, d, min(torch.get_num_threads(), MAX_THREADS))
    return out


fused_step = keyword_entry(launch)   # fused_step(inputs, coeffs, **StepArgs fields), checked


def philox_normal(batch: int, numel: int, *, seed: int, step: int, sample_offset: int = 0) -> torch.Tensor:
    """Standard normal noise [batch, numel] float32 from the C++ Philox stream (as reference.philox_normal)."""
    _require()
    z = torch.empty(batch, numel, dtype=torch.float32)
    for b in range(batch):
        _C.philox_normal(z[b].data_ptr(), 0, numel, sample_offset + b, step, seed)
    return z
