"""solver="auto" at 9-11 steps also measures DPM-Solver++(2M) on its "error" grid, on the pilot's even samples
(docs/decisions/0026): under strong classifier-free guidance (bench_guided, w = 7, NFE 10) the band's
higher-order candidates (UniPC-3 with max_h, iPNDM) and its check (DEIS-3 on karras) measured 2.6-4 x the
second-order run, on the pilot and on fresh noise alike."""
from __future__ import annotations

import numpy as np
import pytest

import thermosample as ts
from thermosample import auto, calibrate, toy

DPMPP_2M = auto.Candidate("dpmpp_2m", "error")


def _den():
    return toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")


def _only_good(rig_pilot_errors, good: str) -> list:
    """Make every pilot run but `good`'s miss by 30 x more; returns the (solver, samples) of each run, as run."""
    return rig_pilot_errors(lambda solver, options: 1.0 if solver == good else 30.0)


def _config(den, **kw):
    return ts.thermo_grid(den, 10, solver="auto", sample_shape=(8,),
                          options=ts.CalibrationOptions(ref_steps=32, pilot_batch=16, progress=False, **kw))


def test_the_9_to_11_step_band_also_measures_dpmpp_2m_on_error_and_no_other_band_does():
    for steps in range(1, 41):
        assert auto.band_for(steps).also == ((DPMPP_2M,) if 9 <= steps <= 11 else ()), steps
    assert auto.band_for(10).decision.endswith("0026-second-order-under-guidance.md")


def test_the_price_counts_half_a_run_and_keeps_the_default_tier_s_pilot():
    """The third candidate runs on the even samples, ceil(B / 2) rows per step: at 10 steps the default tier
    keeps its pilot of 38 (5,966 of 6,000 rows; a full run would have cost two samples of the pilot), the low
    tier its 18."""
    plan = calibrate._Plan.of(10, "auto", None, None, None)
    for cost, batch, rows in (("default", 38, 5966), ("low", 18, 2826)):
        opts = ts.CalibrationOptions(cost=cost)
        assert calibrate._sized(opts, plan, {}).pilot_batch == batch
        assert calibrate.planned_rows(10, "auto", opts) == rows <= calibrate.row_budget(cost, 10)


def test_auto_takes_dpmpp_2m_when_the_pilot_shows_the_higher_orders_far_worse(rig_pilot_errors):
    """A pilot on which every run but DPM-Solver++(2M)'s misses by 30 x more (as the higher orders did on the
    guided digits model at w = 7): auto at 10 steps ends on DPM-Solver++(2M) on its "error" grid, measured on
    the even samples, past the check and the guard (compared on those samples); its sigmas are that candidate's.
    Without the candidate the band could only end on UniPC, iPNDM or DEIS."""
    batches = _only_good(rig_pilot_errors, "dpmpp_2m")
    den = _den()
    config = _config(den)
    assert (config.solver, config.options, config.meta["chosen"]) == ("dpmpp_2m", {}, "error")
    assert ("dpmpp_2m", 8) in batches and ("deis", 16) in batches
    assert list(config.meta["also_errors"]) == ["unipc,max_h=0.8,order=3@error", DPMPP_2M.label]
    assert list(config.meta["check_errors"]) == list(config.meta["default_errors"]) == [DPMPP_2M.label, "deis@karras"]
    sig = calibrate.candidate_sigmas("error", den, 10, "dpmpp_2m", config.pilot, config.pilot)
    np.testing.assert_array_equal(config.sigmas, np.append(sig, 0.0))
    # the check's recorded error is its RMS on the even samples it was compared on, not on the whole pilot
    karras = calibrate.candidate_sigmas("karras", den, 10, "deis", config.pilot, None)
    full, sq = calibrate.pilot_errors(den, karras, "deis", config.pilot)
    w = calibrate.sample_weights(config.pilot, len(sq)).numpy()[::2]
    on_half = float(np.sqrt((np.asarray(sq)[::2] * w).sum() / w.sum()))
    for record in ("check_errors", "default_errors"):
        assert config.meta[record]["deis@karras"] == pytest.approx(on_half, rel=1e-9), record
    assert abs(on_half / full - 1) > 1e-3
    assert "fit_errors" not in config.meta       # no fit after DPM-Solver++(2M)


def test_the_check_still_replaces_it_on_the_half_it_was_measured_on(rig_pilot_errors):
    """When DEIS-3 on karras (the check) is far better still, it replaces DPM-Solver++(2M) by the check's rule,
    compared on the even samples both were measured on."""
    rig_pilot_errors(lambda solver, options: {"dpmpp_2m": 1.0, "deis": 1e-2}.get(solver, 100.0))
    config = _config(_den())
    assert config.meta["chosen"] == "karras" and list(config.meta["check_errors"])[0] == DPMPP_2M.label


