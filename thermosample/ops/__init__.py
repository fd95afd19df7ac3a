"""The fused solver step: argument validation, and dispatch through one backend table.

Every solver step is `out = sum_k c_k in_k + c_z z` with a per-sample rate reduction (see
ops/reference.py for the exact contract and the Philox noise stream). `BACKENDS` below is the one place
that knows the implementations: the dispatch here, the CLI, the benchmarks and the tests read it, so
adding a backend is one `Backend` row plus its implementation module.

"auto" picks by device (`AUTO`); a missing backend falls back to torch with one warning.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import BackendUnavailableWarning
from ..validate import check_seed
from ..validate import is_int as _is_int
from . import reference

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_INPUTS = 6                 # csrc/fused_step.h kMaxInputs, kernels/fused_step.py _MAX_INPUTS
_UINT32 = 2 ** 32
_STRIDED = torch.strided


@dataclass(frozen=True)
class Backend:
    """One implementation of the fused op.

    Attributes:
        name: the `backend=` string.
        devices: device types it runs on (None: any device).
        available: () -> bool, computed lazily (imports happen on first use, never at `import thermosample`).
        load: () -> fused_step(inputs, coeffs, *, noise, seed, step, sample_offset, track, alpha, beta, u, d,
            out, rate) with the contract of ops.reference.fused_step_reference; inputs arrive validated;
            `rate`, when given, is a contiguous float32 [B] tensor on the device that receives the rate.
        missing: what to tell a user whose backend is unavailable (it then falls back to torch).
        launch: optional () -> launch(inputs, coeffs, rates, row, noise, seed, step, sample_offset, track, alpha,
            beta, u, d) -> out, the same step for arguments `CheckedStep` accepted, its rate written into
            rates[row] (a contiguous float32 [rows, B] buffer), without the backend's own re-checks (None:
            `load`'s function serves).
    """

    name: str
    devices: tuple[str, ...] | None
    available: Callable[[], bool]
    load: Callable[[], Callable]
    missing: str = ""
    launch: Callable[[], Callable] | None = None


def _cpp_available() -> bool:
    from . import cpp
    return cpp.available()


def _cpp_load():
    from . import cpp
    return cpp.fused_step


def _cpp_launch():
    from . import cpp
    return cpp.launch


def _triton_available() -> bool:
    from . import triton
    return triton.available()


def _triton_load():
    from . import triton
    return triton.launcher()


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", None, lambda: True, lambda: reference.fused_step_reference),
    "cpp": Backend("cpp", ("cpu",), _cpp_available, _cpp_load,
                   "thermosample._C is not built; the 'cpp' backend falls back to 'torch' (reinstall with a C++ "
                   "compiler present to get the fused CPU kernels)", _cpp_launch),
    "triton": Backend("triton", ("cuda",), _triton_available, _triton_load,
                      "Triton is not available; the 'triton' backend falls back to 'torch'"),
}
AUTO = {"cpu": "cpp", "cuda": "triton"}        # device type -> backend of backend="auto" (else torch)
BACKEND_CHOICES = ("auto",) + tuple(BACKENDS)  # every valid `backend=` string


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, BackendUnavailableWarning, stacklevel=3)


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (a broken kernel module raises instead)."""
    return BACKENDS["triton"].available()


def cpp_available() -> bool:
    """True when the compiled CPU extension thermosample._C loaded."""
    return BACKENDS["cpp"].available()


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn a backend request into the name of the backend that will run on `device`."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if backend == "auto":
        backend = AUTO.get(device.type, "torch")
    entry = BACKENDS[backend]
    if entry.devices is not None and device.type not in entry.devices:
        raise ValueError(f"backend={backend!r} runs on {' or '.join(entry.devices)} tensors, got device {device}")
    if not entry.available():
        _warn_once(entry.missing)
        return "torch"
    return backend


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
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not _finite(c):
            raise TypeError(f"coefficients must be finite Python floats, got {c!r} (position {k})")
    check_seed(seed)
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


