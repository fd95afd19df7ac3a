"""Solvers: one short function each, in sampler coordinates (x_hat, sigma_hat) as in k-diffusion.

Every solver computes its scalar coefficients on the host from the sigma grid (Python floats) and
hands each update to `run.update(inputs, coeffs, ...)`, the one fused op (ops.py). `run.denoise(x, s)`
evaluates D(x; s); `track_sigma` names the noise level of the evaluation whose velocity the update
reduces (every evaluation is tracked by exactly one update). Signature of a solver:

    solver(run, x [B, ...], sigmas: list of floats, descending, ending in 0 or sigma_min, **options) -> x
"""
from __future__ import annotations

import math


def churn_step(run, x, i, sigmas, churn, s_tmin, s_tmax, s_noise):
    """EDM churn (Karras et al. 2022, Alg. 2 lines 4-6): raise sigma_i to s_hat = sigma_i (1 + gamma) by
    adding fresh noise of std sqrt(s_hat^2 - sigma_i^2). Returns (x, s_hat)."""
    s = sigmas[i]
    gamma = min(churn / (len(sigmas) - 1), math.sqrt(2.0) - 1.0) if s_tmin <= s <= s_tmax else 0.0
    s_hat = s * (1.0 + gamma)
    if gamma > 0:
        x = run.update([x], [1.0], i, noise=s_noise * math.sqrt(s_hat ** 2 - s ** 2), noise_sigmas=(s, s_hat))
    return x, s_hat


def euler(run, x, sigmas, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler on the probability-flow ODE dx/dsigma = (x - D) / sigma (Karras et al. 2022, Alg. 1), with
    EDM's optional churn as in k-diffusion's sample_euler."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        x, s_hat = churn_step(run, x, i, sigmas, churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, s_hat)
        run.callback(i, x, s, s_hat, denoised)
        r = s_next / s_hat
        x = run.update([x, denoised], [r, 1.0 - r], i, track_sigma=s_hat)
    return x


def heun(run, x, sigmas, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """EDM's 2nd-order Heun sampler with optional stochastic churn (Karras et al. 2022, Alg. 2)."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        x, s_hat = churn_step(run, x, i, sigmas, churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, s_hat)
        run.callback(i, x, s, s_hat, denoised)
        r = s_next / s_hat
        # Euler predictor (exact final step to sigma = 0).
        x_pred = run.update([x, denoised], [r, 1.0 - r], i, track_sigma=s_hat)
        if s_next == 0:
            x = x_pred
            continue
        # Trapezoidal corrector: x + (s_next - s_hat)/2 * (d(x, s_hat) + d(x_pred, s_next)).
        denoised_next = run.denoise(x_pred, s_next)
        a, b = (s_next - s_hat) / (2 * s_hat), (s_next - s_hat) / (2 * s_next)
        x = run.update([x, denoised, x_pred, denoised_next], [1.0 + a, -a, b, -b], i, track_sigma=s_next, u=2, d=3)
    return x


def dpmpp_2m(run, x, sigmas):
    """DPM-Solver++(2M): multistep 2nd order in log sigma with data prediction (Lu et al. 2022)."""
    old = None
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        r = s_next / s  # = exp(-h), h = log(s / s_next)
        if old is None or s_next == 0:
            x = run.update([x, denoised], [r, 1.0 - r], i, track_sigma=s)
        else:
            h, h_last = math.log(s / s_next), math.log(sigmas[i - 1] / s)
            k = h / (2.0 * h_last)  # = 1 / (2 r_k) in the paper's notation
            x = run.update([x, denoised, old], [r, (1.0 - r) * (1.0 + k), -(1.0 - r) * k], i, track_sigma=s)
        old = denoised
    return x


def ancestral_step(s, s_next, eta):
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion get_ancestral_step); eta=1: DDPM."""
    if s_next == 0 or eta == 0:
        return s_next, 0.0
    up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
    return math.sqrt(s_next ** 2 - up ** 2), up


def ddim(run, x, sigmas, eta=0.0, s_noise=1.0):
    """DDIM (Song et al. 2021) in sigma coordinates: x' = D + sigma_down (x - D)/sigma + sigma_up z.

    For a VP schedule this equals DDIM's update with its eta; eta=0 is deterministic."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        down, up = ancestral_step(s, s_next, eta)
        r = down / s
        x = run.update([x, denoised], [r, 1.0 - r], i, noise=s_noise * up, noise_sigmas=(s, s_next), track_sigma=s)
    return x


def euler_ancestral(run, x, sigmas, eta=1.0, s_noise=1.0):
    """Euler ancestral (k-diffusion): Euler to sigma_down, then add sigma_up fresh noise."""
    return ddim(run, x, sigmas, eta=eta, s_noise=s_noise)


def euler_maruyama(run, x, sigmas, s_noise=1.0):
    """Euler-Maruyama on the reverse SDE in (x_hat, sigma^2) time (Song et al. 2021):
    x' = x + (sigma^2 - sigma'^2) grad log p + sqrt(sigma^2 - sigma'^2) z, grad log p = (D - x)/sigma^2."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        r = (s_next / s) ** 2
        noise = s_noise * math.sqrt(s * s - s_next * s_next) if s_next > 0 else 0.0
        x = run.update([x, denoised], [r, 1.0 - r], i, noise=noise, noise_sigmas=(s, s_next), track_sigma=s)
    return x


SOLVERS = {"euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m, "ddim": ddim,
           "euler_ancestral": euler_ancestral, "euler_maruyama": euler_maruyama}
STOCHASTIC = {"euler_ancestral", "euler_maruyama"}


# solvers whose stochasticity is set by eta, with their default eta (dpmpp_2m_sde: the k-diffusion wrapper)
_ETA_DEFAULT = {"euler_ancestral": 1.0, "ddim": 0.0, "dpmpp_2m_sde": 1.0}


def injects_noise(solver: str, options: dict) -> bool:
    """Whether `solver` with these options leaves the probability-flow ODE (fresh noise, or the ancestral /
    churn steps that make room for it, even with s_noise=0), so that the pathwise speed limit does not
    apply: always for Euler-Maruyama, for euler_ancestral / ddim / dpmpp_2m_sde when eta != 0, for the
    churn solvers (euler, heun, dpm_2) with EDM churn. `sample()` and the k-diffusion wrappers both ask it."""
    if solver == "euler_maruyama":
        return True
    if solver in _ETA_DEFAULT:
        return options.get("eta", _ETA_DEFAULT[solver]) != 0
    return options.get("churn", 0.0) > 0


def evaluations(solver: str, steps: int, sigmas_end_in_zero: bool = True) -> int:
    """Model evaluations (NFE) a solver spends on `steps` steps."""
    if solver == "heun":
        return 2 * steps - 1 if sigmas_end_in_zero else 2 * steps
    return steps
