"""Sweep (BLOCK, num_warps) of the Triton fused step on CUDA: which launch shape reaches the copy bandwidth.

Patches kernels.fused_step._block_size for each candidate, checks the output against the torch reference
(poisoned output, fresh random inputs) and times it with bench.Timer (device events, cold L2) beside a
copy of the same state. Prints a table and writes JSON.

    python -m benchmarks.sweep_triton_block --sizes 8 64 512 --out benchmarks/out/sweep.json
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from thermosample.apps.bench import ALPHA, BATCH, BETA, STEPS, Timer, device_name
from thermosample.ops import reference as _reference

CANDIDATES = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]


def main() -> None:
    from thermosample.kernels import fused_step as fs
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--steps", nargs="+", default=["euler", "heun", "dpmpp_2m", "euler_ancestral"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=os.path.join("benchmarks", "out", "sweep_triton_block.json"))
    args = p.parse_args()
    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    timer = Timer(device, budget_s=0.5, min_reps=5, max_reps=100)
    original = fs._block_size
    rows = []
    print(f"device {device_name(device)}, {args.dtype}, batch {BATCH}")
    print(f"{'step':<16}{'MB':>6}{'BLOCK':>7}{'warps':>6}{'GB/s':>9}{'copy':>9}{'frac':>6}{'max err':>10}")
    for name in args.steps:
        n_in, coeffs, noise, u, d = STEPS[name]
        for size in args.sizes:
            per = int(size * 2**20) // (dtype.itemsize * BATCH)
            xs = [torch.randn(BATCH, per, device=device, dtype=dtype) for _ in range(n_in)]
            out = torch.empty_like(xs[0])
            kw = dict(noise=noise, seed=7, step=2, alpha=ALPHA, beta=BETA, u=u, d=d, track=True)
            small = [x[:, :4099].contiguous() for x in xs]            # correctness on a slice (fast reference)
            ref_out, ref_rate = _reference.fused_step_reference(small, coeffs, **kw)
            for block, warps in CANDIDATES:
                fs._block_size = lambda numel, b=block, w=warps: (min(b, max(16, 1 << (numel - 1).bit_length())), w)
                chk = torch.full_like(small[0], float("nan"))
                o, r = fs.fused_step(small, coeffs, out=chk, **kw)
                err = (o.double() - ref_out.double()).abs().max().item()
                rerr = ((r.double() - ref_rate.double()).abs() / ref_rate.double().abs()).max().item()
                t = timer.run({"copy": lambda: out.copy_(xs[0]),
                               "ours": lambda: fs.fused_step(xs, coeffs, out=out, **kw)})
                state = xs[0].numel() * xs[0].element_size()
                gbs = (n_in + 1) * state / t["ours"] / 1e9
                copy = 2 * state / t["copy"] / 1e9
                rows.append(dict(step=name, size_mb=size, block=block, warps=warps, gbs=gbs, copy_gbs=copy,
                                 frac=gbs / copy, max_abs_err=err, max_rate_rel_err=rerr))
                print(f"{name:<16}{size:>6.0f}{block:>7}{warps:>6}{gbs:>9.0f}{copy:>9.0f}{gbs / copy:>6.2f}"
                      f"{max(err, rerr):>10.1e}", flush=True)
            fs._block_size = original
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
