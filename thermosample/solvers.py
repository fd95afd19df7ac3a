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

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .auto import AUTO
from .validate import check_solver_options


def _host_constant(fn):
    """Host maths (NumPy) on Python floats: under ts.sample(compile=True) torch.compile treats its result as
    a constant instead of tracing NumPy, so lms/unipc/deis compile with fullgraph=True."""
    try:
        import torch
        return torch.compiler.assume_constant_result(fn)
    except (ImportError, AttributeError):     # an older torch: plain function
        return fn


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


@_host_constant
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
                if solver_type == "heun":
                    c1 = -math.expm1(-h - eh) / (-h - eh) + 1.0
                else:
                    c1 = 0.5 * -math.expm1(-h - eh)
                w = dpmpp_multistep(c1, 0.0, [h_last / h])
                inputs, coeffs = inputs + [old], [coeffs[0], coeffs[1] + w[0], w[1]]
            noise = s_next * math.sqrt(-math.expm1(-2.0 * eh)) * s_noise if eta else 0.0
            x = run.update(inputs, coeffs, i, noise=noise, noise_sigmas=(s, s_next), track_sigma=s)
            h_last = h
        old = denoised
    return x


# --------------------------------------------------------------------------------------------------
# Third-order and predictor-corrector multistep solvers: UniPC, DPM-Solver++(3M), iPNDM, DEIS. Each step is
# one fused update (iPNDM's 4th order: two) over the state and the kept model outputs. The coefficient
# functions here (multistep_order, unipc_corrector, unipc_predictor, dpmpp_multistep, deis_coeffs) are
# also what the diffusers schedulers call, in their own coordinates: each method is derived once.
# --------------------------------------------------------------------------------------------------
def _check_order(name, value, low, high):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return int(value)


LOWER_ORDER_FINAL_BELOW = 15   # diffusers' DEIS and DPM-Solver lower the order of the last two steps below 15 steps


def multistep_order(order, available, left=None):
    """The order of a multistep step: at most `order`, the kept model outputs `available` (lower-order warm
    start) and `left`, the steps left with lower-order final steps (1st order on the last step, 2nd on the
    one before; None: no such cap), as diffusers' multistep schedulers."""
    return min(order, available) if left is None else min(order, available, left)


