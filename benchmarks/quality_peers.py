"""The peers of benchmarks/bench_quality.py, run on a thermosample denoiser D(x_hat; sigma) (VE/EDM form).

k-diffusion: its sampling.py only (sample_dpmpp_sde with eta=0 is left out: it is dpmpp_2s_ancestral's
deterministic step again), loaded from its file path with a stub for k_diffusion.utils.append_dims
(the package imports torchvision/skimage at import time), as tests/test_integration_k_diffusion.py does.
Samplers get the exact float64 karras sigmas (+ 0) of the problem's schedule. Stochastic samplers run
with eta=0 and a zero noise sampler (so no Brownian tree is built): they are the deterministic methods.

diffusers: UniPCMultistepScheduler (bh1/bh2, orders 2-3), DPMSolverMultistepScheduler (dpmsolver++,
orders 2-3), DEISMultistepScheduler (orders 2-3). They are VP schedulers; the VE problem is fed to them as
x_vp = x / sqrt(1 + sigma^2) with prediction_type="sample" (the model returns D), and after
set_timesteps(N) their internal `sigmas` are replaced by the exact float64 karras grid (+ 0), `timesteps`
by N distinct placeholders (the model is called with our sigma, never with the timestep) and the step
index starts at 0 (set_begin_index). `check_mapping()` verifies all of this on a Gaussian whose exact ODE
solution is known. DEIS cannot step to sigma = 0 (its log-rho coefficients are 0 * inf there); it runs
its multistep updates down to sigma_min, and its last evaluation returns the denoised D(x; sigma_min),
which is what its own first-order step to sigma -> 0 gives and what every other method here ends with.
UniPC bh1 has the same defect in its last step (x_t = x_t_ - alpha_t B_h pred_res with B_h = -inf and
pred_res = 0 gives NaN); its last step is also the denoised D, which is its predictor's value there (the
corrector of the previous step does not change it: the model output was evaluated before the correction).
For bh2 the scheduler's own last step gives the same D, so it runs unchanged.

NFE is counted by a wrapper around the model for every method (it is also predicted from the step
count, and the run is refused if the two disagree).
"""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from thermosample.grids import karras


class Counter:
    """Wraps a denoiser den(x_hat, sigma_float) and counts its calls."""

    def __init__(self, den):
        self.den, self.n = den, 0

    def __call__(self, x, sigma):
        self.n += 1
        if isinstance(sigma, torch.Tensor):  # k-diffusion passes sigma * ones([B]): one noise level per call
            sigma = sigma.reshape(-1)[0]
        return self.den(x, float(sigma))


# ---------------------------------------------------------------------------------------------- k-diffusion
_KD = None


def load_k_diffusion():
    """k_diffusion/sampling.py as a module, or None when k-diffusion (or torchsde/scipy) is missing."""
    global _KD
    if _KD is not None:
        return _KD or None
    try:
        from thermosample.integrations.k_diffusion import _peer
        _KD = _peer()        # k-diffusion's own sampling module (from its file where its package import fails)
    except Exception as exc:  # noqa: BLE001 - the peers are optional
        print(f"(k-diffusion peers unavailable: {exc})", file=sys.stderr)
        _KD = False
    return _KD or None


def _zeros(x):
    return lambda s, sn: torch.zeros_like(x)


# name -> (function name, kwargs, evaluations(steps) when the grid ends in 0)
KD_SAMPLERS = {
    "kd:euler": ("sample_euler", {}, lambda n: n),
    "kd:heun": ("sample_heun", {}, lambda n: 2 * n - 1),
    "kd:dpm_2": ("sample_dpm_2", {}, lambda n: 2 * n - 1),
    "kd:lms": ("sample_lms", {}, lambda n: n),
    "kd:dpmpp_2m": ("sample_dpmpp_2m", {}, lambda n: n),
    "kd:dpmpp_2m_sde(eta0,heun)": ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, lambda n: n),
    "kd:dpmpp_3m_sde(eta0)": ("sample_dpmpp_3m_sde", {"eta": 0.0}, lambda n: n),
    "kd:dpmpp_2s_ancestral(eta0)": ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, lambda n: 2 * n - 1),
}


def run_k_diffusion(name, den, noise, sigmas):
    """Sampler `name` of KD_SAMPLERS from x = noise (already at sigmas[0]); returns (x, counted NFE)."""
    kd = load_k_diffusion()
    fn_name, kwargs, _ = KD_SAMPLERS[name]
    counter = Counter(den)
    kw = dict(kwargs)
    if "eta" in kw:
        kw["noise_sampler"] = _zeros(noise)
    sig = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    x = getattr(kd, fn_name)(counter, noise, sig, disable=True, **kw)
    return x, counter.n


# ------------------------------------------------------------------------------------------------ diffusers
def _diffusers_classes():
    try:
        from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
    except Exception as exc:  # noqa: BLE001 - the peers are optional
        print(f"(diffusers peers unavailable: {exc})", file=sys.stderr)
        return None
    return {"unipc": UniPCMultistepScheduler, "dpmpp": DPMSolverMultistepScheduler, "deis": DEISMultistepScheduler}


