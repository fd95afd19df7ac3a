"""Schedules: closed-form derivatives, temperature, inverse time map, validation."""
import math

import numpy as np
import pytest

import thermosample as ts
from thermosample.schedules import EDM, OU, VE, CondOT, Cosine, DiscreteVP, Schedule, VPLinear

ALL = [CondOT(), Cosine(), VPLinear(), VE(), EDM(), OU(), DiscreteVP(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))]


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_derivatives_match_finite_differences(sch):
    t = np.linspace(sch.t_min + 0.01 * (sch.t_max - sch.t_min), sch.t_max - 0.01 * (sch.t_max - sch.t_min), 37)
    h = 1e-6 * (sch.t_max - sch.t_min)
    for f, df in ((sch.m, sch.dm), (sch.s, sch.ds)):
        fd = (np.asarray(f(t + h)) - np.asarray(f(t - h))) / (2 * h)
        np.testing.assert_allclose(df(t), fd, rtol=2e-3 if isinstance(sch, DiscreteVP) else 1e-5, atol=1e-6)


@pytest.mark.parametrize("sch", ALL, ids=repr)
def test_temperature_nonnegative_and_inverse(sch):
    sch.validate()
    t = np.linspace(sch.t_min, sch.t_max, 101)
    assert np.all(np.asarray(sch.temperature(t)) >= 0)
    np.testing.assert_allclose(sch.sigma_to_t(sch.sigma(t)), t, rtol=1e-6, atol=1e-7)


def test_named_closed_forms():
    assert CondOT().temperature(0.25) == pytest.approx(0.25 / 0.75)  # T = s s' - s^2 m'/m
    assert Cosine().sigma(0.5) == pytest.approx(1.0)
    vp = VPLinear()
    assert vp.m(1.0) == pytest.approx(math.exp(-0.5 * (0.1 + 19.9 / 2)))
    assert vp.m(0.3) ** 2 + vp.s(0.3) ** 2 == pytest.approx(1.0)
    assert EDM().sigma(3.0) == 3.0 and VE().sigma(1.0) == pytest.approx(50.0)


def test_custom_schedule_without_derivatives():
    class Quadratic(Schedule):
        t_min, t_max = 1e-3, 0.99

        def m(self, t):
            return 1 - np.asarray(t) ** 2

        def s(self, t):
            return np.asarray(t)

    q = Quadratic()
    q.validate()
    assert q.dm(0.5) == pytest.approx(-1.0, rel=1e-6)
    assert q.sigma_to_t(q.sigma(0.4)) == pytest.approx(0.4, rel=1e-7)
    alpha, beta = q.velocity_coeffs(0.4)
    # nu = alpha x_hat + beta D must equal m' y + s' eps for x_hat = y + sigma eps, D = y.
    y, eps = 0.7, -1.3
    x_hat = y + q.sigma(0.4) * eps
    assert alpha * x_hat + beta * y == pytest.approx(q.dm(0.4) * y + q.ds(0.4) * eps, rel=1e-6)


def test_negative_temperature_is_rejected_by_name():
    class Shrinking(Schedule):
        name = "shrinking"

        def m(self, t):
            return np.ones_like(np.asarray(t, dtype=float))

        def s(self, t):
            return 1.0 - 0.5 * np.asarray(t)

    with pytest.raises(ValueError, match=r"Shrinking.*T\(t\) >= 0"):
        Shrinking().validate()
    with pytest.raises(ValueError, match="T"):
        ts.Denoiser(lambda x, t: x, Shrinking(), "x0")


def test_schedules_that_map_t_to_sigma_differently_print_differently():
    """A config records its schedule by repr and warns when run with another: every parameter that changes
    sigma(t) is in it (VE's sigma range, VPLinear's betas, DiscreteVP's table, not only its length)."""
    ac = np.linspace(0.99, 0.01, 50)
    pairs = [(VE(), VE(sigma_max=40.0)), (VE(), VE(sigma_min=0.02)), (VPLinear(), VPLinear(beta_max=10.0)),
             (DiscreteVP(ac), DiscreteVP(ac ** 1.1)), (EDM(), EDM(t_max=100.0))]
    for a, b in pairs:
        assert a.sigma(0.9) != b.sigma(0.9) or a.t_max != b.t_max
        assert repr(a) != repr(b), repr(a)
    for make in (VE, VPLinear, EDM, CondOT, Cosine, OU, lambda: DiscreteVP(ac)):
        assert repr(make()) == repr(make())


def test_a_config_warns_when_run_with_another_ve_range_and_accepts_an_older_record():
    import warnings

    from thermosample import auto
    den = ts.Denoiser(lambda x, t: x * 0.5, VE(), prediction="x0", time="t")
    sigmas = np.append(ts.grids.make_grid("karras", 4, den.schedule)[:-1], 0.0)
    made = {"schedule": repr(VE(sigma_max=40.0)), "sample_shape": [3]}
    cfg = auto.SamplerConfig("euler", {}, sigmas, made, {})
    with pytest.warns(UserWarning, match="calibrated for schedule"):
        ts.sample(den, (2, 3), grid=cfg, seed=0)
    older = auto.SamplerConfig("euler", {}, sigmas, {**made, "schedule": "VE(t_min=0, t_max=1)"}, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.sample(den, (2, 3), grid=older, seed=0)        # recorded before repr named VE's range: not warned
