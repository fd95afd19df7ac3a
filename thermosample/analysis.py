"""Phase transitions of generative diffusion (docs/theory.md §5): speciation and symmetry breaking.

- `speciation_time`: t_S = (1/2) log Lambda for the Ornstein-Uhlenbeck process (Biroli, Bonnaire,
  de Bortoli, Mezard 2024), Lambda the largest eigenvalue of the data covariance; mapped to any
  schedule by matching the noise-to-signal ratio sigma_hat (OU: sigma_hat^2 = e^{2t} - 1, so at t_S
  sigma_hat_S^2 = Lambda - 1).
- `cloning`: the order parameter phi(t) = P(two reverse-SDE copies cloned at time t end in the same
  class); phi(t_S) ~ 0.775 for two Gaussians (Biroli et al.).
- `potential_curvature` / `symmetry_breaking_time`: the curvature at the origin of the potential of the
  reverse-time drift; for data at ±1 under a VP process it changes sign at signal level
  theta_c = sqrt(sqrt(2) - 1) = 0.6436 (Raya & Ambrogioni 2023).
- `critical_time`: a critical-time estimate read from a sampling run itself: the noise level where the
  spread of the denoised estimates D across the batch grows fastest (per unit log sigma), and the knee of
  the dissipation rate E||nu||^2 of the ThermoReport.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .grids import logsnr
from .sampler import sample
from .schedules import get_schedule

__all__ = ["speciation_time", "cloning", "cloning_crossing", "potential_curvature", "symmetry_breaking_time",
           "critical_time", "THETA_C", "PHI_S"]

THETA_C = math.sqrt(math.sqrt(2.0) - 1.0)  # Raya & Ambrogioni's critical signal level, 0.6436
PHI_S = 0.775  # cloning probability at the speciation time (Biroli et al., two Gaussians)


def speciation_time(cov, schedule=None) -> float:
    """Speciation time from the data covariance.

    Args:
        cov: [d, d] data covariance (tensor or array), or data samples [N, ...] (N > d not required:
            the covariance is estimated), or a float: the largest eigenvalue Lambda itself.
        schedule: None for the OU time t_S = (1/2) log Lambda; otherwise a Schedule (or name) whose time
            with the same sigma_hat, sigma_hat_S = sqrt(Lambda - 1), is returned.
    Returns:
        t_S (float); nan when Lambda <= 1 (no speciation: the data is not more spread than the noise).
    """
    if isinstance(cov, (int, float)):
        lam = float(cov)
    else:
        c = torch.as_tensor(np.asarray(cov) if not isinstance(cov, torch.Tensor) else cov).double()
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            x = c.reshape(c.shape[0], -1)
            x = x - x.mean(0)
            # largest eigenvalue of X^T X / N through the (smaller) Gram matrix when N < d
            g = x @ x.T if x.shape[0] < x.shape[1] else x.T @ x
            lam = float(torch.linalg.eigvalsh(g / x.shape[0])[-1])
        else:
            lam = float(torch.linalg.eigvalsh(0.5 * (c + c.T))[-1])
    if not lam > 1.0:
        return math.nan
    if schedule is None:
        return 0.5 * math.log(lam)
    sch = get_schedule(schedule)
    return float(sch.sigma_to_t(math.sqrt(lam - 1.0)))


def _sde_grid(sigma_hi: float, sigma_lo: float, steps: int, sigma_min: float) -> np.ndarray:
    """Descending sigmas from sigma_hi to sigma_lo, uniform in log sigma; sigma_lo = 0 runs to the
    schedule's sigma_min and appends a final 0 (the data)."""
    end = sigma_lo if sigma_lo > 0 else sigma_min
    g = np.exp(np.linspace(math.log(sigma_hi), math.log(min(end, sigma_hi * 0.999)), steps))
    return g if sigma_lo > 0 else np.append(g, 0.0)


def cloning(den, shape, times, classify, steps: int = 100, seed: int = 0, backend: str = "auto"):
    """Cloning order parameter phi(t) (Biroli et al. 2024): run the reverse SDE (Euler-Maruyama) from the
    prior down to time t, clone each state, continue both copies to the data with independent noise,
    and measure how often the two end in the same class.

    Args:
        den: a `ts.Denoiser` (its schedule gives the time axis).
        shape: [B, ...] number of cloned pairs and the sample shape.
        times: [T] physical times t to clone at.
        classify: function samples [B, ...] -> labels [B] (tensor or array).
        steps: Euler-Maruyama steps for each leg (uniform in log sigma).
        seed: base seed; leg 1 uses seed, the copies seed + 1 and seed + 2.
    Returns:
        phi [T] (numpy) in [0, 1].
    """
    sch = den.schedule
    phi = []
    for t in np.asarray(times, dtype=np.float64).reshape(-1):
        s_t = float(sch.sigma(float(t)))
        head, tail = _sde_grid(sch.sigma_max, s_t, steps, sch.sigma_min), _sde_grid(s_t, 0.0, steps, sch.sigma_min)
        pre = sample(den, shape, solver="euler_maruyama", grid=head, seed=seed, backend=backend,
                     track=False).samples
        ends = [sample(den, noise=pre, solver="euler_maruyama", grid=tail, seed=seed + k, backend=backend,
                       track=False).samples for k in (1, 2)]
        a, b = (torch.as_tensor(np.asarray(classify(e))) for e in ends)
        phi.append(float((a == b).double().mean()))
    return np.asarray(phi)


