"""The CUDA-graph cache (thermosample/graphs.py): keyed on what a captured graph reads, with extra_args
copied into static buffers. The keying and buffer logic runs on CPU with a stand-in capture; the real
capture runs when a CUDA device is present."""
import pytest
import torch

import thermosample as ts
from thermosample import graphs, solvers
from thermosample.run import Run


class Conditioned(torch.nn.Module):
    """D(x; sigma) = x / (1 + sigma^2) + label: conditioning shows directly in the samples."""

    def forward(self, x, sigma, label):
        return x / (1.0 + sigma ** 2) + label


class ConditionedDenoiser:
    def __init__(self):
        self.model, self.schedule = Conditioned(), ts.schedules.EDM()

    def __call__(self, x, sigma, **extra_args):
        return self.model(x, sigma, **extra_args)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: 'replay' re-runs the captured solver on the captured buffers,
    which is exactly what a graph does (it reads the static tensors, whatever their values now are)."""

    def __init__(self, replay):
        self.replay, self.captures = replay, 1


def fake_capture(run, static_x, solve, options, make_run):
    out = solve(run, static_x.clone(), run.sigmas, **options)

    def replay():
        out.copy_(solve(run, static_x.clone(), run.sigmas, **options))
    return FakeGraph(replay), out


def make_run(den, extra_args, seed=0, sigmas=(10.0, 2.0, 0.5, 0.0)):
    return Run(den, list(sigmas), seed=seed, backend="torch", track=True, extra_args=extra_args, solver="euler")


def replay(cache, den, x, extra_args, **kw):
    run = make_run(den, extra_args, **kw)
    out, _ = cache.run(run, x, solvers.SOLVERS["euler"].fn, {}, lambda: make_run(den, extra_args, **kw))
    return out


def direct(den, x, extra_args):
    run = make_run(den, extra_args)
    return solvers.SOLVERS["euler"].fn(run, x.clone(), run.sigmas)


def test_new_conditioning_of_the_same_shape_replays_with_the_new_values():
    cache, den = graphs.GraphCache(capture=fake_capture), ConditionedDenoiser()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    first, second = {"label": torch.zeros(2, 3)}, {"label": torch.ones(2, 3)}
    assert torch.equal(replay(cache, den, x, first), direct(den, x, first))
    got = replay(cache, den, x, second)
    assert len(cache.entries) == 1                                    # replayed, not recaptured
    assert torch.equal(got, direct(den, x, second))                  # with the new labels
    assert not torch.equal(got, direct(den, x, first))


def test_key_holds_what_the_graph_reads():
    den, other = ConditionedDenoiser(), ConditionedDenoiser()
    x = torch.zeros(2, 3)
    key = graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}), x, {})
    assert key == graphs.graph_key(make_run(den, {"label": torch.ones(2, 3)}), x, {})   # values: copied in
    for changed in (graphs.graph_key(make_run(other, {"label": torch.zeros(2, 3)}), x, {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(1, 3)}), x, {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3, dtype=torch.float64)}), x, {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3), "w": 2}), x, {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}, seed=1), x, {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}), x.double(), {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}), x, {"churn": 1.0})):
        assert changed != key


def test_each_denoiser_gets_its_own_graph_and_the_entry_keeps_it_alive():
    cache = graphs.GraphCache(capture=fake_capture)
    x, args = torch.randn(2, 3), {"label": torch.zeros(2, 3)}
    a, b = ConditionedDenoiser(), ConditionedDenoiser()
    b.model = torch.nn.Module()
    b.model.forward = lambda x, sigma, label: x / (1.0 + sigma ** 2) - 5.0   # another model
    replay(cache, a, x, args)
    assert torch.equal(replay(cache, b, x, args), direct(b, x, args))
    assert len(cache.entries) == 2 and {id(e.den) for e in cache.entries.values()} == {id(a), id(b)}


def test_cache_is_bounded():
    cache, den = graphs.GraphCache(max_graphs=2, capture=fake_capture), ConditionedDenoiser()
    for seed in range(4):
        replay(cache, den, torch.zeros(2, 3), {"label": torch.zeros(2, 3)}, seed=seed)
    assert len(cache.entries) == 2


def test_unhashable_extra_args_are_refused():
    with pytest.raises(ValueError, match="extra_args of tensors and hashable values"):
        graphs.extra_args_signature({"cfg": [1, 2]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_replays_new_conditioning():
    den = ConditionedDenoiser()
    graphs.GRAPHS.clear()
    x = torch.randn(2, 3, device="cuda")
    outs = {}
    for value in (0.0, 1.0):
        label = torch.full((2, 3), value, device="cuda")
        graphed = ts.sample(den, noise=x, grid=[10.0, 2.0, 0.5, 0.0], cuda_graph=True, extra_args={"label": label})
        eager = ts.sample(den, noise=x, grid=[10.0, 2.0, 0.5, 0.0], extra_args={"label": label})
        torch.testing.assert_close(graphed.samples, eager.samples)
        outs[value] = graphed.samples
    assert len(graphs.GRAPHS.entries) == 1 and not torch.equal(outs[0.0], outs[1.0])
