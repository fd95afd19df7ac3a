"""The C++ backend (thermosample._C via thermosample._cpp) against the PyTorch oracle (_reference.py).

This file fails at collection when _C is not built: CI builds it, and a silent skip would hide a broken
build. Low-precision outputs are bounded flash-attention style: the error against a float64 computation
on the same stored inputs is at most 2x the reference's own error in that dtype.
"""
import itertools

import pytest
import torch

from thermosample import ops
from thermosample.ops import cpp as _cpp
from thermosample.ops import reference as _reference

if not _cpp.available():
    raise RuntimeError(f"thermosample._C is not built (run `pip install --no-build-isolation -e .`): "
                       f"{_cpp._LOAD_ERROR!r}")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(b, n) for b in (1, 7, 64) for n in (1, 7, 1023, 4099)] + [(b, 3, 5, 7) for b in (1, 7, 64)]
COEFFS = [0.7, -1.3, 0.45, 2.1, -0.35, 1.0 / 3.0]          # one per input, up to ops.MAX_INPUTS (6)
# (n_inputs, track, noise, u, d)
FLAGS = [(n, track, noise, n - 1, 0) for n in (1, 2, 3, 4, 5, 6) for track in (False, True) for noise in (0.0, 0.6)]
FLAGS += [(n, True, noise, 4, n - 1) for n in (5, 6) for noise in (0.0, 0.6)]   # the new slots as u and as d


def make_inputs(shape, dtype, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * (1 + k)).to(dtype) for k in range(n)]


def step_kwargs(track, noise, u, d, **extra):
    return dict(noise=noise, seed=0x1234_5678_9ABC, step=17, sample_offset=3, track=track, alpha=0.8,
                beta=-1.7, u=u, d=d, **extra)


def assert_matches_reference(inputs, coeffs, kw, out_cpp, rate_cpp):
    """Compare a cpp result with the reference in the same dtype (tight) or via float64 truth (fp16/bf16)."""
    dtype = inputs[0].dtype
    ref_kw = {k: v for k, v in kw.items() if k != "out"}
    out_ref, rate_ref = _reference.fused_step_reference(inputs, coeffs, **ref_kw)
    assert out_cpp.dtype == dtype and out_cpp.shape == inputs[0].shape
    assert rate_cpp.dtype == torch.float32 and rate_cpp.shape == (inputs[0].shape[0],)
    assert not out_cpp.isnan().any(), "unwritten (NaN-poisoned) or NaN output"
    noise_atol = 4e-6 * abs(kw["noise"])   # z: log/sqrt/sincos differ from torch's by a few float32 ulp
    if dtype == torch.float32:
        torch.testing.assert_close(out_cpp, out_ref, rtol=2e-6, atol=2e-6 + noise_atol)
        torch.testing.assert_close(rate_cpp, rate_ref, rtol=2e-5, atol=1e-6)
    elif dtype == torch.float64:
        torch.testing.assert_close(out_cpp, out_ref, rtol=1e-12, atol=1e-12 + noise_atol)
        torch.testing.assert_close(rate_cpp, rate_ref, rtol=2e-7, atol=1e-7)   # one float32 rounding
    else:
        truth_out, truth_rate = _reference.fused_step_reference([t.double() for t in inputs], coeffs, **ref_kw)
        scale = truth_out.abs().max().item()
        err_cpp = (out_cpp.double() - truth_out).abs().max().item()
        err_ref = (out_ref.double() - truth_out).abs().max().item()
        assert err_cpp <= 2 * err_ref + 1e-6 * scale, (err_cpp, err_ref)
        rerr_cpp = ((rate_cpp.double() - truth_rate) / truth_rate.abs().clamp_min(1e-30)).abs().max().item()
        rerr_ref = ((rate_ref.double() - truth_rate) / truth_rate.abs().clamp_min(1e-30)).abs().max().item()
        if kw["track"]:
            assert rerr_cpp <= 2 * rerr_ref + 1e-6, (rerr_cpp, rerr_ref)
        else:
            assert torch.equal(rate_cpp, rate_ref)   # exactly 0


# Every (dtype, shape) with a rotating choice of flags, plus every flag combination on two shapes.
CASES = [(dt, shape, FLAGS[i % len(FLAGS)]) for i, (dt, shape) in enumerate(itertools.product(DTYPES, SHAPES))]
CASES += [(dt, shape, f) for dt in DTYPES for shape in [(7, 1023), (2, 3, 5, 7)] for f in FLAGS]


