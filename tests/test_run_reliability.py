"""Issue 13, the run engine's part: a model that reuses its output buffer, and bad arguments that must
fail as ValueError/TypeError naming the argument before any work (items 10 and 11)."""
import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import ops

MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5], [-1.5, 1.0, -0.5]]), [0.3, 0.5])


class ReusedBuffer:
    """Wraps a denoiser and returns its output in the same tensor every call (as some compiled or
    graph-captured models do)."""

    def __init__(self, den):
        self.den, self.schedule, self.buffer = den, den.schedule, None

    def __call__(self, x, sigma, **kw):
        d = self.den(x, sigma, **kw)
        if self.buffer is None:
            self.buffer = torch.empty_like(d)
        return self.buffer.copy_(d)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "dpm_2", "lms", "ddim"])
def test_a_model_that_reuses_its_output_buffer_gives_the_same_samples(solver):
    kw = dict(steps=8, solver=solver, grid="karras", seed=3, backend="torch")
    plain = ts.sample(MIX.denoiser("vp"), (6, 3), **kw)
    reused = ts.sample(ReusedBuffer(MIX.denoiser("vp")), (6, 3), **kw)
    assert torch.equal(reused.samples, plain.samples)


class Counting:
    def __init__(self, den):
        self.den, self.schedule, self.calls = den, den.schedule, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.den(x, sigma, **kw)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shape=(2 ** 32 + 1, 1)), ValueError, "sample_offset \\+ batch size must be <= 2\\*\\*32"),
    (dict(shape=(4, 3), sample_offset=2 ** 32 - 2), ValueError, "sample_offset \\+ batch size"),
    (dict(noise=torch.zeros(4, 3), sample_offset=2 ** 32 - 1), ValueError, "sample_offset \\+ batch size"),
    (dict(noise=torch.zeros(4, 3), sample_offset=-1), ValueError, "sample_offset must be an int >= 0"),
    (dict(noise=torch.zeros(4, 3), sample_offset=1.5), TypeError, "sample_offset must be an int >= 0"),
    (dict(shape=(4, 3), churn=10 ** 400), ValueError, "solver option churn must be finite"),
    (dict(shape=(4, 3), solver="ddim", eta=-(10 ** 400)), ValueError, "solver option eta must be finite"),
])
def test_bad_arguments_fail_before_the_model_runs(kwargs, error, match):
    den = Counting(MIX.denoiser("edm"))
    with pytest.raises(error, match=match):
        ts.sample(den, steps=4, **kwargs)
    assert den.calls == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cuda_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        ts.sample(MIX.denoiser("edm"), (2, 3), steps=2, device="cuda")


def test_huge_coefficient_of_the_op_is_a_type_error():
    with pytest.raises(TypeError, match="coefficients must be finite"):
        ops.fused_step([torch.zeros(2, 3)], [10 ** 400])


@pytest.mark.parametrize("returned,error,match", [
    (lambda: np.zeros((4, 3)), TypeError, "noise_sampler must return a floating-point torch.Tensor, got a ndarray"),
    (lambda: torch.zeros(4, 3, dtype=torch.int64), TypeError, "got a torch.int64 tensor"),
    (lambda: torch.zeros(4, 2), ValueError, "noise_sampler returned shape \\(4, 2\\)"),
])
def test_a_bad_noise_sampler_is_named(returned, error, match):
    with pytest.raises(error, match=match) as info:
        ts.sample(MIX.denoiser("edm"), (4, 3), steps=3, solver="euler_ancestral", noise_sampler=lambda a, b: returned())
    assert "[[" not in str(info.value)                         # no dump of the values


def test_a_noise_sampler_of_another_float_dtype_is_cast():
    gen = torch.Generator().manual_seed(0)
    out = ts.sample(MIX.denoiser("edm"), (4, 3), steps=3, solver="euler_ancestral", backend="torch",
                    noise_sampler=lambda a, b: torch.randn(4, 3, generator=gen, dtype=torch.float64))
    gen.manual_seed(0)
    same = ts.sample(MIX.denoiser("edm"), (4, 3), steps=3, solver="euler_ancestral", backend="torch",
                     noise_sampler=lambda a, b: torch.randn(4, 3, generator=gen, dtype=torch.float64).float())
    assert out.samples.dtype == torch.float32 and torch.equal(out.samples, same.samples)


