"""thermosample.integrations.k_diffusion against the real k_diffusion/sampling.py.

k-diffusion's package imports torchvision at import time (no CPU build here), so only its sampling.py is
loaded, from its file path, with a two-line stub for k_diffusion.utils.append_dims. Skips only when
k-diffusion, torchsde or torchdiffeq is not installed.
"""
import importlib.util
import math

import pytest
import torch

pytest.importorskip("torchsde", reason="k-diffusion's sampling.py needs torchsde (the README's k-diffusion recipe installs it)")
pytest.importorskip("torchdiffeq", reason="k-diffusion's sampling.py needs torchdiffeq")
if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("k-diffusion is not installed (the README's recipe: pip install torch==2.13.0 \"k-diffusion==0.0.16\" "
                "\"setuptools<81\")", allow_module_level=True)

from thermosample.integrations import k_diffusion as T  # noqa: E402

K = T._peer()   # k-diffusion's own sampling module (loaded from its file: no torchvision here)
from kdiff_common import close, model  # noqa: E402

SIGMAS = K.get_sigmas_karras(12, 0.02, 80.0)
X0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * SIGMAS[0]


def test_grids_equal_peer():
    assert torch.equal(T.get_sigmas_karras(12, 0.02, 80.0), SIGMAS)
    assert torch.allclose(T.get_sigmas_exponential(9, 0.03, 14.6), K.get_sigmas_exponential(9, 0.03, 14.6),
                          rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2", "sample_dpmpp_2m", "sample_lms"])
def test_deterministic_samplers_match_peer(name):
    ref = getattr(K, name)(model, X0, SIGMAS, extra_args={"shift": 0.3}, disable=True)
    got = getattr(T, name)(model, X0, SIGMAS, extra_args={"shift": 0.3}, disable=True)
    close(ref, got)


def test_lms_orders_and_exponential_grid():
    sig = K.get_sigmas_exponential(10, 0.05, 20.0)
    x = X0[:2] / SIGMAS[0] * sig[0]
    for order in (1, 2, 3):
        close(K.sample_lms(model, x, sig, disable=True, order=order), T.sample_lms(model, x, sig, disable=True, order=order))


def _noise_list(n):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(X0.shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name,kw", [("sample_euler_ancestral", {}), ("sample_euler_ancestral", {"eta": 0.5}),
                                     ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
                                     ("sample_dpmpp_2m_sde", {"eta": 0.4, "s_noise": 0.8})])
def test_stochastic_samplers_match_peer_given_the_same_noise(name, kw):
    calls = {}
    outs = []
    for fn in (getattr(K, name), getattr(T, name)):
        it = iter(_noise_list(len(SIGMAS)))
        seen = []

        def ns(s, s_next, it=it, seen=seen):
            seen.append((float(s), float(s_next)))
            return next(it)
        outs.append(fn(model, X0, SIGMAS, disable=True, noise_sampler=ns, **kw))
        calls[fn.__module__] = seen
    close(outs[0], outs[1])
    assert list(calls.values())[0] == list(calls.values())[1]  # same (sigma, sigma_next) pairs, same order


