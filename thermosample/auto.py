"""solver="auto": which solver, options and grid to run for a number of steps, chosen on a pilot of the model.

Three parts, each readable on its own:

* `PLAN`, the policy as data: per band of step counts a default and an alternative `Candidate` (solver,
  grid, options), challengers measured on half the pilot (`also`), an optional check on a named grid, where
  UniPC's low-noise cut is chosen, after which solvers fitted DEIS corrections are tried, and what runs
  without a calibration. What auto does at 12 steps is the row `band_for(12)`.
* `challenge`, the one rule: a challenger replaces the incumbent when its RMS error on the bulk of the
  pilot's samples is below `margin` times the incumbent's and it is no worse on all of them; and one guard,
  `worse`: the choice falls back to the band's uncalibrated default when the pilot shows it worse than that
  default beyond the pilot's interval.
* `calibrate_plan`, the one loop over a band, called by `ts.thermo_grid(den, steps, solver="auto")`, which
  returns a `SamplerConfig`: the chosen solver, options and sigmas and what they were calibrated for,
  JSON-serialisable, accepted by `ts.sample`, the CLI and both integrations.

Why each row and number is what it is: docs/calibration.md ("The plan") and docs/decisions/.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

__all__ = ["AUTO", "Band", "Candidate", "PLAN", "SamplerConfig", "band_for", "calibrate_plan", "challenge",
           "recommended", "resolve", "worse", "MARGIN", "CHALLENGE_MARGIN", "OUTLIER", "MAX_H", "NOISE_CUTS",
           "NOISE_ORDER", "GUARD_DRAWS", "GUARD_LEVEL"]

AUTO = "auto"
MARGIN = 0.6            # the alternative and `also` must beat 0.6 x the choice: a pilot misses rare samples
CHALLENGE_MARGIN = 0.8  # max(margin, 0.8) for checks, noise cuts and fits, which a pilot ranks as a large batch does
OUTLIER = 100.0         # a sample missed by over 100 x the median miss was sent to another mode
MAX_H = 0.8             # UniPC-3's longest third-order step (in log sigma) from 9 steps
NOISE_CUTS = (0.3, 0.2, 0.1)   # UniPC's noise_below tried, in units of the data's scale
NOISE_ORDER = 3         # the DEIS order of the steps below the cut
GUARD_DRAWS = 1000      # bootstrap resamples of the pilot for the guard against the uncalibrated default
GUARD_LEVEL = 0.05      # the guard's one-sided level: falls back when 95 % of the resamples say worse


@dataclass(frozen=True)
class Candidate:
    """One configuration auto can run: `solver` with `options` on `grid` ("jump", "error" or a named grid)."""
    solver: str
    grid: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """"unipc,max_h=0.8,order=3@error": the name under which the calibration's meta records its error."""
        return label(self.solver, self.options, self.grid)


