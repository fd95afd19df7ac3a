"""The whole k-diffusion sampling API behind the one-import switch (issue 14 item 1), and k-diffusion's
remaining solvers as ts.sample solvers (issue 12 item 1).

The surface test enumerates k-diffusion's own k_diffusion/sampling.py (loaded from its file path, as
tests/test_integration_k_diffusion.py does: the k_diffusion package imports torchvision) and finds every
public sample_* / get_sigmas_* name, BrownianTreeNoiseSampler and default_noise_sampler in the drop-in,
with k-diffusion's parameters first. Parity tests feed both sides the same noise_sampler. Tests that need
the peer skip when k-diffusion (or torchsde / torchdiffeq, which its sampling.py imports) is missing; the
ts.sample and import-without-k-diffusion tests always run.
"""
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

import thermosample as ts
from thermosample import ops, solvers
from thermosample.integrations import k_diffusion as T

NEW_SOLVERS = ["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"]
MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.5, -1.0, 0.3],
                                           [-1.5, 1.0, -0.5, 2.0, 0.0, 0.7, -0.2]]), [0.3, 0.5])


def _load_peer():
    try:
        return T._peer()      # k-diffusion's own sampling module (from its file where its package import fails)
    except ImportError:
        return None


_PEER = _load_peer()


@pytest.fixture
def K():
    if _PEER is None:
        pytest.skip("k-diffusion, torchsde or torchdiffeq is not installed (the README's recipe: "
                    'pip install torch==2.13.0 "k-diffusion==0.0.16" "setuptools<81")')
    return _PEER


from kdiff_common import close, model  # noqa: E402

SIGMAS = T.get_sigmas_karras(12, 0.02, 80.0)
X0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * SIGMAS[0]


def _public(K):
    names = [n for n in dir(K) if (n.startswith("sample_") or n.startswith("get_sigmas_"))
             and callable(getattr(K, n))]
    return sorted(names) + ["BrownianTreeNoiseSampler", "default_noise_sampler"]


# --------------------------------------------------------------------------------------------------
# The surface
# --------------------------------------------------------------------------------------------------
def test_every_public_sampler_and_grid_of_k_diffusion_is_in_the_drop_in(K):
    names = _public(K)
    assert {"sample_euler", "sample_dpmpp_2m", "get_sigmas_karras"} <= set(names)  # the enumeration works
    missing = [n for n in names if not hasattr(T, n)]
    assert not missing, f"k-diffusion names missing from the drop-in: {missing}"
    assert not [n for n in names if n not in T.__all__], "every drop-in name is exported in __all__"


def test_signatures_start_with_k_diffusion_parameters(K):
    """k-diffusion's parameters (names, kinds, defaults, order) come first; ours only add keyword-only ones."""
    for name in _public(K):
        ref, ours = getattr(K, name), getattr(T, name)
        if inspect.isclass(ref):
            ref, ours = ref.__init__, ours.__init__
        p_ref = list(inspect.signature(ref).parameters.values())
        p_ours = list(inspect.signature(ours).parameters.values())
        assert [p.name for p in p_ours[:len(p_ref)]] == [p.name for p in p_ref], name
        for a, b in zip(p_ref, p_ours):
            assert a.kind == b.kind, (name, a.name)
            if not callable(a.default):
                assert a.default == b.default, (name, a.name, a.default, b.default)
        assert all(p.kind == p.KEYWORD_ONLY for p in p_ours[len(p_ref):]), name


