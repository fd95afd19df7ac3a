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

- Noise. `sample_euler`, `sample_heun` and `sample_dpm_2` draw `torch.randn_like(x)` at every step as
  k-diffusion does, churn or not, and use it as the churn noise: k-diffusion's numbers and its use of
  torch's generator (with `seed=` they draw nothing and the churn noise is Philox noise of that seed).
  Elsewhere, where no `noise_sampler` is given, the noise is standard normal from thermosample's
  in-kernel Philox stream instead of `torch.randn_like` (or the
  Brownian tree of `sample_dpmpp_sde`, `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde`): the same
  distribution (i.i.d. N(0, 1) per step; a Brownian tree's normalised increments over disjoint intervals
  are exactly that; `sample_dpmpp_sde`'s two overlapping increments per step get the tree's correlation),
  not the same numbers. Its seed is `seed=` or, by default, one draw from torch's default CPU generator,
  so `torch.manual_seed` still makes runs reproducible. The draw happens only when the run uses the
  stream: with a `noise_sampler` (and no churn), or a deterministic run, torch's global generator is left
  untouched. Pass `noise_sampler` (e.g. `default_noise_sampler(x)` or `BrownianTreeNoiseSampler(...)`,
  both exported here) to get k-diffusion's exact numbers.
- `sample_dpm_fast` and `sample_dpm_adaptive` (DPM-Solver with k-diffusion's own step-size logic, which
  reads the error on the host every step) delegate to k-diffusion itself: same numbers, no fused op, no
  thermo report; they need k-diffusion installed and say how to install it otherwise.
- `BrownianTreeNoiseSampler` is k-diffusion's own class (it needs k-diffusion and torchsde);
  `default_noise_sampler(x)` is defined here (torch.randn_like(x) per call, as k-diffusion's).
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

import functools
import importlib.util
import math
import os
import sys
import types

import numpy as np
import torch

from .. import solvers as _solvers
from ..auto import is_config, resolve
from ..denoiser import filled
from ..run import Run
from ..schedules import EDM, Schedule, get_schedule
from ..solvers import linear_multistep_coeff  # noqa: F401  (k-diffusion's public name)

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_lms", "sample_dpm_fast", "sample_dpm_adaptive", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
           "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_auto", "get_sigmas_auto",
           "get_sigmas_karras",
           "get_sigmas_exponential", "get_sigmas_polyexponential", "get_sigmas_vp", "append_zero", "to_d",
           "get_ancestral_step", "linear_multistep_coeff", "default_noise_sampler",
           "BrownianTreeNoiseSampler"]  # noqa: F822  (k-diffusion's own, through the module __getattr__)


# --------------------------------------------------------------------------------------------------
# Grids and helpers (k-diffusion names, computed in float32 torch as k-diffusion does)
# --------------------------------------------------------------------------------------------------
def append_zero(x: torch.Tensor) -> torch.Tensor:
    """Append a 0 to a 1-D tensor of sigmas [N] -> [N + 1]."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_auto(config, device='cpu'):
    """A calibrated `ts.SamplerConfig`'s sigmas k-diffusion-style: a float64 tensor [steps + 1] ending in 0 on
    `device` (its values exactly, in the calibrated denoiser's sigma coordinates). The tensor also carries the
    config's choice (its `.meta`, as a ThermoGrid's), so `sample_auto(model, x, get_sigmas_auto(config))` runs
    the config's solver and options, as `sample_auto(model, x, config)` does; any other sampler reads it as
    plain sigmas. A copy made from it (`.to(...)`, `.float()`, arithmetic) loses the choice: sample_auto then
    runs the plan's uncalibrated default and says so. `config` may be the path of a saved config."""
    from ..auto import SamplerConfig
    if not isinstance(config, SamplerConfig):
        if isinstance(config, (str, os.PathLike)):
            config = SamplerConfig.load(config)
        else:
            raise TypeError(f"config must be a ts.SamplerConfig (or the path of a saved one), got "
                            f"{type(config).__name__}")
    sigmas = torch.as_tensor(np.asarray(config.sigmas, dtype=np.float64), device=device)
    sigmas.meta = {**config.meta, "auto": True, "solver": config.solver, "solver_options": dict(config.options)}
    return sigmas


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


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """[n + 1] sigmas polynomial in log sigma: log sigma = ramp^rho (log sigma_max - log sigma_min) +
    log sigma_min with ramp from 1 to 0 (rho = 1: exponential), then 0."""
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """[n + 1] sigmas of the continuous VP SDE (Song et al. 2021), sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1) at n times equally spaced from 1 to eps_s, then 0."""
    t = torch.linspace(1, eps_s, n, device=device)
    return append_zero(torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1))