class CheckedStep:
    """The fused op of one run, its constant checks done once (issue 15: host time per step).

    A sampling run calls the op a few times per step with tensors of one shape, dtype and device and the
    same seed, sample offset and backend; `fused_step` re-checks all of that on every call (~10 us of host
    time, as much as a small state's kernel). A Run makes its first call through `fused_step` and then builds
    a CheckedStep from that call's state tensor (a diffusers scheduler hands it on to its next run, whose seed
    it draws itself): the backend is resolved once, and `accepts` is the cheap per-call rest of
    `validate_step_args` (plain contiguous tensors of the checked kind, finite Python float coefficients, a
    step and u/d in range). A call it does not accept (a bad argument, another dtype, autograd,
    torch.compile tracing, an `out=`) goes back through `fused_step`, its checks and messages.
    `launch(inputs, coeffs, rates, row, noise, seed, step, sample_offset, track, alpha, beta, u, d) -> out`
    runs an accepted call and writes its rate into rates[row] (a Run's contiguous float32 [rows, B] buffer).
    """

    def __init__(self, backend: str, like: torch.Tensor):
        self.backend = backend
        row = BACKENDS[resolve_backend(backend, like.device)]
        if row.launch is not None:
            self.launch = row.launch()
        else:
            fn = implementation(row.name)

            def launch(inputs, coeffs, rates, i, noise, seed, step, sample_offset, track, alpha, beta, u, d):
                return fn(inputs, coeffs, noise=noise, seed=seed, step=step, sample_offset=sample_offset,
                          track=track, alpha=alpha, beta=beta, u=u, d=d, rate=rates[i])[0]
            self.launch = launch
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device

    def accepts(self, inputs, coeffs, step, noise, alpha, beta, track, u, d) -> bool:
        """True when `fused_step`'s checks would pass these arguments and `launch` may run them as they are."""
        n = len(inputs)
        if not (0 < n <= MAX_INPUTS and len(coeffs) == n and type(step) is int and 0 <= step < _UINT32):
            return False
        if track and not (type(u) is int and type(d) is int and 0 <= u < n and 0 <= d < n):
            return False
        shape, dtype, device = self.shape, self.dtype, self.device
        grad = torch.is_grad_enabled()
        for t in inputs:
            if (type(t) is not torch.Tensor or t.shape != shape or t.dtype != dtype or t.device != device
                    or t.layout is not _STRIDED or not t.is_contiguous() or t.is_neg() or (grad and t.requires_grad)):
                return False
        if type(noise) is not float or type(alpha) is not float or type(beta) is not float:
            return False
        total = noise + alpha + beta  # finite floats sum to a finite value, or overflow: then the full path
        for c in coeffs:
            if type(c) is not float:
                return False
            total += c
        return math.isfinite(total) and not torch.compiler.is_compiling()


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:          # an int too large for a float (10**400)
        return False


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
        inputs: 1-6 tensors [B, ...] of one shape, dtype (float32/64, float16, bfloat16) and device.
        coeffs: Python floats, one per input.
        noise: coefficient of Philox normal noise keyed by (seed, sample_offset + b, step, element).
        track: reduce rate[b] = ||alpha inputs[u][b] + beta inputs[d][b]||^2 (docs/theory.md §2); without
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
    return implementation(resolve_backend(backend, inputs[0].device))(inputs, coeffs, **kwargs)


@functools.cache
def implementation(name: str) -> Callable:
    """The fused_step function of backend `name` (a key of BACKENDS), loaded once."""
    return BACKENDS[name].load()


def randn(shape, *, seed: int, step: int, sample_offset: int = 0, dtype=torch.float32, device=None,
          backend: str = "auto") -> torch.Tensor:
    """Standard normal tensor [B, ...] from the Philox stream (the fused op on a zero input)."""
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    out, _ = fused_step([zeros], [0.0], noise=1.0, seed=seed, step=step, sample_offset=sample_offset,
                        out=zeros, backend=backend)
    return out
