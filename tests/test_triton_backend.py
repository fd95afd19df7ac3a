"""The Triton fused step (kernels/fused_step.py) against the PyTorch oracle (_reference.py).

On machines without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors;
with a GPU the same tests run on CUDA. The launcher is called directly, since ops.resolve_backend sends
only CUDA tensors to 'triton'. Outputs start as NaN so an unwritten element cannot pass.
"""
import inspect
import math
import os
import sys
import zlib

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton backend cannot run here")

from thermosample import ops  # noqa: E402
from thermosample.ops import reference as _reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
EPS32 = torch.finfo(torch.float32).eps
EPS = {torch.float32: EPS32, torch.float64: torch.finfo(torch.float64).eps}


def _load_kernels():
    """The kernel module exactly as the package imports it (thermosample.ops.triton): a broken kernel
    file fails here with its own error, not as a skip."""
    from thermosample.ops import triton as loader
    loader.launcher()
    return sys.modules["thermosample.kernels.fused_step"]


fs = _load_kernels()

SHAPES = [(1, 1), (7, 1), (1, 7), (7, 7), (7, 1023), (1, 257), (3, 4099), (7, 3, 5, 7), (2, 3, 9, 11)]
COEFFS = [0.75, -1.0 / 3.0, 2.5, -0.125, 1.0 / 7.0, -0.6]     # one per input, up to 6 (ops.MAX_INPUTS)
KW = dict(seed=0x1234_5678_9ABC, step=11, sample_offset=5, alpha=0.3, beta=-1.1)


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _inputs(shape, dtype, n, gen):
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for _ in range(n)]


def _kwargs(n, track, noise):
    # 5 and 6 inputs track the new slots (u = n - 2, d = n - 1: x3/x4 and x4/x5 through _pick)
    return dict(KW, noise=0.7 if noise else 0.0, track=track, u=0 if n <= 4 else n - 2, d=n - 1)


def _magnitude(xs, coeffs, noise, z):
    """Elementwise sum_k |c_k x_k| (float64): the scale of rounding in the linear part."""
    mag = torch.zeros(xs[0].shape, dtype=torch.float64, device=xs[0].device)
    for c, x in zip(coeffs, xs):
        mag += abs(c) * x.double().abs()
    return mag, abs(noise) * z.abs().clamp_min(1.0).reshape(xs[0].shape)


def _noise_like(x, kw):
    b = x.shape[0]
    return _reference.philox_normal(b, x.numel() // b, seed=kw["seed"], step=kw["step"],
                                    sample_offset=kw["sample_offset"], device=x.device).double()


