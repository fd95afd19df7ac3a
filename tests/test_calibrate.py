"""Calibrated time grids (thermosample/calibrate.py, docs/theory.md §6) and solver="auto" (thermosample/auto.py:
its plan, its rule, its loop and the SamplerConfig it returns)."""

import copy
import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import sys
import warnings

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import auto, calibrate, grids, solvers, toy



def Opts(**kw):
    """CalibrationOptions at the size these tests were written for, cost "thorough": the pilot and reference they
    name, a twins pilot as large as the pilot, 24 steps (tests/test_calibration_price.py covers the other tiers)."""
    return ts.CalibrationOptions(**{"cost": "thorough", **kw})


@pytest.fixture(scope="module")
def mixture_pilot():
    mix = toy.default_mixture()
    den = mix.denoiser("condot")
    return mix, den, calibrate.pilot(den, (32, mix.dim), pilot_steps=24)


def test_grid_shape_endpoints_and_sample_accepts_it(mixture_pilot, tmp_path):
    mix, den, pil = mixture_pilot
    g = ts.thermo_grid(den, 10, solver="dpmpp_2m", pilot_data=pil, method="error")
    assert isinstance(g, np.ndarray) and g.shape == (11,) and g.dtype == np.float64
    assert g[-1] == 0 and np.all(np.diff(g) < 0)
    assert g[0] == pytest.approx(den.schedule.sigma_max) and g[-2] == pytest.approx(den.schedule.sigma_min)
    out = ts.sample(den, (8, mix.dim), grid=g, solver="dpmpp_2m", seed=3)
    assert out.nfe == 10 and np.array_equal(out.sigmas, np.asarray(g))
    # a torch tensor of the grid works too
    out2 = ts.sample(den, (8, mix.dim), grid=torch.as_tensor(np.asarray(g)), solver="dpmpp_2m", seed=3)
    assert torch.equal(out.samples, out2.samples)
    # save / load round trip keeps values and metadata
    path = g.save(tmp_path / "g.json")
    h = ts.ThermoGrid.load(path)
    assert np.array_equal(np.asarray(h), np.asarray(g)) and h.meta == g.meta and h.meta["solver"] == "dpmpp_2m"


def test_pilot_is_cheap_and_grid_independent_of_final_seed():
    mix = toy.default_mixture()
    den = mix.denoiser("condot")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(x.shape[0]), inner(x, t))[1]
    whole = Opts(pilot_rows=None)
    g1 = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), method="error", options=whole)
    assert len(calls) <= 24 and max(calls) == 2 * calibrate.PILOT_BATCH  # 24 evaluations of the pilot + twins
    g2 = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), method="error", options=whole)
    assert np.array_equal(np.asarray(g1), np.asarray(g2))  # fixed pilot seed: no dependence on anything else
    assert g1.meta["pilot_nfe"] == len(calls) // 2
    # by default the model sees at most 64 rows per call (2 B = 512 rows in 8 calls), with the same grid
    calls.clear()
    g3 = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), method="error")
    assert max(calls) == 64 and sum(calls) == 24 * 2 * calibrate.PILOT_BATCH and len(calls) == 24 * 8
    assert np.array_equal(np.asarray(g1), np.asarray(g3)) and g3.meta["pilot_nfe"] == 24


def test_select_states_its_cost_and_reuses_its_pilot():
    """method="select" (the default for deterministic solvers): the evaluations it spends are the ones its
    metadata states, a second call with grid.pilot spends only the candidate runs, and the result is the
    candidate with the smallest measured error."""
    mix = toy.default_mixture()
    den = mix.denoiser("condot")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(x.shape[0]), inner(x, t))[1]
    g = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), solver="dpmpp_2m",
                       options=Opts(ref_steps=64, pilot_rows=None))
    assert g.meta["method"] == "select" and len(calls) == g.meta["calibration_nfe"]   # one call per evaluation
    assert len(calls) == 24 + 64 + len(calibrate.DEFAULT_CANDIDATES) * 12
    errors = g.meta["candidate_errors"]
    assert list(errors) == list(calibrate.DEFAULT_CANDIDATES) == ["karras", "error"]
    # karras (the default) is kept unless "error" measures below MARGIN times its error
    assert g.meta["chosen"] == ("error" if errors["error"] < calibrate.MARGIN * errors["karras"] else "karras")
    # the stated error is the RMS distance of a plain ts.sample run on that grid from the converged reference
    again = ts.sample(den, noise=g.pilot["ref_noise"], grid=np.asarray(g), solver="dpmpp_2m", track=False)
    rms = float((again.samples.double() - g.pilot["ref_final"].double()).square().mean().sqrt())
    assert g.meta["boundary"] == [0, 0]
    assert rms == pytest.approx(errors[g.meta["chosen"]], rel=1e-9)
    calls.clear()
    h = ts.thermo_grid(den, 12, solver="euler", pilot_data=g.pilot,
                       options=Opts(candidates=("karras", "logsnr"), margin=1.0, pilot_rows=None))
    assert len(calls) == 2 * 12 == h.meta["calibration_nfe"]
    errs = h.meta["candidate_errors"]
    assert errs[h.meta["chosen"]] == min(errs.values())   # margin 1: the plain minimum
    fixed = grids.make_grid(h.meta["chosen"], 12, den.schedule)
    np.testing.assert_array_equal(np.asarray(h), fixed)
    with pytest.raises(ValueError, match="stochastic"):
        ts.thermo_grid(den, 12, solver="euler_ancestral", pilot_data=g.pilot, method="select")
    with pytest.raises(ValueError, match="candidates must be"):
        ts.thermo_grid(den, 12, pilot_data=g.pilot, options=Opts(candidates=("karras", "bogus")))
    for bad in (0.0, 1.5, "0.6", True):
        with pytest.raises(ValueError, match="margin must be"):
            ts.thermo_grid(den, 12, pilot_data=g.pilot, options=Opts(margin=bad))
    with pytest.raises(ValueError, match="leave candidates=None"):
        ts.thermo_grid(den, 12, solver="auto", pilot_data=g.pilot, options=Opts(candidates=("karras",)))
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="pilot_rows must be"):
            ts.thermo_grid(den, 12, pilot_data=g.pilot, options=Opts(pilot_rows=bad))


def test_jump_grid_is_the_cheapest_path():
    """The dynamic programme against brute force on a hand-built reference whose jump costs are known: with
    the end pinned at sigma_min, and with a free end priced by the last node's jump to 0 (Euler returns D
    there, so it costs E||D_j - D_min||^2)."""
    sig = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    gen = torch.Generator().manual_seed(0)
    ref = {"ref_sigma": sig, "ref_x": torch.randn(6, 3, 5, generator=gen), "ref_D": torch.randn(6, 3, 5, generator=gen)}
    x, d = ref["ref_x"].double(), ref["ref_D"].double()

    def cost(j, k):
        r = sig[k] / sig[j]
        return float((r * x[j] + (1 - r) * d[j] - x[k]).square().sum(-1).mean())

    def stop(j):
        return float((d[j] - d[5]).square().sum(-1).mean())

    import itertools
    ends = []
    for steps in (2, 3, 4):
        best = min(itertools.combinations(range(1, 5), steps - 2),
                   key=lambda mid: sum(cost(a, b) for a, b in zip((0,) + mid, mid + (5,))))
        np.testing.assert_array_equal(calibrate.jump_grid(ref, steps, free_end=False), sig[[0, *best, 5]])
        paths = [(0, *rest) for rest in itertools.combinations(range(1, 6), steps - 1)]
        free = min(paths, key=lambda p: sum(cost(a, b) for a, b in zip(p[:-1], p[1:])) + stop(p[-1]))
        np.testing.assert_array_equal(calibrate.jump_grid(ref, steps), sig[list(free)])
        ends.append(free[-1])
    assert min(ends) < 5    # the free end does leave sigma_min on this reference


def test_jump_grid_free_end_spends_euler_s_last_evaluation_where_it_helps():
    """Euler's evaluation at sigma_min barely moves x (D is nearly x there); the free end prices the final
    jump to 0 instead and may stop higher. On fresh noise (not the reference's), 4- and 6-step Euler on
    the free-end grid lands closer to the converged ODE solution than on the grid pinned at sigma_min."""
    mix = toy.default_mixture(dim=8, modes=3, seed=2)
    den = mix.denoiser("edm")
    ref = calibrate.reference(den, (128, mix.dim), ref_steps=64)
    noise = torch.randn(512, mix.dim, generator=torch.Generator().manual_seed(7)) * den.schedule.sigma_max
    converged = ts.sample(den, noise=noise, steps=64, solver="unipc", order=3, grid="logsnr").samples
    for steps in (4, 6):
        err = {}
        for free_end in (False, True):
            sig = calibrate.jump_grid(ref, steps, free_end=free_end)
            out = ts.sample(den, noise=noise, grid=np.append(sig, 0.0), solver="euler").samples
            err[free_end] = float((out - converged).square().mean().sqrt())
        assert sig[-1] > den.schedule.sigma_min
        assert err[True] < 0.95 * err[False], (steps, err)


def test_pilot_keeps_a_scaled_coordinate_subset_of_large_samples():
    """Image-sized samples: the pilot keeps keep_dims coordinates of D (memory J x B x keep_dims), scaled so
    that the densities, which use only squared norms, match those of the full pilot; twins and spread
    still use every coordinate. The reference's subset shrinks with the batch."""
    mix = toy.default_mixture(dim=2048, modes=4, seed=1)
    den = mix.denoiser("cosine")
    full = calibrate.pilot(den, (16, 2048), pilot_steps=16, keep_dims=2048)
    part = calibrate.pilot(den, (16, 2048), pilot_steps=16, keep_dims=512)
    assert full["D"].shape == (16, 16, 2048) and part["D"].shape == (16, 16, 512)
    np.testing.assert_array_equal(full["log_sep"], part["log_sep"])
    np.testing.assert_array_equal(full["spread"], part["spread"])
    ratio = np.sum(part["D"] ** 2, axis=2) / np.sum(full["D"] ** 2, axis=2)
    assert 0.8 < ratio.mean() < 1.25
    for order in (1, 2):
        lam, a = calibrate.density(full, den.schedule, order=order, critical=0.2, switch=1.0)
        _, b = calibrate.density(part, den.schedule, order=order, critical=0.2, switch=1.0)
        assert np.trapezoid(np.abs(a - b), lam) < 0.1   # L1 distance of two unit-mass densities
    with pytest.raises(ValueError, match="keep_dims"):
        calibrate.pilot(den, (4, 2048), pilot_steps=8, keep_dims=0)
    ref = calibrate.reference(den, (64, 2048), ref_steps=16)
    assert ref["ref_x"].shape == (16, 64, 1024) and ref["ref_final"].shape == (64, 2048)
    assert calibrate.reference(den, (512, 2048), ref_steps=16)["ref_D"].shape == (16, 512, 512)  # 4M numbers


