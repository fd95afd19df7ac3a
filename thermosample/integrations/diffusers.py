"""diffusers schedulers whose steps run on thermosample's fused op and record a ThermoReport.

Switch a pipeline by changing one line:

    from thermosample.integrations.diffusers import ThermoEulerDiscreteScheduler
    pipe.scheduler = ThermoEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = pipe(...).images
    pipe.scheduler.thermo            # ThermoReport of the last run

Each class subclasses the corresponding diffusers scheduler (a SchedulerMixin/ConfigMixin with a
`register_to_config` __init__), so the config, `set_timesteps(num_inference_steps, device, timesteps=,
sigmas=)`, the timestep/sigma grids for every spacing option, `init_noise_sigma`, `order`, `add_noise`,
`scale_noise` are diffusers' own; `step` is replaced by one written on thermosample's fused op:

- coefficients are Python floats from host copies of the sigmas made in `set_timesteps`; the step index
  lives on the host; `step` does no `.item()` and no device-to-host copy. The first step index comes from
  `set_begin_index` when set, else from the timestep when it is a number or a CPU tensor, else it is 0
  (a pipeline that starts mid-schedule on a GPU calls `set_begin_index`, as diffusers' img2img ones do).
- timesteps: the step index starts where `timestep` is in `timesteps`; one that is not there raises
  IndexError, as diffusers' Euler, Heun, LMS and flow-match schedulers do (its multistep ones take an
  unknown timestep as the last step; these refuse it). DDIM takes any integer training timestep, DDPM only
  its schedule's; the Euler-type steps refuse int timesteps with diffusers' ValueError. A timestep on a GPU
  is not read (no sync): the step follows its counter.
- host time per step: the report's velocity coefficients are tabled over the grid once per run and the
  fused op's argument checks run once per kind of call, not per step (issue 15).
- noise: with a `generator` the noise is `randn_tensor(..., generator=generator)` exactly as diffusers
  draws it (same outputs); without one it is thermosample's in-kernel Philox noise (same distribution),
  seeded by one draw from torch's default CPU generator at the run's first step that adds such noise
  (set_timesteps and deterministic steps leave torch's generator alone, as diffusers' do).
- `scheduler.thermo`: the ThermoReport of the run so far (reading it syncs once and raises
  thermosample.NonFiniteError if a model output or state was NaN/Inf). Physical coordinates are those
  of the training schedule: DiscreteVP(alphas_cumprod) for the VP schedulers, CondOT (rectified flow)
  for flow matching.
- config options whose step thermosample does not implement (e.g. thresholding, learned variances,
  per-token timesteps) fall back to diffusers' own `step` with one warning; those steps are not fused
  and not in the report.

This module imports diffusers; `import thermosample` does not import this module.
"""
from __future__ import annotations

import inspect
import math
import sys
import warnings

import numpy as np
import torch

from ..validate import import_optional

# diffusers is optional: without it, an install hint instead of a bare ModuleNotFoundError
import_optional("diffusers", "diffusers", "thermosample.integrations.diffusers")

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

# diffusers' pipeline loader resolves a saved component as getattr(<its module>, "SchedulerMixin") to find
# its load method (model_index.json names this module as the Thermo schedulers' library): keep the
# SchedulerMixin / ConfigMixin imports here even though nothing below uses them by name.
from diffusers.configuration_utils import ConfigMixin, register_to_config  # noqa: F401
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_dpmsolver_multistep import SchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
from diffusers.utils.torch_utils import randn_tensor

from ..auto import SamplerConfig, _older_repr, resolve
from ..run import Run
from ..schedules import EDM, CondOT, DiscreteVP
from ..solvers import (
    LOWER_ORDER_FINAL_BELOW,
    ancestral_step,
    check_options,
    churn_sigma,
    deis_coeffs,
    dpmpp_multistep,
    get_solver,
    heun_correction,
    linear_multistep_coeff,
    multistep_order,
    unipc_corrector,
    unipc_predictor,
)
from ..thermo import ThermoReport

__all__ = ["ThermoEulerDiscreteScheduler", "ThermoEulerAncestralDiscreteScheduler", "ThermoHeunDiscreteScheduler",
           "ThermoDPMSolverMultistepScheduler", "ThermoFlowMatchEulerDiscreteScheduler",
           "ThermoUniPCMultistepScheduler", "ThermoDDIMScheduler", "ThermoDDPMScheduler",
           "ThermoDEISMultistepScheduler", "ThermoLMSDiscreteScheduler", "ThermoAutoScheduler",
           "ThermoAutoFlowMatchScheduler", "pipeline_denoiser", "calibrate_pipeline"]

_FLOW_T_MAX = 1.0 - 1e-6


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 (a no-op `.to` still costs ~0.7 us of host time per call)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


class _SchedulerRun(Run):
    """The Run engine in a scheduler's coordinates: the pipeline evaluates the model, the scheduler hands
    each fused op to `update` with `track_map` (its state X and model output o, not x_hat and D), and the
    velocity is that of the training schedule at the scheduler's sigma (a table over the run's grid)."""

    def __init__(self, scheduler, sigmas, seed, schedule):
        self.flow = scheduler._flow
        self.flow_sigmas = getattr(scheduler.config, "use_flow_sigmas", False)
        super().__init__(None, sigmas, seed=seed, backend=scheduler.backend, track=True, schedule=schedule,
                         solver=type(scheduler).__name__)

    def _velocity_table(self, sigmas):
        return None       # built at the first tracked step: diffusers' __init__ sets 1000 steps no run uses

    def velocity(self, sigma):
        """(t, alpha, beta) at the scheduler's sigma: one vectorised table over the grid (the schedule's
        scalar maths per step cost more host time than a small state's step), scalar maths off the grid."""
        if self._velocity is None:
            grid = [s for s in self.sigmas if 0 < s < math.inf and not (self.flow_sigmas and s >= 1.0)]
            table = super()._velocity_table([self._sigma_hat(s) for s in grid])
            self._velocity = {s: table[self._sigma_hat(s)] for s in grid}
        hit = self._velocity.get(sigma)
        if hit is None:
            t = float(self.schedule.sigma_to_t(self._sigma_hat(sigma)))
            hit = self._velocity[sigma] = (t, *self.schedule.velocity_coeffs(t))
        return hit

    def tracked_velocity(self, sigma, track_map):
        cx, kx, ko = track_map
        if self.flow:  # x = (1 - t) y + t eps, t = sigma: nu = (x - D) / t
            return sigma, (1.0 - kx) / sigma, -ko / sigma
        t, alpha, beta = self.velocity(sigma)
        return t, alpha * cx + beta * kx, beta * ko

    def _sigma_hat(self, sigma):
        return sigma / (1.0 - sigma) if self.flow_sigmas else sigma

    def physical_m(self, sigma):
        if self.flow:
            return 1.0
        return float(self.schedule.m(float(self.schedule.sigma_to_t(self._sigma_hat(sigma)))))

    def temperature(self, t):
        if self.flow:  # CondOT: T = t / (1 - t)
            t = t.clamp(max=_FLOW_T_MAX)
            return t / (1.0 - t)
        return super().temperature(t)