@pytest.mark.parametrize("noise", [False, True], ids=["ode", "noise"])
@pytest.mark.parametrize("track", [False, True], ids=["notrack", "track"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_full_precision(dtype, shape, n, track, noise, poisoned):
    gen = torch.Generator().manual_seed(_seed(dtype, shape, n, track, noise))
    xs = _inputs(shape, dtype, n, gen)
    kw = _kwargs(n, track, noise)
    out, rate = fs.fused_step(xs, COEFFS[:n], out=poisoned(xs[0]), **kw)
    ref, ref_rate = _reference.fused_step_reference(xs, COEFFS[:n], **kw)
    assert out.shape == xs[0].shape and out.dtype == dtype and out.device == xs[0].device
    assert rate.shape == (shape[0],) and rate.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(rate).all()
    # z is float32 in every dtype; log/cos/sin may differ from torch by a few ulp
    lin, noisy = _magnitude(xs, COEFFS[:n], kw["noise"], _noise_like(xs[0], kw))
    tol = 4 * EPS[dtype] * lin + 4 * EPS32 * noisy + torch.finfo(dtype).tiny
    err = (out.double() - ref.double()).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}, worst error/tol {(err / tol).max().item():.3g}"
    if track:
        torch.testing.assert_close(rate, ref_rate, rtol=(1e-5 if dtype == torch.float32 else 2.5e-7), atol=0)
    else:
        assert torch.equal(rate, torch.zeros_like(rate)) and torch.equal(ref_rate, rate)


@pytest.mark.parametrize("noise", [False, True], ids=["ode", "noise"])
@pytest.mark.parametrize("n", [1, 2, 4, 5, 6])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (7, 1023), (1, 257), (3, 4099), (7, 3, 5, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_bounded_by_torch(dtype, shape, n, noise, poisoned):
    """fp16/bf16: the kernel's error against float64 is at most 2x the reference's own error in that dtype."""
    gen = torch.Generator().manual_seed(_seed(dtype, shape, n, noise))
    xs = _inputs(shape, dtype, n, gen)
    kw = _kwargs(n, True, noise)
    out, rate = fs.fused_step(xs, COEFFS[:n], out=poisoned(xs[0]), **kw)
    ref, ref_rate = _reference.fused_step_reference(xs, COEFFS[:n], **kw)
    truth, truth_rate = _reference.fused_step_reference([x.double() for x in xs], COEFFS[:n], **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    kernel_err = (out.double() - truth).abs().max().item()
    torch_err = (ref.double() - truth).abs().max().item()
    floor = 8 * EPS32 * truth.abs().max().item()    # rounding ties flipped by a 1-ulp difference in z
    if dtype == torch.bfloat16 and INTERPRETED:
        # The Triton interpreter casts float32 -> bfloat16 by truncation (triton/runtime/interpreter.py,
        # cast_impl -> _convert_float with no rounding mode); compiled Triton rounds to nearest even
        # (LLVM fptrunc). So the interpreter can be off by one bf16 ulp where torch is off by half.
        floor += torch.finfo(dtype).eps * truth.abs().max().item()
    assert kernel_err <= 2 * torch_err + floor, (kernel_err, torch_err)
    # the rate is computed in float32 from the same stored inputs by both
    torch.testing.assert_close(rate, ref_rate, rtol=1e-5, atol=0)
    assert (rate.double() - truth_rate.double()).abs().max() <= 2 * (ref_rate.double() - truth_rate.double()).abs().max() + 1e-5 * truth_rate.abs().max()


def test_noise_is_the_philox_stream():
    """noise=1 on a zero input gives _reference.philox_normal within a few float32 ulp, at extreme keys."""
    for seed, step, offset, shape in [(0, 0, 0, (3, 1001)), (2**64 - 1, 2**32 - 1, 2**32 - 5, (5, 13)),
                                      (2**63 + 17, 2**31, 2**31 - 1, (2, 4, 6))]:
        x = torch.zeros(shape, device=DEVICE)
        out, rate = fs.fused_step([x], [0.0], noise=1.0, seed=seed, step=step, sample_offset=offset,
                                  out=torch.full_like(x, float("nan")))
        b = shape[0]
        z = _reference.philox_normal(b, x.numel() // b, seed=seed, step=step, sample_offset=offset,
                                     device=x.device).reshape(shape)
        err = (out - z).abs()
        assert (err <= 4 * EPS32 * z.abs().clamp_min(1.0)).all(), (seed, step, offset, err.max().item())
        assert torch.equal(rate, torch.zeros(b, device=DEVICE))
    # and it is noise: moments of 4*1001*3 draws
    x = torch.zeros(3, 4001, device=DEVICE)
    out, _ = fs.fused_step([x], [0.0], noise=1.0, seed=5, step=0, sample_offset=0)
    assert abs(out.mean().item()) < 0.05 and abs(out.std().item() - 1) < 0.05


def test_sample_noise_independent_of_batch():
    """A sample's noise is the same alone (sample_offset=b) and in a batch of 7."""
    x7 = torch.zeros(7, 3, 11, device=DEVICE)
    big, _ = fs.fused_step([x7], [0.0], noise=1.0, seed=99, step=4, sample_offset=0)
    for b in range(7):
        one, _ = fs.fused_step([x7[b:b + 1].clone()], [0.0], noise=1.0, seed=99, step=4, sample_offset=b)
        assert torch.equal(one[0], big[b])
    other_step, _ = fs.fused_step([x7], [0.0], noise=1.0, seed=99, step=5, sample_offset=0)
    other_seed, _ = fs.fused_step([x7], [0.0], noise=1.0, seed=98, step=4, sample_offset=0)
    assert not torch.equal(other_step, big) and not torch.equal(other_seed, big)
    assert not torch.equal(big[0], big[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n,k", [(3, 0), (3, 1), (3, 2), (6, 4), (6, 5)])
def test_in_place_out_aliasing_an_input(dtype, n, k):
    gen = torch.Generator().manual_seed(k)
    xs = _inputs((7, 2, 257), dtype, n, gen)
    kw = _kwargs(n, True, True)
    ref, ref_rate = _reference.fused_step_reference([x.clone() for x in xs], COEFFS[:n], **kw)
    target = xs[k]
    out, rate = fs.fused_step(xs, COEFFS[:n], out=target, **kw)
    assert out.data_ptr() == target.data_ptr()
    noisy = kw["noise"] * _noise_like(xs[0], kw).abs().clamp_min(1.0).reshape(ref.shape)
    tol = 4 * torch.finfo(dtype).eps * (ref.double().abs() + 1) + 4 * EPS32 * noisy
    assert ((out.double() - ref.double()).abs() <= tol).all()
    torch.testing.assert_close(rate, ref_rate, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf * 0 in the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("which", [0, 1])
def test_non_finite_input_poisons_exactly_its_sample(bad, track, which):
    xs = _inputs((7, 3, 257), torch.float32, 2, torch.Generator().manual_seed(3))
    xs[which][4, 1, 200] = bad
    out, rate = fs.fused_step(xs, [0.5, -0.5], track=track, alpha=1.0, beta=0.5, u=0, d=1,
                              noise=0.3, seed=1, step=2)
    ref, ref_rate = _reference.fused_step_reference(xs, [0.5, -0.5], track=track, alpha=1.0, beta=0.5,
                                                    u=0, d=1, noise=0.3, seed=1, step=2)
    assert torch.isnan(rate[4]) and torch.isnan(ref_rate[4])
    others = torch.arange(7) != 4
    assert torch.isfinite(rate[others]).all()
    assert torch.isfinite(out[others]).all() and not torch.isfinite(out[4]).all()


def test_rate_is_deterministic_and_multi_block():
    """Several blocks per sample: bitwise-identical rates on repeated runs, equal to the float64 sum."""
    xs = _inputs((3, 5000), torch.float32, 2, torch.Generator().manual_seed(11))
    assert triton.cdiv(5000, fs._block_size(5000)[0]) > 1
    runs = [fs.fused_step(xs, [1.0, 1.0], track=True, alpha=0.5, beta=2.0, u=0, d=1)[1] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    exact = ((0.5 * xs[0].double() + 2.0 * xs[1].double()) ** 2).sum(dim=1)
    torch.testing.assert_close(runs[0].double(), exact, rtol=1e-5, atol=0)


def test_float64_coefficients_are_not_rounded_to_float32():
    x = torch.ones(2, 5, dtype=torch.float64, device=DEVICE)
    c = 1.0 + 2.0 ** -40                          # not representable in float32
    out, rate = fs.fused_step([x], [c], track=True, alpha=c, beta=0.0, u=0, d=0)
    assert torch.equal(out, torch.full_like(x, c))
    assert rate.dtype == torch.float32


def test_batches_beyond_the_grid_limit_launch_in_chunks(monkeypatch):
    monkeypatch.setattr(fs, "_MAX_GRID_Y", 3)
    xs = _inputs((7, 2, 9), torch.float32, 2, torch.Generator().manual_seed(5))
    kw = _kwargs(2, True, True)
    out, rate = fs.fused_step(xs, COEFFS[:2], out=torch.full_like(xs[0], float("nan")), **kw)
    monkeypatch.setattr(fs, "_MAX_GRID_Y", 65535)
    whole, whole_rate = fs.fused_step(xs, COEFFS[:2], **kw)
    assert torch.equal(out, whole) and torch.equal(rate, whole_rate)


def test_launcher_signature_matches_reference():
    ours = inspect.signature(fs.fused_step).parameters
    ref = inspect.signature(_reference.fused_step_reference).parameters
    assert list(ours) == list(ref)
    for name, p in ref.items():
        assert ours[name].kind == p.kind and ours[name].default == p.default, name


def test_block_size_helper():
    for numel in [1, 7, 16, 257, 1023, 1024, 1025, 10**6]:
        block, warps = fs._block_size(numel)
        assert block & (block - 1) == 0 and 16 <= block <= 1024 and warps in (1, 2, 4, 8)
        assert block >= min(numel, 1024)
    assert fs._TWO_POW_M23.value == 2.0 ** -23 and math.isclose(fs._TWO_PI.value, 2 * math.pi)


def test_kernel_globals_are_constexpr():
    """Compiled Triton refuses a kernel that reads a plain Python global (a float constant, say) while the
    interpreter accepts it, so CPU-only runs would never see the error: check every global name the
    kernels read is a constexpr, a jit function or a module."""
    import types

    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under the interpreter

    kernels = [v for v in vars(fs).values() if isinstance(v, KernelInterface) and v.fn.__module__ == fs.__name__]
    assert kernels, "no jit functions found in kernels/fused_step.py"
    for kernel in kernels:
        for name in kernel.fn.__code__.co_names:
            if name not in kernel.fn.__globals__:
                continue                                  # attribute or builtin, not a module global
            value = kernel.fn.__globals__[name]
            assert isinstance(value, (triton.language.constexpr, KernelInterface, types.ModuleType)), (
                f"{kernel.fn.__name__} reads global {name!r} = {value!r}: make it tl.constexpr")


# ---- issue 37, item 1: bound launchers, plans and reused buffers --------------------------------------------

class _RecordingBound:
    """Stands in for a compiled kernel's launcher: takes the positional arguments a bound launch passes
    (every kernel parameter in signature order, constexprs included) and runs the kernel with them by name,
    so an argument in the wrong place shows as a wrong result."""

    def __init__(self, jit, options):
        self.jit, self.options, self.calls = jit, options, 0

    def __call__(self, g0, g1, stream, args):
        names = self.jit.arg_names
        assert len(args) == len(names), (len(args), names)
        self.calls += 1
        self.jit[(g0, g1)](**dict(zip(names, args)), **{k: v for k, v in self.options.items() if k == "num_warps"})


@pytest.fixture
def bound_launches(monkeypatch):
    """The compiled path's logic on CPU: the first launch of a plan goes through the kernel (interpreted),
    later ones through the recorded bound launcher."""
    compiled = []

    def compile_(jit, grid, args, options):
        jit[grid](*args, **options)
        compiled.append(_RecordingBound(jit, options))
        return compiled[-1]
    monkeypatch.setattr(fs, "_compile", compile_)
    monkeypatch.setattr(fs, "_INTERPRETED", False)
    monkeypatch.setattr(fs, "_PLANS", {})
    return compiled


@pytest.mark.parametrize("numel,n,noise,track", [(37, 2, 0.0, True), (5000, 3, 0.7, True), (1500, 6, 0.0, False),
                                                 (9, 1, 1.3, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_launches_match_the_first_launch(bound_launches, numel, n, noise, track, dtype):
    """A plan compiles once (the step, and the fixed-order sum when a sample spans several blocks); later
    steps of any coefficients, seed, step and offset go through the bound launcher with the same results
    as a launch through Triton's own launcher."""
    gen = torch.Generator().manual_seed(numel + n)
    kw = dict(noise=noise, track=track, alpha=0.3, beta=-1.1, u=0, d=n - 1)
    expected = []
    for step in range(3):
        xs = _inputs((3, numel), dtype, n, gen)
        coeffs = [float(c) for c in torch.randn(n, generator=gen)]
        args = dict(kw, seed=2 ** 64 - 1 - step, step=step, sample_offset=5 * step)
        expected.append(_reference.fused_step_reference(xs, coeffs, **args))
        got = fs.fused_step(xs, coeffs, **args)
        with_interpreter = fs.launch(ops.contract.check(ops.StepArgs(xs, coeffs, **args)))   # bound again
        assert torch.equal(got[0], with_interpreter[0]) and torch.equal(got[1], with_interpreter[1])
        # (the noise is float32 Philox normals within a few ulp of the oracle's: a float32 tolerance)
        torch.testing.assert_close(got[0], expected[-1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], expected[-1][1], rtol=1e-5, atol=1e-6)
    multi_block = triton.cdiv(numel, fs._block_size(numel)[0]) > 1
    assert len(bound_launches) == (2 if multi_block else 1)               # compiled once per plan
    assert bound_launches[0].calls == 2 * 3 - 1                           # every later launch bound


def test_bound_launches_are_bit_identical_to_triton_launches(bound_launches, monkeypatch):
    xs = _inputs((4, 3000), torch.float32, 3, torch.Generator().manual_seed(2))
    kw = _kwargs(3, True, True)
    fs.fused_step(xs, COEFFS[:3], **kw)                                   # compiles the plan
    bound = fs.fused_step(xs, COEFFS[:3], **kw)
    monkeypatch.setattr(fs, "_PLANS", {})
    monkeypatch.setattr(fs, "_INTERPRETED", True)                         # Triton's launcher every time
    plain = fs.fused_step(xs, COEFFS[:3], **kw)
    assert torch.equal(bound[0], plain[0]) and torch.equal(bound[1], plain[1])


def test_a_misaligned_launch_takes_tritons_launcher(bound_launches):
    """Triton specialises a compiled kernel on 16-byte pointer alignment: a view off that alignment must not
    reuse the plan's kernel."""
    base = torch.randn(4 * 40 + 1, generator=torch.Generator().manual_seed(3))
    aligned, shifted = base[:160].view(4, 40), base[1:161].view(4, 40)
    assert shifted.data_ptr() % 16
    fs.fused_step([aligned], [2.0])
    fs.fused_step([shifted], [2.0])
    assert len(bound_launches) == 2 and bound_launches[0].calls == 0      # recompiled, plan kept its kernel
    out, _ = fs.fused_step([shifted], [2.0])
    assert torch.equal(out, 2.0 * shifted) and bound_launches[0].calls == 0
    fs.fused_step([aligned], [2.0])
    assert bound_launches[0].calls == 1


def test_partial_sums_reuse_one_buffer_per_stream_and_thread(bound_launches):
    xs = _inputs((2, 3000), torch.float32, 2, torch.Generator().manual_seed(4))
    fs.fused_step(xs, COEFFS[:2], track=True, alpha=1.0, beta=1.0)
    (plan,) = fs._PLANS.values()
    (buf,) = plan.partials.values()
    fs.fused_step(xs, COEFFS[:2], track=True, alpha=1.0, beta=1.0)
    assert list(plan.partials.values()) == [buf]
    import threading
    worker = threading.Thread(target=lambda: fs.fused_step(xs, COEFFS[:2], track=True, alpha=1.0, beta=1.0))
    worker.start()
    worker.join()
    assert len(plan.partials) == 2