def to_d(x, sigma, denoised):
    """Karras ODE derivative (x - D) / sigma; x, denoised [B, ...], sigma a scalar or [B]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x - denoised) / sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to: tensors for tensor sigmas
    (k-diffusion's arithmetic, their dtype and device), else floats."""
    if not eta:
        return sigma_to, 0.
    if isinstance(sigma_from, torch.Tensor) or isinstance(sigma_to, torch.Tensor):
        sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
        return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up
    return _solvers.ancestral_step(float(sigma_from), float(sigma_to), eta)


# --------------------------------------------------------------------------------------------------
# Noise samplers, and k-diffusion itself for what this module delegates
# --------------------------------------------------------------------------------------------------
def default_noise_sampler(x):
    """k-diffusion's default: noise_sampler(sigma, sigma_next) -> torch.randn_like(x) (global generator)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


# The README's recipe (and why): torch stays at its version, or pip upgrades it to suit the newest torchvision.
_INSTALL_PEER = f'pip install torch=={torch.__version__.split("+")[0]} "k-diffusion==0.0.16" "setuptools<81"'


@functools.cache
def _peer():
    """k-diffusion's own sampling module, for what this drop-in delegates: `k_diffusion.sampling` when the
    package imports, else its sampling.py loaded from the installed package with a one-function stand-in
    for k_diffusion.utils (the package's __init__ imports torchvision, which a CPU-only install may lack)."""
    try:
        import k_diffusion.sampling as peer
        return peer
    except Exception:  # noqa: BLE001  not installed, or its package import fails (torchvision, skimage, ...)
        pass
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError):
        spec = None
    path = os.path.join(spec.submodule_search_locations[0], "sampling.py") if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        raise ImportError(f"this function delegates to k-diffusion, which is not installed: {_INSTALL_PEER}")
    pkg, utils = types.ModuleType("_thermosample_kd"), types.ModuleType("_thermosample_kd.utils")
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.update({"_thermosample_kd": pkg, "_thermosample_kd.utils": utils})
    loader = importlib.util.spec_from_file_location("_thermosample_kd.sampling", path)
    peer = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(peer)
    except ImportError as exc:
        raise ImportError(f"k-diffusion's sampling module needs {exc.name}: {_INSTALL_PEER}") from exc
    return peer


def __getattr__(name):
    """k-diffusion's BrownianTreeNoiseSampler, re-exported from k-diffusion itself (it needs torchsde)."""
    if name == "BrownianTreeNoiseSampler":
        return _peer().BrownianTreeNoiseSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# The run: a k-diffusion model as a thermosample denoiser, and k-diffusion's callback conventions
# --------------------------------------------------------------------------------------------------
class _KDenoiser:
    """k-diffusion model -> thermosample denoiser: den(x, sigma_float) = model(x, sigma * s_in)."""

    def __init__(self, model, schedule: Schedule):
        self.model, self.schedule = model, schedule

    def __call__(self, x, sigma, **extra_args):
        s = filled(self.__dict__.setdefault("_sigmas", {}), sigma, x.shape[0], x.dtype, x.device)  # kept on CUDA
        out = self.model(x, s, **extra_args)
        return out if out.dtype == x.dtype else out.to(x.dtype)