@_host_constant
def unipc_rhos(h, rks, variant, corrector):
    """(B(h), rhos) of a UniPC step of order p = len(rks) (Zhao et al. 2023, Alg. 2/3; data prediction):
    rks are the ratios (lambda_k - lambda_0) / h of the kept outputs, ending with 1; B(h) = h' (bh1) or
    expm1(h') (bh2) with h' = -h. The predictor UniP-p solves the (p-1) x (p-1) system (rho = 1/2 at
    p = 2), the corrector UniC-p the p x p one (rho = 1/2 at p = 1), as diffusers' UniPCMultistepScheduler."""
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    p = len(rks)
    b, factorial = [], 1
    for k in range(1, p + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.array([[r ** k for r in rks] for k in range(p)], dtype=np.float64)
    if corrector:
        rhos = [0.5] if p == 1 else list(np.linalg.solve(R, np.array(b)))
    else:
        rhos = [] if p == 1 else [0.5] if p == 2 else list(np.linalg.solve(R[:-1, :-1], np.array(b[:-1])))
    return b_h, [float(r) for r in rhos]


def unipc_predictor(h, rks, variant, scale=1.0):
    """UniP-p's extrapolation of the model outputs over a step of length h in lambda, beyond the first-order
    step: [(age, weight)] over the kept outputs (age 0: the newest; rks as in unipc_rhos), each weight
    times `scale` (the state's alpha at the step's end in diffusers' coordinates)."""
    b_h, rho_p = unipc_rhos(h, rks, variant, corrector=False)
    terms = []
    for k in range(1, len(rks)):
        w = -scale * b_h * rho_p[k - 1] / rks[k - 1]
        terms += [(k, w), (0, -w)]
    return terms


def unipc_corrector(h, rks, variant, scale=1.0, relative=True):
    """UniC-p's correction of the state reached by a step of length h, with the output evaluated there
    (age 0) and the kept ones (age k + 1 is the k-th before the step): [(age, weight)] times `scale`.
    relative=True: the corrector minus the predictor that made the state (x_c = x + sum); False: the
    corrector's own extrapolation terms (for a state that the predictor did not make)."""
    b_h, rho_c = unipc_rhos(h, rks, variant, corrector=True)
    if relative:
        _, rho_p = unipc_rhos(h, rks, variant, corrector=False)
        rho = [rc - rp for rc, rp in zip(rho_c[:-1], rho_p)]
    else:
        rho = rho_c[:-1]
    terms = []
    for k in range(1, len(rks)):
        w = -scale * b_h * rho[k - 1] / rks[k - 1]
        terms += [(k + 1, w), (1, -w)]
    last = scale * b_h * rho_c[-1]
    return terms + [(0, -last), (1, last)]


def unipc(run, x, sigmas, order=2, variant="bh2", max_h=None, noise_below=None, noise_order=None):
    """UniPC (Zhao et al. 2023), data prediction, B(h) variant "bh1" or "bh2", as diffusers'
    UniPCMultistepScheduler(solver_order=order, solver_type=variant, lower_order_final=True): the UniP-p
    multistep predictor in lambda = -log sigma with lower-order warm start and a first-order last step, and
    the UniC corrector, which refines the state at sigma_i with the model output there (no extra evaluation).
    max_h, noise_below and noise_order select solver="auto"'s variant (`UniPCVariant`); off by default.

    The corrected state is x_c_i = x_i + Delta_i, with x_i the state the model was evaluated at and Delta_i
    a combination of the kept outputs, so one fused update per step takes x_i to x_{i+1} = UniP(x_c_i) over
    x_i and up to four outputs and tracks the evaluation (x_i, D_i); x_c_i is never stored."""
    order = _check_order("order", order, 1, 3)
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    auto = UniPCVariant.of(max_h, noise_below, noise_order, order)
    n = len(sigmas) - 1
    outs, states = [], []    # model outputs and (for the variant's DEIS steps) their states, newest first
    p_prev = None            # order of the previous predictor (the corrector's order, as diffusers)
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        outs = ([denoised] + outs)[:max(order + 1, auto.deis_order)]
        states = ([x] + states)[:auto.deis_order]
        coeffs = {"x": 1.0}  # x_c over x (the evaluated state) and outs[age]
        if p_prev is not None:  # UniC: x_c = x + Delta, redoing the step sigmas[i - 1] -> s just taken
            h = math.log(sigmas[i - 1] / s)
            rks = [math.log(sigmas[i - 1] / sigmas[i - 1 - k]) / h for k in range(1, p_prev)] + [1.0]
            for age, c in unipc_corrector(h, rks, variant):
                coeffs[age] = coeffs.get(age, 0.0) + c
        if auto.is_deis_step(s, s_next):
            x = deis_step(run, i, sigmas, coeffs, outs, states, auto.deis_order)
            p_prev = None    # DEIS has no corrector
            continue
        # UniP-p from x_c to s_next: x_{i+1} = r x_c + (1 - r) D_i + the extrapolation terms
        p = auto.predictor_order(multistep_order(order, i + 1, n - i), s, s_next)
        r = s_next / s
        step = {key: r * c for key, c in coeffs.items()}
        step[0] = step.get(0, 0.0) + (1.0 - r)
        if p > 1:
            h = math.log(s / s_next)
            rks = [math.log(s / sigmas[i - k]) / h for k in range(1, p)] + [1.0]
            for age, w in unipc_predictor(h, rks, variant):
                step[age] = step.get(age, 0.0) + w
        ages = sorted(key for key in step if key != "x")
        x = run.update([x] + [outs[a] for a in ages], [step["x"]] + [step[a] for a in ages], i, track_sigma=s,
                       u=0, d=1 + ages.index(0))
        p_prev = p
    return x


@dataclass(frozen=True)
class UniPCVariant:
    """solver="auto"'s variant of UniPC (unipc's max_h, noise_below, noise_order); all off is diffusers' UniPC.

    max_h: a step longer than max_h in lambda = -log sigma predicts with order at most 2. UniP-3
        extrapolates the model output quadratically in lambda, which overshoots over the long low-noise
        steps of a short grid, while the short high-noise steps gain from the third order.
    noise_below: the steps from a sigma <= noise_below (to a positive sigma) are DEIS tAB steps of order
        deis_order (`deis_step`) from the corrected state: a low-noise step is short in sigma however long
        in lambda, so an extrapolation error of the noise prediction moves x little, where UniP's data
        prediction weighs it by 1 - sigma'/sigma. How auto measures both: docs/calibration.md."""
    max_h: float | None = None
    noise_below: float | None = None
    deis_order: int = 0     # 0 without noise_below: no states kept

    @classmethod
    def of(cls, max_h, noise_below, noise_order, order):
        """The variant of unipc's options (checked); noise_order None: min(order, 3)."""
        if max_h is not None and not max_h > 0:
            raise ValueError(f"max_h must be None or > 0, got {max_h!r}")
        if noise_below is not None and not noise_below >= 0:
            raise ValueError(f"noise_below must be None or >= 0, got {noise_below!r}")
        noise_order = min(order, 3) if noise_order is None else _check_order("noise_order", noise_order, 1, 3)
        return cls(max_h, noise_below, noise_order if noise_below is not None else 0)

    def is_deis_step(self, s, s_next) -> bool:
        """Whether the step from s to s_next is a DEIS step."""
        return self.noise_below is not None and s <= self.noise_below and s_next > 0

    def predictor_order(self, p, s, s_next) -> int:
        """UniP's order p on the step from s to s_next, capped at 2 on a step longer than max_h."""
        if self.max_h is not None and s_next > 0 and math.log(s / s_next) > self.max_h:
            return min(p, 2)
        return p


def deis_step(run, i, sigmas, coeffs, outs, states, order):
    """unipc's noise_below step: x' = x_c + sum_j c_j eps_j (deis_coeffs over the last `order` sigmas),
    where x_c = x + sum_a coeffs[a] outs[a] is the corrected state (coeffs over "x" and output ages as in
    unipc) and eps_j = (states[j] - outs[j]) / sigma_j. One fused update when it fits the op's inputs (every
    step after the first), else the eps terms of the older evaluations go in a second pass (`update_in_passes`)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    q = min(order, len(states), i + 1)
    terms = {("x", 0): coeffs["x"]}                          # (kind, age) -> coefficient
    for age, c in coeffs.items():
        if age != "x":
            terms[("D", age)] = c
    for j, c in enumerate(deis_coeffs([sigmas[i - j] for j in range(q)], s_next)):
        w = c / sigmas[i - j]
        terms[("x", j)] = terms.get(("x", j), 0.0) + w
        terms[("D", j)] = terms.get(("D", j), 0.0) - w
    keys = [("x", 0), ("D", 0)] + sorted(k for k in terms if k not in (("x", 0), ("D", 0)))
    return update_in_passes(run, [states[a] if kind == "x" else outs[a] for kind, a in keys],
                            [terms[k] for k in keys], i, s)


def update_in_passes(run, inputs, coeffs, i, track_sigma):
    """run.update over more inputs than the fused op takes: the first MAX_INPUTS (tracked as the evaluation
    at track_sigma, x_hat = inputs[0], D = inputs[1]), then the rest added to that result in a second pass."""
    limit = _max_inputs()
    out = run.update(inputs[:limit], coeffs[:limit], i, track_sigma=track_sigma)
    if len(inputs) > limit:
        out = run.update([out] + inputs[limit:], [1.0] + coeffs[limit:], i)
    return out


def dpmpp_multistep(c1, c2, rs):
    """DPM-Solver++'s multistep terms c1 D1 + c2 D2 (Lu et al. 2022) as weights on the model outputs D_0
    (newest), D_1, D_2, from the divided differences D1_0 = (D_0 - D_1) / r0 and D1_1 = (D_1 - D_2) / r1
    (rs = [r0] or [r0, r1]: the previous steps over this one in lambda). Order 2: D1 = D1_0. Order 3:
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)."""
    if len(rs) == 1:
        return [c1 / rs[0], -c1 / rs[0]]
    r0, r1 = rs
    w0 = c1 * (1.0 + r0 / (r0 + r1)) + c2 / (r0 + r1)      # on D1_0
    w1 = -c1 * r0 / (r0 + r1) - c2 / (r0 + r1)             # on D1_1
    return [w0 / r0, -w0 / r0 + w1 / r1, -w1 / r1]


def dpmpp_3m_sde(run, x, sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde; Lu et al. 2022): third-order multistep in
    h = log(sigma / sigma_next) with data prediction, 1st then 2nd order to warm up, x = D on the step to 0;
    eta > 0 adds sigma_next sqrt(1 - exp(-2 eta h)) s_noise fresh noise per step (in-kernel Philox, or
    noise_sampler(sigma, sigma_next) when given)."""
    old, h_old = [], []  # the previous model outputs and step sizes, newest first
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        if s_next == 0:  # final denoising step
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s)
        else:
            h = math.log(s / s_next)
            he = h * (eta + 1.0)
            inputs, coeffs = [x, denoised], [math.exp(-he), -math.expm1(-he)]
            phi_2 = math.expm1(-he) / he + 1.0
            if old:   # x += phi_2 D1 - phi_3 D2 (order 3), phi_2 D1 (order 2)
                phi_3 = phi_2 / he - 0.5
                w = dpmpp_multistep(phi_2, -phi_3, [h_j / h for h_j in h_old])
                inputs += old
                coeffs = [coeffs[0], coeffs[1] + w[0]] + w[1:]
            noise = s_next * math.sqrt(-math.expm1(-2.0 * h * eta)) * s_noise if eta else 0.0
            x = run.update(inputs, coeffs, i, noise=noise, noise_sigmas=(s, s_next), track_sigma=s)
            h_old = [h] + h_old[:1]
        old = [denoised] + old[:1]
    return x


