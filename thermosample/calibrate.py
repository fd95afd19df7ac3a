"""Time grids calibrated from a pilot run of the model itself (docs/theory.md §6).

`thermo_grid(den, steps, solver=...)` returns a `ThermoGrid`: a float64 numpy array of descending sigmas
ending in 0, with `.meta`, `.pilot` (reusable), `save(path)` / `ThermoGrid.load(path)`, that
`ts.sample(..., grid=...)` accepts like any explicit grid.

Default for deterministic solvers, method "select": measure instead of model. `reference` solves a pilot
batch to convergence (UniPC-3, 128 log-sigma steps), then `measure` runs the solver on karras and on the
calibrated "error" density below (any of CANDIDATES on request) and `prefer_default` keeps karras unless
the other lands clearly closer to the converged samples (below MARGIN x its error; solver="auto" compares
its candidates without the samples that every one sends far off, `compared_errors`). With
`boundary_pool=` the reference batch also holds the samples nearest a mode boundary out of a screened pool
(`boundary_noise`), with their stratum's weight. Its cost is stated in `grid.meta["calibration_nfe"]`.
The methods below are the candidates' densities (and the default for stochastic solvers, which have no
converged solution to compare with).

The pilot (`pilot`) integrates the probability-flow ODE once: DPM-Solver++(2M) on `pilot_steps` (24)
sigmas uniform in log sigma, `pilot_batch` (256) trajectories, each beside a twin started 1e-6 away in
the same model calls (the model sees 2B rows; NFE = pilot_steps), with its own `pilot_seed`, so the grid
never depends on the final run's seed. At every pilot node (lambda = -log sigma) it records

- the rate r = E||nu||^2 (the ThermoReport profile),
- the denoised estimates D [B, n], giving ||d^p D / dlambda^p|| by divided differences,
- the twins' separation: A(lambda) = sep_end / sep(lambda), the flow's amplification of an error,
- the batch spread S (RMS distance of the batch's x from their mean).

Step densities in lambda (`density`); `place` puts the grid at equal increments of their integral:

    "error" (default): rho_m ∝ (A_tot ||D^(p)||)^(1/(p+1)),   A_tot = A^a + s U S_end / S
    "length":          rho_m ∝ sqrt(r(t)) |dt/dlambda|        (equal thermodynamic length)
    "blend":           the mean of the two normalised densities
    rho = (1 - floor - c) smooth(rho_m) + c rho_crit + floor / span
    rho_crit ∝ sqrt(E||dD/dlambda||^2)                        (the critical-time density)

p is the solver's order (1 for Euler/DDIM, 2 for Heun and DPM-Solver++(2M)); U = 1 - F(lambda) is the
part of rho_crit still ahead (`critical_density`); S_end is the spread at the last pilot node.
Defaults, overridden by `floor=`, `critical=`, `switch=`, `amplify=`: floor 0.1 (0.35 for Heun),
c = `critical_weight(steps)` (0 for Heun), s = `switch_weight(steps)` (0 for "length"), a = 1. For Heun
the placed grid then moves halfway toward karras (`toward_karras`, `karras_weight=`).
`pilot_data=` reuses a pilot at no cost.

Why each term and constant, and the benchmark they were chosen on (benchmarks/bench_quality.py):
docs/calibration.md. Theory: docs/theory.md §5 (critical time) and §6 (grids).
"""
from __future__ import annotations

import copy
import json
import math
import numbers

import numpy as np
import torch

from .grids import logsnr, validate_sigmas
from .solvers import (
    AUTO_CHECK_MARGIN,
    AUTO_NAME,
    AUTO_NOISE_CUTS,
    AUTO_NOISE_FROM,
    AUTO_NOISE_MARGIN,
    AUTO_NOISE_ORDER,
    auto_candidates,
    auto_check,
    auto_fit,
    auto_noise_first,
    get_solver,
)

__all__ = ["ThermoGrid", "thermo_grid", "pilot", "twin_gain", "boundary_noise", "density", "critical_density",
           "critical_weight", "switch_weight", "place", "toward_karras", "karras_weight_default", "reference",
           "reference_nodes", "fit_corrections"]



class ThermoGrid(np.ndarray):
    """A calibrated sigma grid: descending float64 sigmas [steps + 1] ending in 0, plus metadata.

    Pass it as `grid=` to `ts.sample`; save with `grid.save(path)` (JSON) and reload with
    `ThermoGrid.load(path)` to reuse a calibration for a model.
    """

    def __new__(cls, sigmas, meta: dict | None = None):
        obj = np.asarray(validate_sigmas(sigmas), dtype=np.float64).view(cls)
        obj.meta = dict(meta or {})
        return obj

    def __array_finalize__(self, obj):
        self.meta = getattr(obj, "meta", {})

    @property
    def steps(self) -> int:
        """Number of solver steps the grid holds (len - 1)."""
        return int(self.shape[0]) - 1

    def save(self, path) -> str:
        """Write the grid and its calibration metadata as JSON; returns the path."""
        with open(path, "w") as f:
            json.dump({"format": "thermosample.ThermoGrid/1", "sigmas": [float(s) for s in np.asarray(self)],
                       "meta": self.meta}, f, indent=1)
        return str(path)

    @classmethod
    def load(cls, path) -> ThermoGrid:
        """Read a grid written by `save`."""
        with open(path) as f:
            blob = json.load(f)
        if not isinstance(blob, dict) or "sigmas" not in blob:
            raise ValueError(f"{path} is not a saved ThermoGrid (no 'sigmas')")
        return cls(np.asarray(blob["sigmas"], dtype=np.float64), blob.get("meta", {}))

    def __reduce__(self):  # pickle keeps the metadata
        return (ThermoGrid, (np.asarray(self).copy(), self.meta))

    def __repr__(self) -> str:
        body = ", ".join(f"{s:.4g}" for s in np.asarray(self))
        return f"ThermoGrid([{body}], method={self.meta.get('method')!r}, solver={self.meta.get('solver')!r})"


def pilot(den, shape, pilot_steps: int = 24, pilot_seed: int = 12345, solver: str = "dpmpp_2m",
          backend: str = "auto", sigmas=None, keep_dims: int = 1024) -> dict:
    """Run the pilot: `solver` on `pilot_steps` steps uniform in log sigma, batch shape [B, ...].

    Each trajectory runs beside a twin started 1e-6 (relative) away in the same model calls, so the model
    sees batches of 2B but the evaluation count is `pilot_steps`. `sigmas` overrides the pilot grid.

    Returns a dict of numpy arrays: sigma [J] (descending pilot noise levels, excluding 0), t [J] (their
    physical times), D [J, B, n] (denoised estimates, float64), rate [J] (batch-mean ||nu||^2 per
    evaluation, from the ThermoReport), log_sep [J, B] (log distance of each twin pair at each
    evaluation), spread [J] (RMS distance of the batch's x from their mean at each evaluation), and nfe
    (model evaluations spent). D keeps at most `keep_dims` fixed coordinates of each sample, scaled so
    that squared norms estimate the full ones (the densities use only such norms), which bounds its
    memory at J x B x keep_dims float64 for image-sized samples.
    """
    from .sampler import sample

    if isinstance(pilot_steps, bool) or not isinstance(pilot_steps, int) or pilot_steps < 4:
        raise ValueError(f"pilot_steps must be an int >= 4, got {pilot_steps!r}")
    sch = den.schedule
    if sigmas is None:
        sig = logsnr(pilot_steps, sch.sigma_min, sch.sigma_max)
    else:
        sig = np.asarray(sigmas, dtype=np.float64)
    grid = np.append(sig, 0.0)
    saved, sep, spread = [], [], []
    b = int(shape[0])
    dtype, device = pilot_dtype_device(den)
    g = torch.Generator().manual_seed(int(pilot_seed))
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    dz = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    coords, scale = _coordinates(int(np.prod(shape[1:])), keep_dims, g)
    x_t = (_with_twins(z, dz, dtype) * float(sig[0])).to(device=device, dtype=dtype)

    def keep(info):
        d = info["denoised"].detach().reshape(2 * b, -1)[:b]
        d = d if coords is None else d[:, coords.to(d.device)]
        x = info["x"].detach().double().reshape(2 * b, -1)   # on the model's device: only [B] norms move
        saved.append(d.double().cpu() * scale)
        sep.append(_log_separation(x, b))
        spread.append(float((x[:b] - x[:b].mean(0)).square().sum(1).mean().sqrt()))

    out = sample(den, noise=x_t, grid=grid, solver=solver, seed=pilot_seed, backend=backend, track=True,
                 callback=keep, progress=False)
    t_eval = out.thermo.t.numpy()
    rate = out.thermo.rate[:, :b].double().mean(1).cpu().numpy()
    t = np.asarray(sch.sigma_to_t(sig), dtype=np.float64)
    order = np.argsort(t_eval, kind="stable")
    r = np.interp(t, t_eval[order], rate[order])
    return {"sigma": sig, "t": t, "D": torch.stack(saved).numpy(), "rate": r, "nfe": out.nfe,
            "log_sep": torch.stack(sep).numpy(), "spread": np.asarray(spread)}


