"""Issue 12: the higher-order solvers (unipc, dpmpp_3m, dpmpp_3m_sde, ipndm, deis).

- Parity with the peers on the same sigmas, <= 1e-5 relative: diffusers' UniPCMultistepScheduler,
  DPMSolverMultistepScheduler (dpmsolver++, order 3) and DEISMultistepScheduler, fed a VE/EDM problem
  (exact Gaussian-mixture denoiser, sigma = t) as x_vp = x / sqrt(1 + s^2) with prediction_type="sample"
  and the scheduler's sigmas replaced by the exact float64 grid; k-diffusion's sample_dpmpp_3m_sde
  (eta = 0, and eta = 1 with one shared noise_sampler).
- Orders on a Gaussian N(mu, s0^2) whose probability-flow ODE has the closed form
  x_sigma = mu + (x_T - mu) sqrt((s0^2 + sigma^2) / (s0^2 + T^2)).
- Every new solver through ts.sample on the cpp and torch backends: same numbers, NFE as the table says,
  one tracked rate per evaluation.
"""
import dataclasses
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import grids, ops, solvers

MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5, 0.3], [-1.5, 1.0, -0.5, 2.0], [0.2, 0.4, 1.5, -1.0]]),
                             [0.3, 0.5, 0.4])
DEN = MIX.denoiser("edm")
NEW = ["unipc", "dpmpp_3m", "dpmpp_3m_sde", "ipndm", "deis"]


def _noise(batch, sigma_max, seed=0):
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma_max


def _rel(ours, peer):
    assert ours.shape == peer.shape and torch.isfinite(ours).all() and torch.isfinite(peer).all()
    return ((ours - peer).abs().max() / peer.abs().max()).item()


def _karras(n, zero):
    return [float(s) for s in grids.karras(n, 0.002, 80.0)] + ([0.0] if zero else [])


def _ours(solver, sigmas, x, backend="torch", **options):
    return ts.sample(DEN, noise=x, grid=torch.tensor(sigmas, dtype=torch.float64), solver=solver, backend=backend,
                     **options).samples


# ---- diffusers -------------------------------------------------------------------------------------------

