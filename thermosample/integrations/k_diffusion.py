"""Drop-in replacements for k-diffusion's samplers (crowsonkb/k-diffusion, k_diffusion/sampling.py).

Switch by changing one import:

    # from k_diffusion.sampling import sample_dpmpp_2m, get_sigmas_karras
    from thermosample.integrations.k_diffusion import sample_dpmpp_2m, get_sigmas_karras

Every function keeps k-diffusion's signature and semantics: `model(x, sigma * s_in, **extra_args)` is a
denoiser D(x; sigma) in sigma coordinates, `sigmas` is a descending tensor ending in 0, `callback` gets
the dict {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} (sigma values as 0-d tensors, as k-diffusion
passes them), and `noise_sampler(sigma, sigma_next)` is honoured where k-diffusion takes one. Each
update runs as one thermosample fused op (through the Run engine, thermosample/run.py).

Differences, all keyword-only additions or documented choices:

- Noise. Where no `noise_sampler` is given (and for the churn noise of euler/heun/dpm_2), the noise is
  standard normal from thermosample's in-kernel Philox stream instead of `torch.randn_like` (or the
  Brownian tree of `sample_dpmpp_2m_sde`): the same distribution (i.i.d. N(0, 1) per step; a Brownian
  tree's normalised increments over disjoint intervals are exactly that), not the same numbers. Its seed
  is `seed=` or, by default, one draw from torch's default CPU generator, so `torch.manual_seed` still
  makes runs reproducible. Pass `noise_sampler` to get k-diffusion's exact numbers.
- `thermo=`: pass a list (the ThermoReport is appended) or a dict (keys "report" and "nfe" are set) to
  receive the run's thermodynamic report. Only then are rates tracked.
- `schedule=`: the thermosample Schedule used to map sigma to physical time for the report. Default EDM
  (m = 1, sigma = t; any VE model); pass e.g. `ts.schedules.DiscreteVP(alphas_cumprod)` for a wrapped
  DDPM / Stable Diffusion model so that the report is in that model's physical coordinates.
- `seed=`, `backend=` ("auto" | "torch" | "cpp" | "triton").
- A NaN/Inf in the model output raises thermosample.NonFiniteError at the end of the run (one host sync)
  instead of being returned.
- `sigmas` is read to the host once at the start (one copy); the loop itself never syncs.
"""
from __future__ import annotations

import math
import sys

import torch

from .. import solvers as _solvers
from ..run import Run
from ..schedules import EDM, Schedule, get_schedule
from ..solvers import linear_multistep_coeff  # noqa: F401  (k-diffusion's public name)

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_lms",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "get_sigmas_karras", "get_sigmas_exponential",
           "append_zero", "to_d", "get_ancestral_step", "linear_multistep_coeff"]


# --------------------------------------------------------------------------------------------------
# Grids and helpers (k-diffusion names, computed in float32 torch as k-diffusion does)
# --------------------------------------------------------------------------------------------------
def append_zero(x: torch.Tensor) -> torch.Tensor:
    """Append a 0 to a 1-D tensor of sigmas [N] -> [N + 1]."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Karras et al. (2022) Eq. 5 noise levels: [n + 1] sigmas, equally spaced in sigma^(1/rho), then 0.

    Args:
        n: number of positive sigmas; sigma_min, sigma_max: their range; rho: the warp (7 in EDM).
    """
    ramp = torch.linspace(0, 1, n)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """[n + 1] sigmas equally spaced in log sigma from sigma_max to sigma_min, then 0."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp())


def to_d(x, sigma, denoised):
    """Karras ODE derivative (x - D) / sigma; x, denoised [B, ...], sigma a scalar or [B]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to (floats)."""
    if not eta:
        return sigma_to, 0.
    return _solvers.ancestral_step(float(sigma_from), float(sigma_to), eta)


# --------------------------------------------------------------------------------------------------
# The run: a k-diffusion model as a thermosample denoiser, and k-diffusion's callback conventions
# --------------------------------------------------------------------------------------------------
class _KDenoiser:
    """k-diffusion model -> thermosample denoiser: den(x, sigma_float) = model(x, sigma * s_in)."""

    def __init__(self, model, schedule: Schedule):
        self.model, self.schedule = model, schedule

    def __call__(self, x, sigma, **extra_args):
        s = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        out = self.model(x, s, **extra_args)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class _KRun(Run):
    """Run with k-diffusion's conventions: tensor sigmas in callbacks and noise samplers, tqdm `disable`."""

    def __init__(self, *args, sigmas_tensor, disable, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigmas_tensor, self.disable = sigmas_tensor, disable
        self._as_tensor = {v: sigmas_tensor[k] for k, v in reversed(list(enumerate(self.sigmas)))}
        if self.noise_sampler is not None:
            user = self.noise_sampler
            self.noise_sampler = lambda a, b: user(self._tensor(a), self._tensor(b))

    def _tensor(self, value):
        t = self._as_tensor.get(value)
        return t if t is not None else self.sigmas_tensor.new_tensor(value)

    def steps(self):
        n = len(self.sigmas) - 1
        if self.disable is None and not sys.stderr.isatty() or self.disable:
            return range(n)
        from tqdm.auto import trange
        return trange(n, disable=self.disable)

    def callback(self, i, x, sigma, sigma_hat, denoised):
        if self.user_callback is not None:
            self.user_callback({'x': x, 'i': i, 'sigma': self._tensor(sigma),
                                'sigma_hat': self._tensor(sigma_hat), 'denoised': denoised})


def _host_sigmas(sigmas) -> list[float]:
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    host = sigmas.detach().to("cpu", torch.float64).tolist()  # the one host copy of the run
    if not all(math.isfinite(s) and s >= 0 for s in host) or host[0] <= 0:
        raise ValueError("sigmas must be finite, >= 0 and start at a positive noise level")
    return host


def _run(name, model, x, sigmas, extra_args, callback, disable, *, noise_sampler=None, seed=None,
         schedule=None, thermo=None, backend="auto", **options):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if thermo is not None and not isinstance(thermo, (list, dict)):
        raise TypeError(f"thermo must be a list or a dict to receive the ThermoReport, got {type(thermo).__name__}")
    if seed is None:  # one draw from torch's default CPU generator: torch.manual_seed keeps runs reproducible
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    sigmas_t = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float32)
    host = _host_sigmas(sigmas_t)
    den = _KDenoiser(model, get_schedule(schedule) if schedule is not None else EDM())
    run = _KRun(den, host, seed=seed, sample_offset=0, backend=backend, track=thermo is not None,
                callback=callback, progress=None, noise_sampler=noise_sampler, extra_args=extra_args,
                solver=name, stochastic=_solvers.injects_noise(name, options), sigmas_tensor=sigmas_t,
                disable=disable)
    out = _solvers.SOLVERS[name].fn(run, x.contiguous(), host, **options)
    run.check_finite(out)
    if thermo is not None:
        report = run.report()
        if isinstance(thermo, list):
            thermo.append(report)
        else:
            thermo.update(report=report, nfe=run.nfe)
    return out




