"""Determinism: one seed gives the same samples bit for bit, run after run, and sample i is the same whatever
batch or shard it lands in (its noise is keyed by the global index sample_offset + b)."""
import pytest
import torch

import thermosample as ts
from thermosample.toy import toy_factory

BACKENDS = ["torch"] + (["cpp"] if ts.ops.cpp_available() else [])
SOLVERS = ["euler", "heun", "dpmpp_2m", "euler_ancestral", "euler_maruyama"]
N = 64


def run(den, n, offset=0, **kw):
    args = dict(steps=8, seed=1234, backend="torch")
    args.update(kw)
    return ts.sample(den, (n, 8), sample_offset=offset, **args)


@pytest.fixture(scope="module")
def den():
    return toy_factory(dim=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_batch_size_and_offset_do_not_change_a_sample(den, backend, solver):
    full = run(den, N, solver=solver, backend=backend)
    for batch in (1, 7):
        parts, rates = [], []
        for start in range(0, N, batch):
            out = run(den, min(batch, N - start), offset=start, solver=solver, backend=backend)
            parts.append(out.samples)
            rates.append(out.thermo.rate)
        assert torch.equal(torch.cat(parts), full.samples), f"batch {batch} differs from batch {N}"
        assert torch.equal(torch.cat(rates, dim=1), full.thermo.rate), f"rates differ at batch {batch}"
    # a shard in the middle, starting at an odd offset
    mid = run(den, 9, offset=37, solver=solver, backend=backend)
    assert torch.equal(mid.samples, full.samples[37:46])


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_bits_run_after_run(den, backend):
    a = run(den, 16, solver="euler_ancestral", backend=backend)
    b = run(den, 16, solver="euler_ancestral", backend=backend)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.thermo.rate, b.thermo.rate)
    c = run(den, 16, solver="euler_ancestral", backend=backend, seed=1235)
    assert not torch.equal(a.samples, c.samples), "a different seed must give different samples"


def test_different_offsets_give_different_samples(den):
    a = run(den, 4, offset=0)
    b = run(den, 4, offset=4)
    assert not torch.equal(a.samples, b.samples)


def test_check_every_and_callback_do_not_change_samples(den):
    a = run(den, 8, solver="euler_maruyama")
    seen = []
    b = run(den, 8, solver="euler_maruyama", check_every=2, callback=lambda d: seen.append(d["i"]))
    assert torch.equal(a.samples, b.samples)
    assert seen == list(range(8))


def test_float64_state_is_batch_invariant_too(den):
    full = run(den, 12, dtype=torch.float64, solver="ddim", eta=1.0)
    parts = torch.cat([run(den, 1, offset=i, dtype=torch.float64, solver="ddim", eta=1.0).samples
                       for i in range(12)])
    assert torch.equal(parts, full.samples)


@pytest.mark.skipif(not ts.ops.cpp_available(), reason="thermosample._C not built: only the torch backend exists")
def test_thread_count_does_not_change_cpp_bits(den):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(den, 33, backend="cpp", solver="euler_ancestral")
        torch.set_num_threads(2)
        two = run(den, 33, backend="cpp", solver="euler_ancestral")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.samples, two.samples) and torch.equal(one.thermo.rate, two.thermo.rate)
