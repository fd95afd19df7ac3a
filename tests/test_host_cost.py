"""Issue 37: what a run caches to keep host time per step low gives the results it gave without the caches.

- Triton's deferred partial sums (kernels/fused_step.RunSteps): a run whose samples span several blocks
  launches one kernel per step and sums the partials when its rates are read; the rates are bit-identical
  to a per-step sum and match the reference (thermosample/ops/reference.py), through probes, a second kind
  of call, the rate buffer's growth and a replaced CheckedStep. On CUDA where there is a GPU, else on CPU
  under TRITON_INTERPRET=1 (tests/conftest.py).
- The Denoiser's time tensors: kept on CUDA per (value, batch, dtype, device), made again when written in
  place; none kept on CPU (tests/test_memory.py: RSS).
"""
import dataclasses

import pytest
import torch

import thermosample as ts
from thermosample import ops
from thermosample.run import Run

SIGMAS = [4.0, 2.0, 1.0, 0.5, 0.0]      # a short grid: the run's rate buffer starts at 15 rows and grows
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, generator):
    return torch.randn(shape, generator=generator).to(DEVICE)


@pytest.fixture
def triton_here(monkeypatch):
    """Backend 'triton' for this machine's tensors (on CPU the kernels run in Triton's interpreter)."""
    pytest.importorskip("triton")
    if DEVICE == "cpu":
        monkeypatch.setitem(ops.BACKENDS, "triton", dataclasses.replace(ops.BACKENDS["triton"], devices=None,
                                                                        available=lambda: True))
    ops.implementation.cache_clear()
    yield
    ops.implementation.cache_clear()


def _drive(backend: str, shape=(3, 2500), steps: int = 24):
    """Updates as solvers make them (tracked two-input steps, noise steps of another kind, a probe, then a
    call of another shape that replaces the CheckedStep); returns (outputs, eval rates, all rows)."""
    gen = torch.Generator().manual_seed(5)
    run = Run(None, SIGMAS, seed=11, sample_offset=2, backend=backend, track=True, schedule=ts.schedules.EDM())
    x, outs = _randn(*shape, generator=gen), []
    for i in range(steps):
        d = _randn(*shape, generator=gen)
        s = SIGMAS[i % 4]
        x = run.update([x, d], [0.7, 0.3], i, track_sigma=s)
        if i % 5 == 4:
            x = run.update([x], [1.0], i, noise=0.25)
        if i == 9:
            run.probe(i, x)
        outs.append(x)
    other = _randn(shape[0], 1500, generator=gen)                  # a new kind of call: a new CheckedStep
    for i in range(steps, steps + 3):
        other = run.update([other, _randn(*other.shape, generator=gen)], [0.5, 0.5], i, track_sigma=1.0)
        outs.append(other)
    run.check_finite()
    return outs, run.eval_rates, run._rates[:run._rows].clone()