def dpmpp_3m(run, x, sigmas):
    """DPM-Solver++(3M), deterministic (Lu et al. 2022): dpmpp_3m_sde with eta = 0, the same numbers as
    diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3,
    solver_type="heun", lower_order_final=False)."""
    return dpmpp_3m_sde(run, x, sigmas, eta=0.0, s_noise=1.0)


IPNDM_COEFFS = ((1.0,), (3.0 / 2.0, -1.0 / 2.0), (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
                (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0))


def ipndm(run, x, sigmas, max_order=4):
    """Improved PNDM (Zhang & Chen 2023, iPNDM; Chen et al.'s diff-sampler): Adams-Bashforth on
    dx/dsigma = (x - D) / sigma with the fixed coefficients of equal steps, order min(max_order, i + 1)
    (lower-order warm start), x = D on the step to 0. Orders 1-3 are one fused update over the kept
    (x, D) pairs; order 4 reads eight tensors, so the oldest derivative goes in a second pass."""
    max_order = _check_order("max_order", max_order, 1, 4)
    kept = []  # (x_j, D_j, sigma_j), newest first
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        kept = ([(x, denoised, s)] + kept)[:max_order]
        if s_next == 0:
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s)
            continue
        inputs, coeffs = [], []
        for c, (x_j, d_j, s_j) in zip(IPNDM_COEFFS[len(kept) - 1], kept):
            w = (s_next - s) * c / s_j  # x' = x + (s_next - s) sum_j c_j (x_j - D_j) / s_j
            inputs += [x_j, d_j]
            coeffs += [w, -w]
        coeffs[0] += 1.0
        x = update_in_passes(run, inputs, coeffs, i, s)
    return x


