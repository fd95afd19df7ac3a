"""Time grids calibrated from a pilot run of the model itself (docs/theory.md §6).

`thermo_grid(den, steps, solver=...)` returns a `ThermoGrid`: a float64 numpy array of descending sigmas
ending in 0, with `.meta`, `.pilot` (reusable), `save(path)` / `ThermoGrid.load(path)`, that
`ts.sample(..., grid=...)` accepts like any explicit grid. With solver="auto" it runs the plan of
thermosample/auto.py on the same pilot and returns a `SamplerConfig`.

Default for deterministic solvers, method "select": measure instead of model. `reference` solves a pilot
batch to convergence (UniPC-3 on log-sigma steps: 128 at cost="thorough", `reference_steps(steps)` at a row
budget), then `measure` runs the solver on karras and on the calibrated "error" density below (any of
CANDIDATES on request) and `auto.challenge` keeps karras unless the other lands clearly closer to the
converged samples (below MARGIN x its error). With
CalibrationOptions(boundary_pool=...) the reference batch also holds the samples nearest a mode boundary out
of a screened pool (`boundary_noise`), with their stratum's weight. Its cost is stated in
`grid.meta["calibration_nfe"]`.
The methods below are the candidates' densities (and the default for stochastic solvers, which have no
converged solution to compare with).

The pilot (`pilot`) integrates the probability-flow ODE once: DPM-Solver++(2M) on `pilot_steps` (24)
sigmas uniform in log sigma, `pilot_batch` trajectories (256 at cost="thorough"; at a row budget the largest
batch that fits it), each beside a twin started 1e-6 away (1e-3 in float32) in the same model calls (2B
rows per evaluation, sent in pieces of `pilot_rows`; NFE = pilot_steps), with its own `pilot_seed`, so the
grid never depends on the final run's seed. At every pilot node (lambda = -log sigma) it records

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

p is the solver's order (`get_solver(solver).order`: 1 for Euler/DDIM, 2 for Heun and DPM-Solver++(2M), 3 for
UniPC and DEIS, 4 for iPNDM, whatever their options); U = 1 - F(lambda) is the
part of rho_crit still ahead (`critical_density`); S_end is the spread at the last pilot node.
Defaults, overridden by `floor=`, `critical=`, `switch=`, `amplify=`: floor 0.1 (0.35 for Heun),
c = `critical_weight(steps)` (0 for Heun), s = `switch_weight(steps)` (0 for "length"), a = 1. For Heun
and DEIS the placed grid then moves halfway toward karras (`karras_weight_default`, `toward_karras`,
`karras_weight=`).
`pilot_data=` reuses a pilot at no cost.

Why each term and constant, and the benchmark they were chosen on (benchmarks/bench_quality.py):
docs/calibration.md. Theory: docs/theory.md §5 (critical time) and §6 (grids).
"""
from __future__ import annotations

import copy
import json
import math
import numbers
import time
import warnings
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from .auto import MARGIN, challenge
from .grids import logsnr, validate_sigmas
from .solvers import get_solver
from .validate import check_sample_shape

__all__ = ["ThermoGrid", "CalibrationOptions", "thermo_grid", "pilot", "twin_gain", "boundary_noise", "density",
           "critical_density", "critical_weight", "switch_weight", "place", "toward_karras", "karras_weight_default",
           "reference", "reference_nodes", "fit_corrections", "candidate_sigmas", "pilot_errors", "measure", "select",
           "error_grid_defaults", "sample_weights", "data_scale", "planned_rows", "row_budget", "reference_steps",
           "surrogate_grid"]



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
          backend: str = "auto", sigmas=None, keep_dims: int = 1024, dtype=None, device=None) -> dict:
    """Run the pilot: `solver` on `pilot_steps` steps uniform in log sigma, batch shape [B, ...].

    Each trajectory runs beside a twin started 1e-6 (relative; 1e-3 in float32) away in the same model calls,
    so the model sees batches of 2B but the evaluation count is `pilot_steps`. `sigmas` overrides the pilot grid.

    Returns a dict of numpy arrays: sigma [J] (descending pilot noise levels, excluding 0), t [J] (their
    physical times), D [J, B, n] (denoised estimates, float64), rate [J] (batch-mean ||nu||^2 per
    evaluation, from the ThermoReport), log_sep [J, B] (log distance of each twin pair at each
    evaluation), spread [J] (RMS distance of the batch's x from their mean at each evaluation), and nfe
    (model evaluations spent). D keeps at most `keep_dims` fixed coordinates of each sample, scaled so
    that squared norms estimate the full ones (the densities use only such norms), which bounds its
    memory at J x B x keep_dims float64 for image-sized samples. dtype, device: as thermo_grid's (default:
    the model's, `pilot_dtype_device`).
    """
    from .sampler import sample

    if dtype is not None or device is not None:
        den = _row_chunked(den, None, None, _dtype_device(den, dtype, device))

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
    trajectory and a twin started 1e-6 away (1e-3 in float32; as in `pilot`: DPM-Solver++(2M) on `pilot_steps`
    steps uniform in log sigma), from the first evaluation to the last. Returns (scores [N] float64, the
    evaluations spent: pilot_steps per chunk of `chunk` starting points, each on 2 x chunk rows)."""
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
    hundred samples seldom holds one; `reference` adds these to its batch with their stratum's weight.

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
    """The model as the calibration calls it: in slices of at most `rows` rows (None: whole batches; keyword
    tensors with the same leading size are sliced alike), counting the rows and calls it passes on and
    advancing `meter`'s progress bar, and turning a dtype mismatch the model raises into an error that
    names thermo_grid's dtype= argument."""

    def __init__(self, model, rows: int | None, meter: _Meter | None = None):
        self.model, self.rows, self.meter = model, (None if rows is None else int(rows)), meter

    def __call__(self, x, t, **kwargs):
        n = x.shape[0]
        if self.rows is None or n <= self.rows:
            return self._call(x, t, kwargs)
        cut = lambda v, i: v[i:i + self.rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
        return torch.cat([self._call(x[i:i + self.rows], cut(t, i), {k: cut(v, i) for k, v in kwargs.items()})
                          for i in range(0, n, self.rows)])

    def _call(self, x, t, kwargs):
        try:
            out = self.model(x, t, **kwargs)
        except RuntimeError as exc:
            if "dtype" not in str(exc) and "scalar type" not in str(exc):
                raise
            raise TypeError(f"the model failed on {x.dtype} inputs during calibration ({exc}): pass "
                            "thermo_grid(..., dtype=torch.float64) for a float64 model; a half-precision model "
                            "calibrates in float32, so wrap it as a torch.nn.Module (ts.Denoiser casts a module's "
                            "inputs to its dtype) or cast x inside the function") from exc
        if self.meter is not None:
            self.meter.add(int(x.shape[0]))
        return out

    def parameters(self):   # the model's dtype and device, as Denoiser.model_dtype and the pilot read them
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())