def test_deferred_partial_sums_match_per_step_sums_and_the_reference(triton_here, monkeypatch):
    from thermosample.kernels import fused_step as fs
    assert triton_n_blocks((3, 2500)) > 1 and triton_n_blocks((3, 1500)) > 1
    monkeypatch.setattr(fs.RunSteps, "_SLOTS", 4)             # the partials' store grows within the run
    deferred = _drive("triton")
    monkeypatch.setitem(ops.BACKENDS, "triton", dataclasses.replace(ops.BACKENDS["triton"], load_run=None))
    per_step = _drive("triton")                               # every step through fs.launch: its own sum
    for a, b in zip(deferred[0], per_step[0]):
        assert torch.equal(a, b)
    assert torch.equal(deferred[1], per_step[1]) and torch.equal(deferred[2], per_step[2])
    reference = _drive("torch")
    torch.testing.assert_close(deferred[1], reference[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(deferred[2], reference[2], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_pending_partial_sums_go_to_the_run_that_made_them(triton_here):
    """A CheckedStep carried over to a new run (as diffusers' schedulers do) with steps still pending
    finishes them into the old run's buffer, not the new one's."""
    x = _randn(2, 3000, generator=torch.Generator().manual_seed(1))
    first = Run(None, SIGMAS, seed=0, backend="triton", track=True, schedule=ts.schedules.EDM())
    for i in range(3):
        first.update([x, x], [0.5, 0.5], i, track_sigma=SIGMAS[i])
    second = Run(None, SIGMAS, seed=0, backend="triton", track=True, schedule=ts.schedules.EDM())
    second._checked = first._checked
    second.update([2 * x, x], [0.5, 0.5], 0, track_sigma=SIGMAS[0])
    want = Run(None, SIGMAS, seed=0, backend="triton", track=True, schedule=ts.schedules.EDM())
    want.update([2 * x, x], [0.5, 0.5], 0, track_sigma=SIGMAS[0])
    assert torch.equal(second.eval_rates, want.eval_rates)
    fresh = Run(None, SIGMAS, seed=0, backend="triton", track=True, schedule=ts.schedules.EDM())
    for i in range(3):
        fresh.update([x, x], [0.5, 0.5], i, track_sigma=SIGMAS[i])
    assert torch.equal(first.eval_rates, fresh.eval_rates)


def triton_n_blocks(shape) -> int:
    from thermosample.kernels import fused_step as fs
    numel = shape[1]
    return -(-numel // fs._block_size(numel)[0])


def _den():
    return ts.Denoiser(lambda x, t: x * t[:, None], "edm", prediction="x0", time="sigma", scale_input=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="time tensors are kept on CUDA only")
def test_time_tensors_are_kept_per_value_batch_and_dtype():
    den, cuda = _den(), torch.device("cuda")
    a = den._time_tensor(2.0, 3, torch.float32, cuda)
    assert den._time_tensor(2.0, 3, torch.float32, cuda) is a
    for other in [den._time_tensor(2.5, 3, torch.float32, cuda), den._time_tensor(2.0, 4, torch.float32, cuda),
                  den._time_tensor(2.0, 3, torch.float64, cuda)]:
        assert other is not a and torch.equal(other, torch.full_like(other, other[0].item()))
    assert den._time_tensor(2.0, 4, torch.float32, cuda).shape == (4,)
    assert den._time_tensor(2.0, 3, torch.float64, cuda).dtype == torch.float64


def test_no_time_tensor_is_kept_on_cpu():
    """Small tensors kept between a run's freed states pin glibc's heap (RSS grows a state per step)."""
    den = _den()
    a = den._time_tensor(2.0, 3, torch.float32, torch.device("cpu"))
    assert den._time_tensor(2.0, 3, torch.float32, torch.device("cpu")) is not a and not den.__dict__.get("_times")


def test_a_time_tensor_written_in_place_is_made_again():
    """A model that writes its time argument in place (t.mul_(1000)) gets the right time on the next call."""
    def model(x, t):
        t.mul_(1000.0)
        return x * 0 + t[:, None]
    den = ts.Denoiser(model, "edm", prediction="x0", time="sigma", scale_input=False)
    x = torch.zeros(2, 3, device=DEVICE)
    for _ in range(3):
        assert torch.equal(den(x, 2.0), torch.full((2, 3), 2000.0, device=DEVICE))


def test_a_time_tensor_made_in_inference_mode_works_outside_it():
    den = ts.Denoiser(lambda x, t: x * t[:, None], "edm", prediction="x0", time="sigma", scale_input=False)
    x = torch.ones(2, 3, device=DEVICE)
    with torch.inference_mode():
        den(x, 2.0)
    w = torch.ones(2, 3, device=DEVICE, requires_grad=True)
    (den(x * w, 2.0).sum()).backward()        # an inference tensor here could not be saved for backward
    assert torch.equal(w.grad, torch.full((2, 3), 2.0, device=DEVICE))


def test_samples_are_those_of_a_fresh_denoiser():
    """Time tensors kept from one run (another grid, batch) leave the next run's samples unchanged."""
    mix = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0], [-1.5, 1.0]]), [0.3, 0.5])
    den = mix.denoiser("vp")
    for steps, batch in ((6, 3), (9, 2), (6, 3)):
        got = ts.sample(den, (batch, 2), steps=steps, seed=1).samples
        want = ts.sample(mix.denoiser("vp"), (batch, 2), steps=steps, seed=1).samples
        assert torch.equal(got, want)