def _with_twins(z: torch.Tensor, dz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[2B, ...]: the B starting points z, then each one's twin z + dz with dz rescaled in place to RMS eps
    per coordinate. The twins ride in the same model calls (no extra evaluation), and their separation
    measures how the flow amplifies an error. In float32 (a float32 model) they start further apart
    (1e-3 rather than 1e-6), so that rounding does not swamp them."""
    eps = 1e-6 if dtype == torch.float64 else 1e-3
    b = z.shape[0]
    dz *= eps * math.sqrt(dz[0].numel()) / dz.reshape(b, -1).norm(dim=1).reshape((b,) + (1,) * (dz.dim() - 1))
    return torch.cat([z, z + dz])


def _log_separation(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B] log distance of each twin pair in x [2B, n] (trajectories, then their twins), on the CPU."""
    return (x[b:] - x[:b]).norm(dim=1).clamp_min(1e-300).log().cpu()


def twin_gain(den, z: torch.Tensor, pilot_steps: int = 24, pilot_seed: int = 12345, backend: str = "auto",
              chunk: int = 256) -> tuple[torch.Tensor, int]:
    """Per starting point z [N, ...] (unit variance, float64): the log growth of the separation of its
    trajectory and a twin started 1e-6 away (as in `pilot`: DPM-Solver++(2M) on `pilot_steps` steps uniform
    in log sigma), from the first evaluation to the last. Returns (scores [N] float64, the evaluations spent:
    pilot_steps per chunk of `chunk` starting points, each on 2 x chunk rows)."""
    from .sampler import sample

    sch = den.schedule
    dtype, device = pilot_dtype_device(den)
    grid = np.append(logsnr(pilot_steps, sch.sigma_min, sch.sigma_max), 0.0)
    g = torch.Generator().manual_seed(int(pilot_seed) + 4)       # the twins' offsets
    scores, nfe = [], 0
    for start in range(0, z.shape[0], chunk):
        zc = z[start:start + chunk].double()
        b = zc.shape[0]
        dz = torch.randn(zc.shape, generator=g, dtype=torch.float64)
        seps = []

        def record(info, b=b, seps=seps):
            x = info["x"].detach().double().reshape(2 * b, -1)
            seps.append(_log_separation(x, b))

        x_t = (_with_twins(zc, dz, dtype) * float(grid[0])).to(device=device, dtype=dtype)
        out = sample(den, noise=x_t, grid=grid, solver="dpmpp_2m", seed=int(pilot_seed), backend=backend,
                     track=False, callback=record, progress=False)
        nfe += out.nfe
        scores.append(torch.nan_to_num(seps[-1] - seps[0], nan=-math.inf))
    return torch.cat(scores), nfe


def boundary_noise(den, sample_shape, pool: int, keep: int, pilot_steps: int = 24, pilot_seed: int = 12345,
                   backend: str = "auto", chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The `keep` of `pool` standard-normal starting points whose ODE solutions depend most on where they
    start, by `twin_gain`. The largest gain marks trajectories that end near the boundary between two
    modes: the samples that a coarse grid sends to the other mode. They are rare (a few in 10,000 at 20
    steps on the benchmark's mixtures) and decide a large batch's RMS error, so a random pilot of a few
    hundred samples seldom holds one; `reference` adds these to its batch with their stratum's weight
    (docs/calibration.md §10).

    Returns (z [keep, *sample_shape] float64, their scores [keep] descending, the evaluations spent)."""
    g = torch.Generator().manual_seed(int(pilot_seed) + 3)     # not the pilot's or the reference's noise
    best_z = torch.empty((0, *tuple(sample_shape)), dtype=torch.float64)
    best_s = torch.empty(0, dtype=torch.float64)
    nfe = 0
    for start in range(0, pool, chunk):                         # a running top-k: the pool is never held
        z = torch.randn((min(chunk, pool - start), *tuple(sample_shape)), generator=g, dtype=torch.float64)
        score, spent = twin_gain(den, z, pilot_steps, pilot_seed + start, backend, chunk)
        nfe += spent
        top = torch.cat([best_s, score]).argsort(descending=True, stable=True)[:keep]
        best_z, best_s = torch.cat([best_z, z])[top], torch.cat([best_s, score])[top]
    return best_z, best_s, nfe


def _coordinates(n: int, keep_dims: int, g: torch.Generator):
    """(indices of keep_dims fixed coordinates out of n, or None for all; the factor sqrt(n / keep_dims)
    that makes squared norms over them estimate the full ones)."""
    if isinstance(keep_dims, bool) or not isinstance(keep_dims, int) or keep_dims < 1:
        raise ValueError(f"keep_dims must be an int >= 1, got {keep_dims!r}")
    if n <= keep_dims:
        return None, 1.0
    return torch.randperm(n, generator=g)[:keep_dims].sort().values, math.sqrt(n / keep_dims)


def _projection(n: int, m: int, seed: int) -> torch.Tensor:
    """[n, m] float32 random Gaussian directions scaled by 1 / sqrt(m), so that a projected vector's squared
    norm estimates the full one; unlike m sampled coordinates, it sees the few coordinates that carry most of
    the variance of image-like data (power-law spectra)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, m, generator=g, dtype=torch.float32) / math.sqrt(m)


def _project(v: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, m] float64: each flattened sample times `proj` (on v's device). In float64 because the
    fit compares projections of states that differ by far less than their norms."""
    return v.reshape(v.shape[0], -1).double() @ proj.to(device=v.device, dtype=torch.float64)


class _RowChunks:
    """A model that evaluates its input in slices of at most `rows` rows (keyword tensors with the same
    leading size are sliced alike), so a large pilot batch never reaches the model at once."""

    def __init__(self, model, rows: int):
        self.model, self.rows = model, int(rows)

    def __call__(self, x, t, **kwargs):
        n = x.shape[0]
        if n <= self.rows:
            return self.model(x, t, **kwargs)
        cut = lambda v, i: v[i:i + self.rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
        return torch.cat([self.model(x[i:i + self.rows], cut(t, i), **{k: cut(v, i) for k, v in kwargs.items()})
                          for i in range(0, n, self.rows)])

    def parameters(self):   # the model's dtype and device, as Denoiser.model_dtype and the pilot read them
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())


def _row_chunked(den, rows: int | None):
    """`den` with its model behind _RowChunks(rows) (a shallow copy; den itself is untouched); other
    denoiser types pass through whole."""
    from .denoiser import Denoiser

    if rows is None or type(den) is not Denoiser:   # a wrapper or subclass may hold the model elsewhere
        return den
    out = copy.copy(den)
    out.model = _RowChunks(den.model, rows)
    return out


def pilot_dtype_device(den) -> tuple[torch.dtype, torch.device]:
    """The state dtype and device of a pilot: the model's device; float64 unless the model has parameters
    of a narrower dtype (a float32 or half model gets a float32 state, as ts.sample gives it)."""
    params = getattr(getattr(den, "model", None), "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    if p is None:
        return torch.float64, torch.device("cpu")
    return (torch.float64 if p.dtype == torch.float64 else torch.float32), p.device


def _smooth(y: np.ndarray, passes: int = 1) -> np.ndarray:
    for _ in range(passes):
        y = np.concatenate([y[:1], 0.25 * y[:-2] + 0.5 * y[1:-1] + 0.25 * y[2:], y[-1:]]) if y.size > 2 else y
    return y


def _spread(p: dict, shape) -> np.ndarray | None:
    """The pilot's batch spread S [J], checked; None when the pilot has none or a zero one (B = 1)."""
    if "spread" not in p:
        return None
    s = np.asarray(p["spread"], dtype=np.float64)
    if s.shape != tuple(shape) or not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"pilot 'spread' must hold {shape[0]} finite values >= 0, got {p['spread']!r}")
    return s if np.all(s > 0) else None


def _weight(name: str, value, default: float) -> float:
    """A non-negative finite float argument (None gives the default); a clear error for anything else."""
    if value is None:
        return float(default)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.ndarray)) or np.ndim(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def critical_density(p: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """The pilot's critical-time density on its lambda nodes: rho_c ∝ sqrt(E_batch ||dD/dlambda||^2).

    The denoised estimate D moves fastest in lambda where the trajectories choose their mode (the
    speciation / critical time, docs/theory.md §5): before it D is near the data mean, after it near one
    mode. Normalised to integrate to 1; None when D does not move (e.g. Dirac data)."""
    lam = -np.log(p["sigma"])
    D = p["D"]  # [J, B, n]
    speed = np.sqrt(np.sum(np.diff(D, axis=0) ** 2, axis=2).mean(axis=1)) / np.diff(lam)
    b = _smooth(np.interp(lam, 0.5 * (lam[1:] + lam[:-1]), speed), 1)
    total = np.trapezoid(b, lam)
    if not np.isfinite(total) or total <= 1e-12 * max(float(np.abs(D).max()), 1e-300):
        return None
    return lam, b / total


def density(p: dict, schedule, method: str = "error", order: int = 2, floor: float = 0.35, passes: int = 4,
            stat: str = "rms", amplify: float = 1.0, critical: float = 0.0, switch: float = 0.0):
    """Step density on the pilot's lambda = -log sigma nodes, normalised to integrate to 1.

    Args:
        p: the pilot dict (see `pilot`).
        schedule: the model's Schedule (for dt/dlambda in the thermodynamic length).
        method: "error" (equidistributed global error: local error of order `order` times the pilot's
            amplification factor), "length" (equal thermodynamic length) or "blend" (the mean of the two).
        order: solver order p (1 or 2) for method="error" / "blend".
        floor: weight of a uniform-in-lambda density mixed in (0 = none).
        passes: smoothing passes (1-2-1 filter over the pilot nodes) before the floor is mixed in.
        stat: "rms" or "max" over the batch of ||D^(p)||.
        amplify: exponent a of the twins' amplification factor A(lambda)^a in the error density (0: A ≡ 1).
        switch: weight s of the mode-switch amplification s U(lambda) S_end / S(lambda) added to A^a (see
            the module docstring; 0 = none, and none when D does not move, or the pilot has no "spread" or
            a zero spread, as a single-trajectory pilot does). Used by "error" and "blend".
        critical: weight of the critical-time density (`critical_density`) mixed in beside the floor, so
            that rho = (1 - floor - critical) rho_method + critical rho_crit + floor / span (its weight
            goes to rho_method when D does not move).
    Returns:
        (lam [J] ascending, rho [J]) with the trapezoid integral of rho over lam equal to 1.
    """
    lam = -np.log(p["sigma"])  # ascending (sigma descends)
    # one critical density for both of its uses: the switch term's U and the critical-time mixture
    crit = critical_density(p) if critical > 0 or (switch > 0 and method == "error") else None
    if method == "blend":
        _, a = density(p, schedule, "length", order, floor=0.0, passes=0)
        _, b = density(p, schedule, "error", order, floor=0.0, passes=0, stat=stat, amplify=amplify,
                       switch=switch)
        w = 0.5 * (a + b)
    elif method == "length":
        dt_dlam = np.abs(np.gradient(p["t"], lam))
        w = np.sqrt(np.maximum(p["rate"], 0.0)) * dt_dlam
    elif method == "error":
        D = p["D"]  # [J, B, n]
        deriv, x = D, lam
        for _ in range(order):  # divided differences along lambda, per sample
            dx = np.diff(x)
            deriv = np.diff(deriv, axis=0) / dx[:, None, None]
            x = 0.5 * (x[1:] + x[:-1])
        per = np.sqrt(np.sum(deriv ** 2, axis=2))  # [J', B] ||D^(p)|| per sample
        mag = np.sqrt(np.mean(per ** 2, axis=1)) if stat == "rms" else np.max(per, axis=1)
        w = np.interp(lam, x, mag)
        amp = np.ones_like(lam)
        if amplify and "log_sep" in p:
            # error made at lambda_j reaches the output multiplied by sep_end / sep_j (batch geometric mean)
            ls = p["log_sep"]
            amp = np.exp(np.clip(np.mean(ls[-1] - ls, axis=1), -50, 50)) ** amplify
        spread = _spread(p, lam.shape) if switch > 0 else None
        if spread is not None and crit is not None:
            # ... or sends the trajectory to another mode, while the mode is still to be chosen
            c = crit[1]
            decided = np.concatenate([[0.0], np.cumsum(0.5 * (c[1:] + c[:-1]) * np.diff(lam))])
            amp = amp + switch * (1.0 - decided / decided[-1]) * spread[-1] / spread
        w = w * amp
        w = w ** (1.0 / (order + 1))
    else:
        raise ValueError(f"method must be 'blend', 'error' or 'length', got {method!r}")
    w = _smooth(np.maximum(w, 0.0), passes)
    w = w / max(np.trapezoid(w, lam), 1e-300)
    span = lam[-1] - lam[0]
    rho = (1 - floor) * w + floor / span
    if critical > 0 and crit is not None:
        rho = rho - critical * w + critical * crit[1]
    return lam, rho / np.trapezoid(rho, lam)


def place(lam: np.ndarray, rho: np.ndarray, n: int) -> np.ndarray:
    """n lambda values (ascending, first and last at the ends) at equal increments of the integral of rho."""
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(lam))])
    cum /= cum[-1]
    return np.interp(np.linspace(0.0, 1.0, n), cum, lam)