def _diffusers(name, sigmas, x, **config):
    """Run a diffusers multistep scheduler on the EDM problem: x_vp = x / sqrt(1 + s^2), the model returns
    D (prediction_type="sample"), the scheduler's sigmas replaced by the exact float64 grid."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, name)(prediction_type="sample", **config)
    scheduler.set_timesteps(len(sigmas) - 1)
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    x_vp = x / math.sqrt(1.0 + sigmas[0] ** 2)
    for i, t in enumerate(scheduler.timesteps):
        s = sigmas[i]
        x_vp = scheduler.step(DEN(x_vp * math.sqrt(1.0 + s * s), s), t, x_vp).prev_sample
    return x_vp * math.sqrt(1.0 + sigmas[-1] ** 2)


@pytest.mark.parametrize("steps", [6, 10, 16])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers(variant, order, steps):
    # diffusers' bh1 returns NaN on a step to sigma = 0 (B(h) = -inf times a zero residual), so its grid
    # ends at sigma_min; bh2 is also compared on a grid ending in 0 (its last step is x = D).
    for zero in ([False, True] if variant == "bh2" else [False]):
        sigmas = _karras(steps, zero)
        x = _noise(8, sigmas[0], seed=steps)
        peer = _diffusers("UniPCMultistepScheduler", sigmas, x, solver_order=order, solver_type=variant)
        assert _rel(_ours("unipc", sigmas, x, order=order, variant=variant), peer) <= 1e-5


@pytest.mark.parametrize("steps,lower_order_final", [(8, False), (10, False), (16, True)])
def test_dpmpp_3m_matches_diffusers(steps, lower_order_final):
    """DPMSolverMultistepScheduler(dpmsolver++, order 3) with solver_type="heun" (its 2nd-order warm-up
    step is then k-diffusion's; "midpoint" differs there). With lower_order_final (its default) it also
    drops to 2nd order on the last but one step of a run shorter than 15 steps, so shorter runs are
    compared with lower_order_final=False. diffusers computes the update in float32 (it upcasts the
    sample to float32 and back), hence ~1e-7 here rather than 1e-15."""
    sigmas = _karras(steps, True)
    x = _noise(8, sigmas[0], seed=steps)
    peer = _diffusers("DPMSolverMultistepScheduler", sigmas, x, solver_order=3, algorithm_type="dpmsolver++",
                      solver_type="heun", lower_order_final=lower_order_final)
    assert _rel(_ours("dpmpp_3m", sigmas, x), peer) <= 1e-5


@pytest.mark.parametrize("steps", [6, 10, 16])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(order, steps):
    # diffusers' DEIS never steps to sigma = 0 (log rho = -inf there): the grid ends at sigma_min.
    sigmas = _karras(steps, False)
    x = _noise(8, sigmas[0], seed=steps)
    peer = _diffusers("DEISMultistepScheduler", sigmas, x, solver_order=order)
    assert _rel(_ours("deis", sigmas, x, order=order), peer) <= 1e-5


# ---- k-diffusion -----------------------------------------------------------------------------------------

def _k_diffusion():
    """k-diffusion's sampling.py alone (its package imports torchvision), as test_integration_k_diffusion."""
    pytest.importorskip("torchsde", reason="k-diffusion's sampling.py needs torchsde")
    pytest.importorskip("torchdiffeq", reason="k-diffusion's sampling.py needs torchdiffeq")
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed (the README's recipe: pip install torch==2.13.0 \"k-diffusion==0.0.16\" \"setuptools<81\")")
    if "_kd_peer.sampling" in sys.modules:
        return sys.modules["_kd_peer.sampling"]
    pkg, utils = types.ModuleType("_kd_peer"), types.ModuleType("_kd_peer.utils")
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.update({"_kd_peer": pkg, "_kd_peer.utils": utils})
    file_spec = importlib.util.spec_from_file_location("_kd_peer.sampling",
                                                       spec.submodule_search_locations[0] + "/sampling.py")
    mod = importlib.util.module_from_spec(file_spec)
    sys.modules["_kd_peer.sampling"] = mod
    file_spec.loader.exec_module(mod)
    return mod


class SharedNoise:
    """noise_sampler(sigma, sigma_next): the same normals for the same sigma pair, whoever asks."""

    def __init__(self, like):
        self.like, self.drawn = like, {}

    def __call__(self, sigma, sigma_next):
        key = (round(float(sigma), 12), round(float(sigma_next), 12))
        if key not in self.drawn:
            g = torch.Generator().manual_seed(len(self.drawn) + 1)
            self.drawn[key] = torch.randn(self.like.shape, generator=g, dtype=self.like.dtype)
        return self.drawn[key]


@pytest.mark.parametrize("steps", [4, 9, 16])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_dpmpp_3m_sde_matches_k_diffusion(eta, steps):
    K = _k_diffusion()
    sigmas = _karras(steps, True)
    x = _noise(8, sigmas[0], seed=steps)
    peer = K.sample_dpmpp_3m_sde(lambda v, s: DEN(v, float(s[0])), x.clone(), torch.tensor(sigmas, dtype=torch.float64), disable=True,
                                 eta=eta, s_noise=0.9, noise_sampler=SharedNoise(x))
    ours = _ours("dpmpp_3m_sde", sigmas, x, eta=eta, s_noise=0.9, noise_sampler=SharedNoise(x))
    assert _rel(ours, peer) <= 1e-5
    if eta == 0.0:
        assert _rel(_ours("dpmpp_3m", sigmas, x), peer) <= 1e-12


def test_dpmpp_3m_sde_in_kernel_noise_is_the_philox_stream():
    """Without a noise_sampler the noise is the run's Philox stream: a noise_sampler handing out exactly
    that stream (ops.randn with the step index as the Philox step) gives the same samples."""
    sigmas = _karras(7, True)
    x = _noise(5, sigmas[0], seed=3)
    inkernel = _ours("dpmpp_3m_sde", sigmas, x, eta=1.0)
    index = {round(s, 12): i for i, s in enumerate(sigmas)}

    def philox(sigma, sigma_next):
        return ops.randn(x.shape, seed=0, step=index[round(float(sigma), 12)], dtype=x.dtype, backend="torch")
    sampled = _ours("dpmpp_3m_sde", sigmas, x, eta=1.0, noise_sampler=philox)
    assert _rel(inkernel, sampled) <= 1e-12
    assert _rel(inkernel, _ours("dpmpp_3m", sigmas, x)) > 1e-3        # and it is noise


# ---- orders on a Gaussian with a closed-form ODE solution ------------------------------------------------

MU, S0, T, S_MIN = 0.5, 2.0, 10.0, 0.1
GAUSS = ts.toy.Gaussian(torch.full((3,), MU), S0).denoiser("edm")
X_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * T
EXACT = MU + (X_T - MU) * math.sqrt((S0 ** 2 + S_MIN ** 2) / (S0 ** 2 + T ** 2))


def accurate_start_grid(n):
    """n steps uniform in log sigma from T to S_MIN, plus two warm-up steps at the start and one step at
    the end of length h^2 in log sigma (h the interior step): the lower-order warm-up steps every multistep
    method takes (and UniPC's first-order last step) then err by O(h^4) and more, so the slope measures
    the order of the multistep formula itself (the textbook setting of accurate starting values)."""
    h = math.log(T / S_MIN) / n
    d = h * h
    inner = np.exp(np.linspace(math.log(T) - 2 * d, math.log(S_MIN) + d, n + 1))
    return torch.tensor([T, T * math.exp(-d)] + list(inner) + [S_MIN], dtype=torch.float64)


def slope(solver, grid, steps, **options):
    """Least-squares slope of log(max error) against log(steps); the errors must shrink monotonically."""
    errs = []
    for n in steps:
        out = ts.sample(GAUSS, noise=X_T, grid=grid(n), solver=solver, backend="torch", **options).samples
        errs.append((out - EXACT).abs().max().item())
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    return -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])


