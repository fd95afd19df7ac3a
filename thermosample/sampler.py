"""The sampling loop: grid -> solver -> fused steps, with thermodynamic tracking and no host sync.

The loop never reads a device value: coefficients are Python floats computed from the sigma grid, the
per-evaluation rates stay on the device, and non-finite values are detected from those rates once at
the end (or every `check_every` steps when asked).
"""
from __future__ import annotations

import inspect
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .ops.library import fused_step_op  # the fused op registered with torch.library (compile-safe)
from .errors import NonFiniteError
from .grids import make_grid
from .solvers import SOLVERS, STOCHASTIC, injects_noise
from .thermo import ThermoReport

# Philox step id of the initial noise; solver steps use their index i (one noise draw per step).
INIT_NOISE_STEP = 0xFFFFFFFF


@dataclass
class SampleOutput:
    """Result of `sample`: samples [B, ...] (x_hat at the last sigma; data space when it is 0),
    the ThermoReport (None with track=False), the sigma grid used, and the model evaluations spent."""

    samples: torch.Tensor
    thermo: ThermoReport | None
    sigmas: np.ndarray
    nfe: int


class Run:
    """State a solver uses: model evaluation, the fused update, callback and progress."""

    def __init__(self, den, sigmas, *, seed, sample_offset, backend, track, callback, progress,
                 noise_sampler=None, extra_args=None, check_every=None, solver="", stochastic=False):
        self.den = den
        self.schedule = den.schedule
        self.sigmas = sigmas
        self.seed, self.sample_offset, self.backend = seed, sample_offset, backend
        self.track = track
        self.user_callback = callback
        self.progress = progress
        self.noise_sampler = noise_sampler
        self.extra_args = extra_args or {}
        self.check_every = check_every
        self.solver = solver
        self.stochastic = stochastic
        self.nfe = 0
        self.eval_t: list[float] = []
        self.eval_rates: list[torch.Tensor] = []
        self.probes: list[tuple[int, torch.Tensor]] = []  # (step, per-sample rate or NaN probe)
        self.first_state = self.last_state = None
        # (t, alpha, beta) of the velocity at each noise level, for the whole grid in one vectorised call:
        # per-step scalar schedule math (bisection for t) cost more host time than the fused step itself.
        self._velocity: dict[float, tuple[float, float, float]] = {}
        if track:
            pos = np.asarray([s for s in sigmas if s > 0], dtype=np.float64)
            if pos.size:
                t = np.atleast_1d(self.schedule.sigma_to_t(pos))
                a, b = (np.broadcast_to(np.asarray(c, dtype=np.float64), t.shape)
                        for c in self.schedule.velocity_coeffs(t))
                self._velocity = {float(k): (float(tk), float(ak), float(bk)) for k, tk, ak, bk in zip(pos, t, a, b)}

    # -- the three things a solver calls --------------------------------------------------------
    def steps(self):
        n = len(self.sigmas) - 1
        show = self.progress if self.progress is not None else (n >= 50 and sys.stderr.isatty())
        if show:
            from tqdm.auto import tqdm
            return tqdm(range(n), desc=f"thermosample {self.solver}", leave=False)
        return range(n)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        d = self.den(x, sigma, **self.extra_args)
        self.nfe += 1
        if self.first_state is None:
            self.first_state = (sigma, x)
        self.last_state = (sigma, x)
        return d

    def update(self, inputs, coeffs, i, *, noise=0.0, noise_sigmas=None, track_sigma=None, u=0, d=1):
        """One fused step; `track_sigma` is the noise level of the evaluation reduced by this update."""
        if noise != 0.0 and self.noise_sampler is not None:
            inputs = list(inputs) + [self.noise_sampler(*noise_sigmas)]
            coeffs = list(coeffs) + [noise]
            noise = 0.0
        tracked = self.track and track_sigma is not None
        alpha = beta = 0.0
        if tracked:
            t, alpha, beta = self.velocity(track_sigma)
        out, rate = fused_step_op(inputs, coeffs, noise=noise, seed=self.seed, step=i,
                                   sample_offset=self.sample_offset, track=tracked, alpha=alpha, beta=beta,
                                   u=u, d=d, backend=self.backend)
        if tracked:
            self.eval_t.append(t)
            self.eval_rates.append(rate)
        self.probes.append((i, rate))
        if self.check_every and (i + 1) % self.check_every == 0 and (len(self.probes) == 1 or self.probes[-2][0] != i):
            self.check_finite()
        return out

    def velocity(self, sigma: float) -> tuple[float, float, float]:
        """(t, alpha, beta) at noise level sigma: nu = alpha x_hat + beta D (cached over the grid)."""
        hit = self._velocity.get(float(sigma))
        if hit is None:                             # a level off the grid (EDM churn's sigma_hat)
            t = float(self.schedule.sigma_to_t(sigma))
            alpha, beta = self.schedule.velocity_coeffs(t)
            hit = self._velocity[float(sigma)] = (t, float(alpha), float(beta))
        return hit

    def callback(self, i, x, sigma, sigma_hat, denoised):
        if self.user_callback is not None:
            self.user_callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})

    # -- after the loop ---------------------------------------------------------------------------
    def check_finite(self, samples: torch.Tensor | None = None) -> None:
        """Raise NonFiniteError naming the first step and sample whose values are not finite (one sync)."""
        if not self.probes:
            return
        bad = ~torch.isfinite(torch.stack([r for _, r in self.probes]))
        if samples is not None:
            tail = ~torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)
            bad = torch.cat([bad, tail[None]])
        if not bool(bad.any()):
            return
        op, b = divmod(int(torch.nonzero(bad.flatten())[0]), bad.shape[1])
        step = self.probes[min(op, len(self.probes) - 1)][0]
        raise NonFiniteError(
            f"non-finite value (NaN or Inf) in the model output or the state at step {step} of "
            f"{len(self.sigmas) - 1} (sigma={self.sigmas[step]:.6g}), sample {b + self.sample_offset}; "
            "check the model, its dtype and the schedule's time convention", step=step,
            sample=b + self.sample_offset)

    def report(self) -> ThermoReport | None:
        if not self.track or not self.eval_rates:
            return None
        sch = self.schedule
        t = torch.tensor(self.eval_t, dtype=torch.float64)
        s0, x0 = self.first_state
        s1, x1 = self.last_state
        m0, m1 = float(sch.m(sch.sigma_to_t(s0))), float(sch.m(sch.sigma_to_t(s1)))
        disp = None
        if not self.stochastic:  # the pathwise speed limit holds for deterministic (ODE) trajectories only
            disp = (m1 * x1.double() - m0 * x0.double()).reshape(x0.shape[0], -1).square().sum(dim=1)
        return ThermoReport(t=t, rate=torch.stack(self.eval_rates),
                            temperature=torch.as_tensor(sch.temperature(t.numpy()), dtype=torch.float64),
                            displacement=disp, schedule_name=getattr(sch, "name", ""), solver=self.solver)


