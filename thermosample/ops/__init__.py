"""The fused solver step: dispatch of its checked arguments through one backend table.

Every solver step is `out = sum_k c_k in_k + c_z z` with a per-sample rate reduction (see
thermosample/ops/reference.py for the exact contract and the Philox noise stream). Its arguments are one
`StepArgs`, checked in thermosample/ops/contract.py; every backend launches that object. `BACKENDS` below
is the one place that knows the implementations: the dispatch here, the CLI, the benchmarks and the tests
read it, so adding a backend is one `Backend` row plus its implementation module.

"auto" picks by device (`AUTO`); a missing backend falls back to torch with one warning.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BackendUnavailableWarning
from . import reference
from .contract import MAX_INPUTS as MAX_INPUTS  # re-exported: thermosample/solvers.py reads it
from .contract import SUPPORTED_DTYPES as SUPPORTED_DTYPES
from .contract import StepArgs, check, is_plain_call, is_plain_step, launch_checked


@dataclass(frozen=True)
class Backend:
    """One implementation of the fused op.

    Attributes:
        name: the `backend=` string.
        devices: device types it runs on (None: any device).
        available: () -> bool, computed lazily (imports happen on first use, never at `import thermosample`).
        load: () -> launch(StepArgs) -> (out, rate), the step for arguments contract.check returned (it
            checks nothing itself; the contract is thermosample/ops/reference.py's).
        missing: what to tell a user whose backend is unavailable (it then falls back to torch).
        load_run: None, or () -> a function that makes one run's `step` (see `run_steps`), for a backend
            that writes a rate into a row of the run's buffer without a view of it (a per-step cost).
    """

    name: str
    devices: tuple[str, ...] | None
    available: Callable[[], bool]
    load: Callable[[], Callable[[StepArgs], tuple[torch.Tensor, torch.Tensor]]]
    missing: str = ""
    load_run: Callable[[], Callable[[], Callable]] | None = None


def _cpp_available() -> bool:
    from . import cpp
    return cpp.available()


def _cpp_load():
    from . import cpp
    return cpp.launch


def _cpp_load_run():
    from . import cpp
    return lambda: cpp.run_step


def _triton_available() -> bool:
    from . import triton
    return triton.available()


def _triton_load():
    from . import triton
    return triton.launcher()


def _triton_load_run():
    from ..kernels import fused_step as triton_fused_step
    return triton_fused_step.RunSteps


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", None, lambda: True, lambda: reference.launch),
    "cpp": Backend("cpp", ("cpu",), _cpp_available, _cpp_load,
                   "thermosample._C is not built; the 'cpp' backend falls back to 'torch' (reinstall with a C++ "
                   "compiler present to get the fused CPU kernels)", _cpp_load_run),
    "triton": Backend("triton", ("cuda",), _triton_available, _triton_load,
                      "Triton is not available; the 'triton' backend falls back to 'torch'", _triton_load_run),
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
    if not isinstance(backend, str):
        raise TypeError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r} ({type(backend).__name__})")
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


class CheckedStep:
    """The fused op of one run for one kind of call (issue 15: host time per step).

    A sampling run calls the op a few times per step with inputs of one shape, dtype and device. Its first
    call goes through `fused_step` (`check`, the backend resolved); a CheckedStep then keeps the resolved
    backend's launch, and `accepts` is contract.is_plain_call: StepArgs that `check` would pass unchanged
    for inputs of this kind (plain contiguous tensors, Python floats, ints in range). A call it does not
    accept (a bad argument, another dtype, autograd, torch.compile tracing, an `out=`) goes back through
    `fused_step`, its checks and messages. `launch(args)` runs an accepted call; a run calls `step` (the
    same step, its rate into a row of the run's buffer) for the fields `accepts_step` accepted.
    """

    def __init__(self, backend: str, like: torch.Tensor):
        self.backend = backend
        name = resolve_backend(backend, like.device)
        self.launch = implementation(name)
        self.step = run_steps(name)
        # a backend that defers part of a step (Triton's partial sums) finishes it here, before rates are read
        self.flush = getattr(self.step, "flush", _nothing)
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device

    def accepts(self, args: StepArgs) -> bool:
        """True when `check(args)` would pass and return `args` as they are: `launch` may run them."""
        return is_plain_call(args, self.shape, self.dtype, self.device)

    def accepts_step(self, inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d) -> bool:
        """`accepts` for a step without `out`, `rate` and `num_threads`, field by field (no StepArgs built)."""
        return is_plain_step(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, self.shape,
                             self.dtype, self.device)


def _nothing() -> None:
    pass


def run_steps(name: str) -> Callable[..., torch.Tensor]:
    """A new `step(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, rates, row) ->
    out` of backend `name` for one run's accepted calls: the fused step with its rate written into
    rates[row] (rates: the run's contiguous float32 [rows, B] buffer). A step may leave part of that
    rate for later (see CheckedStep.flush)."""
    load_run = BACKENDS[name].load_run
    if load_run is not None:
        return load_run()()
    launch = implementation(name)

    def step(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, rates, row):
        return launch(StepArgs(inputs, coeffs, rate=rates[row], noise=noise, seed=seed, step=step,
                               sample_offset=sample_offset, track=track, alpha=alpha, beta=beta, u=u, d=d))[0]
    return step


def fused_step(inputs, coeffs, *, backend: str = "auto", **fields) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused solver step: out = sum_k coeffs[k] inputs[k] + noise z, with the per-sample rate.

    Args:
        inputs: 1-6 tensors [B, ...] of one shape, dtype (float32/64, float16, bfloat16) and device.
        coeffs: Python floats, one per input.
        backend: "auto" | "torch" | "cpp" | "triton".
        **fields: the other fields of StepArgs (thermosample/ops/contract.py): noise, seed, step,
            sample_offset, track, alpha, beta, u, d, out (may be one of the inputs: in place), rate,
            num_threads.
    Returns:
        (out [B, ...], rate [B] float32).

    Inside torch.compile the call is the registered op thermosample::fused_step (or fused_step_ when `out`
    is one of the inputs), so a compiled loop keeps the fused kernel in its graph without a graph break.
    """
    if torch.compiler.is_compiling():
        from .library import fused_step_op
        return fused_step_op(inputs, coeffs, backend=backend, **fields)
    return launch(StepArgs(inputs, coeffs, **fields), backend)


def launch(args: StepArgs, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_step` on a StepArgs: check it, pick the backend by the inputs' device, launch."""
    args = check(args)
    return launch_checked(implementation(resolve_backend(backend, args.inputs[0].device)), args)


@functools.cache
def implementation(name: str) -> Callable[[StepArgs], tuple[torch.Tensor, torch.Tensor]]:
    """The launch(StepArgs) function of backend `name` (a key of BACKENDS), loaded once; it checks nothing."""
    return BACKENDS[name].load()


def randn(shape, *, seed: int, step: int, sample_offset: int = 0, dtype=torch.float32, device=None,
          backend: str = "auto") -> torch.Tensor:
    """Standard normal tensor [B, ...] from the Philox stream (the fused op on a zero input)."""
    zeros = torch.zeros(shape, dtype=dtype, device=device)
    out, _ = fused_step([zeros], [0.0], noise=1.0, seed=seed, step=step, sample_offset=sample_offset,
                        out=zeros, backend=backend)
    return out


def _validate_step_args(inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d, out):
    """The old contract check, in its old positional form: the inputs as a tuple, or ValueError/TypeError."""
    return tuple(check(StepArgs(inputs, coeffs, out=out, noise=noise, seed=seed, step=step,
                                sample_offset=sample_offset, track=track, alpha=alpha, beta=beta, u=u, d=d)).inputs)


def __getattr__(name):
    """validate_step_args (now ops.check(StepArgs(...))) works for one more release, with a warning."""
    if name != "validate_step_args":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..errors import warn_moved
    warn_moved("thermosample.ops.validate_step_args", "thermosample.ops.check(thermosample.ops.StepArgs(...))")
    return _validate_step_args