def test_select_passes_the_density_weights_to_its_error_candidate(mixture_pilot):
    """method="select" with "error" as its only candidate places exactly the grid of method="error" with
    the same weights: floor=, critical=, switch= and amplify= reach the candidate (they were once ignored
    there, with the metadata still recording them)."""
    _, den, pil = mixture_pilot
    ref = calibrate.reference(den, (8, 64), ref_steps=16)
    data = {**pil, **ref}
    for kw in ({}, {"switch": 3.0, "critical": 0.3}, {"floor": 0.5, "amplify": 0.0}):
        a = ts.thermo_grid(den, 12, pilot_data=data, method="error", options=Opts(**kw))
        b = ts.thermo_grid(den, 12, pilot_data=data, method="select", options=Opts(candidates=("error",), **kw))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.meta["switch"] == a.meta["switch"] and b.meta["floor"] == a.meta["floor"]
    assert not np.array_equal(np.asarray(ts.thermo_grid(den, 12, pilot_data=data, options=Opts(switch=3.0),
                                                        method="error")),
                              np.asarray(ts.thermo_grid(den, 12, pilot_data=data, method="error")))


def test_row_chunks_slice_rows_and_per_row_keywords_only():
    """_RowChunks (the calibration's pilot_rows): the same output as one whole call, slices of at most
    `rows`, per-row keyword tensors sliced with them and other keywords passed whole; parameters() is the
    model's (its dtype and device decide the pilot's)."""
    seen = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3).double()

        def forward(self, x, t, label=None, bias=None):
            seen.append(x.shape[0])
            return self.lin(x) * label[:, None] + t[:, None] + bias

    model = Model()

    x = torch.randn(10, 3, dtype=torch.float64)
    t, label, bias = torch.rand(10, dtype=torch.float64), torch.arange(10.0, dtype=torch.float64), torch.ones(3)
    whole = model(x, t, label=label, bias=bias)
    seen.clear()
    chunked = calibrate._RowChunks(model, 3)
    torch.testing.assert_close(chunked(x, t, label=label, bias=bias), whole, rtol=0, atol=1e-15)
    assert seen == [3, 3, 3, 1]
    assert next(chunked.parameters()) is model.lin.weight
    assert list(calibrate._RowChunks(lambda x, t: x, 4).parameters()) == []


def test_karras_weight_moves_the_grid_toward_karras(mixture_pilot):
    """karras_weight: 1 gives karras's grid, 0 the placed density, in between the node-wise geometric
    blend; Heun and DEIS default to halfway (in method "error" and in the "select" candidate alike)."""
    _, den, pil = mixture_pilot
    karras = grids.make_grid("karras", 10, den.schedule)
    np.testing.assert_allclose(ts.thermo_grid(den, 10, pilot_data=pil, method="error", options=Opts(karras_weight=1.0)),
                               karras, rtol=1e-12)
    pure = np.asarray(ts.thermo_grid(den, 10, solver="heun", pilot_data=pil, method="error",
                                     options=Opts(karras_weight=0.0)))
    half = ts.thermo_grid(den, 10, solver="heun", pilot_data=pil, method="error")
    assert half.meta["karras_weight"] == 0.5 == calibrate.karras_weight_default("heun")
    assert calibrate.karras_weight_default("dpmpp_2m") == 0.0
    assert calibrate.karras_weight_default("deis") == 0.5
    np.testing.assert_allclose(np.asarray(half)[:-1], np.sqrt(pure[:-1] * karras[:-1]), rtol=1e-12)
    assert np.all(np.diff(np.asarray(half)) < 0) and not np.allclose(pure, karras)
    ref = calibrate.reference(den, (8, 64), ref_steps=16)
    sel = ts.thermo_grid(den, 10, solver="heun", pilot_data={**pil, **ref}, options=Opts(candidates=("error",)))
    np.testing.assert_array_equal(np.asarray(sel), np.asarray(half))
    with pytest.raises(ValueError, match="karras_weight"):
        ts.thermo_grid(den, 10, pilot_data=pil, method="error", options=Opts(karras_weight=1.5))


def test_uniform_density_gives_the_logsnr_grid(mixture_pilot):
    _, den, pil = mixture_pilot
    lam = -np.log(pil["sigma"])
    rho = np.ones_like(lam) / (lam[-1] - lam[0])
    sig = np.exp(-calibrate.place(lam, rho, 9))
    np.testing.assert_allclose(sig, grids.logsnr(9, den.schedule.sigma_min, den.schedule.sigma_max), rtol=1e-10)


def test_equal_thermodynamic_length_for_dirac_condot_is_uniform_in_t():
    """Dirac data under CondOT: nu = eps - y is constant along each path, so E||nu||^2 is constant in t
    (THEORY §4) and equal thermodynamic length means equal steps in t: the 'uniform' grid."""
    y = torch.linspace(-1, 1, 16, dtype=torch.float64)
    den = toy.Dirac(y).denoiser("condot")
    g = ts.thermo_grid(den, 8, method="length", sample_shape=(16,),
                       options=Opts(floor=0.0, pilot_steps=64, pilot_batch=64))
    g_t = den.schedule.sigma_to_t(np.asarray(g)[:-1])
    expected = np.linspace(den.schedule.t_max, den.schedule.t_min, 8)
    np.testing.assert_allclose(g_t, expected, atol=0.03)


def test_calibrated_grid_beats_karras_on_the_mixture(mixture_pilot):
    """The benchmark's claim at one budget: DPM++(2M), 20 evaluations, error against the converged ODE
    solution from the same noise (the test's own seed, not the benchmark's)."""
    mix, den, pil = mixture_pilot
    shape = (128, mix.dim)
    ref = ts.sample(den, shape, steps=300, solver="dpmpp_2m", grid="logsnr", seed=5, track=False, dtype=torch.float64).samples

    def err(grid):
        x = ts.sample(den, shape, steps=20, solver="dpmpp_2m", grid=grid, seed=5, track=False).samples
        return float((x.double() - ref).square().mean().sqrt())

    cal = ts.thermo_grid(den, 20, solver="dpmpp_2m", pilot_data=pil, method="error")
    e = err(cal)
    assert e < 0.8 * err("karras")
    # with the critical-time density it beats every fixed grid by far (0.007 vs 0.13 for "uniform", the
    # best; without it, 0.12: the steps at the speciation time are what decide which mode a sample joins)
    assert e < 0.5 * min(err(g) for g in ("logsnr", "kl_optimal", "uniform"))


def test_critical_density_marks_the_speciation_time(mixture_pilot):
    """The critical-time density peaks where the denoised estimates move fastest (trajectories choosing a
    mode: near sigma ~ the data's scale, lambda ~ 0, not at the ends), the default grid puts more of its
    steps there than the pure error density does, and Dirac data (D constant) has none."""
    _, den, pil = mixture_pilot
    lam, rc = calibrate.critical_density(pil)
    assert np.trapezoid(rc, lam) == pytest.approx(1.0)
    peak = lam[np.argmax(rc)]
    assert -3.0 < peak < 1.0, peak
    near = lambda g: int(np.sum(np.abs(-np.log(np.asarray(g)[:-1]) - peak) < 1.0))
    g0 = ts.thermo_grid(den, 20, pilot_data=pil, options=Opts(critical=0.0), method="error")
    g1 = ts.thermo_grid(den, 20, pilot_data=pil, method="error")
    assert g1.meta["critical"] == pytest.approx(0.15) and near(g1) > near(g0)
    assert calibrate.critical_weight(6) == 0.0 and calibrate.critical_weight(10) == pytest.approx(0.3)
    assert calibrate.critical_weight(20) == pytest.approx(0.15)
    y = torch.linspace(-1, 1, 8, dtype=torch.float64)
    dirac = toy.Dirac(y).denoiser("cosine")
    assert calibrate.critical_density(calibrate.pilot(dirac, (4, 8), pilot_steps=8)) is None


def test_bad_arguments():
    mix = toy.default_mixture()
    den = mix.denoiser("condot")
    with pytest.raises(ValueError, match="sample_shape"):
        ts.thermo_grid(den, 10)
    with pytest.raises(ValueError, match="steps"):
        ts.thermo_grid(den, 0, sample_shape=(64,))
    with pytest.raises(ValueError, match="solver"):
        ts.thermo_grid(den, 10, solver="rk45", sample_shape=(64,))
    with pytest.raises(ValueError, match="method"):
        ts.thermo_grid(den, 10, method="magic", sample_shape=(64,))
    with pytest.raises(ValueError, match="floor"):
        ts.thermo_grid(den, 10, options=Opts(floor=2.0), sample_shape=(64,))
    with pytest.raises(ValueError, match="critical"):
        ts.thermo_grid(den, 10, options=Opts(floor=0.5, critical=0.6), sample_shape=(64,))
    for bad in (-1.0, float("inf"), float("nan")):
        for name in ("switch", "amplify"):
            with pytest.raises(ValueError, match=name):
                ts.thermo_grid(den, 10, sample_shape=(64,), options=Opts(**{name: bad}))
    for bad in ("1", True, torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])):
        with pytest.raises(TypeError, match="switch"):
            ts.thermo_grid(den, 10, options=Opts(switch=bad), sample_shape=(64,))
    with pytest.raises(ValueError, match="pilot_steps"):
        calibrate.pilot(den, (4, 64), pilot_steps=2)


def test_twin_separation_for_dirac_data_contracts_like_sigma():
    """Dirac data: D = y everywhere, so each update maps x -> r x + (1 - r) y and twins separate as
    sigma_j / sigma_0 exactly: the pilot's amplification A(lambda) = sigma_min / sigma."""
    y = torch.linspace(-1, 1, 8, dtype=torch.float64)
    den = toy.Dirac(y).denoiser("cosine")
    p = calibrate.pilot(den, (6, 8), pilot_steps=12, dtype=torch.float64)
    expected = np.log(p["sigma"] / p["sigma"][0])
    np.testing.assert_allclose(p["log_sep"] - p["log_sep"][0], np.repeat(expected[:, None], 6, 1), atol=1e-6)