@_host_constant
def deis_coeffs(nodes, s_next):
    """DEIS tAB coefficients (Zhang & Chen 2023, "logrho"): c_j = integral from nodes[0] to s_next of the
    Lagrange basis polynomial j in log(rho) through log(nodes), d rho; x' = x + sum_j c_j eps_j.

    With v = log(rho / nodes[0]), rho = nodes[0] e^v, and integral of P(v) e^v dv = e^v sum_m (-1)^m P^(m)(v)."""
    return list(_deis_coeffs(tuple(float(s) for s in nodes), float(s_next)))


@functools.lru_cache(maxsize=4096)      # a grid search (calibrate.surrogate_grid) reruns the same steps
def _deis_coeffs(nodes: tuple, s_next: float) -> tuple:
    v = [math.log(s / nodes[0]) for s in nodes]
    end = math.log(s_next / nodes[0])
    out = []
    for j in range(len(nodes)):
        poly = np.poly1d([1.0])
        for k in range(len(nodes)):
            if k != j:
                poly = poly * np.poly1d([1.0, -v[k]]) / (v[j] - v[k])
        anti, term, sign = np.poly1d([0.0]), poly, 1.0
        while True:
            anti = anti + sign * term
            if term.order == 0:
                break
            term, sign = term.deriv(), -sign
        out.append(nodes[0] * (math.exp(end) * float(anti(end)) - float(anti(0.0))))
    return tuple(out)


