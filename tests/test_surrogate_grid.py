"""The fit after DEIS-3 on karras tunes that grid's low-noise nodes with no model evaluation
(calibrate.surrogate_grid, docs/decisions/0029): checked against an isotropic Gaussian, whose ODE and whose
denoiser's response to a state are known in closed form, so the surrogate is the model there."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import calibrate, grids

S0, DIM = 0.7, 7
pytestmark = pytest.mark.filterwarnings("ignore:the model has no parameters")      # a closure, run in float32


@pytest.fixture(scope="module")
def gaussian():
    """N(0, S0^2 I) under EDM, a 64-step reference of 32 samples, fresh noise and its exact ODE end point."""
    den = ts.toy.GaussianMixture(torch.zeros(1, DIM), S0).denoiser("edm")
    sch = den.schedule
    ref = calibrate.reference(den, (32, DIM), ref_steps=64, dtype=torch.float64)
    x_t = torch.randn(256, DIM, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * sch.sigma_max
    exact = x_t * S0 ** 2 / math.sqrt((S0 ** 2 + sch.sigma_min ** 2) * (S0 ** 2 + sch.sigma_max ** 2))
    return den, ref, x_t, exact


def _rms(den, sig, x_t, exact, **options):
    out = ts.sample(den, noise=x_t, grid=np.append(sig, 0.0), solver="deis", track=False, **options).samples
    return float((out - exact).square().mean().sqrt())


def test_the_fit_between_the_reference_nodes_finds_the_gaussian_trajectory(gaussian):
    """Corrections fitted on karras sigmas that are not the reference's nodes (its states between them taken
    cubic in log sigma) put DEIS-3 on the exact trajectory, as on the nodes (tests/test_fitted_corrections.py)."""
    den, ref, x_t, exact = gaussian
    sig = grids.make_grid("karras", 8, den.schedule)[:-1]
    assert calibrate.reference_nodes(sig, ref) is not None and not np.isin(sig[1:], ref["ref_sigma"]).any()
    corrections = calibrate.fit_corrections(den, sig, ref, np.arange(32))
    fitted, plain = _rms(den, sig, x_t, exact, corrections=corrections), _rms(den, sig, x_t, exact)
    assert fitted < 0.01 * plain, (fitted, plain)


def test_the_surrogate_tunes_the_low_noise_nodes_without_calling_the_model(gaussian):
    """For a Gaussian the surrogate's response s^2 / (s^2 + sigma^2) is D's own, so the grid it tunes at 6 steps
    lowers DEIS-3's true error from fresh noise (here 2.4 x, moving the node below the data's scale and above
    sigma_min); the model is not called; sigma_max and the nodes at or above the data's scale (about S0) stay
    karras's; the grid descends and stays in range."""
    den, ref, x_t, exact = gaussian
    sch = den.schedule
    karras = grids.make_grid("karras", 6, sch)[:-1]
    inner, calls = den.model, []
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    try:
        tuned = calibrate.surrogate_grid(ref, karras, sch)
    finally:
        den.model = inner
    assert not calls
    scale = calibrate.data_scale(ref)
    assert 0.6 < scale < 0.8
    high = karras >= calibrate.SURROGATE_BELOW * scale
    assert high.sum() >= 3 and (~high).sum() >= 2
    np.testing.assert_array_equal(tuned[high], karras[high])
    assert not np.allclose(tuned[~high], karras[~high])
    assert (np.diff(tuned) < 0).all() and tuned[-1] >= sch.sigma_min and tuned[0] == sch.sigma_max
    assert _rms(den, tuned, x_t, exact) < 0.5 * _rms(den, karras, x_t, exact)


def test_up_to_8_steps_the_fit_follows_the_guards_fallback_to_deis(rig_pilot_errors):
    """The 1-8-step band's candidates are iPNDM and Euler on "jump" and its check iPNDM on karras, so its choice
    is DEIS-3 only through the guard's fallback to DEIS-3 on karras (docs/decisions/0030). A pilot on which
    every other run misses by far more makes the guard fall back; the fit then runs on karras with its
    surrogate-tuned nodes, at two more runs of half the pilot (2 x NFE in calibration_nfe)."""
    from thermosample import auto, toy
    rig_pilot_errors(lambda solver, options: 1.0 if solver == "deis" else 100.0)     # DEIS far better
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    band = auto.band_for(6)
    assert band.fit_after == ("deis",) and band.check.solver == "ipndm"
    config = ts.thermo_grid(den, 6, solver="auto", sample_shape=(8,),
                            options=ts.CalibrationOptions(ref_steps=32, pilot_batch=16, progress=False))
    assert list(config.meta["default_errors"])[1] == "deis@karras" and config.meta["chosen"] == "karras"
    assert list(config.meta["fit_errors"]) == ["deis@karras", "deis,fitted@karras"]
    assert config.meta["calibration_nfe"] == 32 + 4 * 6 + 2 * 6        # reference, four runs, the fit