class _KRun(Run):
    """Run with k-diffusion's conventions: tensor sigmas in callbacks and noise samplers, tqdm `disable`."""

    def __init__(self, *args, sigmas_tensor, disable, noise_tensors=None, step_noise=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigmas_tensor, self.disable = sigmas_tensor, disable
        self.step_noise, self._eps = step_noise, None
        self._as_tensor = {v: sigmas_tensor[k] for k, v in reversed(list(enumerate(self.sigmas)))}
        if self.noise_sampler is not None:
            user, table = self.noise_sampler, noise_tensors or {}

            def sampler(a, b):  # the tensors k-diffusion would pass (a Brownian tree reads them exactly)
                queue = table.get((a, b))
                return user(*queue.pop(0)) if queue else user(self._tensor(a), self._tensor(b))
            self.noise_sampler = sampler
        if step_noise is not None:   # churn noise: this step's torch.randn_like draw (k-diffusion's eps)
            self.noise_sampler = lambda sigma, sigma_hat: self._eps

    def _tensor(self, value):
        t = self._as_tensor.get(value)
        return t if t is not None else self.sigmas_tensor.new_tensor(value)

    def steps(self):
        n = len(self.sigmas) - 1
        if self.disable is None and not sys.stderr.isatty() or self.disable:
            steps = range(n)
        else:
            from tqdm.auto import trange
            steps = trange(n, disable=self.disable)
        return steps if self.step_noise is None else self._drawing(steps)

    def _drawing(self, steps):
        """k-diffusion's euler/heun/dpm_2 draw eps = torch.randn_like(x) at the top of every step, before
        the model call: x in its own dtype at step 0, then in its dtype promoted with the sigmas' (k-diffusion's
        to_d divides by a sigma of the sigmas' dtype). The draw count depends on the dtype, so both matter."""
        x, later = self.step_noise
        for i in steps:
            self._eps = torch.randn_like(x, dtype=x.dtype if i == 0 else later).contiguous()
            yield i

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
    # A repeated level is a zero-length step and a 0 before the end leaves a step from sigma = 0: solvers
    # divide by both (k-diffusion returns NaN). Refused here, before the model runs.
    for k in range(len(host) - 1):
        if host[k] == host[k + 1] or host[k] == 0:
            raise ValueError(f"sigmas must not repeat a noise level or reach 0 before the last entry; got "
                             f"sigmas[{k}] = {host[k]:g}, sigmas[{k + 1}] = {host[k + 1]:g}")
    return host


def _check_descending(host, name, options):
    """A noise-adding step from sigma to sigma_next adds the variance between the two (sigma_up of an ancestral
    step, 1 - exp(-2 eta h) of an SDE step): it needs sigma_next < sigma at every step."""
    for k in range(len(host) - 1):
        if host[k + 1] >= host[k]:
            eta = options.get("eta", 1.0)
            raise ValueError(f"sigmas must be strictly decreasing for sample_{name} with eta={eta:g} "
                             f"(each step adds the noise between sigmas[k] and sigmas[k + 1]); got sigmas[{k}] = "
                             f"{host[k]:g}, sigmas[{k + 1}] = {host[k + 1]:g} (eta=0 runs the deterministic sampler)")


def _dpmpp_sde_noise_tensors(host, sigmas_t, r) -> dict:
    """(sigma, sigma_next) host pair -> queue of the 0-d tensor pairs k-diffusion's sample_dpmpp_sde passes
    its noise sampler for it, in call order: it round-trips sigma through t = -log sigma in the sigmas'
    dtype, so a Brownian tree (whose increments are rough in time) is queried at exactly its points."""
    table = {}
    for i in range(len(host) - 1):
        if host[i + 1] == 0:
            continue
        t, t_next = sigmas_t[i].log().neg(), sigmas_t[i + 1].log().neg()
        s = t + (t_next - t) * r
        s_mid = _solvers.dpmpp_sde_sigma_mid(host[i], host[i + 1], r)
        table.setdefault((host[i], s_mid), []).append((t.neg().exp(), s.neg().exp()))
        table.setdefault((host[i], host[i + 1]), []).append((t.neg().exp(), t_next.neg().exp()))
    return table


_RANDN_EVERY_STEP = ("euler", "heun", "dpm_2")   # k-diffusion's samplers that draw randn_like(x) every step


def _run(name, model, x, sigmas, extra_args, callback, disable, *, noise_sampler=None, seed=None,
         schedule=None, thermo=None, backend="auto", noise_tensors=None, **options):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if thermo is not None and not isinstance(thermo, (list, dict)):
        raise TypeError(f"thermo must be a list or a dict to receive the ThermoReport, got {type(thermo).__name__}")
    stochastic = _solvers.injects_noise(name, options)
    sigmas_t = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float32)
    host = _host_sigmas(sigmas_t)          # before any draw from torch's generator and any model call
    if stochastic and name not in _RANDN_EVERY_STEP:
        _check_descending(host, name, options)
    # euler/heun/dpm_2 without seed=: k-diffusion's randn_like per step (also their churn noise), see _drawing
    step_noise = (x, torch.promote_types(x.dtype, sigmas_t.dtype)) if name in _RANDN_EVERY_STEP and seed is None \
        else None
    if seed is None:
        # One draw from torch's default CPU generator (torch.manual_seed keeps runs reproducible), made only
        # when the Philox stream is used: a noise_sampler supplies all noise but churn's, and a
        # deterministic run draws none; then the global generator is left as k-diffusion would find it.
        uses_stream = stochastic and step_noise is None and (noise_sampler is None or options.get("churn", 0.0) > 0)
        seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if uses_stream else 0
    den = _KDenoiser(model, get_schedule(schedule) if schedule is not None else EDM())
    run = _KRun(den, host, seed=seed, sample_offset=0, backend=backend, track=thermo is not None,
                callback=callback, progress=None, noise_sampler=noise_sampler, extra_args=extra_args,
                solver=name, stochastic=stochastic, sigmas_tensor=sigmas_t,
                disable=disable, step_noise=step_noise,
                noise_tensors=noise_tensors(host, sigmas_t) if noise_tensors and noise_sampler is not None else None)
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