# (solver, options, order, steps). UniPC with order p is UniP-p + UniC-p: order p + 1. DPM-Solver++(3M) as
# diffusers and k-diffusion write it is second order: its D2 = (D1_0 - D1_1) / (r0 + r1) is h^2 D'' / 2,
# but the Taylor term it multiplies by phi_3 needs h^2 D'' (local error h^3 D'' / 12). Higher orders need
# more steps to reach their asymptotic slope on this problem.
ORDERS = [
    ("unipc", {"order": 1}, 2, (16, 32, 64)),
    ("unipc", {"order": 2}, 3, (16, 32, 64)),
    ("unipc", {"order": 2, "variant": "bh1"}, 3, (16, 32, 64)),
    ("unipc", {"order": 3}, 4, (64, 128, 256)),
    ("unipc", {"order": 3, "variant": "bh1"}, 4, (64, 128, 256)),
    ("dpmpp_3m", {}, 2, (16, 32, 64)),
    ("dpmpp_3m_sde", {"eta": 0.0}, 2, (16, 32, 64)),
    ("deis", {"order": 2}, 2, (16, 32, 64)),
    ("deis", {"order": 3}, 3, (64, 128, 256)),
    ("ipndm", {"max_order": 2}, 2, (16, 32, 64)),
    ("unipc", {"order": 3, "noise_below": 3.0}, 3, (64, 128, 256)),   # UniPC-3 (4th) to sigma 3, DEIS-3 after
]


@pytest.mark.parametrize("solver,options,order,steps", ORDERS, ids=lambda v: str(v).replace(" ", ""))
def test_order_with_accurate_start(solver, options, order, steps):
    assert abs(slope(solver, accurate_start_grid, steps, **options) - order) <= 0.3


def uniform(n):
    return torch.linspace(T, S_MIN, n + 1, dtype=torch.float64)


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_is_adams_bashforth_on_equal_steps(max_order):
    """On equal sigma steps iPNDM's fixed coefficients are the Adams-Bashforth ones that `lms` integrates
    from the Lagrange polynomials, warm-up included; its order then is lms's."""
    for n in (5, 12):
        a = ts.sample(GAUSS, noise=X_T, grid=uniform(n), solver="ipndm", max_order=max_order, backend="torch")
        b = ts.sample(GAUSS, noise=X_T, grid=uniform(n), solver="lms", order=max_order, backend="torch")
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-12, atol=1e-12)
        assert a.nfe == b.nfe == n


