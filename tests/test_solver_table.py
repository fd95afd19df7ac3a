"""The one solver table (ts.solvers.SOLVERS): every solver is reachable from ts.sample, the k-diffusion
wrappers run the same rows, and adding a solver is one function plus one row."""
import math

import pytest
import torch

import thermosample as ts
from thermosample import solvers
from thermosample.integrations import k_diffusion as K

MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5], [-1.5, 1.0, -0.5]]), [0.3, 0.5])


def test_every_row_is_complete():
    for name, row in solvers.SOLVERS.items():
        assert callable(row.fn) and row.order >= 1 and row.evals_per_step in (1, 2), name
        assert row.noise in ("never", "always", "eta", "churn"), name
        if row.noise == "eta":
            assert "eta" in row.options, name
        if row.noise == "churn":
            assert {"churn", "s_tmin", "s_tmax", "s_noise"} <= set(row.options), name


@pytest.mark.parametrize("name", sorted(solvers.SOLVERS))
def test_sample_runs_every_solver_with_the_evaluations_the_table_states(name):
    out = ts.sample(MIX.denoiser("edm"), (4, 3), steps=7, solver=name, grid="karras", seed=1, backend="torch")
    assert torch.isfinite(out.samples).all()
    assert out.nfe == solvers.evaluations(name, 7)
    assert (out.thermo.displacement is None) == solvers.injects_noise(name, {})


@pytest.mark.parametrize("name,wrapper,kw", [("dpm_2", K.sample_dpm_2, {}), ("lms", K.sample_lms, {"order": 3}),
                                              ("dpmpp_2m_sde", K.sample_dpmpp_2m_sde, {"eta": 0.0})])
def test_sample_and_the_k_diffusion_wrapper_run_the_same_row(name, wrapper, kw):
    """The solvers that used to live only in the wrappers: same numbers through ts.sample (sigma = t for EDM)."""
    den = MIX.denoiser("edm")
    sigmas = K.get_sigmas_karras(6, 0.05, 40.0).double()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 40.0
    ours = ts.sample(den, noise=x, grid=sigmas, solver=name, backend="torch", **kw)
    kd = wrapper(lambda v, s: den(v, float(s[0])), x.clone(), sigmas, disable=True, seed=0, backend="torch", **kw)
    torch.testing.assert_close(ours.samples, kd, rtol=1e-12, atol=1e-12)


def test_solver_options_are_checked_against_the_row():
    den = MIX.denoiser("edm")
    with pytest.raises(TypeError, match="takes no option"):
        ts.sample(den, (2, 3), steps=3, solver="dpmpp_2m", eta=1.0)
    with pytest.raises(ValueError, match="order must be an int in 1..4"):
        ts.sample(den, (2, 3), steps=3, solver="lms", order=5)
    with pytest.raises(TypeError, match="solver_type must be a string"):
        ts.sample(den, (2, 3), steps=3, solver="dpmpp_2m_sde", solver_type=2)
    with pytest.raises(ValueError, match="solver_type must be 'heun' or 'midpoint'"):
        ts.sample(den, (2, 3), steps=3, solver="dpmpp_2m_sde", solver_type="rk4")
    with pytest.raises(ValueError, match="solver must be one of"):
        ts.thermo_grid(den, 5, solver="nope", sample_shape=(3,))


def midpoint(run, x, sigmas):
    """Explicit midpoint in sigma (a test solver): two evaluations per step, Euler on the last."""
    for i in run.steps():
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = run.denoise(x, s)
        run.callback(i, x, s, s, denoised)
        if s_next == 0:
            x = run.update([x, denoised], [0.0, 1.0], i, track_sigma=s)
            continue
        s_mid = 0.5 * (s + s_next)
        r = s_mid / s
        x_mid = run.update([x, denoised], [r, 1.0 - r], i, track_sigma=s)
        d_mid = run.denoise(x_mid, s_mid)
        c = (s_next - s) / s_mid
        x = run.update([x, x_mid, d_mid], [1.0, c, -c], i, track_sigma=s_mid, u=1, d=2)
    return x


def test_a_new_solver_is_one_function_and_one_row(monkeypatch):
    monkeypatch.setitem(solvers.SOLVERS, "midpoint", solvers.Solver(midpoint, order=2, evals_per_step=2))
    den = ts.toy.Gaussian(torch.zeros(3), 1.0).denoiser("edm")   # sigma-space ODE solution: x scales
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    exact = x * math.sqrt((1.0 + 1.0) / (1.0 + 100.0))          # x_sigma = x_T sqrt((1 + s^2)/(1 + T^2))

    def slopes(solver):
        errs = []
        for steps in (8, 16, 32):
            out = ts.sample(den, noise=x, grid=torch.linspace(10.0, 1.0, steps + 1).double(), solver=solver,
                            backend="torch")
            errs.append((out.samples - exact).abs().max().item())
            assert out.nfe == solvers.evaluations(solver, steps, sigmas_end_in_zero=False)
            assert out.thermo.rate.shape[0] == out.nfe
        return [math.log2(errs[k] / errs[k + 1]) for k in range(2)]

    assert solvers.evaluations("midpoint", 8, sigmas_end_in_zero=False) == 16
    assert all(s > 1.7 for s in slopes("midpoint"))                   # at least second order, as its row says
    assert all(0.7 < s < 1.3 for s in slopes("euler"))                 # the control: first order