def _gauss_den(s0):
    return lambda x, sigma: x * (s0 ** 2 / (s0 ** 2 + sigma.view(-1, 1) ** 2))


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpmpp_2m_sde"])
def test_default_noise_matches_peer_distribution(name):
    """Gaussian data N(0, 0.5^2): the final samples of peer (randn_like / Brownian tree) and ours (Philox)
    come from the same distribution (two-sample KS, matching moments)."""
    from scipy.stats import ks_2samp
    s0, n = 0.5, 4000
    sig = K.get_sigmas_karras(15, 0.01, 20.0)
    torch.manual_seed(3)
    x = torch.randn(n, 1) * sig[0]
    ref = getattr(K, name)(_gauss_den(s0), x, sig, disable=True).flatten()
    got = getattr(T, name)(_gauss_den(s0), x, sig, disable=True, seed=11).flatten()
    assert ks_2samp(ref.numpy(), got.numpy()).pvalue > 1e-3
    assert abs(got.std().item() - ref.std().item()) < 0.03 and abs(got.mean().item() - ref.mean().item()) < 0.03
    assert 0.25 < got.std().item() < 0.6  # near the data's 0.5 (15 steps leave a discretisation bias)
    # Different seeds give different noise; torch.manual_seed makes the default seed reproducible.
    torch.manual_seed(5)
    a = getattr(T, name)(_gauss_den(s0), x[:64], sig, disable=True)
    torch.manual_seed(5)
    b = getattr(T, name)(_gauss_den(s0), x[:64], sig, disable=True)
    c = getattr(T, name)(_gauss_den(s0), x[:64], sig, disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_churn_distribution_matches_peer():
    from scipy.stats import ks_2samp
    sig = K.get_sigmas_karras(10, 0.01, 20.0)
    torch.manual_seed(4)
    x = torch.randn(3000, 1) * sig[0]
    kw = dict(s_churn=5.0, disable=True)
    ref = K.sample_heun(_gauss_den(0.5), x, sig, **kw).flatten()
    got = T.sample_heun(_gauss_den(0.5), x, sig, seed=2, **kw).flatten()
    assert ks_2samp(ref.numpy(), got.numpy()).pvalue > 1e-3


def test_callback_dict_and_thermo_report():
    seen_ref, seen = [], []
    K.sample_heun(model, X0, SIGMAS, disable=True, callback=seen_ref.append)
    th = []
    T.sample_heun(model, X0, SIGMAS, disable=True, callback=seen.append, thermo=th)
    assert len(seen) == len(seen_ref) == len(SIGMAS) - 1
    for a, b in zip(seen_ref, seen):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"] and torch.is_tensor(b["sigma"]) and float(a["sigma"]) == float(b["sigma"])
        close(a["denoised"], b["denoised"])
    rep = th[0]
    assert rep.t.numel() == 2 * (len(SIGMAS) - 1) - 1 and rep.rate.shape == (rep.t.numel(), X0.shape[0])
    # EDM schedule: nu = (x - D) / sigma, so the kinetic cost is positive and bounds the speed limit.
    assert 0 < rep.speed_limit <= rep.kinetic_mean and 0 < rep.efficiency <= 1
    d = {}
    T.sample_euler(model, X0, SIGMAS, disable=True, thermo=d)
    assert d["nfe"] == len(SIGMAS) - 1 and d["report"].t.numel() == d["nfe"]


def test_thermo_dirac_condot_is_exact():
    """Dirac data y under CondOT: trajectories are straight, so efficiency is 1 and K = ||eps - y||^2 (t1-t0)."""
    import thermosample as ts
    y = torch.tensor([[1.5, -0.5]])
    den = lambda x, sigma: y.expand_as(x)  # noqa: E731
    sch = ts.schedules.CondOT()
    sig = T.get_sigmas_karras(8, 0.01, 50.0)
    th = []
    T.sample_euler(den, torch.tensor([[0.3, 0.8]]) * sig[0], sig, disable=True, thermo=th, schedule=sch)
    assert th[0].efficiency == pytest.approx(1.0, rel=1e-4)


def test_nonfinite_model_output_raises():
    import thermosample as ts
    bad = lambda x, sigma: x * float("nan")  # noqa: E731
    with pytest.raises(ts.NonFiniteError):
        T.sample_euler(bad, X0, SIGMAS, disable=True)
    with pytest.raises(TypeError):
        T.sample_euler(model, X0, SIGMAS, disable=True, thermo="report")
    with pytest.raises(ValueError):
        T.sample_dpmpp_2m_sde(model, X0, SIGMAS, disable=True, solver_type="rk4")


def test_speed_limit_only_for_wrappers_that_stay_on_the_ode():
    """The wrappers ask solvers.injects_noise: fresh noise (eta != 0) or churn leaves the probability-flow
    ODE, so the report has no pathwise speed limit (NaN); eta = 0 and no churn keep it finite."""
    def limit(fn, **kw):
        th = []
        fn(model, X0, SIGMAS, disable=True, thermo=th, seed=1, **kw)
        return th[0].speed_limit
    assert math.isnan(limit(T.sample_euler_ancestral)) and math.isfinite(limit(T.sample_euler_ancestral, eta=0.0))
    assert math.isnan(limit(T.sample_dpmpp_2m_sde)) and math.isfinite(limit(T.sample_dpmpp_2m_sde, eta=0.0))
    for fn in (T.sample_euler, T.sample_heun, T.sample_dpm_2):
        assert math.isnan(limit(fn, s_churn=5.0)) and math.isfinite(limit(fn)), fn.__name__
    assert math.isfinite(limit(T.sample_lms)) and math.isfinite(limit(T.sample_dpmpp_2m))
    for fn in (T.sample_dpm_2_ancestral, T.sample_dpmpp_2s_ancestral, T.sample_dpmpp_sde):
        assert math.isnan(limit(fn)) and math.isfinite(limit(fn, eta=0.0)), fn.__name__


def test_euler_ancestral_with_k_diffusions_default_noise_sampler_equals_peer():
    """Issue 14: with a noise_sampler the wrapper draws no seed from torch's global generator, so
    k-diffusion's own default_noise_sampler(x) under torch.manual_seed(5) gives k-diffusion's numbers
    (it used to differ by 0.73 relative)."""
    torch.manual_seed(5)
    ref = K.sample_euler_ancestral(model, X0, SIGMAS, disable=True, noise_sampler=K.default_noise_sampler(X0))
    torch.manual_seed(5)
    got = T.sample_euler_ancestral(model, X0, SIGMAS, disable=True, noise_sampler=K.default_noise_sampler(X0))
    close(ref, got)


@pytest.mark.parametrize("name,kw", [("sample_euler", {}), ("sample_heun", {}), ("sample_dpm_2", {}),
                                     ("sample_euler", {"s_churn": 2.0}), ("sample_dpm_2", {"s_churn": 3.0}),
                                     ("sample_heun", {"s_churn": 5.0, "s_tmin": 0.1, "s_tmax": 20.0})])
def test_seeded_script_uses_torch_s_generator_like_k_diffusion(name, kw):
    """k-diffusion's euler/heun/dpm_2 draw torch.randn_like(x) every step, churn or not (their churn noise):
    two consecutive calls after torch.manual_seed, each from fresh global noise, give k-diffusion's outputs
    and leave torch's generator where k-diffusion leaves it."""
    runs = []
    for lib in (K, T):
        torch.manual_seed(0)
        outs = [getattr(lib, name)(model, torch.randn(X0.shape) * SIGMAS[0], SIGMAS, disable=True, **kw)
                for _ in range(2)]
        runs.append((outs, torch.randn(4)))
    for ref, got in zip(runs[0][0], runs[1][0]):
        close(ref, got)
    assert torch.equal(runs[0][1], runs[1][1])


def test_randn_every_step_follows_k_diffusion_s_dtypes():
    """Half x with float32 sigmas: k-diffusion draws in float16 at step 0, then float32 (its x is promoted by
    to_d); the draw count depends on the dtype, so the generator state after must still agree."""
    def den(x, sigma):
        return x / (1 + sigma.view(-1, 1) ** 2)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).half() * 10
    sig = K.get_sigmas_karras(5, 0.1, 10.0)
    after = []
    for lib in (K, T):
        torch.manual_seed(0)
        lib.sample_euler(den, x, sig, disable=True)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("name,sigmas", [("sample_dpmpp_2m", [10.0, 5.0, 5.0, 1.0, 0.0]),
                                         ("sample_euler", [10.0, 5.0, 0.0, 1.0, 0.0]),
                                         ("sample_heun", [10.0, 5.0, 5.0, 0.0]),
                                         ("sample_euler_ancestral", [10.0, 0.0, 0.0])])