class _Meter:
    """Model rows and calls of a calibration, and its progress bar over the planned rows (None: no bar)."""

    def __init__(self, planned: int, bar=None):
        self.planned, self.rows, self.calls, self.bar = int(planned), 0, 0, bar
        self.attached = False       # set by `_row_chunked` when it meters the model: else rows are not counted

    def add(self, rows: int) -> None:
        self.rows += rows
        self.calls += 1
        if self.bar is not None:
            self.bar.update(rows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.total = self.rows      # the plan is an upper bound: stages the pilot skipped are not run
            self.bar.refresh()
            self.bar.close()


def _row_chunked(den, rows: int | None, meter: _Meter | None = None, dtype_device=None):
    """A shallow copy of `den` (den itself is untouched) whose model sits behind _RowChunks(rows, meter) (plain
    Denoisers only: a wrapper or subclass may hold the model elsewhere) and that calibrates in `dtype_device`."""
    from .denoiser import Denoiser

    if rows is None and meter is None and dtype_device is None:
        return den
    out = copy.copy(den)
    if type(den) is Denoiser:
        out.model = _RowChunks(den.model, rows, meter)
        if meter is not None:
            meter.attached = True
    if dtype_device is not None:
        out.calibration_dtype = dtype_device
    return out


_SAID_CLOSURE = []


def pilot_dtype_device(den, say: bool = True) -> tuple[torch.dtype, torch.device]:
    """The state dtype and device of a calibration: what thermo_grid fixed (its dtype= and device=), else
    the model's device, and float64 for a float64 model, float32 for a float32 or half one (as ts.sample
    gives it); for a model without parameters or buffers (a function), torch's default dtype on the CPU
    (said once, unless `say` is False: the caller fixed the dtype)."""
    fixed = getattr(den, "calibration_dtype", None)
    if fixed is not None:
        return fixed
    model = getattr(den, "model", None)
    model = getattr(model, "model", model) if isinstance(model, _RowChunks) else model
    p = next((t for t in _model_tensors(model) if t.is_floating_point()), None)
    if p is None:
        if say and not _SAID_CLOSURE:
            _SAID_CLOSURE.append(True)
            warnings.warn(f"the model has no parameters to read its dtype from: calibrating in "
                          f"{torch.get_default_dtype()} (torch's default dtype) on the CPU; pass "
                          "thermo_grid(..., dtype=torch.float64, device=...) to change it", UserWarning, stacklevel=3)
        return torch.get_default_dtype(), torch.device("cpu")
    return (torch.float64 if p.dtype == torch.float64 else torch.float32), p.device


def _model_tensors(model):
    for name in ("parameters", "buffers"):
        fn = getattr(model, name, None)
        if callable(fn):
            yield from fn()


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
        order: solver order p (1-4) for method="error" / "blend".
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
    if stat not in ("rms", "max"):
        raise ValueError(f"stat must be 'rms' or 'max', got {stat!r}")
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
        if len(lam) <= order:
            raise ValueError(f"an order-{order} error density needs more than {order} pilot nodes, the pilot has "
                             f"{len(lam)}: raise pilot_steps (CalibrationOptions) to at least {order + 1}")
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
    Heun is a trapezoid rule in sigma, DEIS integrates the noise prediction in sigma), and halfway toward
    karras beat the pure grid on the quality benchmark (docs/decisions/)."""
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
# Few candidates, the first kept unless another measures below MARGIN x its error: the smallest of many pilot
# errors is often a grid that only suited the pilot (docs/decisions/0002-default-and-margin.md).
DEFAULT_CANDIDATES = ("karras", "error")
# The reference batch's screened stratum (`boundary_noise`), off: it measured no gain.
BOUNDARY_POOL = 0
BOUNDARY_SAMPLES = 64


def reference(den, shape, ref_steps: int = 128, pilot_seed: int = 12345, backend: str = "auto",
              keep_dims: int | None = None, boundary_pool: int = BOUNDARY_POOL,
              boundary_samples: int = BOUNDARY_SAMPLES, pilot_steps: int = 24, dtype=None, device=None) -> dict:
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

    if dtype is not None or device is not None:
        den = _row_chunked(den, None, None, _dtype_device(den, dtype, device))

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
    # pilot_seed + 2 (kept coordinates) and + 3 (projection): `_probe_pilot` rebuilds both from ref_proj_seed
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
    if 0 < pool <= samples:     # the screened stratum would be the whole pool: the random samples weigh 0
        raise ValueError(f"boundary_pool ({pool}) must exceed boundary_samples ({samples}), or be 0 (no screen)")


def _screen(pool: int, samples: int) -> tuple[int, int]:
    """(screened samples kept, pool) that `reference` records as ref_boundary for these sizes."""
    k = min(samples, pool)
    return (k, pool) if k > 0 else (0, 0)


def _screen_of(ref: dict) -> tuple[int, int]:
    """The ref_boundary of a reference dict ((0, 0) for one made before the screen existed)."""
    return tuple(int(v) for v in ref.get("ref_boundary", (0, 0)))


def sample_weights(ref: dict, b: int) -> torch.Tensor:
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
    w = sample_weights(ref, x.shape[1])                # the batch mean of a squared distance: (.. * w).sum(-1)
    n = len(sig)
    if steps == 1:
        return sig[:1].copy()
    if steps > n:
        raise ValueError(f"a {steps}-step 'jump' grid needs a reference of at least {steps} nodes (ref_steps), "
                         f"this one has {n}")
    if steps == n:
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


def error_grid_defaults(solver: str, steps: int) -> dict:
    """The "error" grid's default weights for `solver` with `steps` steps (one rule for method "error" and
    for the "select" candidate): floor 0.1 (0.35 for Heun), critical_weight(steps) (0 for Heun),
    switch_weight(steps), amplify 1, karras_weight_default(solver)."""
    heun = solver == "heun"
    return {"floor": 0.35 if heun else 0.1, "critical": 0.0 if heun else critical_weight(steps),
            "switch": switch_weight(steps), "amplify": 1.0, "karras_weight": karras_weight_default(solver)}


def _place_sigmas(lam: np.ndarray, rho: np.ndarray, steps: int, schedule, karras_weight: float) -> np.ndarray:
    """`steps` positive sigmas at equal increments of the density, ends pinned to the schedule's range,
    then moved `karras_weight` of the way toward karras (`toward_karras`). One step: sigma_max alone."""
    if steps == 1:
        return np.array([schedule.sigma_max], dtype=np.float64)
    sig = np.exp(-place(lam, rho, steps))
    sig[0], sig[-1] = schedule.sigma_max, schedule.sigma_min
    return toward_karras(sig, schedule, karras_weight)


def candidate_sigmas(name: str, den, steps: int, solver: str, ref: dict, pilot_data: dict | None = None,
                     density_kw: dict | None = None) -> np.ndarray:
    """Positive sigmas [steps] of candidate grid `name` (one of CANDIDATES) for `solver`: a named grid, the
    reference's "jump" grid, or a density placed from the reference ("length") or the twins pilot `pilot_data`
    ("error"); density_kw (floor, critical, switch, amplify, karras_weight) overrides the "error" grid's
    defaults for `solver` and `steps` (`error_grid_defaults`)."""
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
        if not pilot_data or "D" not in pilot_data:
            raise ValueError("the 'error' candidate needs the twins pilot: pass pilot_data=calibrate.pilot(den, "
                             "shape), or leave 'error' out of the candidates")
        kw = {**error_grid_defaults(solver, steps), **(density_kw or {})}
        weight = kw.pop("karras_weight")
        lam, rho = density(pilot_data, sch, method="error", order=get_solver(solver).order, **kw)
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
    `error_grid_defaults(solver, steps)`)."""
    return {k: (e, sig) for k, (e, sig, _) in _measure(den, steps, solver, ref, pilot_data, candidates, backend,
                                                       solver_options, density_kw).items()}


