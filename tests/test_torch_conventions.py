"""Torch conventions (issue 14, item 3): generator=, NumPy integer seeds, half-precision models, diffusers'
prediction names, the callback's tensor sigma."""
import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample.validate import check_seed, seed_from_generator

MIX = ts.toy.GaussianMixture(torch.tensor([[1.5, -1.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 2.0]]), [0.4, 0.6])
KW = dict(steps=6, solver="euler_ancestral", backend="torch")


def den():
    return MIX.denoiser("edm")


# -- generator= -----------------------------------------------------------------------------------------
def test_generator_seed_is_one_documented_draw():
    g = torch.Generator().manual_seed(123)
    out = ts.sample(den(), (8, 4), generator=g, **KW)
    expected = int(torch.empty((), dtype=torch.int64).random_(-2 ** 63, None,
                                                              generator=torch.Generator().manual_seed(123))) % 2 ** 64
    assert out.seed == expected == seed_from_generator(torch.Generator().manual_seed(123))
    assert torch.equal(out.samples, ts.sample(den(), (8, 4), seed=expected, **KW).samples)


def test_generator_is_reproducible_and_advances():
    a = ts.sample(den(), (8, 4), generator=torch.Generator().manual_seed(7), **KW)
    b = ts.sample(den(), (8, 4), generator=torch.Generator().manual_seed(7), **KW)
    assert torch.equal(a.samples, b.samples)
    g = torch.Generator().manual_seed(7)
    first = ts.sample(den(), (8, 4), generator=g, **KW)
    second = ts.sample(den(), (8, 4), generator=g, **KW)          # the generator moved on: new samples
    assert torch.equal(first.samples, a.samples) and not torch.allclose(first.samples, second.samples)


def test_generator_sample_i_depends_only_on_seed_and_i():
    out = ts.sample(den(), (6, 4), generator=torch.Generator().manual_seed(1), **KW)
    alone = ts.sample(den(), (1, 4), seed=out.seed, sample_offset=4, **KW)
    torch.testing.assert_close(alone.samples[0], out.samples[4], rtol=1e-6, atol=1e-6)


def test_generator_rules():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="seed= or generator="):
        ts.sample(den(), (2, 4), seed=1, generator=g, **KW)
    with pytest.raises(TypeError, match="generator"):
        ts.sample(den(), (2, 4), generator=[g, g], **KW)
    with pytest.raises(TypeError, match="generator"):
        ts.sample(den(), (2, 4), generator=0, **KW)
    state = g.get_state()
    with pytest.raises(ValueError):
        ts.sample(den(), (2, 4), generator=g, **{**KW, "steps": 0})     # a bad call draws nothing
    assert torch.equal(g.get_state(), state)
    assert ts.sample(den(), (2, 4), **KW).seed == 0                     # neither: the default seed 0


# -- NumPy seeds -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("np_seed,seed", [(np.int64(5), 5), (np.uint64(2 ** 64 - 1), 2 ** 64 - 1),
                                          (np.int32(9), 9), (np.uint8(3), 3)])
def test_numpy_integer_seeds(np_seed, seed):
    assert check_seed(np_seed) == seed and type(check_seed(np_seed)) is int
    a = ts.sample(den(), (4, 4), seed=np_seed, **KW)
    assert torch.equal(a.samples, ts.sample(den(), (4, 4), seed=seed, **KW).samples)
    assert type(a.seed) is int


@pytest.mark.parametrize("bad,error", [(np.int64(-1), ValueError), (np.float64(1.0), TypeError),
                                       (np.bool_(True), TypeError), (1.0, TypeError), (True, TypeError)])
def test_bad_seeds_still_refused(bad, error):
    """A seed of the wrong kind is a TypeError, an int out of range a ValueError (the README's promise)."""
    with pytest.raises(error, match="seed"):
        ts.sample(den(), (2, 4), seed=bad, **KW)


