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
- noise: with a `generator` the noise is `randn_tensor(..., generator=generator)` exactly as diffusers
  draws it (same outputs); without one it is thermosample's in-kernel Philox noise (same distribution),
  seeded by one draw from torch's default CPU generator at `set_timesteps`.
- `scheduler.thermo`: the ThermoReport of the run so far (reading it syncs once and raises
  thermosample.NonFiniteError if a model output or state was NaN/Inf). Physical coordinates are those
  of the training schedule: DiscreteVP(alphas_cumprod) for the VP schedulers, CondOT (rectified flow)
  for flow matching.
- config options whose step thermosample does not implement (e.g. DPM-Solver order 3, thresholding,
  per-token timesteps) fall back to diffusers' own `step` with one warning; those steps are not fused
  and not in the report.

This module imports diffusers; `import thermosample` does not import this module.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from diffusers.schedulers.scheduling_dpmsolver_multistep import SchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..run import Run
from ..schedules import EDM, CondOT, DiscreteVP
from ..solvers import ancestral_step, churn_sigma, heun_correction
from ..thermo import ThermoReport

__all__ = ["ThermoEulerDiscreteScheduler", "ThermoEulerAncestralDiscreteScheduler", "ThermoHeunDiscreteScheduler",
           "ThermoDPMSolverMultistepScheduler", "ThermoFlowMatchEulerDiscreteScheduler"]

_FLOW_T_MAX = 1.0 - 1e-6


class _SchedulerRun(Run):
    """The Run engine in a scheduler's coordinates: the pipeline evaluates the model, the scheduler hands
    each fused op to `update` with `track_map` (its state X and model output o, not x_hat and D), and the
    velocity is that of the training schedule at the scheduler's sigma (scalar, no grid table)."""

    def __init__(self, scheduler, sigmas, seed, schedule):
        super().__init__(None, sigmas, seed=seed, backend=scheduler.backend, track=True, schedule=schedule,
                         solver=type(scheduler).__name__)
        self.flow = scheduler._flow
        self.flow_sigmas = getattr(scheduler.config, "use_flow_sigmas", False)

    def _velocity_table(self, sigmas):
        return {}

    def tracked_velocity(self, sigma, track_map):
        cx, kx, ko = track_map
        if self.flow:  # x = (1 - t) y + t eps, t = sigma: nu = (x - D) / t
            return sigma, (1.0 - kx) / sigma, -ko / sigma
        t = float(self.schedule.sigma_to_t(self._sigma_hat(sigma)))
        alpha, beta = self.schedule.velocity_coeffs(t)
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

    # -- set-up ---------------------------------------------------------------------------------
    def set_timesteps(self, *args, **kwargs):
        """diffusers' set_timesteps, then host float copies of sigmas/timesteps and a fresh Run."""
        super().set_timesteps(*args, **kwargs)
        self._sig = self.sigmas.detach().to("cpu", torch.float64).tolist()
        self._ts = self.timesteps.detach().to("cpu", torch.float64).tolist()
        self._seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self._run = _SchedulerRun(self, self._sig, self._seed, self._make_thermo_schedule())

    def _make_thermo_schedule(self):
        if self._flow:
            return CondOT()
        try:
            return DiscreteVP(self.alphas_cumprod)
        except (AttributeError, ValueError):  # e.g. zero terminal SNR: no finite VP sigma at the end
            return EDM()

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
        self._step_index = hits[1] if len(hits) > 1 else (hits[0] if hits else 0)

    def _fallback(self, reason):
        if not getattr(self, "_warned", False):
            warnings.warn(f"{type(self).__name__}: {reason}; using diffusers' own step (not fused, not in the "
                          "ThermoReport)", stacklevel=3)
            self._warned = True

    # -- fused ops through the Run ---------------------------------------------------------------
    def _fused(self, i, inputs, coeffs, noise=0.0, track=None):
        """One fused op; `track` = (sigma, cx, kx, ko) records the rate of the evaluation at sigma, for a
        state X = inputs[0] with x_hat = cx X and denoised D = kx X + ko inputs[1]."""
        self._run.backend = self.backend
        if track is None:
            return self._run.update(inputs, coeffs, i, noise=noise)
        sigma, cx, kx, ko = track
        self._run.record_state(sigma, inputs[0], cx)
        return self._run.update(inputs, coeffs, i, noise=noise, track_sigma=sigma, track_map=(cx, kx, ko))

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

    def _index(self, timestep):
        if self.step_index is None:
            self._init_step_index(timestep)
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
        i = self._index(timestep)
        self.is_scale_input_called = True
        return sample / math.sqrt(self._sig[i] ** 2 + 1.0)


class ThermoEulerDiscreteScheduler(_ThermoStep, EulerDiscreteScheduler):
    """EulerDiscreteScheduler (Karras et al. 2022, Alg. 2 with Euler steps) on thermosample's fused op."""

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
        x, o = sample.to(torch.float32), model_output.to(torch.float32)
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