@pytest.mark.parametrize("max_order,order", [(1, 1), (2, 2)])
def test_ipndm_order_on_equal_steps(max_order, order):
    # orders 3 and 4 start with Euler and AB2 steps (as diff-sampler's iPNDM): globally second order
    assert abs(slope("ipndm", uniform, (16, 32, 64), max_order=max_order) - order) <= 0.3


def test_orders_in_the_table():
    assert {name: solvers.SOLVERS[name].order for name in NEW} == {
        "unipc": 3, "dpmpp_3m": 2, "dpmpp_3m_sde": 2, "ipndm": 4, "deis": 3}
    assert solvers.injects_noise("dpmpp_3m_sde", {}) and not solvers.injects_noise("dpmpp_3m_sde", {"eta": 0.0})
    assert not any(solvers.injects_noise(name, {}) for name in ["unipc", "dpmpp_3m", "ipndm", "deis"])


# ---- every new solver through ts.sample: backends, NFE, tracking -----------------------------------------

DEN_5x7 = ts.toy.GaussianMixture(torch.randn(3, 35, generator=torch.Generator().manual_seed(5)), 0.4).denoiser("edm")
CASES = [("unipc", {}), ("unipc", {"order": 3, "variant": "bh1"}), ("unipc", {"order": 1}),
         ("unipc", {"order": 3, "noise_below": 1.0}), ("dpmpp_3m", {}),
         ("dpmpp_3m_sde", {}), ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 0.8}), ("ipndm", {}),
         ("ipndm", {"max_order": 3}), ("deis", {}), ("deis", {"order": 2})]


@pytest.mark.parametrize("grid", ["karras", "logsnr"])
@pytest.mark.parametrize("steps", [1, 2, 3, 16])
@pytest.mark.parametrize("solver,options", CASES, ids=str)
def test_cpp_and_torch_agree_and_nfe_is_the_tables(solver, options, steps, grid):
    kw = dict(shape=(6, 5, 7), steps=steps, solver=solver, grid=grid, seed=11, **options)
    ref = ts.sample(DEN_5x7, backend="torch", **kw)
    cpp = ts.sample(DEN_5x7, backend="cpp", **kw)
    assert torch.isfinite(ref.samples).all()
    torch.testing.assert_close(cpp.samples, ref.samples, rtol=2e-5, atol=2e-5)
    assert ref.nfe == cpp.nfe == solvers.evaluations(solver, steps)
    assert ref.thermo.rate.shape[0] == ref.nfe                  # every evaluation tracked once
    torch.testing.assert_close(cpp.thermo.rate, ref.thermo.rate, rtol=1e-4,
                               atol=1e-5 * ref.thermo.rate.abs().max().item())   # float32 cancellation
    assert (ref.thermo.displacement is None) == solvers.injects_noise(solver, options)


@pytest.mark.parametrize("solver", ["dpmpp_3m_sde", "unipc", "deis"])
def test_widest_steps_with_a_noise_sampler_on_cpp(solver):
    """The widest fused updates (deis order 3: six inputs; unipc order 3: five; dpmpp_3m_sde: four plus
    the sampled noise) through the cpp backend, float32 and float64."""
    options = {"dpmpp_3m_sde": {"eta": 1.0}, "unipc": {"order": 3}, "deis": {"order": 3}}[solver]
    for dtype in (torch.float32, torch.float64):
        x = _noise(5, 80.0, seed=2).to(dtype)
        kw = dict(noise=x, steps=9, solver=solver, grid="karras", **options)
        if solver == "dpmpp_3m_sde":
            kw["noise_sampler"] = SharedNoise(x)
        ref = ts.sample(DEN, backend="torch", **kw).samples
        if solver == "dpmpp_3m_sde":
            kw["noise_sampler"] = SharedNoise(x)
        got = ts.sample(DEN, backend="cpp", **kw).samples
        tol = 2e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("solver,options", [("unipc", {"order": 3}), ("dpmpp_3m_sde", {"eta": 1.0}), ("ipndm", {}),
                                            ("deis", {"order": 3}), ("unipc", {"order": 3, "noise_below": 1.0})],
                         ids=str)