def test_repeated_or_interior_zero_sigmas_are_refused_before_the_model_runs(name, sigmas):
    calls = []

    def counting(x, sigma):
        calls.append(1)
        return model(x, sigma)
    if name in ("sample_dpmpp_2m", "sample_euler"):   # k-diffusion runs the model and returns NaN
        assert not torch.isfinite(getattr(K, name)(model, X0, torch.tensor(sigmas), disable=True)).all()
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="sigmas"):
        getattr(T, name)(counting, X0, torch.tensor(sigmas), disable=True)
    assert calls == [] and torch.equal(torch.get_rng_state(), state)


def test_get_ancestral_step_returns_what_k_diffusion_returns():
    cases = [(SIGMAS[0], SIGMAS[1], 1.0), (SIGMAS[4], SIGMAS[5], 0.5), (SIGMAS[-2], SIGMAS[-1], 1.0),
             (SIGMAS[2].double(), SIGMAS[3].double(), 1.0), (SIGMAS[2], SIGMAS[3], 0.0), (3.0, 1.5, 1.0)]
    for a, b, eta in cases:
        ref, got = K.get_ancestral_step(a, b, eta), T.get_ancestral_step(a, b, eta)
        for r, g in zip(ref, got):
            assert type(r) is type(g)
            if isinstance(r, torch.Tensor):
                assert r.dtype == g.dtype and r.shape == g.shape and torch.allclose(r, g, rtol=1e-6, atol=0)
            else:
                assert math.isclose(r, g, rel_tol=1e-12)
