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

import os
import struct
import threading

import torch
import triton
import triton.language as tl
from triton import knobs
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
                               "sample_offset", "partial_offset"])
def _fused_step_kernel(x0_ptr, x1_ptr, x2_ptr, x3_ptr, x4_ptr, x5_ptr, out_ptr, partial_ptr,
                       c0: tl.int64, c1: tl.int64, c2: tl.int64, c3: tl.int64, c4: tl.int64, c5: tl.int64,
                       noise: tl.int64, alpha: tl.int64, beta: tl.int64,
                       seed: tl.uint64, step: tl.int64, sample_offset: tl.int64, partial_offset: tl.int64, numel,
                       n_blocks,
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
    # poisons the rate (an fp16/bf16 value that overflows to inf on the store included). With one block per
    # sample partial_ptr is the float32 rate itself: the store rounds a float64 sum to it, as .to() did.
    probe = stored.to(COMPUTE_DTYPE) * 0.0
    if TRACK:
        v = (_coeff(alpha, COMPUTE_DTYPE) * _pick(U, x0, x1, x2, x3, x4, x5)
             + _coeff(beta, COMPUTE_DTYPE) * _pick(D, x0, x1, x2, x3, x4, x5))
        probe += v * v
    probe = tl.where(mask, probe, 0.0)
    # partial_offset: the element where this launch's [B, n_blocks] partials start (a run's row of its rates)
    tl.store(partial_ptr + partial_offset + pid_b * n_blocks + pid_n,
             tl.sum(probe, axis=0).to(partial_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["partial_offset", "rate_offset"])
def _sum_partials_kernel(partial_ptr, rate_ptr, partial_offset: tl.int64, rate_offset: tl.int64, n_blocks,
                         PBLOCK: tl.constexpr):
    # rate[b] = sum of the n_blocks partials of sample b, in float64, in an order fixed by n_blocks alone:
    # lane j adds partials j, j + PBLOCK, ... in turn, then one tl.sum tree over the PBLOCK lanes. No
    # atomics and no dependence on the batch (torch's .sum picks its strategy from the output count).
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, PBLOCK)
    acc = tl.zeros([PBLOCK], dtype=tl.float64)
    for start in range(0, n_blocks, PBLOCK):
        i = start + lanes
        acc += tl.load(partial_ptr + partial_offset + b * n_blocks + i, mask=i < n_blocks, other=0.0).to(tl.float64)
    tl.store(rate_ptr + rate_offset + b, (tl.sum(acc, axis=0) + 0.0).to(tl.float32))


_PBLOCK = 128                # lanes of _sum_partials_kernel
_MAX_PLANS = 64              # launch plans kept (one per shape, dtype, device and constexpr set)


def _block_size(numel: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a per-sample size: whole sample in one block up to 1024, else 1024-wide."""
    block = min(max(triton.next_power_of_2(numel), 16), 1024)
    return block, (4 if block >= 512 else 1)


_DOUBLES = [struct.Struct(f"<{n}d") for n in range(MAX_INPUTS + 4)]
_INT64S = [struct.Struct(f"<{n}q") for n in range(MAX_INPUTS + 4)]


def _bits(*values: float) -> tuple[int, ...]:
    """The IEEE float64 bit patterns of `values` as signed int64s (the kernel bitcasts them back)."""
    n = len(values)
    return _INT64S[n].unpack(_DOUBLES[n].pack(*values))


# -- the device launch ---------------------------------------------------------------------------------
# A launch through `kernel[grid](...)` runs Triton's Python launcher every time: it binds ~30 arguments,
# builds the specialisation key, looks the compiled kernel up, reads the device and stream. A plan does
# that once per (shape, dtype, device, constexpr set) and then calls the compiled kernel's launcher
# directly. The scalars whose values change per call are typed in the kernel's signature (tl.int64 /
# tl.uint64, never specialised), so Triton's key for a plan varies only with the pointers' 16-byte
# alignment, which `launch` tests (a misaligned call takes Triton's launcher). Under the interpreter
# (TRITON_INTERPRET=1) every launch goes through `kernel[grid]`, which runs it.

def _stream(index: int) -> int:
    """The current CUDA stream of device `index` as Triton's launcher takes it."""
    return torch._C._cuda_getCurrentRawStream(index)


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


class _Bound:
    """A compiled kernel, launched with Triton's own launcher function and no per-call Python binding."""

    __slots__ = ("kernel", "run", "function", "packed")

    def __init__(self, kernel):
        self.kernel, self.run, self.function, self.packed = kernel, kernel.run, kernel.function, kernel.packed_metadata

    def __call__(self, g0: int, g1: int, stream: int, args: tuple) -> None:
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        # a profiler's hook (an empty HookChain has no calls) gets the metadata Triton's launcher would pass
        meta = self.kernel.launch_metadata((g0, g1, 1), stream, *args) if getattr(enter, "calls", enter) else None
        self.run(g0, g1, 1, stream, self.function, self.packed, meta, enter, leave, *args)


def _compile(jit, grid: tuple, args: tuple, options: dict):
    """Launch `jit` once through Triton's launcher (compiling it if needed) and return a _Bound of the
    compiled kernel, or None under the interpreter (which returns no compiled kernel)."""
    kernel = jit[grid](*args, **options)
    return _Bound(kernel) if hasattr(kernel, "packed_metadata") else None


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


class _Plan:
    """Everything about a launch that depends only on the shape, dtype, device and constexpr set: sizes,
    constexprs, the bound launchers (after their first launch) and the partial-sum buffers it reuses."""

    def __init__(self, x0: torch.Tensor, n_inputs: int, has_noise: bool, track: bool, u: int, d: int):
        self.batch = x0.shape[0]
        self.numel = x0.numel() // self.batch
        self.sizer = _block_size
        self.block, self.num_warps = _block_size(self.numel)
        self.n_blocks = triton.cdiv(self.numel, self.block)
        self.device = x0.device
        self.index = x0.device.index if x0.device.type == "cuda" else None
        self.partial_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        self.constexprs = dict(N_INPUTS=n_inputs, HAS_NOISE=has_noise, TRACK=track, U=u, D=d,
                               COMPUTE_DTYPE=tl.float64 if x0.dtype == torch.float64 else tl.float32,
                               BLOCK=self.block, num_warps=self.num_warps)
        # the constexprs in the kernel's signature order: the tail of the bound launcher's arguments
        self.tail = tuple(self.constexprs[name] for name in _fused_step_kernel.arg_names[-7:])
        self.pad = MAX_INPUTS - n_inputs
        self.zeros = (0.0,) * self.pad                # coefficients of the unused input slots
        self.step_kernel = self.sum_kernel = None     # _Bound, after the first aligned launch
        self.partials: dict[tuple, torch.Tensor] = {}   # (stream, thread) -> [B, n_blocks] (n_blocks > 1)

    def partial(self, stream: int) -> torch.Tensor:
        """The partial-sum buffer of `stream` and this thread: reused by each launch of theirs (the step
        writes it and the sum reads it before their next step is queued on that stream; another thread's
        launches could come in between, so each thread has its own). A launch being captured into a CUDA
        graph gets a buffer of its own from the graph's pool instead."""
        if self.index is not None and _capturing():
            return torch.empty((self.batch, self.n_blocks), dtype=self.partial_dtype, device=self.device)
        key = (stream, threading.get_ident())
        buf = self.partials.get(key)
        if buf is None:
            if len(self.partials) >= 16:
                self.partials.clear()
            buf = self.partials[key] = torch.empty((self.batch, self.n_blocks), dtype=self.partial_dtype,
                                                   device=self.device)
        return buf


_PLANS: dict[tuple, _Plan] = {}


def _plan(x0: torch.Tensor, n_inputs: int, has_noise: bool, track: bool, u: int, d: int) -> _Plan:
    key = (x0.shape, x0.dtype, x0.device, n_inputs, has_noise, track, u if track else 0, d if track else 0)
    plan = _PLANS.get(key)
    if plan is None or plan.sizer is not _block_size:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(x0, n_inputs, has_noise, track, key[6], key[7])
    return plan


def launch(a: StepArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused step in Triton for arguments thermosample.ops.contract.check passed (contiguous inputs of
    one shape, dtype and device). Returns (out [B, ...] in the inputs' dtype, rate [B] float32)."""
    x0 = a.inputs[0]
    plan = _plan(x0, len(a.inputs), a.noise != 0.0, a.track, a.u, a.d)
    out = torch.empty_like(x0) if a.out is None else a.out      # x0 is contiguous: out too
    rate = torch.empty(plan.batch, dtype=torch.float32, device=x0.device) if a.rate is None else a.rate
    _launch(plan, a.inputs, out, a.coeffs, a.noise, a.alpha, a.beta, a.seed, a.step, a.sample_offset, rate, 0)
    return out, rate


class RunSteps:
    """The fused steps of one run, for calls ops.CheckedStep accepted (its first call passed contract.check):
    each rate goes into row `row` of the run's [rows, B] float32 buffer through the kernels' offsets, so a
    step builds no StepArgs and no view of the buffer, and finds its plan among the run's few kinds of call
    (issue 37: host time per step).

    One launch per step: where a sample spans several blocks, a step outside CUDA-graph capture writes its
    partial sums into a slot of this object's store and their fixed-order sum is deferred to `flush`, which
    reduces every pending step in as few launches as runs of consecutive slots and rows allow, with the same
    kernel and so the same bits as a per-step sum. The run calls `flush` before it reads its rates or moves
    its buffer; each pending step keeps the buffer it writes to."""

    _SLOTS = 64                  # first size of a store; it doubles when full

    def __init__(self):
        self.plans: dict[tuple, _Plan] = {}
        self.stores: dict[_Plan, torch.Tensor] = {}          # plan -> [slots, B, n_blocks] partials
        self.pending: list[tuple[_Plan, int, torch.Tensor, int]] = []    # (plan, slot, rates, row)
        self.used: dict[_Plan, int] = {}                     # plan -> slots holding pending partials

    def __call__(self, inputs, coeffs, noise, seed, step, sample_offset, track, alpha, beta, u, d,
                 rates: torch.Tensor, row: int) -> torch.Tensor:
        x0 = inputs[0]
        kind = (len(inputs), noise != 0.0, track, u, d)
        plan = self.plans.get(kind)
        if plan is None:
            plan = self.plans[kind] = _plan(x0, *kind)
        out = torch.empty_like(x0)
        if plan.n_blocks == 1 or plan.batch > _MAX_GRID_Y or plan.index is not None and _capturing():
            _launch(plan, inputs, out, coeffs, noise, alpha, beta, seed, step, sample_offset, rates, row * plan.batch)
            return out
        slot = self.used.get(plan, 0)
        store = self._store(plan, slot)
        self.used[plan] = slot + 1
        self.pending.append((plan, slot, rates, row))
        _launch(plan, inputs, out, coeffs, noise, alpha, beta, seed, step, sample_offset, rates, row * plan.batch,
                deferred=(store, slot * plan.batch * plan.n_blocks))
        return out

    def _store(self, plan: _Plan, slot: int) -> torch.Tensor:
        store = self.stores.get(plan)
        if store is None or slot == store.shape[0]:
            grown = torch.empty((max(self._SLOTS, 2 * slot), plan.batch, plan.n_blocks), dtype=plan.partial_dtype,
                                device=plan.device)
            if slot:
                grown[:slot].copy_(store[:slot])
            store = self.stores[plan] = grown
        return store

    def flush(self) -> None:
        """Sum the partials of every pending step into its row (a launch per run of consecutive slots and rows
        of one plan and buffer); the slots are free again afterwards."""
        pending, self.pending = self.pending, []
        self.used.clear()
        k = 0
        while k < len(pending):
            plan, slot, rates, row = pending[k]
            n = 1
            while k + n < len(pending) and _follows(pending[k + n], plan, slot + n, rates, row + n):
                n += 1
            stream = _stream(plan.index) if plan.index is not None else 0
            _sum_partials(plan, self.stores[plan], slot * plan.batch * plan.n_blocks, rates, row * plan.batch,
                          n * plan.batch, stream)
            k += n


def _follows(entry: tuple, plan: _Plan, slot: int, rates: torch.Tensor, row: int) -> bool:
    """True when a pending step is (plan, slot, rates, row) (by identity: tensors compare elementwise)."""
    return entry[0] is plan and entry[1] == slot and entry[2] is rates and entry[3] == row


def _launch(plan: _Plan, inputs, out, coeffs, noise, alpha, beta, seed, step, sample_offset, rates: torch.Tensor,
            rate_offset: int, deferred: tuple[torch.Tensor, int] | None = None) -> None:
    """Queue the step, and the fixed-order sum of its partials when a sample spans several blocks; rate[b]
    lands at element rate_offset + b of `rates` (contiguous float32). `deferred` = (store, offset): the
    partials go there instead and nothing sums them yet (RunSteps.flush does)."""
    batch = plan.batch
    stream = _stream(plan.index) if plan.index is not None else 0
    # one block per sample: the kernel writes the rate itself (one launch); else partial sums, then a
    # fixed-order sum over them (deterministic, independent of the batch)
    if deferred is not None:
        partial, partial_offset = deferred
    elif plan.n_blocks == 1:
        partial, partial_offset = rates, rate_offset
    else:
        partial, partial_offset = plan.partial(stream), 0
    # The kernel indexes flat contiguous memory, so the tensors go in as they are (no reshape).
    ptrs = (*inputs, *((inputs[0],) * plan.pad), out, partial) if plan.pad else (*inputs, out, partial)
    scalars = _bits(*coeffs, *plan.zeros, noise, alpha, beta)
    if batch > _MAX_GRID_Y:
        _launch_chunked(plan, ptrs, scalars, seed, step, sample_offset, partial_offset)
    else:
        args = (*ptrs, *scalars, seed, step, sample_offset, partial_offset, plan.numel, plan.n_blocks)
        bound = plan.step_kernel
        aligned = _aligned(*inputs, out, partial)
        if bound is not None and aligned:
            bound(plan.n_blocks, batch, stream, (*args, *plan.tail))
        else:
            bound = _compile(_fused_step_kernel, (plan.n_blocks, batch), args, plan.constexprs)
            if aligned and not _INTERPRETED:
                plan.step_kernel = bound
    if plan.n_blocks > 1 and deferred is None:
        _sum_partials(plan, partial, 0, rates, rate_offset, batch, stream)


def _sum_partials(plan: _Plan, partial: torch.Tensor, partial_offset: int, rates: torch.Tensor, rate_offset: int,
                  samples: int, stream: int) -> None:
    """Queue the fixed-order sum of `samples` consecutive samples' partials (each n_blocks long, from element
    partial_offset of `partial`) into rates from element rate_offset (the partial buffers are torch's
    allocations: aligned)."""
    bound = plan.sum_kernel
    if bound is not None and _aligned(rates):
        bound(samples, 1, stream, (partial, rates, partial_offset, rate_offset, plan.n_blocks, _PBLOCK))
    else:
        bound = _compile(_sum_partials_kernel, (samples,), (partial, rates, partial_offset, rate_offset,
                                                            plan.n_blocks), dict(PBLOCK=_PBLOCK, num_warps=1))
        if _aligned(rates) and not _INTERPRETED:
            plan.sum_kernel = bound


def _aligned(*tensors) -> bool:
    """True when every pointer is 16-byte aligned (what Triton specialised the plan's kernels for)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return not bits & 15


def _launch_chunked(plan: _Plan, ptrs: tuple, scalars: tuple, seed, step, sample_offset, partial_offset) -> None:
    """Batches beyond CUDA's grid limit (dimension 1) launch in chunks of samples, through Triton's launcher
    (the partials' pointer stays whole: each chunk starts further into it)."""
    batch = plan.batch
    for b0 in range(0, batch, _MAX_GRID_Y):
        b1 = min(batch, b0 + _MAX_GRID_Y)
        _fused_step_kernel[(plan.n_blocks, b1 - b0)](
            *(t[b0:b1] for t in ptrs[:-1]), ptrs[-1], *scalars, seed, step, sample_offset + b0,
            partial_offset + b0 * plan.n_blocks, plan.numel, plan.n_blocks, **plan.constexprs)


fused_step = keyword_entry(launch)   # fused_step(inputs, coeffs, **StepArgs fields), checked
