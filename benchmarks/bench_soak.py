"""Soak test: many small bulk shards and one long run, watching time per shard and resident memory.

1. `ts.bulk.sample_to_disk` with the toy model, batch 1, --shards shards (default 2000): time per shard
   for each quarter of the job (flat = O(1) work per shard; it used to grow with the shards on disk), then
   a resume over the finished folder (verifies every shard: header and sha256) and `load_shards`.
2. `ts.sample` for --steps steps (default 1000) on a 2 MB state with a one-multiply model, per solver: RSS
   growth over the run, after a short warm-up run (flat = no per-step allocation that the heap keeps).

Prints a table and writes JSON (default benchmarks/out/soak.json). About a minute on 2 CPU cores.

    python -m benchmarks.bench_soak [--shards 2000] [--steps 1000] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

import thermosample as ts
from thermosample import bulk
from thermosample.toy import toy_factory

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "soak.json")


def rss_mb() -> float:
    """Resident set size of this process now, in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def soak_shards(shards: int, steps: int, out: str) -> dict:
    """One bulk job of `shards` shards of one sample each; the time of each shard from the shard's sampling
    call (wrapped) and the job's wall time; then a resume and a load."""
    marks = []
    real = bulk._sample

    def timed(*args, **kwargs):  # the shard boundaries, seen from the sampler calls
        marks.append(time.perf_counter())
        return real(*args, **kwargs)
    bulk._sample = timed
    rss0 = rss_mb()
    t0 = time.perf_counter()
    try:
        res = bulk.sample_to_disk("thermosample.toy:toy_factory", n=shards, batch=1, out=out, steps=steps,
                                  backend="torch", progress=False)
    finally:
        bulk._sample = real
    wall = time.perf_counter() - t0
    marks.append(time.perf_counter())  # marks[0] is the trial step; shard i runs from marks[i+1] to marks[i+2]
    per_shard = [b - a for a, b in zip(marks[1:-1], marks[2:])]
    q = len(per_shard) // 4
    quarters = [1e3 * sum(per_shard[i * q:(i + 1) * q]) / q for i in range(4)]
    t1 = time.perf_counter()
    again = bulk.sample_to_disk("thermosample.toy:toy_factory", n=shards, batch=1, out=out, steps=steps,
                                backend="torch", progress=False)
    resume = time.perf_counter() - t1
    t2 = time.perf_counter()
    data = bulk.load_shards(out)
    load = time.perf_counter() - t2
    assert len(res.written) == shards and again.written == [] and data["samples"].shape == (shards, 8)
    return {"shards": shards, "steps": steps, "wall_s": wall, "ms_per_shard": 1e3 * wall / shards,
            "ms_per_shard_by_quarter": quarters, "resume_s": resume, "load_s": load,
            "rss_start_mb": rss0, "rss_end_mb": rss_mb()}


def soak_steps(steps: int, solver: str, backend: str) -> dict:
    """RSS before and after one `steps`-step run on a [64, 8192] float32 state (2 MB). The model is one
    multiply (eps = x / 2), so the run measures the sampler's own allocations."""
    den = ts.Denoiser(lambda x, t: 0.5 * x, toy_factory().schedule, prediction="eps")
    ts.sample(den, (64, 8192), steps=20, solver=solver, backend=backend, progress=False)  # warm-up
    rss0 = rss_mb()
    t0 = time.perf_counter()
    ts.sample(den, (64, 8192), steps=steps, solver=solver, backend=backend, progress=False)
    return {"solver": solver, "backend": backend, "steps": steps, "wall_s": time.perf_counter() - t0,
            "rss_before_mb": rss0, "rss_after_mb": rss_mb(), "rss_growth_mb": rss_mb() - rss0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2000, help="shards of batch 1 in the bulk job (default 2000)")
    p.add_argument("--shard-steps", type=int, default=2, help="solver steps per shard (default 2)")
    p.add_argument("--steps", type=int, default=1000, help="steps of the long run (default 1000)")
    p.add_argument("--solvers", default="euler,heun", help="solvers of the long run (default euler,heun)")
    p.add_argument("--backend", default="auto", help="backend of the long run (default auto)")
    p.add_argument("--dir", help="folder for the bulk job (default: a temporary folder, removed)")
    p.add_argument("--json", default=OUT, help=f"JSON output (default {OUT})")
    args = p.parse_args(argv)

    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        result["bulk"] = b = soak_shards(args.shards, args.shard_steps, args.dir or os.path.join(tmp, "job"))
    print(f"bulk: {b['shards']} shards of batch 1, {b['steps']} steps: {b['wall_s']:.1f} s, "
          f"{b['ms_per_shard']:.2f} ms/shard; by quarter "
          + " / ".join(f"{v:.2f}" for v in b["ms_per_shard_by_quarter"]) + " ms")
    print(f"      resume over the finished folder {b['resume_s']:.2f} s, load_shards {b['load_s']:.2f} s, "
          f"RSS {b['rss_start_mb']:.0f} -> {b['rss_end_mb']:.0f} MB")
    result["long_runs"] = []
    for solver in args.solvers.split(","):
        r = soak_steps(args.steps, solver, args.backend)
        result["long_runs"].append(r)
        print(f"long run: {r['steps']} steps of {solver} ({args.backend}), [64, 8192] float32: {r['wall_s']:.1f} s, "
              f"RSS {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB (growth {r['rss_growth_mb']:+.1f} MB)")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