def toward_karras(sig: np.ndarray, schedule, weight: float) -> np.ndarray:
    """The positive sigmas `sig` [steps] moved toward karras's grid of as many steps: node by node
    sigma_i = karras_i^weight * sig_i^(1 - weight) (0 leaves sig, 1 gives karras; the ends are shared)."""
    if weight == 0.0 or len(sig) < 2:
        return sig
    from .grids import make_grid

    karras = make_grid("karras", len(sig), schedule)[:-1]
    return np.exp(weight * np.log(karras) + (1.0 - weight) * np.log(sig))


def karras_weight_default(solver: str) -> float:
    """Default `karras_weight` of a calibrated grid: 0.5 for Heun and DEIS, 0 otherwise. Their error models
    are the least faithful (the density's local error is that of an exponential integrator in log sigma;
    Heun is a trapezoid rule in sigma, DEIS integrates the noise prediction in sigma). On the default
    benchmark problems the "error" grid cut Heun's median error but mostly sent more samples to another
    mode than karras (7 of 9 problems at 19 evaluations), and halfway between the two beat the pure grid
    in 7, 8 and 7 of 9 problems at 9, 19 and 49 evaluations (docs/calibration.md §8). For DEIS-2 and DEIS-3
    on 30 tuning mixtures at 6, 10 and 20 steps, the pure grid, chosen over karras on the pilot, was worse
    than karras beyond the interval in 2 of 180 cases and better in 9; halfway, in 0 and 13 (§18)."""
    return 0.5 if solver in ("heun", "deis") else 0.0


def critical_weight(steps: int) -> float:
    """Default weight of the critical-time density for `steps` steps: min(3 / steps, 0.3 (steps - 6) / 4),
    clipped at 0. From 10 steps on this gives the critical time about three steps' worth of density
    (0.3 at 10 steps, 0.15 at 20, 0.06 at 50); below 10 steps the weight ramps down to 0 at 6, where the
    grid cannot spare steps from the rest of the path (measured on benchmarks/bench_quality.py)."""
    if steps <= 6:
        return 0.0
    return float(min(3.0 / steps, 0.3 * (steps - 6) / 4.0))


def switch_weight(steps: int) -> float:
    """Default weight s of the mode-switch amplification for `steps` steps: (steps - 6) / 14 clipped to
    [0, 1]: 0 at 6 steps and below, 0.29 at 10, 1 from 20 on. With few steps the grid needs them along the
    whole path; with many, the rare samples that a step at high noise sends to another mode dominate the
    RMS error (measured on benchmarks/bench_quality.py)."""
    return float(min(1.0, max(0.0, (steps - 6) / 14.0)))


# --------------------------------------------------------------------------------------------------
# Selection by measured error (method="select", the default for deterministic solvers)
# --------------------------------------------------------------------------------------------------
CANDIDATES = ("karras", "logsnr", "kl_optimal", "uniform", "jump", "length", "error")
# What thermo_grid measures by default: karras (the default) against the calibrated error density. The
# pilot's samples rarely contain the few samples that dominate a large batch's RMS error (those an early
# error sends to another mode), so the smallest of many pilot errors is often a candidate that only
# suited the pilot. Hence few candidates, and the first (the default) is left only when another measures
# below MARGIN times its error (docs/calibration.md §7). margin=1 in thermo_grid keeps the plain minimum.
DEFAULT_CANDIDATES = ("karras", "error")
MARGIN = 0.6
# Samples per pilot (twins pilot, reference and candidate runs). 32 was too few: a grid that sends 0.1-1 %
# of samples to another mode costs 3-40x karras's RMS error on a large batch, and 32 samples hold none of
# them; with 256 the twins also see the rare trajectories that decide the grid (docs/calibration.md §8).
PILOT_BATCH = 256
# The reference batch's screened stratum (`reference`, `boundary_noise`), off by default: boundary_pool=4096
# adds the 64 of 4096 twin-screened starting points whose solutions end nearest a mode boundary. On the
# benchmark's problems the samples a coarse grid sends to another mode ranked in the top 1 % of that score,
# but at the switch rates that matter (1-5 in 10,000 samples) 64 screened samples still decide between
# candidates by one or two switches, and the benchmark did not measure a gain (docs/calibration.md §10).
BOUNDARY_POOL = 0
BOUNDARY_SAMPLES = 64


