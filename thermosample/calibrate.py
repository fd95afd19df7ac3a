"""Time grids calibrated from a pilot run of the model itself (THEORY.md §6).

The pilot integrates the probability-flow ODE once, on a small batch and a fine grid uniform in
log sigma, with a fixed pilot seed (so the grid never depends on the seed of the final run). It records

- the dissipation rate r(t) = E||nu||^2 of every evaluation (the ThermoReport profile), and
- the denoised estimates D_j at every pilot noise level, from which the speed ||dD/dlambda|| and the
  acceleration ||d^2D/dlambda^2|| of the denoiser along the trajectories follow by divided differences
  (lambda = -log sigma, the natural time of the exponential-integrator solvers: Euler/DDIM and
  DPM-Solver++ in data-prediction form are exact when D is constant in lambda).

Two step densities in lambda are built from these measurements:

    "length":  rho(lambda) ∝ sqrt(r(t)) |dt/dlambda|             equal thermodynamic length (Sivak & Crooks 2012)
    "error":   rho(lambda) ∝ ||d^p D / dlambda^p||^(1/(p+1))     equidistributed local truncation error

where p is the order of the solver (1 for Euler/DDIM, 2 for Heun and DPM-Solver++(2M)): a step of size h
makes a local error ~ h^(p+1) ||D^(p)||, and for a fixed number of steps the sum of local errors is
smallest when h^(p+1) ||D^(p)|| is the same in every step, i.e. h ∝ ||D^(p)||^(-1/(p+1)). Near the
critical (speciation) time the denoiser changes fastest (THEORY.md §5), so this concentrates steps there.
The default ("blend") averages the two normalised densities, smooths the result and mixes in a uniform-in-
lambda floor of weight 1/2. That choice came out of benchmarks/bench_quality.py: the pure error density
wins clearly at 20-50 evaluations but, being an asymptotic (small-step) argument, starves regions at
6-10 evaluations, and abrupt changes of step size hurt the multistep extrapolation of DPM-Solver++(2M);
the thermodynamic length alone follows the data's transport, not the solver's error. `ThermoGrid` is a float64 numpy array (descending sigmas ending in 0)
that `ts.sample(..., grid=...)` accepts directly, with `save(path)` / `ThermoGrid.load(path)`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from .grids import validate_sigmas

__all__ = ["ThermoGrid", "thermo_grid", "pilot", "density", "place"]

ORDER = {"euler": 1, "ddim": 1, "euler_ancestral": 1, "euler_maruyama": 1, "heun": 2, "dpmpp_2m": 2}


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
    def load(cls, path) -> "ThermoGrid":
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
          backend: str = "auto") -> dict:
    """Run the pilot: `solver` on `pilot_steps` steps uniform in log sigma, batch shape [B, ...].

    Returns a dict of numpy arrays: sigma [J] (descending pilot noise levels, excluding 0), t [J] (their
    physical times), D [J, B, n] (denoised estimates, float64), rate [J] (batch-mean ||nu||^2 per
    evaluation, from the ThermoReport), and nfe (model evaluations spent).
    """
    from .sampler import sample

    if isinstance(pilot_steps, bool) or not isinstance(pilot_steps, int) or pilot_steps < 4:
        raise ValueError(f"pilot_steps must be an int >= 4, got {pilot_steps!r}")
    sch = den.schedule
    sig = np.exp(np.linspace(math.log(sch.sigma_max), math.log(sch.sigma_min), pilot_steps))
    grid = np.append(sig, 0.0)
    saved = []

    def keep(info):
        saved.append(info["denoised"].detach().double().reshape(info["denoised"].shape[0], -1).cpu())

    out = sample(den, shape, grid=grid, solver=solver, seed=pilot_seed, backend=backend, track=True,
                 callback=keep, progress=False, dtype=torch.float64)
    t_eval, rate = out.thermo.profile()  # sorted ascending in t
    t = np.asarray(sch.sigma_to_t(sig), dtype=np.float64)
    r = np.interp(t, t_eval, rate)
    return {"sigma": sig, "t": t, "D": torch.stack(saved).numpy(), "rate": r, "nfe": out.nfe}


def _smooth(y: np.ndarray, passes: int = 1) -> np.ndarray:
    for _ in range(passes):
        y = np.concatenate([y[:1], 0.25 * y[:-2] + 0.5 * y[1:-1] + 0.25 * y[2:], y[-1:]]) if y.size > 2 else y
    return y


def density(p: dict, schedule, method: str = "blend", order: int = 2, floor: float = 0.5, passes: int = 4):
    """Step density on the pilot's lambda = -log sigma nodes, normalised to integrate to 1.

    Args:
        p: the pilot dict (see `pilot`).
        schedule: the model's Schedule (for dt/dlambda in the thermodynamic length).
        method: "error" (equidistributed local error, order `order`), "length" (equal thermodynamic
            length) or "blend" (the mean of the two normalised densities).
        order: solver order p (1 or 2) for method="error" / "blend".
        floor: weight of a uniform-in-lambda density mixed in (0 = none).
        passes: smoothing passes (1-2-1 filter over the pilot nodes) before the floor is mixed in.
    Returns:
        (lam [J] ascending, rho [J]) with the trapezoid integral of rho over lam equal to 1.
    """
    lam = -np.log(p["sigma"])  # ascending (sigma descends)
    if method == "blend":
        _, a = density(p, schedule, "length", order, floor=0.0, passes=0)
        _, b = density(p, schedule, "error", order, floor=0.0, passes=0)
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
        mag = np.sqrt(np.mean(np.sum(deriv ** 2, axis=2), axis=1))  # RMS over the batch of ||D^(p)||
        w = np.interp(lam, x, mag) ** (1.0 / (order + 1))
    else:
        raise ValueError(f"method must be 'blend', 'error' or 'length', got {method!r}")
    w = _smooth(np.maximum(w, 0.0), passes)
    w = w / max(np.trapezoid(w, lam), 1e-300)
    span = lam[-1] - lam[0]
    rho = (1 - floor) * w + floor / span
    return lam, rho / np.trapezoid(rho, lam)


def place(lam: np.ndarray, rho: np.ndarray, n: int) -> np.ndarray:
    """n lambda values (ascending, first and last at the ends) at equal increments of the integral of rho."""
    cum = np.concatenate([[0.0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(lam))])
    cum /= cum[-1]
    return np.interp(np.linspace(0.0, 1.0, n), cum, lam)


def thermo_grid(den, steps: int, solver: str = "dpmpp_2m", pilot_steps: int = 24, pilot_batch: int = 32,
                sample_shape: tuple | None = None, method: str = "blend", floor: float = 0.5,
                pilot_seed: int = 12345, backend: str = "auto", pilot_data: dict | None = None) -> ThermoGrid:
    """A time grid calibrated from a pilot run of `den` (THEORY.md §6).

    Args:
        den: a `ts.Denoiser` (the model with its schedule).
        steps: solver steps of the final run; the grid holds steps sigmas plus a final 0 ([steps + 1]).
        solver: the solver the grid is for (sets the order p of the error density).
        pilot_steps: pilot evaluations (DPM-Solver++(2M) on a grid uniform in log sigma).
        pilot_batch: pilot batch size B.
        sample_shape: the shape of one sample (without the batch), e.g. (64,) or (1, 8, 8). Needed unless
            the denoiser exposes `sample_shape`.
        method: "blend" (default: mean of the two densities below), "error" (equidistributed local
            truncation error of the solver's order) or "length" (equal thermodynamic length, Sivak &
            Crooks 2012: equal increments of integral sqrt(E||nu||^2) dt).
        floor: weight of a uniform-in-log-sigma density mixed into the calibrated one.
        pilot_seed: seed of the pilot's noise (fixed: the grid does not depend on the final run's seed).
        backend: fused-op backend for the pilot.
        pilot_data: a pilot dict from `pilot(...)` to reuse (then no model evaluation is spent).
    Returns:
        ThermoGrid [steps + 1], descending from sigma_max to sigma_min, then 0.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if solver not in ORDER:
        raise ValueError(f"solver must be one of {sorted(ORDER)}, got {solver!r}")
    if method not in ("blend", "error", "length"):
        raise ValueError(f"method must be 'blend', 'error' or 'length', got {method!r}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor!r}")
    if pilot_data is None:
        if sample_shape is None:
            sample_shape = getattr(den, "sample_shape", None)
        if sample_shape is None:
            raise ValueError("thermo_grid needs sample_shape=(...) (the shape of one sample) for the pilot run")
        if isinstance(pilot_batch, bool) or not isinstance(pilot_batch, int) or pilot_batch < 2:
            raise ValueError(f"pilot_batch must be an int >= 2, got {pilot_batch!r}")
        pilot_data = pilot(den, (pilot_batch, *tuple(sample_shape)), pilot_steps=pilot_steps,
                           pilot_seed=pilot_seed, backend=backend)
    sch = den.schedule
    if steps == 1:
        sig = np.array([sch.sigma_max])
    else:
        lam, rho = density(pilot_data, sch, method=method, order=ORDER[solver], floor=floor)
        sig = np.exp(-place(lam, rho, steps))
        sig[0], sig[-1] = sch.sigma_max, sch.sigma_min
    meta = {"method": method, "solver": solver, "order": ORDER[solver], "floor": floor, "steps": int(steps),
            "pilot_steps": int(len(pilot_data["sigma"])), "pilot_nfe": int(pilot_data["nfe"]),
            "pilot_seed": int(pilot_seed), "schedule": repr(sch)}
    return ThermoGrid(np.append(sig, 0.0), meta)