FIT_HISTORY = 2   # differences of D and of eps one fitted correction combines (calibrate.fit_corrections)


def deis_terms(i, n, kept_sigmas, s_next, order):
    """DEIS's update from step i of n as coefficients [(c_x, c_D) per kept (x_j, D_j), newest first] over
    the kept evaluations' sigmas: x' = sum_j c_x,j x_j + c_D,j D_j."""
    if s_next == 0:
        return [(0.0, 1.0)] + [(0.0, 0.0)] * (len(kept_sigmas) - 1)
    p = multistep_order(order, len(kept_sigmas), n - i if n < LOWER_ORDER_FINAL_BELOW else None)
    terms = [[0.0, 0.0] for _ in kept_sigmas]
    terms[0][0] = 1.0
    for j, c in enumerate(deis_coeffs(list(kept_sigmas[:p]), s_next)):
        terms[j][0] += c / kept_sigmas[j]
        terms[j][1] -= c / kept_sigmas[j]
    return [tuple(t) for t in terms]


def correction_terms(kept_sigmas, s_next):
    """The basis a fitted correction combines after a step from kept_sigmas[0] to s_next: with q =
    min(FIT_HISTORY, len(kept_sigmas) - 1), the differences D_{j-1} - D_j and h (eps_{j-1} - eps_j) for j =
    1..q (newest first, h = s_next - kept_sigmas[0], eps_j = (x_j - D_j) / sigma_j), each as coefficients
    [(c_x, c_D) per kept (x_j, D_j)]. Returns 2q such lists (the D differences first)."""
    q = min(FIT_HISTORY, len(kept_sigmas) - 1)
    h = s_next - kept_sigmas[0]
    out = []
    for j in range(1, q + 1):
        t = [[0.0, 0.0] for _ in kept_sigmas]
        t[j - 1][1], t[j][1] = 1.0, -1.0
        out.append(t)
    for j in range(1, q + 1):
        t = [[0.0, 0.0] for _ in kept_sigmas]
        a, b = h / kept_sigmas[j - 1], h / kept_sigmas[j]
        t[j - 1] = [a, -a]
        t[j] = [-b, b]
        out.append(t)
    return out


def _corrections(corrections, n):
    """deis's `corrections` option as a list of n tuples of finite floats, 2 min(FIT_HISTORY, i) at step i
    (the size of correction_terms' basis there); a ValueError naming what is wrong, before any evaluation."""
    if corrections is None:
        return None
    if isinstance(corrections, (str, bytes)) or not hasattr(corrections, "__len__") or len(corrections) != n:
        raise ValueError(f"deis corrections must hold one sequence of floats per step ({n}), got {corrections!r}")
    try:
        out = [tuple(float(c) for c in step) for step in corrections]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"deis corrections must hold one sequence of floats per step: {exc}") from None
    for i, step in enumerate(out):
        if len(step) != 2 * min(FIT_HISTORY, i):
            raise ValueError(f"deis corrections[{i}] must hold {2 * min(FIT_HISTORY, i)} floats, got {len(step)}")
    if not all(math.isfinite(c) for step in out for c in step):
        raise ValueError("deis corrections must be finite")
    return out