def _measure(den, steps, solver, ref, pilot_data, candidates, backend, solver_options, density_kw):
    """`measure`, each value with the per-sample squared errors [B] (float64 numpy) after the sigmas."""
    result = {}
    for name in candidates:
        if steps == 1 and name != candidates[0]:
            continue
        sig = candidate_sigmas(name, den, steps, solver, ref, pilot_data, density_kw)
        err, sq = pilot_errors(den, sig, solver, ref, backend, solver_options)
        result[name] = (err, sig, sq)
    return result


def pilot_errors(den, sigmas, solver: str, ref: dict, backend: str = "auto",
                 solver_options: dict | None = None) -> tuple[float, np.ndarray]:
    """(weighted RMS distance from the reference's converged samples, per-sample squared errors [B] as float64
    numpy) of `solver` on positive `sigmas` from the reference's noise (`reference`)."""
    from .sampler import sample

    target = ref["ref_final"].double()
    weight = sample_weights(ref, target.shape[0])
    out = sample(den, noise=ref["ref_noise"], grid=np.append(sigmas, 0.0), solver=solver, backend=backend,
                 track=False, progress=False, **(solver_options or {}))
    sq = (out.samples.cpu().double() - target).reshape(len(weight), -1).square().mean(1)
    err = float((sq * weight).sum().sqrt())
    return (err if math.isfinite(err) else math.inf), sq.numpy()


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
    """deis's `corrections` for order 3 on the positive sigmas `sig` (the reference's nodes, `reference_nodes`,
    or between them), fitted on the reference's samples `rows` (indices): from their noise, step by step, the
    coefficients of `solvers.correction_terms` that move the DEIS-3 update closest, in least squares on the
    reference's recorded coordinates (or projections, ref_proj) weighted by ref_weight, to the reference's
    state at the next sigma (recorded at a node, cubic in log sigma between nodes; its converged sample on the
    step to 0), plus the rounding a float32 run would add through the coefficients (FIT_ROUNDING). Aiming each
    step back at the converged trajectory, it corrects the error carried from the steps before as well as the
    step's own. Costs len(sig) evaluations of those rows. Returns one list of floats per step, or None if the
    reference lacks what the fit needs (ref_proj) or the fit is not finite. `backend` is not read: the fit
    calls the model directly, in the pilot's dtype and device (kept for the callers' uniform signature)."""
    from .solvers import correction_terms, deis_terms

    nodes = np.asarray(ref["ref_sigma"], dtype=np.float64)
    idx = [int(np.argmin(np.abs(nodes - v))) for v in sig]
    if "ref_proj" not in ref:
        return None
    on_node = [bool(np.isclose(nodes[i], v, rtol=1e-9, atol=0.0)) for i, v in zip(idx, sig)]
    rows = torch.as_tensor(rows, dtype=torch.long)
    dtype, device = pilot_dtype_device(den)
    x = ref["ref_noise"][rows].to(device=device, dtype=dtype)
    b = x.shape[0]
    states = ref["ref_x"] if ref["ref_proj"] is None else ref["ref_proj"]     # every coordinate, or projected
    proj = None if ref["ref_proj"] is None else _projection(x[0].numel(), states.shape[-1], ref["ref_proj_seed"])
    root_w = sample_weights(ref, states.shape[1])[rows]
    root_w = (root_w / root_w.sum()).sqrt()[:, None]

    # a float32 run's relative rounding of its inputs (the model's own, if coarser): FIT_ROUNDING x its eps
    rounding = FIT_ROUNDING * max(torch.finfo(torch.float32).eps, torch.finfo(dtype).eps)

    def coords(v):   # [b, ...] -> as the reference recorded it, float64 on the host, weighted
        return (v.reshape(b, -1) if proj is None else _project(v, proj)).double().cpu() * root_w

    between = None if all(on_node[1:]) else _trajectory(nodes, states)     # off-node targets: in between

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
        if s[i + 1] == 0:
            goal = coords(ref["ref_final"][rows].to(device))
        elif on_node[i + 1]:
            goal = states[idx[i + 1]][rows].double() * root_w
        else:
            goal = between(s[i + 1])[rows] * root_w
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


def _trajectory(nodes: np.ndarray, values: torch.Tensor):
    """A function sigma -> the reference's values [N, B, m] recorded at its `nodes` (sigmas), at `sigma`
    between them: cubic in log sigma (scipy's CubicSpline, natural ends), float64."""
    from scipy.interpolate import CubicSpline
    spline = CubicSpline(-np.log(nodes), values.double().numpy(), axis=0, bc_type="natural")
    return lambda sigma: torch.from_numpy(spline(-math.log(sigma)))


# surrogate_grid: the nodes it tunes lie below SURROGATE_BELOW x the data's scale, where D responds to the state
# about as for Gaussian data; above, where samples choose their mode, a grid tuned on that response sent twice
# as many samples of the learned wine model to another mode (docs/decisions/0029).
SURROGATE_BELOW = 1.0
SURROGATE_EVALS = 400