def test_on_an_unguided_mixture_the_band_keeps_its_choice():
    """The third candidate must win by the band's margin (0.6 x the choice's error on the same samples): on the
    10-step mixture of tests/test_calibrate.py's auto10 UniPC-3 with max_h stays the choice."""
    config = _config(_den(), cost="thorough")
    assert (config.solver, config.options) == ("unipc", {"order": 3, "max_h": auto.MAX_H})
    errors = config.meta["also_errors"]
    assert errors[DPMPP_2M.label] >= auto.MARGIN * errors["unipc,max_h=0.8,order=3@error"]


def test_a_band_refuses_a_fit_after_a_solver_measured_on_half_the_pilot():
    """A run of `also` holds the even samples only; the fit compares on the odd ones. A band that would fit after
    such a run, or cut the noise of one (the cut measures the whole pilot), is refused when the plan is written,
    as is a cut before the pair when both are UniPC (the record holds one run's cuts); two runs on different
    samples are never paired."""
    with pytest.raises(ValueError, match="fit_after"):
        auto.Band(11, auto.Candidate("unipc", "error"), auto.Candidate("ipndm", "error"),
                  auto.Candidate("deis", "karras"), also=(DPMPP_2M,), fit_after=("dpmpp_2m",))
    with pytest.raises(ValueError, match="only the even samples"):
        auto.Band(11, auto.Candidate("ipndm", "error"), auto.Candidate("euler", "error"),
                  auto.Candidate("deis", "karras"), also=(auto.Candidate("unipc", "error"),), noise_cut="after")
    with pytest.raises(ValueError, match="two UniPC candidates"):
        auto.Band(11, auto.Candidate("unipc", "error"), auto.Candidate("unipc", "karras"),
                  auto.Candidate("deis", "karras"), noise_cut="before")
    b = 6
    even = auto._Run("deis", {}, "karras", np.ones(3), 1.0, np.ones(3), rows=np.arange(0, b, 2))
    odd = auto._Run("deis", {}, "karras", np.ones(3), 1.0, np.ones(3), rows=np.arange(1, b, 2))
    full = auto._Run("deis", {}, "karras", np.ones(b), 1.0, np.arange(b, dtype=float))
    with pytest.raises(ValueError, match="different pilot samples"):
        auto._paired(even, odd, np.full(b, 1 / b))
    mine, theirs, w = auto._paired(even, full, np.full(b, 1 / b))
    np.testing.assert_array_equal(theirs, [0.0, 2.0, 4.0])


def test_a_band_refuses_grids_its_check_and_default_cannot_be_measured_on():
    """The check and the guard's default are measured without the twins pilot, and the default also runs with no
    calibration at all: an "error" check or a calibrated default would fail deep in the density (or sample an
    uncalibrated config on a grid nobody placed), so the band is refused when written; so is a misspelt cut,
    which would otherwise switch the noise cuts off silently."""
    unipc, ipndm = auto.Candidate("unipc", "error"), auto.Candidate("ipndm", "error")
    deis = auto.Candidate("deis", "karras")
    with pytest.raises(ValueError, match="check must be on a named grid"):
        auto.Band(11, unipc, ipndm, deis, check=auto.Candidate("deis", "error"))
    for grid in ("error", "jump"):
        with pytest.raises(ValueError, match="uncalibrated must be on a named grid"):
            auto.Band(11, unipc, ipndm, auto.Candidate("deis", grid))
    with pytest.raises(ValueError, match="noise_cut must be"):
        auto.Band(11, unipc, ipndm, deis, noise_cut="afer")
    auto.Band(11, unipc, ipndm, deis, check=auto.Candidate("ipndm", "jump"), noise_cut="after")   # allowed


def test_every_also_candidate_keeps_its_pilot_error_in_meta(monkeypatch):
    """A band with two `also` candidates records both errors, each beside the choice it met."""
    band = auto.band_for(10)
    two = auto.Band(None, band.default, band.alternative, band.uncalibrated, check=band.check,
                    also=(auto.Candidate("euler", "error"), DPMPP_2M))
    monkeypatch.setattr(auto, "PLAN", (two,))
    errors = _config(_den()).meta["also_errors"]
    assert {"euler@error", DPMPP_2M.label} <= set(errors) and all(np.isfinite(v) for v in errors.values())


def test_a_second_also_candidate_meets_the_first_s_winner_on_the_same_even_samples(monkeypatch, rig_pilot_errors):
    """When the first `also` candidate wins (its run holds the even samples only), the next one still runs on
    all the pilot's even samples and is compared with it there, not on half of that half."""
    band = auto.band_for(10)
    two = auto.Band(None, band.default, band.alternative, band.uncalibrated, check=band.check,
                    also=(auto.Candidate("euler", "error"), DPMPP_2M))
    monkeypatch.setattr(auto, "PLAN", (two,))
    batches = _only_good(rig_pilot_errors, "euler")
    config = _config(_den())
    assert ("euler", 8) in batches and ("dpmpp_2m", 8) in batches           # pilot of 16: 8 even samples
    assert config.solver == "euler" and list(config.meta["also_errors"])[-1] == DPMPP_2M.label