def test_pilot_spread_for_dirac_data_is_the_noise_spread_times_sigma():
    """Dirac data: every update is x -> r x + (1 - r) y with the same y for the whole batch, so the batch
    spread (RMS distance from the batch mean) is that of the pilot's noise times sigma_j, exactly; a pilot
    grid that is not uniform in log sigma makes a spread recorded one step late show at every node."""
    y = torch.linspace(-1, 1, 8, dtype=torch.float64)
    sig = np.array([80.0, 30.0, 20.0, 5.0, 4.0, 1.0, 0.3, 0.25, 0.02, 0.01])
    p = calibrate.pilot(toy.Dirac(y).denoiser("cosine"), (6, 8), sigmas=sig, pilot_seed=7, dtype=torch.float64)
    z = torch.randn((6, 8), generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # the pilot's noise
    z_spread = float((z - z.mean(0)).square().sum(1).mean().sqrt())
    np.testing.assert_allclose(p["spread"], sig * z_spread, rtol=1e-9)


def test_switch_term_on_a_hand_built_pilot():
    """A pilot whose D jumps once (between nodes k and k+1) and is otherwise nearly constant, twins that
    neither grow nor shrink (A = 1) and a chosen spread S: far from the jump the error density is
    (A_tot ||D''||)^(1/3) with ||D''|| the same at every node, so rho(switch=s) / rho(switch=0) ∝
    (1 + s U S_end / S)^(1/3), where U = 1 before the jump's critical mass and 0 after it."""
    J, k, s = 20, 9, 2.0
    lam = np.linspace(-3.0, 3.0, J)
    D = np.zeros((J, 2, 3))
    D[:, :, 0] = 1e-6 * lam[:, None] ** 2  # constant D'' = 2e-6, a negligible share of the critical density
    D[k + 1:, :, 1] = 1.0  # the mode choice
    spread = 5.0 * np.exp(-lam) + 1.0
    p = {"sigma": np.exp(-lam), "D": D, "log_sep": np.zeros((J, 2)), "spread": spread}
    _, w0 = calibrate.density(p, None, floor=0.0, passes=0, switch=0.0)
    _, w1 = calibrate.density(p, None, floor=0.0, passes=0, switch=s)
    gain = (w1 / w0) ** 3
    gain = gain / gain[-1]  # the last node is past the decision: A_tot = A = 1 there
    before = np.arange(k - 1)  # U = 1 (the critical density's smoothing reaches node k - 1)
    np.testing.assert_allclose(gain[before], 1.0 + s * spread[-1] / spread[before], rtol=1e-3)
    np.testing.assert_allclose(gain[k + 4:], 1.0, rtol=1e-3)  # U = 0 once the mode is chosen


def test_switch_term_moves_density_before_the_critical_time(mixture_pilot, monkeypatch):
    """On the mixture the switch term weighs the high-noise end, before the critical density's peak, where
    the twins' amplification is smallest. It is used by "error" and "blend", not "length", and it
    vanishes when D does not move (no critical density) or the pilot has no spread."""
    _, den, pil = mixture_pilot
    lam, rc = calibrate.critical_density(pil)
    peak = np.argmax(rc)
    sch = den.schedule
    mass_before = lambda rho: np.trapezoid(rho[:peak + 1], lam[:peak + 1])
    for method, gain in (("error", 1.1), ("blend", 1.05)):  # blend: half of its density is the length one
        _, r0 = calibrate.density(pil, sch, method, switch=0.0)
        _, r1 = calibrate.density(pil, sch, method, switch=1.0)
        assert mass_before(r1) > gain * mass_before(r0), method
    g0 = ts.thermo_grid(den, 20, pilot_data=pil, options=Opts(switch=0.0), method="error")
    g1 = ts.thermo_grid(den, 20, pilot_data=pil, method="error")
    assert g1.meta["switch"] == 1.0 and g0.meta["switch"] == 0.0
    before = lambda g: int(np.sum(-np.log(np.asarray(g)[:-1]) < lam[peak]))
    assert before(g1) > before(g0)
    assert ts.thermo_grid(den, 20, pilot_data=pil, method="length", options=Opts(switch=1.0)).meta["switch"] == 0.0
    no_spread = {k: v for k, v in pil.items() if k != "spread"}
    np.testing.assert_array_equal(np.asarray(ts.thermo_grid(den, 20, pilot_data=no_spread, method="error")), np.asarray(g0))
    single = dict(pil, spread=np.zeros_like(pil["spread"]))  # a one-trajectory pilot has no spread
    np.testing.assert_array_equal(np.asarray(ts.thermo_grid(den, 20, pilot_data=single, method="error")), np.asarray(g0))
    with pytest.raises(ValueError, match="spread"):
        calibrate.density(dict(pil, spread=pil["spread"][:-1]), sch, switch=1.0)
    monkeypatch.setattr(calibrate, "critical_density", lambda p: None)
    np.testing.assert_array_equal(calibrate.density(pil, sch, switch=2.0)[1], calibrate.density(pil, sch, switch=0.0)[1])
    assert calibrate.switch_weight(6) == 0.0 and calibrate.switch_weight(20) == calibrate.switch_weight(50) == 1.0
    assert calibrate.switch_weight(13) == pytest.approx(0.5)


def test_float32_model_calibrates_in_its_dtype():
    """A float32 nn.Module (the common case) gets a float32 pilot on its device: no float64 matmul error."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return net(x) * 0.1
    model.parameters = net.parameters
    den = ts.Denoiser(model, ts.schedules.EDM(), prediction="eps", time="sigma")
    for method in ("select", "error"):
        g = ts.thermo_grid(den, 6, sample_shape=(4,), options=Opts(pilot_batch=4, pilot_steps=8, ref_steps=16),
                           method=method)
        assert g.shape == (7,) and np.all(np.isfinite(np.asarray(g)))
    assert set(seen) == {torch.float32}


def test_the_old_keyword_arguments_still_work_and_warn(mixture_pilot):
    """thermo_grid's expert settings are a CalibrationOptions. The keyword arguments they were before still work:
    they say they are deprecated (at the caller's line), give the same grid and override the options' fields.
    An unknown keyword, and options of another type, are refused."""
    _, den, pil = mixture_pilot
    new = ts.thermo_grid(den, 12, pilot_data=pil, method="error", options=Opts(switch=3.0, floor=0.5))
    with pytest.warns(DeprecationWarning, match=r"options=ts\.CalibrationOptions\(switch=3\.0, floor=0\.5\)") as said:
        old = ts.thermo_grid(den, 12, pilot_data=pil, method="error", switch=3.0, floor=0.5)
    assert [w.filename for w in said if w.category is DeprecationWarning] == [__file__]
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    timeless = [{k: v for k, v in g.meta.items() if k != "calibration_seconds"} for g in (old, new)]
    assert timeless[0] == timeless[1] and old.meta["switch"] == 3.0 and old.meta["floor"] == 0.5
    other = Opts(switch=1.0, floor=0.5)
    with pytest.warns(DeprecationWarning, match="is deprecated"):
        mixed = ts.thermo_grid(den, 12, pilot_data=pil, method="error", options=other, switch=3.0)
    np.testing.assert_array_equal(np.asarray(mixed), np.asarray(new))
    assert not np.array_equal(np.asarray(ts.thermo_grid(den, 12, pilot_data=pil, method="error", options=other)),
                              np.asarray(new))
    assert {f.name for f in dataclasses.fields(ts.CalibrationOptions)} == {
        "cost", "progress", "pilot_batch", "ref_steps", "pilot_seed", "pilot_rows", "pilot_steps", "candidates",
        "margin", "floor", "critical", "switch", "amplify", "karras_weight", "boundary_pool", "boundary_samples"}
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['swich'\]"):
        ts.thermo_grid(den, 12, pilot_data=pil, method="error", swich=3.0)
    for bad in ({"switch": 3.0}, "switch=3.0", ts.CalibrationOptions):
        with pytest.raises(TypeError, match="options must be a ts.CalibrationOptions"):
            ts.thermo_grid(den, 12, pilot_data=pil, method="error", options=bad)


# --------------------------------------------------------------------------------------------------
# solver="auto": the plan (auto.PLAN)
# --------------------------------------------------------------------------------------------------
def _spans(*rows):
    """{steps: value} from (first, last, value) rows."""
    return {n: value for first, last, value in rows for n in range(first, last + 1)}


def test_the_plan_s_bands_hold_every_step_count_once():
    """auto.PLAN has bands up to 8, 11, 14 and 19 steps and an open one from 20; band_for(steps) is the one band
    that holds steps, the same row for every step count of a band."""
    assert [band.last for band in auto.PLAN] == [8, 11, 14, 19, None]
    first = 1
    for band in auto.PLAN:
        last = 200 if band.last is None else band.last
        assert all(auto.band_for(n) is band for n in range(first, last + 1)), band
        first = last + 1
    assert auto.band_for(15) is auto.band_for(19) and auto.band_for(9) is auto.band_for(11)
    assert auto.band_for(14) != auto.band_for(15) and auto.band_for(19) != auto.band_for(20)
    assert auto.band_for(20) is auto.band_for(10 ** 6) is auto.PLAN[-1]


def test_the_plan_s_rows():
    """What each band measures. Default | alternative: iPNDM | Euler on "jump" up to 8 steps, UniPC-3 with max_h |
    iPNDM on "error" at 9-19, UniPC-3 with max_h | UniPC-2 on "error" from 20. A check on karras only up to 14
    steps (iPNDM up to 8, DEIS-3 above). UniPC's noise cut: none up to 11 steps, after the choice at 12-14 and
    from 20, on the UniPC candidate before the candidates compete at 15-19. Fitted DEIS corrections after DEIS up
    to 8 steps (the guard's fallback), after DEIS or iPNDM at 9-14, none from 15. Without a config: DEIS-3 up to
    14 steps, UniPC-3 from 15 (on the grid given)."""
    C = auto.Candidate
    row = lambda name: {n: getattr(auto.band_for(n), name) for n in range(1, 61)}
    unipc_max_h = C("unipc", "error", {"order": 3, "max_h": auto.MAX_H})
    assert row("default") == _spans((1, 8, C("ipndm", "jump")), (9, 60, unipc_max_h))
    assert row("alternative") == _spans((1, 8, C("euler", "jump")), (9, 19, C("ipndm", "error")),
                                        (20, 60, C("unipc", "error")))
    assert row("check") == _spans((1, 8, C("ipndm", "karras")), (9, 14, C("deis", "karras")), (15, 60, None))
    assert row("noise_cut") == _spans((1, 11, None), (12, 14, "after"), (15, 19, "before"), (20, 60, "after"))
    assert row("fit_after") == _spans((1, 8, ("deis",)), (9, 14, ("deis", "ipndm")), (15, 60, ()))
    assert row("uncalibrated") == _spans((1, 14, C("deis", "karras")), (15, 60, C("unipc", "karras", {"order": 3})))
    assert row("measures_default") == _spans((1, 8, True), (9, 14, False), (15, 60, True))   # else: the check's run
    assert (auto.MARGIN, auto.CHALLENGE_MARGIN, auto.OUTLIER, auto.MAX_H) == (0.6, 0.8, 100.0, 0.8)
    assert auto.NOISE_CUTS == (0.3, 0.2, 0.1) and auto.NOISE_ORDER == 3 and calibrate.MARGIN == auto.MARGIN
    assert unipc_max_h.label == "unipc,max_h=0.8,order=3@error" and C("deis", "karras").label == "deis@karras"


def test_every_run_of_the_plan_is_a_deterministic_solver_with_one_evaluation_per_step():
    """calibrate._Plan.rows prices every run of a band, `also` included, at one evaluation per step."""
    for band in auto.PLAN:
        for cand in (band.default, band.alternative, band.check, band.uncalibrated, *band.also):
            if cand is None:
                continue
            solvers.check_options(cand.solver, dict(cand.options))
            assert cand.grid in calibrate.CANDIDATES, cand
            assert not solvers.get_solver(cand.solver).injects_noise(dict(cand.options)), cand
            assert [solvers.evaluations(cand.solver, n) for n in (5, 10, 20, 50)] == [5, 10, 20, 50], cand
        assert set(band.fit_after) <= set(solvers.SOLVERS)
    assert auto.recommended(10) == {"solver": "auto", "grid": "calibrated", "steps": 10}
    assert solvers.evaluations("auto", 10) == 10


def test_each_band_names_its_decision_record():
    root = pathlib.Path(__file__).resolve().parents[1]
    missing = [band.decision for band in auto.PLAN if not band.decision or not (root / band.decision).is_file()]
    assert missing == []


# --------------------------------------------------------------------------------------------------
# solver="auto": the rule (auto.challenge, auto.bulk, auto.errors) on hand-built per-sample errors
# --------------------------------------------------------------------------------------------------
def _uniform(errors, b=8):
    """sq [C, b]: row r misses every one of b samples by errors[r] (RMS per coordinate), so no sample is an
    outlier."""
    return np.repeat(np.square(np.asarray(errors, dtype=np.float64))[:, None], b, axis=1)


def _with_a_shared_outlier(full, compared, b=256):
    """sq [C, b]: b - 1 samples that row r misses by compared[r], and the last, which every row misses by far,
    sized so that row r's RMS error over all samples is full[r]."""
    full, compared = np.asarray(full, dtype=np.float64), np.asarray(compared, dtype=np.float64)
    sq = np.repeat(np.square(compared)[:, None], b, axis=1)
    sq[:, -1] = b * full ** 2 - (b - 1) * compared ** 2
    return sq


@pytest.mark.parametrize("outliers", ["shared", "each", "none"])
def test_the_challenger_needs_a_clear_difference(outliers):
    challenge = lambda errors, **kw: auto.challenge(_uniform(errors), outliers=outliers, **kw)
    assert challenge([1.0, 0.7]) == 0                     # 0.7 is not below 0.6 x 1.0
    assert challenge([1.0, 0.5]) == 1
    assert challenge([1.0, 0.5, 0.4]) == 2                # the best of the challengers
    assert challenge([1.0, 0.5, 0.5]) == 1                # ties go to the earlier row
    assert challenge([1.0, 0.7], margin=auto.CHALLENGE_MARGIN) == 1
    assert challenge([1.0, 0.9], margin=1.0) == 1
    assert challenge([float("inf"), 3.0]) == 1            # a diverged incumbent is always left
    assert challenge([float("nan"), 3.0]) == 1
    assert challenge([1.0, float("inf")]) == 0 and challenge([1.0, float("nan")]) == 0


@pytest.mark.parametrize("outliers", ["shared", "each"])
def test_the_challenger_must_also_be_no_worse_on_the_whole_batch(outliers):
    """The margin applies to the errors without the samples every row misses by far, and the challenger must
    also be no worse over all samples; counting every sample ("none") decides on the whole batch alone."""
    cases = [((20.0, 19.0), (1.0, 0.3), 1, 0),      # (full, compared, outcome, outcome counting every sample)
             ((20.0, 21.0), (1.0, 0.3), 0, 0),      # worse with the shared sample
             ((20.0, 10.0), (1.0, 0.7), 0, 1),      # no clear difference without it
             ((float("inf"), 3.0), (float("inf"), 3.0), 1, 1)]
    for full, compared, outcome, every in cases:
        sq = _with_a_shared_outlier(full, compared) if math.isfinite(full[0]) else _uniform(full, 256)
        if math.isfinite(full[0]):
            assert (~auto.bulk(sq, outliers)).nonzero()[0].tolist() == [255]
            np.testing.assert_allclose(np.stack(auto.errors(sq, outliers=outliers)), [full, compared], rtol=1e-9)
        assert auto.challenge(sq, outliers=outliers) == outcome, (full, compared)
        assert auto.challenge(sq, outliers="none") == every, (full, compared)


def test_a_sample_every_candidate_misses_does_not_decide_between_them():
    """256 pilot samples with bulk errors 0.006 (incumbent) and 0.002 (challenger) per coordinate, and one sample
    both send to another mode (error about 1, over OUTLIER x the median miss): the plain RMS errors are within
    10 % of each other, so the 0.6 margin keeps the incumbent on all samples; without the shared sample
    ("shared", auto's candidates) the challenger is 3 x better and wins. A sample only the challenger misses
    stays in the comparison (it is evidence against it)."""
    rng = np.random.default_rng(0)
    sq = np.stack([(0.006 * rng.uniform(0.5, 1.5, 256)) ** 2, (0.002 * rng.uniform(0.5, 1.5, 256)) ** 2])
    sq[:, 17] = [0.1, 0.09]
    assert (~auto.bulk(sq)).tolist() == [i == 17 for i in range(256)]
    full, compared = auto.errors(sq)
    assert full[1] / full[0] > 0.9 and compared[1] / compared[0] < 0.4
    assert auto.challenge(sq, outliers="none") == 0
    assert auto.challenge(sq, outliers="shared") == 1 == auto.challenge(sq)     # "shared" is the default
    sq[1, 40] = 0.1                                               # the challenger alone misses one more
    assert (~auto.bulk(sq)).sum() == 1
    assert auto.challenge(sq) == 0
    w = np.full(256, 1.0 / 256)                                    # weights: the same as uniform
    np.testing.assert_allclose(auto.errors(sq, w)[1], auto.errors(sq)[1], rtol=1e-12)
    assert auto.bulk(sq, "none").all()
    sq[:, :] = 0.0                                                # an exact pilot flags nothing
    assert auto.bulk(sq).all() and auto.bulk(sq, "each").all()
    with pytest.raises(ValueError, match="outliers must be"):
        auto.bulk(sq, "some")


def test_the_check_against_karras_is_decided_on_the_bulk_not_on_one_switched_sample():
    """The check (outliers="each", CHALLENGE_MARGIN): a check run with half the choice's bulk error replaces it;
    one whose bulk error is 6 x the choice's does not, even when the choice sent one pilot sample to another
    mode and so has the larger RMS error over all samples (fresh5 d600 at NFE 10: taking the check there gave
    14 x the error on the benchmark's batch), as counting every sample would; a check with less bulk error but
    more switched samples than the choice is no worse over all samples only if its switches cost less."""
    rng = np.random.default_rng(1)
    w = np.full(256, 1.0 / 256)
    check = lambda sq, outliers="each": auto.challenge(sq, w, auto.CHALLENGE_MARGIN, outliers=outliers)
    bulk = (0.005 * rng.uniform(0.5, 1.5, 256)) ** 2
    assert check(np.stack([bulk, bulk / 4])) == 1
    assert check(np.stack([bulk, bulk / 1.5])) == 0          # 0.82 x: within the margin
    choice, checked = bulk.copy(), 36 * bulk
    choice[9] = 0.5                                          # the choice's one switched sample
    assert np.sqrt((checked * w).sum()) < np.sqrt((choice * w).sum())        # the check wins on plain RMS
    assert check(np.stack([choice, checked]), "none") == 1   # and so with every sample counted
    assert check(np.stack([choice, checked])) == 0
    checked = bulk / 4
    checked[[3, 4]] = 0.5                                    # less bulk error, two switched samples
    assert check(np.stack([choice, checked])) == 0
    checked[4] = bulk[4] / 4
    assert check(np.stack([choice, checked])) == 1           # one each: the bulk decides


def test_the_guard_falls_back_only_when_the_pilot_shows_the_choice_worse_beyond_its_interval():
    """auto.worse(choice, default): the choice's weighted mean squared error above the uncalibrated default's in
    95 % of paired bootstrap resamples of the pilot. A choice clearly worse on the bulk falls back; one a few
    percent worse on noisy samples, or worse only through one sample sent to another mode (absent from a third
    of the resamples), does not; nor a better one. Weights count: a sample of weight 0 decides nothing."""
    rng = np.random.default_rng(2)
    default = (0.01 * rng.uniform(0.2, 1.8, 64)) ** 2
    assert auto.worse(1.5 * default, default)                       # 1.5 x on every sample
    assert not auto.worse(default, 1.5 * default) and not auto.worse(default, default)
    noisy = default * rng.uniform(0.2, 1.9, 64)                     # 1.08 x on the whole, sample by sample at random
    noisy *= 1.08 * default.mean() / noisy.mean()
    assert not auto.worse(noisy, default)
    switched = default.copy()
    switched[5] = 400 * default.mean()                              # one sample to another mode: 7 x the RMS
    assert switched.mean() > 5 * default.mean() and not auto.worse(switched, default)
    switched[[5, 6, 7, 8, 9, 10]] = 400 * default.mean()             # six of them: the interval excludes 1
    assert auto.worse(switched, default)
    w = np.full(64, 1.0)
    w[[5, 6, 7, 8, 9, 10]] = 0.0
    assert not auto.worse(switched, default, w)
    assert auto.worse(np.full(64, np.nan), default) and not auto.worse(default, np.full(64, np.nan))
    assert auto.worse(1.5 * default, default) == auto.worse(1.5 * default, default)   # a fixed seed


def test_auto_falls_back_to_the_band_s_uncalibrated_default_when_its_choice_is_clearly_worse(monkeypatch,
                                                                                            rig_pilot_errors):
    """calibrate_plan measures the band's uncalibrated default (where it is not the check's run) and returns it
    when auto.worse says the choice is worse: here the candidates are made to miss every sample by more."""
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    ref = calibrate.reference(den, (16, 8), ref_steps=32)
    twins = calibrate.pilot(den, (16, 8))
    errors = calibrate.pilot_errors

    for steps in (6, 16):                  # bands whose default is not the check (1-8) or with no check (15-19)
        band = auto.band_for(steps)
        assert band.measures_default
        spared = (band.uncalibrated.solver, dict(band.uncalibrated.options))
        rig_pilot_errors(lambda solver, options, spared=spared: 1.0 if (solver, options) == spared else 30.0)
        solver, options, grid, sig, meta, spent = auto.calibrate_plan(den, steps, ref, twins)
        assert (solver, options, grid) == (band.uncalibrated.solver, dict(band.uncalibrated.options), "karras")
        assert band.uncalibrated.label in meta["default_errors"] and meta["chosen"] == "karras"
    monkeypatch.setattr(calibrate, "pilot_errors", errors)
    solver, _, grid, _, meta, _ = auto.calibrate_plan(den, 6, ref, None)
    assert (solver, grid) == ("ipndm", "jump") and set(meta["default_errors"]) == {"ipndm@jump", "deis@karras"}


def test_the_guard_judges_the_choice_with_its_noise_cut(rig_pilot_errors):
    """With noise_cut="after" (from 20 steps) the cut is chosen before the guard, and the guard compares the run
    that will be used, cut included, with the uncalibrated default: a choice far worse than the default
    without its cut but far better with it is kept (guarding the uncut run fell back to karras here,
    docs/decisions/0032-max-h-from-20-guard-after-cut.md). When the cut run is worse too, the default is
    returned as it is, without a cut."""
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    ref = calibrate.reference(den, (16, 8), ref_steps=32)
    twins = calibrate.pilot(den, (16, 8))
    band = auto.band_for(20)
    assert band.noise_cut == "after" and band.measures_default
    spared = (band.uncalibrated.solver, dict(band.uncalibrated.options))

    def rigged(cut_factor):       # the default as it is, the runs with a cut by cut_factor, the others 30 x worse
        return lambda solver, options: (1.0 if (solver, options) == spared
                                        else cut_factor if "noise_below" in options else 30.0)

    rig_pilot_errors(rigged(0.1))
    solver, options, grid, _, meta, _ = auto.calibrate_plan(den, 20, ref, twins)
    assert (solver, grid) == ("unipc", "error") and "noise_below" in options
    assert options["max_h"] == auto.MAX_H and band.uncalibrated.label in meta["default_errors"]
    judged = auto.label(solver, options, grid)                  # the guard's record names the cut run
    assert meta["default_errors"][judged] == meta["noise_below_errors"][f"{options['noise_below']:.4g}"]
    rig_pilot_errors(rigged(30.0))
    solver, options, grid, _, meta, _ = auto.calibrate_plan(den, 20, ref, twins)
    assert (solver, options, grid) == (*spared, "karras") and meta["chosen"] == "karras"


def test_a_far_better_challenger_wins_and_a_far_worse_one_does_not_on_measured_errors():
    """The rule on per-sample errors measured on a pilot (calibrate.pilot_errors): Euler on a grid uniform in
    sigma against third-order UniPC in log sigma at 8 steps. UniPC wins as the challenger and is kept as the
    incumbent, however the samples are counted."""
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    ref = calibrate.reference(den, (16, 8), ref_steps=32)
    sq = {}
    for cand in (auto.Candidate("unipc", "logsnr", {"order": 3}), auto.Candidate("euler", "uniform")):
        sig = calibrate.candidate_sigmas(cand.grid, den, 8, cand.solver, ref)
        sq[cand.solver] = calibrate.pilot_errors(den, sig, cand.solver, ref, solver_options=dict(cand.options))[1]
    w = calibrate.sample_weights(ref, 16).numpy()
    for outliers in ("shared", "each", "none"):
        assert auto.challenge(np.stack([sq["euler"], sq["unipc"]]), w, outliers=outliers) == 1
        assert auto.challenge(np.stack([sq["unipc"], sq["euler"]]), w, outliers=outliers) == 0


def test_the_single_solver_choice_keeps_every_sample(mixture_pilot):
    """Karras against "error" for one solver is decided on all pilot samples (outliers="none": its point is never
    to be worse than karras). DPM-Solver++(2M) at 8 steps on the mixture takes "error" (about 0.15 x karras's
    pilot error); with one reference sample moved far off, which both runs then miss by far (a shared outlier),
    their errors over all samples are nearly equal and karras is kept, though the bulk without that sample would
    still choose "error"."""
    mix, den, pil = mixture_pilot
    small = Opts(ref_steps=32, pilot_batch=32)
    clean = ts.thermo_grid(den, 8, solver="dpmpp_2m", sample_shape=(mix.dim,), pilot_data=pil, options=small)
    assert list(clean.meta["candidate_errors"]) == ["karras", "error"] and clean.meta["chosen"] == "error"
    data = dict(clean.pilot, ref_final=clean.pilot["ref_final"].clone())
    data["ref_final"][5] += 100.0
    g = ts.thermo_grid(den, 8, solver="dpmpp_2m", pilot_data=data, options=small)
    assert g.meta["chosen"] == "karras" and g.meta["calibration_nfe"] == 2 * 8
    sq = np.stack([calibrate.pilot_errors(den, calibrate.candidate_sigmas(name, den, 8, "dpmpp_2m", data, data),
                                          "dpmpp_2m", data)[1] for name in ("karras", "error")])
    assert list(g.meta["candidate_errors"].values()) == pytest.approx(list(auto.errors(sq)[0]), rel=1e-12)
    assert (~auto.bulk(sq)).nonzero()[0].tolist() == [5]
    assert auto.challenge(sq, outliers="none") == 0 and auto.challenge(sq, outliers="shared") == 1


# --------------------------------------------------------------------------------------------------
# solver="auto": the loop (auto.calibrate_plan, through thermo_grid) on pilots
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auto10():
    """solver="auto" at 10 steps on an 8-dimensional three-mode mixture, 16-sample pilot: (denoiser, the config,
    the model evaluations it took)."""
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    config = ts.thermo_grid(den, 10, solver="auto", sample_shape=(8,), options=Opts(ref_steps=32, pilot_batch=16))
    den.model = inner
    return den, config, len(calls)


def test_auto_measures_its_band_on_the_pilot(auto10):
    """thermo_grid(solver="auto") at 10 steps runs band_for(10): its default and alternative (after the twins pilot
    and the reference), then its check on karras, and no noise cut or fit after UniPC in this band. On this
    mixture UniPC-3 with max_h on "error" is kept: iPNDM measures about 6 x its error, and DEIS-3 on karras about
    0.82 x, not below CHALLENGE_MARGIN; rerunning the three from the pilot's noise gives the same verdicts."""
    den, config, calls = auto10
    band, meta = auto.band_for(10), config.meta
    assert isinstance(config, ts.SamplerConfig) and config.steps == 10
    assert (config.solver, config.options, meta["chosen"]) == ("unipc", {"order": 3, "max_h": auto.MAX_H}, "error")
    assert list(meta["candidate_errors"]) == [band.default.label, band.alternative.label]
    assert list(meta["check_errors"]) == [band.default.label, band.check.label]
    assert meta["check_errors"][band.default.label] == meta["candidate_errors"][band.default.label]
    assert "noise_below_errors" not in meta and "fit_errors" not in meta
    assert calls == meta["calibration_nfe"] == 24 + 32 + (3 + len(band.also)) * 10     # also: on half the pilot
    ref = config.pilot
    w = calibrate.sample_weights(ref, 16).numpy()
    sq, sig = [], {}
    for cand in (band.default, band.alternative, band.check):
        sig[cand.label] = calibrate.candidate_sigmas(cand.grid, den, 10, cand.solver, ref, ref)
        err, s = calibrate.pilot_errors(den, sig[cand.label], cand.solver, ref, solver_options=dict(cand.options))
        assert err == pytest.approx({**meta["candidate_errors"], **meta["check_errors"]}[cand.label], rel=1e-12)
        sq.append(s)
    assert auto.challenge(np.stack(sq[:2]), w) == 0
    assert auto.challenge(np.stack([sq[0], sq[2]]), w, auto.CHALLENGE_MARGIN, outliers="each") == 0
    np.testing.assert_array_equal(config.sigmas, np.append(sig[band.default.label], 0.0))
    with pytest.raises(ValueError, match="needs method='select'"):
        ts.thermo_grid(den, 10, solver="auto", method="error", pilot_data=config.pilot)


def test_auto_states_its_compared_errors_and_a_rerun_reproduces_them():
    """thermo_grid(solver="auto") records each candidate's pilot error with and without the shared outliers;
    rerunning both candidates from the pilot's noise and applying auto.errors gives the same numbers. At 8
    steps on this mixture iPNDM on "jump" is kept, against Euler on "jump" and against iPNDM on karras."""
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    config = ts.thermo_grid(den, 8, solver="auto", sample_shape=(8,), options=Opts(ref_steps=32, pilot_batch=32))
    band, ref = auto.band_for(8), config.pilot
    sq = []
    for cand in (band.default, band.alternative):
        sig = calibrate.candidate_sigmas(cand.grid, den, 8, cand.solver, ref, ref)
        out = ts.sample(den, noise=ref["ref_noise"], grid=np.append(sig, 0.0), solver=cand.solver, track=False,
                        **cand.options)
        sq.append((out.samples.double() - ref["ref_final"].double()).square().mean(1).numpy())
    sq = np.stack(sq)
    full, compared = auto.errors(sq)
    assert list(config.meta["candidate_errors"]) == list(config.meta["compared_errors"]) == ["ipndm@jump", "euler@jump"]
    assert list(config.meta["candidate_errors"].values()) == pytest.approx(list(full), rel=1e-9)
    assert list(config.meta["compared_errors"].values()) == pytest.approx(list(compared), rel=1e-9)
    assert config.meta["shared_outliers"] == int((~auto.bulk(sq)).sum())
    assert auto.challenge(sq) == 0 and list(config.meta["check_errors"]) == ["ipndm@jump", "ipndm@karras"]
    assert (config.solver, config.options, config.meta["chosen"]) == ("ipndm", {}, "jump")


def test_auto_up_to_8_steps_runs_no_twin_pilot_and_its_ipndm_on_jump_beats_euler_and_deis_on_karras():
    """Up to 8 steps both of auto's candidates are on the "jump" grid, so the calibration is the reference, the
    two candidate runs, the check and the guard's DEIS-3 on karras (no 24-evaluation twin pilot). Its default, iPNDM on that grid, is kept here
    and lands closer to the converged ODE solution from fresh noise than Euler on the same grid and than DEIS-3
    on karras (the peers' best at 6 evaluations), as on the tuning mixtures
    (docs/decisions/0016-ipndm-on-jump.md)."""
    mix = toy.default_mixture(dim=32, modes=6, seed=3)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    config = ts.thermo_grid(den, 6, solver="auto", sample_shape=(mix.dim,),
                            options=Opts(ref_steps=64, pilot_batch=128, pilot_rows=None))
    band = auto.band_for(6)
    assert (band.default.grid, band.alternative.grid) == ("jump", "jump") and "D" not in config.pilot
    assert len(calls) == config.meta["calibration_nfe"] == 64 + 4 * 6   # the reference, the pair, check, guard
    # well-separated modes: the check's karras run sends more pilot samples to another mode, and is declined
    assert (config.solver, config.options, config.meta["chosen"]) == ("ipndm", {}, "jump")
    assert list(config.meta["check_errors"]) == ["ipndm@jump", "ipndm@karras"]
    assert list(config.meta["default_errors"]) == ["ipndm@jump", "deis@karras"]        # kept by the guard
    jump = np.append(calibrate.jump_grid(config.pilot, 6), 0.0)
    np.testing.assert_array_equal(config.sigmas, jump)
    den.model = inner
    noise = torch.randn(512, mix.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80.0
    converged = ts.sample(den, noise=noise, steps=96, solver="unipc", order=3, grid="logsnr").samples

    def rms(solver, grid):
        out = ts.sample(den, noise=noise, grid=grid, solver=solver, track=False).samples
        return float((out - converged).square().mean().sqrt())

    ipndm, euler = rms("ipndm", jump), rms("euler", jump)
    deis_karras = rms("deis", ts.grids.make_grid("karras", 6, den.schedule))
    assert ipndm < 0.9 * euler and ipndm < 0.9 * deis_karras, (ipndm, euler, deis_karras)


def _quality_problems():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "quality_problems.py"
    spec = importlib.util.spec_from_file_location("_quality_problems", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module               # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("steps", [6, 10])
def test_auto_checks_its_choice_against_karras_and_takes_it_on_image_like_data(steps):
    """Up to 14 steps solver="auto" measures one more run, its band's check on karras (iPNDM up to 8 steps, DEIS-3
    above), and takes it when its pilot error on the bulk is below CHALLENGE_MARGIN x the choice's. On image-like
    data (a power-law spectrum, classes that overlap: quality_problems.spectral_mixture, with a seed no tuning
    used) it is taken, costs one more run of `steps` evaluations, and from fresh noise lands more than 10 %
    closer to the converged ODE solution than both of the band's candidates. At 10 steps the fitted DEIS
    corrections are measured after it (two runs on half the pilot) and declined here: the config is the check."""
    band = auto.band_for(steps)
    mix = _quality_problems().spectral_mixture(256, 4, 1.5, 0.3, 4242)
    den = mix.denoiser(ts.schedules.VPLinear())
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    config = ts.thermo_grid(den, steps, solver="auto", sample_shape=(256,),
                            options=Opts(ref_steps=64, pilot_batch=128, pilot_rows=None))
    check = band.check
    assert (config.solver, config.options, config.meta["chosen"]) == (check.solver, dict(check.options), "karras")
    assert list(config.meta["check_errors"])[1] == check.label
    np.testing.assert_array_equal(config.sigmas, ts.grids.make_grid("karras", steps, den.schedule))
    fitted = check.solver in band.fit_after                       # after DEIS (both bands), not after iPNDM at 6
    assert fitted == ("fit_errors" in config.meta) == (steps == 10)
    if fitted:
        assert list(config.meta["fit_errors"]) == [check.label, "deis,fitted@karras"]
    twins = 24 if "error" in (band.default.grid, band.alternative.grid) else 0
    fit = 2 * steps if fitted else 0
    guard = steps if band.measures_default else 0                 # else the guard reuses the check's run
    runs = 3 + len(band.also)                                     # also: a run on half the pilot
    assert len(calls) == config.meta["calibration_nfe"] == twins + 64 + runs * steps + guard + fit
    den.model = inner
    noise = torch.randn(512, 256, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = noise * den.schedule.sigma_max
    converged = ts.sample(den, noise=noise, steps=96, solver="unipc", order=3, grid="logsnr").samples

    def rms(solver, opts, grid):
        out = ts.sample(den, noise=noise, grid=grid, solver=solver, track=False, **opts).samples
        return float((out - converged).square().mean().sqrt())

    checked = rms(config.solver, config.options, config.sigmas)
    for cand in (band.default, band.alternative):
        sig = calibrate.candidate_sigmas(cand.grid, den, steps, cand.solver, config.pilot, config.pilot)
        assert checked < 0.9 * rms(cand.solver, cand.options, np.append(sig, 0.0)), cand.label


def test_auto_fits_deis_corrections_on_image_like_data_and_they_beat_its_choice_and_karras(tmp_path):
    """From 9 to 14 steps, after choosing DEIS or iPNDM (band.fit_after), solver="auto" fits deis's corrections on
    the pilot's even samples (calibrate.fit_corrections, on the choice's grid moved to the reference's nodes, or
    after karras on karras with its low-noise nodes tuned on calibrate.surrogate_grid), measures them on the odd
    ones and takes them by the check's rule. On image-like data with a seed no tuning
    used, iPNDM on "error" is chosen; the check (DEIS-3 on karras) is below it on the pilot but not by the 0.8
    margin, so the guard (auto.worse, clearly worse than the uncalibrated default) falls back to DEIS-3 on
    karras, and the fit after it is taken (meta "fit_errors"; two more runs of half the pilot, counted as
    2 x NFE); the config runs exactly that, also read back from JSON, and from fresh noise it lands more than
    10 % closer to the converged ODE solution than the plan's choice (iPNDM on "error") and than DEIS-3 on
    karras (the peers' best there)."""
    band = auto.band_for(10)
    mix = _quality_problems().spectral_mixture(256, 4, 1.0, 0.3, 4243)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    config = ts.thermo_grid(den, 10, solver="auto", sample_shape=(256,),
                            options=Opts(ref_steps=64, pilot_batch=128, pilot_rows=None))
    meta = config.meta
    before, after = list(meta["fit_errors"])
    assert (before, after) == ("deis@karras", "deis,fitted@karras") and "deis" in band.fit_after
    assert list(meta["check_errors"]) == list(meta["default_errors"]) == ["ipndm@error", "deis@karras"]
    assert auto.CHALLENGE_MARGIN * meta["check_errors"]["ipndm@error"] < meta["check_errors"]["deis@karras"]
    assert meta["chosen"] == "karras"
    assert config.solver == "deis" and list(config.options) == ["corrections"]
    assert len(config.options["corrections"]) == 10
    assert meta["fit_errors"][after] < auto.CHALLENGE_MARGIN * meta["fit_errors"][before]
    assert len(calls) == meta["calibration_nfe"] == 24 + 64 + (3 + len(band.also)) * 10 + 2 * 10
    den.model = inner
    cand = band.alternative                                          # the plan's choice before the guard
    sig = calibrate.candidate_sigmas(cand.grid, den, 10, cand.solver, config.pilot, config.pilot)
    karras = calibrate.candidate_sigmas("karras", den, 10, "deis", config.pilot)
    tuned = calibrate.surrogate_grid(config.pilot, karras, den.schedule)         # the fit's grid after karras
    np.testing.assert_array_equal(config.sigmas, np.append(tuned, 0.0))
    kept = karras >= calibrate.SURROGATE_BELOW * calibrate.data_scale(config.pilot)
    assert 0 < kept.sum() < 10 and (tuned[kept] == karras[kept]).all()
    noise = torch.randn(512, 256, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = noise * den.schedule.sigma_max
    converged = ts.sample(den, noise=noise, steps=96, solver="unipc", order=3, grid="logsnr").samples

    def rms(out):
        return float((out.samples - converged).square().mean().sqrt())

    fitted = ts.sample(den, noise=noise, grid=config, track=False)
    assert torch.equal(fitted.samples, ts.sample(den, noise=noise, grid=config.sigmas, track=False, solver="deis",
                                                 **config.options).samples)
    loaded = ts.SamplerConfig.load(config.save(tmp_path / "config.json"))       # the corrections travel in JSON
    assert torch.equal(fitted.samples, ts.sample(den, noise=noise, grid=loaded, track=False).samples)
    choice = ts.sample(den, noise=noise, grid=np.append(sig, 0.0), solver=cand.solver, track=False, **cand.options)
    karras = ts.sample(den, noise=noise, grid="karras", steps=10, solver="deis", track=False)
    assert rms(fitted) < 0.9 * min(rms(choice), rms(karras)), (rms(fitted), rms(choice), rms(karras))


@pytest.fixture(scope="module")
def narrow_auto20():
    """A 256-dimensional mixture of narrow modes, solver="auto"'s 20-step config on a 64-sample pilot, fresh noise
    and its converged solution: (denoiser, config, noise, exact samples)."""
    den = toy.default_mixture(dim=256, modes=4, seed=3).denoiser("edm")
    config = ts.thermo_grid(den, 20, solver="auto", sample_shape=(256,), options=Opts(pilot_batch=64, ref_steps=64))
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    exact = ts.sample(den, noise=x, grid="logsnr", steps=400, solver="unipc", order=3, track=False).samples
    return den, config, x, exact


def _rms(den, grid, x, exact, **kw):
    out = ts.sample(den, noise=x.float(), grid=grid, track=False, **kw).samples
    return (out.double() - exact).square().mean().sqrt().item()


def _uncut(options):
    return {k: v for k, v in options.items() if k not in ("noise_below", "noise_order")}


def test_auto_measures_noise_prediction_on_the_low_noise_steps_from_12_steps(narrow_auto20):
    """From 12 steps (the first band with a noise_cut), solver="auto" also measures its UniPC run with noise_below
    at each of NOISE_CUTS times the data's scale (here about 1) and keeps the best when it wins by
    CHALLENGE_MARGIN. On a 256-dimensional mixture of narrow modes at 20 steps it takes a cut; the recorded
    errors are those of rerunning each cut from the pilot's noise; the evaluations are counted; and on fresh
    noise the chosen run is closer to the converged solution than the same grid without the cut, at 20 steps
    and at 16 (docs/decisions/0021-noise-from-12.md). Below 12 steps nothing is measured."""
    den, config, x, exact = narrow_auto20
    meta = config.meta
    assert config.solver == "unipc" and "noise_below" in config.options
    assert _uncut(config.options) == dict(auto.band_for(20).default.options) == {"order": 3, "max_h": auto.MAX_H}
    scale = calibrate.data_scale(config.pilot)
    assert 0.9 < scale < 1.1
    errors = meta["noise_below_errors"]
    assert list(errors)[0] == "off" and len(errors) == 1 + len(auto.NOISE_CUTS)
    assert config.options["noise_order"] == auto.NOISE_ORDER == 3
    for c, recorded in zip(auto.NOISE_CUTS, list(errors.values())[1:]):
        out = ts.sample(den, noise=config.pilot["ref_noise"], grid=config.sigmas, solver="unipc", track=False,
                        noise_below=c * scale, noise_order=3, **_uncut(config.options))
        err = (out.samples.double() - config.pilot["ref_final"].double()).square().mean().sqrt().item()
        assert recorded == pytest.approx(err, rel=1e-9)
    best = min(list(errors)[1:], key=errors.get)
    assert config.options["noise_below"] == pytest.approx(float(best), rel=1e-3)
    assert errors[best] < auto.CHALLENGE_MARGIN * errors["off"]
    assert meta["calibration_nfe"] == 24 + 64 + 2 * 20 + 20 + len(auto.NOISE_CUTS) * 20      # 20: the guard's run
    g16 = ts.thermo_grid(den, 16, solver="auto", pilot_data=config.pilot)
    assert g16.solver == "unipc" and "noise_below" in g16.options
    for grid in (config, g16):
        assert _rms(den, grid, x, exact) < _rms(den, grid, x, exact, solver="unipc", **_uncut(grid.options)), grid
    first = min(n for n in range(1, 60) if auto.band_for(n).noise_cut)
    assert first == 12
    below = ts.thermo_grid(den, first - 1, solver="auto", pilot_data=config.pilot)
    assert "noise_below_errors" not in below.meta and "noise_below" not in below.options


def _band_choice(den, steps, ref, default, alternative, noise_cut):
    """The run a band of `default` | `alternative` with UniPC's `noise_cut` ("before", "after" or None) and neither
    check nor fit chooses on the pilot `ref`, from auto's stages (auto._measure, auto._noise_cut, auto.challenge):
    a band that is no row of auto.PLAN."""
    runs = []
    for cand in (default, alternative):
        run, _ = auto._measure(den, steps, cand, ref, ref, "auto", None)
        if noise_cut == "before" and run.solver == "unipc":
            run = auto._noise_cut(den, steps, run, ref, "auto", auto.MARGIN)[0]
        runs.append(run)
    sq = np.stack([r.sq for r in runs])
    run = runs[auto.challenge(sq, calibrate.sample_weights(ref, sq.shape[1]))]
    if noise_cut == "after" and run.solver == "unipc":
        run = auto._noise_cut(den, steps, run, ref, "auto", auto.MARGIN)[0]
    return run


def test_auto_runs_unipc3_with_max_h_up_to_19_steps(narrow_auto20):
    """From 9 to 19 steps solver="auto" measures UniPC-3 with max_h against iPNDM. Against the bands it replaced,
    rebuilt from auto's stages (which give the plan's own band at 16 and 18 steps exactly): at 15-17 steps
    UniPC-2 | iPNDM on "error", UniPC's cut before they compete (docs/decisions/0022-max-h-to-17-noise-first.md),
    at 18-19 plain UniPC-3 | UniPC-2, the cut after the choice (docs/decisions/0023-band-to-19.md). On the
    narrow-mode mixture, from the same pilot, the choice lands over 10 x closer to the converged solution on
    fresh noise than the old band's at 16 steps (measured: about 130 x), and over 2 x at 18 (about 4.7 x)."""
    den, config, x, exact = narrow_auto20
    ref, C = config.pilot, auto.Candidate
    new = {}
    for steps in (16, 18):
        band = auto.band_for(steps)
        new[steps] = ts.thermo_grid(den, steps, solver="auto", pilot_data=ref)
        assert new[steps].options["order"] == 3 and new[steps].options["max_h"] == auto.MAX_H
        same = _band_choice(den, steps, ref, band.default, band.alternative, band.noise_cut)
        assert (same.solver, same.options) == (new[steps].solver, new[steps].options)
        np.testing.assert_array_equal(np.append(same.sigmas, 0.0), new[steps].sigmas)
    old16 = _band_choice(den, 16, ref, C("unipc", "error"), C("ipndm", "error"), "before")
    assert old16.solver == "unipc" and "order" not in old16.options
    old18 = _band_choice(den, 18, ref, C("unipc", "error", {"order": 3}), C("unipc", "error"), "after")
    assert old18.solver == "unipc" and "max_h" not in old18.options
    for steps, old, factor in ((16, old16, 10), (18, old18, 2)):
        was = _rms(den, np.append(old.sigmas, 0.0), x, exact, solver=old.solver, **old.options)
        assert factor * _rms(den, new[steps], x, exact) < was, steps


def test_auto_cuts_its_unipc_candidate_before_the_candidates_compete_at_15_to_19_steps(narrow_auto20):
    """At 15-19 steps (noise_cut "before") the noise stage runs on the UniPC candidate before it meets iPNDM: the
    error it competes with is that of its kept cut, not the plain run's (a plain UniPC run several times worse
    than iPNDM can be far better with its cut). Where the stage comes after the choice (12-14 steps and from
    20), the plain run competes: at 20 steps the recorded candidate error is the plain run's. The evaluations
    are counted."""
    den, config, _, _ = narrow_auto20
    first = ts.thermo_grid(den, 16, solver="auto", pilot_data=config.pilot)
    meta, band = first.meta, auto.band_for(16)
    cuts = meta["noise_below_errors"]
    kept = min(list(cuts)[1:], key=cuts.get)
    assert cuts[kept] < auto.CHALLENGE_MARGIN * cuts["off"]          # a cut is kept here
    unipc, ipndm = meta["candidate_errors"]                          # recorded under the run with its cut
    assert ipndm == band.alternative.label and unipc.startswith("unipc,max_h=0.8,noise_below=")
    assert unipc.split("noise_below=")[1].split(",")[0] == kept
    assert meta["candidate_errors"][unipc] == pytest.approx(cuts[kept], rel=1e-12) != cuts["off"]
    assert meta["calibration_nfe"] == (2 + 1 + len(auto.NOISE_CUTS)) * 16          # the pair, the guard, the cuts
    plain = calibrate.pilot_errors(den, first.sigmas[:-1], "unipc", config.pilot, solver_options=_uncut(first.options))
    assert plain[0] == pytest.approx(cuts["off"], rel=1e-12)
    twenty = config.meta
    assert auto.band_for(20).noise_cut == "after" and "noise_below" in config.options
    assert twenty["candidate_errors"][auto.band_for(20).default.label] == twenty["noise_below_errors"]["off"]


# --------------------------------------------------------------------------------------------------
# solver="auto": the SamplerConfig it returns, and what runs without one
# --------------------------------------------------------------------------------------------------
def test_sample_with_a_config_runs_its_solver_options_and_sigmas(auto10):
    den, config, _ = auto10
    shape = (6, 8)
    explicit = ts.sample(den, shape, solver=config.solver, grid=config.sigmas, seed=1, **config.options).samples
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="solver='auto' without")
        for kw in ({}, {"solver": "auto"}, {"steps": 10}):
            assert torch.equal(ts.sample(den, shape, grid=config, seed=1, **kw).samples, explicit), kw
        assert torch.equal(ts.sample(den, shape, grid=config.grid, seed=1).samples, explicit)    # as a ThermoGrid
    # a solver named beside the config runs on its sigmas, without its options
    assert torch.equal(ts.sample(den, shape, grid=config, solver="euler", seed=1).samples,
                       ts.sample(den, shape, grid=config.sigmas, solver="euler", seed=1).samples)
    np.testing.assert_array_equal(np.asarray(config), config.sigmas)
    assert config.sigmas.dtype == np.float64 and config.sigmas[-1] == 0 and np.all(np.diff(config.sigmas) < 0)
    assert repr(config) == "SamplerConfig(unipc, max_h=0.8, order=3, steps=10)"
    grid = config.grid
    assert isinstance(grid, ts.ThermoGrid) and grid.pilot is config.pilot
    np.testing.assert_array_equal(np.asarray(grid), config.sigmas)
    assert (grid.meta["auto"], grid.meta["solver"], grid.meta["solver_options"]) == (True, "unipc", config.options)
    # the pilot is reused: only the band's runs (three, and `also` on half the pilot) are spent again, with the
    # same choice, and one call that checks the reference against this model (another function object than the
    # one it was made with)
    again = ts.thermo_grid(den, 10, solver="auto", pilot_data=config.pilot)
    runs = 3 + len(auto.band_for(10).also)
    assert again.meta["calibration_nfe"] == 1 + runs * 10 and (again.solver, again.options) == (config.solver, config.options)
    np.testing.assert_array_equal(again.sigmas, config.sigmas)


def test_a_config_round_trips_through_json(auto10, tmp_path):
    den, config, _ = auto10
    blob = config.to_dict()
    assert blob["format"] == "thermosample.SamplerConfig/1" and json.loads(json.dumps(blob)) == blob
    path = config.save(tmp_path / "config.json")
    assert path == str(tmp_path / "config.json") and json.loads(pathlib.Path(path).read_text()) == blob
    loaded = ts.SamplerConfig.load(path)
    assert (loaded.solver, loaded.options) == (config.solver, config.options)
    assert loaded.calibrated_for == config.calibrated_for and loaded.meta == config.meta
    np.testing.assert_array_equal(loaded.sigmas, config.sigmas)
    assert loaded.sigmas.dtype == np.float64 and loaded.pilot is None and loaded.to_dict() == blob
    assert ts.SamplerConfig.from_dict(blob).to_dict() == blob
    assert torch.equal(ts.sample(den, (6, 8), grid=loaded, seed=2).samples,
                       ts.sample(den, (6, 8), grid=config, seed=2).samples)


def test_configs_compare_by_value(auto10):
    _, config, _ = auto10
    assert ts.SamplerConfig.from_dict(config.to_dict()) == config
    other = ts.SamplerConfig.from_dict({**config.to_dict(), "sigmas": [float(s) * 1.01 for s in config.sigmas]})
    assert other != config


def test_calibrated_for_names_the_model_and_the_run_a_config_was_made_for(auto10):
    """calibrated_for: schedule, prediction, sample_shape, dtype, device, the model (a fingerprint of an
    nn.Module's parameters and buffers, None for a closure) and the pilot (rows, calls, evaluations, batch,
    seconds). A closure calibrates in torch's default dtype."""
    den, config, calls = auto10
    made = config.calibrated_for
    assert made == {"schedule": repr(den.schedule), "prediction": den.prediction, "sample_shape": [8],
                    "dtype": str(torch.get_default_dtype()).replace("torch.", ""), "device": "cpu", "model": None,
                    "pilot": {"rows": made["pilot"]["rows"], "calls": calls,
                              "evaluations": config.meta["calibration_nfe"], "batch": 16,
                              "seconds": made["pilot"]["seconds"]}}
    assert made["pilot"]["rows"] >= calls
    assert made["pilot"]["seconds"] >= 0 and made["schedule"] == config.meta["schedule"]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, t):
            return 0.1 * self.lin(x)

    torch.manual_seed(0)
    net = Net()
    module_den = ts.Denoiser(net, ts.schedules.EDM(), prediction="eps", time="sigma")
    made = ts.thermo_grid(module_den, 6, solver="auto", sample_shape=(4,),
                          options=Opts(pilot_batch=8, ref_steps=16)).calibrated_for
    assert re.fullmatch("[0-9a-f]{64}", made["model"]) and made["model"] == auto.fingerprint(net)
    assert (made["prediction"], made["sample_shape"], made["dtype"], made["device"]) == ("eps", [4], "float32", "cpu")
    twin = copy.deepcopy(net)
    assert auto.fingerprint(twin) == made["model"]
    with torch.no_grad():
        twin.lin.bias[0] += 1e-3
    assert auto.fingerprint(twin) != made["model"]
    assert auto.fingerprint(lambda x, t: x) is None


def test_sample_auto_without_a_config_runs_its_band_s_uncalibrated_solver_and_says_so_once_per_band(auto10):
    den, config, _ = auto10
    auto._SAID.clear()
    for steps, same_band in ((6, 8), (10, 11), (13, 12), (16, 19), (25, 50)):
        run = auto.band_for(steps).uncalibrated
        assert auto.band_for(same_band) is auto.band_for(steps)
        said = re.escape(f"default for {steps} steps, {auto.label(run.solver, run.options, 'the given grid')};")
        with pytest.warns(UserWarning, match=said) as record:
            out = ts.sample(den, (4, 8), steps=steps, solver="auto", grid="logsnr", seed=1)
        ours = [w for w in record if "without a calibrated config" in str(w.message)]
        assert len(ours) == 1 and ours[0].filename == __file__
        explicit = ts.sample(den, (4, 8), steps=steps, solver=run.solver, grid="logsnr", seed=1, **run.options)
        assert torch.equal(out.samples, explicit.samples), steps
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="solver='auto' without")
            ts.sample(den, (4, 8), steps=same_band, solver="auto", grid="logsnr", seed=1)   # said once per band
            ts.sample(den, (4, 8), grid=config, seed=1)                                        # a config says nothing


def test_a_grid_file_of_an_older_auto_calibration_still_runs_its_solver(auto10, tmp_path):
    """A ThermoGrid JSON whose meta holds {"auto": True, "solver": ..., "solver_options": ...} (what
    thermo_grid(solver="auto") returned before SamplerConfig, and what config.grid saves) runs that solver with
    those options, with or without solver="auto", and says nothing."""
    den, config, _ = auto10
    path = tmp_path / "old.json"
    for solver, options in (("ipndm", {}), ("unipc", {"order": 3})):
        path.write_text(json.dumps({"format": "thermosample.ThermoGrid/1", "sigmas": [float(s) for s in config.sigmas],
                                    "meta": {"method": "select", "auto": True, "solver": solver,
                                             "solver_options": options}}))
        old = ts.ThermoGrid.load(path)
        explicit = ts.sample(den, (6, 8), solver=solver, grid=np.asarray(old), seed=1, **options).samples
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="solver='auto' without")
            for kw in ({}, {"solver": "auto"}):
                assert torch.equal(ts.sample(den, (6, 8), grid=old, seed=1, **kw).samples, explicit), (solver, kw)
    old = ts.ThermoGrid.load(config.grid.save(tmp_path / "grid.json"))
    assert torch.equal(ts.sample(den, (6, 8), grid=old, seed=1).samples,
                       ts.sample(den, (6, 8), grid=config, seed=1).samples)


def test_a_malformed_config_file_is_refused(auto10, tmp_path):
    den, config, _ = auto10
    good = config.to_dict()
    path = tmp_path / "bad.json"
    cases = [("{not json", None),
             ("[]", "not a saved SamplerConfig"),
             (json.dumps({"format": "thermosample.ThermoGrid/1", "sigmas": good["sigmas"], "meta": {}}),
              "not a saved SamplerConfig"),
             (json.dumps({**good, "format": "thermosample.SamplerConfig/2"}), "not a saved SamplerConfig"),
             (json.dumps({k: v for k, v in good.items() if k != "solver"}), "'solver' must be a str"),
             (json.dumps({**good, "options": [["order", 3]]}), "'options' must be a dict"),
             (json.dumps({**good, "sigmas": "80,1,0"}), "'sigmas' must be a list"),
             (json.dumps({**good, "sigmas": [0.0, 1.0, 80.0]}), "strictly decreasing"),
             (json.dumps({**good, "sigmas": [80.0, "x", 0.0]}), None),
             (json.dumps({**good, "sigmas": []}), None)]
    for text, match in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            ts.SamplerConfig.load(path)
    path.write_text(json.dumps({**good, "solver": "rk45"}))       # not in the solver table: refused on loading
    with pytest.raises(ValueError, match="rk45"):
        ts.SamplerConfig.load(path)
    for bad in ({**good, "options": {"nonsense": 1}}, {**good, "sigmas": [80.0, 1.0]}):
        with pytest.raises(ValueError):
            ts.SamplerConfig.from_dict(bad)


def test_a_config_file_whose_meta_or_calibrated_for_is_no_object_is_refused(auto10):
    good = auto10[1].to_dict()
    for key, bad in (("calibrated_for", [1, 2]), ("meta", 5), ("meta", [["a", 1]])):
        with pytest.raises(ValueError, match=key):
            ts.SamplerConfig.from_dict({**good, key: bad})


def test_boundary_screen_keeps_the_starting_points_nearest_the_mode_boundary():
    """Two symmetric modes on a line: the probability-flow map is monotone and odd, so the starting points
    whose solutions end nearest the boundary are those nearest z = 0. The 8 kept of 512 must all lie within
    |z| < 0.05 (the 8 smallest of 512 normal draws lie below about 0.02; a random 8 would hold one such
    point in 3 draws)."""
    mix = toy.GaussianMixture(means=[[-1.0], [1.0]], stds=0.05)
    z, score, nfe = calibrate.boundary_noise(mix.denoiser("edm"), (1,), pool=512, keep=8, pilot_steps=24)
    assert z.shape == (8, 1) and nfe == 24 * 2                  # two chunks of 256, 24 evaluations each
    assert float(z.abs().max()) < 0.05
    assert torch.all(score[:-1] >= score[1:])                    # best first


def test_screened_reference_sees_rare_mode_switches_a_random_pilot_misses():
    """The reference batch with its screened stratum (64 of 4096, weighted 64/4096 in all) estimates how
    often a grid sends samples to another mode, where 64 random samples see none: on an 8-d three-mode
    mixture, UniPC on an 18-step karras grid switches about 0.5 % of samples (measured here on 8000); the
    weighted switch fraction of the reference batch lies within a factor 3 of it."""
    mix = toy.default_mixture(dim=8, modes=3, seed=2)
    den = mix.denoiser("edm")
    sch = den.schedule
    ref = calibrate.reference(den, (64, 8), ref_steps=64, boundary_pool=4096, boundary_samples=64)
    w = ref["ref_weight"]
    assert ref["ref_boundary"] == (64, 4096) and ref["ref_final"].shape == (128, 8)
    assert torch.allclose(w[:64], torch.full((64,), (1 - 64 / 4096) / 64, dtype=torch.float64))
    assert torch.allclose(w[64:], torch.full((64,), 1 / 4096, dtype=torch.float64))
    means = torch.as_tensor(mix.means, dtype=torch.float64)

    def switched(noise, target):
        out = ts.sample(den, noise=noise, grid=grids.make_grid("karras", 18, sch), solver="unipc", track=False)
        return (torch.cdist(out.samples.double(), means).argmin(1)
                != torch.cdist(target.double(), means).argmin(1)).double()

    big = torch.randn(8000, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * sch.sigma_max
    converged = ts.sample(den, noise=big, grid=np.append(grids.logsnr(200, sch.sigma_min, sch.sigma_max), 0.0),
                          solver="unipc", order=3, track=False).samples
    truth = float(switched(big, converged).mean())
    seen = switched(ref["ref_noise"], ref["ref_final"])
    assert 0.002 < truth < 0.02
    assert seen[64:].sum() >= 3                                 # the screened stratum holds the switches
    assert truth / 3 < float((seen * w).sum()) < 3 * truth


def test_the_screened_select_states_its_cost_and_weighs_its_samples():
    """thermo_grid with boundary_pool=512: the screen's evaluations (24 per chunk of 256 starting points, 512 rows
    per evaluation: 8 calls of 64) are in calibration_nfe, the reference and candidates run 16 + 64 samples,
    and each candidate's stated error weighs the screened ones by 64 / 512 in all."""
    mix = toy.default_mixture(dim=4, modes=3, seed=1)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(x.shape[0]), inner(x, t))[1]
    g = ts.thermo_grid(den, 6, solver="dpmpp_2m", sample_shape=(4,),
                       options=Opts(pilot_batch=16, ref_steps=16, boundary_pool=512))
    assert g.meta["boundary"] == [64, 512] and g.pilot["ref_final"].shape[0] == 16 + 64
    assert g.meta["calibration_nfe"] == 24 + 16 + 2 * 24 + 2 * 6       # twins, reference, screen, candidates
    assert len(calls) == 24 + 2 * 16 + 8 * 2 * 24 + 2 * 2 * 6          # 80 samples: 2 calls of <= 64 rows
    again = ts.sample(mix.denoiser("edm"), noise=g.pilot["ref_noise"], grid=np.asarray(g), solver="dpmpp_2m",
                      track=False)
    per_sample = (again.samples.double() - g.pilot["ref_final"].double()).square().mean(1)
    w = 64 / 512
    rms = math.sqrt((1 - w) * per_sample[:16].mean() + w * per_sample[16:].mean())
    assert rms == pytest.approx(g.meta["candidate_errors"][g.meta["chosen"]], rel=1e-9)


def test_a_reused_reference_is_solved_again_when_the_screen_asked_for_differs():
    """pilot_data from an unscreened call, reused with boundary_pool=512, must not keep its 16-sample reference
    (the screen asked for would silently be off); reused again with the same screen it is kept (only the
    candidate runs cost), and with boundary_pool=0 the screened reference is replaced by a plain one."""
    den = toy.default_mixture(dim=4, modes=3, seed=1).denoiser("edm")
    kw = dict(solver="dpmpp_2m", sample_shape=(4,))
    small = Opts(pilot_batch=16, ref_steps=16)
    plain = ts.thermo_grid(den, 6, options=small, **kw)
    assert plain.meta["boundary"] == [0, 0] and plain.pilot["ref_final"].shape[0] == 16
    screened = ts.thermo_grid(den, 6, pilot_data=plain.pilot, options=dataclasses.replace(small, boundary_pool=512),
                              **kw)
    assert screened.meta["boundary"] == [64, 512] and screened.pilot["ref_final"].shape[0] == 16 + 64
    assert screened.meta["calibration_nfe"] == 16 + 2 * 24 + 2 * 6         # reference, screen, candidates
    kept = ts.thermo_grid(den, 6, pilot_data=screened.pilot, options=dataclasses.replace(small, boundary_pool=512),
                          **kw)
    assert kept.meta["calibration_nfe"] == 2 * 6 and kept.pilot["ref_final"] is screened.pilot["ref_final"]
    back = ts.thermo_grid(den, 6, pilot_data=screened.pilot, options=small, **kw)
    assert back.meta["boundary"] == [0, 0] and back.pilot["ref_final"].shape[0] == 16
    torch.testing.assert_close(back.pilot["ref_final"], plain.pilot["ref_final"], rtol=0, atol=0)


def test_bad_boundary_sizes_are_refused():
    mix = toy.default_mixture(dim=4, modes=3, seed=1)
    den = mix.denoiser("edm")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="boundary_pool must be an int >= 0"):
            ts.thermo_grid(den, 6, sample_shape=(4,), options=Opts(pilot_batch=16, ref_steps=16, boundary_pool=bad))
    with pytest.raises(ValueError, match="boundary_samples must be an int >= 0"):
        calibrate.reference(den, (16, 4), ref_steps=16, boundary_pool=64, boundary_samples=-2)