@dataclass(frozen=True)
class Band:
    """The plan for every step count up to `last` (None: no upper end), from the previous band's last + 1.

    `margin` below is calibrate_plan's (MARGIN by default); "at least CHALLENGE_MARGIN" is max(margin,
    CHALLENGE_MARGIN).

    default, alternative: measured on the pilot; the alternative must win `challenge` with `margin`.
    also: measured next on the pilot's even samples (half its rows), each against the choice there; one that
        wins `challenge` with `margin` replaces it, and the check and the guard then compare on that half.
    check: measured next on the pilot, on a named grid or "jump" (no twins pilot); replaces the choice if it
        wins with at least CHALLENGE_MARGIN, every sample a run misses far counted out (`bulk`, "each").
    noise_cut: where UniPC runs are also measured with noise_below at NOISE_CUTS: "before" (each UniPC
        candidate competes with its best cut, at least CHALLENGE_MARGIN) or "after" (the chosen UniPC run
        only, before the guard), or None.
    fit_after: the solvers after which DEIS-3 with corrections fitted on half the pilot is measured on
        the other half (taken if it wins with at least CHALLENGE_MARGIN, "each").
    uncalibrated: on a named grid, what ts.sample(solver="auto") runs without a config (on the grid it is
        given), and what a calibration falls back to when the pilot shows its choice (with its noise cut)
        worse than this beyond the pilot's interval (`worse`): auto is never clearly worse than what it
        replaces.
    decision: the record in docs/decisions/ that says why (the latest; calibration.md's plan table cites all).
    """
    last: int | None
    default: Candidate
    alternative: Candidate
    uncalibrated: Candidate
    check: Candidate | None = None
    also: tuple[Candidate, ...] = ()
    noise_cut: str | None = None
    fit_after: tuple[str, ...] = ()
    decision: str = ""

    def __post_init__(self):
        both = sorted({c.solver for c in self.also} & set(self.fit_after))
        if both:    # _fit compares on the odd samples, which a run of `also` (the even ones) was not measured on
            raise ValueError(f"Band: no fit_after a solver of `also` ({both}): its run has only the even samples")
        if self.noise_cut == "after" and any(c.solver == "unipc" for c in self.also):
            raise ValueError("Band: no UniPC in `also` with noise_cut='after': its run has only the even samples")
        if self.noise_cut == "before" and self.default.solver == self.alternative.solver == "unipc":
            raise ValueError("Band: noise_cut='before' with two UniPC candidates would record one's cuts only")
        if self.noise_cut not in (None, "before", "after"):
            raise ValueError(f"Band: noise_cut must be None, 'before' or 'after', got {self.noise_cut!r}")
        from .grids import GRIDS
        if self.uncalibrated.grid not in GRIDS:     # it runs without a calibration: no pilot to place a grid
            raise ValueError(f"Band: uncalibrated must be on a named grid {sorted(GRIDS)}, got "
                             f"{self.uncalibrated.grid!r}")
        if self.check is not None and self.check.grid == "error":   # measured without the twins pilot
            raise ValueError("Band: the check must be on a named grid or 'jump', not 'error'")

    @property
    def measures_default(self) -> bool:
        """Whether the guard measures `uncalibrated` on its own (it is not the check's run)."""
        return self.uncalibrated != self.check


_UNIPC_MAX_H = Candidate("unipc", "error", {"order": 3, "max_h": MAX_H})
_IPNDM = Candidate("ipndm", "error")
_DEIS_KARRAS = Candidate("deis", "karras")
_DPMPP_2M = Candidate("dpmpp_2m", "error")
_UNIPC3_KARRAS = Candidate("unipc", "karras", {"order": 3})
_FIT = ("deis", "ipndm")

PLAN: tuple[Band, ...] = (
    Band(8, Candidate("ipndm", "jump"), Candidate("euler", "jump"), _DEIS_KARRAS,
         check=Candidate("ipndm", "karras"), fit_after=("deis",),
         decision="docs/decisions/0030-fit-after-deis-up-to-8-steps.md"),
    Band(11, _UNIPC_MAX_H, _IPNDM, _DEIS_KARRAS, check=_DEIS_KARRAS, also=(_DPMPP_2M,), fit_after=_FIT,
         decision="docs/decisions/0026-second-order-under-guidance.md"),
    Band(14, _UNIPC_MAX_H, _IPNDM, _DEIS_KARRAS, check=_DEIS_KARRAS, noise_cut="after", fit_after=_FIT,
         decision="docs/decisions/0021-noise-from-12.md"),
    Band(19, _UNIPC_MAX_H, _IPNDM, _UNIPC3_KARRAS, noise_cut="before",
         decision="docs/decisions/0023-band-to-19.md"),
    Band(None, _UNIPC_MAX_H, Candidate("unipc", "error"), _UNIPC3_KARRAS, noise_cut="after",
         decision="docs/decisions/0032-max-h-from-20-guard-after-cut.md"),
)


def band_for(steps: int) -> Band:
    """The row of PLAN that holds `steps`."""
    for band in PLAN:
        if band.last is None or steps <= band.last:
            return band
    raise AssertionError("PLAN must end with an open band (last=None)")


