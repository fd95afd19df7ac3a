"""Rare mode switches need large batches: solver="auto" against every peer on many fresh samples.

bench_quality pools 4 seeds of 256-2048 samples. On a high-dimensional mixture a 20-step solver sends one
sample in a few thousand to another mode, and that one sample dominates the RMS error: a batch of 1024
usually holds none, so its ranking of the methods is the ranking of their bulk error alone. This runs the
same comparison on N fresh samples (default 8192, seed 7000, used nowhere else): the recommended
configuration (thermo_grid(solver="auto") from its own pilot, as bench_quality calibrates it) and every
peer configuration on karras (k-diffusion's samplers and diffusers' schedulers, through
benchmarks/quality_peers.py), scored against bench_quality's converged reference. It reports each one's
RMS error, its switched samples (per-sample RMS error above bench_quality.SWITCH) and the ratio to the best
peer with its paired-bootstrap 90% interval, the best peer chosen again in every replicate.

    python -m benchmarks.bench_population fresh2:d768 fresh3:d1536 [--n 8192] [--budgets 10 20] [--save-results]

Problems are SET:TOKEN with SET one of default, heldout, fresh, fresh2, ..., fresh22 and TOKEN a name token as
bench_quality --problems takes it. Writes benchmarks/out/bench_population.{txt,json} (--out STEM to change);
--save-results also writes the committed summary benchmarks/results/bench_population.{txt,json}, whose
nineteen problems (the commands are in its first line) tuning/bench_selection_population.py reads. A few
minutes per problem on two cores.
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
from thermosample import solvers as ts_solvers

from . import bench_quality as bq
from . import bench_quality_fresh as bf
from . import quality_peers as peers
from . import quality_problems as qp

SEED = 7000           # the fresh noise's seed: not a seed of any bench_quality set


def problem(spec: str):
    """A Problem from 'SET:TOKEN'."""
    name, _, token = spec.partition(":")
    sets = {"default": qp.DEFAULT, "heldout": qp.HELDOUT, **{k: v[0] for k, v in bf.SETS.items()}}
    if name not in sets or not token:
        raise SystemExit(f"problems are SET:TOKEN with SET in {sorted(sets)}, got {spec!r}")
    found = qp.select(sets[name], [token])
    if len(found) != 1:
        raise SystemExit(f"{spec!r} names {len(found)} problems of {name} ({[p.name for p in found]})")
    return found[0]


def per_sample(out, ref) -> np.ndarray:
    """[N] per-sample mean squared error (inf where the run is not finite), as bench_quality scores it."""
    return bq.score_run(out, ref, ref.shape[0], 1)["_sq"]


def run_problem(prob, n: int, budgets, log=print) -> list[dict]:
    t0 = time.perf_counter()
    den = prob.make()
    sch = den.schedule
    x_t = bq.initial_noise((n, *prob.shape), [SEED], sch.sigma_max)
    ref, info = bq.reference(den, x_t, 400)
    pilot = {}
    rows = []
    for budget in budgets:
        steps = bq.steps_within(lambda k: ts_solvers.evaluations("auto", k), budget)
        config = bq.calibrated_grid(den, steps, "auto", {}, prob.shape, pilot)      # a ts.SamplerConfig
        auto = per_sample(ts.sample(den, noise=x_t.float(), grid=config, track=False).samples, ref)
        peer_sq = {}
        for pname, ev in peers.peer_configs().items():
            k = bq.steps_within(ev, budget)
            try:
                out, _ = peers.run_peer(pname, den, x_t.float().clone(), peers.karras_sigmas(k, sch))
                peer_sq[pname] = per_sample(out, ref)
            except Exception as exc:  # noqa: BLE001 - a failing peer is left out, and said so
                log(f"  {prob.name} NFE {budget}: {pname} failed ({type(exc).__name__}: {str(exc)[:120]})")
        if not peer_sq:
            raise SystemExit("no peer ran: install the test extras (diffusers, k-diffusion; see README)")
        best = min(peer_sq, key=lambda p: peer_sq[p].mean())
        lo, hi = bq.bootstrap_ratio(auto, peer_sq)
        rms = lambda sq: float(np.sqrt(sq.mean()))
        switched = lambda sq: int((np.sqrt(sq) > bq.SWITCH).sum())
        rows.append({"problem": prob.name, "budget": budget, "n": n,
                     "auto_choice": bq.choice_label(config.solver, config.options),
                     "auto_grid": config.meta.get("chosen"), "auto_error": rms(auto), "auto_switched": switched(auto),
                     "best_peer": best, "best_peer_error": rms(peer_sq[best]),
                     "best_peer_switched": switched(peer_sq[best]), "ratio": rms(auto) / rms(peer_sq[best]),
                     "ratio_ci90": [lo, hi], "bar": bq.BAR[budget],
                     "peers": {p: {"error": rms(sq), "switched": switched(sq)} for p, sq in peer_sq.items()},
                     "reference": info})
    log(f"  {prob.name}: {time.perf_counter() - t0:.0f} s")
    return rows


def table(rows) -> str:
    lines = [f"{'problem':30s} {'NFE':>4s} {'auto':>26s} {'err':>9s} {'sw':>4s}  {'best peer':24s} {'err':>9s} "
             f"{'sw':>4s} {'ratio':>7s} {'90% CI':>13s}"]
    for r in rows:
        verdict = "PASS" if r["ratio"] <= r["bar"] else "FAIL"
        lines.append(f"{r['problem']:30s} {r['budget']:4d} {str(r['auto_choice']) + '@' + str(r['auto_grid']):>26s} "
                     f"{r['auto_error']:9.2e} {r['auto_switched']:4d}  {r['best_peer']:24s} "
                     f"{r['best_peer_error']:9.2e} {r['best_peer_switched']:4d} {r['ratio']:7.3f} "
                     f"{r['ratio_ci90'][0]:6.2f}-{r['ratio_ci90'][1]:<6.2f} {verdict} (bar {r['bar']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("problems", nargs="+", metavar="SET:TOKEN")
    ap.add_argument("--n", type=int, default=8192, help="fresh samples per problem (default 8192)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(bq.OUT, "bench_population"), help="output stem")
    ap.add_argument("--save-results", action="store_true",
                    help="also write the committed summary benchmarks/results/bench_population.{txt,json}")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    probs = [problem(s) for s in args.problems]
    t0 = time.perf_counter()
    rows = [r for p in probs for r in run_problem(p, args.n, args.budgets)]
    head = (f"bench_population: {args.n} fresh samples per problem (seed {SEED}), solver='auto' vs every peer on "
            f"karras, budgets {args.budgets}, {time.perf_counter() - t0:.0f} s; sw = samples with RMS error "
            f"> {bq.SWITCH} (switched mode)")
    text = head + "\n" + table(rows)
    print(text)
    doc = {"argv": sys.argv[1:] if argv is None else list(argv), "n": args.n, "seed": SEED, "rows": rows}
    stems = [args.out] + ([os.path.join(bq.RESULTS, "bench_population")] if args.save_results else [])
    for stem in stems:
        os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
        with open(stem + ".txt", "w") as f:
            f.write(text + "\n")
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {stem}.txt, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