@torch.no_grad()
@_doc("Ancestral sampling with DPM-Solver-2 steps (k-diffusion's sample_dpm_2_ancestral): DPM-Solver-2 to "
      "sigma_down through the geometric midpoint, then sigma_up fresh noise.")
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable,
                noise_sampler=noise_sampler, seed=seed, schedule=schedule, thermo=thermo, backend=backend,
                eta=eta, s_noise=s_noise)


@torch.no_grad()
@_doc("Ancestral sampling with DPM-Solver++(2S) second-order steps (Lu et al. 2022; k-diffusion's "
      "sample_dpmpp_2s_ancestral).")
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable,
                noise_sampler=noise_sampler, seed=seed, schedule=schedule, thermo=thermo, backend=backend,
                eta=eta, s_noise=s_noise)


@torch.no_grad()
@_doc("DPM-Solver++ SDE (Lu et al. 2022; k-diffusion's sample_dpmpp_sde), intermediate point r. Default "
      "noise: Philox normals with the joint law of k-diffusion's Brownian-tree increments (two correlated "
      "draws per step, independent across steps); pass noise_sampler=BrownianTreeNoiseSampler(...) for its "
      "exact numbers.")
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("dpmpp_sde", model, x, sigmas, extra_args, callback, disable,
                noise_sampler=noise_sampler, seed=seed, schedule=schedule, thermo=thermo, backend=backend,
                eta=eta, s_noise=s_noise, r=r,
                noise_tensors=lambda host, sig: _dpmpp_sde_noise_tensors(host, sig, float(r)))


@torch.no_grad()
@_doc("DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde), multistep 3rd order with data prediction; "
      "default noise: i.i.d. Philox normals (the distribution of k-diffusion's Brownian-tree increments).")
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, thermo=None, schedule=None, seed=None, backend="auto"):
    return _run("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable,
                noise_sampler=noise_sampler, seed=seed, schedule=schedule, thermo=thermo, backend=backend,
                eta=eta, s_noise=s_noise)


@torch.no_grad()
@_doc("solver=\"auto\" with k-diffusion's calling convention. `sigmas` is either a `ts.SamplerConfig` from "
      "`ts.thermo_grid(den, steps, solver=\"auto\")` (or `SamplerConfig.load(path)`): its solver and options run "
      "on its sigmas, which are in the calibrated denoiser's sigma coordinates and are read in float64, so a "
      "float64 run gives what `ts.sample(den, noise=x, grid=config)` gives, bit for bit; or descending sigmas, on "
      "which the plan's uncalibrated default for their step count runs (said once, as in ts.sample).")
def sample_auto(model, x, sigmas, extra_args=None, callback=None, disable=None, *, thermo=None, schedule=None,
                seed=None, backend="auto"):
    config = sigmas if is_config(sigmas) else None
    if not isinstance(sigmas, torch.Tensor):    # a config, an array or a list: its float64 values
        sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    solver, options = resolve(config, None if config is not None or sigmas.dim() != 1 else len(sigmas) - 1)
    _solvers.get_solver(solver)                 # a saved config's solver and options are checked before the run
    _solvers.check_options(solver, options)
    return _run(solver, model, x, sigmas, extra_args, callback, disable, seed=seed, schedule=schedule,
                thermo=thermo, backend=backend, **options)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None):
    """DPM-Solver-Fast (Lu et al. 2022): delegates to k-diffusion's own sample_dpm_fast (not the fused op,
    no ThermoReport), so the numbers and noise draws are k-diffusion's. Needs k-diffusion installed."""
    return _peer().sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=extra_args, callback=callback,
                                   disable=disable, eta=eta, s_noise=s_noise, noise_sampler=noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False):
    """DPM-Solver-12/-23 with adaptive step size (Lu et al. 2022): delegates to k-diffusion's own
    sample_dpm_adaptive (its accept/reject decision reads the error on the host every step, which the fused
    loop never does; no ThermoReport). Needs k-diffusion installed."""
    return _peer().sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=extra_args, callback=callback,
                                       disable=disable, order=order, rtol=rtol, atol=atol, h_init=h_init,
                                       pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff, accept_safety=accept_safety,
                                       eta=eta, s_noise=s_noise, noise_sampler=noise_sampler,
                                       return_info=return_info)