def surrogate_grid(ref: dict, sig, schedule, below: float = SURROGATE_BELOW, evals: int = SURROGATE_EVALS
                   ) -> np.ndarray | None:
    """DEIS-3's positive sigmas [len(sig)] from `sig` with its nodes below `below` x the data's scale s tuned with
    no model evaluation: Nelder-Mead over their log sigmas, minimising the RMS error of DEIS-3 on a surrogate of
    the pilot: the reference's D along its trajectory (cubic in log sigma) plus the run's distance from the
    reference's state times s^2 / (s^2 + sigma^2), D's response to it for Gaussian data of scale s. Costs
    `evals` DEIS-3 runs on the reference's recorded coordinates; None without them."""
    from scipy.optimize import minimize

    from .denoiser import Denoiser
    from .sampler import sample
    if ref.get("ref_x") is None or ref.get("ref_D") is None:
        return None
    nodes = np.asarray(ref["ref_sigma"], dtype=np.float64)
    x_ref, d_ref = _trajectory(nodes, ref["ref_x"]), _trajectory(nodes, ref["ref_D"])
    start, target = ref["ref_x"][0].double(), ref["ref_D"][-1].double()
    w = sample_weights(ref, start.shape[0])[:, None]
    scale2 = data_scale(ref) ** 2
    sig = np.asarray(sig, dtype=np.float64)
    free = sig[1:] < below * math.sqrt(scale2)      # a suffix: sig descends
    z0 = np.log(sig[1:][free])
    if not len(z0):
        return sig.copy()
    top = float(sig[1:][~free].min()) if (~free).any() else float(sig[0])
    lo, hi = math.log(schedule.sigma_min), math.log(top)

    def grid(z):     # the tuned nodes: descending below the kept ones, in range, at least 1e-4 apart in log sigma
        z = np.maximum(np.sort(np.clip(z, lo, hi - 1e-3))[::-1], lo + 1e-4 * np.arange(len(z))[::-1])
        for i in range(1, len(z)):
            z[i] = min(z[i], z[i - 1] - 1e-4)
        out = sig.copy()
        out[1:][free] = np.exp(z)
        return out

    def model(x, sigma):
        s = float(sigma.reshape(-1)[0])
        return d_ref(s) + scale2 / (scale2 + s * s) * (x - x_ref(s))

    surrogate = Denoiser(model, schedule, prediction="x0", time="sigma", scale_input=False)

    def error(z):
        out = sample(surrogate, noise=start * float(sig[0]) / float(nodes[0]), grid=np.append(grid(z), 0.0),
                     solver="deis", track=False, progress=False, backend="torch").samples
        e = float(((out - target).square().sum(-1, keepdim=True) * w).sum().sqrt())
        return e if math.isfinite(e) else math.inf

    best = {"error": error(z0), "z": z0}

    def tracked(z):
        e = error(z)
        if e < best["error"]:
            best.update(error=e, z=z.copy())
        return e
    simplex = [z0] + [z0 + 0.15 * (-1) ** i * np.eye(len(z0))[i] for i in range(len(z0))]
    minimize(tracked, z0, method="Nelder-Mead", options={"maxfev": evals, "adaptive": True, "xatol": 1e-4,
                                                         "fatol": 1e-12, "initial_simplex": np.array(simplex)})
    return grid(best["z"])


def _combine(kept, terms) -> torch.Tensor:
    """sum_j c_x,j x_j + c_D,j D_j over the kept (x_j, D_j), newest first, and terms [(c_x, c_D)]."""
    return sum(cx * xj + cd * dj for (xj, dj), (cx, cd) in zip(kept, terms))


def data_scale(ref: dict) -> float:
    """The data's scale: the RMS per coordinate of the reference's converged samples (weighted)."""
    final = ref["ref_final"].double()
    weight = sample_weights(ref, final.shape[0])
    return float((final.reshape(len(weight), -1).square().mean(1) * weight).sum().sqrt())




def select(den, steps: int, solver: str, ref: dict, pilot_data: dict | None = None,
           candidates=DEFAULT_CANDIDATES, backend: str = "auto", solver_options: dict | None = None,
           margin: float = MARGIN) -> tuple[np.ndarray, dict]:
    """`measure` the candidate grids and keep the first unless another is below `margin` times its error
    (`auto.challenge` on all samples). Returns (positive sigmas [steps], {candidate: RMS error})."""
    best, measured = _select(den, steps, solver, ref, pilot_data, candidates, backend, solver_options, margin, None)
    return measured[best][1], {k: e for k, (e, _, _) in measured.items()}


def _select(den, steps, solver, ref, pilot_data, candidates, backend, solver_options, margin, density_kw):
    """(the chosen candidate's name, `_measure`'s result): the one rule on all samples, the first the incumbent."""
    measured = _measure(den, steps, solver, ref, pilot_data, candidates, backend, solver_options, density_kw)
    names = list(measured)
    sq = np.stack([measured[k][2] for k in names])
    return names[challenge(sq, sample_weights(ref, sq.shape[1]), margin, outliers="none")], measured


# CalibrationOptions.cost: "low" and "default" are budgets of model rows (`row_budget`) that the largest pilot
# fitting them fills; "thorough" is the fixed pilot of 256 samples and a 128-step reference.
COSTS = ("low", "default", "thorough")
PILOT_BATCH = 256            # "thorough": a smaller pilot misses more of the rare samples that decide a grid
THOROUGH = (PILOT_BATCH, 128)


def row_budget(cost: str, steps: int) -> int:
    """The model rows cost "default" may spend on a calibration for `steps` steps: 6,000 up to 10 steps,
    10,000 up to 20, 500 per step beyond; "low" half of that."""
    rows = 6000 if steps <= 10 else 10000 if steps <= 20 else 500 * steps
    return rows // 2 if cost == "low" else rows


def reference_steps(steps: int) -> int:
    """The reference solve's steps for a calibration of `steps` steps (cost "low" and "default"): UniPC-3 on
    6 x steps, at least 64 and at most 128, stays about ten times more accurate than the runs it ranks."""
    return int(min(128, max(64, 6 * steps)))


@dataclass(frozen=True)
class CalibrationOptions:
    """The expert settings of `thermo_grid` (the defaults are the measured ones):

        ts.thermo_grid(den, 10, solver="auto", options=ts.CalibrationOptions(cost="thorough", progress=False))

    cost: None: "default" for solver="auto", "thorough" for a single solver's grid (the size its calibrated
        grids were validated at). "default": at most `row_budget(steps)` model rows (6,000 up to 10 steps,
        10,000 up to 20), the largest pilot that fits with a reference of `reference_steps(steps)`; "low":
        half that; "thorough": a pilot of 256 samples and a 128-step reference; or a number of model rows.
        Each tier buys a larger pilot, which ranks rarer samples: docs/calibration.md ("The price").
    progress: a tqdm bar over the model rows, after a line stating their planned number (None: when stderr
        is a terminal).
    pilot_batch, ref_steps: the reference solve's samples B and evaluations (None: from `cost`).
    pilot_steps: evaluations of the twins pilot (DPM-Solver++(2M), uniform in log sigma; B samples, each
        with its twin), which the "error" grid is read from.
    pilot_seed: seed of the pilot's noise (the grid never depends on the final run's seed).
    pilot_rows: most rows the model sees in one call (64); None passes whole batches (2 B rows in the twins
        pilot). Keyword tensors of the model whose leading size is the batch's are sliced alike. Plain
        ts.Denoiser only: a subclass, which may hold its model elsewhere, gets whole batches and no progress
        bar, and meta records its rows and calls as None (not counted).
    candidates: the grids "select" chooses among, the first being the default (DEFAULT_CANDIDATES = karras,
        "error"; any of CANDIDATES). solver="auto" measures its plan's own.
    margin: "select" keeps its first candidate unless another measures below margin x its pilot error
        (MARGIN = 0.6); 1.0 keeps the plain minimum.
    floor, critical, switch, amplify, karras_weight: the "error" density's weights (None: the defaults of
        `error_grid_defaults`): the uniform floor, the critical-time density (`critical_weight`), the
        mode-switch amplification (`switch_weight`), the twins' amplification exponent, and the move toward
        karras (`toward_karras`, `karras_weight_default`). They also shape the "error" candidate of "select".
    boundary_pool, boundary_samples: with boundary_pool > 0 (default 0: off) the reference batch also holds
        the boundary_samples (64) of boundary_pool screened starting points whose solutions end nearest a
        mode boundary, weighted by their share (`boundary_noise`); costs pilot_steps x boundary_pool / 256
        evaluations of 512 rows.
    """
    cost: str | int | None = None
    progress: bool | None = None
    pilot_batch: int | None = None
    ref_steps: int | None = None
    pilot_steps: int = 24
    pilot_seed: int = 12345
    pilot_rows: int | None = 64
    candidates: tuple | None = None
    margin: float = MARGIN
    floor: float | None = None
    critical: float | None = None
    switch: float | None = None
    amplify: float | None = None
    karras_weight: float | None = None
    boundary_pool: int = BOUNDARY_POOL
    boundary_samples: int = BOUNDARY_SAMPLES