def test_triton_runs_the_wide_steps(solver, options, monkeypatch):
    """The 5- and 6-input updates of a whole run through the Triton launcher (interpreted on CPU tensors
    here, as tests/test_backends_agree.py does; compiled on a CUDA machine)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        pytest.importorskip("triton", reason="triton is not installed")
        row = dataclasses.replace(ops.BACKENDS["triton"], devices=None, available=lambda: True)
        monkeypatch.setitem(ops.BACKENDS, "triton", row)
    kw = dict(shape=(3, 5, 7), steps=6, solver=solver, grid="karras", seed=4, **options)
    ref = ts.sample(DEN_5x7, backend="torch", **kw)
    got = ts.sample(DEN_5x7, backend="triton", device=device, **kw)
    torch.testing.assert_close(got.samples.cpu(), ref.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.thermo.rate.cpu(), ref.thermo.rate, rtol=1e-4,
                               atol=1e-5 * ref.thermo.rate.abs().max().item())


@pytest.mark.parametrize("solver,option,bad", [("unipc", "order", 4), ("unipc", "order", 0), ("deis", "order", 4),
                                               ("ipndm", "max_order", 5), ("ipndm", "max_order", 2.5)])
def test_bad_orders_are_refused(solver, option, bad):
    with pytest.raises((ValueError, TypeError), match=option):
        ts.sample(DEN, (2, 4), steps=3, solver=solver, **{option: bad})


def test_bad_unipc_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        ts.sample(DEN, (2, 4), steps=3, solver="unipc", variant="bh3")
    with pytest.raises(TypeError, match="variant"):
        ts.sample(DEN, (2, 4), steps=3, solver="unipc", variant=2)


def _states(sigmas, x, **options):
    """The evaluated state x_i at every step of a torch-backend UniPC run (the callback's 'x')."""
    seen = []
    ts.sample(DEN, noise=x, grid=torch.tensor(sigmas, dtype=torch.float64), solver="unipc", backend="torch",
              track=False, callback=lambda d: seen.append(d["x"].clone()), **options)
    return seen


def test_unipc_max_h_lowers_order_3_to_2_on_the_long_steps_only():
    """max_h: UniP-3 on the steps up to max_h long in lambda, UniP-2 on the longer ones. On a grid of five
    0.5-long steps then three 1.5-long ones (then 0), max_h = 1 follows order 3 exactly until the first long
    step and leaves it there; max_h below every step is order 2, above every step order 3 (bit for bit)."""
    lam = np.concatenate([np.full(5, 0.5), np.full(3, 1.5)])
    sigmas = [float(s) for s in 80.0 * np.exp(-np.concatenate([[0.0], np.cumsum(lam)]))] + [0.0]
    x = _noise(16, 80.0, seed=3)
    mixed, o3, o2 = (_states(sigmas, x, **kw) for kw in ({"order": 3, "max_h": 1.0}, {"order": 3}, {"order": 2}))
    for i in range(6):            # x_0 .. x_5 come from the short steps 0..4 only
        assert torch.equal(mixed[i], o3[i])
    for i in range(6, len(mixed)):
        assert not torch.allclose(mixed[i], o3[i], rtol=1e-6, atol=0)
    assert not torch.allclose(mixed[5], o2[5], rtol=1e-6, atol=0)   # and the short steps were not order 2
    for kw, same in (({"max_h": 0.1}, o2), ({"max_h": 10.0}, o3)):
        for a, b in zip(_states(sigmas, x, order=3, **kw), same):
            assert torch.equal(a, b)
    on_cpp = ts.sample(DEN, noise=x, grid=torch.tensor(sigmas, dtype=torch.float64), solver="unipc", backend="cpp",
                       order=3, max_h=1.0, track=False).samples
    on_torch = _ours("unipc", sigmas, x, order=3, max_h=1.0)
    torch.testing.assert_close(on_cpp, on_torch, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,error", [(0.0, ValueError), (-1.0, ValueError), ("long", TypeError),
                                       (float("nan"), ValueError)])
def test_bad_unipc_max_h_is_refused(bad, error):
    with pytest.raises(error, match="max_h"):
        ts.sample(DEN, (2, 4), steps=3, solver="unipc", order=3, max_h=bad)
    ts.sample(DEN, (2, 4), steps=3, solver="unipc", order=3, max_h=None)     # None: off, as the default


