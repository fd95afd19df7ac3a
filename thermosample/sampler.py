"""`ts.sample`: grid -> solver (from the solver table) -> the Run engine (run.py), with thermodynamic
tracking and no host sync in the loop.

`compile=True` runs the solver loop (model calls and fused steps) as one `torch.compile(fullgraph=True)`
graph. Everything that is host maths stays outside the compiled region: the grid (NumPy), the argument
checks, the initial noise, the schedule's coefficients at every noise level the solver will visit (found
by walking the solver once on meta tensors, no model call) and, after the loop, the NaN check and the
ThermoReport. `torch.compile(ts.sample)` itself is not the supported path: validation and the final NaN
check read host and device values by design."""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch

from . import ops
from .auto import SamplerConfig, check_made_for, runnable
from .graphs import GRAPHS, model_module
from .grids import make_grid
from .run import Run
from .solvers import check_options, get_solver
from .thermo import ThermoReport
from .validate import (
    check_callable,
    check_extra_args,
    check_int,
    check_noise,
    check_sample_offset,
    check_shape,
    resolve_seed,
    sample_device,
)

_log = logging.getLogger("thermosample")

# Philox step id of the initial noise; solver steps use their index i (one noise draw per step).
INIT_NOISE_STEP = 0xFFFFFFFF


@dataclass
class SampleOutput:
    """Result of `sample`: samples [B, ...] (x_hat at the last sigma; data space when it is 0),
    the ThermoReport (None with track=False), the sigma grid used, the model evaluations spent and the
    Philox seed of the run (the one drawn from `generator=`, if given)."""

    samples: torch.Tensor
    thermo: ThermoReport | None
    sigmas: np.ndarray
    nfe: int
    seed: int | None = None


