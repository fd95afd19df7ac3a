"""How well a 256-sample pilot chooses between solver="auto"'s candidates, scored on a large population.

bench_selection.py scores simulated pilots against the benchmark's own batch (1024-8192 samples), which
holds few of the rare samples a grid sends to another mode. This scores them against N fresh samples
(default 8192, bench_population.py's seed 7000, the same converged reference) and against
bench_population's best peer on those samples (benchmarks/results/bench_population.json, so the problems
and N must be among the ones it ran). For each problem and budget it runs the default and alternative of
auto.band_for(budget) on all N samples once, keeps every sample's squared error (against the converged
reference, and against the pilot-style UniPC-3 128-step one that a pilot would measure with), then draws
--draws pilots of --pilot samples and applies auto.challenge with margin auto.MARGIN two ways:

* all samples: outliers="none", on the pilot's plain RMS errors (the rule before session 9);
* compared: outliers="shared", on the errors without the samples every candidate misses by far, the choice
  no worse on all of them (what thermo_grid(solver="auto") does).

    python -m benchmarks.tuning.bench_selection_population [SET:TOKEN ...] [--budgets 10 20] [--draws 400]

Without problems it takes the 19 that bench_population.json holds (PROBLEMS). Prints a table and the
expected number of cells meeting issue 12's bar under each rule; writes
benchmarks/out/bench_selection_population.json. About 10 minutes on two cores for the 19 problems (the
1024-1536-dimensional ones take most of it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import thermosample as ts
from thermosample import auto
from thermosample import calibrate as cal

from .. import bench_population as bp
from .. import bench_quality as bq
from . import bench_selection as bs

RULES = {"all samples": False, "compared": True}     # rule name: leave the shared outliers out
PROBLEMS = ("fresh3:d1536", "fresh:d200", "fresh2:d64", "heldout:d512", "default:d256", "fresh2:d768", "fresh:d1024",
            "fresh3:d384", "fresh3:d96", "default:d128", "default:d64", "default:d32", "default:k10",
            "default:narrow", "default:d2", "default:vsharp", "heldout:d4", "heldout:d12", "heldout:d24")


def candidate_errors(prob, n: int, budgets) -> dict:
    """{budget: [C, 2, N] squared errors of auto's candidates (vs the converged reference, vs the pilot-style
    reference)} on bench_population's fresh noise."""
    den = prob.make()
    x_t = bq.initial_noise((n, *prob.shape), [bp.SEED], den.schedule.sigma_max)
    ref, quick, pilot = bs.references(den, x_t, prob.shape)
    out = {}
    for budget in budgets:
        errs = []
        for name, opts, grid in bs.plan_candidates(budget):
            sig_c = cal.candidate_sigmas(grid, den, budget, name, pilot, pilot)
            y = ts.sample(den, noise=x_t.float(), grid=np.append(sig_c, 0.0), solver=name, track=False,
                          **opts).samples.double()
            errs.append(np.stack([bp.per_sample(y, r) for r in (ref, quick)]))
        out[budget] = np.nan_to_num(np.stack(errs), nan=1e30, posinf=1e30)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("problems", nargs="*", metavar="SET:TOKEN")
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--pilot", type=int, default=cal.PILOT_BATCH)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(bq.OUT, "bench_selection_population.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pop = json.load(open(os.path.join(bq.RESULTS, "bench_population.json")))
    n = int(pop["n"])
    peer = {(r["problem"], r["budget"]): r["best_peer_error"] for r in pop["rows"]}
    specs = args.problems or PROBLEMS
    rng = np.random.default_rng(0)
    rows = []
    t0 = time.perf_counter()
    for spec in specs:
        prob = bp.problem(spec)
        for budget, A in candidate_errors(prob, n, args.budgets).items():
            if (prob.name, budget) not in peer:
                raise SystemExit(f"{prob.name} at NFE {budget} is not in bench_population.json: run it there first")
            truth = np.sqrt(A[:, 0].mean(1)) / peer[(prob.name, budget)]
            row = {"problem": prob.name, "budget": budget, "candidates_vs_peer": truth.tolist()}
            for rule, shared in RULES.items():
                ok = 0
                for _ in range(args.draws):
                    idx, w = bs.pilot_draw(A.shape[2], args.pilot, rng)
                    ok += truth[bs.choice(A[:, 1, idx], w, auto.MARGIN, shared)] <= bq.BAR[budget]
                row[rule] = ok / args.draws
            rows.append(row)
    lines = [f"bench_selection_population: pilots of {args.pilot} drawn {args.draws} times from {n} samples "
             f"(seed {bp.SEED}), {time.perf_counter() - t0:.0f} s; candidates / best peer on all {n}, then the "
             "fraction of pilots whose choice meets the bar",
             f"{'problem':30s} {'NFE':>4s} {'default':>8s} {'altern.':>8s} " + " ".join(f"{r:>12s}" for r in RULES)]
    for r in rows:
        lines.append(f"{r['problem']:30s} {r['budget']:4d} " + " ".join(f"{v:8.3f}" for v in r["candidates_vs_peer"])
                     + " " + " ".join(f"{r[k]:12.2f}" for k in RULES))
    lines.append(f"expected cells meeting the bar, of {len(rows)}: "
                 + ", ".join(f"{k} {sum(r[k] for r in rows):.2f}" for k in RULES))
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"n": n, "seed": bp.SEED, "pilot": args.pilot, "draws": args.draws, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