def cloning_crossing(times, phi, level: float = PHI_S) -> float:
    """The time where phi(t) (decreasing in t) crosses `level`, by linear interpolation; nan if never."""
    t = np.asarray(times, dtype=np.float64)
    p = np.asarray(phi, dtype=np.float64)
    order = np.argsort(t)
    t, p = t[order], p[order]
    for i in range(len(t) - 1):
        if (p[i] - level) * (p[i + 1] - level) <= 0 and p[i] != p[i + 1]:
            return float(t[i] + (level - p[i]) * (t[i + 1] - t[i]) / (p[i + 1] - p[i]))
    return math.nan


def potential_curvature(den, t, direction=None, x_hat=None, h: float = 1e-4) -> float:
    """Curvature of the reverse-drift potential at x (default: the origin) along `direction`.

    The reverse-time SDE has drift b(x) = -f(x) + 2 T grad log p_t(x) (per unit reverse time); with
    b = -2 T grad u, u(x, t) = (1/2) (m'/m) |x|^2 / (2 T) - log p_t(x) (Raya & Ambrogioni 2023: for VP,
    u = -|x|^2/4 - log p_t). Along a unit direction v, with grad log p = (m D(x/m) - x) / s^2:

        kappa(t) = (m'/m) / (2 T) + (1 - v . J_D v) / s^2,     J_D = dD/dx_hat (central difference).

    Args:
        den: a `ts.Denoiser`.
        t: physical time.
        direction: [d] (or the sample shape) unit direction; default the first coordinate axis.
        x_hat: the point (sampler coordinates) [d]; default the origin.
        h: finite-difference step in x_hat.
    Returns:
        kappa (float): > 0 a single well at x, < 0 a maximum (the symmetric state is unstable).
    """
    sch = den.schedule
    t = float(t)
    if direction is None and x_hat is None:
        raise ValueError("pass direction= or x_hat= (to know the sample shape)")
    v = torch.as_tensor(direction if direction is not None else torch.zeros_like(torch.as_tensor(x_hat)),
                        dtype=torch.float64)
    if direction is None:
        v.reshape(-1)[0] = 1.0
    v = v / v.norm()
    x0 = torch.zeros_like(v) if x_hat is None else torch.as_tensor(x_hat, dtype=torch.float64).reshape(v.shape)
    sig = float(sch.sigma(t))
    pts = torch.stack([x0 + h * v, x0 - h * v])
    d = den(pts, sig).double()
    jvv = float(((d[0] - d[1]) * v).sum()) / (2 * h)
    s = float(sch.s(t))
    return float(sch.drift(t)) / (2.0 * float(sch.temperature(t))) + (1.0 - jvv) / (s * s)


def symmetry_breaking_time(den, direction, t_lo: float | None = None, t_hi: float | None = None,
                           iters: int = 60) -> float:
    """The time where the potential curvature at the origin changes sign (bisection on
    `potential_curvature`); returns nan when it keeps one sign on [t_lo, t_hi]."""
    sch = den.schedule
    lo = sch.t_min if t_lo is None else float(t_lo)
    hi = sch.t_max if t_hi is None else float(t_hi)
    k_lo, k_hi = potential_curvature(den, lo, direction), potential_curvature(den, hi, direction)
    if k_lo * k_hi > 0:
        return math.nan
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        k = potential_curvature(den, mid, direction)
        if (k < 0) == (k_lo < 0):
            lo, k_lo = mid, k
        else:
            hi = mid
    return 0.5 * (lo + hi)


def critical_time(den, shape, steps: int = 48, seed: int = 0, backend: str = "auto") -> dict:
    """Critical-time estimates read from one probability-flow run (DPM-Solver++(2M), grid uniform in log
    sigma) of the sampler itself.

    Args:
        den: a `ts.Denoiser`.
        shape: [B, ...] batch for the run.
        steps: evaluations of the run.
    Returns:
        dict with t_spread (time where the batch spread of D, E||D - mean D||^2, grows fastest per unit
        log sigma), t_rate (the knee of log E||nu||^2 against log sigma: where its slope drops fastest,
        as the rate leaves the noise-dominated regime), and the arrays
        t [J], sigma [J], spread [J], rate [J] (evaluation order: high noise first).
    """
    sch = den.schedule
    grid = np.append(logsnr(steps, sch.sigma_min, sch.sigma_max), 0.0)
    spread = []

    def keep(info):
        d = info["denoised"].double().reshape(info["denoised"].shape[0], -1)
        spread.append(float((d - d.mean(0)).square().sum(1).mean()))

    out = sample(den, shape, grid=grid, solver="dpmpp_2m", seed=seed, backend=backend, callback=keep,
                 dtype=torch.float64)
    sig = grid[:-1]
    t = np.asarray(sch.sigma_to_t(sig), dtype=np.float64)
    rate = out.thermo.rate.double().mean(1).cpu().numpy()
    lam = -np.log(sig)
    mid = 0.5 * (lam[1:] + lam[:-1])
    g_spread = np.diff(np.asarray(spread)) / np.diff(lam)
    # the knee of log E||nu||^2 against lambda: the rate leaves its noise-dominated exponential regime
    slope = np.diff(np.log(np.maximum(rate, 1e-300))) / np.diff(lam)
    bend = -np.diff(slope) / np.diff(mid)
    t_of = lambda lm: float(sch.sigma_to_t(math.exp(-lm)))  # noqa: E731
    return {"t_spread": t_of(mid[int(np.argmax(g_spread))]), "t_rate": t_of(lam[1:-1][int(np.argmax(bend))]),
            "t": t, "sigma": sig, "spread": np.asarray(spread), "rate": rate}