# --------------------------------------------------------------------------------------------------
# k-diffusion's public samplers
# --------------------------------------------------------------------------------------------------
_EXTRA_DOC = """
    Args:
        model: k-diffusion denoiser, called as model(x [B, ...], sigma [B], **extra_args) -> D [B, ...].
        x: initial state [B, ...], already scaled to sigmas[0] (e.g. randn * sigmas[0]).
        sigmas: descending noise levels [N + 1], usually ending in 0.
        extra_args: keyword arguments for every model call; callback: called with k-diffusion's dict;
        disable: disable the tqdm bar (None: shown on a terminal).
        thermo: a list or dict to receive the ThermoReport; schedule: Schedule for the report (EDM);
        seed: Philox seed (default: drawn from torch's CPU generator); backend: fused-op backend.
    Returns:
        the final state [B, ...].
"""


def _doc(text):
    def wrap(fn):
        fn.__doc__ = text + _EXTRA_DOC
        return fn
    return wrap


@torch.no_grad()
@_doc("Euler steps (Karras et al. 2022, Alg. 2 with Euler steps; churn knobs s_churn/s_tmin/s_tmax/s_noise).")
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("euler", model, x, sigmas, extra_args, callback, disable, seed=seed,
                schedule=schedule, thermo=thermo, backend=backend, churn=s_churn,
                s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
@_doc("Ancestral sampling with Euler steps (k-diffusion): Euler to sigma_down, then sigma_up fresh noise.")
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("euler_ancestral", model, x, sigmas, extra_args, callback, disable,
                noise_sampler=noise_sampler, seed=seed, schedule=schedule, thermo=thermo, backend=backend,
                eta=eta, s_noise=s_noise)


@torch.no_grad()
@_doc("EDM's Heun sampler (Karras et al. 2022, Alg. 2), Euler on the last step to 0; churn knobs.")
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1., *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("heun", model, x, sigmas, extra_args, callback, disable, seed=seed,
                schedule=schedule, thermo=thermo, backend=backend, churn=s_churn,
                s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
@_doc("DPM-Solver-2 steps with EDM churn (Lu et al. 2022; Karras et al. 2022, Alg. 2).")
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1., *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("dpm_2", model, x, sigmas, extra_args, callback, disable, seed=seed, schedule=schedule,
                thermo=thermo, backend=backend, churn=s_churn, s_tmin=s_tmin,
                s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
@_doc("Linear multistep (LMS) in sigma, order up to 4 (k-diffusion's sample_lms).")
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, *, thermo=None,
               schedule=None, seed=None, backend="auto"):
    return _run("lms", model, x, sigmas, extra_args, callback, disable, seed=seed, schedule=schedule,
                thermo=thermo, backend=backend, order=order)


@torch.no_grad()
@_doc("DPM-Solver++(2M) (Lu et al. 2022), multistep 2nd order with data prediction.")
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, thermo=None,
                    schedule=None, seed=None, backend="auto"):
    return _run("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, seed=seed,
                schedule=schedule, thermo=thermo, backend=backend)


@torch.no_grad()
@_doc("DPM-Solver++(2M) SDE (Lu et al. 2022); default noise: i.i.d. Philox normals (the distribution of "
      "k-diffusion's Brownian-tree increments).")
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint', *, thermo=None, schedule=None, seed=None,
                        backend="auto"):
    return _run("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable,
                noise_sampler=noise_sampler, seed=seed, schedule=schedule, thermo=thermo, backend=backend,
                eta=eta, s_noise=s_noise, solver_type=solver_type)