@pytest.mark.parametrize("dtype,shape,flags", CASES, ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_matches_reference(dtype, shape, flags, poisoned):
    n, track, noise, u, d = flags
    inputs = make_inputs(shape, dtype, n)
    out = poisoned(inputs[0])
    kw = step_kwargs(track, noise, u, d, out=out)
    got_out, got_rate = _cpp.fused_step(inputs, COEFFS[:n], **kw)
    assert got_out is out
    assert_matches_reference(inputs, COEFFS[:n], kw, got_out, got_rate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_in_place_aliasing_an_input(dtype, n):
    for k in range(n):
        inputs = make_inputs((7, 4099), dtype, n, seed=k)
        expected_inputs = [t.clone() for t in inputs]
        kw = step_kwargs(True, 0.4, 0, n - 1)
        out, rate = _cpp.fused_step(inputs, COEFFS[:n], out=inputs[k], **kw)
        assert out.data_ptr() == inputs[k].data_ptr()
        assert_matches_reference(expected_inputs, COEFFS[:n], kw, out, rate)


def test_out_none_allocates_and_ops_dispatch():
    inputs = make_inputs((7, 3, 5, 7), torch.float32, 3)
    kw = step_kwargs(True, 0.5, 0, 1)
    out, rate = _cpp.fused_step(inputs, COEFFS[:3], **kw)
    assert all(out.data_ptr() != t.data_ptr() for t in inputs)
    assert_matches_reference(inputs, COEFFS[:3], kw, out, rate)
    out2, rate2 = ops.fused_step(inputs, COEFFS[:3], backend="cpp", **kw)
    assert torch.equal(out, out2) and torch.equal(rate, rate2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_conversions_bit_exact(dtype):
    """Every 16-bit pattern (normals, subnormals, inf, NaN) loads, scales and stores (RNE) as torch does."""
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(64, 1024)
    for c in (1.0, 0.3, 3.7, 1e-3):
        got, _ = _cpp.fused_step([x], [c])
        expected = (x.float() * c).to(dtype)       # one float32 multiply, no FMA ambiguity
        assert torch.equal(got.isnan(), expected.isnan())
        keep = ~expected.isnan()
        assert torch.equal(got[keep].view(torch.int16), expected[keep].view(torch.int16)), c


@pytest.mark.parametrize("numel", [1, 3, 4, 4099, 40001])
def test_philox_matches_reference(numel):
    kw = dict(seed=2**64 - 12345, step=2**32 - 2, sample_offset=5)
    expected = _reference.philox_normal(3, numel, **kw)
    torch.testing.assert_close(_cpp.philox_normal(3, numel, **kw), expected, rtol=2e-6, atol=2e-6)
    # the in-kernel stream (blocks, inner chunks and a partial last quad) is the same stream
    zeros = torch.zeros(3, numel)
    z, _ = _cpp.fused_step([zeros], [0.0], noise=1.0, **kw)
    torch.testing.assert_close(z, expected, rtol=2e-6, atol=2e-6)


def test_philox_statistics():
    z = _cpp.philox_normal(4, 2**16, seed=7, step=0).flatten().double()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert z.isfinite().all()


def test_noise_independent_of_batch():
    """Sample g's noise depends on g = sample_offset + b only, not on the batch it runs in."""
    def noise_for(batch, offset):
        zeros = torch.zeros(batch, 1023)
        return _cpp.fused_step([zeros], [0.0], noise=1.0, seed=99, step=4, sample_offset=offset)[0]
    full = noise_for(64, 0)
    assert torch.equal(noise_for(7, 10), full[10:17])
    assert torch.equal(noise_for(1, 42), full[42:43])
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(noise_for(1, 0), _cpp.fused_step([torch.zeros(1, 1023)], [0.0], noise=1.0, seed=99,
                                                            step=5)[0])


@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_flag_exactly_those_samples(track, bad):
    x, D = make_inputs((7, 40001), torch.float32, 2)
    D[2, 12345] = bad
    x[5, 40000] = bad
    _, rate = _cpp.fused_step([x, D], [0.9, 0.0], track=track, alpha=1.0, beta=-1.0)
    assert rate[[2, 5]].isnan().all()
    others = [0, 1, 3, 4, 6]
    assert rate[others].isfinite().all()
    if not track:
        assert (rate[others] == 0).all()


def test_rate_independent_of_thread_count():
    inputs = make_inputs((3, 300_001), torch.float32, 3)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_cpp.fused_step(inputs, COEFFS[:3], **step_kwargs(True, 0.3, 0, 2)))
    finally:
        torch.set_num_threads(before)
    for out, rate in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(rate, results[0][1])
