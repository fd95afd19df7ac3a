"""Issue 13, items 6, 7 and 14: the fused step's contract at its edges, on every backend.

- item 6: rate[b] is NaN when out[b] holds a non-finite value *as stored* (an fp16/bf16 result that is
  finite in the float32 compute but overflows to inf on the store included).
- item 7: the rate is reduced in a fixed order: bit-identical for 1 vs 2 threads and for a sample alone
  vs inside a batch of 3.
- item 14: the raw pybind entry refuses null pointers (ValueError, no segfault) and every backend reads
  negative-bit views (torch._neg_view) by value.

The Triton launcher runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py): sizes stay small there.
"""
import importlib.util
import math
import pathlib

import pytest
import torch

from thermosample import ops
from thermosample.ops import cpp as _cpp
from thermosample.ops import reference as _reference

HAVE_CPP = _cpp.available()
try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the machine
    HAVE_TRITON = False
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_module():
    try:
        from thermosample.kernels import fused_step as module
        return module
    except ModuleNotFoundError:  # pragma: no cover - not installed: load the checkout's file
        path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "fused_step.py"
        spec = importlib.util.spec_from_file_location("_ts_kernels_fused_step", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _step(backend):
    """The backend's fused step, called directly (so triton runs interpreted on CPU tensors)."""
    if backend == "torch":
        return _reference.fused_step_reference
    if backend == "cpp":
        if not HAVE_CPP:
            pytest.fail("thermosample._C is not built (pip install --no-build-isolation -e .)")
        return _cpp.fused_step
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    return _triton_module().fused_step


def _dev(backend):
    return DEVICE if backend == "triton" else "cpu"


BACKENDS = ["torch", "cpp", "triton"]


@pytest.fixture
def threads():
    """Set torch's intra-op thread count for the test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---- item 6: a stored non-finite value makes the sample's rate NaN --------------------------------------

def _overflowing(dtype):
    """(x, c): x finite in `dtype`, c * x finite in float32 but inf once stored in `dtype`."""
    # bf16 has float32's exponent range: 2.005 * (bf16 max / 2) lies between bf16 max and float32 max
    big, c = (40000.0, 2.0) if dtype == torch.float16 else (torch.finfo(torch.bfloat16).max / 2, 2.005)
    x = torch.full((3, 37), 0.5, dtype=torch.float64)
    x[1, 11] = big
    x = x.to(dtype)
    assert torch.isfinite(x).all() and torch.isfinite(x.float() * c).all()
    assert torch.isinf((x.float() * c).to(dtype)[1, 11])
    return x, c


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("track", [False, True], ids=["notrack", "track"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_on_store_makes_the_rate_nan(backend, dtype, track):
    step = _step(backend)
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        # The interpreter casts float32 -> bfloat16 by truncation (see test_triton_backend.py), which never
        # overflows a finite value: the case only exists compiled, on a GPU.
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16: no overflow on store")
    x, c = _overflowing(dtype)
    x = x.to(_dev(backend))
    y = torch.full_like(x, 0.25)
    kw = dict(track=track, alpha=1e-3, beta=0.5, u=0, d=1) if track else {}
    out, rate = step([x, y], [c, 1.0], **kw)
    assert torch.isinf(out[1, 11]), "the stored value overflows to inf"
    rate = rate.cpu()
    assert torch.isnan(rate[1]), f"{backend}: rate {rate.tolist()} for a sample holding inf"
    assert torch.isfinite(rate[[0, 2]]).all()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_overflow_is_detected_through_ops_dispatch(backend):
    x, c = _overflowing(torch.float16)
    _, rate = ops.fused_step([x], [c], backend=backend)
    assert torch.isnan(rate[1]) and torch.isfinite(rate[[0, 2]]).all()


# ---- item 7: fixed reduction order ----------------------------------------------------------------------

NUMEL = 100_003          # odd: a sample inside a batch does not start on a vector boundary


def _case(dtype, numel=NUMEL, batch=3):
    """Three inputs [batch, numel] with a wide spread of magnitudes (so a changed summation order shows)."""
    g = torch.Generator().manual_seed(5)

    def one(k):
        x = torch.randn(batch, numel, generator=g, dtype=torch.float64)
        return (x * torch.exp(torch.randn(batch, numel, generator=g, dtype=torch.float64)) * (1 + k)).to(dtype)
    return [one(k) for k in range(3)]


KW7 = dict(noise=0.3, seed=77, step=4, track=True, alpha=0.8, beta=-1.7, u=0, d=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_rate_independent_of_threads_and_batch(backend, dtype, threads):
    step = _step(backend)
    xs = _case(dtype)
    coeffs = [0.7, -1.3, 0.45]
    results = {}
    for n in (1, 2):
        threads(n)
        results[n, "batch"] = step(xs, coeffs, **KW7)
        for b in range(3):
            results[n, b] = step([x[b:b + 1].clone() for x in xs], coeffs, sample_offset=b, **KW7)
    out3, rate3 = results[1, "batch"]
    for n in (1, 2):
        out, rate = results[n, "batch"]
        assert torch.equal(out, out3) and torch.equal(rate, rate3), f"batch of 3: {n} threads differ from 1"
        for b in range(3):
            out1, rate1 = results[n, b]
            assert torch.equal(out1[0], out3[b]), f"sample {b} alone, {n} threads: out differs"
            assert torch.equal(rate1[0], rate3[b]), (
                f"sample {b} alone, {n} threads: rate {rate1[0].item()!r} vs {rate3[b].item()!r} in the batch")


def test_torch_rate_is_accurate_and_close_to_cpp():
    xs = _case(torch.float32)
    coeffs = [0.7, -1.3, 0.45]
    kw = dict(KW7, noise=0.0)
    _, rate = _reference.fused_step_reference(xs, coeffs, **kw)
    exact = ((0.8 * xs[0].double() - 1.7 * xs[2].double()) ** 2).sum(dim=1)
    torch.testing.assert_close(rate.double(), exact, rtol=2e-6, atol=0)
    if HAVE_CPP:
        torch.testing.assert_close(_cpp.fused_step(xs, coeffs, **kw)[1].double(), exact, rtol=2e-6, atol=0)


def test_triton_rate_independent_of_threads_and_batch(threads):
    step = _step("triton")
    xs = [x.to(DEVICE) for x in _case(torch.float32, numel=5003)]   # several blocks per sample
    coeffs = [0.7, -1.3, 0.45]
    threads(1)
    out3, rate3 = step(xs, coeffs, **KW7)
    threads(2)
    out3b, rate3b = step(xs, coeffs, **KW7)
    assert torch.equal(out3, out3b) and torch.equal(rate3, rate3b)
    for b in range(3):
        out1, rate1 = step([x[b:b + 1].clone() for x in xs], coeffs, sample_offset=b, **KW7)
        assert torch.equal(out1[0], out3[b]) and torch.equal(rate1[0], rate3[b]), b


# ---- item 14: raw entry points --------------------------------------------------------------------------

def _raw_args(x, out, rate):
    return dict(inputs=[x], coeffs=[1.0], out=out, rate=rate, batch=2, numel=8, dtype=0, noise=0.0, seed=0,
                step=0, sample_offset=0, track=False, alpha=0.0, beta=0.0, u=0, d=0, num_threads=1)


@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
@pytest.mark.parametrize("null", ["input", "out", "rate"])
def test_raw_entry_refuses_null_pointers(null):
    x = torch.ones(2, 8)
    out = torch.empty(2, 8)
    rate = torch.empty(2)
    ptrs = {"input": x.data_ptr(), "out": out.data_ptr(), "rate": rate.data_ptr()}
    ptrs[null] = 0
    with pytest.raises(ValueError, match="null"):
        _cpp._C.fused_step(**_raw_args(ptrs["input"], ptrs["out"], ptrs["rate"]))
    # a second input slot, and the Philox helper
    with pytest.raises(ValueError, match="null"):
        args = _raw_args(x.data_ptr(), out.data_ptr(), rate.data_ptr())
        args.update(inputs=[x.data_ptr(), 0], coeffs=[1.0, 1.0])
        _cpp._C.fused_step(**args)
    with pytest.raises(ValueError, match="null"):
        _cpp._C.philox_normal(0, 0, 16, 0, 0, 0)


@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
def test_raw_entry_still_accepts_empty_samples():
    """numel 0 (a [B, 0] state has a null data pointer): nothing is read or written but the rate."""
    rate = torch.full((2,), float("nan"))
    args = _raw_args(0, 0, rate.data_ptr())
    args.update(numel=0)
    _cpp._C.fused_step(**args)
    assert torch.equal(rate, torch.zeros(2))


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_view_inputs_are_read_by_value(backend, which):
    step = _step(backend)
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(3, 2, 33, generator=g).to(_dev(backend)) for _ in range(2)]
    xs[which] = torch._neg_view(xs[which])
    assert xs[which].is_neg()
    kw = dict(noise=0.5, seed=3, step=1, track=True, alpha=0.6, beta=-0.4, u=0, d=1)
    out, rate = step(xs, [0.9, -0.35], **kw)
    resolved = [x.resolve_neg().cpu() for x in xs]
    want, want_rate = _reference.fused_step_reference(resolved, [0.9, -0.35], **kw)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rate.cpu(), want_rate, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_view_out_is_written_by_value(backend):
    step = _step(backend)
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(3, 40, generator=g).to(_dev(backend)) for _ in range(2)]
    buf = torch.full_like(xs[0], math.nan)
    out_view = torch._neg_view(buf)
    out, rate = step(xs, [0.9, -0.35], out=out_view)
    want, want_rate = _reference.fused_step_reference([x.cpu() for x in xs], [0.9, -0.35])
    assert out is out_view
    torch.testing.assert_close(out_view.cpu(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(buf.cpu(), -want, rtol=1e-6, atol=1e-6)
    assert torch.equal(rate.cpu(), want_rate)


@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
def test_neg_view_through_ops_dispatch_in_place():
    g = torch.Generator().manual_seed(11)
    x = torch._neg_view(torch.randn(2, 50, generator=g))
    d = torch.randn(2, 50, generator=g)
    want, want_rate = _reference.fused_step_reference([x.resolve_neg(), d], [1.0, 0.5], track=True,
                                                      alpha=1.0, beta=-1.0, u=0, d=1)
    out, rate = ops.fused_step([x, d], [1.0, 0.5], track=True, alpha=1.0, beta=-1.0, u=0, d=1, backend="cpp")
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rate, want_rate, rtol=1e-6, atol=0)


# ---- issue 12: the op takes up to ops.MAX_INPUTS = 6 inputs on every backend ----------------------------

def test_max_inputs_is_six_everywhere():
    assert ops.MAX_INPUTS == 6
    if HAVE_CPP:
        assert _cpp._C.MAX_INPUTS == ops.MAX_INPUTS
    if HAVE_TRITON:
        assert _triton_module().MAX_INPUTS is ops.MAX_INPUTS


@pytest.mark.parametrize("backend", BACKENDS)
def test_six_inputs_match_the_reference_and_seven_are_refused(backend):
    step = _step(backend)
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(3, 5, 7, generator=g, dtype=torch.float64).to(_dev(backend)) for _ in range(6)]
    coeffs = [0.5, -1.25, 0.75, 2.0, -0.375, 1.0 / 3.0]
    kw = dict(noise=0.25, seed=21, step=3, track=True, alpha=0.6, beta=-0.4, u=4, d=5)
    out, rate = step(xs, coeffs, out=torch.full_like(xs[0], math.nan), **kw)
    want, want_rate = _reference.fused_step_reference([x.cpu() for x in xs], coeffs, **kw)
    exact = sum(c * x.cpu() for c, x in zip(coeffs, xs))
    torch.testing.assert_close(out.cpu(), want, rtol=1e-12, atol=1e-6)          # z: float32 on every backend
    assert ((out.cpu() - exact) / 0.25).abs().max() < 6                          # the noise is a standard normal
    torch.testing.assert_close(rate.cpu(), want_rate, rtol=1e-6, atol=0)
    exact_rate = ((0.6 * xs[4].cpu() - 0.4 * xs[5].cpu()) ** 2).reshape(3, -1).sum(1).float()
    torch.testing.assert_close(rate.cpu(), exact_rate, rtol=1e-6, atol=0)
    if backend != "triton":                                      # ops dispatch refuses 7 before any kernel
        with pytest.raises(ValueError, match="1 to 6"):
            ops.fused_step(xs + [xs[0]], coeffs + [1.0], backend=backend)


@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
def test_raw_entry_refuses_seven_inputs():
    x, out, rate = torch.ones(2, 8), torch.empty(2, 8), torch.empty(2)
    args = _raw_args(x.data_ptr(), out.data_ptr(), rate.data_ptr())
    args.update(inputs=[x.data_ptr()] * 7, coeffs=[1.0] * 7)
    with pytest.raises(ValueError, match="1 to 6 inputs"):
        _cpp._C.fused_step(**args)
    args.update(inputs=[x.data_ptr()] * 6, coeffs=[1.0] * 6)
    _cpp._C.fused_step(**args)
    assert torch.equal(out, torch.full((2, 8), 6.0))


def test_six_inputs_through_the_library_op():
    from thermosample.ops.library import fused_step_op
    g = torch.Generator().manual_seed(13)
    xs = [torch.randn(2, 9, generator=g) for _ in range(6)]
    coeffs = [1.0, -0.5, 0.25, -0.125, 0.0625, -0.03125]
    want, want_rate = _reference.fused_step_reference(xs, coeffs, track=True, alpha=1.0, beta=0.5, u=5, d=3)
    xs_in = [x.clone() for x in xs]
    out, rate = fused_step_op(xs_in, coeffs, track=True, alpha=1.0, beta=0.5, u=5, d=3, out=xs_in[5],
                              backend="torch")
    assert out is xs_in[5]
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(rate, want_rate, rtol=0, atol=0)
    compiled_in = [x.clone() for x in xs]
    out2, rate2 = torch.ops.thermosample.fused_step(compiled_in, coeffs, 0.0, 0, 0, 0, True, 1.0, 0.5, 5, 3, "torch")
    assert torch.equal(out2, want) and torch.equal(rate2, want_rate)


# ---- issue 15: the rate written into a given row (a Run's buffer), and the per-run checked path ---------

@pytest.mark.parametrize("numel", [40, 3000])               # triton: one block per sample, and several
@pytest.mark.parametrize("backend", BACKENDS)
def test_rate_is_written_into_a_given_row(backend, numel):
    step = _step(backend)
    g = torch.Generator().manual_seed(14)
    xs = [torch.randn(3, numel, generator=g).to(_dev(backend)) for _ in range(2)]
    kw = dict(noise=0.5, seed=4, step=2, track=True, alpha=0.7, beta=-0.2, u=0, d=1)
    want, want_rate = step(xs, [0.9, 0.1], **kw)
    rates = torch.full((4, 3), math.nan, device=xs[0].device)
    out, rate = step(xs, [0.9, 0.1], rate=rates[2], **kw)
    assert rate.data_ptr() == rates[2].data_ptr()
    assert torch.equal(out, want) and torch.equal(rates[2], want_rate)
    assert torch.isnan(rates[[0, 1, 3]]).all()                 # no other row touched


@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
def test_cpp_launch_matches_the_checked_wrapper():
    g = torch.Generator().manual_seed(15)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        xs = [torch.randn(3, 2, 50, generator=g).to(dtype) for _ in range(3)]
        kw = dict(noise=0.25, seed=2 ** 64 - 5, step=7, sample_offset=11, track=True, alpha=0.5, beta=-1.5, u=1, d=2)
        want, want_rate = _cpp.fused_step(xs, [0.5, -0.25, 0.75], **kw)
        rates = torch.full((5, 3), math.nan)
        out, _ = _cpp.launch(ops.StepArgs(xs, [0.5, -0.25, 0.75], rate=rates[3], **kw))
        assert torch.equal(out, want) and torch.equal(rates[3], want_rate) and torch.isnan(rates[:3]).all()


def test_checked_step_accepts_only_what_validation_would_pass():
    """CheckedStep.accepts (contract.is_plain_call) is the per-call rest of contract.check for a run whose
    first call passed: anything it turns down goes back through ops.fused_step (and its error messages)."""
    x, d = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    checked = ops.CheckedStep("auto", x)
    ok = dict(step=3, noise=0.0, alpha=0.5, beta=-0.5, track=True, u=0, d=1, seed=7, sample_offset=5)

    def accepts(inputs=(x, d), coeffs=(0.5, 0.5), **kw):
        args = ops.StepArgs(list(inputs), list(coeffs), **dict(ok, **kw))
        if checked.accepts(args):       # then check passes it unchanged
            assert ops.check(args) == args._replace(inputs=tuple(args.inputs), coeffs=tuple(args.coeffs))
            return True
        return False
    assert accepts()
    assert not accepts(inputs=(x, d.double()))                            # another dtype
    assert not accepts(inputs=(x, torch.randn(3, 3, 4)))                  # another shape
    assert not accepts(inputs=(x, d.transpose(1, 2).contiguous().transpose(1, 2)))   # not contiguous
    assert not accepts(inputs=(x, torch._neg_view(d)))                    # a lazy neg bit
    assert not accepts(inputs=(x, d.to_sparse()))                         # not strided
    assert not accepts(inputs=(x, torch.nn.Parameter(d)))                 # a subclass
    assert not accepts(inputs=(x, d, x, d, x, d, x))                      # 7 inputs
    assert not accepts(coeffs=(0.5,))                                     # one coefficient short
    assert not accepts(coeffs=(0.5, 1))                                   # an int: the full path converts it
    assert not accepts(coeffs=(0.5, math.nan)) and not accepts(noise=math.inf)
    assert not accepts(step=2 ** 32) and not accepts(step=-1) and not accepts(step=True)
    assert not accepts(u=2) and accepts(u=2, track=False)
    assert not accepts(seed=2 ** 64) and not accepts(seed=-1) and not accepts(seed=1.0)
    assert not accepts(sample_offset=2 ** 32 - 1) and accepts(sample_offset=2 ** 32 - 2)
    assert not accepts(out=x) and not accepts(rate=torch.zeros(2)) and not accepts(track=1)
    with torch.enable_grad():
        assert not accepts(inputs=(x, d.clone().requires_grad_()))
    with torch.no_grad():
        assert accepts(inputs=(x, d.clone().requires_grad_()))


# ---- issue 35, item 10: the raw extension and the op boundary refuse what would crash or misread ---------

@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
@pytest.mark.parametrize("threads", [0, -1, ops.contract.MAX_THREADS + 1, 100_000])
def test_raw_entry_refuses_a_thread_count_openmp_cannot_start(threads):
    """0 and -1 aborted the process (SIGABRT) on the red team's machine, 100 000 segfaults: a ValueError."""
    x, out, rate = torch.ones(2, 8), torch.empty(2, 8), torch.empty(2)
    args = _raw_args(x.data_ptr(), out.data_ptr(), rate.data_ptr())
    args.update(num_threads=threads)
    with pytest.raises(ValueError, match="num_threads"):
        _cpp._C.fused_step(**args)
    assert _cpp._C.MAX_THREADS == ops.contract.MAX_THREADS


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_op_refuses_more_threads_than_it_may_start(backend):
    with pytest.raises(ValueError, match="num_threads"):
        ops.fused_step([torch.ones(2, 3)], [1.0], num_threads=ops.contract.MAX_THREADS + 1, backend=backend)


def _aliased_through_numpy(base: torch.Tensor, start: int, shape) -> torch.Tensor:
    """A tensor over base's memory from `start` on, through a storage object of its own (torch.from_numpy)."""
    view = torch.from_numpy(base.numpy()[start:start + math.prod(shape)]).view(shape)
    assert view.untyped_storage().nbytes() != base.untyped_storage().nbytes()       # another storage object
    return view


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_out_partially_overlapping_an_input_through_another_storage_is_refused(backend):
    base = torch.arange(40, dtype=torch.float32)
    x = base[:32].view(4, 8)
    out = _aliased_through_numpy(base, 4, (4, 8))          # shares elements 4..31 of x, shifted by 4
    with pytest.raises(ValueError, match="overlaps inputs"):
        ops.fused_step([x], [2.0], out=out, backend=backend)
    # the same memory exactly (in place through another storage object) is fine
    same = _aliased_through_numpy(base, 0, (4, 8))
    got, _ = ops.fused_step([x], [2.0], out=same, backend=backend)
    assert torch.equal(got, 2.0 * torch.arange(32, dtype=torch.float32).view(4, 8))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_rate_sharing_memory_with_out_or_an_input_is_refused(backend):
    base = torch.zeros(40)
    x = base[:32].view(4, 8)
    with pytest.raises(ValueError, match="rate shares memory with inputs"):
        ops.fused_step([x], [1.0], rate=_aliased_through_numpy(base, 30, (4,)), backend=backend)
    out = torch.empty(4, 8)
    with pytest.raises(ValueError, match="rate shares memory with out"):
        ops.fused_step([torch.ones(4, 8)], [1.0], out=out, rate=out.view(-1)[:4], backend=backend)


@pytest.mark.skipif(not HAVE_CPP, reason="thermosample._C is not built")
def test_raw_entry_refuses_partial_overlap():
    base = torch.zeros(40)
    x, rate = base[:16], torch.empty(2)
    args = _raw_args(x.data_ptr(), base[4:].data_ptr(), rate.data_ptr())
    with pytest.raises(ValueError, match="out partially overlaps inputs"):
        _cpp._C.fused_step(**args)
    args = _raw_args(x.data_ptr(), x.data_ptr(), base[15:].data_ptr())       # in place: fine; rate inside x: not
    with pytest.raises(ValueError, match="rate overlaps"):
        _cpp._C.fused_step(**args)
    _cpp._C.fused_step(**_raw_args(x.data_ptr(), x.data_ptr(), rate.data_ptr()))