# -- half-precision models -------------------------------------------------------------------------------
class Net(torch.nn.Module):
    """A tiny x0 model whose time goes through its own weights (so x and time must share its dtype)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
        self.seen = []

    def forward(self, x, sigma):
        self.seen.append((x.dtype, sigma.dtype))
        return self.net(torch.cat([x, sigma[:, None].log()], dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(dtype):
    ref_net = Net()
    ref = ts.sample(ts.Denoiser(ref_net, "edm", prediction="x0", time="sigma"), (16, 4), steps=8, solver="heun",
                    seed=2, backend="torch")
    half_net = Net().to(dtype)
    out = ts.sample(ts.Denoiser(half_net, "edm", prediction="x0", time="sigma"), (16, 4), steps=8, solver="heun",
                    seed=2, backend="torch")
    assert out.samples.dtype == torch.float32                       # the state stays float32
    assert set(half_net.seen) == {(dtype, dtype)}                   # the model sees its own dtype
    assert torch.isfinite(out.samples).all() and out.thermo.rate.dtype == torch.float32
    scale = ref.samples.abs().max()
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    assert (out.samples - ref.samples).abs().max() <= tol * scale


def test_model_dtype_other_than_state():
    """A float32 model under a float64 state gets float32 inputs; its output comes back as float64."""
    net = Net()
    d = ts.Denoiser(net, "edm", prediction="x0", time="sigma")
    y = d(torch.randn(3, 4, dtype=torch.float64), 1.0)
    assert y.dtype == torch.float64 and net.seen[-1] == (torch.float32, torch.float32)


# -- diffusers' prediction names -------------------------------------------------------------------------
@pytest.mark.parametrize("alias,name,schedule", [("epsilon", "eps", "cosine"), ("v_prediction", "v", "vp"),
                                                 ("sample", "x0", "edm"), ("flow_prediction", "velocity", "condot")])
def test_diffusers_prediction_aliases(alias, name, schedule):
    model = MIX.as_model(schedule, name)
    a, b = ts.Denoiser(model, schedule, prediction=alias), ts.Denoiser(model, schedule, prediction=name)
    assert a.prediction == name
    x = torch.randn(5, 4, dtype=torch.float64)
    for sigma in (0.1, 1.0, 5.0):
        torch.testing.assert_close(a(x, sigma), b(x, sigma), rtol=0, atol=0)
        torch.testing.assert_close(a(x, sigma), MIX.denoise(x, sigma), rtol=1e-6, atol=1e-6)


def test_flow_prediction_is_diffusers_noise_minus_sample():
    """diffusers' flow matching: x_t = (1 - t) x0 + t noise, the model predicts noise - x0."""
    sch = ts.schedules.CondOT()

    def flow_model(x, t):
        tt = t.double()[:, None]
        x_hat = x / (1 - tt)
        d = MIX.denoise(x_hat, (tt / (1 - tt)).reshape(-1))
        noise = (x - (1 - tt) * d) / tt
        return noise - d
    den_flow = ts.Denoiser(flow_model, sch, prediction="flow_prediction")
    x = torch.randn(6, 4, dtype=torch.float64)
    for sigma in (0.2, 1.0, 10.0):
        torch.testing.assert_close(den_flow(x, sigma), MIX.denoise(x, sigma), rtol=1e-6, atol=1e-6)


def test_unknown_prediction_names_the_aliases():
    with pytest.raises(ValueError, match="v_prediction"):
        ts.Denoiser(lambda x, t: x, "edm", prediction="velocity_prediction")


# -- callback ------------------------------------------------------------------------------------------
def test_callback_sigma_is_a_tensor_like_k_diffusion():
    seen = []
    out = ts.sample(den(), (3, 4), steps=4, solver="heun", churn=1.0, backend="torch", callback=seen.append)
    assert len(seen) == 4
    for i, d in enumerate(seen):
        assert d["i"] == i
        for key in ("sigma", "sigma_hat"):
            assert torch.is_tensor(d[key]) and d[key].dim() == 0
            assert d[key].device == d["x"].device and d[key].dtype == d["x"].dtype
            assert float(d[key]) == pytest.approx(d[key + "_float"], rel=1e-6)
        assert d["sigma_float"] == float(out.sigmas[i]) and type(d["sigma_float"]) is float
        assert d["sigma_hat_float"] >= d["sigma_float"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_noise_gives_samples_in_its_dtype(dtype):
    """Half noise: computed in float32 (the same run as float32 noise of the same values), stored back in
    its dtype (docs/design.md, Precision)."""
    d = ts.Denoiser(Net(), "edm", prediction="x0", time="sigma")
    noise = (torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 80).to(dtype)
    ref = ts.sample(d, noise=noise.float(), steps=6, solver="heun", backend="torch").samples
    out = ts.sample(d, noise=noise, steps=6, solver="heun", backend="torch").samples
    assert out.dtype == dtype and torch.equal(out, ref.to(dtype))
