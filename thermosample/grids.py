"""Time-step grids: descending sigma_hat values ending in 0 (k-diffusion convention), float64 on host.

Names: "karras" (EDM, rho=7), "uniform" (uniform in physical t), "logsnr" (uniform in log sigma),
"kl_optimal" (uniform in atan sigma), or an explicit sequence/tensor of sigma values.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .schedules import Schedule
from .validate import check_int

GRIDS = ("karras", "uniform", "logsnr", "kl_optimal")
DEFAULT_STEPS = 20      # solver steps on a named grid when none are given (ts.sample, sample_to_disk)


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) Eq. 5: n sigmas from sigma_max to sigma_min, equally spaced in sigma^(1/rho)."""
    ramp = np.linspace(0.0, 1.0, n)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def logsnr(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """n sigmas equally spaced in log sigma (= equal steps of half-log-SNR; DPM-Solver's default)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """'KL-optimal' grid: sigma_i = tan((1 - i/(n-1)) atan(smax) + i/(n-1) atan(smin))."""
    ramp = np.linspace(0.0, 1.0, n)
    return np.tan((1 - ramp) * math.atan(sigma_max) + ramp * math.atan(sigma_min))


def uniform(n: int, schedule: Schedule) -> np.ndarray:
    """n sigmas at equally spaced physical times from t_max to t_min."""
    return np.asarray(schedule.sigma(np.linspace(schedule.t_max, schedule.t_min, n)), dtype=np.float64)


def make_grid(grid, steps: int | None, schedule: Schedule) -> np.ndarray:
    """The sigma grid [steps + 1] (descending, ending in 0) for a grid name, or a validated explicit grid.

    Args:
        grid: a name in GRIDS, or a 1-D sequence/tensor/array of descending sigma_hat values (k-diffusion
            `sigmas`); an explicit grid may end in 0 or in a positive sigma_min.
        steps: number of solver steps; None: DEFAULT_STEPS for a name, the explicit grid's own count
            (len(grid) - 1) otherwise, which a given steps must equal (ValueError, not silently ignored).
        schedule: supplies sigma_min / sigma_max and the time map for "uniform".
    """
    if isinstance(grid, str):
        steps = DEFAULT_STEPS if steps is None else steps
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS} or a tensor of sigmas, got {grid!r}")
        steps = check_int(steps, "steps")        # TypeError for a string or float, ValueError below 1
        smin, smax = schedule.sigma_min, schedule.sigma_max
        if steps == 1:
            sig = np.array([smax])
        elif grid == "karras":
            sig = karras(steps, smin, smax)
        elif grid == "logsnr":
            sig = logsnr(steps, smin, smax)
        elif grid == "kl_optimal":
            sig = kl_optimal(steps, smin, smax)
        else:
            sig = uniform(steps, schedule)
        return np.append(sig, 0.0)
    sig = validate_sigmas(grid)
    # An explicit grid must lie in the schedule's range, or the model would be asked about a noise level
    # whose time the schedule cannot map (sigma_to_t clamps); a small relative slack allows rounding.
    pos = sig[sig > 0]
    lo, hi = schedule.sigma_min * (1 - 1e-4), schedule.sigma_max * (1 + 1e-4)
    if pos.size and (pos.max() > hi or pos.min() < lo):
        raise ValueError(f"the grid's sigmas [{pos.min():.6g}, {pos.max():.6g}] leave the schedule's range "
                         f"[{schedule.sigma_min:.6g}, {schedule.sigma_max:.6g}] ({schedule!r}); "
                         "clip the grid or set the schedule's t_min/t_max")
    if steps is not None and steps != len(sig) - 1:
        raise ValueError(f"steps={steps!r} disagrees with the explicit grid, which has {len(sig) - 1} steps "
                         f"({len(sig)} sigmas); omit steps or pass steps={len(sig) - 1}")
    return sig


def validate_sigmas(grid) -> np.ndarray:
    """Check an explicit grid: 1-D, at least 2 values, finite, >= 0, strictly decreasing."""
    if hasattr(grid, "detach"):
        if grid.is_complex() or grid.dtype == torch.bool:
            raise TypeError(f"grid must hold real sigma values, got a tensor of {grid.dtype}")
        grid = grid.detach().cpu().double().numpy()
    if isinstance(grid, (bool, str, bytes)) or np.iscomplexobj(grid):
        raise TypeError(f"grid must be a name or a 1-D sequence of real sigma values, got {grid!r}")
    try:
        sig = np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"grid must be a name or a 1-D sequence of sigma values, got {type(grid).__name__}") from exc
    if sig.ndim != 1 or sig.size < 2:
        raise ValueError(f"an explicit grid must be 1-D with at least 2 sigmas, got shape {sig.shape}")
    if not np.all(np.isfinite(sig)):
        raise ValueError("the grid holds a non-finite sigma")
    if (sig < 0).any():
        raise ValueError("the grid holds a negative sigma")
    if not np.all(np.diff(sig) < 0):
        i = int(np.argmax(np.diff(sig) >= 0))
        raise ValueError(f"the grid must be strictly decreasing (sampling runs from high to low noise); "
                         f"sigma[{i}]={sig[i]:.6g} <= sigma[{i + 1}]={sig[i + 1]:.6g}")
    if sig[0] == 0:
        raise ValueError("the grid must start at a positive sigma")
    return sig


def sigmas_from_t(schedule: Schedule, t) -> np.ndarray:
    """Explicit sigma grid from descending physical times t (append 0.0 to end at the data)."""
    t = np.asarray(getattr(t, "cpu", lambda: t)(), dtype=np.float64)
    return np.asarray(schedule.sigma(t), dtype=np.float64)
