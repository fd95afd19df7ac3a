"""The fused solver step in plain PyTorch: the oracle every backend is tested against.

The op (docs/design.md, "The one op"):

    out     = sum_k coeffs[k] * inputs[k] + noise * z
    rate[b] = sum_e (alpha * inputs[u][b, e] + beta * inputs[d][b, e]) ** 2     if track
            = sum_e 0 * out[b, e]                (0, or NaN where out[b] is non-finite)  otherwise

`rate` always propagates non-finite values, so the sampler can detect a NaN/Inf in the model output or
the state from it at no extra memory traffic. The check reads out as stored, in the storage dtype: an
fp16/bf16 result that is finite in the float32 arithmetic but overflows to inf on the store makes the
rate NaN too (on the tracked rate as well: it is sum (nu^2 + 0 * out)).

The reduction order is fixed by the element index alone (fixed_order_sum): rate bits do not depend on
the thread count or on the other samples of the batch, on any backend.

z is a standard normal stream, keyed by (seed, global sample index, step, element):

    counter = (e >> 2, sample_offset + b, step, 0),  key = (seed & 0xffffffff, seed >> 32)
    r0, r1, r2, r3 = Philox4x32-10(counter, key)            (triton.language.random.philox_impl)
    a, c = (r0, r1) if (e & 3) < 2 else (r2, r3)
    u1 = ((a >> 9) + 0.5) * 2**-23    in (0, 1), exact in float32, so log(u1) is finite
    u2 = (c >> 9) * 2**-23            in [0, 1)
    z  = sqrt(-2 log u1) * (cos(2 pi u2) if e is even else sin(2 pi u2))    (Box-Muller, float32)

The integer part is bit-exact on every backend; only log/sqrt/cos/sin round differently (a few ulp).
"""
from __future__ import annotations

import math

import torch

from .contract import StepArgs, keyword_entry

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10


def _mulhilo(a: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * const for uint32 values held in int64, without int64 overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    t = a_lo * const                       # < 2**48
    u = a_hi * const + (t >> 16)           # < 2**49; a * const = u * 2**16 + (t & 0xffff)
    return u >> 16, ((u & 0xFFFF) << 16) | (t & 0xFFFF)


def philox4x32(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 on int64 tensors holding uint32 values; same rounds and constants as Triton."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_normal(batch: int, numel: int, *, seed: int, step: int, sample_offset: int = 0,
                  device=None) -> torch.Tensor:
    """Standard normal noise [batch, numel] (float32) from the thermosample Philox stream."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    e = torch.arange(numel, device=device, dtype=torch.int64)
    g = torch.arange(batch, device=device, dtype=torch.int64) + sample_offset
    quads = (numel + 3) // 4
    c0 = torch.arange(quads, device=device, dtype=torch.int64).expand(batch, quads)
    c1 = (g & MASK32)[:, None].expand(batch, quads)
    c2 = torch.full_like(c0, step & MASK32)
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, torch.zeros_like(c0), seed & 0xFFFFFFFFFFFFFFFF)
    a = torch.stack([r0, r0, r2, r2], dim=-1).reshape(batch, quads * 4)[:, :numel]
    c = torch.stack([r1, r1, r3, r3], dim=-1).reshape(batch, quads * 4)[:, :numel]
    u1 = ((a >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)
    u2 = (c >> 9).to(torch.float32) * (2.0 ** -23)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * math.tau
    even = (e & 1) == 0
    return torch.where(even, radius * torch.cos(theta), radius * torch.sin(theta))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a storage dtype: float64 stays, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def launch(a: StepArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused solver step in eager PyTorch (see the module docstring), for arguments contract.check passed.

    Returns:
        (out [B, ...] in the inputs' dtype, rate [B] float32), written into a.out and a.rate when given.
    """
    x0 = a.inputs[0]
    ct = compute_dtype(x0.dtype)
    batch = x0.shape[0]
    flat = [t.reshape(batch, -1).to(ct) for t in a.inputs]
    acc = torch.zeros_like(flat[0])
    for c, t in zip(a.coeffs, flat):
        acc = acc + c * t
    if a.noise != 0.0:
        z = philox_normal(batch, flat[0].shape[1], seed=a.seed, step=a.step, sample_offset=a.sample_offset,
                          device=x0.device)
        acc = acc + a.noise * z.to(ct)
    stored = acc.to(x0.dtype)                       # out as stored (fp16/bf16 may overflow to inf here)
    probe = stored.to(ct) * 0                       # 0, or NaN where the stored out is non-finite
    if a.track:
        probe = (a.alpha * flat[a.u] + a.beta * flat[a.d]) ** 2 + probe
    sums = fixed_order_sum(probe).to(torch.float32)
    result = stored.reshape(x0.shape)
    out = result if a.out is None else a.out.copy_(result)
    if a.rate is None:
        return out, sums
    return out, a.rate.copy_(sums)


fused_step_reference = keyword_entry(launch)   # fused_step_reference(inputs, coeffs, **StepArgs fields)


RATE_CHUNK = 256     # elements per chunk partial of the rate (csrc/fused_step.cpp: kPart)


def fixed_order_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums of a [B, N] tensor in an order fixed by N alone: the same bits whatever the thread count,
    the other rows of the batch or the device's reduction strategy (issue 13, item 7).

    Each row is cut into chunks of RATE_CHUNK elements (the last one padded with +0); a chunk is summed
    by a halving tree in x's dtype (r[i] += r[i + h], h = RATE_CHUNK/2 ... 1, as the C++ kernel does);
    the chunk partials go to float64 and are summed by a pairwise halving tree (an odd count padded with
    +0). Only element-wise adds are used, never torch's .sum(), whose split over threads varies.
    Returns float64 [B] (x float64 or float32/16) with -0.0 normalised to +0.0.
    """
    batch, n = x.shape
    pad = (-n) % RATE_CHUNK if n else RATE_CHUNK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(batch, -1, RATE_CHUNK)
    width = RATE_CHUNK
    while width > 1:
        width //= 2
        x = x[..., :width] + x[..., width:]
    parts = x[..., 0].to(torch.float64)
    while parts.shape[1] > 1:
        if parts.shape[1] % 2:
            parts = torch.nn.functional.pad(parts, (0, 1))
        half = parts.shape[1] // 2
        parts = parts[:, :half] + parts[:, half:]
    return parts[:, 0] + 0.0