def _calibration_options(options, legacy: dict) -> CalibrationOptions:
    """`options` with the keyword arguments thermo_grid took before CalibrationOptions (deprecated)."""
    if options is None:
        options = CalibrationOptions()
    elif not isinstance(options, CalibrationOptions):
        raise TypeError(f"options must be a ts.CalibrationOptions, got {type(options).__name__}")
    if legacy:
        names = {f.name for f in fields(CalibrationOptions)}
        unknown = sorted(set(legacy) - names)
        if unknown:
            raise TypeError(f"thermo_grid() got unexpected keyword argument(s) {unknown}")
        given = ", ".join(f"{k}={v!r}" for k, v in legacy.items())
        warnings.warn(f"thermo_grid({given}) is deprecated: pass options=ts.CalibrationOptions({given})",
                      DeprecationWarning, stacklevel=3)
        options = replace(options, **legacy)
    return options


def thermo_grid(den, steps: int, solver: str = "dpmpp_2m", *, sample_shape: tuple | None = None,
                method: str | None = None, solver_options: dict | None = None, pilot_data: dict | None = None,
                backend: str = "auto", dtype: torch.dtype | None = None, device=None,
                options: CalibrationOptions | None = None, **legacy):
    """A time grid calibrated from a pilot run of `den` (docs/theory.md §6, docs/calibration.md).

    Args:
        den: a `ts.Denoiser` (the model with its schedule).
        steps: solver steps of the final run; the grid holds steps sigmas plus a final 0 ([steps + 1]).
        solver: the solver the grid is for (it sets the order p of the error density), or "auto": run the
            plan's band for `steps` (`auto.PLAN`, `auto.calibrate_plan`) on the pilot and return the
            `auto.SamplerConfig` it chose, which `ts.sample(den, shape, grid=config)` runs.
        sample_shape: the shape of one sample (without the batch), e.g. (64,) or (1, 8, 8). Needed unless
            the denoiser exposes `sample_shape` or `pilot_data` holds the pilot.
        method: "select" (the default for deterministic solvers): solve the pilot batch once to convergence
            (`reference`), run `solver` on every candidate grid (karras and the calibrated "error" density
            by default), measure how far its samples land from the converged ones, and keep the first
            candidate unless another is clearly closer (options.margin): never worse than karras on the
            pilot's samples. "error" (the default for stochastic solvers): equidistributed global error, the
            solver's local error times the flow's amplification measured by the pilot's twin trajectories;
            "length": equal thermodynamic length (Sivak & Crooks 2012); "blend": the mean of the two.
        solver_options: options of `solver` for the candidate runs (e.g. {"order": 3}).
        pilot_data: a pilot dict to reuse (`grid.pilot` or `config.pilot` of an earlier call, or `pilot(...)`
            and/or `reference(...)` merged): then only what it lacks is computed. A reference screened
            otherwise than options.boundary_pool / boundary_samples ask is solved again.
        backend: fused-op backend for the pilot.
        dtype, device: the calibration's state dtype (float32 or float64) and device. Default: from the
            model's parameters (float64 for a float64 model, else float32; their device); for a model without
            parameters (a function) torch's default dtype on the CPU, said once. Every stage runs in it.
        options: a `CalibrationOptions` (cost tier, progress bar, pilot size and seed, reference steps,
            candidates, margin, the density's weights). Its names as keyword arguments still work, with a
            DeprecationWarning.
    Returns:
        ThermoGrid [steps + 1], descending from sigma_max to sigma_min, then 0, with `.meta` (what was measured
        and its cost: "calibration_rows" model rows in "calibration_calls" calls (None for a Denoiser
        subclass, whose model calls are not counted), "calibration_nfe" batched evaluations) and `.pilot` for
        reuse; for solver="auto" a `SamplerConfig` (solver, options, sigmas, calibrated_for, meta, pilot).
    """
    from .auto import AUTO, SamplerConfig, _fingerprint_now, calibrate_plan

    opts = _calibration_options(options, legacy)
    started = time.perf_counter()
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    steps = int(steps)
    auto = solver == AUTO
    if auto and method not in (None, "select"):
        raise ValueError("solver='auto' chooses the solver by measured error: it needs method='select'")
    if auto and opts.candidates is not None:
        raise ValueError("solver='auto' measures its own candidates (auto.PLAN): leave candidates=None")
    margin = opts.margin
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 < margin <= 1.0:
        raise ValueError(f"margin must be a number in (0, 1], got {margin!r}")
    _check_boundary(opts.boundary_pool, opts.boundary_samples)
    rows = opts.pilot_rows
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise ValueError(f"pilot_rows must be an int >= 1 or None, got {rows!r}")
    plan = _Plan.of(steps, solver, method, solver_options, opts.candidates)
    spec, method, candidates, needs_twins = plan.spec, plan.method, plan.candidates, plan.twins
    order = spec.order
    density_kw = _density_weights(opts, solver, steps, method)
    if pilot_data is not None and not isinstance(pilot_data, dict):
        raise TypeError(f"pilot_data must be a dict (grid.pilot or config.pilot), got {type(pilot_data).__name__}")
    pilot_data = dict(pilot_data or {})
    if sample_shape is not None:
        sample_shape = check_sample_shape(sample_shape)
    model = getattr(den, "model", None)
    _check_pilot(pilot_data, den, model, sample_shape)
    opts = _sized(opts, plan, pilot_data)
    made_in = _dtype_device(den, dtype, device)
    meter = _Meter(plan.rows(opts, pilot_data))
    meter.bar = _progress_bar(opts.progress, meter.planned, f"thermo_grid {solver} {steps} steps")
    den = _row_chunked(den, rows, meter, made_in)
    try:
        with torch.no_grad():     # every stage, the fit's direct model calls included: a calibration never trains
            probed = _probe_pilot(pilot_data, den, model)
            pilot_data, spent = _pilots(den, pilot_data, needs_twins, method == "select", sample_shape, opts, backend)
            spent += probed
            _stamp(pilot_data, den, model, sample_shape)
            sch = den.schedule
            extra = {}
            if method == "select" and auto:
                solver, solver_options, chosen, sig, extra, nfe = calibrate_plan(
                    den, steps, pilot_data, pilot_data if needs_twins else None, backend, margin, density_kw)
                spent += nfe
                order = get_solver(solver).order
            elif method == "select":
                chosen, measured = _select(den, steps, solver, pilot_data, pilot_data if needs_twins else None,
                                           candidates, backend, solver_options, margin, density_kw)
                spent += len(measured) * spec.evaluations(steps)
                sig = measured[chosen][1]
                extra = {"candidate_errors": {k: e for k, (e, _, _) in measured.items()},
                         "ref_steps": int(len(pilot_data["ref_sigma"])), "margin": float(margin), "chosen": chosen}
            elif steps == 1:
                sig = np.array([sch.sigma_max])
            else:
                lam, rho = density(pilot_data, sch, method=method, order=order, floor=density_kw["floor"],
                                   critical=density_kw["critical"], amplify=density_kw["amplify"],
                                   switch=density_kw["switch"])
                sig = _place_sigmas(lam, rho, steps, sch, density_kw["karras_weight"])
    finally:
        meter.close()
    seconds = round(time.perf_counter() - started, 3)
    meta = {"method": method, "solver": solver, "order": order, **{k: float(v) for k, v in density_kw.items()},
            "steps": steps, "pilot_steps": int(len(pilot_data["sigma"])) if "sigma" in pilot_data else 0,
            "pilot_nfe": (int(pilot_data.get("nfe", 0)) + int(pilot_data.get("ref_nfe", 0))
                          + int(pilot_data.get("ref_screen_nfe", 0))),
            "boundary": list(_screen_of(pilot_data)), "calibration_nfe": spent,
            "calibration_rows": meter.rows if meter.attached else None,
            "calibration_calls": meter.calls if meter.attached else None,
            "calibration_seconds": seconds, "pilot_seed": int(opts.pilot_seed),
            "schedule": repr(sch), **extra}
    sigmas = np.append(sig, 0.0)
    if not auto:
        grid = ThermoGrid(sigmas, meta)
        grid.pilot = pilot_data
        return grid
    shape = pilot_data["ref_final"].shape[1:]
    made_for = {"schedule": repr(sch), "prediction": getattr(den, "prediction", None), "sample_shape": list(shape),
                "dtype": str(made_in[0]).replace("torch.", ""), "device": made_in[1].type,
                "model": _fingerprint_now(model),     # cached: the pilot's stamp hashed the parameters already
                "pilot": {"rows": meter.rows, "calls": meter.calls, "evaluations": spent,
                          "batch": int(pilot_data["ref_final"].shape[0]), "seconds": seconds}}
    return SamplerConfig(solver, solver_options, sigmas, made_for, meta, pilot=pilot_data)