class ThermoEulerAncestralDiscreteScheduler(_ThermoStep, EulerAncestralDiscreteScheduler):
    """EulerAncestralDiscreteScheduler: Euler to sigma_down, then sigma_up fresh noise, on the fused op."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One ancestral Euler step (k-diffusion's sample_euler_ancestral with eta = 1).

        Args:
            model_output: [B, C, H, W] epsilon or v; sample: [B, C, H, W] x_hat; generator: diffusers' noise.
        """
        i = self._index(timestep)
        x, o = sample.to(torch.float32), model_output.to(torch.float32)
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


class ThermoDPMSolverMultistepScheduler(_ThermoStep, DPMSolverMultistepScheduler):
    """DPMSolverMultistepScheduler, DPM-Solver++(2M) and SDE-DPM-Solver++(2M) (Lu et al. 2022), on the fused op.

    Fused: algorithm_type "dpmsolver++" / "sde-dpmsolver++", solver_order 1 or 2, solver_type "midpoint",
    no thresholding; other configs use diffusers' step (one warning).
    """

    def _fusable(self):
        c = self.config
        if c.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            return f"algorithm_type={c.algorithm_type!r}"
        if c.solver_order not in (1, 2) or c.solver_type != "midpoint":
            return f"solver_order={c.solver_order}, solver_type={c.solver_type!r}"
        if c.thresholding or c.variance_type is not None:
            return "thresholding / learned variance"
        return None

    def _make_thermo_schedule(self):
        return CondOT() if self.config.use_flow_sigmas else super()._make_thermo_schedule()

    def scale_model_input(self, sample, *args, **kwargs):
        """Identity (DPM-Solver works on the physical state)."""
        return sample

    def _alpha_sigma(self, s):
        if self.config.use_flow_sigmas:
            return 1.0 - s, s
        a = 1.0 / math.sqrt(s * s + 1.0)
        return a, s * a

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
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' first")
        c = self.config
        i = self._index(timestep)
        n = len(self._ts)
        final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        x, o = sample.to(torch.float32), model_output.to(torch.float32)
        s, s_next = self._sig[i], self._sig[i + 1]
        a_s, sg_s = self._alpha_sigma(s)
        p = c.prediction_type
        kx, ko = {"epsilon": (1.0 / a_s, -sg_s / a_s), "sample": (0.0, 1.0), "v_prediction": (a_s, -sg_s),
                  "flow_prediction": (1.0, -s)}[p]
        denoised = self._fused(i, [x, o], [kx, ko], track=(s, 1.0 / a_s, kx, ko))
        self.model_outputs = list(self.model_outputs[1:]) + [denoised]
        sde = c.algorithm_type == "sde-dpmsolver++"
        order = 1 if (c.solver_order == 1 or self.lower_order_nums < 1 or final) else 2
        a_t, sg_t = self._alpha_sigma(s_next)
        inputs, coeffs, noise = [x, denoised], [0.0, 1.0], 0.0  # sigma_t = 0: x = D
        if sde and generator is not None and variance_noise is None:
            variance_noise = randn_tensor(o.shape, generator=generator, device=o.device, dtype=torch.float32)
        if sg_t > 0:
            lam = lambda a, g: math.log(a) - math.log(g)  # noqa: E731
            h = lam(a_t, sg_t) - lam(a_s, sg_s)
            if sde:
                cx, cd = sg_t / sg_s * math.exp(-h), a_t * -math.expm1(-2.0 * h)
                cz = sg_t * math.sqrt(-math.expm1(-2.0 * h))
            else:
                cx, cd, cz = sg_t / sg_s, -a_t * math.expm1(-h), 0.0
            inputs, coeffs = [x, denoised], [cx, cd]
            if order == 2:  # (second_last only matters for solver_order 3, not fused)
                a_1, sg_1 = self._alpha_sigma(self._sig[i - 1])
                r0 = (lam(a_s, sg_s) - lam(a_1, sg_1)) / h
                k = 0.5 * cd / r0  # midpoint: 0.5 * coeff * D1, D1 = (m0 - m1) / r0
                inputs, coeffs = inputs + [self.model_outputs[-2]], [cx, cd + k, -k]
            if sde:
                if variance_noise is not None:
                    inputs, coeffs = inputs + [variance_noise.to(o.device, torch.float32)], coeffs + [cz]
                else:
                    noise = cz
        prev = self._fused(i, inputs, coeffs, noise=noise)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        prev = self._stored(i, prev, model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _stochastic(self):
        return self.config.algorithm_type == "sde-dpmsolver++"


class ThermoFlowMatchEulerDiscreteScheduler(_ThermoStep, FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler (Euler on the rectified-flow ODE, Lipman et al. 2023 / SD3) on the
    fused op; the report is in CondOT coordinates, where the velocity is the model output."""

    _flow = True

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
        x, o = sample.to(torch.float32), model_output.to(torch.float32)
        s, s_next = self._sig[i], self._sig[i + 1]
        prev = self._stored(i, self._fused(i, [x, o], [1.0, s_next - s], track=(s, 1.0, 1.0, -s)), model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)