def fitted_deis_terms(fit, i, n, kept_sigmas, s_next, order):
    """deis's `corrections` variant (solver="auto" tries it on short grids): deis_terms plus the step's
    fitted coefficients `fit` (calibrate.fit_corrections, least squares on a pilot) of `correction_terms`."""
    terms = [list(t) for t in deis_terms(i, n, kept_sigmas, s_next, order)]
    for c, b in zip(fit, correction_terms(kept_sigmas, s_next)):
        for t, bt in zip(terms, b):
            t[0] += c * bt[0]
            t[1] += c * bt[1]
    return terms


def deis(run, x, sigmas, order=3, corrections=None):
    """DEIS tAB (Zhang & Chen 2023), as diffusers' DEISMultistepScheduler(solver_order=order,
    algorithm_type="deis"): x_hat' = x_hat + sum_j c_j eps_j with eps_j = (x_j - D_j) / sigma_j, the
    outputs extrapolated by a Lagrange polynomial in log sigma (deis_coeffs); lower-order warm start, and
    (as diffusers) 1st/2nd order on the last two steps of a run of fewer than 15 steps; x = D on a step
    to 0. One fused update over up to three (x, D) pairs.

    corrections: None (plain DEIS), or solver="auto"'s fitted variant (`fitted_deis_terms`): per step
    2 min(FIT_HISTORY, i) floats."""
    order = _check_order("order", order, 1, 3)
    n = len(sigmas) - 1
    fit = _corrections(corrections, n)
    depth = max(order, FIT_HISTORY + 1) if fit else order
    kept = []  # (x_j, D_j, sigma_j), newest first
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        kept = ([(x, denoised, s)] + kept)[:depth]
        kept_sigmas = [k[2] for k in kept]
        if fit:
            terms = fitted_deis_terms(fit[i], i, n, kept_sigmas, s_next, order)
        else:
            terms = deis_terms(i, n, kept_sigmas, s_next, order)
        inputs, coeffs = [], []
        for (x_j, d_j, _), (cx, cd) in zip(kept, terms):
            if cx != 0.0 or cd != 0.0 or not inputs:
                inputs += [x_j, d_j]
                coeffs += [cx, cd]
        x = run.update(inputs, coeffs, i, track_sigma=s)
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
    "unipc": Solver(unipc, order=3),                     # default order=2: UniP-2 + UniC-2, 3rd order
    # The peers' 3M formula is 2nd order: its D2 is h^2 D''/2 where phi_3 needs h^2 D'' (order tests)
    "dpmpp_3m": Solver(dpmpp_3m, order=2),
    "dpmpp_3m_sde": Solver(dpmpp_3m_sde, order=2, noise="eta"),
    "ipndm": Solver(ipndm, order=4),
    "deis": Solver(deis, order=3),
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
    """Model evaluations (NFE) a solver spends on `steps` steps ("auto": one per step, as all its choices)."""
    if solver == AUTO:
        return steps
    return SOLVERS[solver].evaluations(steps, sigmas_end_in_zero)