# A pilot sample that every candidate misses by more than SHARED_OUTLIER times the batch's median such miss
# (per-sample RMS distance) is one they all send to another mode. It adds about the same to every
# candidate's error, so it says nothing about which is better, yet one such sample in 256 can carry most of
# each candidate's RMS error and pull their ratio to 1, which keeps the default whatever the rest shows
# (fresh d1024 at 10 steps: pilot errors 0.095 and 0.091 with it, bulk errors 3.4x apart on 8192 samples).
# So solver="auto" compares its candidates without those samples (docs/calibration.md §11). 100, not 10: at
# 10 the heavy tail of a low-dimensional problem's ordinary errors at 6-10 steps was cut too. The single-solver
# choice between karras and "error" keeps all samples: there the bulk error favours "error" more often than
# its switched samples allow, and the rule's point is never to be worse than karras (bench_selection.py:
# 0.5-1.7 expected choices worse than karras of 468 with the comparison, 0.4 without; default d8 narrow, DEIS-3
# at 20 steps: 8 switched samples of 8192 against karras's 7, 1.09 x).
SHARED_OUTLIER = 100.0


def shared_outliers(sq) -> np.ndarray:
    """[B] bool: the samples that every candidate misses by more than SHARED_OUTLIER times the median over
    the batch of the smallest miss. sq: [C, B] per-sample squared errors (mean over coordinates)."""
    miss = np.sqrt(np.nan_to_num(np.asarray(sq, dtype=np.float64), nan=np.inf)).min(0)
    finite = miss[np.isfinite(miss)]
    scale = float(np.median(finite)) if finite.size else 0.0
    if not scale > 0.0:         # no typical miss to measure against (all diverged, or most samples exact)
        return np.zeros(miss.shape, dtype=bool)
    return miss > SHARED_OUTLIER * scale


