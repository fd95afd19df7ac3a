"""Solvers: one short function each, in sampler coordinates (x_hat, sigma_hat) as in k-diffusion.

Every solver computes its scalar coefficients on the host from the sigma grid (Python floats) and
hands each update to `run.update(inputs, coeffs, ...)`, the one fused op (ops.py). `run.denoise(x, s)`
evaluates D(x; s); `track_sigma` names the noise level of the evaluation whose velocity the update
reduces (every evaluation is tracked by exactly one update). Signature of a solver:

    solver(run, x [B, ...], sigmas: list of floats, descending, ending in 0 or sigma_min, **options) -> x

`SOLVERS` at the end is the one table of solvers: ts.sample, the k-diffusion wrappers, thermo_grid and
the CLI read it. Adding a solver is one function here plus one `Solver` row.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .validate import check_solver_options


def churn_sigma(s: float, steps: int, churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's raised noise level s_hat = s (1 + gamma), gamma = min(churn / steps, sqrt 2 - 1) inside the
    window [s_tmin, s_tmax] (Karras et al. 2022, Alg. 2 line 4)."""
    gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= s <= s_tmax else 0.0
    return s * (1.0 + gamma)


def heun_correction(s_hat: float, s_next: float) -> tuple[float, float]:
    """(a, b) of Heun's trapezoidal corrector x' = (1 + a) x - a D + b x_pred - b D_pred, i.e.
    x + (s_next - s_hat)/2 (d(x, s_hat) + d(x_pred, s_next)) with d = (x - D) / sigma."""
    return (s_next - s_hat) / (2 * s_hat), (s_next - s_hat) / (2 * s_next)


def churn_step(run, x, i, sigmas, churn, s_tmin, s_tmax, s_noise):
    """EDM churn (Karras et al. 2022, Alg. 2 lines 4-6): raise sigma_i to s_hat = sigma_i (1 + gamma) by
    adding fresh noise of std sqrt(s_hat^2 - sigma_i^2). Returns (x, s_hat)."""
    s = sigmas[i]
    s_hat = churn_sigma(s, len(sigmas) - 1, churn, s_tmin, s_tmax)
    if s_hat > s:
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
        a, b = heun_correction(s_hat, s_next)
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




