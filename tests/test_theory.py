"""docs/theory.md §3-4 closed forms: kinetic cost, efficiency and the speed limit on exact-score oracles."""
import math

import pytest
import torch
from scipy.integrate import quad

import thermosample as ts
from thermosample.schedules import CondOT, Cosine

MU, S0 = 1.5, 0.4


def gaussian_rate(sch, t, mu=MU, s0=S0, d=1):
    """E||nu||^2 for Gaussian data N(mu, s0^2 I_d) (docs/theory.md §4), from the schedule's m, s."""
    m, s, dm, ds = sch.m(t), sch.s(t), sch.dm(t), sch.ds(t)
    v = m * m * s0 * s0 + s * s
    dsqrt_v = (m * dm * s0 * s0 + s * ds) / math.sqrt(v)
    return dm * dm * mu * mu * d + d * dsqrt_v ** 2


def dirac_start(y, sch, batch, seed):
    """Explicit x_T = y + sigma_max eps (float64) and the eps used."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(batch, y.numel(), generator=g, dtype=torch.float64)
    return y[None] + sch.sigma_max * eps, eps


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_dirac_condot_cost_is_exact_and_efficiency_one(steps):
    y = torch.tensor([0.7, -1.2, 2.0, 0.1, -0.4], dtype=torch.float64)
    sch = CondOT()
    noise, eps = dirac_start(y, sch, 64, seed=1)
    out = ts.sample(ts.toy.Dirac(y).denoiser(sch), noise=noise, steps=steps, solver="euler", grid="uniform",
                    backend="torch")
    rep = out.thermo
    # Straight trajectories: Euler lands exactly on y, and the per-sample cost is ||eps - y||^2 (t1 - t0).
    torch.testing.assert_close(out.samples, y.expand_as(out.samples), rtol=0, atol=1e-9)
    t1, t0 = rep.t[0].item(), rep.t[-1].item()
    expected = (eps - y).square().sum(1) * (t1 - t0)
    torch.testing.assert_close(rep.kinetic, expected, rtol=2e-6, atol=0)
    if steps > 1:
        assert rep.efficiency == pytest.approx(1.0, abs=2e-6)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m"])
def test_dirac_condot_straight_for_every_ode_solver(solver):
    y = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    sch = CondOT()
    noise, eps = dirac_start(y, sch, 32, seed=2)
    rep = ts.sample(ts.toy.Dirac(y).denoiser(sch), noise=noise, steps=8, solver=solver, grid="karras",
                    backend="torch").thermo
    rate = (eps - y).square().sum(1)
    torch.testing.assert_close(rep.rate.double(), rate.expand_as(rep.rate).to(rep.rate.dtype).double(),
                               rtol=1e-6, atol=0)
    assert rep.efficiency == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("sched,closed_form", [(CondOT, 2.7817), (Cosine, 3.2200)])
def test_gaussian_kinetic_cost_matches_closed_form(sched, closed_form):
    sch = sched(t_min=1e-5, t_max=1 - 1e-5)
    quadrature = quad(lambda t: gaussian_rate(sch, t), sch.t_min, sch.t_max, limit=200)[0]
    assert quadrature == pytest.approx(closed_form, abs=2e-4)  # the formula itself, docs/theory.md §4
    batch = 20000
    g = torch.Generator().manual_seed(3)
    y = MU + S0 * torch.randn(batch, 1, generator=g, dtype=torch.float64)
    noise = y + sch.sigma_max * torch.randn(batch, 1, generator=g, dtype=torch.float64)
    rep = ts.sample(ts.toy.Gaussian([MU], S0).denoiser(sch), noise=noise, steps=200, solver="heun",
                    grid="logsnr", backend="torch").thermo
    k = rep.kinetic
    stderr = float(k.std()) / math.sqrt(batch)
    assert abs(float(k.mean()) - closed_form) < 4 * stderr + 5e-3 * closed_form
    # The pathwise speed limit never exceeds the cost; W2^2/tau = 2.61 lies below both.
    assert rep.speed_limit <= rep.kinetic_mean
    w2 = (1 - 0) ** 2 * MU ** 2 + (1 - S0) ** 2
    assert w2 == pytest.approx(2.61)
    assert w2 - 0.05 < rep.speed_limit


def test_condot_dissipates_less_than_cosine_for_gaussian():
    batch = 4000
    ks = []
    for sched in (CondOT, Cosine):
        sch = sched(t_min=1e-5, t_max=1 - 1e-5)
        out = ts.sample(ts.toy.Gaussian([MU], S0).denoiser(sch), (batch, 1), steps=100, solver="dpmpp_2m",
                        grid="logsnr", seed=5, backend="torch", dtype=torch.float64)
        ks.append(out.thermo.kinetic_mean)
    assert ks[0] < ks[1]


@pytest.mark.parametrize("solver,grid,steps", [("euler", "uniform", 40), ("heun", "karras", 30),
                                               ("dpmpp_2m", "logsnr", 30), ("ddim", "kl_optimal", 40)])
@pytest.mark.parametrize("schedule", ["condot", "cosine", "vp"])
def test_speed_limit_never_exceeds_kinetic_cost(solver, grid, steps, schedule):
    mix = ts.toy.GaussianMixture(torch.tensor([[2.0, 0.0, 1.0], [-1.0, 1.5, -0.5], [0.0, -2.0, 0.5]]),
                                 [0.3, 0.5, 0.2], [0.5, 0.3, 0.2])
    rep = ts.sample(mix.denoiser(schedule), (512, 3), steps=steps, solver=solver, grid=grid, seed=7,
                    backend="torch", dtype=torch.float64).thermo
    per_sample_bound = rep.displacement / rep.duration
    assert (per_sample_bound <= rep.kinetic * (1 + 1e-3)).float().mean() > 0.99
    assert 0 < rep.efficiency <= 1.0


def test_dirac_cosine_cost_tends_to_pi2_over_8():
    y = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    d = y.numel()
    sch = Cosine(t_min=1e-4, t_max=1 - 1e-4)
    batch = 4000
    noise, eps = dirac_start(y, sch, batch, seed=11)
    target = math.pi ** 2 * (float(y.square().sum()) + d) / 8
    errors = []
    for steps in (8, 32, 128):
        rep = ts.sample(ts.toy.Dirac(y).denoiser(sch), noise=noise, steps=steps, solver="heun",
                        grid="uniform", backend="torch").thermo
        # Per trajectory nu = m' y + s' eps, so the cost is pi^2/8 (|y|^2 + |eps|^2) - pi/2 y.eps over [0, 1].
        per_sample_target = math.pi ** 2 / 8 * (y.square().sum() + eps.square().sum(1)) - math.pi / 2 * eps @ y
        errors.append(float((rep.kinetic - per_sample_target).abs().max() / per_sample_target.mean()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3
    assert float(rep.kinetic.mean()) == pytest.approx(target, rel=0.02)  # and in expectation over eps


def test_entropy_is_rate_over_temperature():
    """S = integral rate / T dt: for Dirac under CondOT the rate is constant, T = t / (1 - t)."""
    y = torch.tensor([0.5, -1.0], dtype=torch.float64)
    sch = CondOT(t_min=1e-2, t_max=0.99)
    noise, eps = dirac_start(y, sch, 16, seed=4)
    rep = ts.sample(ts.toy.Dirac(y).denoiser(sch), noise=noise, steps=400, solver="euler", grid="logsnr",
                    backend="torch").thermo
    integral = quad(lambda t: (1 - t) / t, sch.t_min, sch.t_max)[0]
    expected = (eps - y).square().sum(1) * integral
    torch.testing.assert_close(rep.entropy, expected, rtol=2e-4, atol=0)
