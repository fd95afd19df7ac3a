"""thermosample::fused_step as a torch.library op: opcheck, eager agreement, torch.compile(fullgraph=True)."""
import warnings

import pytest
import torch
from torch.library import opcheck

from thermosample import ops
from thermosample.errors import BackendUnavailableWarning
from thermosample.ops import reference as _reference
from thermosample.ops.library import fused_step_op

BACKENDS = ["torch", "auto"] + (["triton"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KW = dict(noise=0.4, seed=2**64 - 3, step=5, sample_offset=2, track=True, alpha=0.7, beta=-1.3, u=0, d=1)


@pytest.fixture(autouse=True)
def _quiet_fallback():
    # backend="auto" on a CPU machine without thermosample._C falls back to torch with one warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendUnavailableWarning)
        yield


def _xs(n, shape=(3, 2, 5), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(n)]


def _schema_args(inputs, coeffs, kw, backend):
    seed = kw["seed"] - 2**64 if kw["seed"] >= 2**63 else kw["seed"]
    return (kw["noise"], seed, kw["step"], kw["sample_offset"], kw["track"], kw["alpha"], kw["beta"],
            kw["u"], kw["d"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n,track,noise", [(1, False, 0.0), (2, True, 0.4), (3, True, 0.0), (4, False, 1.0)])
def test_opcheck(backend, dtype, n, track, noise):
    xs = _xs(n, dtype=dtype)
    kw = dict(KW, track=track, noise=noise, d=n - 1)
    coeffs = [0.5, -1.0, 0.25, 2.0][:n]
    rest = _schema_args(xs, coeffs, kw, backend)
    opcheck(torch.ops.thermosample.fused_step.default, (xs, coeffs) + rest)
    for position in range(n):
        others = xs[:position] + xs[position + 1:]
        opcheck(torch.ops.thermosample.fused_step_.default, (xs[position].clone(), others, position, coeffs) + rest)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["new", "inplace0", "inplace1", "separate", "listed_twice"])
def test_eager_matches_ops(backend, where, poisoned):
    xs = _xs(3)
    coeffs = [0.5, -1.0, 0.25]
    if where == "listed_twice":
        xs[2] = xs[0]
    ref, ref_rate = ops.fused_step([x.clone() for x in xs], coeffs, backend=backend, **KW)
    out = {"new": None, "inplace0": xs[0], "inplace1": xs[1], "separate": poisoned(xs[0]),
           "listed_twice": xs[0]}[where]
    got, rate = fused_step_op(xs, coeffs, out=out, backend=backend, **KW)
    if out is not None:
        assert got is out
    else:
        assert all(got.data_ptr() != x.data_ptr() for x in xs)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(rate, ref_rate, rtol=0, atol=0)


def test_torch_backend_is_the_reference_and_seed_round_trips():
    xs = _xs(2)
    for seed in [0, 2**63 - 1, 2**63, 2**64 - 1]:
        kw = dict(KW, seed=seed)
        got, rate = fused_step_op(xs, [1.0, 0.5], backend="torch", **kw)
        ref, ref_rate = _reference.fused_step_reference(xs, [1.0, 0.5], **kw)
        assert torch.equal(got, ref) and torch.equal(rate, ref_rate)
    with pytest.raises(ValueError, match="seed"):
        fused_step_op(xs, [1.0, 0.5], seed=2**64)
    with pytest.raises(ValueError, match="seed"):
        fused_step_op(xs, [1.0, 0.5], seed=-1)
    with pytest.raises(ValueError, match="coeffs"):
        fused_step_op(xs, [1.0], backend="torch")


# A toy sampling loop: a stand-in denoiser, an Euler-ancestral-like update with noise, rate tracked.
SIGMAS = [2.0, 1.2, 0.6, 0.25, 0.0]


def _loop(x, inplace, backend="torch"):
    rates = []
    for i in range(len(SIGMAS) - 1):
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        den = torch.tanh(x) * (1.0 / (1.0 + s))              # "model output" D(x; sigma)
        c_x = s_next / s
        kw = dict(noise=0.1 * s_next, seed=7, step=i, sample_offset=0, track=True,
                  alpha=1.0 / s, beta=-1.0 / s, u=0, d=1, backend=backend)
        if inplace:
            x, rate = fused_step_op([x, den], [c_x, 1.0 - c_x], out=x, **kw)
        else:
            x, rate = fused_step_op([x, den], [c_x, 1.0 - c_x], **kw)
        rates.append(rate)
    return x, torch.stack(rates)


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_loop_matches_eager(inplace, compiler):
    torch._dynamo.reset()
    x0 = _xs(1, shape=(4, 3, 8, 8))[0]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    compiled = torch.compile(_loop, fullgraph=True, backend=counting)
    want_x, want_r = _loop(x0.clone(), inplace)
    got_x, got_r = compiled(x0.clone(), inplace)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    op_name = "thermosample.fused_step_.default" if inplace else "thermosample.fused_step.default"
    assert targets.count(op_name) == len(SIGMAS) - 1, targets
    torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_r, want_r, rtol=1e-5, atol=0)
    # a second call with the same shapes reuses the graph and is still right
    again_x, _ = compiled(x0.clone(), inplace)
    torch.testing.assert_close(again_x, want_x, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_loop_captures_in_a_cuda_graph(inplace):
    x0 = _xs(1, shape=(4, 3, 8, 8))[0]
    want_x, want_r = _loop(x0.clone(), inplace, backend="auto")
    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):              # warm up (compiles the Triton kernel) off the capture
        _loop(static_x.clone(), inplace, backend="auto")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got_x, got_r = _loop(static_x, inplace, backend="auto")
    static_x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_r, want_r, rtol=0, atol=0)


def test_eager_call_skips_the_dispatcher_but_tracing_and_grad_do_not(monkeypatch):
    """Plain eager tensors go straight to ops.fused_step (host time); inputs that require grad and
    tensor subclasses still go through the registered op, whose result is the same."""
    from thermosample.ops import library as _library

    x, d = torch.randn(3, 17), torch.randn(3, 17)
    calls = []
    real = _library._fused_step
    monkeypatch.setattr(_library, "_fused_step", lambda *a: calls.append(1) or real(*a))
    direct, rate = fused_step_op([x, d], [0.5, 0.25], track=True, alpha=1.0, beta=-1.0)
    assert calls == []
    xg = x.clone().requires_grad_(True)
    assert _library._needs_op([xg, d]) and not _library._needs_op([x, d])
    with torch.no_grad():
        assert not _library._needs_op([xg, d])          # no autograd to record: the direct path is fine
    via_op, rate_op = fused_step_op([xg, d], [0.5, 0.25], track=True, alpha=1.0, beta=-1.0)
    assert calls == [1]
    ref, ref_rate = _reference.fused_step_reference([x.double(), d.double()], [0.5, 0.25], track=True,
                                                    alpha=1.0, beta=-1.0)
    for out, r in [(direct, rate), (via_op.detach(), rate_op)]:
        torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.double(), ref_rate.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", [5, -3, 3])
def test_inplace_op_refuses_a_position_outside_the_inputs(position):
    """x goes among the inputs at `position`, 0..len(others): 5 and -3 were taken by Python slicing, putting
    x at the wrong place silently (issue 35, item 10)."""
    x, others = _xs(3)[0], _xs(3)[1:]
    with pytest.raises(ValueError, match="position must be in"):
        torch.ops.thermosample.fused_step_(x, others, position, [1.0, 2.0, 3.0], *_schema_args([], [], KW, "torch"))
    fake = torch.empty_like(x, device="meta")
    with pytest.raises(ValueError, match="position must be in"):
        torch.ops.thermosample.fused_step_(fake, [o.to("meta") for o in others], position, [1.0, 2.0, 3.0],
                                           *_schema_args([], [], KW, "torch"))
