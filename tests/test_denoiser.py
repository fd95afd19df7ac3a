"""Prediction-type and time-convention adapters against the exact x0 oracle."""
import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample.schedules import DiscreteVP

MIX = ts.toy.GaussianMixture(torch.tensor([[1.5, -1.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 2.0]]), [0.4, 0.6])


@pytest.mark.parametrize("schedule", ["condot", "cosine", "vp", "ve", "edm"])
@pytest.mark.parametrize("prediction", ["eps", "v", "score", "velocity"])
def test_prediction_types_match_x0(schedule, prediction):
    x0_den = MIX.denoiser(schedule, "x0")
    other = MIX.denoiser(schedule, prediction)
    kw = dict(steps=12, solver="dpmpp_2m", grid="karras", seed=3, backend="torch", dtype=torch.float64)
    a = ts.sample(x0_den, (64, 4), **kw)
    b = ts.sample(other, (64, 4), **kw)
    torch.testing.assert_close(b.samples, a.samples, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.thermo.rate, a.thermo.rate, rtol=1e-5, atol=1e-5)


def test_denoiser_value_matches_oracle_formula():
    sch = ts.schedules.Cosine()
    den = MIX.denoiser(sch, "eps")
    x = torch.randn(8, 4, dtype=torch.float64)
    for sigma in (0.05, 1.0, 30.0):
        torch.testing.assert_close(den(x, sigma), MIX.denoise(x, sigma), rtol=1e-8, atol=1e-8)


def test_time_conventions_sigma_and_scale():
    sch = ts.schedules.VPLinear()
    base = MIX.as_model(sch, "eps")
    by_t1000 = ts.Denoiser(lambda x, t: base(x, t / 1000.0), sch, "eps", time="t", time_scale=1000.0)
    by_sigma = ts.Denoiser(lambda x, s: base(x, torch.as_tensor(sch.sigma_to_t(s.numpy()))), sch, "eps",
                           time="sigma")
    x = torch.randn(5, 4, dtype=torch.float64)
    for d in (by_t1000, by_sigma):
        torch.testing.assert_close(d(x, 2.0), MIX.denoise(x, 2.0), rtol=1e-6, atol=1e-6)


def test_discrete_index_convention_interpolates():
    betas = np.linspace(1e-4, 0.02, 1000)
    sch = DiscreteVP(np.cumprod(1 - betas))
    base = MIX.as_model(sch, "eps")
    seen = []

    def ddpm_model(x, index):
        seen.append(index.clone())
        return base(x, index / (sch.n - 1))

    den = ts.Denoiser(ddpm_model, sch, "eps", time="index")
    x = torch.randn(3, 4, dtype=torch.float64)
    sigma = float(sch.sigma(0.3337))
    torch.testing.assert_close(den(x, sigma), MIX.denoise(x, sigma), rtol=1e-6, atol=1e-6)
    assert seen[-1][0].item() == pytest.approx(0.3337 * 999, abs=1e-3)  # fractional index between steps


def test_model_kwargs_pass_through():
    got = {}

    def model(x, t, label=None, scale=None):
        got.update(label=label, scale=scale)
        return torch.zeros_like(x)

    den = ts.Denoiser(model, "edm", "x0", model_kwargs={"label": 3})
    ts.sample(den, (2, 3), steps=2, backend="torch", extra_args={"scale": 0.5})
    assert got == {"label": 3, "scale": 0.5}


def test_cached_coefficients_follow_attribute_changes():
    """The per-sigma coefficient cache must not serve stale values when the prediction type changes."""
    sch = ts.schedules.CondOT()
    model = lambda x, t: torch.full_like(x, 0.5)                  # noqa: E731
    den = ts.Denoiser(model, sch, prediction="x0")
    x = torch.randn(2, 5, dtype=torch.float64)
    sigma = 0.8
    assert torch.equal(den(x, sigma), torch.full_like(x, 0.5))   # x0 prediction: D is the output
    den.prediction = "eps"
    assert torch.allclose(den(x, sigma), x - sigma * 0.5)          # eps: D = x_hat - sigma * eps
    den.prediction, den.scale_input = "v", True                      # v depends on the schedule's m and s
    v_condot = den(x, sigma)
    den.schedule = ts.schedules.Cosine()
    t = float(den.schedule.sigma_to_t(sigma))
    m, s = float(den.schedule.m(t)), float(den.schedule.s(t))
    n = m * m + s * s
    assert not torch.allclose(v_condot, den(x, sigma))
    assert torch.allclose(den(x, sigma), x * (m * m / n) - (s / n) * 0.5)