def label(solver: str, options: Mapping, grid: str) -> str:
    """"unipc,max_h=0.8,noise_below=0.1001,order=3@error": floats to 4 significant digits, so a label reads
    alike on every machine."""
    def value(v):
        return f"{v:.4g}" if isinstance(v, float) else v
    return solver + "".join(f",{k}={value(v)}" for k, v in sorted(options.items())) + "@" + grid


# --------------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------------
def bulk(sq, outliers: str = "shared") -> np.ndarray:
    """[B] bool: the pilot samples a comparison counts, from per-sample squared errors sq [C, B].

    "shared": all but those every run misses by over OUTLIER x the median (over the batch) of the smallest
    miss: they add alike to every run, so they say nothing about which is better. "each": all but those
    any run misses by over OUTLIER x that run's median miss: one switched sample must not decide a check
    meant for bulk error. "none": every sample."""
    sq = np.nan_to_num(np.asarray(sq, dtype=np.float64), nan=np.inf)
    if outliers == "none":
        return np.ones(sq.shape[1], dtype=bool)
    miss = np.sqrt(sq)
    if outliers == "shared":
        smallest = miss.min(0)
        finite = smallest[np.isfinite(smallest)]
        scale = float(np.median(finite)) if finite.size else 0.0
        if not scale > 0.0:     # no typical miss to measure against (all diverged, or most samples exact)
            return np.ones(sq.shape[1], dtype=bool)
        return ~(smallest > OUTLIER * scale)
    if outliers == "each":
        scale = np.array([np.median(m[np.isfinite(m)]) if np.isfinite(m).any() else np.inf for m in miss])
        return ~(miss > OUTLIER * scale[:, None]).any(0)
    raise ValueError(f"outliers must be 'shared', 'each' or 'none', got {outliers!r}")