class _ThermoStep:
    """Shared machinery: host copies of the grid, the host step index, and a Run that does the fused ops,
    the tracking, the NaN check and the report."""

    def __init_subclass__(cls, **kwargs):
        # Pipelines inspect set_timesteps' parameters (timesteps=, sigmas=): show the peer's signature.
        super().__init_subclass__(**kwargs)
        peer = next(b for b in cls.__mro__ if b.__module__.startswith("diffusers."))
        inner = cls.set_timesteps

        def set_timesteps(self, *args, **kw):
            return inner(self, *args, **kw)
        set_timesteps.__signature__ = inspect.signature(peer.set_timesteps)
        set_timesteps.__doc__ = inner.__doc__
        cls.set_timesteps = set_timesteps

    backend = "auto"          # fused-op backend for every step ("auto" | "torch" | "cpp" | "triton")
    _flow = False             # physical coordinates: CondOT (flow matching) instead of DiscreteVP
    _int_timesteps_refused = False   # step() refuses int timesteps with a ValueError, as the peer's does

    # -- set-up ---------------------------------------------------------------------------------
    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps, then host float copies of sigmas/timesteps and a fresh Run."""
        super().set_timesteps(*args, **kwargs)
        self._host_grid()

    def _host_grid(self):
        self._sig = self.sigmas.detach().to("cpu", torch.float64).tolist()
        self._ts = self.timesteps.detach().to("cpu", torch.float64).tolist()
        self._new_run()

    def _new_run(self):
        # The Philox seed is drawn at the first in-kernel noise (`_fused`), not here: Heun/LMS call
        # set_timesteps from __init__, and diffusers' set_timesteps leaves torch's generator alone.
        self._seed = None
        previous = getattr(self, "_run", None)
        self._run = _SchedulerRun(self, self._sig, 0, self._make_thermo_schedule())
        if previous is not None:    # the fused op's checks of this kind of call carry over
            self._run._checked = previous._checked

    def _make_thermo_schedule(self):
        if self._flow:
            return CondOT()
        ac = getattr(self, "alphas_cumprod", None)
        cached = self.__dict__.get("_vp_schedule")
        if cached is not None and cached[0] is ac:   # one DiscreteVP per alphas_cumprod (~25 us to build)
            return cached[1]
        try:
            schedule = DiscreteVP(ac) if ac is not None else EDM()
        except ValueError:  # e.g. zero terminal SNR: no finite VP sigma at the end
            schedule = EDM()
        self.__dict__["_vp_schedule"] = (ac, schedule)
        return schedule

    def _init_step_index(self, timestep):
        """Host-only step index (diffusers' looks the timestep up on the device and calls .item())."""
        if self.begin_index is not None:
            self._step_index = self._begin_index
            return
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            self._step_index = 0
            return
        value = float(timestep)
        hits = [k for k, t in enumerate(self._ts) if t == value]
        if not hits:   # diffusers' Euler/Heun/LMS/flow-match raise IndexError here; its multistep ones step as last
            raise IndexError(f"{type(self).__name__}: timestep {value:g} is not in the schedule "
                             f"({len(self._ts)} timesteps from {self._ts[0]:g} to {self._ts[-1]:g}); pass one of "
                             "scheduler.timesteps, or call set_begin_index() to start mid-schedule")
        self._step_index = hits[1] if len(hits) > 1 else hits[0]

    def _fallback(self, reason):
        if not getattr(self, "_warned", False):
            warnings.warn(f"{type(self).__name__}: {reason}; using diffusers' own step (not fused, not in the "
                          "ThermoReport)", stacklevel=3)
            self._warned = True

    # -- fused ops through the Run ---------------------------------------------------------------
    def _fused(self, i, inputs, coeffs, noise=0.0, track=None):
        """One fused op; `track` = (sigma, cx, kx, ko) records the rate of the evaluation at sigma, for a
        state X = inputs[0] with x_hat = cx X and denoised D = kx X + ko inputs[1]."""
        run = self._run
        run.backend = self.backend
        if noise != 0.0 and self._seed is None:   # this run's first in-kernel noise: draw its seed now
            self._seed = run.seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        if track is None:
            return run.update(inputs, coeffs, i, noise=noise)
        sigma, cx, kx, ko = track
        run.record_state(sigma, inputs[0], cx)
        return run.update(inputs, coeffs, i, noise=noise, track_sigma=sigma, track_map=(cx, kx, ko))

    def _stored(self, i, prev, dtype):
        """prev in the pipeline's dtype; a cast to fp16/bf16 that overflows is probed, so that `thermo`
        raises NonFiniteError for it as for any non-finite state (the fused op saw the float32 value)."""
        if prev.dtype == dtype:
            return prev
        prev = prev.to(dtype)
        if prev.element_size() < 4:
            self._run.probe(i, prev)
        return prev

    def _noise(self, i, shape, device, dtype, generator, coeff, inputs, coeffs):
        """Add `coeff` * noise: generator noise as an input (diffusers' numbers) or in-kernel Philox."""
        if generator is None:
            return coeff
        z = randn_tensor(shape, generator=generator, device=device, dtype=dtype).to(torch.float32)
        if coeff != 0.0:
            inputs.append(z)
            coeffs.append(coeff)
        return 0.0

    @property
    def thermo(self) -> ThermoReport | None:
        """ThermoReport of the current run (None before the first fused step). One host sync; raises
        thermosample.NonFiniteError if a model output or state was NaN/Inf."""
        run = getattr(self, "_run", None)
        if run is None or not run.eval_rows:
            return None
        run.check_finite()
        run.stochastic = self._stochastic()
        return run.report()

    def _stochastic(self):
        return False

    def _index(self, timestep, stepping=True):
        """The host step index; the first call finds `timestep` in the schedule (IndexError if it is not)."""
        if stepping and self._int_timesteps_refused and isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            peer = next(b for b in type(self).__mro__ if b.__module__.startswith("diffusers."))
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{peer.__name__}.step()` is not supported. Make sure to pass one of the "
                             "`scheduler.timesteps` as a timestep.")
        if getattr(self, "_ts", None) is None:   # step() before set_timesteps: diffusers steps on its __init__ grid
            self._host_grid()
        if self._step_index is None:
            self._init_step_index(timestep)
        n = len(self._ts)                   # the host copy: len() of a tensor costs ~1 us a step
        if self._step_index >= n:   # diffusers fails here with an IndexError from deep inside (or not at all)
            raise IndexError(f"{type(self).__name__}: step {self._step_index + 1} called after the last of its {n} "
                             "timesteps; call set_timesteps(...) to start a new run")
        return self._step_index

    def _x0_coeffs(self, sigma):
        """(kx, ko) with D = kx X + ko o for X = x_hat (Euler-type schedulers, diffusers' formulas)."""
        p = self.config.prediction_type
        if p in ("sample", "original_sample"):
            return 0.0, 1.0
        if p == "epsilon":
            return 1.0, -sigma
        if p == "v_prediction":
            return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {p!r}")

    def scale_model_input(self, sample, timestep=None, *args, **kwargs):
        """Divide the sample by sqrt(sigma^2 + 1) (a host float), as diffusers' Euler/Heun do."""
        i = self._index(timestep, stepping=False)
        self.is_scale_input_called = True
        return sample / math.sqrt(self._sig[i] ** 2 + 1.0)


class ThermoEulerDiscreteScheduler(_ThermoStep, EulerDiscreteScheduler):
    """EulerDiscreteScheduler (Karras et al. 2022, Alg. 2 with Euler steps) on thermosample's fused op."""

    _int_timesteps_refused = True

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, return_dict=True):
        """One Euler step x' = x + (sigma_next - sigma_hat) (x - D) / sigma_hat, optional churn.

        Args:
            model_output: [B, C, H, W] model prediction (epsilon, v or sample); timestep: from
            `self.timesteps`; sample: [B, C, H, W] current x_hat; s_churn/s_tmin/s_tmax/s_noise: EDM churn;
            generator: noise generator (diffusers' noise); return_dict: output class or tuple.
        """
        i = self._index(timestep)
        self._churned = getattr(self, "_churned", False) or s_churn > 0
        x, o = _f32(sample), _f32(model_output)
        s, s_next = self._sig[i], self._sig[i + 1]
        s_hat = churn_sigma(s, len(self._sig) - 1, s_churn, s_tmin, s_tmax)
        if s_hat > s:
            inputs, coeffs = [x], [1.0]
            noise = self._noise(i, o.shape, o.device, model_output.dtype, generator,
                                s_noise * math.sqrt(s_hat ** 2 - s ** 2), inputs, coeffs)
            x = self._fused(i, inputs, coeffs, noise=noise)
        kx, ko = self._x0_coeffs(s_hat)
        if self.config.prediction_type == "v_prediction":  # diffusers uses sigma (not sigma_hat) here
            kx, ko = self._x0_coeffs(s)
        denoised = self._fused(i, [x, o], [kx, ko], track=(s_hat, 1.0, kx, ko))
        r = s_next / s_hat
        prev = self._stored(i, self._fused(i, [x, denoised], [r, 1.0 - r]), model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _stochastic(self):
        return getattr(self, "_churned", False)


class _Pause(Exception):
    """Raised by _ReplayRun at the first model evaluation past the outputs given, with the state it was for."""

    def __init__(self, x):
        super().__init__()
        self.x = x


class _ReplayRun:
    """What a table solver sees inside ThermoAutoScheduler. The pipeline calls the model one step at a time,
    while a solver is a loop that calls the model, so every `step` re-runs the solver from its start: its
    evaluations return the model outputs given so far, its updates the results already computed (only the
    new step's updates run, on the scheduler's fused op) and it stops at the first evaluation past them,
    whose state is the step's result. Host maths is redone each step, tensor work is not."""

    noise_sampler = None
    seed = 0

    def __init__(self, scheduler, generator):
        self.scheduler, self.generator = scheduler, generator
        self.sigmas = scheduler._sig
        self.evals = self.updates = 0

    def steps(self):
        return range(len(self.sigmas) - 1)

    def denoise(self, x, sigma):
        outputs = self.scheduler._outputs
        self.evals += 1
        if self.evals > len(outputs):
            raise _Pause(x)
        return outputs[self.evals - 1]

    def update(self, inputs, coeffs, i, *, noise=0.0, **_):
        results = self.scheduler._results
        self.updates += 1
        if self.updates > len(results):
            sch, inputs, coeffs = self.scheduler, list(inputs), list(coeffs)
            z = inputs[0]
            noise = sch._noise(i, z.shape, z.device, z.dtype, self.generator, noise, inputs, coeffs) if noise else 0.0
            results.append(sch._fused(i, inputs, coeffs, noise=noise))
        return results[self.updates - 1]

    def callback(self, *args):
        pass


def _init_with_sampler_config(peer):
    """An __init__ taking the peer's registered arguments plus `sampler_config` (a SamplerConfig's to_dict(), or
    None), all registered in the scheduler's config: save_pretrained writes the SamplerConfig into
    scheduler_config.json and from_pretrained / from_config hand it back (its float64 sigmas exactly: JSON
    writes a float's shortest round-tripping repr)."""
    undecorated = peer.__init__.__wrapped__
    params = list(inspect.signature(undecorated).parameters.values())
    params.append(inspect.Parameter("sampler_config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))

    def __init__(self, *args, sampler_config=None, **kwargs):
        if sampler_config is not None:
            SamplerConfig.from_dict(sampler_config)       # a malformed one fails at load, not at the first step
        undecorated(self, *args, **kwargs)
    __init__.__signature__ = inspect.Signature(params)
    return register_to_config(__init__)


class _AutoSteps:
    """What both auto schedulers share: the SamplerConfig in the scheduler's config, the check that its sigmas
    are in this scheduler's coordinates, and each step as the tracked x0 prediction followed by the config's
    solver replayed to the next sigma (`_ReplayRun`). Subclasses say how the pipeline's latents map to the
    solver's state x_hat (`_to_state`, `_from_state`), how the model output maps to x0 (`_x0_coeffs`), and the
    diffusers grid (`_set_grid`)."""

    @classmethod
    def from_sampler_config(cls, config, scheduler_config=None, **kwargs):
        """A scheduler that runs `config` (a SamplerConfig or the path of one saved with `config.save`);
        scheduler_config (e.g. the pipeline's `pipe.scheduler.config`) and kwargs as in `from_config`.
        `ThermoAutoScheduler.from_sampler_config` gives a ThermoAutoFlowMatchScheduler for a flow-matching
        scheduler config (FlowMatchEulerDiscreteScheduler's). A solver that evaluates the model twice per
        step (heun, dpm_2, ...) is a ValueError: the pipeline calls the model once per timestep."""
        if not isinstance(config, SamplerConfig):
            config = SamplerConfig.load(config)
        solver, options = resolve(config, None)
        if get_solver(solver).evals_per_step != 1:
            raise ValueError(f"{cls.__name__} runs solvers with one model evaluation per step; the config's "
                             f"{solver!r} takes {get_solver(solver).evals_per_step}")
        check_options(solver, options)
        scheduler = cls.from_config(dict(scheduler_config or {}), sampler_config=config.to_dict(), **kwargs)
        scheduler.__dict__["_sampler_config"] = (scheduler.config["sampler_config"], config)   # keeps config.pilot
        return scheduler

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' from_config (and so from_pretrained); ThermoAutoScheduler's gives a
        ThermoAutoFlowMatchScheduler for a flow-matching scheduler config."""
        if cls is ThermoAutoScheduler and config is not None and _is_flow_config(dict(config)):
            cls = ThermoAutoFlowMatchScheduler
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def sampler_config(self) -> SamplerConfig | None:
        """The SamplerConfig this scheduler runs (None for one built without), read from its config."""
        blob = self.config.get("sampler_config")
        if blob is None:
            return None
        cached = self.__dict__.get("_sampler_config")
        if cached is None or cached[0] is not blob:
            cached = self.__dict__["_sampler_config"] = (blob, SamplerConfig.from_dict(blob))
        return cached[1]

    def _expected_schedule(self):
        return self._make_thermo_schedule()

    def _check_coordinates(self, config):
        """ValueError when the config was calibrated on another schedule than this scheduler's: its sigmas
        would be read in the wrong coordinates."""
        made = (config.calibrated_for or {}).get("schedule")
        if made is None:
            return
        now = repr(self._expected_schedule())
        if made not in (now, _older_repr(now)):
            raise ValueError(f"{type(self).__name__}: the SamplerConfig was calibrated for schedule {made}, but this "
                             f"scheduler runs {now}: its sigmas are in another model's coordinates. Calibrate with "
                             "the pipeline's own denoiser (calibrate_pipeline(pipe, ...) or pipeline_denoiser(pipe))")

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kwargs):
        """The config's grid: num_inference_steps may be omitted, and must otherwise be the config's steps."""
        config = self.sampler_config
        if config is None:
            raise ValueError(f"{type(self).__name__} has no SamplerConfig: build it with "
                             f"{type(self).__name__}.from_sampler_config(config, scheduler_config)")
        if timesteps is not None or (sigmas is not None and not self._ignores_sigmas):
            raise ValueError(f"{type(self).__name__} runs its SamplerConfig's sigmas; do not pass timesteps= or "
                             "sigmas=")
        if num_inference_steps is not None and num_inference_steps != config.steps:
            raise ValueError(f"the SamplerConfig was calibrated for {config.steps} steps, got num_inference_steps="
                             f"{num_inference_steps}: pass {config.steps}, or calibrate for {num_inference_steps} with "
                             f"ts.thermo_grid(den, {num_inference_steps}, solver='auto')")
        self._check_coordinates(config)
        self._set_grid(config, device)
        self._host_grid()

    _ignores_sigmas = False

    def _host_grid(self):
        """The config's float64 sigmas (diffusers' own are float32), the timesteps, a fresh run."""
        self._sig = [float(s) for s in self.sampler_config.sigmas]
        self._ts = self.timesteps.detach().to("cpu", torch.float64).tolist()
        self._outputs, self._results, self._returned = [], [], None
        self._new_run()

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, **kwargs):
        """The x0 prediction of `model_output` (tracked), then the config's solver to the next sigma.

        Args:
            model_output: [B, ...] the model's prediction (epsilon, v, sample, or a flow model's velocity);
            sample: [B, ...] the pipeline's latents; generator: the noise of a stochastic solver (diffusers'
            randn_tensor), else in-kernel Philox.
        """
        if getattr(self, "_ts", None) is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before step()")
        i = self._index(timestep)
        if i != len(self._outputs):
            raise ValueError(f"{type(self).__name__} runs its SamplerConfig from the first step: step {i} came "
                             f"after {len(self._outputs)} (a pipeline that starts mid-grid is not supported)")
        if sample is self._returned:
            x = self._state                         # the float32 state, not its copy in the pipeline's dtype
        else:
            x = self._to_state(_f32(sample), i)
            if i == 0:
                self._start = x
            else:                                   # the pipeline edited the latents: the solver goes on from them
                self._results[next(k for k, r in enumerate(self._results) if r is self._state)] = x
        s = self._sig[i]
        kx, ko = self._x0_coeffs(s)
        denoised = self._fused(i, [x, _f32(model_output)], [kx, ko], track=(s, 1.0, kx, ko))
        self._outputs.append(denoised)
        solver, options = resolve(self.sampler_config, None)
        try:
            self._state = get_solver(solver).fn(_ReplayRun(self, generator), self._start, self._sig, **options)
        except _Pause as pause:
            self._state = pause.x
        prev = self._returned = self._stored(i, self._from_state(self._state, i + 1), model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return self._output(prev, denoised)

    def _to_state(self, x, i):
        return x

    def _from_state(self, x, i):
        return x

    def _stochastic(self):
        solver, options = resolve(self.sampler_config, None)
        return get_solver(solver).injects_noise(options)


def _is_flow_config(scheduler_config) -> bool:
    """Whether a scheduler config is a flow-matching one (FlowMatchEulerDiscreteScheduler's, or a Thermo one)."""
    name = scheduler_config.get("_class_name") or ""
    return "FlowMatch" in name or ("shift" in scheduler_config and "beta_schedule" not in scheduler_config)


class ThermoAutoScheduler(_AutoSteps, _ThermoStep, EulerDiscreteScheduler):
    """Runs a `ts.SamplerConfig` (from `calibrate_pipeline(pipe, steps)` or `ts.thermo_grid(den, steps,
    solver="auto")`) in a diffusers pipeline: the config's solver and options, through the solver table's own
    function, on the config's sigmas.

        config = calibrate_pipeline(pipe, 10, conditioning={"class_labels": labels}, guidance_scale=4.0)
        pipe.scheduler = ThermoAutoScheduler.from_sampler_config(config, pipe.scheduler.config)
        images = pipe(..., num_inference_steps=10).images
        pipe.save_pretrained(d)     # scheduler_config.json holds the SamplerConfig ("sampler_config")

    Conventions are EulerDiscreteScheduler's (the state is x_hat = x / alpha, `scale_model_input` divides by
    sqrt(sigma^2 + 1), `init_noise_sigma`, the timesteps from the sigmas by diffusers' log-sigma
    interpolation; prediction_type epsilon, v_prediction or sample); the config's sigmas must be in the sigma
    coordinates of this alphas_cumprod (a den built with ts.schedules.DiscreteVP(scheduler.alphas_cumprod), as
    pipeline_denoiser builds it): set_timesteps raises ValueError when config.calibrated_for names another
    schedule. For a flow-matching scheduler config `from_sampler_config` gives ThermoAutoFlowMatchScheduler.
    Each step is the x0 prediction (tracked) and the solver's updates of that step (`_ReplayRun`): the states
    of the run are kept until set_timesteps. A pipeline may edit the latents between steps; it may not start
    mid-grid (img2img's strength < 1). Stochastic solvers take their noise from `generator` when given, else
    in-kernel Philox noise.

    Saving: the config is registered as the scheduler's "sampler_config" (its to_dict()), so
    `pipe.save_pretrained(d)` writes it into scheduler/scheduler_config.json and, after
    `import thermosample.integrations.diffusers`, `DiffusionPipeline.from_pretrained(d)` (or
    `ThermoAutoScheduler.from_pretrained(d, subfolder="scheduler")`) gives the scheduler back with the same
    SamplerConfig (float64 sigmas exactly)."""

    __init__ = _init_with_sampler_config(EulerDiscreteScheduler)

    def _set_grid(self, config, device):
        EulerDiscreteScheduler.set_timesteps(self, device=device, sigmas=[float(s) for s in config.sigmas])

    def _output(self, prev, denoised):
        return EulerDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


class ThermoAutoFlowMatchScheduler(_AutoSteps, _ThermoStep, FlowMatchEulerDiscreteScheduler):
    """ThermoAutoScheduler for flow-matching pipelines (SD3, Flux, any loop of FlowMatchEulerDiscreteScheduler):
    runs a SamplerConfig calibrated on the model as a CondOT denoiser (`pipeline_denoiser(pipe)`, or
    `ts.Denoiser(model, "condot", "flow_prediction", time="t", time_scale=num_train_timesteps)`), whose sigmas
    are sigma_hat = t / (1 - t).

    Conventions are FlowMatchEulerDiscreteScheduler's: the latents are x = (1 - t) x0 + t eps with the flow
    time t = sigma_hat / (1 + sigma_hat) in [0, 1] (`scheduler.sigmas`), the timesteps t * num_train_timesteps,
    no input scaling, the model predicts the velocity eps - x0. shift, dynamic shifting and the karras /
    exponential / beta options do not apply: the config's grid runs as it is, and the `sigmas=` and `mu=` a
    pipeline passes to set_timesteps (Flux and SD3 pass their default grid) are not used. The solver runs on
    x_hat = x / (1 - t); each step returns the latents x at the next flow time (x0 at the last). Saving and
    loading as ThermoAutoScheduler's."""

    __init__ = _init_with_sampler_config(FlowMatchEulerDiscreteScheduler)
    _ignores_sigmas = True

    def _make_thermo_schedule(self):
        return CondOT()

    def _set_grid(self, config, device):
        sig = np.asarray(config.sigmas, dtype=np.float64)
        t = sig / (1.0 + sig)
        self.num_inference_steps = config.steps
        self.sigmas = torch.as_tensor(t, dtype=torch.float32, device=device)
        self.timesteps = torch.as_tensor(t[:-1] * self.config.num_train_timesteps, dtype=torch.float32,
                                         device=device)
        self._step_index, self._begin_index = None, None

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def _x0_coeffs(self, sigma):
        """x0 = x - t v with x = x_hat / (1 + sigma), t = sigma / (1 + sigma): D = kx x_hat + ko v."""
        return 1.0 / (1.0 + sigma), -sigma / (1.0 + sigma)

    def _to_state(self, x, i):
        return x * (1.0 + self._sig[i])

    def _from_state(self, x, i):
        s = self._sig[i]
        return x / (1.0 + s) if s > 0.0 else x

    def _output(self, prev, denoised):
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


class ThermoEulerAncestralDiscreteScheduler(_ThermoStep, EulerAncestralDiscreteScheduler):
    """EulerAncestralDiscreteScheduler: Euler to sigma_down, then sigma_up fresh noise, on the fused op."""

    _int_timesteps_refused = True

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One ancestral Euler step (k-diffusion's sample_euler_ancestral with eta = 1).

        Args:
            model_output: [B, C, H, W] epsilon or v; sample: [B, C, H, W] x_hat; generator: diffusers' noise.
        """
        i = self._index(timestep)
        x, o = _f32(sample), _f32(model_output)
        s, s_next = self._sig[i], self._sig[i + 1]
        if self.config.prediction_type == "sample":
            raise NotImplementedError("prediction_type not implemented yet: sample")
        kx, ko = self._x0_coeffs(s)
        denoised = self._fused(i, [x, o], [kx, ko], track=(s, 1.0, kx, ko))
        down, up = ancestral_step(s, s_next, 1.0)
        r = down / s
        inputs, coeffs = [x, denoised], [r, 1.0 - r]
        noise = self._noise(i, o.shape, o.device, model_output.dtype, generator, up, inputs, coeffs)
        prev = self._stored(i, self._fused(i, inputs, coeffs, noise=noise), model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def _stochastic(self):
        return True


class ThermoHeunDiscreteScheduler(_ThermoStep, HeunDiscreteScheduler):
    """HeunDiscreteScheduler (Karras et al. 2022, Alg. 2, 2nd order) on the fused op; order = 2."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self._first = None  # (x, D, sigma, sigma_next) of a pending first-order stage

    @property
    def state_in_first_order(self):
        return getattr(self, "_first", None) is None

    def step(self, model_output, timestep, sample, return_dict=True):
        """A predictor (Euler) or corrector (trapezoid) stage; the grid interleaves them like diffusers'.

        Args:
            model_output: [B, C, H, W] epsilon, v or sample; sample: [B, C, H, W] x_hat.
        """
        i = self._index(timestep)
        x, o = sample, model_output
        if x.dtype != o.dtype:
            x, o = x.to(torch.float32), o.to(torch.float32)
        first = self._first is None
        s, s_next = (self._sig[i], self._sig[i + 1]) if first else (self._sig[i - 1], self._sig[i])
        kx, ko = self._x0_coeffs(s if first else s_next)
        sigma_eval = s if first else s_next
        denoised = self._fused(i, [x, o], [kx, ko], track=(sigma_eval, 1.0, kx, ko))
        if self.config.clip_sample:
            denoised = denoised.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if first:
            r = s_next / s
            prev = self._fused(i, [x, denoised], [r, 1.0 - r])
            self._first = (x, denoised, s, s_next) if s_next > 0 else None
            if s_next == 0:
                self.dt = None
            else:
                self.dt = s_next - s
        else:
            x0, d0, s0, s1 = self._first
            a, b = heun_correction(s0, s1)  # x0 + (s1 - s0)/2 (d(x0, s0) + d(x, s1))
            prev = self._fused(i, [x0, d0, x, denoised], [1.0 + a, -a, b, -b])
            self._first, self.dt = None, None
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return HeunDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


class _VPMultistep:
    """Shared by the multistep VP schedulers (DPM-Solver, UniPC, DEIS): the state is the physical x = alpha x_hat
    (or the flow state with use_flow_sigmas), (alpha_t, sigma_t) from a host sigma as diffusers'
    `_sigma_to_alpha_sigma_t`, and the x0 prediction D = kx x + ko o of each prediction type."""

    def _make_thermo_schedule(self):
        return CondOT() if getattr(self.config, "use_flow_sigmas", False) else super()._make_thermo_schedule()

    def scale_model_input(self, sample, *args, **kwargs):
        """Identity (these solvers work on the physical state)."""
        return sample

    def _alpha_sigma(self, s):
        if getattr(self.config, "use_flow_sigmas", False):
            return 1.0 - s, s
        a = 1.0 / math.sqrt(s * s + 1.0)
        return a, s * a

    def _lam(self, s):
        a, g = self._alpha_sigma(s)
        return math.log(a) - math.log(g)

    def _x0_map(self, s):
        a, g = self._alpha_sigma(s)
        p = self.config.prediction_type
        maps = {"epsilon": (1.0 / a, -g / a), "sample": (0.0, 1.0), "v_prediction": (a, -g),
                "flow_prediction": (1.0, -s)}
        if p not in maps:
            raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, `v_prediction`, or "
                             "`flow_prediction`")
        return maps[p]

    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' first")

    def _multistep_order(self, left):
        """diffusers' order of this step (solvers.multistep_order): lower-order warm start over the outputs
        kept so far, and `left` (the steps left, or None) for lower-order final steps."""
        return multistep_order(self.config.solver_order, self.lower_order_nums + 1, left)

    def _finish(self, prev, return_dict):
        """Advance the warm-start count and the step index; diffusers' output form."""
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _convert(self, i, x, o):
        """D = kx x + ko o at sigmas[i], one fused op that also records the evaluation's rate."""
        s = self._sig[i]
        kx, ko = self._x0_map(s)
        return self._fused(i, [x, o], [kx, ko], track=(s, 1.0 / self._alpha_sigma(s)[0], kx, ko)), kx, ko


def _merge(terms):
    """[(tensor, coeff)] -> (inputs, coeffs), one slot per distinct tensor (by identity), zero terms dropped
    (the first term, the state, is always kept so that the output has its shape and dtype)."""
    inputs, coeffs = [], []
    for k, (t, c) in enumerate(terms):
        for j, u in enumerate(inputs):
            if u is t:
                coeffs[j] += c
                break
        else:
            if c != 0.0 or k == 0:
                inputs.append(t)
                coeffs.append(c)
    return inputs, coeffs


class ThermoDPMSolverMultistepScheduler(_VPMultistep, _ThermoStep, DPMSolverMultistepScheduler):
    """DPMSolverMultistepScheduler, DPM-Solver++(1/2/3M) and SDE-DPM-Solver++(1/2/3M) (Lu et al. 2022), on the
    fused op.

    Fused: algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 1, 2 or 3, solver_type "midpoint" or
    "heun", no thresholding; other configs use diffusers' step (one warning). Each step is two fused ops: the
    x0 prediction (tracked) and the update over x and up to three kept predictions (+ the noise).
    """

    def _fusable(self):
        c = self.config
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            return f"algorithm_type={c.algorithm_type!r}"
        if c.solver_order not in (1, 2, 3) or c.solver_type not in ("midpoint", "heun"):
            return f"solver_order={c.solver_order}, solver_type={c.solver_type!r}"
        if c.thresholding or c.variance_type in ("learned", "learned_range"):
            return "thresholding / learned variance"
        return None

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict=True):
        """One multistep DPM-Solver++ update in lambda = log(alpha / sigma).

        Args:
            model_output: [B, C, H, W] epsilon, v, sample or flow prediction; sample: [B, C, H, W] physical
            x; generator / variance_noise: noise of the SDE variant (diffusers' numbers when given).
        """
        reason = self._fusable()
        if reason:
            self._fallback(f"{reason} is not fused")
            return super().step(model_output, timestep, sample, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        self._require_timesteps()
        c = self.config
        i = self._index(timestep)
        n = len(self._ts)
        lower_final = c.lower_order_final and n < LOWER_ORDER_FINAL_BELOW
        final = i == n - 1 and (c.euler_at_final or lower_final or c.final_sigmas_type == "zero")
        left = 1 if final else (n - i if lower_final else None)
        x, o = _f32(sample), _f32(model_output)
        s, s_next = self._sig[i], self._sig[i + 1]
        a_s, sg_s = self._alpha_sigma(s)
        denoised, _, _ = self._convert(i, x, o)
        self.model_outputs = list(self.model_outputs[1:]) + [denoised]
        sde = c.algorithm_type == "sde-dpmsolver++"
        order = self._multistep_order(left)
        a_t, sg_t = self._alpha_sigma(s_next)
        inputs, coeffs, noise = [x, denoised], [0.0, 1.0], 0.0  # sigma_t = 0: x = D
        if sde and generator is not None and variance_noise is None:
            variance_noise = randn_tensor(o.shape, generator=generator, device=o.device, dtype=torch.float32)
        h = self._lam(s_next) - self._lam(s) if sg_t > 0 else math.inf
        if h == 0:  # a repeated final sigma (karras + "sigma_min"): no step (diffusers: x, or NaN at order 3)
            inputs, coeffs = [x], [1.0]
        elif sg_t > 0:
            em = math.expm1(-2.0 * h) if sde else math.expm1(-h)
            if sde:
                cx, cd, cz = sg_t / sg_s * math.exp(-h), a_t * -em, sg_t * math.sqrt(-em)
                c1_heun = a_t * (-em / (-2.0 * h) + 1.0)
                c2 = a_t * ((-em - 2.0 * h) / (2.0 * h) ** 2 - 0.5)          # + c2 D2
            else:
                cx, cd, cz = sg_t / sg_s, -a_t * em, 0.0
                c1_heun = a_t * (em / h + 1.0)
                c2 = -a_t * ((em + h) / h ** 2 - 0.5)                        # - (...) D2
            terms = [(x, cx), (denoised, cd)]
            ms = self.model_outputs
            if order == 2:
                r0 = (self._lam(s) - self._lam(self._sig[i - 1])) / h
                c1 = 0.5 * cd if c.solver_type == "midpoint" else c1_heun
                terms += zip(ms[::-1], dpmpp_multistep(c1, 0.0, [r0]))
            elif order == 3:
                lam1, lam2 = self._lam(self._sig[i - 1]), self._lam(self._sig[i - 2])
                r0, r1 = (self._lam(s) - lam1) / h, (lam1 - lam2) / h
                terms += zip(ms[::-1], dpmpp_multistep(c1_heun, c2, [r0, r1]))
            inputs, coeffs = _merge(terms)
            if sde:
                if variance_noise is not None:
                    inputs, coeffs = inputs + [variance_noise.to(o.device, torch.float32)], coeffs + [cz]
                else:
                    noise = cz
        prev = self._stored(i, self._fused(i, inputs, coeffs, noise=noise), model_output.dtype)
        return self._finish(prev, return_dict)

    def _stochastic(self):
        return self.config.algorithm_type == "sde-dpmsolver++"


class ThermoFlowMatchEulerDiscreteScheduler(_ThermoStep, FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler (Euler on the rectified-flow ODE, Lipman et al. 2023 / SD3) on the
    fused op; the report is in CondOT coordinates, where the velocity is the model output."""

    _flow = True
    _int_timesteps_refused = True

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
             generator=None, per_token_timesteps=None, return_dict=True):
        """x' = x + (sigma_next - sigma) v, one fused pass (the rate ||v||^2 reduced in the same pass).

        Args:
            model_output: [B, ...] velocity prediction; sample: [B, ...] physical x; other arguments as in
            diffusers (per-token timesteps and stochastic sampling use diffusers' step).
        """
        if per_token_timesteps is not None or self.config.stochastic_sampling:
            self._fallback("per-token timesteps / stochastic_sampling are not fused")
            return super().step(model_output, timestep, sample, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                s_noise=s_noise, generator=generator, per_token_timesteps=per_token_timesteps,
                                return_dict=return_dict)
        i = self._index(timestep)
        x, o = _f32(sample), _f32(model_output)
        s, s_next = self._sig[i], self._sig[i + 1]
        prev = self._stored(i, self._fused(i, [x, o], [1.0, s_next - s], track=(s, 1.0, 1.0, -s)), model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


class ThermoUniPCMultistepScheduler(_VPMultistep, _ThermoStep, UniPCMultistepScheduler):
    """UniPCMultistepScheduler (Zhao et al. 2023; UniP-p predictor + UniC corrector, B(h) "bh1"/"bh2",
    solver_order 1-3, predict_x0=True) on the fused op.

    Each step is two fused ops: the x0 prediction (tracked) and one update that applies the UniC corrector
    at sigma_i and the UniP predictor to sigma_i+1 together, over the state and up to four kept predictions.
    The corrected state is kept as a combination (never stored): when `sample` is the tensor the previous
    step returned it is sample + Delta (the corrector minus the predictor that made it, as
    thermosample.solvers.unipc); otherwise (a pipeline that edits the latents between steps) it is diffusers'
    own UniC over `last_sample`, which is materialised then (one op). `last_sample` reads it materialised.
    A final step to sigma = 0 is x = D for bh1 too (diffusers' bh1 gives NaN there: B(h) = -inf).
    Not fused (diffusers' step, one warning): predict_x0=False, thresholding, solver_p.
    """

    def _host_grid(self):
        super()._host_grid()
        self._kept = []

    @property
    def last_sample(self):
        xc = self.__dict__.get("_xc")
        if xc is None:
            return None
        if len(xc) > 1 or xc[0][1] != 1.0:
            inputs, coeffs = _merge(xc)
            self._xc = [(self._fused(self._step_index or 0, inputs, coeffs), 1.0)]
        return self._xc[0][0]

    @last_sample.setter
    def last_sample(self, value):
        self._xc = None if value is None else [(value, 1.0)]
        self._returned = None

    def _fusable(self):
        c = self.config
        if not self.predict_x0:
            return "predict_x0=False"
        if c.thresholding:
            return "thresholding"
        if self.solver_p is not None:
            return "solver_p"
        if c.solver_order not in (1, 2, 3) or c.solver_type not in ("bh1", "bh2"):
            return f"solver_order={c.solver_order}, solver_type={c.solver_type!r}"
        return None

    def step(self, model_output, timestep, sample, return_dict=True):
        """UniC at sigma_i (when enabled) and UniP-p to sigma_i+1, one fused update.

        Args:
            model_output: [B, C, H, W] epsilon, v, sample or flow prediction; sample: [B, C, H, W] physical x.
        """
        reason = self._fusable()
        if reason:
            self._fallback(f"{reason} is not fused")
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        self._require_timesteps()
        c = self.config
        i = self._index(timestep)
        x, o = _f32(sample), _f32(model_output)
        s = self._sig[i]
        a_s, g_s = self._alpha_sigma(s)
        m, _, _ = self._convert(i, x, o)
        old = getattr(self, "_kept", [])       # x0 predictions, newest first
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self._xc is not None
        terms = [(x, 1.0)]
        if use_corrector:
            p_c, s_p = self.this_order, self._sig[i - 1]
            h = self._lam(s) - self._lam(s_p)
            rks = [(self._lam(self._sig[i - 1 - k]) - self._lam(s_p)) / h for k in range(1, p_c)] + [1.0]
            relative = sample is self._returned   # x_c = x + (UniC - UniP) over the kept predictions
            if not relative:                       # diffusers' UniC from last_sample
                terms = [(self.last_sample, g_s / self._alpha_sigma(s_p)[1]), (old[0], -a_s * math.expm1(-h))]
            outs = [m] + old                       # by age
            terms += [(outs[a], w) for a, w in unipc_corrector(h, rks, c.solver_type, scale=a_s, relative=relative)]
        self._kept = ([m] + old)[:c.solver_order]
        for k in range(c.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
            self.timestep_list[k] = self.timestep_list[k + 1]
        self.model_outputs[-1], self.timestep_list[-1] = m, timestep
        n = len(self._ts)
        self.this_order = p = self._multistep_order(n - i if c.lower_order_final else None)
        self._xc = terms
        s_t = self._sig[i + 1]
        a_t, g_t = self._alpha_sigma(s_t)
        if g_t == 0:      # h = inf: x = D (order 1; higher orders have rk = 0 there)
            step = [(x, 0.0), (m, 1.0)]
        else:
            h = self._lam(s_t) - self._lam(s)
            step = [(t, c_ * g_t / g_s) for t, c_ in terms] + [(m, -a_t * math.expm1(-h))]
            if p > 1:
                rks = [(self._lam(self._sig[i - k]) - self._lam(s)) / h for k in range(1, p)] + [1.0]
                step += [(self._kept[a], w) for a, w in unipc_predictor(h, rks, c.solver_type, scale=a_t)]
        inputs, coeffs = _merge(step)
        prev = self._stored(i, self._fused(i, inputs, coeffs), model_output.dtype)
        self._returned = prev
        return self._finish(prev, return_dict)


class ThermoDEISMultistepScheduler(_VPMultistep, _ThermoStep, DEISMultistepScheduler):
    """DEISMultistepScheduler (Zhang & Chen 2023, tAB "logrho", orders 1-3) on the fused op: the noise
    prediction eps (tracked, one op) and x_t = alpha_t (x / alpha_s + sum_j c_j eps_j) (one op), the c_j
    from thermosample.solvers.deis_coeffs in rho = sigma / alpha. Thresholding uses diffusers' step."""

    def _fusable(self):
        c = self.config
        if c.algorithm_type != "deis" or c.solver_type != "logrho":
            return f"algorithm_type={c.algorithm_type!r}, solver_type={c.solver_type!r}"
        if c.thresholding:
            return "thresholding"
        if c.solver_order not in (1, 2, 3):
            return f"solver_order={c.solver_order}"
        return None

    def step(self, model_output, timestep, sample, return_dict=True):
        """One multistep DEIS update.

        Args:
            model_output: [B, C, H, W] epsilon, v, sample or flow prediction; sample: [B, C, H, W] physical x.
        """
        reason = self._fusable()
        if reason:
            self._fallback(f"{reason} is not fused")
            return super().step(model_output, timestep, sample, return_dict=return_dict)
        self._require_timesteps()
        c = self.config
        i = self._index(timestep)
        n = len(self._ts)
        x, o = _f32(sample), _f32(model_output)
        s, s_t = self._sig[i], self._sig[i + 1]
        a_s, g_s = self._alpha_sigma(s)
        kx, ko = self._x0_map(s)
        # eps = (x - alpha x0) / sigma, x0 = kx x + ko o; the rate is that of x0
        eps = self._fused(i, [x, o], [(1.0 - a_s * kx) / g_s, -a_s * ko / g_s], track=(s, 1.0 / a_s, kx, ko))
        self.model_outputs = list(self.model_outputs[1:]) + [eps]
        order = self._multistep_order(n - i if c.lower_order_final and n < LOWER_ORDER_FINAL_BELOW else None)
        a_t, g_t = self._alpha_sigma(s_t)
        rhos = [self._rho(self._sig[i - k]) for k in range(order)]
        cs = deis_coeffs(rhos, self._rho(s_t))
        terms = [(x, a_t / a_s)] + [(self.model_outputs[-1 - k], a_t * cs[k]) for k in range(order)]
        inputs, coeffs = _merge(terms)
        prev = self._stored(i, self._fused(i, inputs, coeffs), model_output.dtype)
        return self._finish(prev, return_dict)

    def _rho(self, s):
        a, g = self._alpha_sigma(s)
        return g / a


class ThermoLMSDiscreteScheduler(_ThermoStep, LMSDiscreteScheduler):
    """LMSDiscreteScheduler (linear multistep in sigma, order <= 4) on the fused op: the x0 prediction
    (tracked), the derivative (x - x0) / sigma kept for later steps, and x + sum_j c_j d_j over up to four
    derivatives (one op); the c_j are thermosample.solvers.linear_multistep_coeff (exact polynomial
    integrals; diffusers integrates the same polynomials with scipy's quad)."""

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        """One linear multistep update of order min(order, step + 1).

        Args:
            model_output: [B, C, H, W] epsilon, v or sample; sample: [B, C, H, W] x_hat; order: 1-4.
        """
        if not self.is_scale_input_called:
            warnings.warn("The `scale_model_input` function should be called before `step` to ensure correct "
                          "denoising. See `StableDiffusionPipeline` for a usage example.", stacklevel=2)
        if not isinstance(order, int) or not 1 <= order <= 4:
            raise ValueError(f"order must be an int in 1..4, got {order!r}")
        i = self._index(timestep)
        x, o = _f32(sample), _f32(model_output)
        s = self._sig[i]
        kx, ko = self._x0_coeffs(s)
        denoised = self._fused(i, [x, o], [kx, ko], track=(s, 1.0, kx, ko))
        self.derivatives.append(self._fused(i, [x, denoised], [1.0 / s, -1.0 / s]))
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        p = min(i + 1, order)
        coeffs = [linear_multistep_coeff(p, self._sig, i, j) for j in range(p)]
        hist = list(reversed(self.derivatives))[:p]
        coeffs = coeffs[:len(hist)]   # a run begun mid-grid has fewer derivatives: diffusers zips them, so do we
        prev = self._stored(i, self._fused(i, [x] + hist, [1.0] + coeffs), model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return prev, denoised
        return LMSDiscreteSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)


class _TimestepScheduler:
    """DDIM/DDPM: diffusers keeps no sigma grid and indexes alphas_cumprod by the timestep value. The host grid
    is the VP sigma of each timestep (+ the final one); the step reads the timestep on the host when it is a
    number or a CPU tensor (diffusers' semantics, any order), else follows a host counter (a GPU timestep)."""

    def _final_alpha(self):
        return np.float32(1.0)

    def _in_schedule_only(self):
        """Whether a timestep must be one of `timesteps` (DDPM's previous-timestep lookup), not any training one."""
        return False

    def _host_grid(self):
        self._ac = self.alphas_cumprod.detach().to("cpu", torch.float32).numpy()
        self._ts = [int(t) for t in self.timesteps.detach().cpu().tolist()]
        self._sig = [self._sigma_of(self._ac[t]) for t in self._ts] + [self._sigma_of(self._final_alpha())]
        self._host_i = None
        self._new_run()

    @staticmethod
    def _sigma_of(a):
        a = float(a)
        if a <= 0.0:      # zero terminal SNR (rescale_betas_zero_snr): pure noise, sigma = inf
            return math.inf
        return math.sqrt((1.0 - a) / a) if a < 1.0 else 0.0

    def _host_timestep(self, timestep):
        """(index into the host grid, timestep value); no device read."""
        if getattr(self, "_run", None) is None:
            self._host_grid()
        nxt = self._host_i if self._host_i is not None else (getattr(self, "_begin_index", None) or 0)
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            i = min(nxt, len(self._ts) - 1)
            t = self._ts[i]
        else:
            value = float(timestep)
            t = int(value) if value.is_integer() else None
            hits = [k for k, v in enumerate(self._ts) if v == t]
            if not hits and (self._in_schedule_only() or t is None or not 0 <= t < len(self._ac)):
                where = ("is not in the schedule" if self._in_schedule_only() else
                         f"is not an integer in [0, {len(self._ac)})")
                raise IndexError(f"{type(self).__name__}: timestep {value:g} {where}; pass one of "
                                 "scheduler.timesteps")
            i = hits[0] if hits else min(nxt, len(self._ts) - 1)
        self._host_i = i + 1
        return i, t

    def _x0_eps(self, a_t):
        """sqrt(a), sqrt(1 - a) (float32, as diffusers) and the maps x0 = kx x + ko o, eps = ex x + eo o."""
        b_t = np.float32(1.0) - a_t
        ra, rb = float(np.sqrt(a_t)), float(np.sqrt(b_t))
        p = self.config.prediction_type
        if p == "epsilon":
            if ra == 0.0:   # diffusers divides by sqrt(alphas_cumprod) = 0 here and returns Inf/NaN
                raise ValueError("prediction_type='epsilon' cannot predict x0 at alphas_cumprod = 0 (zero terminal "
                                 "SNR, rescale_betas_zero_snr=True): use 'v_prediction' or 'sample'")
            return ra, rb, (1.0 / ra, -rb / ra), (0.0, 1.0)
        if p == "sample":
            return ra, rb, (0.0, 1.0), (1.0 / rb, -ra / rb)
        if p == "v_prediction":
            return ra, rb, (ra, -rb), (rb, ra)
        raise ValueError(f"prediction_type given as {p} must be one of `epsilon`, `sample`, or `v_prediction`")

    def _predict_x0(self, i, t, x, o):
        ra, rb, (kx, ko), e = self._x0_eps(self._ac[t])
        # at alphas_cumprod = 0 (sigma = inf) the step is exact but has no finite velocity: not tracked
        track = (self._sig[i], 1.0 / ra, kx, ko) if ra > 0.0 else None
        x0 = self._fused(i, [x, o], [kx, ko], track=track)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, ra, rb, (kx, ko), e

    def scale_model_input(self, sample, *args, **kwargs):
        return sample


class ThermoDDIMScheduler(_TimestepScheduler, _ThermoStep, DDIMScheduler):
    """DDIMScheduler (Song et al. 2021; eta = 0 deterministic, eta > 0 with fresh noise) on the fused op: the x0
    prediction (tracked, clipped as diffusers' clip_sample) and x' = sqrt(a') x0 + sqrt(1 - a' - std^2) eps
    + std z in one op. Noise: `variance_noise` or `generator` give diffusers' numbers; with neither it is
    in-kernel Philox noise. Thresholding uses diffusers' step."""

    def _final_alpha(self):
        return np.float32(self.final_alpha_cumprod)

    def step(self, model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
             variance_noise=None, return_dict=True):
        """One DDIM step from `timestep` to timestep - num_train_timesteps // num_inference_steps.

        Args:
            model_output: [B, C, H, W] epsilon, v or sample; sample: [B, C, H, W] physical x; eta: noise
            weight (0: DDIM, 1: DDPM-like); use_clipped_model_output: eps re-derived from the clipped x0;
            generator / variance_noise: diffusers' noise (not both).
        """
        if self.config.thresholding:
            self._fallback("thresholding is not fused")
            return super().step(model_output, timestep, sample, eta=eta,
                                use_clipped_model_output=use_clipped_model_output, generator=generator,
                                variance_noise=variance_noise, return_dict=return_dict)
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating "
                             "the scheduler")
        i, t = self._host_timestep(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_prev = self._ac[prev_t] if prev_t >= 0 else self._final_alpha()
        x, o = _f32(sample), _f32(model_output)
        x0, ra, rb, _, (ex, eo) = self._predict_x0(i, t, x, o)
        a_t = self._ac[t]
        one = np.float32(1.0)
        variance = ((one - a_prev) / (one - a_t)) * (one - a_t / a_prev)
        std = np.float32(eta) * np.sqrt(variance)
        direction = float(np.sqrt(one - a_prev - std * std))
        if use_clipped_model_output:   # eps = (x - sqrt(a) x0) / sqrt(1 - a)
            terms = [(x0, float(np.sqrt(a_prev)) - direction * ra / rb), (x, direction / rb)]
        else:
            terms = [(x0, float(np.sqrt(a_prev))), (x, direction * ex), (o, direction * eo)]
        inputs, coeffs = _merge(terms)
        noise = 0.0
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            self._eta_used = True
            if variance_noise is not None:
                inputs, coeffs = inputs + [variance_noise.to(o.device, torch.float32)], coeffs + [float(std)]
            else:
                noise = self._noise(i, o.shape, o.device, model_output.dtype, generator, float(std), inputs, coeffs)
        prev = self._stored(i, self._fused(i, inputs, coeffs, noise=noise), model_output.dtype)
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _stochastic(self):
        return getattr(self, "_eta_used", False)


class ThermoDDPMScheduler(_TimestepScheduler, _ThermoStep, DDPMScheduler):
    """DDPMScheduler (Ho et al. 2020, the ancestral step) on the fused op: the x0 prediction (tracked, clipped as
    diffusers' clip_sample) and x' = c0 x0 + c_x x + std z in one op. variance_type "fixed_small",
    "fixed_small_log" and "fixed_large" are fused; "learned", "learned_range", "fixed_large_log" and
    thresholding use diffusers' step (one warning). With a `generator` the noise is diffusers' draw; without
    one, in-kernel Philox noise."""

    def _in_schedule_only(self):
        return True

    def _fusable(self):
        if self.config.thresholding:
            return "thresholding"
        if self.variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            return f"variance_type={self.variance_type!r}"
        return None

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One ancestral DDPM step from `timestep` to the previous timestep of the grid.

        Args:
            model_output: [B, C, H, W] epsilon, v or sample; sample: [B, C, H, W] physical x; generator:
            diffusers' noise.
        """
        reason = self._fusable()
        if reason:
            self._fallback(f"{reason} is not fused")
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        i, t = self._host_timestep(timestep)
        prev_t = self._ts[i + 1] if (t in self._ts and i + 1 < len(self._ts)) else (-1 if t in self._ts else t - 1)
        one = np.float32(1.0)
        a_t = self._ac[t]
        a_prev = self._ac[prev_t] if prev_t >= 0 else one
        b_t, b_prev = one - a_t, one - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = one - cur_alpha
        x, o = _f32(sample), _f32(model_output)
        x0, *_ = self._predict_x0(i, t, x, o)
        c0 = float((np.sqrt(a_prev) * cur_beta) / b_t)
        cx = float(np.sqrt(cur_alpha) * b_prev / b_t)
        inputs, coeffs, noise = [x0, x], [c0, cx], 0.0
        if t > 0:
            variance = max((b_prev / b_t) * cur_beta, np.float32(1e-20))
            std = {"fixed_small": lambda: np.sqrt(variance),
                   "fixed_small_log": lambda: np.exp(np.float32(0.5) * np.log(variance)),
                   "fixed_large": lambda: np.sqrt(cur_beta)}[self.variance_type]()
            noise = self._noise(i, o.shape, o.device, model_output.dtype, generator, float(std), inputs, coeffs)
        prev = self._stored(i, self._fused(i, inputs, coeffs, noise=noise), model_output.dtype)
        if not return_dict:
            return prev, x0
        return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _stochastic(self):
        return True


# --------------------------------------------------------------------------------------------------
# The denoiser a pipeline runs, and its calibration
# --------------------------------------------------------------------------------------------------
def _conditioning(value, name) -> dict:
    """A conditioning dict checked and flattened: {path: tensor}, a path being the tuple of keys down nested
    dicts (SDXL's added_cond_kwargs), every tensor with one leading size K (the number of conditionings)."""
    if value is None:
        return {}
    flat = {}

    def walk(d, path):
        for key, v in d.items():
            if isinstance(v, dict):
                walk(v, path + (key,))
            elif isinstance(v, torch.Tensor) and v.dim() >= 1:
                flat[path + (key,)] = v
            else:
                raise TypeError(f"{name} must be a dict of the model's keyword arguments as tensors with a leading "
                                f"dimension, or dicts of them (e.g. {{'class_labels': tensor([3, 7])}}); "
                                f"{'.'.join(path + (key,))} is {type(v).__name__}")
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of the model's keyword arguments, got {type(value).__name__}")
    walk(value, ())
    sizes = {int(v.shape[0]) for v in flat.values()}
    if len(sizes) > 1:
        raise ValueError(f"{name}'s tensors must share their leading size (one row per conditioning), got {sizes}")
    return flat


def _nested(flat: dict) -> dict:
    """{path: tensor} back to the model's (nested) keyword arguments."""
    out = {}
    for path, v in flat.items():
        d = out
        for key in path[:-1]:
            d = d.setdefault(key, {})
        d[path[-1]] = v
    return out


def _calibration_rows(n: int, k: int, batch: int) -> torch.Tensor:
    """The conditioning row [n] of each row of a batch of n that a calibration with a pilot of `batch` samples
    (even, >= 8) passes to the model. Sample j of the pilot gets conditioning (j // 2) mod k; the batches
    thermo_grid forms (calibrate.pilot, reference, pilot_errors, fit_corrections, _probe_pilot) are
    - 2 x batch rows: the twins pilot, the trajectories then their twins (row r is sample r mod batch);
    - batch rows: the reference and every candidate run, the samples in order (and 2 rows: its first two);
    - batch / 2 rows: the fitted-corrections stage, the even samples 2p or the odd samples 2p + 1, both
      of pair p, so row p has conditioning p mod k.
    Within one run a row is one trajectory, so every sample sees one conditioning at every call, in every
    stage. Any other size is a ValueError (a layout this mapping does not know)."""
    r = torch.arange(n)
    if n == 2 * batch:
        return ((r % batch) // 2) % k
    if n == batch // 2:
        return r % k
    if n in (batch, 2):
        return (r // 2) % k
    raise ValueError(f"the calibration called the guided model on {n} rows; with {k} conditionings the pilot of "
                     f"{batch} samples is called on {2 * batch}, {batch}, {batch // 2} or 2 rows only (a changed "
                     "calibration layout: see thermosample.integrations.diffusers._calibration_rows)")


def _sampling_rows(n: int, k: int) -> torch.Tensor:
    """Conditioning rows for a sampling batch of n: one per conditioning (n = k), or each repeated n // k times
    in a row (diffusers' num_images_per_prompt)."""
    if n % k:
        raise ValueError(f"a batch of {n} rows with {k} conditionings: pass a batch of a multiple of {k} rows "
                         "(each conditioning's rows together, as diffusers' num_images_per_prompt)")
    return torch.arange(n) // (n // k)


class GuidedModel(torch.nn.Module):
    """A pipeline's network as the pipeline calls it, with its conditioning and classifier-free guidance:
    `model(x, t)` -> out = uncond + w (cond - uncond), from one call of the network on the two halves
    concatenated (unconditional first, as diffusers pipelines do); w = 1 or no negative conditioning: one
    conditional call. A network that also predicts variances (more output channels than input, DiT) gives its
    first C channels. The conditioning of row r follows the batch (`_sampling_rows`), or, with
    `calibration_batch=B`, the layouts of a calibration with a pilot of B samples (`_calibration_rows`). The
    network's parameters and the guidance scale (a buffer) make its fingerprint; the conditioning does not
    (a config calibrated on some prompts is for the model at that scale, not for those prompts)."""

    def __init__(self, net, conditioning=None, negative_conditioning=None, guidance_scale: float = 1.0,
                 rows: int | None = None, calibration_batch: int | None = None):
        super().__init__()
        self.net = net
        self.cond = _conditioning(conditioning, "conditioning")
        self.uncond = _conditioning(negative_conditioning, "negative_conditioning")
        w = float(guidance_scale)
        if not math.isfinite(w):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        self.register_buffer("guidance_scale", torch.tensor(w, dtype=torch.float64))
        self.w = w
        self.guided = w != 1.0 and bool(self.uncond)
        if w != 1.0 and not self.uncond:
            raise ValueError("guidance_scale != 1 needs negative_conditioning (the null class label, the empty "
                             "prompt's embeddings)")
        if self.guided and set(self.uncond) != set(self.cond):
            names = lambda d: sorted(".".join(k) for k in d)  # noqa: E731
            raise ValueError(f"negative_conditioning must name the conditioning's keys {names(self.cond)}, got "
                             f"{names(self.uncond)}")
        self.k = next((int(v.shape[0]) for v in self.cond.values()), 1)
        ku = next((int(v.shape[0]) for v in self.uncond.values()), 1)
        if ku not in (1, self.k):
            raise ValueError(f"negative_conditioning has {ku} rows: give 1 (shared) or one per conditioning ({self.k})")
        self.rows = rows
        self.calibration_batch = calibration_batch
        self._moved = {}

    def _on(self, which: str, device, dtype) -> dict:
        """The conditioning `which` ("cond" or "uncond") on `device`, floats in `dtype`: moved once per device
        and dtype, not on every call (a host-to-device copy per step on a GPU)."""
        key = (which, device, dtype)
        if key not in self._moved:
            self._moved[key] = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
                                for k, v in getattr(self, which).items()}
        return self._moved[key]

    def _rows(self, n):
        if self.k == 1:
            return torch.zeros(n, dtype=torch.long)
        if self.calibration_batch is not None:
            return _calibration_rows(n, self.k, self.calibration_batch)
        return _sampling_rows(n, self.k)

    def forward(self, x, t, **kwargs):
        idx = self._rows(x.shape[0])
        step = self.rows or x.shape[0]
        return torch.cat([self._call(x[i:i + step], t[i:i + step], idx[i:i + step], kwargs)
                          for i in range(0, x.shape[0], step)])

    def _call(self, x, t, idx, kwargs):
        rows = idx.to(x.device)

        def take(which):   # rows idx of each tensor (a shared one expanded), on x's device, floats in x's dtype
            return {k: (v if v.shape[0] == 1 else v[rows]).expand(len(idx), *v.shape[1:])
                    for k, v in self._on(which, x.device, x.dtype).items()}
        if not self.guided:
            return self._net(x, t, {**_nested(take("cond")), **kwargs}, x.shape[1])
        uncond, cond = take("uncond"), take("cond")
        both = _nested({k: torch.cat([uncond[k], cond[k]]) for k in cond})
        out = self._net(torch.cat([x, x]), torch.cat([t, t]), {**both, **kwargs}, x.shape[1])
        uncond, cond = out.chunk(2)
        return uncond + self.w * (cond - uncond)

    def _net(self, x, t, kwargs, channels):
        out = self.net(x, timestep=t, **kwargs)
        if not isinstance(out, torch.Tensor):           # diffusers' output dataclass (or a tuple)
            out = out.sample if hasattr(out, "sample") else out[0]
        return out[:, :channels] if out.dim() > 1 and out.shape[1] > channels else out


def _network(pipe, model=None):
    net = model if model is not None else getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if net is None:
        raise ValueError("the pipeline has no `unet` or `transformer`: pass model=")
    return net


def pipeline_denoiser(pipe, conditioning: dict | None = None, negative_conditioning: dict | None = None,
                      guidance_scale: float = 1.0, *, model=None, scheduler_config=None, rows: int | None = None,
                      calibration_batch: int | None = None):
    """The `ts.Denoiser` a diffusers pipeline runs: its network (`pipe.unet` or `pipe.transformer`, or
    `model`) with the conditioning and classifier-free guidance of `GuidedModel`, in the sigma coordinates
    of its scheduler (`pipe.scheduler.config`, or `scheduler_config`):

    - a flow-matching scheduler (FlowMatchEulerDiscreteScheduler's config): schedule CondOT, prediction
      "flow_prediction", the model's time t * num_train_timesteps (SD3's convention; a pipeline that hands
      its network another time, as Flux's t, or packs its latents, needs `model=` a wrapper that does
      what the pipeline does), its input the latents x = (1 - t) x_hat;
    - else DiscreteVP(alphas_cumprod) of the config (as EulerDiscreteScheduler computes it), its
      prediction_type ("epsilon", "v_prediction" or "sample"), the model's time the timesteps diffusers'
      Euler gives (the fractional training index; 0.25 log sigma for timestep_type="continuous"
      v-prediction), its input x_hat / sqrt(1 + sigma^2).

    Args:
        conditioning: the network's keyword arguments as tensors with a leading size K, one row per
            conditioning: {"class_labels": tensor of K labels}, {"encoder_hidden_states": [K, L, D]}, or
            dicts of them (SDXL's {"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}). Prompts:
            `pe, ne = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=[""] * K)` (Stable
            Diffusion's signature) gives {"encoder_hidden_states": pe} and {"encoder_hidden_states": ne[:1]}.
        negative_conditioning: the same keys with 1 or K rows: the null class, the empty prompt's embeddings.
        guidance_scale: w in out = uncond + w (cond - uncond), in the model's prediction space.
        rows: most state rows per network call (None: whole batches; with guidance the network sees twice that).
        calibration_batch: the pilot size of a calibration this den is for (`calibrate_pipeline` sets it):
            its rows take conditionings by `_calibration_rows`; None: a batch of n rows takes conditioning
            r // (n // K) (n = K: one row each).
    """
    from ..denoiser import Denoiser
    net = _network(pipe, model)
    cfg = dict(scheduler_config if scheduler_config is not None else pipe.scheduler.config)
    guided = GuidedModel(net, conditioning, negative_conditioning, guidance_scale, rows, calibration_batch)
    if _is_flow_config(cfg):
        return Denoiser(guided, CondOT(), "flow_prediction", time="t",
                        time_scale=float(cfg.get("num_train_timesteps", 1000)))
    keys = inspect.signature(EulerDiscreteScheduler.__init__).parameters
    vp = EulerDiscreteScheduler.from_config({k: v for k, v in cfg.items() if k in keys})
    prediction = cfg.get("prediction_type", "epsilon")
    time = "index"
    if cfg.get("timestep_type") == "continuous" and prediction == "v_prediction":
        time = _continuous_time       # Euler's timesteps for continuous v-prediction models: 0.25 log sigma
    return Denoiser(guided, DiscreteVP(vp.alphas_cumprod), prediction, time=time)


def _continuous_time(t, sigma):
    return 0.25 * math.log(sigma)


def _sample_shape(net):
    c = getattr(net, "config", None) or {}
    size, channels = c.get("sample_size"), c.get("in_channels")
    if size is None or channels is None:
        return None
    return (int(channels), *((int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)))


def calibrate_pipeline(pipe, steps: int, *, conditioning: dict | None = None,
                       negative_conditioning: dict | None = None, guidance_scale: float = 1.0,
                       sample_shape: tuple | None = None, options=None, model=None, dtype=None, device=None,
                       backend: str = "auto") -> SamplerConfig:
    """Calibrate solver="auto" for a pipeline: `ts.thermo_grid(den, steps, solver="auto")` on the denoiser the
    pipeline runs (`pipeline_denoiser`: its network, conditioning and guidance scale, in its scheduler's
    coordinates). Returns the SamplerConfig, for `ThermoAutoScheduler.from_sampler_config(config,
    pipe.scheduler.config)` (a flow-matching pipeline gets ThermoAutoFlowMatchScheduler).

        config = calibrate_pipeline(pipe, 10, conditioning={"class_labels": torch.tensor([1, 3, 5, 7])},
                                    negative_conditioning={"class_labels": torch.tensor([10])},
                                    guidance_scale=4.0)

    What is calibrated is the guided denoiser at this guidance scale: a config is for that scale (another
    scale is another vector field). The pilot's samples take the K conditionings in turn (sample j: (j // 2)
    mod K, the same at every call of its trajectory, `_calibration_rows`), so a handful of prompts or class
    labels stands for the model's use; the pilot is a multiple of 2K samples (the cost tier's size rounded
    down, at least 8).

    Cost: thermo_grid states its planned rows and shows its bar (options.progress) in state rows; with
    guidance (w != 1) the network sees two rows per state row, which a line before the bar says, and
    config.calibrated_for["guidance"] records (scale, conditionings, model_rows).

    Args:
        steps: the sampling steps the config is for.
        conditioning, negative_conditioning, guidance_scale: as `pipeline_denoiser`.
        sample_shape: one latent's shape (default: the network's config, (in_channels, sample_size, sample_size)).
        options: a ts.CalibrationOptions (cost tier, progress, ...); its pilot_rows bounds the state rows of one
            network call; boundary_pool must stay 0 with several conditionings.
        model, dtype, device, backend: the network instead of pipe.unet / pipe.transformer; as thermo_grid's.
    """
    from dataclasses import replace

    from .. import calibrate as C
    from ..calibrate import CalibrationOptions, thermo_grid

    opts = CalibrationOptions() if options is None else options
    if not isinstance(opts, CalibrationOptions):
        raise TypeError(f"options must be a ts.CalibrationOptions, got {type(opts).__name__}")
    net = _network(pipe, model)
    sample_shape = tuple(sample_shape) if sample_shape is not None else _sample_shape(net)
    if sample_shape is None:
        raise ValueError("calibrate_pipeline needs sample_shape=(C, H, W): the network's config has no "
                         "in_channels / sample_size")
    k = next((int(v.shape[0]) for v in _conditioning(conditioning, "conditioning").values()), 1)
    batch = opts.pilot_batch
    if k > 1:
        if opts.boundary_pool:
            raise ValueError("boundary_pool > 0 screens starting points in batches of its own layout: with several "
                             "conditionings leave it 0")
        if batch is None:
            plan = C._Plan.of(int(steps), "auto", None, None, None)
            batch = C._sized(opts, plan, {}).pilot_batch
            batch = max(2 * k * -(-8 // (2 * k)), batch // (2 * k) * (2 * k))
        elif batch % 2 or batch < 8:
            raise ValueError(f"with several conditionings pilot_batch must be even and >= 8, got {batch}")
    den = pipeline_denoiser(pipe, conditioning, negative_conditioning, guidance_scale, model=net,
                            rows=opts.pilot_rows, calibration_batch=batch if k > 1 else None)
    per_row = 2 if den.model.guided else 1
    calib = replace(opts, pilot_batch=batch, pilot_rows=None)
    if per_row == 2 and (opts.progress if opts.progress is not None else sys.stderr.isatty()):
        planned = C.planned_rows(int(steps), "auto", calib)
        from tqdm.auto import tqdm
        tqdm.write(f"calibrate_pipeline: guidance scale {den.model.w:g} calls the network on 2 rows per state row: "
                   f"at most {2 * planned:,} network rows (the bar below counts {planned:,} state rows)",
                   file=sys.stderr)
    config = thermo_grid(den, int(steps), solver="auto", sample_shape=sample_shape, dtype=dtype, device=device,
                         backend=backend, options=calib)
    pilot = config.calibrated_for.get("pilot", {})
    config.calibrated_for["guidance"] = {"scale": den.model.w, "conditionings": k, "network_rows_per_row": per_row,
                                         "network_rows": per_row * int(pilot.get("rows", 0))}
    return config