def main(args) -> int:
    """`thermosample schedule`: calibrate a grid for the mixture oracle or the digits model and print it."""
    from . import grids, toy

    if args.model == "digits":
        from . import digits
        den, shape = digits.load_denoiser(), digits.SHAPE
    else:
        mix = toy.default_mixture()
        den, shape = mix.denoiser("condot"), (mix.dim,)
    g = thermo_grid(den, args.steps, solver=args.solver, method=args.method, pilot_steps=args.pilot_steps,
                    pilot_batch=args.pilot_batch, sample_shape=shape)
    sch = den.schedule
    k = np.append(grids.karras(args.steps, sch.sigma_min, sch.sigma_max), 0.0)
    print(f"calibrated grid for {args.model} ({sch!r}), {args.steps} steps of {args.solver}, method {args.method}; "
          f"pilot: {g.meta['pilot_nfe']} evaluations on a batch of {args.pilot_batch}")
    print(f"{'i':>3} {'sigma (calibrated)':>19} {'t':>9} {'sigma (karras)':>15}")
    for i, (a, b) in enumerate(zip(np.asarray(g), k)):
        t = float(sch.sigma_to_t(a)) if a > 0 else 0.0
        print(f"{i:>3} {a:>19.6g} {t:>9.5f} {b:>15.6g}")
    if args.save:
        print(f"wrote {g.save(args.save)}")
    return 0
