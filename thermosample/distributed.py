"""Sampling on several processes with torch.distributed (launched by torchrun; gloo on CPU, nccl on GPU).

    torchrun --nproc_per_node=4 my_job.py        # in my_job.py:
    out = ts.distributed.sample(den, (50_000, 3, 32, 32), steps=20, seed=0)

The global sample indices 0..N-1 are split into contiguous ranges, one per rank; each rank runs
`ts.sample` on its range with `sample_offset` = the range's first index, so sample i is keyed by i in the
Philox stream whatever the number of ranks. The samples and the ThermoReport (rate [E, B] concatenated
along B) are then all-gathered in rank order: with a model that treats samples independently, the result
equals a single-process `ts.sample(den, (N, ...), seed=...)` bit for bit.

A failure on one rank does not hang the others: every rank exchanges a status before gathering, and all
ranks raise (NonFiniteError naming the globally first bad step and sample, or a RuntimeError naming the
rank that failed; the failing rank re-raises its own exception).
"""
from __future__ import annotations

import torch

from .errors import NonFiniteError
from .sampler import SampleOutput
from .sampler import sample as _sample
from .thermo import ThermoReport

__all__ = ["sample", "shard_range"]

_OK, _NONFINITE, _FAILED = 0, 1, 2


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous global index range [start, stop) of `rank` among `world_size` for n samples.

    Ranks below n % world_size take one extra sample, so the ranges are balanced and cover 0..n-1 in order.
    """
    for name, v in (("n", n), ("rank", rank), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if n < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need n >= 1, world_size >= 1 and 0 <= rank < world_size; got n={n}, "
                         f"rank={rank}, world_size={world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _gather_rows(t: torch.Tensor, counts: list[int], dim: int, group) -> torch.Tensor:
    """all_gather a tensor whose size along `dim` differs per rank (padded to the max, then trimmed)."""
    import torch.distributed as dist
    top = max(counts)
    pad = list(t.shape)
    pad[dim] = top - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad)], dim=dim).contiguous() if pad[dim] else t.contiguous()
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, counts)], dim=dim)


def sample(den, shape, *, sample_offset: int = 0, group=None, gather: bool = True, **kwargs) -> SampleOutput:
    """Sample N = shape[0] samples across the ranks of a torch.distributed process group.

    Args:
        den: a `Denoiser` (each rank holds its own copy, on its own device).
        shape: global [N, ...]; rank r samples the global indices `shard_range(N, r, world)` (offset by
            `sample_offset`), so the union is exactly the single-process run with the same seed.
        sample_offset: global index of sample 0 (to shard a job that is itself a slice of a larger one).
        group: process group (default: the world). torch.distributed must be initialised
            (`dist.init_process_group("gloo" | "nccl")`, as torchrun sets up).
        gather: all-gather the samples and the ThermoReport onto every rank (default). With False each rank
            returns only its own slice (its samples in global order from `shard_range`).
        **kwargs: everything `ts.sample` takes (steps, solver, grid, seed, backend, track, device, ...),
            except `noise=` (the initial noise is drawn from the seed).
    Returns:
        SampleOutput with samples [N, ...] (or the rank's slice), thermo with rate [E, N], sigmas, nfe of
        this rank. Raises NonFiniteError on every rank when any rank produced NaN/Inf.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ts.distributed.sample needs an initialised torch.distributed process group; "
                           "launch with torchrun and call torch.distributed.init_process_group first")
    if "noise" in kwargs:
        raise TypeError("ts.distributed.sample draws its initial noise from the seed; noise= is not supported")
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape or not isinstance(shape[0], int) or shape[0] < 1:
        raise ValueError(f"shape must be a tuple (N, ...) with N >= 1, got {shape!r}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = int(shape[0])
    counts = [b - a for a, b in (shard_range(n, r, world) if r < n else (0, 0) for r in range(world))]
    # A rank without samples (N < world) samples the last index again and discards it: every rank then has
    # tensors of the same layout to gather, and no rank asks for an index past the end (which may be past
    # the 32-bit counter range when sample_offset + N == 2**32).
    start = shard_range(n, rank, world)[0] if rank < n else n - 1
    local = max(counts[rank], 1)
    out, error = None, None
    try:
        out = _sample(den, (local, *shape[1:]), sample_offset=sample_offset + start, **kwargs)
    except Exception as exc:  # exchanged below so that no rank waits forever in all_gather
        error = exc
    dev = _status_device(group)
    if isinstance(error, NonFiniteError):
        status = torch.tensor([_NONFINITE, error.step if error.step is not None else -1,
                               error.sample if error.sample is not None else -1], dtype=torch.int64, device=dev)
    else:
        status = torch.tensor([_FAILED if error is not None else _OK, -1, -1], dtype=torch.int64, device=dev)
    statuses = [torch.empty_like(status) for _ in range(world)]
    dist.all_gather(statuses, status, group=group)
    statuses = [s.cpu().tolist() for s in statuses]
    failed = [r for r, s in enumerate(statuses) if s[0] == _FAILED]
    if error is not None and not isinstance(error, NonFiniteError):
        raise error
    if failed:
        raise RuntimeError(f"ts.distributed.sample failed on rank(s) {failed}; see their traceback")
    bad = sorted((s[1], s[2], r) for r, s in enumerate(statuses) if s[0] == _NONFINITE)
    if bad:
        step, smp, r = bad[0]
        raise NonFiniteError(f"non-finite value (NaN or Inf) at step {step}, sample {smp} (on rank {r}); "
                             "check the model, its dtype and the schedule's time convention", step=step, sample=smp)
    keep = counts[rank]
    samples = out.samples[:keep]
    thermo = out.thermo
    if thermo is not None:
        thermo = ThermoReport(t=thermo.t, rate=thermo.rate[:, :keep], temperature=thermo.temperature,
                              displacement=None if thermo.displacement is None else thermo.displacement[:keep],
                              schedule_name=thermo.schedule_name, solver=thermo.solver)
    if not gather:
        return SampleOutput(samples=samples, thermo=thermo, sigmas=out.sigmas, nfe=out.nfe)
    samples = _gather_trimmed(out.samples, counts, 0, group)
    if thermo is not None:
        rate = _gather_trimmed(out.thermo.rate, counts, 1, group)
        disp = None
        if out.thermo.displacement is not None:
            disp = _gather_trimmed(out.thermo.displacement, counts, 0, group)
        thermo = ThermoReport(t=thermo.t, rate=rate, temperature=thermo.temperature, displacement=disp,
                              schedule_name=thermo.schedule_name, solver=thermo.solver)
    return SampleOutput(samples=samples, thermo=thermo, sigmas=out.sigmas, nfe=out.nfe)


def _gather_trimmed(t: torch.Tensor, counts: list[int], dim: int, group) -> torch.Tensor:
    """Gather each rank's tensor (size max(count, 1) along dim) and keep count rows of each, in rank order."""
    sizes = [max(c, 1) for c in counts]
    full = _gather_rows(t, sizes, dim, group)
    pieces, pos = [], 0
    for c, s in zip(counts, sizes):
        pieces.append(full.narrow(dim, pos, c))
        pos += s
    return torch.cat(pieces, dim=dim)


def _status_device(group) -> torch.device:
    """The device collectives of this group need (cuda for nccl, else cpu)."""
    import torch.distributed as dist
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