# ---- issue 15: a run checks the op's constant arguments once; every later call still gets what it needs ---

def _run(backend="cpp"):
    return ts.run.Run(MIX.denoiser("vp"), [2.0, 1.0, 0.5, 0.0], seed=1, backend=backend, track=True)


def test_later_calls_of_a_run_still_fail_like_the_op():
    """After the first call (full checks) a run calls the backend directly, but only for arguments that
    need no check: a bad later call raises the op's own error."""
    run = _run()
    x, d = torch.randn(2, 3), torch.randn(2, 3)
    run.update([x, d], [0.5, 0.5], 0, track_sigma=2.0)
    assert run._checked is not None
    with pytest.raises(TypeError, match="coefficients must be finite"):
        run.update([x, d], [0.5, float("nan")], 1, track_sigma=1.0)
    with pytest.raises(ValueError, match="every input must match inputs\\[0\\]"):
        run.update([x, torch.randn(3, 3)], [0.5, 0.5], 1)
    with pytest.raises(ValueError, match="step must be an int"):
        run.update([x, d], [0.5, 0.5], 2 ** 32)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_a_run_gives_the_op_s_numbers_on_every_path(backend):
    """Whether a call takes the checked path or the full one (a non-contiguous input, an int coefficient,
    another dtype), out and the stored rate are the op's."""
    run = _run(backend)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    calls = [([x, d], [0.5, 0.5]), ([x, d], [0.25, 0.75]),                        # first (full), then checked
             ([x, d.transpose(1, 2).contiguous().transpose(1, 2)], [0.5, 0.5]),    # not contiguous: full path
             ([x, d], [1, 0.5]),                                                   # an int coefficient: full path
             ([x.double(), d.double()], [0.5, 0.5]),                               # float64: full path
             ([x, d], [0.125, 0.5])]                                               # checked again
    for i, (inputs, coeffs) in enumerate(calls):
        out = run.update(inputs, coeffs, i, noise=0.25, track_sigma=1.0)
        want, want_rate = ops.fused_step(inputs, [float(c) for c in coeffs], noise=0.25, seed=1, step=i, track=True,
                                         alpha=run.velocity(1.0)[1], beta=run.velocity(1.0)[2], backend=backend)
        assert torch.equal(out, want) and torch.equal(run.eval_rates[i], want_rate)
    assert run.probes == list(range(len(calls))) and run.eval_rows == list(range(len(calls)))


def test_switching_the_backend_mid_run_is_honoured(monkeypatch):
    run = _run()
    x, d = torch.randn(2, 3), torch.randn(2, 3)
    run.update([x, d], [0.5, 0.5], 0)
    run.update([x, d], [0.5, 0.5], 1)
    seen = []
    reference = ops.reference.launch
    monkeypatch.setattr(ops.reference, "launch", lambda *a, **k: seen.append(1) or reference(*a, **k))
    ops.implementation.cache_clear()
    run.backend = "torch"
    run.update([x, d], [0.5, 0.5], 2)
    run.update([x, d], [0.5, 0.5], 3)
    ops.implementation.cache_clear()
    assert len(seen) == 2


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_only_a_run_s_first_op_takes_the_full_checks(backend, monkeypatch):
    """The host-time guard of issue 15: one fully checked op per run, the rest on the checked path (a
    regression to per-call checks would still give the right numbers, only slower)."""
    from thermosample import run as run_module
    calls = []
    full = run_module.fused_step_op
    monkeypatch.setattr(run_module, "fused_step_op", lambda *a, **k: calls.append(1) or full(*a, **k))
    for solver in ("euler", "heun", "dpmpp_2m", "euler_ancestral"):
        calls.clear()
        out = ts.sample(MIX.denoiser("vp"), (4, 3), steps=6, solver=solver, backend=backend)
        assert len(calls) == 1 and out.thermo.rate.shape == (out.nfe, 4)
