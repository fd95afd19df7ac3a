"""Calibrated time grids (thermosample/calibrate.py, docs/theory.md §6)."""

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import calibrate, grids, toy


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
    g1 = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), method="error", pilot_rows=None)
    assert len(calls) <= 24 and max(calls) == 2 * calibrate.PILOT_BATCH  # 24 evaluations of the pilot + twins
    g2 = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), method="error", pilot_rows=None)
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
    g = ts.thermo_grid(den, 12, sample_shape=(mix.dim,), solver="dpmpp_2m", ref_steps=64, pilot_rows=None)
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
    h = ts.thermo_grid(den, 12, solver="euler", pilot_data=g.pilot, candidates=("karras", "logsnr"), margin=1.0,
                       pilot_rows=None)
    assert len(calls) == 2 * 12 == h.meta["calibration_nfe"]
    errs = h.meta["candidate_errors"]
    assert errs[h.meta["chosen"]] == min(errs.values())   # margin 1: the plain minimum
    fixed = grids.make_grid(h.meta["chosen"], 12, den.schedule)
    np.testing.assert_array_equal(np.asarray(h), fixed)
    with pytest.raises(ValueError, match="stochastic"):
        ts.thermo_grid(den, 12, solver="euler_ancestral", pilot_data=g.pilot, method="select")
    with pytest.raises(ValueError, match="candidates must be"):
        ts.thermo_grid(den, 12, pilot_data=g.pilot, candidates=("karras", "bogus"))
    for bad in (0.0, 1.5, "0.6", True):
        with pytest.raises(ValueError, match="margin must be"):
            ts.thermo_grid(den, 12, pilot_data=g.pilot, margin=bad)
    with pytest.raises(ValueError, match="leave candidates=None"):
        ts.thermo_grid(den, 12, solver="auto", pilot_data=g.pilot, candidates=("karras",))
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="pilot_rows must be"):
            ts.thermo_grid(den, 12, pilot_data=g.pilot, pilot_rows=bad)


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
        a = ts.thermo_grid(den, 12, pilot_data=data, method="error", **kw)
        b = ts.thermo_grid(den, 12, pilot_data=data, method="select", candidates=("error",), **kw)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.meta["switch"] == a.meta["switch"] and b.meta["floor"] == a.meta["floor"]
    assert not np.array_equal(np.asarray(ts.thermo_grid(den, 12, pilot_data=data, switch=3.0, method="error")),
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
    np.testing.assert_allclose(ts.thermo_grid(den, 10, pilot_data=pil, method="error", karras_weight=1.0), karras,
                               rtol=1e-12)
    pure = np.asarray(ts.thermo_grid(den, 10, solver="heun", pilot_data=pil, method="error", karras_weight=0.0))
    half = ts.thermo_grid(den, 10, solver="heun", pilot_data=pil, method="error")
    assert half.meta["karras_weight"] == 0.5 == calibrate.karras_weight_default("heun")
    assert calibrate.karras_weight_default("dpmpp_2m") == 0.0
    assert calibrate.karras_weight_default("deis") == 0.5
    np.testing.assert_allclose(np.asarray(half)[:-1], np.sqrt(pure[:-1] * karras[:-1]), rtol=1e-12)
    assert np.all(np.diff(np.asarray(half)) < 0) and not np.allclose(pure, karras)
    ref = calibrate.reference(den, (8, 64), ref_steps=16)
    sel = ts.thermo_grid(den, 10, solver="heun", pilot_data={**pil, **ref}, candidates=("error",))
    np.testing.assert_array_equal(np.asarray(sel), np.asarray(half))
    with pytest.raises(ValueError, match="karras_weight"):
        ts.thermo_grid(den, 10, pilot_data=pil, method="error", karras_weight=1.5)


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
    g = ts.thermo_grid(den, 8, method="length", floor=0.0, sample_shape=(16,), pilot_steps=64, pilot_batch=64)
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
    g0 = ts.thermo_grid(den, 20, pilot_data=pil, critical=0.0, method="error")
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
        ts.thermo_grid(den, 10, floor=2.0, sample_shape=(64,))
    with pytest.raises(ValueError, match="critical"):
        ts.thermo_grid(den, 10, floor=0.5, critical=0.6, sample_shape=(64,))
    for bad in (-1.0, float("inf"), float("nan")):
        for name in ("switch", "amplify"):
            with pytest.raises(ValueError, match=name):
                ts.thermo_grid(den, 10, sample_shape=(64,), **{name: bad})
    for bad in ("1", True, torch.tensor([1.0, 2.0]), np.array([1.0, 2.0])):
        with pytest.raises(TypeError, match="switch"):
            ts.thermo_grid(den, 10, switch=bad, sample_shape=(64,))
    with pytest.raises(ValueError, match="pilot_steps"):
        calibrate.pilot(den, (4, 64), pilot_steps=2)


def test_twin_separation_for_dirac_data_contracts_like_sigma():
    """Dirac data: D = y everywhere, so each update maps x -> r x + (1 - r) y and twins separate as
    sigma_j / sigma_0 exactly: the pilot's amplification A(lambda) = sigma_min / sigma."""
    y = torch.linspace(-1, 1, 8, dtype=torch.float64)
    den = toy.Dirac(y).denoiser("cosine")
    p = calibrate.pilot(den, (6, 8), pilot_steps=12)
    expected = np.log(p["sigma"] / p["sigma"][0])
    np.testing.assert_allclose(p["log_sep"] - p["log_sep"][0], np.repeat(expected[:, None], 6, 1), atol=1e-6)


def test_pilot_spread_for_dirac_data_is_the_noise_spread_times_sigma():
    """Dirac data: every update is x -> r x + (1 - r) y with the same y for the whole batch, so the batch
    spread (RMS distance from the batch mean) is that of the pilot's noise times sigma_j, exactly; a pilot
    grid that is not uniform in log sigma makes a spread recorded one step late show at every node."""
    y = torch.linspace(-1, 1, 8, dtype=torch.float64)
    sig = np.array([80.0, 30.0, 20.0, 5.0, 4.0, 1.0, 0.3, 0.25, 0.02, 0.01])
    p = calibrate.pilot(toy.Dirac(y).denoiser("cosine"), (6, 8), sigmas=sig, pilot_seed=7)
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
    g0 = ts.thermo_grid(den, 20, pilot_data=pil, switch=0.0, method="error")
    g1 = ts.thermo_grid(den, 20, pilot_data=pil, method="error")
    assert g1.meta["switch"] == 1.0 and g0.meta["switch"] == 0.0
    before = lambda g: int(np.sum(-np.log(np.asarray(g)[:-1]) < lam[peak]))
    assert before(g1) > before(g0)
    assert ts.thermo_grid(den, 20, pilot_data=pil, method="length", switch=1.0).meta["switch"] == 0.0
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
        g = ts.thermo_grid(den, 6, sample_shape=(4,), pilot_batch=4, pilot_steps=8, ref_steps=16, method=method)
        assert g.shape == (7,) and np.all(np.isfinite(np.asarray(g)))
    assert set(seen) == {torch.float32}


def test_auto_picks_solver_and_grid_on_the_pilot_and_sample_follows_it():
    """solver="auto" (solvers.recommended): thermo_grid measures the two candidates of
    solvers.auto_candidates on the pilot (at 10 steps: after the reference and the twin pilot) and keeps the
    default unless the alternative is clearly better;
    ts.sample(solver="auto", grid=that grid) runs exactly that solver."""
    from thermosample import solvers
    mix = toy.default_mixture(dim=8, modes=3, seed=2)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    g = ts.thermo_grid(den, 10, solver="auto", sample_shape=(mix.dim,), ref_steps=32, pilot_batch=16)
    meta = g.meta
    plan = solvers.auto_candidates(10)
    assert meta["auto"] and (meta["solver"], meta["solver_options"], meta["chosen"]) in plan
    errors = meta["candidate_errors"]
    labels = [n + "".join(f",{k}={v}" for k, v in sorted(o.items())) + "@" + gr for n, o, gr in plan]
    assert list(errors) == labels
    keep_default = errors[labels[1]] >= calibrate.MARGIN * errors[labels[0]]
    band_label = labels[0 if keep_default else 1]
    # then the check against a karras run (AUTO_CHECK; its rule: test_the_check_against_karras_is_decided_...)
    assert list(meta["check_errors"]) == [band_label, "deis@karras"] and solvers.auto_check(10)[0] == "deis"
    assert meta["check_errors"][band_label] == errors[band_label]
    chosen = (meta["solver"], meta["solver_options"], meta["chosen"])
    assert chosen in (plan[labels.index(band_label)], solvers.auto_check(10))
    if chosen == solvers.auto_check(10):                  # taken only if no worse over all pilot samples
        assert meta["check_errors"]["deis@karras"] <= errors[band_label]
    # then, after DEIS or iPNDM only, the fitted check (AUTO_FIT; test_auto_fits_deis_corrections_...)
    fitted = "fit_errors" in meta
    assert fitted == (solvers.auto_fit(10, meta["solver"]) or "corrections" in meta["solver_options"])
    assert len(calls) == meta["calibration_nfe"] == 24 + 32 + (len(errors) + 1 + 2 * fitted) * 10
    auto = ts.sample(den, (6, mix.dim), steps=10, solver="auto", grid=g, seed=1)
    same = ts.sample(den, (6, mix.dim), steps=10, solver=meta["solver"], grid=g, seed=1, **meta["solver_options"])
    assert torch.equal(auto.samples, same.samples)
    plain = ts.sample(den, (6, mix.dim), steps=10, solver="auto", grid="logsnr", seed=1)
    fallback = ts.sample(den, (6, mix.dim), steps=10, solver=solvers.AUTO_FALLBACK[0], grid="logsnr", seed=1,
                         **solvers.AUTO_FALLBACK[1])
    assert torch.equal(plain.samples, fallback.samples)
    assert solvers.recommended(10) == {"solver": "auto", "grid": "calibrated", "steps": 10}
    assert solvers.evaluations("auto", 10) == 10
    with pytest.raises(ValueError, match="needs method='select'"):
        ts.thermo_grid(den, 10, solver="auto", method="error", pilot_data=g.pilot)


def test_auto_up_to_8_steps_runs_no_twin_pilot_and_its_ipndm_on_jump_beats_euler_and_deis_on_karras():
    """Up to 8 steps both of auto's candidates are on the "jump" grid, so the calibration is the reference
    and the two candidate runs (no 24-evaluation twin pilot). Its default, iPNDM on that grid, lands closer
    to the converged ODE solution from fresh noise than Euler on the same grid and than DEIS-3 on karras
    (the peers' best at 6 evaluations), as on the tuning mixtures of docs/calibration.md §16."""
    from thermosample import solvers
    mix = toy.default_mixture(dim=32, modes=6, seed=3)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    g = ts.thermo_grid(den, 6, solver="auto", sample_shape=(mix.dim,), ref_steps=64, pilot_batch=128,
                       pilot_rows=None)
    assert [c[2] for c in solvers.auto_candidates(6)] == ["jump", "jump"] and "D" not in g.pilot
    assert len(calls) == g.meta["calibration_nfe"] == 64 + 3 * 6           # the reference, the pair, the check
    # well-separated modes: the check's karras run sends more pilot samples to another mode, and is declined
    assert (g.meta["solver"], g.meta["solver_options"], g.meta["chosen"]) in solvers.auto_candidates(6)
    den.model = inner
    noise = torch.randn(512, mix.dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 80.0
    converged = ts.sample(den, noise=noise, steps=96, solver="unipc", order=3, grid="logsnr").samples

    def rms(solver, grid):
        out = ts.sample(den, noise=noise, grid=grid, solver=solver, track=False).samples
        return float((out - converged).square().mean().sqrt())

    jump = np.append(calibrate.jump_grid(g.pilot, 6), 0.0)
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
def test_auto_checks_its_choice_against_karras_and_takes_it_on_image_like_data(steps, monkeypatch):
    """Up to 14 steps solver="auto" measures one more run, on karras (solvers.auto_check: iPNDM up to 8 steps,
    DEIS-3 above), and takes it when its pilot error is below AUTO_CHECK_MARGIN x the band's choice. On
    image-like data (a power-law spectrum, classes that overlap: quality_problems.spectral_mixture, with a
    seed no tuning used) it is taken, costs one more run of `steps` evaluations, and from fresh noise lands
    more than 10 % closer to the converged ODE solution than both of the band's candidates."""
    from thermosample import solvers
    monkeypatch.setattr(solvers, "AUTO_FIT", (0, -1))      # the fitted check after it: the test below
    mix = _quality_problems().spectral_mixture(256, 4, 1.5, 0.3, 4242)
    den = mix.denoiser(ts.schedules.VPLinear())
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    g = ts.thermo_grid(den, steps, solver="auto", sample_shape=(256,), ref_steps=64, pilot_batch=128,
                       pilot_rows=None)
    check = solvers.auto_check(steps)
    assert (g.meta["solver"], g.meta["solver_options"], g.meta["chosen"]) == check
    twins = 24 if "error" in [c[2] for c in solvers.auto_candidates(steps)] else 0
    assert len(calls) == g.meta["calibration_nfe"] == twins + 64 + 3 * steps
    assert np.array_equal(np.asarray(g), ts.grids.make_grid("karras", steps, den.schedule))
    den.model = inner
    noise = torch.randn(512, 256, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = noise * den.schedule.sigma_max
    converged = ts.sample(den, noise=noise, steps=96, solver="unipc", order=3, grid="logsnr").samples

    def rms(solver, opts, grid):
        out = ts.sample(den, noise=noise, grid=grid, solver=solver, track=False, **opts).samples
        return float((out - converged).square().mean().sqrt())

    checked = rms(check[0], check[1], g)
    for name, opts, grid_name in solvers.auto_candidates(steps):
        sig = calibrate._candidate(grid_name, den, steps, name, g.pilot, g.pilot, solvers.get_solver(name).order)
        assert checked < 0.9 * rms(name, opts, np.append(sig, 0.0)), (name, grid_name)


def test_auto_fits_deis_corrections_on_image_like_data_and_they_beat_its_choice_and_karras(tmp_path):
    """From 9 to 14 steps, after choosing DEIS or iPNDM, solver="auto" fits deis's corrections on the pilot's
    even samples (calibrate.fit_corrections, on the choice's grid moved to the reference's nodes), measures
    them on the odd ones and takes them by check_prefers. On image-like data with a seed no tuning used it
    takes them (meta "fit_errors"; two more runs of half the pilot, counted as 2 x NFE), ts.sample(solver=
    "auto") runs exactly that, and from fresh noise it lands more than 10 % closer to the converged ODE
    solution than the choice without them and than DEIS-3 on karras (the peers' best there)."""
    from thermosample import solvers
    mix = _quality_problems().spectral_mixture(256, 4, 1.0, 0.3, 4243)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(1), inner(x, t))[1]
    g = ts.thermo_grid(den, 10, solver="auto", sample_shape=(256,), ref_steps=64, pilot_batch=128,
                       pilot_rows=None)
    before, after = list(g.meta["fit_errors"])
    assert after == f"deis,fitted@{g.meta['chosen']}" and before.split("@")[0].split(",")[0] in solvers.AUTO_FIT_AFTER
    assert g.meta["solver"] == "deis" and len(g.meta["solver_options"]["corrections"]) == 10
    assert g.meta["fit_errors"][after] < solvers.AUTO_CHECK_MARGIN * g.meta["fit_errors"][before]
    assert len(calls) == g.meta["calibration_nfe"] == 24 + 64 + 3 * 10 + 2 * 10
    den.model = inner
    noise = torch.randn(512, 256, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = noise * den.schedule.sigma_max
    converged = ts.sample(den, noise=noise, steps=96, solver="unipc", order=3, grid="logsnr").samples

    def rms(out):
        return float((out.samples - converged).square().mean().sqrt())

    auto = ts.sample(den, noise=noise, grid=g, solver="auto", track=False)
    assert torch.equal(auto.samples, ts.sample(den, noise=noise, grid=g, track=False, solver="deis",
                                               **g.meta["solver_options"]).samples)
    loaded = calibrate.ThermoGrid.load(g.save(tmp_path / "grid.json"))       # the corrections travel in JSON
    assert torch.equal(auto.samples, ts.sample(den, noise=noise, grid=loaded, solver="auto", track=False).samples)
    name, opts, grid_name = next(c for c in solvers.auto_candidates(10) + (solvers.auto_check(10),)
                                 if calibrate._auto_label(*c) == before)
    sig = calibrate._candidate(grid_name, den, 10, name, g.pilot, g.pilot, solvers.get_solver(name).order)
    choice = ts.sample(den, noise=noise, grid=np.append(sig, 0.0), solver=name, track=False, **opts)
    karras = ts.sample(den, noise=noise, grid="karras", steps=10, solver="deis", track=False)
    assert rms(auto) < 0.9 * min(rms(choice), rms(karras)), (rms(auto), rms(choice), rms(karras))


@pytest.mark.parametrize("clear_winner", [0, 1])
def test_auto_leaves_its_default_only_for_a_clear_difference(monkeypatch, clear_winner):
    """A plan whose default is far worse than its alternative (Euler on a uniform-in-sigma grid against
    third-order UniPC in log sigma) is overruled by the pilot; the same pair the other way round is not."""
    from thermosample import solvers
    good, bad = ("unipc", {"order": 3}, "logsnr"), ("euler", {}, "uniform")
    default, alternative = (bad, good) if clear_winner else (good, bad)
    monkeypatch.setattr(solvers, "AUTO_PLAN", ((None, default, alternative),))
    monkeypatch.setattr(solvers, "AUTO_CHECK", ())
    mix = toy.default_mixture(dim=8, modes=3, seed=2)
    g = ts.thermo_grid(mix.denoiser("edm"), 8, solver="auto", sample_shape=(mix.dim,), ref_steps=32,
                       pilot_batch=16)
    assert (g.meta["solver"], g.meta["solver_options"], g.meta["chosen"]) == good


def test_prefer_default_needs_a_clear_difference():
    assert calibrate.prefer_default([1.0, 0.7]) == 0           # 0.7 is not below 0.6 x 1.0
    assert calibrate.prefer_default([1.0, 0.5]) == 1
    assert calibrate.prefer_default([1.0, 0.5, 0.4]) == 2      # the best of the others
    assert calibrate.prefer_default([1.0, 0.9], margin=1.0) == 1
    assert calibrate.prefer_default([float("inf"), 3.0]) == 1  # a diverged default is always left


def test_prefer_default_with_compared_errors_must_also_hold_on_the_whole_batch():
    assert calibrate.prefer_default([1.0, 0.95], compared=[1.0, 0.3]) == 1
    assert calibrate.prefer_default([1.0, 1.05], compared=[1.0, 0.3]) == 0   # worse with the shared samples
    assert calibrate.prefer_default([1.0, 0.5], compared=[1.0, 0.7]) == 0    # no clear difference without them
    assert calibrate.prefer_default([float("inf"), 3.0], compared=[float("inf"), 3.0]) == 1


def test_a_sample_every_candidate_misses_does_not_decide_between_them():
    """256 pilot samples with bulk errors 0.006 (default) and 0.002 (alternative) per coordinate, and one
    sample both send to another mode (error about 1, over SHARED_OUTLIER x the median miss): the plain RMS
    errors are within 10 % of each other, so the 0.6 margin keeps the default; without the shared sample the
    alternative is 3 x better and is chosen. A sample only the alternative misses stays in the comparison
    (it is evidence against it)."""
    rng = np.random.default_rng(0)
    sq = np.stack([(0.006 * rng.uniform(0.5, 1.5, 256)) ** 2, (0.002 * rng.uniform(0.5, 1.5, 256)) ** 2])
    sq[:, 17] = [0.1, 0.09]
    assert calibrate.shared_outliers(sq).tolist() == [i == 17 for i in range(256)]
    full, compared = calibrate.compared_errors(sq)
    assert full[1] / full[0] > 0.9 and compared[1] / compared[0] < 0.4
    assert calibrate.prefer_default(list(full)) == 0
    assert calibrate.prefer_default(list(full), compared=list(compared)) == 1
    sq[1, 40] = 0.1                                               # the alternative alone misses one more
    assert calibrate.shared_outliers(sq).sum() == 1
    full, compared = calibrate.compared_errors(sq)
    assert calibrate.prefer_default(list(full), compared=list(compared)) == 0
    w = np.full(256, 1.0 / 256)                                    # weights: the same as uniform
    np.testing.assert_allclose(calibrate.compared_errors(sq, w)[1], calibrate.compared_errors(sq)[1], rtol=1e-12)
    sq[:, :] = 0.0                                                # an exact pilot flags nothing
    assert not calibrate.shared_outliers(sq).any()


def test_the_check_against_karras_is_decided_on_the_bulk_not_on_one_switched_sample():
    """calibrate.check_prefers (solver="auto"'s check): a check run with half the choice's bulk error replaces
    it; one whose bulk error is 6 x the choice's does not, even when the choice sent one pilot sample to
    another mode and so has the larger RMS error over all samples (fresh5 d600 at NFE 10: taking the check
    there gave 14 x the error on the benchmark's batch); a check with less bulk error but more switched
    samples than the choice is no worse over all samples only if its switches cost less."""
    rng = np.random.default_rng(1)
    w = np.full(256, 1.0 / 256)
    bulk = (0.005 * rng.uniform(0.5, 1.5, 256)) ** 2
    assert calibrate.check_prefers(np.stack([bulk, bulk / 4]), w, 0.8)
    assert not calibrate.check_prefers(np.stack([bulk, bulk / 1.5]), w, 0.8)   # 0.82 x: within the margin
    choice, check = bulk.copy(), 36 * bulk
    choice[9] = 0.5                                   # the choice's one switched sample
    assert np.sqrt((check * w).sum()) < np.sqrt((choice * w).sum())          # the check wins on plain RMS
    assert not calibrate.check_prefers(np.stack([choice, check]), w, 0.8)
    check = bulk / 4
    check[[3, 4]] = 0.5                              # less bulk error, two switched samples
    assert not calibrate.check_prefers(np.stack([choice, check]), w, 0.8)
    check[4] = bulk[4] / 4
    assert calibrate.check_prefers(np.stack([choice, check]), w, 0.8)       # one each: the bulk decides


def test_auto_states_its_compared_errors_and_a_rerun_reproduces_them():
    """thermo_grid(solver="auto") records each candidate's pilot error without the shared outliers; rerunning
    both candidates from the pilot's noise and applying compared_errors gives the same numbers."""
    from thermosample import solvers
    mix = toy.default_mixture(dim=8, modes=3, seed=2)
    den = mix.denoiser("edm")
    g = ts.thermo_grid(den, 8, solver="auto", sample_shape=(mix.dim,), ref_steps=32, pilot_batch=32)
    sq = []
    for name, opts, grid_name in solvers.auto_candidates(8):
        sig = calibrate._candidate(grid_name, den, 8, name, g.pilot, g.pilot, solvers.get_solver(name).order)
        out = ts.sample(den, noise=g.pilot["ref_noise"], grid=np.append(sig, 0.0), solver=name, track=False,
                        **opts)
        sq.append((out.samples.double() - g.pilot["ref_final"].double()).square().mean(1).numpy())
    full, compared = calibrate.compared_errors(np.stack(sq))
    assert list(g.meta["candidate_errors"].values()) == pytest.approx(list(full), rel=1e-9)
    assert list(g.meta["compared_errors"].values()) == pytest.approx(list(compared), rel=1e-9)
    assert g.meta["shared_outliers"] == int(calibrate.shared_outliers(np.stack(sq)).sum())


@pytest.fixture(scope="module")
def narrow_auto20():
    """A 256-dimensional mixture of narrow modes, solver="auto"'s 20-step grid on a 64-sample pilot, fresh noise
    and its converged solution: (denoiser, grid, noise, exact samples)."""
    den = toy.default_mixture(dim=256, modes=4, seed=3).denoiser("edm")
    g = ts.thermo_grid(den, 20, solver="auto", sample_shape=(256,), pilot_batch=64, ref_steps=64)
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    exact = ts.sample(den, noise=x, grid="logsnr", steps=400, solver="unipc", order=3, track=False).samples
    return den, g, x, exact


def _rms(den, grid, x, exact, **kw):
    out = ts.sample(den, noise=x.float(), grid=grid, track=False, **{"solver": "auto", **kw}).samples
    return (out.double() - exact).square().mean().sqrt().item()


def test_auto_measures_noise_prediction_on_the_low_noise_steps_from_12_steps(narrow_auto20):
    """From AUTO_NOISE_FROM steps, solver="auto" also measures its UniPC choice with noise_below at each of
    AUTO_NOISE_CUTS times the data's scale (here about 1) and keeps the best when it clears AUTO_NOISE_MARGIN. On a
    256-dimensional mixture of narrow modes at 20 steps it takes a cut; the recorded errors are those of
    rerunning each cut from the pilot's noise; the evaluations are counted; and on fresh noise the chosen run
    is closer to the converged solution than the same grid without the cut, at 20 steps and at 16 (below the
    18 of before §21). Below AUTO_NOISE_FROM (12) steps nothing is measured."""
    from thermosample import solvers
    den, g, x, exact = narrow_auto20
    meta = g.meta
    assert meta["solver"] == "unipc" and "noise_below" in meta["solver_options"]
    scale = calibrate.data_scale(g.pilot)
    assert 0.9 < scale < 1.1
    errors = meta["noise_below_errors"]
    assert list(errors)[0] == "off" and len(errors) == 1 + len(solvers.AUTO_NOISE_CUTS)
    sig = np.asarray(g)
    assert meta["solver_options"]["noise_order"] == solvers.AUTO_NOISE_ORDER == 3
    plain = {k: v for k, v in meta["solver_options"].items() if k not in ("noise_below", "noise_order")}
    for c, recorded in zip(solvers.AUTO_NOISE_CUTS, list(errors.values())[1:]):
        out = ts.sample(den, noise=g.pilot["ref_noise"], grid=sig, solver="unipc", track=False, noise_below=c * scale,
                        noise_order=3, **plain)
        err = (out.samples.double() - g.pilot["ref_final"].double()).square().mean().sqrt().item()
        assert recorded == pytest.approx(err, rel=1e-9)
    best = min(list(errors)[1:], key=errors.get)
    assert meta["solver_options"]["noise_below"] == pytest.approx(float(best), rel=1e-3)
    assert errors[best] < solvers.AUTO_NOISE_MARGIN * errors["off"]
    assert meta["calibration_nfe"] == 24 + 64 + 2 * 20 + len(solvers.AUTO_NOISE_CUTS) * 20
    g16 = ts.thermo_grid(den, 16, solver="auto", pilot_data=g.pilot)    # below 18, the threshold before §21
    assert g16.meta["solver"] == "unipc" and "noise_below" in g16.meta["solver_options"]
    for grid in (g, g16):
        uncut = {k: v for k, v in grid.meta["solver_options"].items() if k not in ("noise_below", "noise_order")}
        assert _rms(den, grid, x, exact) < _rms(den, grid, x, exact, solver="unipc", **uncut), grid.steps
    below = ts.thermo_grid(den, solvers.AUTO_NOISE_FROM - 1, solver="auto", pilot_data=g.pilot)
    assert "noise_below_errors" not in below.meta and "noise_below" not in below.meta["solver_options"]


def test_auto_runs_unipc3_with_max_h_up_to_19_steps(narrow_auto20, monkeypatch):
    """From 9 to 19 steps solver="auto" measures UniPC-3 with max_h against iPNDM (15-17 steps had UniPC-2 as
    the default before §22; with the noise cut it was 7.0 and 10.6 x the best peer on two tuning mixtures at 16).
    On the narrow-mode mixture at 16 steps, from the same pilot, the choice lands over 10 x closer to the
    converged solution on fresh noise than UniPC-2's with its cut, the old band's default (measured: about 130 x);
    at 18 steps over 2 x closer than plain UniPC-3 | UniPC-2 with the cut after the choice, the band it
    replaced there (§23; measured: about 4.7 x)."""
    from thermosample import solvers
    den, g, x, exact = narrow_auto20
    assert solvers.auto_candidates(15) == solvers.auto_candidates(19) == solvers.auto_candidates(9)
    assert solvers.auto_candidates(20) != solvers.auto_candidates(19)
    new18 = ts.thermo_grid(den, 18, solver="auto", pilot_data=g.pilot)
    new = ts.thermo_grid(den, 16, solver="auto", pilot_data=g.pilot)
    assert new.meta["solver_options"]["order"] == 3 and new.meta["solver_options"]["max_h"] == solvers.AUTO_MAX_H
    monkeypatch.setattr(solvers, "AUTO_PLAN", ((17, ("unipc", {}, "error"), ("ipndm", {}, "error")),
                                               (None, *solvers.AUTO_PLAN[-1][1:])))
    old = ts.thermo_grid(den, 16, solver="auto", pilot_data=g.pilot)
    assert old.meta["solver"] == "unipc" and "order" not in old.meta["solver_options"]
    assert 10 * _rms(den, new, x, exact) < _rms(den, old, x, exact)
    monkeypatch.setattr(solvers, "AUTO_NOISE_FIRST", (15, 17))    # the plan above puts 18 in its open UniPC-3 band
    old18 = ts.thermo_grid(den, 18, solver="auto", pilot_data=g.pilot)
    assert new18.meta["solver_options"]["max_h"] == solvers.AUTO_MAX_H and "max_h" not in old18.meta["solver_options"]
    assert 2 * _rms(den, new18, x, exact) < _rms(den, old18, x, exact)


def test_auto_cuts_its_unipc_candidate_before_the_candidates_compete_at_15_to_19_steps(narrow_auto20, monkeypatch):
    """At 15-19 steps (AUTO_NOISE_FIRST) the noise stage runs on the UniPC candidate before it meets iPNDM: the
    error it competes with is that of its kept cut, not of the plain run (a plain UniPC run several times worse
    than iPNDM can be far better with its cut, §22). Outside AUTO_NOISE_FIRST the plain run competes, and the
    stage runs only on a UniPC choice. The evaluations are counted."""
    from thermosample import solvers
    den, g, _, _ = narrow_auto20
    assert [n for n in range(5, 30) if solvers.auto_noise_first(n)] == [15, 16, 17, 18, 19]
    first = ts.thermo_grid(den, 16, solver="auto", pilot_data=g.pilot).meta
    unipc = next(k for k in first["candidate_errors"] if k.startswith("unipc"))
    cuts = first["noise_below_errors"]
    kept = min(list(cuts)[1:], key=cuts.get)
    assert cuts[kept] < solvers.AUTO_NOISE_MARGIN * cuts["off"]          # a cut is kept here
    assert first["candidate_errors"][unipc] == pytest.approx(cuts[kept], rel=1e-12) != cuts["off"]
    assert first["calibration_nfe"] == (2 + len(solvers.AUTO_NOISE_CUTS)) * 16
    monkeypatch.setattr(solvers, "AUTO_NOISE_FIRST", (15, 15))
    after = ts.thermo_grid(den, 16, solver="auto", pilot_data=g.pilot).meta
    assert after["candidate_errors"][unipc] == pytest.approx(cuts["off"], rel=1e-12)


def test_the_single_solver_choice_keeps_every_sample(monkeypatch):
    """Karras against "error" for one solver is decided on all pilot samples (its point is never to be worse
    than karras): with the cut lowered so far that half the samples count as shared outliers, the comparison
    without them would pick "error" for DPM-Solver++(2M) at 8 steps, yet thermo_grid keeps karras."""
    monkeypatch.setattr(calibrate, "SHARED_OUTLIER", 1.0)
    den = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    g = ts.thermo_grid(den, 8, solver="dpmpp_2m", sample_shape=(8,), ref_steps=32, pilot_batch=32)
    errors, compared = list(g.meta["candidate_errors"].values()), list(g.meta["compared_errors"].values())
    assert list(g.meta["candidate_errors"]) == ["karras", "error"]
    assert calibrate.prefer_default(errors, compared=compared) == 1      # the comparison would leave karras
    assert g.meta["chosen"] == "karras" and calibrate.prefer_default(errors) == 0


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
    """thermo_grid(boundary_pool=512): the screen's evaluations (24 per chunk of 256 starting points, 512 rows
    per evaluation: 8 calls of 64) are in calibration_nfe, the reference and candidates run 16 + 64 samples,
    and each candidate's stated error weighs the screened ones by 64 / 512 in all."""
    mix = toy.default_mixture(dim=4, modes=3, seed=1)
    den = mix.denoiser("edm")
    calls = []
    inner = den.model
    den.model = lambda x, t: (calls.append(x.shape[0]), inner(x, t))[1]
    g = ts.thermo_grid(den, 6, solver="dpmpp_2m", sample_shape=(4,), pilot_batch=16, ref_steps=16,
                       boundary_pool=512)
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
    kw = dict(solver="dpmpp_2m", sample_shape=(4,), pilot_batch=16, ref_steps=16)
    plain = ts.thermo_grid(den, 6, **kw)
    assert plain.meta["boundary"] == [0, 0] and plain.pilot["ref_final"].shape[0] == 16
    screened = ts.thermo_grid(den, 6, pilot_data=plain.pilot, boundary_pool=512, **kw)
    assert screened.meta["boundary"] == [64, 512] and screened.pilot["ref_final"].shape[0] == 16 + 64
    assert screened.meta["calibration_nfe"] == 16 + 2 * 24 + 2 * 6         # reference, screen, candidates
    kept = ts.thermo_grid(den, 6, pilot_data=screened.pilot, boundary_pool=512, **kw)
    assert kept.meta["calibration_nfe"] == 2 * 6 and kept.pilot["ref_final"] is screened.pilot["ref_final"]
    back = ts.thermo_grid(den, 6, pilot_data=screened.pilot, **kw)
    assert back.meta["boundary"] == [0, 0] and back.pilot["ref_final"].shape[0] == 16
    torch.testing.assert_close(back.pilot["ref_final"], plain.pilot["ref_final"], rtol=0, atol=0)


def test_bad_boundary_sizes_are_refused():
    mix = toy.default_mixture(dim=4, modes=3, seed=1)
    den = mix.denoiser("edm")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="boundary_pool must be an int >= 0"):
            ts.thermo_grid(den, 6, sample_shape=(4,), pilot_batch=16, ref_steps=16, boundary_pool=bad)
    with pytest.raises(ValueError, match="boundary_samples must be an int >= 0"):
        calibrate.reference(den, (16, 4), ref_steps=16, boundary_pool=64, boundary_samples=-2)