def compared_errors(sq, weight=None) -> tuple[np.ndarray, np.ndarray]:
    """(RMS errors [C], the same without `shared_outliers` [C]) of [C, B] per-sample squared errors, each
    sample weighted by `weight` [B] (uniform by default)."""
    sq = np.nan_to_num(np.asarray(sq, dtype=np.float64), nan=np.inf)
    w = np.full(sq.shape[1], 1.0 / sq.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    keep = ~shared_outliers(sq)

    def rms(m):
        with np.errstate(invalid="ignore"):
            return np.sqrt((sq[:, m] * w[m]).sum(1) / w[m].sum())
    return rms(np.ones_like(keep)), rms(keep)


def prefer_default(errors: list[float], margin: float = MARGIN, compared: list[float] | None = None) -> int:
    """Index of the chosen candidate: 0 (the default) unless the smallest error of the others is below
    `margin` times the default's (ties go to the earlier candidate). With `compared` (the errors without
    the samples every candidate misses, `compared_errors`), the margin applies to those, and the choice
    must also be no worse than the default on the whole batch."""
    if compared is None:
        compared = errors
    best = min(range(len(compared)), key=lambda k: (compared[k], k))
    return best if compared[best] < margin * compared[0] and errors[best] <= errors[0] else 0


def reference(den, shape, ref_steps: int = 128, pilot_seed: int = 12345, backend: str = "auto",
              keep_dims: int | None = None, boundary_pool: int = BOUNDARY_POOL,
              boundary_samples: int = BOUNDARY_SAMPLES, pilot_steps: int = 24) -> dict:
    """A converged reference solve of the pilot batch: UniPC of order 3 on `ref_steps` sigmas uniform in
    log sigma (NFE = ref_steps), from noise of its own seed. Third order because the reference must be far
    more accurate than the candidates it ranks: DPM-Solver++(2M) on 128 steps was off by 1e-4 to 1e-3
    (RMS) on the benchmark's mixtures, as much as a good 20-step solver, and UniPC-3 by 10-50x less.

    With boundary_pool > 0 the batch also holds the `boundary_samples` of `boundary_pool` screened starting
    points nearest a mode boundary (`boundary_noise`, pilot_steps evaluations per chunk of the pool), and
    every sample gets a weight: a stratified estimate of the population's mean, with the screened stratum
    (the top boundary_samples / boundary_pool) weighted by that fraction and the random samples by the rest.
    Errors measured on the batch (`measure`, `jump_grid`) then count the rare samples that a coarse grid
    sends to another mode at their true rate, instead of by luck of the draw.

    Returns a dict: ref_sigma [N] (its positive sigmas), ref_t [N], ref_rate [N] (weighted batch mean of
    E||nu||^2 at each node), ref_x / ref_D [N, B', m] float32 (the state and denoised estimate at each
    node, on at most `keep_dims` fixed coordinates of each sample, scaled so that squared norms estimate
    the full ones; None: 1024, fewer for large batches so that each holds at most 4M numbers, and at least
    64), ref_noise [B', ...] (the initial state), ref_final [B', ...] (the converged samples), ref_weight
    [B'] float64 (summing to 1), ref_nfe, ref_screen_nfe, ref_boundary (screened samples kept, pool),
    ref_proj [N, B', m] float64 (the state at each node projected on m random directions, `_projection`;
    None when ref_x holds every coordinate), ref_proj_seed; B' = B + the screened samples.
    """
    from .sampler import sample

    if isinstance(ref_steps, bool) or not isinstance(ref_steps, int) or ref_steps < 8:
        raise ValueError(f"ref_steps must be an int >= 8, got {ref_steps!r}")
    _check_boundary(boundary_pool, boundary_samples)
    sch = den.schedule
    dtype, device = pilot_dtype_device(den)
    b = int(shape[0])
    n = int(np.prod(shape[1:]))
    g = torch.Generator().manual_seed(int(pilot_seed) + 1)   # not the twins pilot's noise
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    weight = torch.full((b,), 1.0 / b, dtype=torch.float64)
    screen_nfe = 0
    k = _screen(boundary_pool, boundary_samples)[0]
    if k > 0:
        zb, _, screen_nfe = boundary_noise(den, tuple(shape[1:]), boundary_pool, k, pilot_steps=pilot_steps,
                                           pilot_seed=pilot_seed, backend=backend)
        w = k / boundary_pool                                 # the screened stratum's share of the population
        z = torch.cat([z, zb])
        weight = torch.cat([weight * (1.0 - w), torch.full((k,), w / k, dtype=torch.float64)])
        b += k
    if keep_dims is None:
        keep_dims = min(1024, max(64, (1 << 22) // (ref_steps * b)))
    keep, scale = _coordinates(n, keep_dims, torch.Generator().manual_seed(int(pilot_seed) + 2))
    sig = logsnr(ref_steps, sch.sigma_min, sch.sigma_max)
    x_t = (z * float(sig[0])).to(device=device, dtype=dtype)
    xs, ds = [], []

    proj, ps = None if keep is None else _projection(n, len(keep), int(pilot_seed) + 3), []

    def record(info):
        for src, dst in ((info["x"], xs), (info["denoised"], ds)):
            v = src.detach().reshape(b, -1)
            v = v if keep is None else v[:, keep.to(v.device)]
            dst.append((v.double() * scale).float().cpu())
        if proj is not None:
            ps.append(_project(info["x"].detach(), proj).cpu())

    out = sample(den, noise=x_t, grid=np.append(sig, 0.0), solver="unipc", order=3, seed=int(pilot_seed),
                 backend=backend, track=True, callback=record, progress=False)
    rate = (out.thermo.rate.double().cpu() * weight).sum(1).numpy()
    return {"ref_sigma": sig, "ref_t": np.asarray(sch.sigma_to_t(sig), dtype=np.float64), "ref_rate": rate,
            "ref_x": torch.stack(xs), "ref_D": torch.stack(ds), "ref_noise": x_t.cpu(),
            "ref_final": out.samples.cpu(), "ref_weight": weight, "ref_nfe": out.nfe,
            "ref_screen_nfe": int(screen_nfe), "ref_boundary": _screen(boundary_pool, boundary_samples),
            "ref_proj": None if keep is None else torch.stack(ps), "ref_proj_seed": int(pilot_seed) + 3}


def _check_boundary(pool, samples) -> None:
    for name, v in (("boundary_pool", pool), ("boundary_samples", samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def _screen(pool: int, samples: int) -> tuple[int, int]:
    """(screened samples kept, pool) that `reference` records as ref_boundary for these sizes."""
    k = min(samples, pool)
    return (k, pool) if k > 0 else (0, 0)


def _screen_of(ref: dict) -> tuple[int, int]:
    """The ref_boundary of a reference dict ((0, 0) for one made before the screen existed)."""
    return tuple(int(v) for v in ref.get("ref_boundary", (0, 0)))


def _ref_weight(ref: dict, b: int) -> torch.Tensor:
    """The reference batch's B sample weights, float64 summing to 1 (uniform for a reference without them)."""
    w = ref.get("ref_weight")
    if w is None:
        return torch.full((b,), 1.0 / b, dtype=torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64)
    if w.shape != (b,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"pilot 'ref_weight' must hold {b} finite weights >= 0")
    return w / w.sum()


def jump_grid(ref: dict, steps: int, free_end: bool = True) -> np.ndarray:
    """The `steps` positive sigmas (from the reference's nodes) whose one-step jumps stay closest to the
    reference trajectory: a jump from node j to node k is a DDIM/Euler step from the reference state with
    the reference D, costing E||x_jump - x_ref(k)||^2; dynamic programming minimises the sum over the
    steps - 1 jumps from sigma_max (Chen et al., ICML 2024, "On the trajectory regularity of ODE-based
    diffusion sampling"). Uses no model evaluation.

    free_end=True (default) also prices the sampler's last step, the Euler jump from the last node to
    sigma 0, which returns D there: E||D_ref(j) - D_ref(sigma_min)||^2. The path may then end above
    sigma_min, where D is already close to the output: an evaluation at sigma_min (where D is nearly x)
    is better spent higher up. free_end=False ends at sigma_min."""
    sig = ref["ref_sigma"]
    x, d = ref["ref_x"].double(), ref["ref_D"].double()
    w = _ref_weight(ref, x.shape[1])                # the batch mean of a squared distance: (.. * w).sum(-1)
    n = len(sig)
    if steps == 1:
        return sig[:1].copy()
    if steps >= n:
        return sig.copy()
    # the price of ending at each node: its jump to 0 (free end), or only sigma_min allowed
    if free_end:
        stop = ((d - d[-1]).square().sum(-1) * w).sum(-1).numpy()
    else:
        stop = np.where(np.arange(n) == n - 1, 0.0, np.inf)
    cost = np.full((n, n), np.inf)
    for j in range(n - 1):
        r = torch.as_tensor(sig[j + 1:] / sig[j], dtype=torch.float64)[:, None, None]
        jump = r * x[j] + (1.0 - r) * d[j]
        cost[j, j + 1:] = ((jump - x[j + 1:]).square().sum(-1) * w).sum(-1).numpy()
    best = np.full(n, np.inf)
    best[0] = 0.0
    back = []
    for _ in range(steps - 1):                     # best[k]: cheapest path to node k with this many jumps
        total = best[:, None] + cost
        back.append(np.argmin(total, axis=0))
        best = total[back[-1], np.arange(n)]
    path = [int(np.argmin(best + stop))]           # the last node, with the price of its jump to 0
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return sig[np.asarray(path[::-1])]


def _error_defaults(solver: str, steps: int) -> dict:
    """The "error" grid's default weights for `solver` with `steps` steps (one rule for method "error" and
    for the "select" candidate): floor 0.1 (0.35 for Heun), critical_weight(steps) (0 for Heun),
    switch_weight(steps), amplify 1, karras_weight_default(solver)."""
    heun = solver == "heun"
    return {"floor": 0.35 if heun else 0.1, "critical": 0.0 if heun else critical_weight(steps),
            "switch": switch_weight(steps), "amplify": 1.0, "karras_weight": karras_weight_default(solver)}


def _place_sigmas(lam: np.ndarray, rho: np.ndarray, steps: int, schedule, karras_weight: float) -> np.ndarray:
    """`steps` positive sigmas at equal increments of the density, ends pinned to the schedule's range,
    then moved `karras_weight` of the way toward karras (`toward_karras`)."""
    sig = np.exp(-place(lam, rho, steps))
    sig[0], sig[-1] = schedule.sigma_max, schedule.sigma_min
    return toward_karras(sig, schedule, karras_weight)


def _candidate(name: str, den, steps: int, solver: str, ref: dict, pilot_data: dict | None, order: int,
               density_kw: dict | None = None):
    """Positive sigmas [steps] of candidate grid `name`; density_kw (floor, critical, switch, amplify,
    karras_weight) overrides the "error" grid's defaults for `solver` and `steps`."""
    from . import grids
    sch = den.schedule
    if name in grids.GRIDS:
        return grids.make_grid(name, steps, sch)[:-1]
    if name == "jump":
        return jump_grid(ref, steps)
    if name == "length":
        p = {"sigma": ref["ref_sigma"], "t": ref["ref_t"], "rate": ref["ref_rate"]}
        lam, rho = density(p, sch, method="length", floor=0.1)
        return _place_sigmas(lam, rho, steps, sch, 0.0)
    if name == "error":
        kw = {**_error_defaults(solver, steps), **(density_kw or {})}
        weight = kw.pop("karras_weight")
        lam, rho = density(pilot_data, sch, method="error", order=order, **kw)
        return _place_sigmas(lam, rho, steps, sch, weight)
    raise ValueError(f"candidates must name grids in {CANDIDATES}, got {name!r}")


def measure(den, steps: int, solver: str, ref: dict, pilot_data: dict | None = None,
            candidates=DEFAULT_CANDIDATES, backend: str = "auto", solver_options: dict | None = None,
            density_kw: dict | None = None) -> dict[str, tuple[float, np.ndarray]]:
    """Run `solver` with `steps` steps on each candidate grid from the reference's noise: {candidate: (RMS
    distance of its samples from the reference's converged ones, weighted by the reference's sample
    weights, positive sigmas [steps])}, in candidate order (only the first for a single step). Costs
    len(result) x NFE model evaluations on the pilot batch.
    density_kw: floor / critical / switch / amplify / karras_weight of the "error" candidate (default:
    `_error_defaults(solver, steps)`)."""
    return {k: (e, sig) for k, (e, sig, _) in _measure(den, steps, solver, ref, pilot_data, candidates, backend,
                                                       solver_options, density_kw).items()}


def _measure(den, steps, solver, ref, pilot_data, candidates, backend, solver_options, density_kw):
    """`measure`, each value with the per-sample squared errors [B] (float64 numpy) after the sigmas."""
    order = get_solver(solver).order
    result = {}
    for name in candidates:
        if steps == 1 and name != candidates[0]:
            continue
        sig = _candidate(name, den, steps, solver, ref, pilot_data, order, density_kw)
        result[name] = _pilot_error(den, sig, solver, ref, backend, solver_options)
    return result


def _pilot_error(den, sig, solver, ref, backend, solver_options):
    """(weighted RMS distance from the reference's converged samples, sig, per-sample squared errors [B]) of
    `solver` on positive sigmas `sig` from the reference's noise."""
    from .sampler import sample

    target = ref["ref_final"].double()
    weight = _ref_weight(ref, target.shape[0])
    out = sample(den, noise=ref["ref_noise"], grid=np.append(sig, 0.0), solver=solver, backend=backend,
                 track=False, progress=False, **(solver_options or {}))
    sq = (out.samples.cpu().double() - target).reshape(len(weight), -1).square().mean(1)
    err = float((sq * weight).sum().sqrt())
    return err if math.isfinite(err) else math.inf, sig, sq.numpy()


# fit_corrections prices the rounding of a run's inputs (relative error FIT_ROUNDING x float32's eps, or the
# model dtype's if coarser) next to the fit's squared error: 10, not 1, because later steps amplify it.
FIT_ROUNDING = 10.0


def reference_nodes(sig, ref: dict) -> np.ndarray | None:
    """Positive sigmas `sig` moved to the nearest nodes (in log sigma) of the reference trajectory, whose
    states the pilot recorded; None where two would land on one node."""
    nodes = np.asarray(ref["ref_sigma"], dtype=np.float64)
    idx = np.abs(np.log(np.asarray(sig, dtype=np.float64))[:, None] - np.log(nodes)[None]).argmin(1)
    return nodes[idx] if bool((np.diff(idx) > 0).all()) else None


def fit_corrections(den, sig, ref: dict, rows, backend: str = "auto") -> list[list[float]] | None:
    """deis's `corrections` for order 3 on the reference nodes `sig` (positive sigmas; `reference_nodes`),
    fitted on the reference's samples `rows` (indices): from their noise, step by step, the coefficients of
    `solvers.correction_terms` that move the DEIS-3 update closest, in least squares on the reference's
    recorded coordinates (or projections, ref_proj) weighted by ref_weight, to the reference's state at the
    next node (its converged sample on the step to 0), plus the rounding a float32 run would add through
    the coefficients (FIT_ROUNDING). Aiming each step back at the converged trajectory, it corrects the error
    carried from the steps before as well as the step's own. Costs len(sig) evaluations of those rows.
    Returns one list of floats per step, or None if the reference lacks what the fit needs (ref_proj, or
    nodes at `sig`) or the fit is not finite."""
    from .solvers import correction_terms, deis_terms

    nodes = np.asarray(ref["ref_sigma"], dtype=np.float64)
    idx = [int(np.argmin(np.abs(nodes - v))) for v in sig]
    if "ref_proj" not in ref or not np.allclose(nodes[idx], sig, rtol=1e-9, atol=0.0):
        return None
    rows = torch.as_tensor(rows, dtype=torch.long)
    dtype, device = pilot_dtype_device(den)
    x = ref["ref_noise"][rows].to(device=device, dtype=dtype)
    b = x.shape[0]
    states = ref["ref_x"] if ref["ref_proj"] is None else ref["ref_proj"]     # every coordinate, or projected
    proj = None if ref["ref_proj"] is None else _projection(x[0].numel(), states.shape[-1], ref["ref_proj_seed"])
    root_w = _ref_weight(ref, states.shape[1])[rows]
    root_w = (root_w / root_w.sum()).sqrt()[:, None]

    # a float32 run's relative rounding of its inputs (the model's own, if coarser): FIT_ROUNDING x its eps
    rounding = FIT_ROUNDING * max(torch.finfo(torch.float32).eps, torch.finfo(dtype).eps)

    def coords(v):   # [b, ...] -> as the reference recorded it, float64 on the host, weighted
        return (v.reshape(b, -1) if proj is None else _project(v, proj)).double().cpu() * root_w

    s = [float(v) for v in sig] + [0.0]
    kept, fitted = [], []
    for i in range(len(sig)):
        d = den(x, s[i])
        kept = ([(x, d)] + kept)[:3]
        sigmas = s[max(0, i - 2):i + 1][::-1]
        base_terms = deis_terms(i, len(sig), sigmas, s[i + 1], 3)
        basis_terms = correction_terms(sigmas, s[i + 1])
        base = _combine(kept, base_terms)
        basis = [_combine(kept, t) for t in basis_terms]
        if not basis:
            fitted.append([])
            x = base
            continue
        goal = (coords(ref["ref_final"][rows].to(device)) if s[i + 1] == 0
                else states[idx[i + 1]][rows].double() * root_w)
        a = torch.stack([coords(v) for v in basis], -1).reshape(-1, len(basis))
        # least squares plus the rounding a run adds: each input x_j, D_j of the fused update carries a
        # relative error of about `rounding`, which its coefficient scales. Without this term, where the
        # differences are far below the state (D at high noise), the fit's coefficients reached 1e3-1e9,
        # exact in float64 and 200 x the error in a float32 run (tests/test_fitted_corrections.py).
        sizes = [(coords(xj).square().sum(), coords(dj).square().sum()) for xj, dj in kept]
        bx = torch.tensor([[t[j][0] for j in range(len(kept))] for t in basis_terms], dtype=torch.float64)
        bd = torch.tensor([[t[j][1] for j in range(len(kept))] for t in basis_terms], dtype=torch.float64)
        nx = torch.stack([v[0] for v in sizes]) * rounding ** 2
        nd = torch.stack([v[1] for v in sizes]) * rounding ** 2
        gram = a.T @ a + (bx * nx) @ bx.T + (bd * nd) @ bd.T
        base_x = torch.tensor([t[0] for t in base_terms], dtype=torch.float64)
        base_d = torch.tensor([t[1] for t in base_terms], dtype=torch.float64)
        rhs = a.T @ (goal - coords(base)).reshape(-1) - bx @ (base_x * nx) - bd @ (base_d * nd)
        c = torch.linalg.solve(gram, rhs)
        if not bool(torch.isfinite(c).all()):
            return None
        fitted.append([float(v) for v in c])
        x = base + sum(float(v) * u for v, u in zip(c, basis))
    return fitted


def _combine(kept, terms) -> torch.Tensor:
    """sum_j c_x,j x_j + c_D,j D_j over the kept (x_j, D_j), newest first, and terms [(c_x, c_D)]."""
    return sum(cx * xj + cd * dj for (xj, dj), (cx, cd) in zip(kept, terms))


def data_scale(ref: dict) -> float:
    """The data's scale: the RMS per coordinate of the reference's converged samples (weighted)."""
    final = ref["ref_final"].double()
    weight = _ref_weight(ref, final.shape[0])
    return float((final.reshape(len(weight), -1).square().mean(1) * weight).sum().sqrt())


def _noise_tail(den, steps, solver, options, sig, err, sq, ref, backend, margin):
    """solver="auto"'s last stage (AUTO_NOISE_FROM steps on, UniPC): the chosen run (pilot error `err`,
    per-sample squared errors `sq`) against the same with noise_below = each of AUTO_NOISE_CUTS times
    `data_scale` and noise_order = AUTO_NOISE_ORDER; the first is kept unless another is below
    max(`margin`, AUTO_NOISE_MARGIN) times its error on the samples they do not all miss. Returns (options,
    {noise_below: pilot error}, model evaluations spent, the kept run's pilot error and per-sample errors)."""
    cuts = [c * data_scale(ref) for c in AUTO_NOISE_CUTS]
    tail = [{**options, "noise_below": c, "noise_order": AUTO_NOISE_ORDER} for c in cuts]
    runs = [_pilot_error(den, sig, solver, ref, backend, opts) for opts in tail]
    weight = _ref_weight(ref, len(sq))
    # a cut changes only the steps after the modes are chosen, so the pilot ranks it reliably (solvers.py)
    best, _, _ = _choose(np.stack([sq] + [r[2] for r in runs]), weight, max(margin, AUTO_NOISE_MARGIN),
                         shared=True)
    chosen = dict(options) if best == 0 else tail[best - 1]
    errors = {"off": err}
    errors.update({f"{c:.4g}": r[0] for c, r in zip(cuts, runs)})
    kept = (err, sq) if best == 0 else runs[best - 1][::2]
    return chosen, errors, len(cuts) * get_solver(solver).evaluations(int(steps)), *kept


def _check(den, steps, check, choice, ref, backend, density_kw, margin):
    """solver="auto"'s check (solvers.AUTO_CHECK): `choice` = (solver, options, grid name, sigmas, pilot error,
    per-sample squared errors) against the (solver, options, grid) `check` on the pilot; the check replaces
    the choice if `check_prefers` it with margin max(`margin`, AUTO_CHECK_MARGIN). Returns the kept six,
    {label: pilot error} of both, and the model evaluations spent."""
    name, opts, g = check
    err, sig, sq = _measure(den, int(steps), name, ref, None, (g,), backend, opts, density_kw)[g]
    take = check_prefers(np.stack([choice[5], sq]), _ref_weight(ref, len(sq)), max(margin, AUTO_CHECK_MARGIN))
    labels = [_auto_label(*choice[:3]), _auto_label(*check)]
    kept = (name, dict(opts), g, sig, err, sq) if take else choice
    return (*kept, {labels[0]: choice[4], labels[1]: err}, get_solver(name).evaluations(int(steps)))


def _fit_check(den, steps, choice, ref, backend, margin):
    """solver="auto"'s fitted check (solvers.AUTO_FIT): DEIS-3 with corrections (`fit_corrections`) on the
    choice's grid moved to the reference's nodes (`reference_nodes`), fitted on the pilot's even samples and
    measured on its odd ones against `choice` = (solver, options, grid name, sigmas, per-sample squared errors
    [B]) there; taken if `check_prefers` it with margin max(`margin`, AUTO_CHECK_MARGIN). Returns the kept
    (solver, options, grid name, sigmas), {label: RMS error on the odd samples} (empty if it could not fit)
    and the evaluations spent (the fit and the check each one run of half the batch: 2 x NFE, counted as
    whole ones)."""
    sig = reference_nodes(choice[3], ref)
    b = len(choice[4])
    even, odd = np.arange(0, b, 2), np.arange(1, b, 2)
    corrections = fit_corrections(den, sig, ref, even, backend) if sig is not None and len(odd) else None
    if corrections is None:
        return choice[:4], {}, 0 if sig is None else int(steps)
    weight = _ref_weight(ref, b)[odd]
    # in float32, as a run from float32 noise computes: a fit that only a float64 run reproduces is refused
    half = {"ref_noise": ref["ref_noise"][odd].float(), "ref_final": ref["ref_final"][odd], "ref_weight": weight}
    options = {"corrections": corrections}
    err, _, sq = _pilot_error(den, sig, "deis", half, backend, options)
    choice_sq = np.asarray(choice[4], dtype=np.float64)[odd]
    w = (weight / weight.sum()).numpy()
    take = check_prefers(np.stack([choice_sq, sq]), w, max(margin, AUTO_CHECK_MARGIN))
    errors = {_auto_label(*choice[:3]): float(np.sqrt((choice_sq * w).sum())), f"deis,fitted@{choice[2]}": err}
    kept = ("deis", options, choice[2], sig) if take else choice[:4]
    return kept, errors, 2 * int(steps)


def _auto_label(solver: str, options: dict, grid: str) -> str:
    """solver="auto"'s name of a (solver, options, grid) in meta: "unipc,max_h=0.8,order=3@error"."""
    return solver + "".join(f",{k}={v}" for k, v in sorted(options.items())) + "@" + grid


def check_prefers(sq, weight, margin: float) -> bool:
    """Whether solver="auto"'s check run (row 1 of per-sample squared errors [2, B]) replaces its choice (row
    0): its RMS error on the bulk, the samples that neither run misses by more than SHARED_OUTLIER times
    that run's median miss, is below `margin` times the choice's, and on all samples it is no worse. The
    check is for data whose error is bulk error (solvers.AUTO_CHECK), so a pilot sample one run sends to
    another mode must not decide it: where the choice had 5 times less bulk error and one such sample, the
    check would have had 14 times its error on a large batch (docs/calibration.md §17)."""
    sq = np.nan_to_num(np.asarray(sq, dtype=np.float64), nan=np.inf)
    w = np.asarray(weight, dtype=np.float64)
    miss = np.sqrt(sq)
    scale = np.array([np.median(m[np.isfinite(m)]) if np.isfinite(m).any() else np.inf for m in miss])
    bulk = ~(miss > SHARED_OUTLIER * scale[:, None]).any(0)

    def rms(row, m):
        with np.errstate(invalid="ignore"):
            return float(np.sqrt((sq[row, m] * w[m]).sum() / w[m].sum())) if m.any() else math.inf
    every = np.ones_like(bulk)
    return rms(1, bulk) < margin * rms(0, bulk) and rms(1, every) <= rms(0, every)


def _choose(sq, weight, margin: float, shared: bool) -> tuple[int, np.ndarray, int]:
    """From per-sample squared errors [C, B] and sample weights [B]: (`prefer_default`'s index, on the
    errors without the shared outliers if `shared` else on all samples; the errors without them [C]; how
    many there are)."""
    full, compared = compared_errors(sq, weight)
    best = prefer_default(list(full), margin, list(compared) if shared else None)
    return best, compared, int(shared_outliers(sq).sum())


def select(den, steps: int, solver: str, ref: dict, pilot_data: dict | None = None,
           candidates=DEFAULT_CANDIDATES, backend: str = "auto", solver_options: dict | None = None,
           margin: float = MARGIN) -> tuple[np.ndarray, dict]:
    """`measure` the candidate grids and keep the first unless another is below `margin` times its error
    (`prefer_default`). Returns (positive sigmas [steps], {candidate: RMS error})."""
    measured = measure(den, steps, solver, ref, pilot_data, candidates, backend, solver_options)
    names = list(measured)
    best = names[prefer_default([measured[k][0] for k in names], margin)]
    return measured[best][1], {k: e for k, (e, _) in measured.items()}


def thermo_grid(den, steps: int, solver: str = "dpmpp_2m", pilot_steps: int = 24, pilot_batch: int = PILOT_BATCH,
                sample_shape: tuple | None = None, method: str | None = None, floor: float | None = None,
                critical: float | None = None, switch: float | None = None, amplify: float | None = None,
                pilot_seed: int = 12345, backend: str = "auto", pilot_data: dict | None = None,
                ref_steps: int = 128, candidates=None, solver_options: dict | None = None,
                margin: float = MARGIN, pilot_rows: int | None = 64,
                karras_weight: float | None = None, boundary_pool: int = BOUNDARY_POOL,
                boundary_samples: int = BOUNDARY_SAMPLES) -> ThermoGrid:
    """A time grid calibrated from a pilot run of `den` (docs/theory.md §6).

    Args:
        den: a `ts.Denoiser` (the model with its schedule).
        steps: solver steps of the final run; the grid holds steps sigmas plus a final 0 ([steps + 1]).
        solver: the solver the grid is for (sets the order p of the error density), or "auto": method
            "select" measures the (solver, options, grid) candidates of solvers.auto_candidates(steps)
            and keeps the default unless an alternative's pilot error is below `margin` times the
            default's (meta "solver", "solver_options"); up to 14 steps it then measures the one run of
            solvers.auto_check(steps) on karras and takes it if below max(margin,
            solvers.AUTO_CHECK_MARGIN) times the choice's error (meta "check_errors"; NFE more
            evaluations); from solvers.AUTO_NOISE_FROM steps on it measures the UniPC run with
            noise_below at each of solvers.AUTO_NOISE_CUTS times the data's scale (`data_scale`) and keeps
            one the same way, with margin max(margin, solvers.AUTO_NOISE_MARGIN) (meta
            "noise_below_errors"; len(AUTO_NOISE_CUTS) x NFE more evaluations): at 15-19 steps on the UniPC
            candidate before the candidates compete (solvers.auto_noise_first, AUTO_NOISE_FIRST), else on
            the choice if it is UniPC; from 9 to 14 steps, where it then holds DEIS or
            iPNDM (solvers.auto_fit), it fits deis's corrections on half the pilot (`fit_corrections`) and
            takes them if the other half measures them better, as the check (meta "fit_errors"; 2 x NFE
            more evaluations of half the batch). ts.sample(solver="auto",
            grid=this grid) then runs that solver (the recommended configuration, solvers.recommended).
        pilot_steps: pilot evaluations (DPM-Solver++(2M) on a grid uniform in log sigma).
        pilot_batch: pilot batch size B (default PILOT_BATCH = 256: smaller pilots miss the rare samples a
            grid sends to another mode, which dominate a large batch's RMS error).
        pilot_rows: most rows the model sees in one call during the calibration (default 64, the memory
            of the earlier 32-sample pilot with its twins); None passes whole batches (2 B rows in the twins
            pilot). Keyword tensors of the model whose leading size is the batch's are sliced alike.
            Evaluation counts (meta "calibration_nfe") count batched evaluations, not calls.
        sample_shape: the shape of one sample (without the batch), e.g. (64,) or (1, 8, 8). Needed unless
            the denoiser exposes `sample_shape`.
        method: "select" (the default for deterministic solvers): solve the pilot batch once to convergence
            (`reference`, `ref_steps` evaluations), then run `solver` on every grid of `candidates`, measure
            how far its samples land from the converged ones, and keep the first candidate unless another
            is clearly closer (`margin`). The default candidates are karras and "error" (the calibrated
            density below); CANDIDATES also offers logsnr, kl_optimal, uniform, "jump" (the
            dynamic-programming grid of `jump_grid`) and "length". With karras first, the result is never
            worse than karras on the pilot's samples. Cost: ref_steps + (pilot_steps if "error" is a
            candidate) + len(candidates) x NFE model evaluations on the pilot batch (plus the screen's, with
            boundary_pool), all reusable through `pilot_data` except the candidate runs; `grid.meta`
            records each candidate's error and the cost.
            "error" (the default for stochastic solvers): equidistributed global error, the solver's local
            truncation error times the amplification (the flow's, measured by the pilot's twin
            trajectories, plus the mode-switch term of `switch`); "length": equal thermodynamic length
            (Sivak & Crooks 2012: equal increments of integral sqrt(E||nu||^2) dt); "blend": the mean of
            the two densities.
        floor: weight of a uniform-in-log-sigma density mixed into the calibrated one. None (default):
            0.1, or 0.35 for Heun (see `critical`).
        critical: weight of the critical-time density (where the pilot's denoised estimates move fastest,
            i.e. where trajectories choose their mode; `critical_density`). None (default) gives
            `critical_weight(steps)`: about three steps' worth from 10 steps on (0.3 at 10, 0.15 at 20),
            ramping down to 0 at 6 steps and below. For Heun (a trapezoid rule in sigma, not an
            exponential integrator in lambda) the defaults stay floor 0.35 and critical 0: the benchmark
            measured the critical-time density making Heun worse.
        switch: weight of the mode-switch amplification (an error made before a trajectory has chosen its
            mode can send it to another; see the module docstring). None (default) gives
            `switch_weight(steps)`: 0 at 6 steps, 0.29 at 10, 1 from 20 on, for every solver. Used by
            method "error" and "blend" ("length" has no amplification; its metadata records 0).
        amplify: exponent of the twins' amplification factor in the error density (None: 1).
        karras_weight: moves the calibrated grid toward karras, node by node in log sigma
            (`toward_karras`): 0 keeps it, 1 gives karras. None: `karras_weight_default(solver)`, 0.5 for
            Heun and 0 otherwise. floor, critical, switch, amplify and karras_weight also shape the
            "error" candidate of method "select".
        pilot_seed: seed of the pilot's noise (fixed: the grid does not depend on the final run's seed).
        backend: fused-op backend for the pilot.
        pilot_data: a pilot dict to reuse (`grid.pilot` of an earlier call, or `pilot(...)` and/or
            `reference(...)` merged): then only what it lacks is computed. A reference screened otherwise
            than boundary_pool / boundary_samples ask (its ref_boundary) is solved again.
        ref_steps: evaluations of the converged reference solve (method "select").
        candidates: the grids "select" chooses among, the first being the default (default
            DEFAULT_CANDIDATES = karras, "error"; any of CANDIDATES).
        solver_options: options of `solver` for the candidate runs (e.g. {"order": 3}).
        margin: "select" (and solver="auto") keeps its first candidate, the default, unless another
            measures below margin times its pilot error (`prefer_default`; default MARGIN = 0.6);
            1.0 keeps the plain minimum. solver="auto" measures both errors without the pilot samples
            that every candidate misses by far (`compared_errors`) and takes the alternative only if it
            is also no worse on all samples; meta "compared_errors" and "shared_outliers" record them.
        boundary_pool, boundary_samples: with boundary_pool > 0 (default BOUNDARY_POOL = 0: off), method
            "select" screens boundary_pool starting points (e.g. 4096) with twin trajectories and adds the
            boundary_samples (BOUNDARY_SAMPLES = 64) whose solutions end nearest a mode boundary to the
            reference batch, with weight boundary_samples / boundary_pool in all (`boundary_noise`,
            `reference`). Those are the samples a coarse grid can send to another mode: rare, so a random
            pilot seldom holds one, yet they decide a large batch's RMS error. It costs
            pilot_steps x boundary_pool / 256 evaluations of 512 rows; docs/calibration.md §10 says what
            it measured.
    Returns:
        ThermoGrid [steps + 1], descending from sigma_max to sigma_min, then 0; `.pilot` holds the pilot
        data for reuse.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    auto = solver == AUTO_NAME
    if auto and method not in (None, "select"):
        raise ValueError("solver='auto' chooses the solver by measured error: it needs method='select'")
    if auto and candidates is not None:
        raise ValueError("solver='auto' measures its own candidates (solvers.auto_candidates): leave candidates=None")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be a number in (0, 1], got {margin!r}")
    _check_boundary(boundary_pool, boundary_samples)
    if pilot_rows is not None and (isinstance(pilot_rows, bool) or not isinstance(pilot_rows, int) or pilot_rows < 1):
        raise ValueError(f"pilot_rows must be an int >= 1 or None, got {pilot_rows!r}")
    den = _row_chunked(den, pilot_rows)
    plan = auto_candidates(int(steps)) if auto else None
    spec = get_solver(plan[0][0] if auto else solver)
    order = spec.order
    if method is None:
        method = "error" if spec.injects_noise(solver_options or {}) else "select"
    if method not in ("select", "blend", "error", "length"):
        raise ValueError(f"method must be 'select', 'blend', 'error' or 'length', got {method!r}")
    candidates = tuple(DEFAULT_CANDIDATES if candidates is None else candidates)
    if auto:
        candidates = tuple(dict.fromkeys(g for _, _, g in plan))
    if method == "select":
        if spec.injects_noise(solver_options or {}):
            raise ValueError(f"method='select' compares against the converged ODE solution: {solver!r} with these "
                             "options is stochastic; use method='error'")
        if not candidates or any(c not in CANDIDATES for c in candidates):
            raise ValueError(f"candidates must be a non-empty subset of {CANDIDATES}, got {candidates!r}")
    defaults = _error_defaults(solver, int(steps))
    floor = _weight("floor", floor, defaults["floor"])
    if not floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor!r}")
    critical = _weight("critical", critical, defaults["critical"])
    switch = 0.0 if method == "length" else _weight("switch", switch, defaults["switch"])
    amplify = _weight("amplify", amplify, defaults["amplify"])
    if not 0.0 <= critical <= 1.0 - floor:
        raise ValueError(f"critical must lie in [0, 1 - floor], got {critical!r}")
    karras_weight = _weight("karras_weight", karras_weight, defaults["karras_weight"])
    if not karras_weight <= 1.0:
        raise ValueError(f"karras_weight must lie in [0, 1], got {karras_weight!r}")
    # the "error" grid of method "select" takes the same weights as method "error"
    density_kw = {"floor": floor, "critical": critical, "switch": switch, "amplify": amplify,
                  "karras_weight": karras_weight}
    pilot_data = dict(pilot_data or {})
    spent = 0
    needs_twins = method != "select" or "error" in candidates
    needs_ref = method == "select"
    if needs_ref and "ref_final" in pilot_data and _screen_of(pilot_data) != _screen(boundary_pool, boundary_samples):
        # a reused reference screened otherwise than asked: solve it again rather than silently keep it
        pilot_data = {k: v for k, v in pilot_data.items() if not k.startswith("ref_")}
    if (needs_twins and "D" not in pilot_data) or (needs_ref and "ref_final" not in pilot_data):
        if sample_shape is None:
            sample_shape = getattr(den, "sample_shape", None)
        if sample_shape is None:
            raise ValueError("thermo_grid needs sample_shape=(...) (the shape of one sample) for the pilot run")
        if isinstance(pilot_batch, bool) or not isinstance(pilot_batch, int) or pilot_batch < 2:
            raise ValueError(f"pilot_batch must be an int >= 2, got {pilot_batch!r}")
        shape = (pilot_batch, *tuple(sample_shape))
        if needs_twins and "D" not in pilot_data:
            pilot_data.update(pilot(den, shape, pilot_steps=pilot_steps, pilot_seed=pilot_seed, backend=backend))
            spent += int(pilot_data["nfe"])
        if needs_ref and "ref_final" not in pilot_data:
            pilot_data.update(reference(den, shape, ref_steps=ref_steps, pilot_seed=pilot_seed, backend=backend,
                                        boundary_pool=boundary_pool, boundary_samples=boundary_samples,
                                        pilot_steps=pilot_steps))
            spent += int(pilot_data["ref_nfe"]) + int(pilot_data["ref_screen_nfe"])
    sch = den.schedule
    extra = {}
    if method == "select":
        # (solver, options, grids) to measure; auto: its default candidate first, then the alternative
        runs = ([(name, dict(opts), (g,)) for name, opts, g in plan] if auto
                else [(solver, dict(solver_options or {}), candidates)])
        measured = []       # (label, error, solver, options, grid name, sigmas, per-sample errors), default first
        noise_first = auto and auto_noise_first(int(steps))
        tail_errors = None
        for name, opts, names in runs:
            res = _measure(den, int(steps), name, pilot_data, pilot_data if needs_twins else None, names,
                           backend, opts, density_kw)
            spent += len(res) * get_solver(name).evaluations(int(steps))
            for g, (e, sig_g, sq) in res.items():
                label, kept = (_auto_label(name, opts, g) if auto else g), opts
                if noise_first and name == "unipc":   # UniPC competes with its noise stage's choice
                    kept, tail_errors, tail_nfe, e, sq = _noise_tail(den, steps, name, opts, sig_g, e, sq,
                                                                     pilot_data, backend, margin)
                    spent += tail_nfe
                measured.append((label, e, name, kept, g, sig_g, sq))
        errors = {m[0]: m[1] for m in measured}
        weight = _ref_weight(pilot_data, len(measured[0][6]))
        best, compared, outliers = _choose(np.stack([m[6] for m in measured]), weight, margin, shared=auto)
        _, chosen_err, solver, solver_options, chosen, sig, chosen_sq = measured[best]
        extra = {"candidate_errors": errors, "ref_steps": int(len(pilot_data["ref_sigma"])),
                 "compared_errors": {m[0]: float(c) for m, c in zip(measured, compared)},
                 "shared_outliers": outliers, "margin": float(margin)}
        check = auto_check(int(steps)) if auto else None
        if check is not None:
            solver, solver_options, chosen, sig, chosen_err, chosen_sq, extra["check_errors"], check_nfe = _check(
                den, steps, check, (solver, solver_options, chosen, sig, chosen_err, chosen_sq), pilot_data,
                backend, density_kw, margin)
            spent += check_nfe
        order = get_solver(solver).order
        extra["chosen"] = chosen
        if auto and steps >= AUTO_NOISE_FROM and solver == "unipc" and not noise_first:
            solver_options, tail_errors, tail_nfe, _, _ = _noise_tail(den, steps, solver, solver_options, sig,
                                                                      chosen_err, chosen_sq, pilot_data, backend,
                                                                      margin)
            spent += tail_nfe
        if tail_errors is not None:
            extra["noise_below_errors"] = tail_errors
        if auto and auto_fit(int(steps), solver):
            (solver, solver_options, chosen, sig), extra["fit_errors"], fit_nfe = _fit_check(
                den, steps, (solver, solver_options, chosen, sig, chosen_sq), pilot_data, backend, margin)
            spent += fit_nfe
            order = get_solver(solver).order
        if auto:
            extra.update(auto=True, solver_options=dict(solver_options))
    elif steps == 1:
        sig = np.array([sch.sigma_max])
    else:
        lam, rho = density(pilot_data, sch, method=method, order=order, floor=floor, critical=critical,
                           amplify=amplify, switch=switch)
        sig = _place_sigmas(lam, rho, steps, sch, karras_weight)
    meta = {"method": method, "solver": solver, "order": order, "floor": floor,
            "critical": float(critical), "switch": float(switch), "amplify": float(amplify), "steps": int(steps),
            "karras_weight": float(karras_weight),
            "pilot_steps": int(len(pilot_data["sigma"])) if "sigma" in pilot_data else 0,
            "pilot_nfe": (int(pilot_data.get("nfe", 0)) + int(pilot_data.get("ref_nfe", 0))
                          + int(pilot_data.get("ref_screen_nfe", 0))),
            "boundary": list(_screen_of(pilot_data)),
            "calibration_nfe": spent, "pilot_seed": int(pilot_seed), "schedule": repr(sch), **extra}
    grid = ThermoGrid(np.append(sig, 0.0), meta)
    grid.pilot = pilot_data
    return grid