def sample(den, shape=None, *, noise: torch.Tensor | None = None, steps: int | None = None, solver: str | None = None,
           grid="karras", seed: int | None = None, generator: torch.Generator | None = None,
           sample_offset: int = 0, backend: str = "auto", track: bool = True,
           progress: bool | None = None, callback=None, dtype: torch.dtype = torch.float32, device=None,
           check_every: int | None = None, noise_sampler=None, extra_args: dict | None = None,
           cuda_graph: bool | None = None, compile: bool | dict = False, grad: bool = False,
           **solver_options) -> SampleOutput:
    """Generate samples by integrating the reverse-time ODE/SDE of a denoiser.

    Args:
        den: a `Denoiser` (or anything with `.schedule` and `__call__(x_hat, sigma) -> D`).
        shape: [B, ...] of the samples; the initial noise is sigma_max * z with z from the Philox
            stream keyed by (seed, sample_offset + b), so a sample does not depend on the batch it is in.
        noise: instead of shape, the initial x_hat [B, ...] already scaled to the first sigma
            (k-diffusion convention). The state is float32 (float64 for float64 noise); the samples come
            back in noise's dtype (float16/bfloat16 noise: computed in float32, stored back in its dtype).
        steps: number of solver steps (model evaluations: steps, or 2 steps - 1 for "heun" and "dpm_2");
            default 20 for a named grid. An explicit grid sets it (len(grid) - 1): `steps` may then be
            omitted, and a value that disagrees is a ValueError.
        solver: a name in ts.solvers.SOLVERS (deterministic: "euler", "heun", "dpm_2", "dpmpp_2m", "dpmpp_3m",
            "unipc", "deis", "ipndm", "lms", "ddim"; stochastic: "euler_ancestral", "dpm_2_ancestral",
            "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler_maruyama"), or
            "auto": the recommended configuration: the choice of a `ts.SamplerConfig` passed as `grid`, else
            the uncalibrated default of `ts.auto.band_for(steps)` (said once). Default: the config's solver
            when `grid` is a SamplerConfig, else "euler".
        grid: "karras" | "uniform" | "logsnr" | "kl_optimal" | a descending sequence/tensor of sigmas | a
            `ts.SamplerConfig` from `ts.thermo_grid(den, steps, solver="auto")` (its sigmas, and its solver
            and options unless `solver` names another).
        seed: seed of the Philox noise stream (initial noise and the stochastic solvers' noise): an int or
            NumPy integer in [0, 2**64); default 0. Sample i depends only on (seed, sample_offset + i).
        generator: a torch.Generator to draw the seed from instead (torch/diffusers convention): the seed
            is one 64-bit draw from it (validate.seed_from_generator), so the same generator state gives
            the same samples and each call advances it by one draw; sample i still depends only on
            (seed, i), and `SampleOutput.seed` reports the seed drawn. Passing both seed= and generator=
            is a ValueError.
        sample_offset: global index of the first sample (for sharding a large job).
        backend: fused-op backend, "auto" | "torch" | "cpp" | "triton".
        track: record the thermodynamic report (rates cost one fused reduction, no extra pass).
        progress: tqdm progress bar (None: shown for runs of 50+ steps on a terminal).
        callback: called before each update with k-diffusion's dict {'x', 'i', 'sigma', 'sigma_hat', 'denoised'}
            ('sigma', 'sigma_hat': 0-d tensors on the state's device, as k-diffusion passes them) plus
            'sigma_float' and 'sigma_hat_float', the exact host floats.
        dtype: state dtype when `noise` is not given (float32 or float64).
        check_every: also check for NaN/Inf every this many steps (one sync each); always at the end.
        noise_sampler: optional `noise_sampler(sigma, sigma_next) -> [B, ...]` replacing the in-kernel noise.
        extra_args: keyword arguments passed to every model call.
        cuda_graph: capture the whole loop in one CUDA graph and replay it (CUDA only; the model must
            be capturable; no callback/noise_sampler/check_every). The graph is cached per
            configuration, so repeated calls with new `noise` of the same shape only replay it.
            None (default): automatic on CUDA where capture is safe - a torch.nn.Module model (the
            denoiser or its `.model`), no callback/noise_sampler/check_every/progress bar/compile=/grad=:
            the first run of a configuration runs eagerly, a repeat captures it and later ones replay it
            (a failed capture is remembered and the configuration runs eagerly; the reasons are logged at
            debug level, logger "thermosample"). A captured graph keeps its memory pool while cached
            (ts.graphs.GRAPHS.clear() frees it). False: never.
        compile: run the solver loop, model calls included, as one torch.compile(fullgraph=True) graph;
            True, or a dict of torch.compile options (e.g. {"mode": "max-autotune"}, {"backend":
            "aot_eager"}, {"fullgraph": False} for a model or solver that cannot be traced whole). The grid,
            the schedule's coefficients and the final NaN check stay on the host, outside the graph.
            The graph is compiled once per solver, options, grid, state shape/dtype/device and model and
            reused by later calls (a new grid or shape recompiles). No callback/noise_sampler/check_every/
            progress bar (they would call into Python during the run) and not with cuda_graph (use
            {"mode": "reduce-overhead"} for CUDA graphs of the compiled loop).
        grad: run the model with autograd as the caller has it (for guidance or training through the
            sampler). By default sampling runs under torch.no_grad(), as k-diffusion and diffusers do:
            no graph is kept alive across steps and the samples do not require grad.
        **solver_options: the solver's options (ts.solvers.SOLVERS[solver].options), e.g.
            churn/s_tmin/s_tmax/s_noise (euler, heun, dpm_2), eta (ddim, euler_ancestral, dpmpp_2m_sde),
            order (lms), solver_type (dpmpp_2m_sde).
    Returns:
        SampleOutput(samples, thermo, sigmas, nfe, seed). Raises NonFiniteError if the run produced NaN/Inf.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and bool(grad)):
        return _sample(den, shape, noise, steps, solver, grid, seed, generator, sample_offset, backend, track,
                       progress, callback, dtype, device, check_every, noise_sampler, extra_args, cuda_graph, compile,
                       solver_options)


def _sample(den, shape, noise, steps, solver, grid, seed, generator, sample_offset, backend, track, progress, callback,
            dtype, device, check_every, noise_sampler, extra_args, cuda_graph, compile,
            solver_options) -> SampleOutput:
    if not callable(den) or not hasattr(den, "schedule"):
        raise TypeError("den must be a thermosample.Denoiser (a callable with a .schedule); "
                        "wrap your model with ts.Denoiser(model, schedule, prediction=...)")
    config = grid if isinstance(grid, SamplerConfig) else None
    solver, solver_options, grid = runnable(solver, grid, steps, solver_options, stacklevel=4)  # the user's call
    if config is not None and (shape is not None or noise is not None):
        check_made_for(config, den, (shape if noise is None else noise.shape)[1:], solver, solver_options)
    spec = get_solver(solver)
    if check_every is not None:
        check_every = check_int(check_every, "check_every")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True, False or None (automatic), got {cuda_graph!r}")
    compile_options = _compile_options(compile)
    if compile_options is not None:
        if cuda_graph:
            raise ValueError("compile= and cuda_graph=True do not combine; for CUDA graphs of the compiled loop "
                             "pass compile={'mode': 'reduce-overhead'}")
        if callback is not None or noise_sampler is not None or check_every or progress:
            raise ValueError("compile= runs the loop as one graph and cannot call back into Python during the "
                             "run: drop callback=, noise_sampler=, check_every= and progress=True")
    check_sample_offset(sample_offset)
    check_options(solver, solver_options)
    check_callable(callback, "callback")
    check_callable(noise_sampler, "noise_sampler")
    check_extra_args(extra_args)
    sigmas = make_grid(grid, steps, den.schedule)   # steps None: 20 on a named grid, else the grid's own
    if noise is None and shape is None:
        raise ValueError("pass either shape=(B, ...) or noise=x_T")
    if noise is not None and shape is not None:
        raise ValueError("pass shape or noise, not both")
    if noise is not None:
        check_noise(noise)
    else:
        shape = check_shape(shape)
    dev = sample_device(den, noise, device)
    check_sample_offset(sample_offset, batch=(noise.shape if noise is not None else shape)[0])
    if noise is None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (the state dtype), got {dtype}")
    seed = resolve_seed(seed, generator)       # after the other checks: a bad call draws nothing from a generator
    if noise is not None:
        state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        x = noise.to(state_dtype).contiguous()
    else:
        x = ops.randn(shape, seed=seed, step=INIT_NOISE_STEP, sample_offset=sample_offset, dtype=dtype,
                      device=dev, backend=backend) * float(sigmas[0])

    def make_run(cls=Run, **kw):
        return cls(den, [float(s) for s in sigmas], seed=seed, sample_offset=sample_offset, backend=backend,
                   track=track, extra_args=extra_args, solver=solver,
                   stochastic=spec.injects_noise(solver_options), **kw)
    run = make_run(_CompiledRun if compile_options is not None else Run, callback=callback, progress=progress,
                   noise_sampler=noise_sampler, check_every=check_every)
    graphed = None
    if cuda_graph is None and x.device.type == "cuda":
        why_not = _auto_graph_refusal(den, len(sigmas) - 1, callback, noise_sampler, check_every, progress,
                                      compile_options)
        if why_not is None:
            graphed = GRAPHS.run_auto(run, x, spec.fn, solver_options, lambda: make_run(progress=False))
            if graphed is None:       # eager: a first run, or no capture; a fresh Run (a failed one used this)
                run = make_run(callback=callback, progress=progress, noise_sampler=noise_sampler,
                               check_every=check_every)
        else:
            _log.debug("thermosample: no automatic CUDA graph: %s", why_not)
    if graphed is not None:
        x, run = graphed
    elif cuda_graph:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, got device {x.device}")
        if callback is not None or noise_sampler is not None or check_every:
            raise ValueError("cuda_graph=True cannot call back into Python during the run: "
                             "drop callback=, noise_sampler= and check_every=")
        x, run = GRAPHS.run(run, x, spec.fn, solver_options, lambda: make_run(progress=False))
    elif compile_options is not None:
        x = _compiled_loop(run, spec.fn, x, solver_options, compile_options, solver)
    else:
        x = spec.fn(run, x, run.sigmas, **solver_options)
    if noise is not None and x.dtype != noise.dtype:
        x = x.to(noise.dtype)    # half noise: stored back in its dtype (checked below: a cast may overflow)
    run.check_finite(x)
    return SampleOutput(samples=x, thermo=run.report(), sigmas=sigmas, nfe=run.nfe, seed=seed)


def _auto_graph_refusal(den, steps, callback, noise_sampler, check_every, progress, compile_options) -> str | None:
    """Why ts.sample does not capture this run by itself (None: it may): what a graph cannot replay (Python
    called during the run, autograd, a progress bar) or cannot key safely (a model that is not a
    torch.nn.Module: its weights are not known to the key)."""
    if callback is not None or noise_sampler is not None or check_every:
        return "callback=, noise_sampler= or check_every= call into Python during the run"
    if compile_options is not None:
        return "compile= runs the loop (pass compile={'mode': 'reduce-overhead'} for its CUDA graphs)"
    if torch.is_grad_enabled():
        return "grad=True: autograd through the run"
    if progress or (progress is None and steps >= 50 and sys.stderr.isatty()):
        return "a progress bar updates during the run"
    if model_module(den) is None:
        return "the model is not a torch.nn.Module (den or den.model), so the graph cache cannot key its weights"
    return None


# -- compile=True: the loop as one torch.compile graph, the host maths outside it ------------------------
_COMPILED: dict = {}        # (solver function, torch.compile options) -> the compiled solver function
COMPILE_LIMIT = 64          # compiled configurations (grid, options, shape, model) kept per solver


def _compile_options(compile) -> dict | None:
    """None (eager) or the torch.compile keyword arguments, fullgraph=True unless the caller says otherwise."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {"fullgraph": True}
    if isinstance(compile, dict) and all(isinstance(k, str) for k in compile):
        return {"fullgraph": True, **compile}
    raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")