@dataclass(frozen=True)
class _Plan:
    """What a calibration will run, to state its price in model rows before it starts."""
    steps: int
    spec: object
    band: object
    candidates: tuple
    method: str
    twins: bool

    @classmethod
    def of(cls, steps: int, solver: str, method: str | None, solver_options: dict | None, candidates) -> _Plan:
        """The plan of thermo_grid(den, steps, solver, method=..., solver_options=...) with these candidates,
        its arguments checked."""
        from .auto import AUTO, band_for
        band = band_for(steps) if solver == AUTO else None
        spec = get_solver(band.default.solver if band else solver)
        if method is None:
            method = "error" if spec.injects_noise(solver_options or {}) else "select"
        if method not in ("select", "blend", "error", "length"):
            raise ValueError(f"method must be 'select', 'blend', 'error' or 'length', got {method!r}")
        if isinstance(candidates, str):
            raise TypeError(f"candidates must be a tuple of grid names, e.g. ('karras', 'error'), got {candidates!r}")
        candidates = tuple(DEFAULT_CANDIDATES if candidates is None else candidates)
        if band:
            candidates = tuple(dict.fromkeys(c.grid for c in (band.default, band.alternative, *band.also)))
        if method == "select":
            if spec.injects_noise(solver_options or {}):
                raise ValueError(f"method='select' compares against the converged ODE solution: {solver!r} with "
                                 "these options is stochastic; use method='error'")
            if not candidates or any(c not in CANDIDATES for c in candidates):
                raise ValueError(f"candidates must be a non-empty subset of {CANDIDATES}, got {candidates!r}")
        return cls(steps, spec, band, candidates, method, method != "select" or "error" in candidates)

    def rows(self, opts: CalibrationOptions, pilot_data: dict) -> int:
        """An upper bound on the model rows (stages the pilot may skip count as run)."""
        from .auto import NOISE_CUTS
        b = int(opts.pilot_batch)
        rows = opts.pilot_steps * 2 * b if self.twins and "D" not in pilot_data else 0
        if self.method != "select":
            return rows
        screened, pool = _screen(opts.boundary_pool, opts.boundary_samples)
        if _reused_reference(opts, pilot_data):
            b = int(pilot_data["ref_final"].shape[0])
        else:
            rows += opts.ref_steps * b + opts.pilot_steps * 2 * pool
            b += screened
        runs = len(self.candidates) if self.steps > 1 else 1
        if self.band is not None:
            unipc = sum(c.solver == "unipc" for c in (self.band.default, self.band.alternative))
            cuts = {"before": unipc, "after": 1}.get(self.band.noise_cut, 0) * len(NOISE_CUTS)
            runs = 2 + (self.band.check is not None) + self.band.measures_default + cuts + bool(self.band.fit_after)
        also = len(self.band.also) * -(-b // 2) if self.band is not None else 0      # on the even samples
        return rows + (runs * b + also) * self.spec.evaluations(self.steps)


def _reused_reference(opts: CalibrationOptions, pilot_data: dict) -> bool:
    """Whether the calibration reuses pilot_data's reference (one with the screen these options ask for)."""
    return "ref_final" in pilot_data and _screen_of(pilot_data) == _screen(opts.boundary_pool, opts.boundary_samples)


def planned_rows(steps: int, solver: str = "auto", options: CalibrationOptions | None = None,
                 method: str | None = None, solver_options: dict | None = None) -> int:
    """The model rows a fresh `thermo_grid(den, steps, solver, ...)` may spend at most (the bound it states
    before it starts; stages its pilot may skip count as run)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    opts = CalibrationOptions() if options is None else options
    plan = _Plan.of(int(steps), solver, method, solver_options, opts.candidates)
    return plan.rows(_sized(opts, plan, {}), {})


def _sized(opts: CalibrationOptions, plan: _Plan, pilot_data: dict) -> CalibrationOptions:
    """`opts` with pilot_batch and ref_steps set: "thorough" takes THOROUGH, a row budget (cost "low",
    "default" or a number) the largest pilot that fits it with `reference_steps(steps)`."""
    for name, least in (("pilot_batch", 2), ("ref_steps", 8)):
        v = getattr(opts, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    cost = opts.cost if opts.cost is not None else ("default" if plan.band is not None else "thorough")
    if cost == "thorough":
        return replace(opts, pilot_batch=opts.pilot_batch or THOROUGH[0], ref_steps=opts.ref_steps or THOROUGH[1])
    if isinstance(cost, str) and cost in COSTS:
        budget = row_budget(cost, plan.steps)
    elif isinstance(cost, (int, np.integer)) and not isinstance(cost, bool) and cost >= 1:
        budget = int(cost)
    else:
        raise ValueError(f"cost must be one of {list(COSTS)} or a number of model rows, got {cost!r}")
    opts = replace(opts, ref_steps=opts.ref_steps or reference_steps(plan.steps))
    if opts.pilot_batch is not None:
        return opts
    if _reused_reference(opts, pilot_data):
        # a reference passed in fixes the batch (and is paid for): its runs cost what they cost
        b = int(pilot_data["ref_final"].shape[0]) - _screen(opts.boundary_pool, opts.boundary_samples)[0]
        need = plan.rows(replace(opts, pilot_batch=b), pilot_data)
        if need > budget and opts.cost is not None:
            raise ValueError(f"pilot_data holds a reference of {b} samples, whose runs need {need} model rows, more "
                             f"than cost={cost!r} allows ({budget}): pass cost='thorough' or a number of rows, or "
                             "a smaller pilot")
        return replace(opts, pilot_batch=b)
    fits = [b for b in range(8, 4097, 2) if plan.rows(replace(opts, pilot_batch=b), pilot_data) <= budget]
    if not fits:
        need = plan.rows(replace(opts, pilot_batch=8), pilot_data)
        raise ValueError(f"cost={cost!r} ({budget} model rows) is too small for this calibration: a pilot of 8 "
                         f"samples needs {need}")
    return replace(opts, pilot_batch=fits[-1])


def _dtype_device(den, dtype, device) -> tuple[torch.dtype, torch.device]:
    """thermo_grid's dtype= and device=, each defaulting to the model's (`pilot_dtype_device`)."""
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (a half-precision model calibrates in "
                        f"float32 and gets its inputs in its own dtype), got {dtype!r}")
    if dtype is None or device is None:
        found = pilot_dtype_device(den, say=dtype is None)
        dtype, device = dtype or found[0], found[1] if device is None else device
    return dtype, torch.device(device)


def _progress_bar(progress: bool | None, planned: int, desc: str):
    """A tqdm bar over `planned` model rows after a line stating them, or None (progress False, or None and
    stderr is not a terminal)."""
    import sys
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm
    tqdm.write(f"{desc}: at most {planned:,} model rows", file=sys.stderr)
    return tqdm(total=planned, unit="row", unit_scale=True, desc=desc, file=sys.stderr, leave=False)


def _density_weights(opts: CalibrationOptions, solver: str, steps: int, method: str) -> dict:
    """The "error" density's weights: the options', checked, else `error_grid_defaults(solver, steps)`."""
    defaults = error_grid_defaults(solver, steps)
    floor = _weight("floor", opts.floor, defaults["floor"])
    if not floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor!r}")
    critical = _weight("critical", opts.critical, defaults["critical"])
    switch = 0.0 if method == "length" else _weight("switch", opts.switch, defaults["switch"])
    amplify = _weight("amplify", opts.amplify, defaults["amplify"])
    if not 0.0 <= critical <= 1.0 - floor:
        raise ValueError(f"critical must lie in [0, 1 - floor], got {critical!r}")
    karras_weight = _weight("karras_weight", opts.karras_weight, defaults["karras_weight"])
    if not karras_weight <= 1.0:
        raise ValueError(f"karras_weight must lie in [0, 1], got {karras_weight!r}")
    return {"floor": floor, "critical": critical, "switch": switch, "amplify": amplify,
            "karras_weight": karras_weight}


_TWINS_KEYS = ("sigma", "D")      # what every use of a twins pilot reads; the rest is checked where present
_REF_KEYS = ("ref_sigma", "ref_x", "ref_D", "ref_noise", "ref_final", "ref_weight")


def _made_for(den, model, shape, pilot_data: dict) -> dict:
    """What a pilot was measured with: reuse with anything else ranks candidates against the wrong reference."""
    from .auto import _fingerprint_now
    sch = den.schedule
    return {"schedule": [repr(sch), float(sch.sigma_min), float(sch.sigma_max)],
            "prediction": getattr(den, "prediction", None), "sample_shape": [int(v) for v in shape],
            "model": _fingerprint_now(model), "model_id": id(model), "shapes": _shapes(pilot_data)}


def _stamp(pilot_data: dict, den, model, sample_shape) -> None:
    """Record in `pilot_data` what it was made for (`_made_for`), for `_check_pilot` when it is reused."""
    if "ref_final" in pilot_data:
        sample_shape = tuple(pilot_data["ref_final"].shape[1:])
    sample_shape = (sample_shape or getattr(den, "sample_shape", None)
                    or pilot_data.get("made_for", {}).get("sample_shape"))
    if sample_shape is not None:
        pilot_data["made_for"] = _made_for(den, model, sample_shape, pilot_data)


def _shapes(pilot_data: dict) -> dict:
    return {k: list(v.shape) for k, v in pilot_data.items() if isinstance(v, (np.ndarray, torch.Tensor))}


def _check_pilot(pilot_data: dict, den, model, sample_shape) -> None:
    """Refuse a reused pilot that is malformed or was made for another model, schedule or sample shape,
    naming the field (ValueError). A pilot made by `pilot()` / `reference()` directly carries no record of
    its model: its reference's first node is evaluated again (`_probe_pilot`); a pilot of the twins part
    alone is checked by its shapes only."""
    def bad(field, why):
        raise ValueError(f"pilot_data[{field!r}] {why}: pass the pilot of an earlier calibration of this model "
                         "(grid.pilot / config.pilot), or leave pilot_data out to run a fresh one")

    def array(key, dims):
        v = pilot_data[key]
        v = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.ndim != dims or not np.issubdtype(v.dtype, np.number) or not np.isfinite(v).all():
            bad(key, f"must be a finite {dims}-d array, got shape {v.shape}")
        return v

    def descending(key):
        v = array(key, 1)
        if len(v) < 2 or not (np.diff(v) < 0).all() or v[-1] <= 0:
            bad(key, "must be positive noise levels in descending order")
        return v

    sch = den.schedule
    for keys in (_TWINS_KEYS, _REF_KEYS):        # a pilot may hold either part or both, each part whole
        missing = [k for k in keys if k not in pilot_data]
        if missing and len(missing) < len(keys):
            bad(missing[0], "is missing")
    shape = None
    if "sigma" in pilot_data:
        sig = descending("sigma")
        d = array("D", 3)
        if d.shape[0] != len(sig) or ("log_sep" in pilot_data and array("log_sep", 2).shape != d.shape[:2]):
            bad("D", f"has shape {d.shape}: one row per pilot node ({len(sig)}) and twin pair")
        for key in ("t", "rate", "spread"):
            if key in pilot_data and array(key, 1).shape != sig.shape:
                bad(key, f"must hold one value per pilot node ({len(sig)})")
    if "ref_sigma" in pilot_data:
        ref_sig = descending("ref_sigma")
        if not np.allclose(ref_sig[[0, -1]], [sch.sigma_max, sch.sigma_min], rtol=1e-6):
            bad("ref_sigma", f"spans [{ref_sig[-1]:.4g}, {ref_sig[0]:.4g}], not this schedule's "
                             f"[{sch.sigma_min:.4g}, {sch.sigma_max:.4g}]: it was made for another schedule")
        final = pilot_data["ref_final"]
        if not isinstance(final, torch.Tensor) or final.dim() < 2 or not bool(torch.isfinite(final).all()):
            bad("ref_final", "must be a finite tensor [B, ...] of converged samples")
        b, shape = final.shape[0], tuple(final.shape[1:])
        noise = pilot_data["ref_noise"]
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(final.shape) or not bool(
                torch.isfinite(noise).all()):
            bad("ref_noise", f"must be a finite tensor of ref_final's shape {tuple(final.shape)}")
        weight = array("ref_weight", 1)
        if weight.shape != (b,) or abs(float(weight.sum()) - 1.0) > 1e-6:
            bad("ref_weight", f"must hold {b} weights summing to 1")
        for key in ("ref_x", "ref_D"):
            v = array(key, 3)
            if v.shape[:2] != (len(ref_sig), b) or v.shape[2] > final[0].numel():
                bad(key, f"has shape {v.shape}: one row per reference node ({len(ref_sig)}) and sample ({b})")
    made = pilot_data.get("made_for")
    if made is not None:
        now = _made_for(den, model, made["sample_shape"], pilot_data)
        for key, was in made.get("shapes", {}).items():
            if key in now["shapes"] and now["shapes"][key] != was:
                bad(key, f"has shape {tuple(now['shapes'][key])}, not the {tuple(was)} it was made with")
        if made["schedule"] != now["schedule"]:
            bad("made_for", f"says it was made for the schedule {made['schedule'][0]}, not {now['schedule'][0]}")
        if made["model"] != now["model"] or made["prediction"] != now["prediction"]:
            bad("made_for", "says it was made for another model (its parameters' fingerprint or prediction differs)")
        shape = tuple(made["sample_shape"])
    if sample_shape is None:
        sample_shape = getattr(den, "sample_shape", None)
    if shape is not None and sample_shape is not None and tuple(sample_shape) != shape:
        bad("ref_final" if made is None else "made_for",
            f"holds samples of shape {shape}, not the sample_shape {tuple(sample_shape)} asked for")
    sample_shape = sample_shape if sample_shape is not None else shape
    if "sigma" in pilot_data and sample_shape is not None and d.shape[2] > math.prod(sample_shape):
        bad("D", f"holds {d.shape[2]} coordinates per sample, more than a sample of shape {tuple(sample_shape)} has")


def _probe_pilot(pilot_data: dict, den, model) -> int:
    """For a reused reference whose model cannot be fingerprinted (another function than the one it was made
    with, or a pilot without a record): the model's denoised output on two of its samples at its first node,
    against the recorded one. Returns the batched evaluations it spent (0 or 1)."""
    made = pilot_data.get("made_for") or {}
    if "ref_final" not in pilot_data or made.get("model") is not None or made.get("model_id") == id(model):
        return 0
    recorded = torch.as_tensor(pilot_data["ref_D"][0, :2], dtype=torch.float64)
    x = pilot_data["ref_noise"][:2]
    dtype, device = pilot_dtype_device(den)
    d = den(x.to(device=device, dtype=dtype), float(pilot_data["ref_sigma"][0])).reshape(len(x), -1)
    seed = pilot_data.get("ref_proj_seed")          # reference() draws its kept coordinates with seed - 1
    if seed is None and recorded.shape[1] < d.shape[1]:
        raise ValueError("pilot_data['ref_proj_seed'] is missing: it says which coordinates ref_D kept")
    keep, scale = _coordinates(d.shape[1], recorded.shape[1], torch.Generator().manual_seed(int(seed or 0) - 1))
    d = (d if keep is None else d[:, keep.to(d.device)]).double().cpu() * scale
    off = float((d - recorded).norm() / recorded.norm().clamp_min(1e-30))
    if not off <= 1e-3:
        raise ValueError(f"pilot_data was made for another model: this model's denoised output at the "
                         f"reference's first node is {off:.1e} (relative) from the recorded one; leave pilot_data "
                         "out to run a fresh pilot")
    return 1


def _pilots(den, pilot_data: dict, twins: bool, ref: bool, sample_shape, opts: CalibrationOptions,
            backend: str) -> tuple[dict, int]:
    """`pilot_data` completed with the twins pilot (if `twins`) and the reference solve (if `ref`) it lacks,
    and the evaluations that cost."""
    spent = 0
    if ref and "ref_final" in pilot_data and _screen_of(pilot_data) != _screen(opts.boundary_pool,
                                                                               opts.boundary_samples):
        # a reused reference screened otherwise than asked: solve it again rather than silently keep it
        pilot_data = {k: v for k, v in pilot_data.items() if not k.startswith("ref_")}
    if (twins and "D" not in pilot_data) or (ref and "ref_final" not in pilot_data):
        if sample_shape is None:
            sample_shape = getattr(den, "sample_shape", None)
        if sample_shape is None:
            raise ValueError("thermo_grid needs sample_shape=(...) (the shape of one sample) for the pilot run")
        batch = opts.pilot_batch
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
            raise ValueError(f"pilot_batch must be an int >= 2, got {batch!r}")
        shape = (batch, *tuple(sample_shape))
        if twins and "D" not in pilot_data:
            pilot_data.update(pilot(den, shape, pilot_steps=opts.pilot_steps, pilot_seed=opts.pilot_seed,
                                    backend=backend))
            spent += int(pilot_data["nfe"])
        if ref and "ref_final" not in pilot_data:
            pilot_data.update(reference(den, shape, ref_steps=opts.ref_steps, pilot_seed=opts.pilot_seed,
                                        backend=backend, boundary_pool=opts.boundary_pool,
                                        boundary_samples=opts.boundary_samples, pilot_steps=opts.pilot_steps))
            spent += int(pilot_data["ref_nfe"]) + int(pilot_data["ref_screen_nfe"])
    return pilot_data, spent
