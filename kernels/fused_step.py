"""The fused solver step in Triton: one pass over memory per step (docs/design.md, "The one op").

    out     = sum_k c_k * in_k + noise * z           z: in-kernel Philox normal noise
    rate[b] = sum_e (alpha * in_u[b, e] + beta * in_d[b, e]) ** 2 + sum_e 0 * out[b, e]

The contract of thermosample/ops/reference.py; `launch` takes a StepArgs (thermosample/ops/contract.py)
that was checked there. The grid is (blocks per sample, samples), as in the Triton tutorial 01-vector-add:
each program writes BLOCK elements of one sample's `out` and one partial rate into a [B, n_blocks] buffer,
which a second kernel sums per sample in a fixed order (float64): no float atomics, no torch .sum whose
strategy depends on the shape, so the rate is deterministic and independent of the batch. Coefficients
travel as the int64 bit patterns of the Python floats and are bitcast in the kernel: Triton would type a
float argument fp32, rounding a float64 step's coefficients (every other dtype rounds them to fp32 as
torch does for a Python scalar times a float32 tensor).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from triton.language.random import philox

from thermosample.ops.contract import MAX_INPUTS, StepArgs, keyword_entry

# _fused_step_kernel and _pick spell out one pointer and one coefficient slot per input: x0..x5, c0..c5.
assert MAX_INPUTS == 6, "give _fused_step_kernel and _pick one slot per input"

_MAX_GRID_Y = 65535          # CUDA limit on grid dimension 1: larger batches launch in chunks
# Globals a kernel reads must be constexpr: compiled Triton rejects plain Python floats (the interpreter
# accepts them, so tests/test_triton_backend.py checks this on CPU too).
_TWO_PI = tl.constexpr(6.283185307179586)
_TWO_POW_M23 = tl.constexpr(1.1920928955078125e-07)  # 2**-23


@triton.jit
def _coeff(bits, COMPUTE_DTYPE: tl.constexpr):
    # int64 bit pattern of a float64 -> the coefficient in the compute dtype (round to nearest).
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE_DTYPE)


@triton.jit
def _pick(K: tl.constexpr, x0, x1, x2, x3, x4, x5):
    # inputs[K] for a compile-time K (the solver names which inputs hold x_hat and D)
    if K == 1:
        return x1
    if K == 2:
        return x2
    if K == 3:
        return x3
    if K == 4:
        return x4
    if K == 5:
        return x5
    return x0


@triton.jit
def _box_muller(a, c):
    # two uint32 Philox words -> two standard normals (radius * cos, radius * sin), as philox_normal in
    # thermosample/ops/reference.py
    u1 = ((a >> 9).to(tl.float32) + 0.5) * _TWO_POW_M23   # in (0, 1): log(u1) is finite
    u2 = (c >> 9).to(tl.float32) * _TWO_POW_M23           # in [0, 1)
    radius = tl.sqrt_rn(-2.0 * tl.log(u1))
    theta = u2 * _TWO_PI
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit(do_not_specialize=["c0", "c1", "c2", "c3", "c4", "c5", "noise", "alpha", "beta", "seed", "step",
                               "sample_offset"])
def _fused_step_kernel(x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, x5_ptr, out_ptr, partial_ptr,
                       c0, c1, c2, c3, c4, c5, noise, alpha, beta,
                       seed, step, sample_offset, numel, n_blocks,
                       N_INPUTS: tl.constexpr, HAS_NOISE: tl.constexpr, TRACK: tl.constexpr,
                       U: tl.constexpr, D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)          # block within the sample
    pid_b = tl.program_id(1).to(tl.int64)          # sample within this launch
    e = pid_n * BLOCK + tl.arange(0, BLOCK)        # element index within the sample (int64)
    mask = e < numel
    offs = pid_b * numel + e

    # out = sum_k c_k in_k  (fp16/bf16/fp32 computed in fp32, fp64 in fp64)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    acc = _coeff(c0, COMPUTE_DTYPE) * x0
    x1 = x0
    x2 = x0
    x3 = x0
    x4 = x0
    x5 = x0
    if N_INPUTS > 1:
        x1 = tl.load(x1_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        acc += _coeff(c1, COMPUTE_DTYPE) * x1
    if N_INPUTS > 2:
        x2 = tl.load(x2_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        acc += _coeff(c2, COMPUTE_DTYPE) * x2
    if N_INPUTS > 3:
        x3 = tl.load(x3_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        acc += _coeff(c3, COMPUTE_DTYPE) * x3
    if N_INPUTS > 4:
        x4 = tl.load(x4_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        acc += _coeff(c4, COMPUTE_DTYPE) * x4
    if N_INPUTS > 5:
        x5 = tl.load(x5_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        acc += _coeff(c5, COMPUTE_DTYPE) * x5

    # + noise * z, z from Philox4x32-10 with counter (e >> 2, sample_offset + b, step, 0), key = seed.
    # One Philox call yields the normals of 4 consecutive elements (two Box-Muller pairs), so the block
    # runs BLOCK / 4 calls and interleaves z0 z1 z2 z3 back into element order (BLOCK is a multiple of 4).
    if HAS_NOISE:
        ctr0 = (pid_n * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        zero = ctr0 * 0
        ctr1 = zero + (sample_offset.to(tl.int64) + pid_b).to(tl.uint32)
        ctr2 = zero + step.to(tl.int64).to(tl.uint32)
        r0, r1, r2, r3 = philox(seed, ctr0, ctr1, ctr2, zero)
        z0, z1 = _box_muller(r0, r1)
        z2, z3 = _box_muller(r2, r3)
        z = tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [BLOCK])   # [i, pair, cos|sin] -> 4i + ...
        acc += _coeff(noise, COMPUTE_DTYPE) * z.to(COMPUTE_DTYPE)

    stored = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, stored, mask=mask)

    # partial rate: squared velocity (docs/theory.md §2) plus 0 * out as stored, so a non-finite out
    # poisons the rate (an fp16/bf16 value that overflows to inf on the store included)
    probe = stored.to(COMPUTE_DTYPE) * 0.0
    if TRACK:
        v = (_coeff(alpha, COMPUTE_DTYPE) * _pick(U, x0, x1, x2, x3, x4, x5)
             + _coeff(beta, COMPUTE_DTYPE) * _pick(D, x0, x1, x2, x3, x4, x5))
        probe += v * v
    probe = tl.where(mask, probe, 0.0)
    tl.store(partial_ptr + pid_b * n_blocks + pid_n, tl.sum(probe, axis=0))


@triton.jit
def _sum_partials_kernel(partial_ptr, rate_ptr, n_blocks, PBLOCK: tl.constexpr):
    # rate[b] = sum of the n_blocks partials of sample b, in float64, in an order fixed by n_blocks alone:
    # lane j adds partials j, j + PBLOCK, ... in turn, then one tl.sum tree over the PBLOCK lanes. No
    # atomics and no dependence on the batch (torch's .sum picks its strategy from the output count).
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, PBLOCK)
    acc = tl.zeros([PBLOCK], dtype=tl.float64)
    for start in range(0, n_blocks, PBLOCK):
        i = start + lanes
        acc += tl.load(partial_ptr + b * n_blocks + i, mask=i < n_blocks, other=0.0).to(tl.float64)
    tl.store(rate_ptr + b, (tl.sum(acc, axis=0) + 0.0).to(tl.float32))


_PBLOCK = 128                # lanes of _sum_partials_kernel


def _block_size(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a per-sample size: whole sample in one block up to 1024, else 1024-wide."""
    block = min(max(triton.next_power_of_2(numel), 16), 1024)
    return block, (4 if block >= 512 else 1)


