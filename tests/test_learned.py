"""benchmarks/learned.py: the learned denoisers of bench_quality --learned train (tiny configurations here, a
second or two each), are cached under their config's key, are reproducible under their seed and denoise held-out
rows better than the identity and than the untrained network; the learned problem set holds several kinds of
data and the held-out model last. The benchmark's summary reports the bulk and the switched samples."""
import dataclasses

import numpy as np
import pytest
import torch

import thermosample as ts
from benchmarks import bench_quality as bq
from benchmarks import learned

TINY = learned.TrainConfig("digits", hidden=64, depth=2, emb=16, steps=200, batch=64, lr=3e-3, seed=3)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(learned.CACHE_ENV, str(tmp_path))
    return tmp_path


def test_a_model_trains_once_then_loads_from_the_cache(cache):
    before = learned.TRAINED
    net, info = learned.load_model(TINY, threads=1)
    assert not info["cached"] and learned.TRAINED == before + 1
    assert info["path"].startswith(str(cache)) and info["path"].endswith(f"digits-{TINY.key()}.pt")
    again, info2 = learned.load_model(TINY, threads=1)
    assert info2["cached"] and learned.TRAINED == before + 1                     # loaded, not trained
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    # the key covers every field of the config (and learned.CODE_VERSION): another config, another file
    other = dataclasses.replace(TINY, steps=201)
    assert other.key() != TINY.key() and learned.cache_path(other) != learned.cache_path(TINY)


def test_training_is_deterministic_under_its_seed():
    a, _ = learned.train(TINY, threads=1)
    b, _ = learned.train(TINY, threads=1)
    c, _ = learned.train(dataclasses.replace(TINY, seed=4), threads=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_the_trained_denoiser_beats_the_identity_and_the_untrained_network_on_held_out_rows():
    net, info = learned.train(TINY, threads=1)
    torch.manual_seed(TINY.seed)
    untrained = learned.EDMMLP(info["dim"], TINY.hidden, TINY.depth, TINY.emb, sigma_data=info["sigma_data"])
    model, identity = learned.validation_mse(net, TINY, 1.0)
    raw, _ = learned.validation_mse(untrained, TINY, 1.0)   # EDM's preconditioning alone: c_skip x
    assert model < 0.5 * identity and model < 0.7 * raw, (model, raw, identity)


def test_the_denoiser_has_a_float64_twin_and_classes(cache, monkeypatch):
    monkeypatch.setitem(learned.CONFIGS, "digits", TINY)
    den = learned.denoiser("digits", threads=1)
    assert isinstance(den, ts.Denoiser) and den.sample_shape == (1, 8, 8) and den.kind == "image"
    assert den.model_dtype() == torch.float32 and den.reference_denoiser.model_dtype() == torch.float64
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d32, d64 = den(x, 0.7), den.reference_denoiser(x, 0.7)
    assert d32.dtype == d64.dtype == torch.float64 and 0 < float((d32 - d64).abs().max()) < 1e-4
    data = learned.load_dataset("digits")
    train_rows, _ = learned.split(data.data.shape[0], TINY)
    rows = train_rows[:100]
    assert np.array_equal(den.classes(data.data[rows].double()), data.labels[rows.numpy()])  # its own class


def test_the_learned_problem_set():
    """Three or more learned problems of at least two kinds of data besides the held-out one, which is last,
    named "ho-" and is learned.HELDOUT_LEARNED; the set shares no name with the default and held-out sets."""
    probs = bq.problems(learned=True)
    names = [p.name for p in probs]
    datasets = [p.make.dataset for p in probs]
    assert datasets[-1] == learned.HELDOUT_LEARNED and names[-1].startswith("ho-")
    assert not any(n.startswith("ho-") for n in names[:-1])
    tuned = datasets[:-1]
    kinds = {learned.load_dataset(d).kind for d in tuned}
    assert len(tuned) >= 2 and len(kinds) >= 2 and learned.HELDOUT_LEARNED not in tuned
    assert "digits-8x8/edm" not in names                                   # not the shipped digits model
    assert not set(names) & ({p.name for p in bq.problems()} | {p.name for p in bq.problems(heldout=True)})
    assert set(learned.CONFIGS) == set(datasets)


def test_score_and_summary_report_the_bulk_and_the_switched_samples():
    """score_run: the median per-sample error, the samples beyond SWITCH and, given classes, the class
    switches; summarize and summary_table carry them for the best peer and the recommended configuration."""
    ref = torch.zeros(8, 2, dtype=torch.float64)
    out = ref.clone()
    out[:, 0] = torch.tensor([0.01, 0.01, 0.02, 0.02, 0.03, 0.03, 0.9, 2.0])   # two samples far off
    per = out.square().mean(1).sqrt()
    classes = lambda x: (x[:, 0] > 0.5).numpy().astype(int)                  # noqa: E731
    s = bq.score_run(out, ref, 8, 1, classes, classes(ref))
    assert s["switched"] == 2 and s["class_switched"] == 2
    assert s["median"] == pytest.approx(float(per.median()))
    rows = []
    for method, config, sc in (("peer", "kd:x", 1.0), ("recommended", "recommended:auto", 0.4)):
        r = bq.score_run(out * sc, ref, 8, 1)
        rows.append({"problem": "p", "budget": 6, "method": method, "config": config, "grid": "calibrated",
                     "nfe": 6, **r})
    (summ,) = bq.summarize(rows)
    assert summ["best_peer_switched"] == 2 and summ["recommended_switched"] == 1
    assert summ["recommended_median_ratio"] == pytest.approx(0.4)
    table = bq.summary_table([summ])
    assert "bulk" in table and " sw" in table and "bulk/peer" in table