# --------------------------------------------------------------------------------------------------
# k-diffusion's remaining ancestral / SDE solvers. Their rows are added to SOLVERS at the end of this file
# (a row must follow the function it names).
# --------------------------------------------------------------------------------------------------
def dpm_2_ancestral(run, x, sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver-2 ancestral (k-diffusion's sample_dpm_2_ancestral): a DPM-Solver-2 step (Lu et al. 2022)
    from sigma to sigma_down through the geometric midpoint, then sigma_up fresh noise. A step whose
    sigma_down is 0 is a single Euler step to D and, as in k-diffusion, adds no noise."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        down, up = ancestral_step(s, s_next, eta)
        if down == 0:  # Euler to sigma_down = 0: x + (0 - s) (x - D) / s = D
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s)
            continue
        s_mid = math.exp(0.5 * (math.log(s) + math.log(down)))
        r = s_mid / s
        x_mid = run.update([x, denoised], [r, 1.0 - r], i, track_sigma=s)
        denoised_mid = run.denoise(x_mid, s_mid)
        c = (down - s) / s_mid  # x + (sigma_down - s) (x_mid - D_mid) / s_mid, then + sigma_up z
        x = run.update([x, x_mid, denoised_mid], [1.0, c, -c], i, noise=s_noise * up, noise_sigmas=(s, s_next),
                       track_sigma=s_mid, u=1, d=2)
    return x


def dpmpp_2s_ancestral(run, x, sigmas, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) ancestral (k-diffusion's sample_dpmpp_2s_ancestral; Lu et al. 2022): a
    single-step 2nd-order data-prediction step in log sigma from sigma to sigma_down (midpoint
    r = 1/2), then sigma_up fresh noise (none on the step to 0)."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        down, up = ancestral_step(s, s_next, eta)
        noise = s_noise * up if s_next > 0 else 0.0
        if down == 0:  # Euler to sigma_down = 0 (x = D), then the noise
            x = run.update([x, denoised], [0.0, 1.0], i, noise=noise, noise_sigmas=(s, s_next), track_sigma=s)
            continue
        h = math.log(s / down)                  # t_next - t with t = -log sigma
        s_mid = s * math.exp(-0.5 * h)          # sigma at t + h / 2
        x_mid = run.update([x, denoised], [math.exp(-0.5 * h), -math.expm1(-0.5 * h)], i, track_sigma=s)
        denoised_mid = run.denoise(x_mid, s_mid)
        # x' = (sigma_down / s) x - expm1(-h) D_mid (+ noise); x_mid (coefficient 0) is read for the rate.
        x = run.update([x, x_mid, denoised_mid], [down / s, 0.0, -math.expm1(-h)], i, noise=noise,
                       noise_sigmas=(s, s_next), track_sigma=s_mid, u=1, d=2)
    return x


def _splitmix64(v: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a well-mixed 64-bit key derived from v."""
    m = 0xFFFFFFFFFFFFFFFF
    z = (v + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _update_second_stream(run, *args, **kwargs):
    """run.update drawing its in-kernel noise from the run's second Philox stream, keyed by
    (splitmix64(seed), sample, step, element) instead of (seed, ...): a step that needs two independent
    noise draws (dpmpp_sde) takes the second one from here. Deterministic in (seed, sample, step), so
    batch-, backend- and graph-independent like the first stream."""
    seed = run.seed
    run.seed = _splitmix64(seed)
    try:
        return run.update(*args, **kwargs)
    finally:
        run.seed = seed


def dpmpp_sde_sigma_mid(s: float, s_next: float, r: float) -> float:
    """dpmpp_sde's intermediate noise level sigma^(1 - r) sigma_next^r (at t + r h, t = -log sigma)."""
    return s * math.exp(-r * math.log(s / s_next))


def dpmpp_sde(run, x, sigmas, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde; Lu et al. 2022): per step an ancestral
    data-prediction step to the intermediate sigma_s = sigma^(1-r) sigma_next^r, a second evaluation there,
    and an ancestral step to sigma_next with D_d = (1 - 1/(2r)) D + 1/(2r) D_s; Euler on the step to 0.

    Noise: with a noise_sampler, exactly k-diffusion's calls (sigma, sigma_s) then (sigma, sigma_next).
    Without one, the in-kernel Philox stream with the joint law of k-diffusion's default Brownian tree
    (transform sigma -> sigma): the two normalised increments of a step, over [sigma_s, sigma] and
    [sigma_next, sigma], are standard normals with correlation rho = sqrt((sigma - sigma_s) /
    (sigma - sigma_next)); the second is rho z_1 + sqrt(1 - rho^2) z', with z_1 read back from the
    intermediate state and z' from the run's second Philox stream. Steps are independent, as the tree's
    increments over disjoint intervals are."""
    if isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not 0 < r <= 1:
        raise ValueError(f"r must be a number in (0, 1], got {r!r}")
    r = float(r)
    fac = 1.0 / (2.0 * r)
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        if s_next == 0:  # Euler to 0: x = D
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s)
            continue
        s_mid = dpmpp_sde_sigma_mid(s, s_next, r)
        # Step 1: ancestral data-prediction step s -> s_mid.
        down1, up1 = ancestral_step(s, s_mid, eta)
        q1, n1 = down1 / s, s_noise * up1
        x_mid = run.update([x, denoised], [q1, 1.0 - q1], i, noise=n1, noise_sigmas=(s, s_mid), track_sigma=s)
        denoised_mid = run.denoise(x_mid, s_mid)
        # Step 2: ancestral step s -> s_next with D_d = (1 - fac) D + fac D_mid.
        down2, up2 = ancestral_step(s, s_next, eta)
        q2, n2 = down2 / s, s_noise * up2
        c_d, c_mid = (1.0 - q2) * (1.0 - fac), (1.0 - q2) * fac
        if run.noise_sampler is None and n1 != 0 and n2 != 0:
            # Brownian-tree correlation: z_1 = (x_mid - q1 x - (1 - q1) D) / n1 is the first step's noise.
            rho = math.sqrt((s - s_mid) / (s - s_next))
            k = n2 * rho / n1
            x = _update_second_stream(run, [x, denoised, x_mid, denoised_mid],
                                      [q2 - k * q1, c_d - k * (1.0 - q1), k, c_mid], i,
                                      noise=n2 * math.sqrt(max(0.0, 1.0 - rho * rho)), noise_sigmas=(s, s_next),
                                      track_sigma=s_mid, u=2, d=3)
            continue
        if c_d == 0.0:  # r = 1/2: D drops out
            inputs, coeffs, u, d = [x, x_mid, denoised_mid], [q2, 0.0, c_mid], 1, 2
        else:
            inputs, coeffs, u, d = [x, denoised, x_mid, denoised_mid], [q2, c_d, 0.0, c_mid], 2, 3
        if n2 != 0 and run.noise_sampler is not None and len(inputs) + 1 > _max_inputs():
            x = run.update(inputs, coeffs, i, track_sigma=s_mid, u=u, d=d)  # the sampled noise in a second pass
            x = run.update([x], [1.0], i, noise=n2, noise_sigmas=(s, s_next))
        else:
            x = run.update(inputs, coeffs, i, noise=n2, noise_sigmas=(s, s_next), track_sigma=s_mid, u=u, d=d)
    return x


def _max_inputs() -> int:
    """The fused op's input slots (ops.MAX_INPUTS); a sampled noise tensor takes one."""
    from .ops import MAX_INPUTS
    return MAX_INPUTS


SOLVERS.update({
    "dpm_2_ancestral": Solver(dpm_2_ancestral, order=2, evals_per_step=2, noise="eta"),
    "dpmpp_2s_ancestral": Solver(dpmpp_2s_ancestral, order=2, evals_per_step=2, noise="eta"),
    "dpmpp_sde": Solver(dpmpp_sde, order=2, evals_per_step=2, noise="eta"),
})


def _resolve_auto(grid) -> tuple[str, dict]:
    from .auto import resolve
    return resolve(grid, None)


def __getattr__(name):
    """Names that moved to thermosample.auto work for one more release, with a deprecation warning."""
    from . import auto
    from .errors import warn_moved
    moved = {"recommended": ("thermosample.auto.recommended", auto.recommended),
             "resolve_auto": ("thermosample.auto.resolve(grid, steps)", _resolve_auto)}
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warn_moved(f"thermosample.solvers.{name}", moved[name][0])
    return moved[name][1]
