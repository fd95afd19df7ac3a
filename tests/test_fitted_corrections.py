"""deis's fitted corrections (calibrate.fit_corrections; solver="auto" measures them after DEIS or iPNDM in the
bands whose auto.Band.fit_after names them: tests/test_calibrate.py).

- The corrected step is DEIS's update plus the stated combination of D and eps differences: against a
  pure-PyTorch reference of that formula in float64, on the torch, cpp and (interpreted) Triton backends.
- Zero corrections are plain DEIS, to the bit; malformed ones are refused with the step they concern.
- The fit on an isotropic Gaussian, whose probability-flow ODE is linear (every state a multiple of the
  starting noise), finds the exact trajectory: from fresh noise it lands on the closed-form solution far
  closer than DEIS alone, with the reference's states recorded whole (7 dimensions) or projected (1031).
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import calibrate, grids, ops, solvers

DEN = ts.toy.GaussianMixture(torch.randn(3, 35, generator=torch.Generator().manual_seed(5)), 0.4).denoiser("edm")


def _corrections(steps, seed=0, size=0.2):
    """Random corrections of the right shape: 2 min(FIT_HISTORY, i) floats at step i."""
    g = torch.Generator().manual_seed(seed)
    return [(size * torch.randn(2 * min(solvers.FIT_HISTORY, i), generator=g, dtype=torch.float64)).tolist()
            for i in range(steps)]


def corrected_deis(den, x, sigmas, corrections):
    """Reference: x' = DEIS-3's update + sum_j a_j (D_{i-j+1} - D_{i-j}) + sum_j b_j h (eps_{i-j+1} - eps_{i-j}),
    h = s' - s, eps = (x - D) / sigma; DEIS as diffusers' (lower order at the start and, below 15 steps, on the
    last two steps; D on the step to 0)."""
    n = len(sigmas) - 1
    xs, ds = [], []
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = den(x, s)
        xs.insert(0, x)
        ds.insert(0, d)
        past = sigmas[i::-1]
        eps = [(xj - dj) / sj for xj, dj, sj in zip(xs, ds, past)]
        if s_next == 0:
            new = d
        else:
            p = min(3, i + 1, n - i if n < 15 else 3)
            new = x + sum(c * e for c, e in zip(solvers.deis_coeffs(list(past[:p]), s_next), eps))
        q = min(2, i)
        a, b = corrections[i][:q], corrections[i][q:]
        h = s_next - s
        for j in range(1, q + 1):
            new = new + a[j - 1] * (ds[j - 1] - ds[j]) + b[j - 1] * h * (eps[j - 1] - eps[j])
        x = new
    return x


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("steps", [1, 3, 7, 16])
def test_corrected_deis_is_its_formula_on_every_backend(backend, steps, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        row = dataclasses.replace(ops.BACKENDS["triton"], devices=None, available=lambda: True)
        monkeypatch.setitem(ops.BACKENDS, "triton", row)
    sigmas = [float(s) for s in grids.karras(steps, 0.002, 80.0)] + [0.0]
    x = torch.randn(6, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80.0
    corrections = _corrections(steps, seed=steps)
    want = corrected_deis(DEN, x.clone(), sigmas, corrections)
    dtype = torch.float32 if backend == "triton" else torch.float64   # the interpreter's float32 kernel
    got = ts.sample(DEN, noise=x.to(dtype), grid=torch.tensor(sigmas, dtype=torch.float64), solver="deis",
                    backend=backend, corrections=corrections)
    assert torch.isfinite(got.samples).all() and got.nfe == steps
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.samples.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_zero_corrections_are_plain_deis_to_the_bit():
    kw = dict(shape=(4, 5, 7), steps=9, solver="deis", grid="karras", seed=2, backend="torch")
    zero = [[0.0] * len(c) for c in _corrections(9)]
    assert torch.equal(ts.sample(DEN, corrections=zero, **kw).samples, ts.sample(DEN, **kw).samples)


@pytest.mark.parametrize("bad,match", [
    ([[]] * 3, r"one sequence of floats per step \(4\)"),
    ("abcd", "one sequence of floats per step"),
    ([[], [0.1], [0.0] * 4, [0.0] * 4], r"corrections\[1\] must hold 2 floats, got 1"),
    ([[], [0.1, "x"], [0.0] * 4, [0.0] * 4], "one sequence of floats per step: could not convert"),
    ([[], 0.5, [0.0] * 4, [0.0] * 4], "one sequence of floats per step: 'float' object is not iterable"),
    ([[], [0.1, math.nan], [0.0] * 4, [0.0] * 4], "must be finite"),
])
def test_malformed_corrections_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ts.sample(DEN, (2, 5, 7), steps=4, solver="deis", corrections=bad, backend="torch")


@pytest.mark.parametrize("dim", [7, 1031])
def test_the_fit_finds_the_exact_trajectory_of_an_isotropic_gaussian(dim):
    """N(0, s0^2 I) under EDM: the ODE from x_T ends (after D at sigma_min, as every sampler here does) at the
    closed form x_T s0^2 / sqrt((s0^2 + sigma_min^2)(s0^2 + sigma_max^2)). Every state, D and eps is a multiple
    of x_T, so from the second step on the fitted corrections can put each step on the trajectory; DEIS-3
    alone misses it by its discretisation error. 1031 dimensions exceed the reference's recorded coordinates
    (1024 for 64 samples), so the fit there uses the projections (ref_proj)."""
    s0 = 0.7
    den = ts.toy.GaussianMixture(torch.zeros(1, dim), s0).denoiser("edm")
    sch = den.schedule
    ref = calibrate.reference(den, (64, dim), ref_steps=64)
    assert (ref["ref_proj"] is None) == (dim <= ref["ref_x"].shape[-1])
    sig = calibrate.reference_nodes(grids.make_grid("karras", 8, sch)[:-1], ref)
    corrections = calibrate.fit_corrections(den, sig, ref, np.arange(64))
    assert [len(c) for c in corrections] == [0, 2, 4, 4, 4, 4, 4, 4]
    x_t = torch.randn(32, dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * sch.sigma_max
    exact = x_t * s0 ** 2 / math.sqrt((s0 ** 2 + sch.sigma_min ** 2) * (s0 ** 2 + sch.sigma_max ** 2))
    grid = torch.tensor(np.append(sig, 0.0), dtype=torch.float64)

    def rms(**options):
        out = ts.sample(den, noise=x_t, grid=grid, solver="deis", track=False, **options).samples
        return float((out - exact).square().mean().sqrt())

    fitted, plain = rms(corrections=corrections), rms()
    assert fitted < 0.01 * plain, (fitted, plain)


def test_the_reference_records_projections_whose_norms_estimate_the_full_ones():
    """ref_proj: every node's state times `_projection` (seeded by ref_proj_seed), so the fit can compare
    states on all their coordinates at once; squared norms of the projections estimate the full ones."""
    dim = 600
    den = ts.toy.GaussianMixture(torch.randn(3, dim, generator=torch.Generator().manual_seed(1)), 0.3).denoiser("edm")
    ref = calibrate.reference(den, (256, dim), ref_steps=64)
    m = ref["ref_proj"].shape[-1]
    assert ref["ref_proj"].shape == (64, 256, m) and m < dim == ref["ref_noise"].shape[-1]
    proj = calibrate._projection(dim, m, ref["ref_proj_seed"])
    torch.testing.assert_close(ref["ref_proj"][0], ref["ref_noise"].double() @ proj.double(), rtol=1e-6, atol=1e-3)
    for v in (ref["ref_noise"], ref["ref_final"]):      # the noise, and the data's (clustered) samples
        v = v.double()
        assert abs(float((v @ proj.double()).square().sum() / v.square().sum()) - 1.0) < 0.05


def test_the_fit_is_reproducible_in_float32_on_a_low_dimensional_flow_matching_mixture():
    """After DEIS's Euler first step, h (eps_1 - eps_0) = -(h / sigma_1) (D_1 - D_0) exactly, and at high noise
    (CondOT: sigma_max = 999) D is nearly the data's mean: a plain least-squares solve gave coefficients of
    1e3-1e9 that cancel in float64 and not in float32 (60,000 x the best peer's error on a 2-dimensional
    benchmark mixture, 200 x here). The fit prices the rounding its coefficients scale (calibrate.FIT_ROUNDING),
    so they stay moderate and a float32 run from fresh noise lands as close to the converged solution as a
    float64 one."""
    mix = ts.toy.GaussianMixture(torch.tensor([[-2.0, 0.5], [1.5, 1.0], [0.3, -1.8], [2.2, -0.7], [-0.8, 2.1]]), 0.35)
    den = mix.denoiser("condot")
    ref = calibrate.reference(den, (256, 2), ref_steps=64)
    sig = calibrate.reference_nodes(grids.make_grid("karras", 10, den.schedule)[:-1], ref)
    corrections = calibrate.fit_corrections(den, sig, ref, np.arange(0, 256, 2))
    assert max(abs(c) for c in corrections[1]) < 10.0, corrections[1]
    x_t = torch.randn(512, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * den.schedule.sigma_max
    converged = ts.sample(den, noise=x_t, steps=96, solver="unipc", order=3, grid="logsnr").samples
    grid = torch.tensor(np.append(sig, 0.0), dtype=torch.float64)

    def rms(noise):
        out = ts.sample(den, noise=noise, grid=grid, solver="deis", track=False, corrections=corrections).samples
        return float((out.double() - converged).square().mean().sqrt())

    assert rms(x_t.float()) < 1.2 * rms(x_t), (rms(x_t.float()), rms(x_t))


def test_auto_counts_no_evaluation_for_a_fit_it_cannot_make():
    """A pilot that lacks what the fit needs (an older pilot passed as pilot_data= has no ref_proj): auto's fit
    stage keeps the run, records nothing and counts no evaluation, and the model is not called. With the
    projections it fits on the even samples and measures on the odd ones: two runs of `steps` evaluations."""
    from thermosample import auto
    calls = []

    def model(x, t):
        calls.append(len(x))
        return DEN.model(x, t)
    den = ts.Denoiser(model, DEN.schedule, prediction=DEN.prediction, time=DEN.time)
    ref = calibrate.reference(den, (16, 35), ref_steps=32)
    run, _ = auto._measure(den, 8, auto.Candidate("deis", "karras"), ref, None, "torch", None)
    older = {k: v for k, v in ref.items() if k != "ref_proj"}
    calls.clear()
    kept, found, spent = auto._fit(den, 8, run, older, "torch", auto.MARGIN)
    assert (kept is run, found, spent, calls) == (True, {}, 0, [])
    _, found, spent = auto._fit(den, 8, run, ref, "torch", auto.MARGIN)
    assert spent == len(calls) == 2 * 8 and list(found) == ["deis@karras", "deis,fitted@karras"]