def _bits(value: float) -> int:
    """The IEEE float64 bit pattern of `value` as a signed int64 (the kernel bitcasts it back)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def launch(a: StepArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused step in Triton for arguments thermosample.ops.contract.check passed (contiguous inputs of
    one shape, dtype and device). Returns (out [B, ...] in the inputs' dtype, rate [B] float32)."""
    x0 = a.inputs[0]
    batch = x0.shape[0]
    numel = x0.numel() // batch
    out = torch.empty_like(x0) if a.out is None else a.out      # x0 is contiguous: out too
    compute = tl.float64 if x0.dtype == torch.float64 else tl.float32
    block, num_warps = _block_size(numel)
    n_blocks = triton.cdiv(numel, block)
    partial = torch.empty((batch, n_blocks), dtype=torch.float64 if x0.dtype == torch.float64 else torch.float32,
                          device=x0.device)
    # The kernel indexes flat contiguous memory, so the tensors go in as they are (no reshape): the
    # launch costs host time that small states (a latent of a few hundred KB) are bound by.
    ptrs = list(a.inputs) + [x0] * (MAX_INPUTS - len(a.inputs))     # unused pointers: never loaded
    c = [_bits(v) for v in a.coeffs] + [0] * (MAX_INPUTS - len(a.coeffs))
    for b0 in range(0, batch, _MAX_GRID_Y):
        b1 = min(batch, b0 + _MAX_GRID_Y)
        chunk = (lambda t: t) if batch <= _MAX_GRID_Y else (lambda t, b0=b0, b1=b1: t[b0:b1])
        _fused_step_kernel[(n_blocks, b1 - b0)](
            *(chunk(t) for t in ptrs), chunk(out), chunk(partial),
            *c, _bits(a.noise), _bits(a.alpha), _bits(a.beta),
            a.seed, a.step, a.sample_offset + b0, numel, n_blocks,
            N_INPUTS=len(a.inputs), HAS_NOISE=a.noise != 0.0, TRACK=a.track,
            U=a.u if a.track else 0, D=a.d if a.track else 0,
            COMPUTE_DTYPE=compute, BLOCK=block, num_warps=num_warps,
        )
    if n_blocks == 1:                                   # one block per sample: its partial is the rate
        if a.rate is None:
            return out, partial.view(batch).to(torch.float32)
        return out, a.rate.copy_(partial.view(batch))
    rate = torch.empty(batch, dtype=torch.float32, device=x0.device) if a.rate is None else a.rate
    _sum_partials_kernel[(batch,)](partial, rate, n_blocks, PBLOCK=_PBLOCK, num_warps=1)
    return out, rate                                    # fixed-order sum over blocks: deterministic


fused_step = keyword_entry(launch)   # fused_step(inputs, coeffs, **StepArgs fields), checked
