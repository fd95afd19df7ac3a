"""Speciation and symmetry breaking (docs/theory.md §5) against closed forms."""
import math

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import analysis, toy


def two_gaussians(d):
    m = torch.ones(d, dtype=torch.float64)
    return toy.GaussianMixture(torch.stack([m, -m]), 1.0), m


def test_speciation_time_closed_form_and_schedule_map():
    mix, _ = two_gaussians(64)
    # Lambda = |m|^2 + 1 = 65 for +-m with unit-variance components
    assert analysis.speciation_time(mix.covariance()) == pytest.approx(0.5 * math.log(65.0), rel=1e-9)
    assert analysis.speciation_time(65.0) == pytest.approx(0.5 * math.log(65.0))
    # from samples: close to the covariance value
    est = analysis.speciation_time(mix.sample(4000, seed=3))
    assert est == pytest.approx(0.5 * math.log(65.0), rel=0.03)
    # any schedule: the time with the same sigma_hat = sqrt(Lambda - 1) = 8
    t_cos = analysis.speciation_time(mix.covariance(), "cosine")
    assert math.tan(0.5 * math.pi * t_cos) == pytest.approx(8.0, rel=1e-6)
    assert ts.schedules.OU().sigma(analysis.speciation_time(65.0)) == pytest.approx(8.0, rel=1e-9)
    assert math.isnan(analysis.speciation_time(0.5))


@pytest.mark.parametrize("d", [64, 256, 1024])
def test_cloning_crosses_at_speciation_time(d):
    """phi(t) = P(two clones at t end in the same class) crosses 0.775 within 10% of t_S (Biroli et al.)."""
    mix, m = two_gaussians(d)
    den = mix.denoiser(ts.schedules.OU())
    t_s = analysis.speciation_time(mix.covariance())
    times = t_s * np.array([0.6, 0.85, 1.15, 1.4])
    phi = analysis.cloning(den, (256, d), times, lambda x: (x.reshape(x.shape[0], -1).double() @ m) > 0, steps=30)
    assert phi[0] > 0.85 and phi[-1] < 0.7, phi  # ordered before, random after
    assert np.all(np.diff(phi) < 0.05), phi
    t_c = analysis.cloning_crossing(times, phi)
    assert abs(t_c / t_s - 1) < 0.10, (t_c, t_s, phi)


def test_raya_ambrogioni_symmetry_breaking():
    """Data at +-1, VP process: the reverse-drift potential u = -x^2/4 - log p_t has curvature
    -1/2 + (s^2 - theta^2)/s^4 at 0 (theta = m(t), s^2 = 1 - theta^2), zero at theta^4 + 2 theta^2 = 1,
    i.e. theta_c = sqrt(sqrt(2) - 1)."""
    vp = ts.schedules.VPLinear()
    den = toy.GaussianMixture(torch.tensor([[1.0], [-1.0]]), 0.0).denoiser(vp)
    for t in (0.1, 0.3, 0.5):
        th, s2 = vp.m(t), vp.s(t) ** 2
        assert analysis.potential_curvature(den, t, torch.ones(1)) == pytest.approx(-0.5 + (s2 - th * th) / s2 ** 2, rel=1e-4)
    t_c = analysis.symmetry_breaking_time(den, torch.ones(1))
    assert vp.m(t_c) == pytest.approx(0.6436, abs=2e-4)
    assert vp.m(t_c) == pytest.approx(analysis.THETA_C, abs=1e-6)
    # the curvature is positive (single well) before, negative (double well) after in reverse time
    assert analysis.potential_curvature(den, t_c + 0.05, torch.ones(1)) > 0
    assert analysis.potential_curvature(den, t_c - 0.05, torch.ones(1)) < 0


def test_critical_time_from_the_sampler_profile():
    d = 256
    mix, _ = two_gaussians(d)
    den = mix.denoiser(ts.schedules.OU())
    t_s = analysis.speciation_time(mix.covariance())
    ct = analysis.critical_time(den, (48, d))
    assert abs(ct["t_spread"] / t_s - 1) < 0.10, (ct["t_spread"], t_s)
    assert 0.6 * t_s < ct["t_rate"] < 1.1 * t_s
    assert ct["spread"][0] < 0.05 * ct["spread"][-1]  # D is class-blind at high noise
