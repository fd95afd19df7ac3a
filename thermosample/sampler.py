"""`ts.sample`: grid -> solver (from the solver table) -> the Run engine (run.py), with thermodynamic
tracking and no host sync in the loop."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .graphs import GRAPHS
from .grids import make_grid
from .run import Run
from .solvers import check_options, get_solver
from .thermo import ThermoReport
from .validate import (check_callable, check_extra_args, check_noise, check_sample_offset, check_seed, check_shape,
                       sample_device)

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


def sample(den, shape=None, *, noise: torch.Tensor | None = None, steps: int = 20, solver: str = "euler",
           grid="karras", seed: int = 0, sample_offset: int = 0, backend: str = "auto", track: bool = True,
           progress: bool | None = None, callback=None, dtype: torch.dtype = torch.float32, device=None,
           check_every: int | None = None, noise_sampler=None, extra_args: dict | None = None,
           cuda_graph: bool = False, grad: bool = False,
           **solver_options) -> SampleOutput:
    """Generate samples by integrating the reverse-time ODE/SDE of a denoiser.

    Args:
        den: a `Denoiser` (or anything with `.schedule` and `__call__(x_hat, sigma) -> D`).
        shape: [B, ...] of the samples; the initial noise is sigma_max * z with z from the Philox
            stream keyed by (seed, sample_offset + b), so a sample does not depend on the batch it is in.
        noise: instead of shape, the initial x_hat [B, ...] already scaled to the first sigma
            (k-diffusion convention).
        steps: number of solver steps (model evaluations: steps, or 2 steps - 1 for "heun" and "dpm_2").
        solver: a name in ts.solvers.SOLVERS: "euler" | "heun" | "dpm_2" | "dpmpp_2m" | "lms" | "ddim" |
            "euler_ancestral" | "dpmpp_2m_sde" | "euler_maruyama".
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
        grad: run the model with autograd as the caller has it (for guidance or training through the
            sampler). By default sampling runs under torch.no_grad(), as k-diffusion and diffusers do:
            no graph is kept alive across steps and the samples do not require grad.
        **solver_options: the solver's options (ts.solvers.SOLVERS[solver].options), e.g.
            churn/s_tmin/s_tmax/s_noise (euler, heun, dpm_2), eta (ddim, euler_ancestral, dpmpp_2m_sde),
            order (lms), solver_type (dpmpp_2m_sde).
    Returns:
        SampleOutput(samples, thermo, sigmas, nfe). Raises NonFiniteError if the run produced NaN/Inf.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(grad)):
        return _sample(den, shape, noise, steps, solver, grid, seed, sample_offset, backend, track, progress,
                       callback, dtype, device, check_every, noise_sampler, extra_args, cuda_graph, solver_options)


def _sample(den, shape, noise, steps, solver, grid, seed, sample_offset, backend, track, progress, callback, dtype,
            device, check_every, noise_sampler, extra_args, cuda_graph, solver_options) -> SampleOutput:
    if not callable(den) or not hasattr(den, "schedule"):
        raise TypeError("den must be a thermosample.Denoiser (a callable with a .schedule); "
                        "wrap your model with ts.Denoiser(model, schedule, prediction=...)")
    spec = get_solver(solver)
    if check_every is not None and (not isinstance(check_every, int) or isinstance(check_every, bool)
                                    or check_every < 1):
        raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
    check_seed(seed)
    check_sample_offset(sample_offset)
    check_options(solver, solver_options)
    check_callable(callback, "callback")
    check_callable(noise_sampler, "noise_sampler")
    check_extra_args(extra_args)
    sigmas = make_grid(grid, steps, den.schedule)
    if noise is None and shape is None:
        raise ValueError("pass either shape=(B, ...) or noise=x_T")
    if noise is not None and shape is not None:
        raise ValueError("pass shape or noise, not both")
    if noise is not None:
        check_noise(noise)
    dev = sample_device(den, noise, device)
    check_sample_offset(sample_offset, batch=noise.shape[0] if noise is not None else check_shape(shape)[0])
    if noise is not None:
        state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        x = noise.to(state_dtype).contiguous()
    else:
        shape = check_shape(shape)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64 (the state dtype), got {dtype}")
        x = ops.randn(shape, seed=seed, step=INIT_NOISE_STEP, sample_offset=sample_offset, dtype=dtype,
                      device=dev, backend=backend) * float(sigmas[0])

    def make_run(**kw):
        return Run(den, [float(s) for s in sigmas], seed=seed, sample_offset=sample_offset, backend=backend,
                   track=track, extra_args=extra_args, solver=solver,
                   stochastic=spec.injects_noise(solver_options), **kw)
    run = make_run(callback=callback, progress=progress, noise_sampler=noise_sampler, check_every=check_every)
    if cuda_graph:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, got device {x.device}")
        if callback is not None or noise_sampler is not None or check_every:
            raise ValueError("cuda_graph=True cannot call back into Python during the run: "
                             "drop callback=, noise_sampler= and check_every=")
        x, run = GRAPHS.run(run, x, spec.fn, solver_options, lambda: make_run(progress=False))
    else:
        x = spec.fn(run, x, run.sigmas, **solver_options)
    run.check_finite(x)
    return SampleOutput(samples=x, thermo=run.report(), sigmas=sigmas, nfe=run.nfe)


__all__ = ["sample", "SampleOutput", "Run"]