def test_the_drop_in_imports_and_runs_without_k_diffusion_or_torchsde():
    """The module must import with neither installed: default_noise_sampler and the grids work; what
    delegates to k-diffusion (dpm_fast/adaptive, BrownianTreeNoiseSampler) says how to install it."""
    code = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('k_diffusion', 'torchsde'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
from thermosample.integrations import k_diffusion as T
x = torch.randn(2, 3)
assert T.default_noise_sampler(x)(1.0, 0.5).shape == x.shape
assert T.get_sigmas_vp(5).shape == (6,) and T.get_sigmas_polyexponential(5, 0.1, 10.).shape == (6,)
for use in (lambda: T.sample_dpm_fast(lambda v, s: 0.5 * v, x * 10, 0.1, 10.0, 6, disable=True),
            lambda: T.BrownianTreeNoiseSampler(x, 0.1, 10.0)):
    try:
        use()
    except ImportError as e:
        assert '"k-diffusion==0.0.16" "setuptools<81"' in str(e), e
    else:
        raise AssertionError('no ImportError')
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_grids_equal_peer(K):
    for args in [(9, 0.03, 14.6), (12, 0.002, 80.0, 2.0), (7, 0.1, 10.0, 0.5)]:
        close(K.get_sigmas_polyexponential(*args), T.get_sigmas_polyexponential(*args), rel=1e-6)
    for kw in [{}, {"beta_d": 12.0, "beta_min": 0.2, "eps_s": 1e-2}]:
        close(K.get_sigmas_vp(10, **kw), T.get_sigmas_vp(10, **kw), rel=1e-6)


def test_brownian_tree_noise_sampler_equals_peer(K):
    """Ours (k-diffusion's own object when its package imports, else the equivalent) gives k-diffusion's
    numbers for the same seed, single and per-sample seeds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (3, [1, 2, 3, 4]):
            a = K.BrownianTreeNoiseSampler(X0, 0.02, 80.0, seed=seed)
            b = T.BrownianTreeNoiseSampler(X0, 0.02, 80.0, seed=seed)
            for s, s_next in [(80.0, 40.0), (40.0, 3.0), (3.0, 0.02)]:
                assert torch.equal(a(torch.tensor(s), torch.tensor(s_next)), b(torch.tensor(s), torch.tensor(s_next)))
    torch.manual_seed(9)
    z1 = K.default_noise_sampler(X0)(1.0, 0.5)
    torch.manual_seed(9)
    assert torch.equal(T.default_noise_sampler(X0)(1.0, 0.5), z1)


# --------------------------------------------------------------------------------------------------
# Parity of the new wrappers with the same noise
# --------------------------------------------------------------------------------------------------
def _noise_list(n):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(X0.shape, generator=g) for _ in range(n)]


def _run_both(K, name, **kw):
    outs, calls = [], []
    for fn in (getattr(K, name), getattr(T, name)):
        it, seen = iter(_noise_list(3 * len(SIGMAS))), []

        def ns(s, s_next, it=it, seen=seen):
            seen.append((float(s), float(s_next)))
            return next(it)
        outs.append(fn(model, X0, SIGMAS, extra_args={"shift": 0.2}, disable=True, noise_sampler=ns, **kw))
        calls.append(seen)
    return outs, calls


PARITY = [("sample_dpm_2_ancestral", {}), ("sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.8}),
          ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_2s_ancestral", {"eta": 0.3, "s_noise": 0.7}),
          ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"eta": 0.6, "r": 0.3}),
          ("sample_dpmpp_sde", {"eta": 1.5, "s_noise": 0.9, "r": 1.0})]


@pytest.mark.parametrize("name,kw", PARITY)
def test_new_wrappers_match_peer_given_the_same_noise(K, name, kw):
    (ref, got), (seen_ref, seen) = _run_both(K, name, **kw)
    close(ref, got)
    assert seen == seen_ref  # the same (sigma, sigma_next) calls in the same order


@pytest.mark.parametrize("name", ["sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde"])
def test_new_wrappers_match_peer_at_eta_zero(K, name):
    """eta = 0: deterministic (k-diffusion multiplies its draws by 0; we draw none)."""
    ref = getattr(K, name)(model, X0, SIGMAS, disable=True, eta=0.0, noise_sampler=lambda a, b: torch.randn_like(X0))
    close(ref, getattr(T, name)(model, X0, SIGMAS, disable=True, eta=0.0))


def test_dpmpp_sde_with_more_inputs_than_the_op_takes_splits_the_sampled_noise(K, monkeypatch):
    """r != 1/2 with a noise_sampler needs 4 inputs + the noise; with a 4-slot op the noise goes in a
    second pass and the numbers do not change."""
    (ref, got), _ = _run_both(K, "sample_dpmpp_sde", eta=0.6, r=0.3)
    monkeypatch.setattr(solvers, "_max_inputs", lambda: 4)
    (_, got4), _ = _run_both(K, "sample_dpmpp_sde", eta=0.6, r=0.3)
    close(ref, got4)
    close(got, got4, rel=1e-6)


@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde"])
def test_brownian_tree_noise_matches_peer_exactly(K, name):
    """With k-diffusion's default noise made explicit, a Brownian tree (queried at exactly k-diffusion's
    sigma tensors: dpmpp_sde round-trips them through log), the numbers match."""
    sig = SIGMAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(K, name)(model, X0, sig, disable=True,
                               noise_sampler=K.BrownianTreeNoiseSampler(X0, sig[sig > 0].min(), sig.max(), seed=3))
        got = getattr(T, name)(model, X0, sig, disable=True,
                               noise_sampler=T.BrownianTreeNoiseSampler(X0, sig[sig > 0].min(), sig.max(), seed=3))
    close(ref, got)


def test_dpmpp_3m_sde_matches_peer_given_the_same_noise(K):
    if "dpmpp_3m_sde" not in solvers.SOLVERS:
        pytest.skip("solver row 'dpmpp_3m_sde' is not in thermosample.solvers.SOLVERS yet (added by the "
                    "third-order solver work, issue 12); the wrapper runs that row")
    for kw in ({}, {"eta": 0.5, "s_noise": 0.8}):
        (ref, got), (seen_ref, seen) = _run_both(K, "sample_dpmpp_3m_sde", **kw)
        close(ref, got)
        assert seen == seen_ref
    ref = K.sample_dpmpp_3m_sde(model, X0, SIGMAS, disable=True, eta=0.0, noise_sampler=lambda a, b: 0 * X0)
    close(ref, T.sample_dpmpp_3m_sde(model, X0, SIGMAS, disable=True, eta=0.0))


@pytest.mark.parametrize("name,kw", [
    ("sample_euler_ancestral", {}), ("sample_dpm_2_ancestral", {}), ("sample_dpmpp_2s_ancestral", {}),
    ("sample_dpmpp_sde", {}), ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_3m_sde", {})])
def test_k_diffusion_default_noise_sampler_under_manual_seed_equals_peer(K, name, kw):
    """With a noise_sampler the wrapper draws nothing from torch's global generator: k-diffusion's own
    default_noise_sampler(x) under torch.manual_seed(5) gives k-diffusion's result, and the generator ends
    in the same state."""
    if name == "sample_dpmpp_3m_sde" and "dpmpp_3m_sde" not in solvers.SOLVERS:
        pytest.skip("solver row 'dpmpp_3m_sde' is not in thermosample.solvers.SOLVERS yet")
    results = []
    for mod in (K, T):
        torch.manual_seed(5)
        out = getattr(mod, name)(model, X0, SIGMAS, disable=True, noise_sampler=K.default_noise_sampler(X0), **kw)
        results.append((out, torch.rand(3)))
    close(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1]), "the global generator was advanced by a different amount"


def test_callback_dicts_of_new_wrappers_match_peer(K):
    for name in ("sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde"):
        seen_ref, seen = [], []
        ns = lambda a, b: torch.zeros_like(X0)  # noqa: E731
        getattr(K, name)(model, X0, SIGMAS, disable=True, callback=seen_ref.append, noise_sampler=ns)
        getattr(T, name)(model, X0, SIGMAS, disable=True, callback=seen.append, noise_sampler=ns)
        assert len(seen) == len(seen_ref) == len(SIGMAS) - 1
        for a, b in zip(seen_ref, seen):
            assert set(a) == set(b) and a["i"] == b["i"]
            assert torch.is_tensor(b["sigma"]) and float(a["sigma"]) == float(b["sigma"])
            assert float(a["sigma_hat"]) == float(b["sigma_hat"])
            close(a["denoised"], b["denoised"])


@pytest.mark.parametrize("kw", [{}, {"eta": 0.7, "s_noise": 0.9}])
def test_dpm_fast_matches_peer(K, kw):
    for n in (6, 7, 8):
        outs = []
        for mod in (K, T):
            it = iter(_noise_list(n + 3))
            torch.manual_seed(2)
            outs.append(mod.sample_dpm_fast(model, X0, 0.02, 80.0, n, disable=True,
                                            noise_sampler=lambda a, b, it=it: next(it), **kw))
        close(*outs)
    # default noise (torch's global generator) and the callback's info dict
    infos = []
    for mod in (K, T):
        seen = []
        torch.manual_seed(4)
        out = mod.sample_dpm_fast(model, X0, 0.02, 80.0, 7, disable=True, callback=seen.append, eta=0.5)
        infos.append((out, seen))
    close(infos[0][0], infos[1][0])
    assert [sorted(d) for d in infos[0][1]] == [sorted(d) for d in infos[1][1]]


@pytest.mark.parametrize("kw", [{}, {"order": 2, "rtol": 0.02}, {"eta": 0.5}])
def test_dpm_adaptive_matches_peer(K, kw):
    outs = []
    for mod in (K, T):
        torch.manual_seed(6)
        outs.append(mod.sample_dpm_adaptive(model, X0, 0.02, 80.0, disable=True, return_info=True, **kw))
    close(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]  # steps, nfe, accepted, rejected
    close(K.sample_dpm_adaptive(model, X0, 0.05, 20.0, disable=True),
          T.sample_dpm_adaptive(model, X0, 0.05, 20.0, disable=True))
    with pytest.raises(ValueError, match="must not be 0"):
        T.sample_dpm_adaptive(model, X0, 0.0, 20.0, disable=True)


def test_new_wrappers_report_and_draw_their_seed_only_when_used():
    th = {}
    T.sample_dpmpp_sde(model, X0, SIGMAS, disable=True, thermo=th, seed=1)
    assert th["nfe"] == 2 * (len(SIGMAS) - 1) - 1 and th["report"].t.numel() == th["nfe"]
    # default seed: drawn from torch's generator only when the Philox stream is used; euler/heun/dpm_2 draw
    # randn_like(x) every step, churn or not, as k-diffusion does (their own test: test_integration_k_diffusion)
    for fn, kw, draws in [(T.sample_dpmpp_2s_ancestral, {}, True),
                          (T.sample_dpmpp_2s_ancestral, {"noise_sampler": lambda a, b: torch.zeros_like(X0)}, False),
                          (T.sample_dpm_2_ancestral, {"eta": 0.0}, False), (T.sample_dpmpp_2m, {}, False),
                          (T.sample_euler, {}, True), (T.sample_euler, {"seed": 3}, False),
                          (T.sample_heun, {"s_churn": 5.0}, True)]:
        torch.manual_seed(0)
        fn(model, X0, SIGMAS, disable=True, **kw)
        after = torch.rand(1)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(1)) != draws, (fn.__name__, kw)
    torch.manual_seed(8)
    a = T.sample_dpmpp_sde(model, X0, SIGMAS, disable=True)
    torch.manual_seed(8)
    assert torch.equal(a, T.sample_dpmpp_sde(model, X0, SIGMAS, disable=True))


def _gauss_den(s0):
    return lambda x, sigma: x * (s0 ** 2 / (s0 ** 2 + sigma.view(-1, 1) ** 2))


@pytest.mark.parametrize("name,kw", [("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"eta": 0.5, "r": 0.3}),
                                     ("sample_dpmpp_2s_ancestral", {}), ("sample_dpm_2_ancestral", {})])
def test_default_philox_noise_matches_peer_distribution(K, name, kw):
    """Gaussian data N(0, 0.5^2), 6 coarse steps (where the noise law shows): ours (Philox) against
    k-diffusion's default (Brownian tree for dpmpp_sde, randn for the ancestral ones). dpmpp_sde's two
    draws per step are correlated in the tree; i.i.d. draws give a std of 0.33 here instead of 0.40."""
    from scipy.stats import ks_2samp
    sig = K.get_sigmas_karras(6, 0.01, 20.0)
    torch.manual_seed(3)
    x = torch.randn(4000, 1) * sig[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(K, name)(_gauss_den(0.5), x, sig, disable=True, **kw).flatten()
    got = getattr(T, name)(_gauss_den(0.5), x, sig, disable=True, seed=11, **kw).flatten()
    assert ks_2samp(ref.numpy(), got.numpy()).pvalue > 1e-3
    assert abs(got.std().item() - ref.std().item()) < 0.025 and abs(got.mean().item() - ref.mean().item()) < 0.03


# --------------------------------------------------------------------------------------------------
# The new solvers through ts.sample
# --------------------------------------------------------------------------------------------------
def _sample(name, backend, **kw):
    return ts.sample(MIX.denoiser("vp"), (6, 7), steps=12, solver=name, grid="karras", seed=11, sample_offset=3,
                     backend=backend, **kw)


@pytest.mark.parametrize("name,kw", [(n, {}) for n in NEW_SOLVERS] + [
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}), ("dpm_2_ancestral", {"eta": 0.0}), ("dpmpp_2s_ancestral", {"s_noise": 0.5})])
def test_new_solvers_cpp_matches_torch(name, kw):
    assert ops.cpp_available(), "thermosample._C is not built (pip install -e . builds it)"
    a, b = _sample(name, "cpp", **kw), _sample(name, "torch", **kw)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.thermo.rate, b.thermo.rate, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.thermo.t, b.thermo.t) and a.nfe == b.nfe == solvers.evaluations(name, 12)
    assert (a.thermo.displacement is None) == solvers.injects_noise(name, kw)


@pytest.mark.parametrize("name", NEW_SOLVERS)
def test_new_solvers_through_ts_sample_equal_the_wrappers(name):
    """ts.sample and the k-diffusion wrapper run the same row: same numbers for the same seed (EDM: sigma = t)."""
    den = MIX.denoiser("edm")
    sigmas = T.get_sigmas_karras(8, 0.05, 40.0).double()
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 40.0
    ours = ts.sample(den, noise=x, grid=sigmas, solver=name, seed=5, backend="torch")
    kd = getattr(T, "sample_" + name)(lambda v, s: den(v, float(s[0])), x.clone(), sigmas, disable=True, seed=5,
                                      backend="torch")
    torch.testing.assert_close(ours.samples, kd, rtol=1e-12, atol=1e-12)


def test_dpmpp_sde_steps_draw_independent_noise_and_r_is_checked():
    """The second draw of a step comes from the run's second Philox stream: changing it changes the
    samples, the first stream alone reproduces eta = 0 for the first half-step."""
    a = _sample("dpmpp_sde", "torch").samples
    b = ts.sample(MIX.denoiser("vp"), (6, 7), steps=12, solver="dpmpp_sde", seed=12, sample_offset=3,
                  backend="torch").samples
    assert not torch.allclose(a, b)
    assert solvers._splitmix64(0) != 0 and solvers._splitmix64(1) != solvers._splitmix64(0)
    with pytest.raises(ValueError, match="r must be"):
        _sample("dpmpp_sde", "torch", r=0.0)


NOISY = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]


@pytest.mark.parametrize("name", NOISY)
@pytest.mark.parametrize("sigmas", [[10.0, 5.0, 7.0, 1.0, 0.0], [1.0, 3.0, 10.0]], ids=["bump", "rising"])
def test_noise_adding_samplers_name_sigmas_that_do_not_decrease(name, sigmas):
    """A noise-adding step needs sigma_next < sigma: a grid that rises anywhere is refused before the model runs,
    naming `sigmas`, the offending pair and what was expected (not a bare 'math domain error'); eta=0 (the
    deterministic sampler) runs on it."""
    calls = []

    def model(v, s):
        calls.append(s)
        return 0.5 * v
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    fn = getattr(T, "sample_" + name)
    with pytest.raises(ValueError, match=r"sigmas must be strictly decreasing for sample_.* got sigmas\[\d\] = "):
        fn(model, x, torch.tensor(sigmas), disable=True)
    assert calls == []
    assert torch.isfinite(fn(model, x, torch.tensor(sigmas), disable=True, eta=0.0)).all()