def test_unipc_noise_below_switches_to_deis_at_the_cut():
    """noise_below: UniPC until the first step from a sigma <= the cut, DEIS tAB from there on. The evaluated
    states equal plain UniPC-3's up to and including the first one at or below the cut, and differ after it;
    with the cut above sigma_max every step is DEIS, so a run of 16 steps (DEIS at full order to the end) is
    diffusers-parity `deis` with order 3; a cut of 0 is plain UniPC, bit for bit."""
    sigmas = _karras(16, True)
    x = _noise(16, 80.0, seed=5)
    cut = 1.0
    first = next(i for i, s in enumerate(sigmas) if s <= cut)
    mixed, plain = _states(sigmas, x, order=3, noise_below=cut), _states(sigmas, x, order=3)
    for i in range(first + 1):
        assert torch.equal(mixed[i], plain[i])
    for i in range(first + 1, len(mixed)):
        assert not torch.allclose(mixed[i], plain[i], rtol=1e-6, atol=0)
    all_deis = _ours("unipc", sigmas, x, order=3, noise_below=100.0)
    assert _rel(all_deis, _ours("deis", sigmas, x, order=3)) <= 1e-12
    assert torch.equal(_ours("unipc", sigmas, x, order=3, noise_below=0.0), _ours("unipc", sigmas, x, order=3))
    for order in (1, 2):   # DEIS at the solver's order
        assert _rel(_ours("unipc", sigmas, x, order=order, noise_below=100.0), _ours("deis", sigmas, x, order=order)) \
            <= 1e-12
    for order in (1, 2):   # noise_order sets DEIS's order whatever UniPC's (solver="auto" takes 3 after UniPC-2)
        assert _rel(_ours("unipc", sigmas, x, order=order, noise_below=100.0, noise_order=3),
                    _ours("deis", sigmas, x, order=3)) <= 1e-12
    for bad in (0, 4, 2.5):
        with pytest.raises(ValueError, match="noise_order"):
            _ours("unipc", sigmas, x, order=2, noise_below=1.0, noise_order=bad)
    on_cpp = ts.sample(DEN, noise=x, grid=torch.tensor(sigmas, dtype=torch.float64), solver="unipc", backend="cpp",
                       order=3, noise_below=cut, track=False).samples
    torch.testing.assert_close(on_cpp, _ours("unipc", sigmas, x, order=3, noise_below=cut), rtol=1e-12, atol=1e-12)


def test_unipc_noise_below_is_more_accurate_on_a_narrow_mode():
    """Why the option exists: on a narrow Gaussian (s0 = 0.05) the noise prediction (x - D) / sigma is
    linear in sigma below s0, and on karras's long low-noise lambda steps UniP-3's data prediction
    extrapolates the sigmoid of D in lambda. Against the closed-form solution at 20 steps, DEIS below
    sigma = 0.2 has a several times smaller error than plain UniPC-3 (0.17 x)."""
    mu, s0 = 0.3, 0.05
    den = ts.toy.Gaussian(torch.full((4,), mu), s0).denoiser("edm")
    sigmas = _karras(20, False)
    x = _noise(8, sigmas[0], seed=9)
    exact = mu + (x - mu) * math.sqrt((s0 ** 2 + sigmas[-1] ** 2) / (s0 ** 2 + sigmas[0] ** 2))

    def err(**options):
        out = ts.sample(den, noise=x, grid=torch.tensor(sigmas, dtype=torch.float64), solver="unipc",
                        backend="torch", order=3, **options).samples
        return (out - exact).abs().max().item()
    assert err(noise_below=0.2) < 0.3 * err()


@pytest.mark.parametrize("bad,error", [(-1.0, ValueError), ("low", TypeError), (float("nan"), ValueError)])
def test_bad_unipc_noise_below_is_refused(bad, error):
    with pytest.raises(error, match="noise_below"):
        ts.sample(DEN, (2, 4), steps=3, solver="unipc", order=3, noise_below=bad)
    ts.sample(DEN, (2, 4), steps=3, solver="unipc", order=3, noise_below=None)   # None: off, as the default