class _PlanRun(Run):
    """Walks a solver with meta tensors and no model: records the noise levels it evaluates the model at
    and the levels whose velocity it tracks (EDM churn and midpoint solvers leave the grid), so their
    schedule maths is done on the host before the compiled loop reads them from a table."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.levels, self.tracked = [], []

    def steps(self):
        return range(len(self.sigmas) - 1)

    def denoise(self, x, sigma):
        self.levels.append(float(sigma))
        self.nfe += 1
        return torch.empty_like(x)

    def update(self, inputs, coeffs, i, *, track_sigma=None, out=None, **kwargs):
        if track_sigma is not None:
            self.tracked.append(float(track_sigma))
        return out if out is not None else torch.empty_like(inputs[0])

    def callback(self, *args):
        pass

    def probe(self, i, x):
        pass


class _CompiledRun(Run):
    """The Run a compiled loop drives: coefficient and velocity lookups from host tables filled before the
    loop, every model output copied (Run._own's aliasing test reads data pointers, which tracing cannot),
    no progress bar."""

    def prepare(self, solver_fn, x, solver_options) -> None:
        plan = _PlanRun(self.den, self.sigmas, seed=self.seed, sample_offset=self.sample_offset,
                        backend=self.backend, track=False, solver=self.solver)
        solver_fn(plan, torch.empty(x.shape, dtype=x.dtype, device="meta"), plan.sigmas, **solver_options)
        coeffs = getattr(self.den, "coeffs", None) if hasattr(self.den, "evaluate") else None
        self._den_coeffs = {s: coeffs(s) for s in plan.levels} if coeffs is not None else None
        self._velocity_table = {s: Run.velocity(self, s) for s in plan.tracked} if self.track else {}

    def steps(self):
        return range(len(self.sigmas) - 1)

    def denoise(self, x, sigma):
        if self._den_coeffs is not None:
            d = self.den.evaluate(x, sigma, self._den_coeffs[float(sigma)], **self.extra_args)
        else:
            d = self.den(x, sigma, **self.extra_args)
        self.nfe += 1
        self.record_state(sigma, x)
        return d.clone()

    def velocity(self, sigma):
        return self._velocity_table[float(sigma)]


def _compiled_loop(run, solver_fn, x, solver_options, compile_options, solver):
    """Run `solver_fn` on `run` as one torch.compile graph (compiled once per solver and options; torch's
    guards recompile it for a new grid, shape or model)."""
    run.prepare(solver_fn, x, solver_options)
    key = (solver_fn, tuple(sorted((k, repr(v)) for k, v in compile_options.items())))
    fn = _COMPILED.get(key)
    if fn is None:
        fn = _COMPILED[key] = torch.compile(solver_fn, **compile_options)
    try:
        # The grid's floats and the solver's options are constants of the graph (the host maths folds into
        # the coefficients); letting dynamo turn them into symbols on a recompile buys nothing and trips it.
        # Each grid / options / shape is its own graph of the one solver function: allow more than 8.
        with torch._dynamo.config.patch(specialize_float=True,
                                        recompile_limit=max(COMPILE_LIMIT, torch._dynamo.config.recompile_limit)):
            return fn(run, x, run.sigmas, **solver_options)
    except torch._dynamo.exc.TorchDynamoException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"compile=: torch.compile could not trace the {solver!r} loop with this model ({first}). A solver "
            "that computes its coefficients with NumPy inside the loop, or a model dynamo cannot trace, needs "
            "compile={'fullgraph': False} (torch.compile splits the loop there) or no compile=; more than "
            f"{COMPILE_LIMIT} configurations of one solver in a process exceed torch's recompile limit") from exc


__all__ = ["sample", "SampleOutput", "Run"]