def dpm_2(run, x, sigmas, churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """DPM-Solver-2 (Lu et al. 2022) as in k-diffusion: Euler to the geometric midpoint sigma, then a full
    step with the midpoint derivative; Euler on the last step to 0; optional EDM churn."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        x, s_hat = churn_step(run, x, i, sigmas, churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, s_hat)
        run.callback(i, x, s, s_hat, denoised)
        if s_next == 0:
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s_hat)
            continue
        s_mid = math.exp(0.5 * (math.log(s_hat) + math.log(s_next)))
        r = s_mid / s_hat
        x_mid = run.update([x, denoised], [r, 1.0 - r], i, track_sigma=s_hat)
        denoised_mid = run.denoise(x_mid, s_mid)
        c = (s_next - s_hat) / s_mid  # x + (s_next - s_hat) (x_mid - D_mid) / s_mid
        x = run.update([x, x_mid, denoised_mid], [1.0, c, -c], i, track_sigma=s_mid, u=1, d=2)
    return x


def linear_multistep_coeff(order, t, i, j):
    """Adams-Bashforth-type coefficient: integral over [t_i, t_i+1] of the Lagrange basis polynomial j
    through the nodes t_i, t_i-1, ..., t_i-order+1 (exact, by polynomial integration)."""
    if order - 1 > i:
        raise ValueError(f'Order {order} too high for step {i}')
    nodes = [float(t[i - k]) for k in range(order)]
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
    anti = np.polyint(poly)
    return float(anti(float(t[i + 1])) - anti(float(t[i])))


def lms(run, x, sigmas, order=4):
    """Linear multistep (Adams-Bashforth in sigma) on the probability-flow ODE, order 1 to 4."""
    if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= 4:
        raise ValueError(f"order must be an int in 1..4, got {order!r}")
    ds = []
    for i in run.steps():
        s = sigmas[i]
        denoised = run.denoise(x, s)
        # d = (x - D) / s is kept for later steps; its evaluation's rate is reduced here.
        d = run.update([x, denoised], [1.0 / s, -1.0 / s], i, track_sigma=s)
        ds = (ds + [d])[-order:]
        run.callback(i, x, s, s, denoised)
        cur = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur, sigmas, i, j) for j in range(cur)]
        hist = list(reversed(ds))  # hist[j] is d at step i - j
        x = run.update([x] + hist[:3], [1.0] + coeffs[:3], i)
        if cur == 4:  # the fused op takes 4 inputs: the oldest derivative in a second pass
            x = run.update([x, hist[3]], [1.0, coeffs[3]], i)
    return x


def dpmpp_2m_sde(run, x, sigmas, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, k-diffusion's variant), data prediction, log-sigma steps."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    old, h_last = None, None
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        if s_next == 0:  # final denoising step: x = D
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s)
        else:
            h = math.log(s / s_next)
            eh = eta * h
            inputs, coeffs = [x, denoised], [s_next / s * math.exp(-eh), -math.expm1(-h - eh)]
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    c = (-math.expm1(-h - eh) / (-h - eh) + 1.0) / r
                else:
                    c = 0.5 * -math.expm1(-h - eh) / r
                inputs, coeffs = inputs + [old], [coeffs[0], coeffs[1] + c, -c]
            noise = s_next * math.sqrt(-math.expm1(-2.0 * eh)) * s_noise if eta else 0.0
            x = run.update(inputs, coeffs, i, noise=noise, noise_sigmas=(s, s_next), track_sigma=s)
            h_last = h
        old = denoised
    return x


# --------------------------------------------------------------------------------------------------
# The solver table
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Solver:
    """One solver: its function and what the rest of the package needs to know about it.

    Attributes:
        fn: solver(run, x, sigmas, **options) -> x (see the module docstring).
        order: order of accuracy of the deterministic method (sets the error density of thermo_grid).
        evals_per_step: model evaluations per step; a multi-stage step to sigma = 0 takes one.
        noise: when it leaves the probability-flow ODE (fresh noise, or the ancestral / churn steps that
            make room for it, even with s_noise=0), so that the pathwise speed limit does not apply:
            "never", "always", "eta" (when option eta != 0) or "churn" (when option churn > 0).
        options: its keyword options with their defaults (read from fn's signature).
    """

    fn: Callable
    order: int
    evals_per_step: int = 1
    noise: str = "never"
    options: dict = field(init=False)

    def __post_init__(self):
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        object.__setattr__(self, "options", {p.name: p.default for p in params})

    def injects_noise(self, options: dict) -> bool:
        if self.noise == "always":
            return True
        if self.noise == "eta":
            return options.get("eta", self.options["eta"]) != 0
        if self.noise == "churn":
            return options.get("churn", 0.0) > 0
        return False

    def evaluations(self, steps: int, sigmas_end_in_zero: bool = True) -> int:
        """Model evaluations (NFE) spent on `steps` steps."""
        extra = self.evals_per_step - 1
        return steps + extra * (steps - 1 if sigmas_end_in_zero else steps)


SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, order=1, noise="churn"),
    "heun": Solver(heun, order=2, evals_per_step=2, noise="churn"),
    "dpm_2": Solver(dpm_2, order=2, evals_per_step=2, noise="churn"),
    "dpmpp_2m": Solver(dpmpp_2m, order=2),
    "lms": Solver(lms, order=4),
    "ddim": Solver(ddim, order=1, noise="eta"),
    "euler_ancestral": Solver(euler_ancestral, order=1, noise="eta"),
    "dpmpp_2m_sde": Solver(dpmpp_2m_sde, order=2, noise="eta"),
    "euler_maruyama": Solver(euler_maruyama, order=1, noise="always"),
}


def get_solver(name) -> Solver:
    """The table row of solver `name`; a ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


def check_options(name: str, options: dict) -> None:
    """Refuse options that solver `name` does not take (TypeError naming them and the valid ones) and
    values of the wrong kind (validate.check_solver_options)."""
    valid = SOLVERS[name].options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"solver {name!r} takes no option(s) {unknown}; its options: {list(valid)}")
    check_solver_options(options, valid)


def injects_noise(solver: str, options: dict) -> bool:
    """Whether `solver` with these options leaves the probability-flow ODE (see Solver.noise)."""
    return SOLVERS[solver].injects_noise(options)


def evaluations(solver: str, steps: int, sigmas_end_in_zero: bool = True) -> int:
    """Model evaluations (NFE) a solver spends on `steps` steps."""
    return SOLVERS[solver].evaluations(steps, sigmas_end_in_zero)
