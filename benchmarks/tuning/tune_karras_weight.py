"""Tuning tool: a solver's calibrated "error" grid pure and moved halfway to karras (karras_weight 0.5).

On the tuning mixtures of benchmarks/tuning/tune_low_nfe.py (none of them in a benchmark set) at 6, 10 and 20
steps: the pilot of thermo_grid chooses between karras (the default) and each "error" variant as
calibrate.select does (auto.challenge on all samples, margin auto.MARGIN), and the choice's RMS error on a
fresh batch (noise seed 9300) is compared with karras's by a paired bootstrap. Counts the choices worse and
better than karras beyond the 90% interval, and the geometric mean of chosen / karras:

    python -m benchmarks.tuning.tune_karras_weight --solver deis --orders 3,2 [--n 1024] [--problems t512,s1024]

A tuning tool: its problems and seeds are not checks (docs/decisions/0018-deis-halfway-to-karras.md).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import thermosample as ts
from thermosample import auto, calibrate

from .. import bench_quality as bq
from . import tune_low_nfe as tl

VARIANTS = {"error": 0.0, "error halfway": 0.5}   # name: karras_weight


def measure(pname: str, solver: str, orders, n: int, seed: int, steps_list) -> dict:
    """{(steps, order, grid): (pilot per-sample squared errors, batch per-sample squared errors)}."""
    dim, make = tl.TUNE[pname]
    den = make()
    pd = ts.thermo_grid(den, 10, solver="dpmpp_2m", sample_shape=(dim,)).pilot
    x_t = bq.initial_noise((n, dim), [seed], den.schedule.sigma_max)
    ref, _ = bq.reference(den, x_t, 400)
    out = {}
    for steps in steps_list:
        for order in orders:
            opts = {"order": order} if order else {}
            for grid, weight in [("karras", None), *VARIANTS.items()]:
                kw = None if weight is None else {**calibrate.error_grid_defaults(solver, steps),
                                                  "karras_weight": weight}
                sig = calibrate.candidate_sigmas("karras" if kw is None else "error", den, steps, solver, pd, pd, kw)
                _, pilot_sq = calibrate.pilot_errors(den, sig, solver, pd, "auto", opts)
                res = ts.sample(den, noise=x_t.float(), grid=np.append(sig, 0.0), solver=solver, track=False,
                                progress=False, **opts).samples
                out[steps, order, grid] = (pilot_sq, bq.score_run(res, ref, n, 1)["_sq"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", default="deis")
    ap.add_argument("--orders", default="", help="comma-separated order= values (empty: the solver's default)")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=9300)
    ap.add_argument("--steps", default="6,10,20")
    ap.add_argument("--problems", default=",".join(tl.TUNE))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    orders = [int(o) for o in args.orders.split(",")] if args.orders else [None]
    rng = np.random.default_rng(0)
    tally = {v: {"taken": 0, "worse": [], "better": 0, "ratios": []} for v in VARIANTS}
    for pname in args.problems.split(","):
        t0 = time.time()
        runs = measure(pname, args.solver, orders, args.n, args.seed, [int(s) for s in args.steps.split(",")])
        for (steps, order, grid), (pilot_sq, sq) in runs.items():
            if grid == "karras":
                continue
            k_pilot, k_sq = runs[steps, order, "karras"]
            pair = np.stack([k_pilot, pilot_sq])
            taken = auto.challenge(pair, np.full(pair.shape[1], 1.0 / pair.shape[1]), auto.MARGIN, outliers="none")
            chosen = sq if taken else k_sq
            idx = rng.integers(0, len(sq), (500, len(sq)))
            lo, hi = np.quantile(np.sqrt(chosen[idx].mean(1) / k_sq[idx].mean(1)), [0.05, 0.95])
            t = tally[grid]
            t["taken"] += int(taken)
            t["ratios"].append(float(np.sqrt(chosen.mean() / k_sq.mean())))
            t["better"] += int(hi < 1)
            if lo > 1:
                t["worse"].append(f"{pname} {steps} steps order {order}: {t['ratios'][-1]:.2f} [{lo:.2f}-{hi:.2f}]")
        print(f"{pname} ({time.time() - t0:.0f} s)", flush=True)
    for grid, t in tally.items():
        r = np.array(t["ratios"])
        print(f"{args.solver} {grid:14s}: taken over karras {t['taken']:3d} of {len(r)}; worse than karras beyond "
              f"the interval {len(t['worse'])}, better {t['better']}; geo-mean chosen / karras "
              f"{np.exp(np.log(np.maximum(r, 1e-12)).mean()):.3f}")
        for line in t["worse"]:
            print("    worse:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
