"""What `solver="auto"` costs and what it buys, per cost tier: on bench_quality's problems (same noise seeds,
same converged reference), each tier's calibration rows, auto's error against the best peer of the committed
bench_quality table (peers are deterministic: the same noise gives the same numbers), the bulk (median
per-sample) error, the samples sent to another mode, the uncalibrated default of the band on karras, and
the break-even: the calibration's rows over the evaluations a sample saves (the best peer's NFE for auto's
error, interpolated log-log along the best-peer envelope of the table's budgets, minus auto's NFE).

    python -m benchmarks.bench_price [--heldout | --learned [--peers-json PATH]] [--tiers default,low,thorough]
        [--budgets 6,10,20,50] [--problems d64,vsharp] [--json PATH]

Each tier calibrates fresh at every budget (a "default" pilot is sized for its step count); "thorough"
reuses its pilot across budgets and counts the rows a fresh calibration spends. About 10 minutes per set
for "default,low" on two cores; "thorough" adds about 15.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time

import torch

import thermosample as ts

from . import bench_quality as bq
from . import quality_problems as qp

BARS = bq.BAR
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def best_peers(which: str, path: str | None = None) -> dict:
    """{(problem, budget): the summary row} of a bench_quality run (its best peer and its error): the committed
    one of the set, or `path`."""
    name = {"default": "bench_quality_peers.json", "heldout": "bench_quality_peers_heldout.json",
            "learned": "bench_quality_peers_learned.json"}[which]
    with open(path or os.path.join(RESULTS, name)) as f:
        return {(s["problem"], s["budget"]): s for s in json.load(f)["summary"]}


def peer_nfe(envelope: dict, err: float) -> float | None:
    """The NFE at which the best-peer envelope {NFE: error} reaches `err` (log-log), None if beyond it."""
    pts = sorted(envelope.items())
    if err >= pts[0][1]:
        return float(pts[0][0])
    for (n0, e0), (n1, e1) in zip(pts, pts[1:]):
        if e1 <= err <= e0:
            f = 0.0 if e0 == e1 else (math.log(e0) - math.log(err)) / (math.log(e0) - math.log(e1))
            return math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
    return None


def run(which: str, tiers, budgets, tokens=None, peers_json=None, log=print) -> list[dict]:
    peers = best_peers(which, peers_json)
    envelope = collections.defaultdict(dict)
    for (p, b), s in peers.items():
        envelope[p][b] = s["best_peer_error"]
    seeds = {"default": qp.DEFAULT_SEEDS, "heldout": qp.HELDOUT_SEEDS, "learned": qp.LEARNED_SEEDS}[which]
    problems = {"default": qp.DEFAULT, "heldout": qp.HELDOUT, "learned": qp.LEARNED}[which]
    rows = []
    for prob in qp.select(problems, tokens or []):
        t0 = time.perf_counter()
        den = prob.make()
        b = prob.batch
        x_t = bq.initial_noise((b, *prob.shape), seeds, den.schedule.sigma_max)
        ref, _ = bq.reference(getattr(den, "reference_denoiser", None) or den, x_t, 400)
        for tier in tiers:
            cache = {}
            for budget in budgets:
                options = ts.CalibrationOptions(cost=tier, progress=False)
                cfg = ts.thermo_grid(den, budget, solver="auto", sample_shape=tuple(prob.shape), options=options,
                                     pilot_data=(cache or None) if tier == "thorough" else None)
                cache.update(cfg.pilot)
                out = ts.sample(den, noise=x_t.float(), grid=cfg, track=False).samples
                rows.append(_row(prob.name, budget, tier, bq.score_run(out, ref, b, len(seeds)), peers, envelope,
                                 ts.calibrate.planned_rows(budget, "auto", options), repr(cfg)))
        for budget in budgets:
            u = ts.auto.band_for(budget).uncalibrated
            out = ts.sample(den, noise=x_t.float(), steps=budget, solver=u.solver, grid="karras", track=False,
                            **u.options).samples
            rows.append(_row(prob.name, budget, "uncalibrated", bq.score_run(out, ref, b, len(seeds)), peers,
                             envelope, 0, u.label))
        log(f"  {prob.name}: {time.perf_counter() - t0:.0f} s")
    return rows


def _row(problem, budget, tier, score, peers, envelope, calib_rows, choice) -> dict:
    peer = peers.get((problem, budget), {})
    row = {"problem": problem, "budget": budget, "tier": tier, "choice": choice, "rows": calib_rows,
           "error": score["error"], "median": score["median"], "switched": score["switched"],
           "best_peer": peer.get("best_peer"), "ratio": score["error"] / peer["best_peer_error"] if peer else None,
           "thorough_committed_ratio": peer.get("recommended_ratio")}
    match = peer_nfe(envelope[problem], score["error"]) if problem in envelope else None
    row["saves_per_sample"] = None if match is None else match - budget
    row["break_even"] = (None if match is None or match <= budget or not calib_rows
                         else calib_rows / (match - budget))
    return row


def table(rows) -> str:
    lines = [f"{'problem':28s} {'NFE':>3s} {'tier':12s} {'rows':>7s} {'auto/peer':>9s} {'median':>8s} "
             f"{'switched':>8s} {'break-even':>10s}"]
    for r in rows:
        be = ("-" if r["tier"] == "uncalibrated" else "peers>50" if r["saves_per_sample"] is None
              else "never" if r["break_even"] is None else f"{r['break_even']:,.0f}")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}" + ("" if r["ratio"] <= BARS[r["budget"]] else "*")
        lines.append(f"{r['problem']:28s} {r['budget']:3d} {r['tier']:12s} {r['rows']:7d} {ratio:>9s} "
                     f"{r['median']:8.2e} {r['switched']:8d} {be:>10s}")
    lines.append("* above the bar (1.0 x the best peer at NFE 6 and 50, 0.8 x at 10 and 20)")
    by = collections.defaultdict(list)
    for r in rows:
        by[r["tier"]].append(r)
    for tier, rs in by.items():
        met = sum(r["ratio"] is not None and r["ratio"] <= BARS[r["budget"]] for r in rs)
        lines.append(f"{tier}: meets the bar in {met} of {len(rs)} cells")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--learned", action="store_true", help="the learned denoisers (peers from --peers-json or "
                    "results/bench_quality_peers_learned.json)")
    ap.add_argument("--peers-json", default=None, help="a bench_quality --json of the same set, for its best peers")
    ap.add_argument("--tiers", default="default,low")
    ap.add_argument("--budgets", default="6,10,20,50")
    ap.add_argument("--problems", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiers = [int(t) if t.isdigit() else t for t in args.tiers.split(",")]
    which = "learned" if args.learned else "heldout" if args.heldout else "default"
    rows = run(which, tiers, [int(b) for b in args.budgets.split(",")], [t for t in args.problems.split(",") if t],
               args.peers_json)
    print(f"device: {torch.device('cpu')} ({os.cpu_count()} cores), torch {torch.__version__}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