def errors(sq, weight=None, outliers: str = "shared") -> tuple[np.ndarray, np.ndarray]:
    """(weighted RMS error of each row of sq [C, B] over all samples, the same over `bulk`)."""
    sq = np.nan_to_num(np.asarray(sq, dtype=np.float64), nan=np.inf)
    w = np.full(sq.shape[1], 1.0 / sq.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    keep = bulk(sq, outliers)

    def rms(m):
        with np.errstate(invalid="ignore"):
            return np.sqrt((sq[:, m] * w[m]).sum(1) / w[m].sum())
    return rms(np.ones_like(keep)), rms(keep)


def challenge(sq, weight=None, margin: float = MARGIN, outliers: str = "shared") -> int:
    """The one selection rule. sq [C, B]: per-sample squared errors on the pilot, row 0 the incumbent, the
    others challengers; weight [B]: the samples' weights (uniform by default). The challenger with the
    smallest error on the bulk (`bulk`; ties to the earlier row) wins if that error is below `margin`
    times the incumbent's and its error on all samples is no larger. Returns the winning row (0: keep)."""
    full, compared = errors(sq, weight, outliers)
    best = min(range(len(compared)), key=lambda k: (compared[k], k))
    return best if compared[best] < margin * compared[0] and full[best] <= full[0] else 0


def worse(sq, default_sq, weight=None, draws: int = GUARD_DRAWS, level: float = GUARD_LEVEL) -> bool:
    """The guard: True when the pilot shows a choice worse than the band's uncalibrated default beyond its
    interval. sq, default_sq [B]: their per-sample squared errors; the choice's weighted mean squared error
    must exceed the default's in all but `level` of `draws` paired bootstrap resamples of the pilot's
    samples (a fixed seed: the same pilot always decides alike). One sample sent to another mode is absent
    from about a third of the resamples, so it cannot decide alone."""
    a = np.nan_to_num(np.asarray(sq, dtype=np.float64), nan=np.inf)
    b = np.nan_to_num(np.asarray(default_sq, dtype=np.float64), nan=np.inf)
    w = np.full(len(a), 1.0) if weight is None else np.asarray(weight, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, len(a), size=(draws, len(a)))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (a[idx] * w[idx]).sum(1) / (b[idx] * w[idx]).sum(1)
    return bool(np.quantile(np.nan_to_num(ratio, nan=1.0), level) > 1.0)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """A configuration measured on the pilot: its solver, options (a noise cut may add to them), grid name,
    positive sigmas, RMS error and per-sample squared errors [B], or [len(rows)] on the pilot samples `rows`
    only (None: all)."""
    solver: str
    options: dict
    grid: str
    sigmas: np.ndarray
    error: float
    sq: np.ndarray
    rows: np.ndarray | None = None

    @property
    def candidate(self) -> Candidate:
        """What runs now, as a Candidate (a noise cut included in its options)."""
        return Candidate(self.solver, self.grid, self.options)

    @property
    def label(self) -> str:
        """The name its errors are recorded under."""
        return self.candidate.label


def _paired(run: _Run, other: _Run, weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(run's, other's per-sample squared errors, the weights) on the pilot samples both were measured on."""
    if run.rows is not None and other.rows is not None and not np.array_equal(run.rows, other.rows):
        raise ValueError("runs measured on different pilot samples cannot be compared pairwise")
    rows = run.rows if run.rows is not None else other.rows
    if rows is None:
        return np.asarray(run.sq), np.asarray(other.sq), np.asarray(weight)

    def on(r: _Run) -> np.ndarray:
        return np.asarray(r.sq) if r.rows is not None else np.asarray(r.sq)[rows]
    return on(run), on(other), np.asarray(weight)[rows]


def _compared(run: _Run, other: _Run, weight) -> dict:
    """{run's label: its RMS error, other's: its} on the pilot samples the two were compared on (`_paired`)."""
    if run.rows is None and other.rows is None:
        return {run.label: run.error, other.label: other.error}
    mine, theirs, w = _paired(run, other, weight)
    return {r.label: float(np.sqrt((np.asarray(sq, dtype=np.float64) * w).sum() / w.sum()))
            for r, sq in ((run, mine), (other, theirs))}


def _also(den, steps, cand: Candidate, run: _Run, ref, pilot_data, backend, density_kw, weight, margin
          ) -> tuple[_Run, dict, int]:
    """`cand` on the pilot's even samples against `run` there: the winner of `challenge` with `margin`."""
    import torch

    from . import calibrate
    from .solvers import evaluations
    even = np.arange(0, len(ref["ref_final"]), 2)          # the pilot's; `run` may hold these samples only
    even_ref = {"ref_noise": ref["ref_noise"][even], "ref_final": ref["ref_final"][even],
                "ref_weight": torch.as_tensor(np.asarray(weight, dtype=np.float64)[even])}
    sig = calibrate.candidate_sigmas(cand.grid, den, steps, cand.solver, ref, pilot_data, density_kw)
    err, sq = calibrate.pilot_errors(den, sig, cand.solver, even_ref, backend, dict(cand.options))
    other = _Run(cand.solver, dict(cand.options), cand.grid, sig, err, sq, rows=even)
    mine, _, w = _paired(run, other, weight)
    found = _compared(run, other, weight)
    if challenge(np.stack([np.asarray(mine, dtype=np.float64), sq]), w, margin):
        run = other
    return run, found, evaluations(cand.solver, steps)


def _measure(den, steps, cand: Candidate, ref, pilot_data, backend, density_kw) -> tuple[_Run, int]:
    """`cand` on the whole pilot: (its _Run, the evaluations per sample it cost)."""
    from . import calibrate
    from .solvers import evaluations
    sig = calibrate.candidate_sigmas(cand.grid, den, steps, cand.solver, ref, pilot_data, density_kw)
    err, sq = calibrate.pilot_errors(den, sig, cand.solver, ref, backend, cand.options)
    return _Run(cand.solver, dict(cand.options), cand.grid, sig, err, sq), evaluations(cand.solver, steps)


def _noise_cut(den, steps, run: _Run, ref, backend, margin) -> tuple[_Run, dict, int]:
    """`run` (UniPC, on the whole pilot) against the same with noise_below at each of NOISE_CUTS x the data's
    scale. The record is keyed "off" and by each cut's absolute sigma; its errors are over all samples, while
    `challenge` decides on the bulk."""
    assert run.rows is None, "a noise cut measures the whole pilot"
    from . import calibrate
    from .solvers import evaluations
    cuts = [c * calibrate.data_scale(ref) for c in NOISE_CUTS]
    tails = [{**run.options, "noise_below": c, "noise_order": NOISE_ORDER} for c in cuts]
    measured = [calibrate.pilot_errors(den, run.sigmas, run.solver, ref, backend, opts) for opts in tails]
    weight = calibrate.sample_weights(ref, len(run.sq))
    best = challenge(np.stack([run.sq] + [sq for _, sq in measured]), weight, max(margin, CHALLENGE_MARGIN))
    found = {"off": run.error, **{f"{c:.4g}": e for c, (e, _) in zip(cuts, measured)}}
    nfe = len(cuts) * evaluations(run.solver, steps)
    if best:
        err, sq = measured[best - 1]
        run = replace(run, options=tails[best - 1], error=err, sq=sq)
    return run, found, nfe


def _fit(den, steps, run: _Run, ref, backend, margin) -> tuple[_Run, dict, int]:
    """DEIS-3 with corrections fitted on the pilot's even samples (calibrate.fit_corrections), against `run` on
    the odd samples. Its grid: `run`'s moved to the reference's nodes, or, when `run` is on a named grid (no
    pilot shaped it: DEIS-3 on karras, the check or the guard's fallback), that grid with its low-noise nodes
    tuned on a surrogate of the pilot first (calibrate.surrogate_grid, no model evaluation)."""
    assert run.rows is None, "a fit splits the whole pilot into even and odd samples"
    from . import calibrate, grids
    if run.grid in grids.GRIDS:
        sig = calibrate.surrogate_grid(ref, run.sigmas, den.schedule)
    else:
        sig = calibrate.reference_nodes(run.sigmas, ref)
    b = len(run.sq)
    even, odd = np.arange(0, b, 2), np.arange(1, b, 2)
    if sig is None or not len(odd) or "ref_proj" not in ref:    # nothing to fit on: no evaluation
        return run, {}, 0
    corrections = calibrate.fit_corrections(den, sig, ref, even, backend)
    if corrections is None:         # a step's fit was not finite: counted as the whole run (an upper bound)
        return run, {}, steps
    weight = calibrate.sample_weights(ref, b)[odd]
    odd_ref = {"ref_noise": ref["ref_noise"][odd], "ref_final": ref["ref_final"][odd], "ref_weight": weight}
    options = {"corrections": corrections}
    err, sq = calibrate.pilot_errors(den, sig, "deis", odd_ref, backend, options)
    run_sq = np.asarray(run.sq, dtype=np.float64)[odd]
    w = (weight / weight.sum()).numpy()
    found = {run.label: float(np.sqrt((run_sq * w).sum())),
             f"deis,fitted@{run.grid}": err}
    if challenge(np.stack([run_sq, sq]), w, max(margin, CHALLENGE_MARGIN), outliers="each"):
        run = replace(run, solver="deis", options=options, sigmas=sig)
    return run, found, 2 * steps


def calibrate_plan(den, steps: int, ref: dict, pilot_data: dict | None, backend: str = "auto",
                   margin: float = MARGIN, density_kw: dict | None = None) -> tuple[str, dict, str, np.ndarray, dict,
                                                                                     int]:
    """Run band_for(steps) on the pilot `ref` (calibrate.reference; `pilot_data`: the twins pilot the
    "error" grid needs). Returns (solver, options, grid name, positive sigmas, meta, evaluations spent).

    What a band runs here sets the pilot's size: `calibrate._Plan.rows` counts the same runs before the pilot
    is drawn, so a change to this loop's runs belongs there too."""
    from . import calibrate
    band = band_for(steps)
    spent, meta, runs = 0, {}, []
    for cand in (band.default, band.alternative):
        measured, nfe = _measure(den, steps, cand, ref, pilot_data, backend, density_kw)
        spent += nfe
        if band.noise_cut == "before" and measured.solver == "unipc":
            measured, meta["noise_below_errors"], nfe = _noise_cut(den, steps, measured, ref, backend, margin)
            spent += nfe
        runs.append(measured)
    sq = np.stack([r.sq for r in runs])
    weight = calibrate.sample_weights(ref, sq.shape[1])
    _, compared = errors(sq, weight)
    run = runs[challenge(sq, weight, margin)]
    meta.update(candidate_errors={r.label: r.error for r in runs}, ref_steps=int(len(ref["ref_sigma"])),
                compared_errors={r.label: float(c) for r, c in zip(runs, compared)},
                shared_outliers=int((~bulk(sq)).sum()), margin=float(margin))
    for cand in band.also:
        run, found, nfe = _also(den, steps, cand, run, ref, pilot_data, backend, density_kw, weight, margin)
        meta.setdefault("also_errors", {}).update(found)      # the choice and each `also`, on the even samples
        spent += nfe
    checked = None
    if band.check is not None:
        checked, nfe = _measure(den, steps, band.check, ref, None, backend, density_kw)
        spent += nfe
        meta["check_errors"] = _compared(run, checked, weight)
        mine, theirs, w = _paired(run, checked, weight)
        if challenge(np.stack([mine, theirs]), w, max(margin, CHALLENGE_MARGIN), outliers="each"):
            run = checked
    if band.noise_cut == "after" and run.solver == "unipc":
        run, meta["noise_below_errors"], nfe = _noise_cut(den, steps, run, ref, backend, margin)
        spent += nfe
    if run.candidate != band.uncalibrated:
        if band.measures_default:
            default, nfe = _measure(den, steps, band.uncalibrated, ref, None, backend, density_kw)
            spent += nfe
        else:
            default = checked       # the check is the uncalibrated default: measured above
        meta["default_errors"] = _compared(run, default, weight)     # the run as it will be used, its cut included
        if worse(*_paired(run, default, weight)):
            run = default
    if run.solver in band.fit_after:
        run, meta["fit_errors"], nfe = _fit(den, steps, run, ref, backend, margin)
        spent += nfe
    meta["chosen"] = run.grid       # the grid the choice started from; a fit moves its nodes (`_fit`)
    return run.solver, dict(run.options), run.grid, run.sigmas, meta, spent


# --------------------------------------------------------------------------------------------------
# The config, and what runs without one
# --------------------------------------------------------------------------------------------------
CONFIG_FORMAT = "thermosample.SamplerConfig/1"


@dataclass(eq=False)
class SamplerConfig:
    """What `ts.thermo_grid(den, steps, solver="auto")` chose, and what for. JSON-serialisable
    (`save` / `load`, `to_dict` / `from_dict`).

    solver, options: the solver table's name and its options. sigmas: descending float64 sigmas [steps + 1]
    ending in 0. calibrated_for: schedule, prediction, sample_shape, dtype, device, model (a fingerprint of
    a module's parameters, else None) and pilot (its evaluations, batch and seconds). meta: what the pilot
    measured (each candidate's error, the checks'). `pilot` (not saved) is the pilot data, which
    `thermo_grid(..., pilot_data=config.pilot)` reuses at no cost.

        config = ts.thermo_grid(den, 10, solver="auto", sample_shape=(3, 32, 32))
        out = ts.sample(den, (16, 3, 32, 32), grid=config)      # runs config.solver on config.sigmas
    """
    solver: str
    options: dict
    sigmas: np.ndarray
    calibrated_for: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    pilot: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        from .grids import validate_sigmas
        self.sigmas = np.asarray(validate_sigmas(self.sigmas), dtype=np.float64)
        self.options = dict(self.options)

    @property
    def steps(self) -> int:
        return int(len(self.sigmas)) - 1

    @property
    def grid(self):
        """The sigmas as a ThermoGrid whose meta names the choice (what older code read)."""
        from .calibrate import ThermoGrid
        meta = {**self.meta, "auto": True, "solver": self.solver, "solver_options": dict(self.options)}
        grid = ThermoGrid(self.sigmas, meta)
        grid.pilot = self.pilot
        return grid

    def __eq__(self, other) -> bool:
        if not isinstance(other, SamplerConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None

    def __array__(self, dtype=None, copy=None):
        return self.sigmas if dtype is None else self.sigmas.astype(dtype)

    def to_dict(self) -> dict:
        return {"format": CONFIG_FORMAT, "solver": self.solver, "options": _jsonable(self.options),
                "sigmas": [float(s) for s in self.sigmas], "calibrated_for": _jsonable(self.calibrated_for),
                "meta": _jsonable(self.meta)}

    @classmethod
    def from_dict(cls, blob: Mapping) -> SamplerConfig:
        if not isinstance(blob, Mapping) or blob.get("format") != CONFIG_FORMAT:
            raise ValueError(f"not a saved SamplerConfig (expected format {CONFIG_FORMAT!r})")
        from .solvers import SOLVERS, check_options
        for key, kind in (("solver", str), ("options", dict), ("sigmas", list), ("calibrated_for", dict),
                          ("meta", dict)):
            if not isinstance(blob.get(key, {}), kind):
                raise ValueError(f"SamplerConfig {key!r} must be a {kind.__name__}, got {blob.get(key)!r}")
        if blob["solver"] not in SOLVERS:
            raise ValueError(f"SamplerConfig solver {blob['solver']!r} is not one of {sorted(SOLVERS)}")
        try:
            check_options(blob["solver"], blob["options"])
        except TypeError as exc:
            raise ValueError(f"SamplerConfig options: {exc}") from None
        config = cls(blob["solver"], blob["options"], np.asarray(blob["sigmas"], dtype=np.float64),
                     dict(blob.get("calibrated_for", {})), dict(blob.get("meta", {})))
        if config.sigmas[-1] != 0:
            raise ValueError("SamplerConfig sigmas must end in 0")
        return config

    def save(self, path) -> str:
        """Write the config as JSON; returns the path."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return str(path)

    @classmethod
    def load(cls, path) -> SamplerConfig:
        """Read a config written by `save`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={_short(v)}" for k, v in sorted(self.options.items()))
        return f"SamplerConfig({self.solver}{opts}, steps={self.steps})"


def _short(v) -> str:
    return "[...]" if isinstance(v, list) else repr(v)


def _jsonable(v):
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def fingerprint(model) -> str | None:
    """sha256 of a torch module's parameters and buffers (names, shapes, dtypes, values); None for a
    model without them (a closure)."""
    import torch
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return None
    h = hashlib.sha256()
    for name, t in state().items():
        if isinstance(t, torch.Tensor):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())   # 0-d too
    return h.hexdigest()


_FINGERPRINTS: dict = {}


def _fingerprint_now(model) -> str | None:
    """`fingerprint`, recomputed only when a parameter or buffer changed (torch's in-place version counters)."""
    state = getattr(model, "state_dict", None)
    if not callable(state):
        return None
    key = (id(model), tuple((t.data_ptr(), t._version) for t in state().values() if hasattr(t, "_version")))
    if key not in _FINGERPRINTS:
        if len(_FINGERPRINTS) >= 8:
            _FINGERPRINTS.clear()
        _FINGERPRINTS[key] = fingerprint(model)
    return _FINGERPRINTS[key]


_WARNED: set = set()


def check_made_for(config: SamplerConfig, den, sample_shape, solver: str, options: dict) -> None:
    """Warn once per config and field when `config` runs with another solver, options, schedule, prediction,
    sample shape or (fingerprinted) model than it was calibrated for."""
    made = config.calibrated_for or {}
    found = {"solver": (label(solver, options, "")[:-1], label(config.solver, config.options, "")[:-1])}
    if (solver, options) == (config.solver, config.options):
        found.pop("solver")
    for name, now in (("schedule", repr(getattr(den, "schedule", None))),
                      ("prediction", getattr(den, "prediction", None)),
                      ("sample_shape", [int(v) for v in sample_shape])):
        if name in made and made[name] != now and not (name == "schedule" and made[name] == _older_repr(now)):
            found[name] = (now, made[name])
    if made.get("model") is not None:
        now = _fingerprint_now(getattr(den, "model", None))
        if now != made["model"]:
            found["model"] = ("another model" if now else "a model without parameters", made["model"][:12])
    for name, (now, then) in found.items():
        if (id(config), name) not in _WARNED:
            _WARNED.add((id(config), name))
            warnings.warn(f"this SamplerConfig was calibrated for {name} {then}, not {now}: its choice may not "
                          f"suit this run; calibrate again with ts.thermo_grid(..., solver='auto')", UserWarning,
                          stacklevel=4)


def _older_repr(schedule_repr: str) -> str:
    """A schedule's repr as configs recorded it before repr named every parameter (VE's sigma range,
    VPLinear's betas, DiscreteVP's table): such a record still matches the schedule it names."""
    return re.sub(r"\w+=[^,()]*, (?=.*t_min=)|, alphas_cumprod=\w+", "", schedule_repr)


def is_config(grid) -> bool:
    """Whether `grid` carries a choice: a SamplerConfig, or a ThermoGrid of an older auto calibration."""
    return isinstance(grid, SamplerConfig) or bool((getattr(grid, "meta", None) or {}).get("auto"))


_SAID = set()


def resolve(grid, steps: int | None, stacklevel: int = 3) -> tuple[str, dict]:
    """(solver, options) that solver="auto" runs: a config's choice, else the plan's uncalibrated default
    for the step count (said once per band)."""
    from .solvers import SOLVERS
    if isinstance(grid, SamplerConfig):
        return grid.solver, dict(grid.options)
    meta = getattr(grid, "meta", None) or {}
    if meta.get("auto") and meta.get("solver") in SOLVERS:
        return meta["solver"], dict(meta.get("solver_options") or {})
    n = steps if steps is not None else (len(grid) - 1 if not isinstance(grid, str) and grid is not None else 20)
    band = band_for(int(n))
    if band.last not in _SAID:
        _SAID.add(band.last)
        run = band.uncalibrated
        warnings.warn(f"solver='auto' without a calibrated config runs the plan's uncalibrated default for {n} steps, "
                      f"{label(run.solver, run.options, 'the given grid')}; calibrate with "
                      f"ts.thermo_grid(den, {n}, solver='auto') and pass grid=config", UserWarning,
                      stacklevel=stacklevel)
    return band.uncalibrated.solver, dict(band.uncalibrated.options)


def runnable(solver: str | None, grid, steps: int | None, options: dict,
             stacklevel: int = 2) -> tuple[str, dict, object]:
    """(solver, options, grid) a run takes from what the user passed: solver None is the config's solver when
    `grid` carries one, else "euler"; "auto" is `resolve`'s choice (its options under the given ones); a
    SamplerConfig grid becomes its sigmas. `stacklevel`: the frame resolve's warning names, counted from here
    (2: runnable's caller)."""
    if solver is None:
        solver = AUTO if is_config(grid) else "euler"
    if solver == AUTO:
        solver, chosen = resolve(grid, steps, stacklevel + 1)
        options = {**chosen, **options}
    return solver, options, grid.sigmas if isinstance(grid, SamplerConfig) else grid


def recommended(nfe: int) -> dict:
    """The configuration to take for `nfe` model evaluations (5-50):

        config = ts.thermo_grid(den, nfe, solver="auto", sample_shape=...)   # the pilot picks solver and grid
        out = ts.sample(den, shape, grid=config)
    """
    return {"solver": AUTO, "grid": "calibrated", "steps": int(nfe)}
