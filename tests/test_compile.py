"""ts.sample(..., compile=True): the solver loop, model included, as one torch.compile(fullgraph=True) graph;
grid, coefficients and the NaN check on the host (issue 14, item 4)."""
import pytest
import torch

import thermosample as ts
from thermosample.errors import NonFiniteError


class TinyNet(torch.nn.Module):
    """x0-prediction MLP taking (x, sigma) as k-diffusion-style models do."""

    def __init__(self, dim=4):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 16), torch.nn.SiLU(), torch.nn.Linear(16, dim))

    def forward(self, x, sigma):
        return self.net(torch.cat([x, sigma[:, None].log()], dim=1))


def make_den():
    return ts.Denoiser(TinyNet(), "edm", prediction="x0", time="sigma")


def counting(name):
    """A torch.compile backend that counts the graphs it is handed."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(name)(gm, example_inputs)
    return backend, graphs


def test_compiled_loop_with_inductor_matches_eager():
    """A real compile (inductor, C++ codegen on CPU) of a whole run: one graph, the eager result, and a
    second call with new noise reuses it."""
    torch._dynamo.reset()
    den = make_den()
    backend, graphs = counting("inductor")
    kw = dict(steps=3, solver="euler", grid="karras", seed=4, backend="torch")
    eager = ts.sample(den, (6, 4), **kw)
    comp = ts.sample(den, (6, 4), compile={"backend": backend}, **kw)
    assert len(graphs) == 1                                    # fullgraph: the whole loop is one graph
    torch.testing.assert_close(comp.samples, eager.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp.thermo.rate, eager.thermo.rate, rtol=1e-4, atol=1e-3)
    assert comp.nfe == eager.nfe == 3
    assert comp.thermo.speed_limit == pytest.approx(eager.thermo.speed_limit, rel=1e-4)
    again = ts.sample(den, (6, 4), compile={"backend": backend}, **{**kw, "seed": 4})
    assert len(graphs) == 1                                    # cached: no recompile for the same configuration
    torch.testing.assert_close(again.samples, comp.samples)


@pytest.mark.parametrize("solver,options", [("heun", {"churn": 1.5}), ("dpm_2", {}), ("dpmpp_2m", {}),
                                            ("euler_ancestral", {}), ("dpmpp_2m_sde", {}), ("lms", {}),
                                            ("unipc", {"order": 3}), ("deis", {}), ("ipndm", {}), ("dpmpp_3m", {}),
                                            ("deis", {"corrections": [[], [0.2, -0.1], [0.3, 0.1, -0.2, 0.05]]})])
def test_compiled_solvers_match_eager_bit_for_bit(solver, options):
    """Off-grid noise levels (EDM churn, midpoints) come from the host plan; noise from the in-kernel
    Philox stream: the compiled run (aot_eager: the traced graph, no codegen) equals the eager one."""
    den = make_den()
    backend, graphs = counting("aot_eager")
    kw = dict(steps=3, solver=solver, seed=11, backend="torch", **options)
    eager = ts.sample(den, (5, 4), **kw)
    comp = ts.sample(den, (5, 4), compile={"backend": backend}, **kw)
    assert len(graphs) == 1
    assert torch.equal(comp.samples, eager.samples)
    assert torch.equal(comp.thermo.rate, eager.thermo.rate)
    assert comp.nfe == eager.nfe


def test_explicit_grid_and_noise_compile():
    """The k-diffusion convention: sigmas computed on the host, noise= given."""
    den = make_den()
    sigmas = ts.grids.make_grid("logsnr", 3, den.schedule)
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    eager = ts.sample(den, noise=x, grid=sigmas, solver="dpmpp_2m", backend="torch")
    comp = ts.sample(den, noise=x, grid=sigmas, solver="dpmpp_2m", backend="torch", compile={"backend": "aot_eager"})
    assert torch.equal(comp.samples, eager.samples)


def test_compiled_run_still_raises_nonfinite_error():
    """The NaN check reads the rates after the compiled loop, on the host."""
    def bad(x, sigma):
        return torch.where(sigma[:, None] < 1.0, x * float("nan"), x * 0.5)
    den = ts.Denoiser(bad, "edm", prediction="x0", time="sigma")
    with pytest.raises(NonFiniteError):
        ts.sample(den, (3, 2), steps=4, backend="torch", compile={"backend": "aot_eager"})


def test_compile_refuses_python_hooks_and_bad_options():
    den = make_den()
    with pytest.raises(ValueError, match="callback"):
        ts.sample(den, (2, 4), steps=2, compile=True, callback=lambda d: None)
    with pytest.raises(ValueError, match="cuda_graph"):
        ts.sample(den, (2, 4), steps=2, compile=True, cuda_graph=True)
    with pytest.raises(TypeError, match="compile"):
        ts.sample(den, (2, 4), steps=2, compile="yes")


# ---- issue 37, item 3: a user's own compiled loop calling the public op keeps the fused kernel ----------

def _user_loop(x, backend):
    """An Euler-ancestral-like loop a user writes with the public op: functional, then in place."""
    rates = []
    for i, (s, s_next) in enumerate([(2.0, 1.0), (1.0, 0.5), (0.5, 0.2)]):
        d = x * (1.0 / (1.0 + s * s))
        kw = dict(noise=0.1 * s_next, seed=3, step=i, track=True, alpha=1.0 / s, beta=-1.0 / s, u=0, d=1,
                  backend=backend)
        if i % 2:
            x, rate = ts.ops.fused_step([x, d], [s_next / s, 1.0 - s_next / s], out=x, **kw)
        else:
            x, rate = ts.ops.fused_step([x, d], [s_next / s, 1.0 - s_next / s], **kw)
        rates.append(rate)
    return x, torch.stack(rates)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_public_op_compiles_into_one_graph_with_the_cpp_kernel(compiler):
    """ts.ops.fused_step inside torch.compile(fullgraph=True) is the registered op (graph-broke on its eager
    checks before), on the C++ backend, with the eager result."""
    if not ts.ops.cpp_available():
        pytest.skip("thermosample._C is not built")
    torch._dynamo.reset()
    backend, graphs = counting(compiler)
    x0 = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0))
    want_x, want_r = _user_loop(x0.clone(), "cpp")
    got_x, got_r = torch.compile(_user_loop, fullgraph=True, backend=backend)(x0.clone(), "cpp")
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("thermosample.fused_step.default") == 2, targets
    assert targets.count("thermosample.fused_step_.default") == 1, targets
    if compiler == "aot_eager":          # the same kernels on the same inputs: the same bits
        assert torch.equal(got_x, want_x) and torch.equal(got_r, want_r)
    else:                                # inductor computes D itself (its own rounding)
        torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_r, want_r, rtol=1e-5, atol=1e-6)