# name -> (class key, config kwargs)
DIFFUSERS_SCHEDULERS = {
    "diffusers:unipc(bh1,o2)": ("unipc", {"solver_type": "bh1", "solver_order": 2}),
    "diffusers:unipc(bh1,o3)": ("unipc", {"solver_type": "bh1", "solver_order": 3}),
    "diffusers:unipc(bh2,o2)": ("unipc", {"solver_type": "bh2", "solver_order": 2}),
    "diffusers:unipc(bh2,o3)": ("unipc", {"solver_type": "bh2", "solver_order": 3}),
    "diffusers:dpmpp(o2)": ("dpmpp", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "diffusers:dpmpp(o3)": ("dpmpp", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "diffusers:deis(o2)": ("deis", {"solver_order": 2}),
    "diffusers:deis(o3)": ("deis", {"solver_order": 3}),
}


def run_diffusers(name, den, noise, sigmas):
    """Scheduler `name` of DIFFUSERS_SCHEDULERS on the VE grid `sigmas` ([N] descending, then 0) from
    x = noise (VE, at sigmas[0]); returns (x at sigma 0 in VE = VP coordinates, counted NFE = N)."""
    classes = _diffusers_classes()
    key, cfg = DIFFUSERS_SCHEDULERS[name]
    extra = {"final_sigmas_type": "zero"} if key in ("unipc", "dpmpp") else {}
    sch = classes[key](prediction_type="sample", **cfg, **extra)
    sig = np.asarray(sigmas, dtype=np.float64)
    n = len(sig) - 1                                   # model evaluations
    assert sig[-1] == 0.0 and n >= 1
    with warnings.catch_warnings():  # NumPy 2 deprecation warnings from inside diffusers
        warnings.simplefilter("ignore", DeprecationWarning)
        sch.set_timesteps(n)
    sch.sigmas = torch.as_tensor(sig)                  # exact float64 VE sigmas (+ 0)
    sch.timesteps = torch.arange(n - 1, -1, -1, dtype=torch.int64) + 1   # distinct placeholders
    sch.num_inference_steps = n
    sch.set_begin_index(0)
    counter = Counter(den)
    x_vp = noise / math.sqrt(1.0 + sig[0] ** 2)
    with warnings.catch_warnings():  # DEIS's numpy coefficients warn about NumPy 2 __array_wrap__
        warnings.simplefilter("ignore", DeprecationWarning)
        return _diffusers_loop(sch, key, cfg, counter, sig, x_vp, n)


def _diffusers_loop(sch, key, cfg, counter, sig, x_vp, n):
    for i in range(n):
        s = float(sig[i])
        d = counter(x_vp * math.sqrt(1.0 + s * s), s)  # D(x_ve; sigma): the "sample" prediction
        if i == n - 1 and (key == "deis" or cfg.get("solver_type") == "bh1"):
            return d, counter.n                        # their step to sigma -> 0 is D (see module doc)
        x_vp = sch.step(d, sch.timesteps[i], x_vp, return_dict=False)[0]
    return x_vp, counter.n


# ------------------------------------------------------------------------------------------------ the table
def peer_configs():
    """{name: evaluations(steps)} of every available peer (k-diffusion's samplers, diffusers' schedulers)."""
    out = {}
    if load_k_diffusion() is not None:
        for name, (_, _, ev) in KD_SAMPLERS.items():
            out[name] = ev
    if _diffusers_classes() is not None:
        for name in DIFFUSERS_SCHEDULERS:
            out[name] = lambda n: n
    return out


def run_peer(name, den, noise, sigmas):
    if name.startswith("kd:"):
        return run_k_diffusion(name, den, noise, sigmas)
    return run_diffusers(name, den, noise, sigmas)


def karras_sigmas(steps, schedule):
    """The exact float64 karras grid (rho 7) of the schedule's range, then 0: [steps + 1]."""
    return np.append(karras(steps, schedule.sigma_min, schedule.sigma_max), 0.0)


def check_mapping(steps=(10, 20, 40), batch=64, dim=4):
    """Every peer on Gaussian data N(mu, s^2 I) (EDM range), whose probability-flow ODE solution from
    x(sigma_max) is exact: x(sigma) - mu = (x(sigma_max) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_max^2)).
    All methods end with D at sigma_min, so the target is D(x(sigma_min); sigma_min). Returns
    {peer: [RMS error at each step count]} (float64 state); a correct mapping converges at its order."""
    import thermosample as ts
    from thermosample import toy

    g = toy.Gaussian(torch.linspace(-1, 1, dim, dtype=torch.float64), 0.3)
    den = g.denoiser("edm")
    sch = den.schedule
    z = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = z * sch.sigma_max
    mu, s2 = g.means[0], 0.09
    x_min = mu + (x_t - mu) * math.sqrt((s2 + sch.sigma_min ** 2) / (s2 + sch.sigma_max ** 2))
    target = g.denoise(x_min, sch.sigma_min)
    out = {}
    for name in peer_configs():
        errs = []
        for n in steps:
            x, _ = run_peer(name, den, x_t.clone(), karras_sigmas(n, sch))
            errs.append(float((x - target).square().mean().sqrt()))
        out[name] = errs
    # thermosample's dpmpp_2m as the control
    out["ts:dpmpp_2m"] = [float((ts.sample(den, noise=x_t.clone(), steps=n, solver="dpmpp_2m", grid="karras",
                                           track=False).samples - target).square().mean().sqrt()) for n in steps]
    return out
