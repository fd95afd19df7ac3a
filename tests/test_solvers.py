"""Solver accuracy on exact-score mixture oracles: convergence order and SDE distributions."""
import math

import numpy as np
import pytest
import torch

import thermosample as ts


def mixture(dim=6, modes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(modes, dim, generator=g, dtype=torch.float64)
    stds = 0.3 + 0.4 * torch.rand(modes, generator=g, dtype=torch.float64)
    return ts.toy.GaussianMixture(means, stds, 0.5 + torch.rand(modes, generator=g, dtype=torch.float64))


def run(den, noise, solver, steps, grid="karras"):
    return ts.sample(den, noise=noise, steps=steps, solver=solver, grid=grid, backend="torch", track=False).samples


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpmpp_2m", 2), ("ddim", 1)])
def test_convergence_order(solver, order):
    mix = mixture()
    den = mix.denoiser("edm")
    sch = den.schedule
    g = torch.Generator().manual_seed(1)
    noise = sch.sigma_max * torch.randn(256, mix.dim, generator=g, dtype=torch.float64)
    reference = run(den, noise, "heun", 1500)
    steps = np.array([16, 32, 64, 128])
    errors = np.array([float((run(den, noise, solver, int(n)) - reference).square().mean().sqrt()) for n in steps])
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order - 0.3 < slope < order + 0.6, (solver, errors, slope)


def test_solvers_agree_with_the_ode_solution_at_high_step_count():
    mix = mixture(seed=3)
    den = mix.denoiser("cosine")
    noise = den.schedule.sigma_max * torch.randn(128, mix.dim, generator=torch.Generator().manual_seed(2),
                                                 dtype=torch.float64)
    ref = run(den, noise, "heun", 400, grid="logsnr")
    assert float((run(den, noise, "dpmpp_2m", 400, grid="logsnr") - ref).abs().max()) < 1e-2
    for solver in ("euler", "ddim"):  # first order: ~h = log(sigma ratio) / 400 relative error
        assert float((run(den, noise, solver, 400, grid="logsnr") - ref).square().mean().sqrt()) < 0.03


def moments_close(samples, data):
    m1, m2 = samples.double().mean(0), data.mean(0)
    c1, c2 = torch.cov(samples.double().T), torch.cov(data.T)
    return float((m1 - m2).norm()), float((c1 - c2).norm() / c2.norm())


@pytest.mark.parametrize("solver,options", [("euler_maruyama", {}), ("euler_ancestral", {}),
                                            ("ddim", {"eta": 1.0}), ("heun", {"churn": 10.0})])
def test_stochastic_solvers_sample_the_data_distribution(solver, options):
    mix = mixture(dim=3, modes=3, seed=5)
    n = 4000
    out = ts.sample(mix.denoiser("vp"), (n, mix.dim), steps=200, solver=solver, grid="logsnr", seed=9,
                    backend="torch", dtype=torch.float64, **options)
    data, other = mix.sample(n, seed=1), mix.sample(n, seed=2)
    baseline = ts.toy.sliced_w2(data, other)  # two independent data sets: the statistical yardstick
    assert ts.toy.sliced_w2(out.samples, data) < 2.5 * baseline + 0.02
    mean_err, cov_err = moments_close(out.samples, data)
    assert mean_err < 0.15 and cov_err < 0.08


def test_stochastic_solver_seeds_give_different_but_reproducible_noise():
    mix = mixture(dim=3, modes=2)
    den = mix.denoiser("condot")
    a = ts.sample(den, (16, 3), steps=10, solver="euler_ancestral", seed=1, backend="torch").samples
    b = ts.sample(den, (16, 3), steps=10, solver="euler_ancestral", seed=1, backend="torch").samples
    c = ts.sample(den, (16, 3), steps=10, solver="euler_ancestral", seed=2, backend="torch").samples
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_callback_receives_k_diffusion_dict():
    mix = mixture(dim=2, modes=2)
    seen = []
    ts.sample(mix.denoiser("edm"), (4, 2), steps=5, solver="heun", backend="torch",
              callback=lambda d: seen.append((d["i"], d["sigma"], d["sigma_hat"], tuple(d["x"].shape),
                                              tuple(d["denoised"].shape))))
    assert [s[0] for s in seen] == list(range(5))
    assert all(s[3] == (4, 2) and s[4] == (4, 2) for s in seen)
    assert seen[0][1] == pytest.approx(80.0)


@pytest.mark.parametrize("solver,steps,nfe", [("euler", 7, 7), ("heun", 7, 13), ("dpmpp_2m", 7, 7)])
def test_nfe_count(solver, steps, nfe):
    calls = []
    mix = mixture(dim=2, modes=2)
    inner = mix.denoiser("edm")
    den = ts.Denoiser(lambda x, t: (calls.append(1), inner.model(x, t))[1], "edm", prediction="x0")
    out = ts.sample(den, (3, 2), steps=steps, solver=solver, backend="torch")
    assert out.nfe == nfe == len(calls) == out.thermo.t.numel()


def test_noise_free_options_keep_the_pathwise_speed_limit():
    """euler_ancestral with eta=0 is plain Euler: its report carries Euler's speed limit; with noise (or
    ancestral steps without it) the pathwise bound does not apply and is reported as NaN."""
    mix = mixture(dim=3, modes=2)
    den = mix.denoiser("condot")
    ref = ts.sample(den, (32, 3), steps=12, solver="euler", seed=3, backend="torch")
    assert math.isfinite(ref.thermo.speed_limit)
    out = ts.sample(den, (32, 3), steps=12, solver="euler_ancestral", seed=3, backend="torch", eta=0.0)
    torch.testing.assert_close(out.samples, ref.samples, rtol=1e-5, atol=1e-5)
    assert math.isclose(out.thermo.speed_limit, ref.thermo.speed_limit, rel_tol=1e-4)
    for options in ({}, {"s_noise": 0.0}):
        noisy = ts.sample(den, (32, 3), steps=12, solver="euler_ancestral", seed=3, backend="torch", **options)
        assert math.isnan(noisy.thermo.speed_limit)
    assert ts.solvers.injects_noise("ddim", {"eta": 0.5}) and not ts.solvers.injects_noise("ddim", {})
    assert ts.solvers.injects_noise("heun", {"churn": 1.0}) and not ts.solvers.injects_noise("heun", {})
