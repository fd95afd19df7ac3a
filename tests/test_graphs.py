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


def make_run(den, extra_args, seed=0, sigmas=(10.0, 2.0, 0.5, 0.0), stochastic=False):
    return Run(den, list(sigmas), seed=seed, backend="torch", track=True, extra_args=extra_args, solver="euler",
               stochastic=stochastic)


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
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}, seed=1, stochastic=True), x, {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}), x.double(), {}),
                    graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}), x, {"churn": 1.0})):
        assert changed != key
    # a deterministic run draws no noise in the loop: another seed replays the same graph
    assert graphs.graph_key(make_run(den, {"label": torch.zeros(2, 3)}, seed=1), x, {}) == key


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
        replay(cache, den, torch.zeros(2, 3), {"label": torch.zeros(2, 3)}, seed=seed, stochastic=True)
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
        eager = ts.sample(den, noise=x, grid=[10.0, 2.0, 0.5, 0.0], extra_args={"label": label}, cuda_graph=False)
        torch.testing.assert_close(graphed.samples, eager.samples)
        outs[value] = graphed.samples
    assert len(graphs.GRAPHS.entries) == 1 and not torch.equal(outs[0.0], outs[1.0])


# ---- issue 37, item 2: ts.sample captures by itself where it is safe --------------------------------------

def test_run_auto_runs_a_first_call_eagerly_then_captures_and_replays():
    cache, den = graphs.GraphCache(capture=fake_capture), ConditionedDenoiser()
    x, args = torch.randn(2, 3, generator=torch.Generator().manual_seed(1)), {"label": torch.zeros(2, 3)}

    def auto():
        run = make_run(den, args)
        return cache.run_auto(run, x, solvers.SOLVERS["euler"].fn, {}, lambda: make_run(den, args))
    assert auto() is None and not cache.entries                       # a one-off call pays no capture
    out, _ = auto()
    assert len(cache.entries) == 1 and torch.equal(out, direct(den, x, args))
    out, _ = auto()                                                   # replayed
    assert len(cache.entries) == 1 and torch.equal(out, direct(den, x, args))


def test_run_auto_remembers_a_failed_capture(caplog):
    tries = []

    def failing(*args):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")
    cache, den = graphs.GraphCache(capture=failing), ConditionedDenoiser()
    x, args = torch.randn(2, 3), {"label": torch.zeros(2, 3)}
    with caplog.at_level("DEBUG", logger="thermosample"):
        for _ in range(4):
            assert cache.run_auto(make_run(den, args), x, solvers.SOLVERS["euler"].fn, {},
                                  lambda: make_run(den, args)) is None
    assert len(tries) == 1 and not cache.entries                      # probed once
    assert "capture failed" in caplog.text and "not permitted" in caplog.text


def test_weights_replaced_by_new_tensors_make_a_new_key():
    """Weights updated in place replay correctly (same addresses); new tensors (.to(), .half(), a new
    Parameter) must not replay a graph that reads the old ones."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x, sigma, label):
            return x * self.w

    den = ConditionedDenoiser()
    den.model = Net()
    x, args = torch.zeros(2, 3), {"label": torch.zeros(2, 3)}
    key = graphs.graph_key(make_run(den, args), x, {})
    with torch.no_grad():
        den.model.w.mul_(2.0)
    assert graphs.graph_key(make_run(den, args), x, {}) == key
    den.model.w = torch.nn.Parameter(torch.ones(3))
    assert graphs.graph_key(make_run(den, args), x, {}) != key


def test_automatic_graphs_only_where_capture_is_safe():
    refusal = ts.sampler._auto_graph_refusal
    den = ConditionedDenoiser()
    with torch.no_grad():
        assert refusal(den, 10, None, None, None, None, None) is None
        assert "Python" in refusal(den, 10, print, None, None, None, None)
        assert "Python" in refusal(den, 10, None, lambda a, b: a, None, None, None)
        assert "Python" in refusal(den, 10, None, None, 5, None, None)
        assert "compile" in refusal(den, 10, None, None, None, None, {"fullgraph": True})
        assert "progress" in refusal(den, 10, None, None, None, True, None)
        plain = ConditionedDenoiser()
        plain.model = lambda x, sigma, label: x
        assert "not a torch.nn.Module" in refusal(plain, 10, None, None, None, None, None)
    with torch.enable_grad():
        assert "grad" in refusal(den, 10, None, None, None, None, None)
    with pytest.raises(TypeError, match="cuda_graph must be"):
        ts.sample(den, noise=torch.zeros(2, 3), grid=[10.0, 0.0], cuda_graph="yes", extra_args={"label": torch.zeros(2, 3)})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_sample_captures_a_repeated_configuration_by_itself():
    den = ConditionedDenoiser()
    graphs.GRAPHS.clear()
    x, label = torch.randn(2, 3, device="cuda"), torch.zeros(2, 3, device="cuda")
    grid = [10.0, 2.0, 0.5, 0.0]
    eager = ts.sample(den, noise=x, grid=grid, extra_args={"label": label}, cuda_graph=False).samples
    first = ts.sample(den, noise=x, grid=grid, extra_args={"label": label}).samples
    assert not graphs.GRAPHS.entries
    second = ts.sample(den, noise=x, grid=grid, extra_args={"label": label}).samples
    third = ts.sample(den, noise=x, grid=grid, extra_args={"label": label}).samples
    assert len(graphs.GRAPHS.entries) == 1
    assert torch.equal(first, eager) and torch.equal(second, eager) and torch.equal(third, eager)