def _resolve_device(den, noise, device):
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        return noise.device
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string like 'cuda:0', got {device!r}") from exc
    params = getattr(getattr(den, "model", None), "parameters", None)
    if callable(params):
        p = next(iter(params()), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


_NONNEGATIVE_OPTIONS = ("churn", "eta", "s_noise", "s_tmin", "s_tmax")


def _check_solver_options(options):
    """Solver knobs are real numbers; churn, eta, s_noise and the churn window are >= 0 (s_tmax may be inf)."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"solver option {name} must be a real number, got {value!r}")
        if math.isnan(value) or (math.isinf(value) and name != "s_tmax"):
            raise ValueError(f"solver option {name} must be finite, got {value!r}")
        if name in _NONNEGATIVE_OPTIONS and value < 0:
            raise ValueError(f"solver option {name} must be >= 0, got {value!r}")


def _check_device(den, dev, noise, device):
    """Refuse a meta device and a model whose parameters live on another device than the state."""
    if dev.type == "meta":
        raise ValueError("sampling needs a device with data; got the meta device (noise= or device=)")
    want = torch.device(device) if device is not None else None
    if noise is not None and want is not None and (
            want.type != noise.device.type or want.index not in (None, noise.device.index)):
        raise ValueError(f"device={device!r} but noise is on {noise.device}; pass one or make them agree")
    params = getattr(getattr(den, "model", None), "parameters", None)
    if callable(params):
        p = next(iter(params()), None)
        if p is not None and p.device.type != dev.type:
            raise ValueError(f"the model's parameters are on {p.device} but the samples would be on {dev}; "
                             "move the model or pass noise/device on the same device")


def _check_shape(shape):
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) < 1:
        raise ValueError(f"shape must be a non-empty tuple of positive ints like (B, C, H, W), got {shape!r}")
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"shape must hold positive ints, got {shape!r}")
    return tuple(int(n) for n in shape)


_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
_MAX_GRAPHS = 4


def _run_graphed(run: Run, x: torch.Tensor, options: dict):
    """Run the solver loop as one captured CUDA graph (cached per configuration); returns (x, run)."""
    if x.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got device {x.device}")
    if run.user_callback is not None or run.noise_sampler is not None or run.check_every:
        raise ValueError("cuda_graph=True cannot call back into Python during the run: "
                         "drop callback=, noise_sampler= and check_every=")
    solve = SOLVERS[run.solver]
    key = (id(run.den), tuple(x.shape), x.dtype, x.device, run.solver, tuple(run.sigmas), run.seed,
           run.sample_offset, run.backend, run.track, tuple(sorted(options.items())))
    if key not in _GRAPHS:
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, Triton compilation
            warm = Run(run.den, run.sigmas, seed=run.seed, sample_offset=run.sample_offset,
                       backend=run.backend, track=run.track, callback=None, progress=False,
                       extra_args=run.extra_args, solver=run.solver, stochastic=run.stochastic)
            solve(warm, static_x.clone(), run.sigmas, **options)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = solve(run, static_x, run.sigmas, **options)
        _GRAPHS[key] = (graph, static_x, static_out, run)
        while len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    graph, static_x, static_out, captured_run = _GRAPHS[key]
    _GRAPHS.move_to_end(key)
    static_x.copy_(x)
    graph.replay()
    return static_out.clone(), captured_run


def sample(den, shape=None, *, noise: torch.Tensor | None = None, steps: int = 20, solver: str = "euler",
           grid="karras", seed: int = 0, sample_offset: int = 0, backend: str = "auto", track: bool = True,
           progress: bool | None = None, callback=None, dtype: torch.dtype = torch.float32, device=None,
           check_every: int | None = None, noise_sampler=None, extra_args: dict | None = None,
           cuda_graph: bool = False,
           **solver_options) -> SampleOutput:
    """Generate samples by integrating the reverse-time ODE/SDE of a denoiser.

    Args:
        den: a `Denoiser` (or anything with `.schedule` and `__call__(x_hat, sigma) -> D`).
        shape: [B, ...] of the samples; the initial noise is sigma_max * z with z from the Philox
            stream keyed by (seed, sample_offset + b), so a sample does not depend on the batch it is in.
        noise: instead of shape, the initial x_hat [B, ...] already scaled to the first sigma
            (k-diffusion convention).
        steps: number of solver steps (model evaluations: steps, or 2 steps - 1 for "heun").
        solver: "euler" | "heun" | "dpmpp_2m" | "ddim" | "euler_ancestral" | "euler_maruyama".
        grid: "karras" | "uniform" | "logsnr" | "kl_optimal" | a descending sequence/tensor of sigmas.
        seed: seed of the Philox noise stream (initial noise and the stochastic solvers' noise).
        sample_offset: global index of the first sample (for sharding a large job).
        backend: fused-op backend, "auto" | "torch" | "cpp" | "triton".
        track: record the thermodynamic report (rates cost one fused reduction, no extra pass).
        progress: tqdm progress bar (None: shown for runs of 50+ steps on a terminal).
        callback: called before each update with k-diffusion's dict {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}.
        dtype: state dtype when `noise` is not given (float32 or float64).
        check_every: also check for NaN/Inf every this many steps (one sync each); always at the end.
        noise_sampler: optional `noise_sampler(sigma, sigma_next) -> [B, ...]` replacing the in-kernel noise.
        extra_args: keyword arguments passed to every model call.
        cuda_graph: capture the whole loop in one CUDA graph and replay it (CUDA only; the model must
            be capturable; no callback/noise_sampler/check_every). The graph is cached per
            configuration, so repeated calls with new `noise` of the same shape only replay it.
        **solver_options: e.g. churn/s_tmin/s_tmax/s_noise (heun), eta (ddim, euler_ancestral).
    Returns:
        SampleOutput(samples, thermo, sigmas, nfe). Raises NonFiniteError if the run produced NaN/Inf.
    """
    if not callable(den) or not hasattr(den, "schedule"):
        raise TypeError("den must be a thermosample.Denoiser (a callable with a .schedule); "
                        "wrap your model with ts.Denoiser(model, schedule, prediction=...)")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    if check_every is not None and (not isinstance(check_every, int) or isinstance(check_every, bool)
                                    or check_every < 1):
        raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    params = inspect.signature(SOLVERS[solver]).parameters
    unknown = sorted(set(solver_options) - set(list(params)[3:]))
    if unknown:
        raise TypeError(f"solver {solver!r} takes no option(s) {unknown}; its options: {list(params)[3:]}")
    _check_solver_options(solver_options)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (or None), got {type(callback).__name__}")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable (or None), got {type(noise_sampler).__name__}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the model, got {type(extra_args).__name__}")
    stochastic = injects_noise(solver, solver_options)
    sch = den.schedule
    sigmas = make_grid(grid, steps, sch)
    if noise is None and shape is None:
        raise ValueError("pass either shape=(B, ...) or noise=x_T")
    if noise is not None and shape is not None:
        raise ValueError("pass shape or noise, not both")
    dev = _resolve_device(den, noise, device)
    _check_device(den, dev, noise, device)
    if noise is not None:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
        if noise.dim() < 1 or noise.shape[0] < 1 or noise.numel() == 0:
            raise ValueError(f"noise must have shape [B, ...] with B >= 1, got {tuple(noise.shape)}")
        state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        x = noise.to(state_dtype).contiguous()
    else:
        shape = _check_shape(shape)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64 (the state dtype), got {dtype}")
        x = ops.randn(shape, seed=seed, step=INIT_NOISE_STEP, sample_offset=sample_offset, dtype=dtype,
                      device=dev, backend=backend) * float(sigmas[0])
    run = Run(den, [float(s) for s in sigmas], seed=seed, sample_offset=sample_offset, backend=backend,
              track=track, callback=callback, progress=progress, noise_sampler=noise_sampler,
              extra_args=extra_args, check_every=check_every, solver=solver, stochastic=stochastic)
    if cuda_graph:
        x, run = _run_graphed(run, x, solver_options)
    else:
        x = SOLVERS[solver](run, x, run.sigmas, **solver_options)
    run.check_finite(x)
    return SampleOutput(samples=x, thermo=run.report(), sigmas=sigmas, nfe=run.nfe)


__all__ = ["sample", "SampleOutput", "Run", "STOCHASTIC"]
