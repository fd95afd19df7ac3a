"""benchmarks/bench_guided.py and benchmarks/conditional.py on a tiny class-conditional model (trained here in a
second or two): the CFG loop is a pipeline's (guidance 1 is the conditional loop, guidance moves the samples),
auto through ThermoAutoScheduler is ts.sample of the same config, the classes and guidance are those of
thermosample.integrations.diffusers' pipeline_denoiser, the reference converges, and the benchmark runs end to end."""
import math

import pytest
import torch

import thermosample as ts
from benchmarks import bench_guided as bg
from benchmarks import conditional

pytest.importorskip("diffusers")

TINY = conditional.CondConfig(hidden=48, depth=2, emb=16, steps=600, batch=64, lr=3e-3, seed=5, ema=0.98)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("THERMOSAMPLE_LEARNED_CACHE", str(tmp_path_factory.mktemp("cond")))
    try:
        before = conditional.TRAINED
        model, info = conditional.load_model(TINY, threads=1)
        assert not info["cached"] and conditional.TRAINED == before + 1
        again, info2 = conditional.load_model(TINY, threads=1)
        assert info2["cached"] and conditional.TRAINED == before + 1
        for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), k
        yield model
    finally:
        mp.undo()


def _noise(n, seed=0):
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))


def test_the_model_learns_the_classes(net):
    # the conditional prediction beats the unconditional and a wrong class on held-out rows
    cond = conditional.validation_loss(net, TINY)
    uncond = conditional.validation_loss(net, TINY, lambda y: torch.full_like(y, conditional.NULL))
    wrong = conditional.validation_loss(net, TINY, lambda y: (y + 5) % conditional.CLASSES)
    assert cond < uncond < wrong < 1.0


def _loop(net, w, z, steps, labels):
    """An independent pipeline loop: separate conditional and unconditional calls (no batching)."""
    sch = bg.peer_scheduler("dpmpp_2m")
    sch.set_timesteps(steps)
    x = z.clone()
    for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        c = net(inp, t, labels)
        eps = c if w == 1 else net(inp, t, torch.full_like(labels, conditional.NULL)) * (1 - w) + w * c
        x = sch.step(eps, t, x, return_dict=False)[0]
    return x


def test_cfg_loop_is_an_independent_guided_loop(net):
    z = _noise(20)
    labels = conditional.row_labels(20)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 2)) and labels[0] == labels[1] == 0
    for w in (1.0, 3.0):
        got, calls = bg.cfg_loop(bg.peer_scheduler("dpmpp_2m"), net, w, z, 8)
        assert calls == 8
        torch.testing.assert_close(got, _loop(net, w, z, 8, labels), atol=1e-4, rtol=1e-4)
    # guidance moves the samples, and so does the class
    one, _ = bg.cfg_loop(bg.peer_scheduler("dpmpp_2m"), net, 1.0, z, 8)
    three, _ = bg.cfg_loop(bg.peer_scheduler("dpmpp_2m"), net, 3.0, z, 8)
    other, _ = bg.cfg_loop(bg.peer_scheduler("dpmpp_2m"), net, 1.0, z, 8, labels=(labels + 5) % 10)
    assert float((three - one).abs().max()) > 1e-2 and float((other - one).abs().max()) > 1e-2


def test_guided_denoiser_is_the_cfg_combination(net):
    # the denoiser the pipeline runs (pipeline_denoiser) against the eps combination computed here
    den = conditional.guided_denoiser(4.0, net)
    x_hat, sigma = _noise(20) * 3.0, 3.0
    t = torch.full((20,), float(den.schedule.index(den.schedule.sigma_to_t(sigma))))
    x = x_hat / math.sqrt(1 + sigma ** 2)
    c = net(x, t, conditional.row_labels(20))
    u = net(x, t, torch.full((20,), conditional.NULL))
    eps = u + 4.0 * (c - u)
    torch.testing.assert_close(den(x_hat, sigma), x_hat - sigma * eps, atol=1e-4, rtol=1e-4)


def test_auto_through_the_pipeline_is_ts_sample(net):
    w, nfe = 3.0, 6
    config = conditional.calibrate(w, nfe, net)
    assert config.calibrated_for["pilot"]["batch"] % 20 == 0       # each class as often
    z, sigma_max = _noise(20, 1).double(), ts.schedules.DiscreteVP(conditional.alphas_cumprod()).sigma_max
    x_hat = (z * math.sqrt(1 + sigma_max ** 2)).float()
    piped, calls = bg.cfg_loop(bg.auto_scheduler(config), net, w, x_hat)
    direct = ts.sample(conditional.guided_denoiser(w, net), noise=x_hat, grid=config, track=False).samples
    assert calls == nfe
    torch.testing.assert_close(piped, direct, atol=1e-4, rtol=1e-4)


def test_reference_converges(net):
    den = conditional.guided_denoiser(3.0, net).reference_denoiser
    z, sigma_max = bg.start_state((7,), 20)
    x_hat = z * math.sqrt(1 + sigma_max ** 2)
    coarse, info_c = bg.reference(den, x_hat, 100)
    fine, info_f = bg.reference(den, x_hat, 400)
    assert info_f["error_bound"] < info_c["error_bound"] / 4
    assert float((coarse - fine).square().mean().sqrt()) < 2 * info_c["error_bound"] + 1e-6
    # a 10-step peer is much further from it than the reference's own error
    peer, _ = bg.cfg_loop(bg.peer_scheduler("unipc"), net, 3.0, z.float(), 10)
    assert float((peer.double() - fine).square().mean().sqrt()) > 10 * info_f["error_bound"]


def test_the_benchmark_runs_end_to_end(net):
    res = bg.run(scales=(1.0, 3.0), budgets=(6, 20), batch=20, seeds=(1, 2), net=net, ref_steps=200, envelope=None,
                 options=ts.CalibrationOptions(cost="low", progress=False), log=lambda *_: None)
    rows = res["rows"]
    assert [(r["scale"], r["budget"]) for r in rows] == [(1.0, 6), (1.0, 20), (3.0, 6), (3.0, 20)]
    for w in ("1.0", "3.0"):     # the peers converge to the reference: the runs and it give each row its class
        at6, at20 = (r["best_peer_error"] for r in rows if str(r["scale"]) == w)
        assert at20 < 0.6 * at6 and res["reference"][w]["error_bound"] < 0.01 * at20
    for r in rows:
        assert set(r["peers"]) == set(bg.PEERS)
        assert r["best_peer_error"] == min(p["error"] for p in r["peers"].values())
        assert math.isclose(r["ratio"], r["auto_error"] / r["best_peer_error"])
        assert r["ratio_ci90"][0] <= r["ratio"] <= r["ratio_ci90"][1]
        assert r["calibration_rows"] > 0
        assert r["calibration_network_rows"] == (1 if r["scale"] == 1 else 2) * r["calibration_rows"]
        assert r["pipeline_vs_ts_sample_max_abs"] < 1e-3
    text = bg.table(rows)
    assert text.count("\n") == len(rows) + 1 and "auto/best" in text
