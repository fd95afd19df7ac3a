"""How well a small pilot chooses a solver and grid: selection rules of thermo_grid measured by simulation.

For every problem of benchmarks/quality_problems.py (DEFAULT, or HELDOUT with --heldout) and budget NFE in
(6, 10, 20, 50), this runs each candidate (solver, grid) once on the benchmark's whole batch (all noise
seeds pooled, float32, the same converged reference as bench_quality.py) and keeps every sample's squared
error. A pilot of B samples is then simulated by drawing B of those samples (--draws times): a rule sees
only the pilot's errors, measured against the pilot's own reference (calibrate.reference: UniPC-3 on 128
log-sigma steps), picks a candidate, and is scored by that candidate's error on the whole batch relative
to the best peer's (read from bench_quality's saved JSON, which must come from the same seeds). So one run
compares rules with no pilot luck in the comparison: "pass" is the fraction of draws that meet issue 12's
bar (<= 0.8 x the best peer at NFE 10 and 20, <= 1.0 x at 6 and 50).

Rules:
* best-of-42: the smallest pilot error over the six solvers of the previous solver="auto" (UniPC 2/3,
  iPNDM, DEIS 2/3, DPM-Solver++(3M)) on all seven candidate grids;
* plan, margin 1: the default and alternative of auto.band_for(steps) (`plan_candidates`), the smaller
  pilot error;
* plan, margin 0.6, all samples: the same, leaving the default only below auto.MARGIN x its pilot error
  (auto.challenge with outliers="none": what solver="auto" did before session 9);
* plan, margin 0.6: the same on the pilot errors without the samples every candidate misses by far, the
  choice also no worse on all of them (auto.challenge, outliers="shared": what solver="auto" does; the
  band's check, noise cuts and fitted corrections are not simulated);
* screened, margin 0.6: the same on the pilot thermo_grid(boundary_pool=4096) builds (calibrate.reference):
  the random samples plus the top 64 of 4096 by calibrate.twin_gain, weighted by their stratum's share.
  The pool is drawn from the batch itself, so for batches below 4096 it is the whole batch and its top
  keeps the same share (1 / 64 of it);
and for the single-solver calibrated grid (every deterministic solver of the table, Heun and DPM-2 with
the steps that fit the budget, as bench_quality counts them): karras
against "error" with margin 1 and 0.6 (random pilot, all samples: what thermo_grid does), 0.6 without the
shared outliers (solver="auto"'s comparison, not used for one solver) and 0.6 on the screened pilot,
scored by how often the choice is worse than karras on the whole batch by more than its paired-bootstrap
90% interval.

    python -m benchmarks.tuning.bench_selection [--heldout] [--problems d16,d8] [--pilot 256] [--draws 200]
        [--cache DIR]

Prints a table and writes JSON (benchmarks/out/bench_selection[_heldout].json). About 10 minutes on two
cores (the candidate runs), then seconds for the rules. --heldout checks that a rule chosen on the default
set transfers; it is not a set to choose on.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import thermosample as ts
from thermosample import auto
from thermosample import calibrate as cal
from thermosample import solvers as S
from thermosample.grids import logsnr

from .. import bench_quality as bq
from .. import quality_problems as qp

BUDGETS = (6, 10, 20, 50)
OLD_AUTO = (("unipc", {"order": 3}), ("unipc", {}), ("ipndm", {}), ("deis", {}), ("deis", {"order": 2}),
            ("dpmpp_3m", {}))


def plan_candidates(steps: int) -> list[tuple[str, dict, str]]:
    """(solver, options, grid) of the default and the alternative that solver="auto" measures at `steps`
    (the row auto.band_for(steps) of auto.PLAN)."""
    band = auto.band_for(steps)
    return [(c.solver, dict(c.options), c.grid) for c in (band.default, band.alternative)]


def references(den, x_t, shape):
    """(the converged reference of x_t as bench_quality solves it, the pilot-style one: UniPC-3 on 128
    log-sigma steps as calibrate.reference solves it, the pilot data thermo_grid builds for a sample shape:
    the "error" grid's twins and its reference)."""
    sch = den.schedule
    ref, _ = bq.reference(den, x_t, 400)
    sig = logsnr(128, sch.sigma_min, sch.sigma_max)
    quick_ref = ts.sample(den, noise=x_t, grid=np.append(sig, 0.0), solver="unipc", order=3,
                          track=False).samples.double()
    pilot = {**cal.pilot(den, (cal.PILOT_BATCH, *shape)), **cal.reference(den, (cal.PILOT_BATCH, *shape))}
    return ref, quick_ref, pilot


def collect(prob, seeds, log=print) -> dict:
    """{(budget, solver label, grid): [2, N] float64 (squared error per sample vs the converged reference,
    and vs the pilot-style UniPC-3 128-step reference)}."""
    t0 = time.perf_counter()
    den = prob.make()
    x_t = bq.initial_noise((prob.batch, *prob.shape), seeds, den.schedule.sigma_max)
    n = x_t.shape[0]
    ref, quick_ref, pilot = references(den, x_t, prob.shape)
    configs = [(lab, name, o) for lab, name, o in bq.ts_configs() if name != "ddim"]   # ddim is euler here
    out = {}
    noise = x_t.float()
    for budget in BUDGETS:
        for lab, name, opts in configs:
            steps = bq.steps_within(lambda k, name=name: S.evaluations(name, k), budget)  # Heun: 2 steps - 1
            for g in cal.CANDIDATES:
                sig_c = cal.candidate_sigmas(g, den, steps, name, pilot, pilot)
                y = ts.sample(den, noise=noise, grid=np.append(sig_c, 0.0), solver=name, track=False,
                              **opts).samples.double()
                sq = [(y - r).reshape(n, -1).square().mean(1).numpy() for r in (ref, quick_ref)]
                out[(budget, lab, g)] = np.nan_to_num(np.stack(sq), nan=1e30, posinf=1e30)
    log(f"  {prob.name}: {len(out)} candidate runs on {n} samples in {time.perf_counter() - t0:.0f} s")
    return out


def collect_cached(prob, seeds, cache_dir: str) -> dict:
    """`collect`, saved to / loaded from cache_dir (one .npz per problem and seed set) when it is given: the
    candidate runs take minutes, the rules seconds, so rules can be compared without re-running them."""
    if not cache_dir:
        return collect(prob, seeds)
    tag = prob.name.replace("/", "_") + "_" + "-".join(map(str, seeds)) + f"_pilot{cal.PILOT_BATCH}"
    path = os.path.join(cache_dir, tag + ".npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=True) as f:
            return dict(zip(map(tuple, f["keys"]), f["errs"]))
    errs = collect(prob, seeds)
    os.makedirs(cache_dir, exist_ok=True)
    keys = np.empty(len(errs), dtype=object)
    keys[:] = list(errs)
    np.savez(path, keys=keys, errs=np.stack(list(errs.values())))
    return errs


def screen_scores(prob, seeds) -> np.ndarray:
    """calibrate.twin_gain of every sample of the benchmark's batch: the score by which thermo_grid's boundary
    screen ranks its pool (so a simulated pool can be drawn from the batch itself)."""
    den = prob.make()
    x_t = bq.initial_noise((prob.batch, *prob.shape), seeds, den.schedule.sigma_max)
    return cal.twin_gain(den, x_t.double() / float(den.schedule.sigma_max))[0].numpy()


SCREEN_POOL, SCREEN_KEEP = 4096, 64     # thermo_grid(boundary_pool=4096), boundary_samples 64
# (margin, screened pilot, without the shared outliers): margin 0.6 on all samples is what thermo_grid does for
# one solver; the comparison without the shared outliers (solver="auto"'s) is shown beside it
KARRAS_RULES = ((1.0, False, False), (auto.MARGIN, False, False), (auto.MARGIN, False, True),
                (auto.MARGIN, True, False))


def pilot_draw(n, pilot_b, rng, score=None):
    """Indices and weights of one simulated pilot out of the N samples: pilot_b random ones (weight 1 in all)
    or, with the batch's screen scores, as calibrate.reference builds it with boundary_pool=SCREEN_POOL: the
    top SCREEN_KEEP / SCREEN_POOL of a pool (the whole batch when N is smaller) weighted by that share, and
    pilot_b random others by the rest."""
    if score is None:
        idx = rng.choice(n, pilot_b, replace=False)
        return idx, np.full(pilot_b, 1.0 / pilot_b)
    m = min(n, SCREEN_POOL)
    k = max(1, round(SCREEN_KEEP * m / SCREEN_POOL))
    pool = rng.choice(n, m, replace=False)
    top = pool[np.argsort(-score[pool], kind="stable")[:k]]
    rest = rng.choice(np.setdiff1d(np.arange(n), top), pilot_b, replace=False)
    w = SCREEN_KEEP / SCREEN_POOL
    return np.concatenate([rest, top]), np.concatenate([np.full(pilot_b, (1 - w) / pilot_b), np.full(k, w / k)])


def choice(pilot_sq, w, margin, shared=True):
    """The candidate thermo_grid picks from a pilot's per-sample errors [C, B] and weights [B] by auto.challenge:
    as solver="auto" does (without the samples every candidate misses by far, outliers="shared"), or with
    shared=False on all samples (the single-solver choice, and auto's before session 9)."""
    return auto.challenge(pilot_sq, w, margin, outliers="shared" if shared else "none")


def simulate(errs, keys, peer, budget, pilot_b, draws, margin, rng, score=None, shared=True):
    """Fraction of simulated pilots whose choice meets the bar, and the median ratio to the best peer."""
    A = np.stack([errs[k] for k in keys])                      # [C, 2, N]
    truth = np.sqrt(A[:, 0].mean(1))
    ratios = []
    for _ in range(draws):
        idx, w = pilot_draw(A.shape[2], pilot_b, rng, score)
        c = choice(A[:, 1, idx], w, margin, shared)
        ratios.append(truth[c] / peer)
    ratios = np.asarray(ratios)
    return float((ratios <= bq.BAR[budget]).mean()), float(np.median(ratios))


def karras_check(errs, solver, budget, pilot_b, draws, margin, rng, score=None, lower=None, shared=True):
    """Expected number (over simulated pilots) of choices worse than karras beyond the 90% interval.
    lower: the interval's lower end, when the caller has it already (it depends on neither rule)."""
    ka, er = errs[(budget, solver, "karras")][0], errs[(budget, solver, "error")][0]
    if lower is None:
        lower = bq.bootstrap_ratio(er, ka)[0]    # bench_quality's own interval: the same FAIL rule
    worse = 0
    for _ in range(draws):
        idx, w = pilot_draw(ka.size, pilot_b, rng, score)
        pilot_sq = np.stack([errs[(budget, solver, g)][1, idx] for g in ("karras", "error")])
        worse += choice(pilot_sq, w, margin, shared) == 1 and lower > 1.0
    return worse / draws, float(np.sqrt(er.mean() / ka.mean()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--problems", default="")
    ap.add_argument("--pilot", type=int, default=cal.PILOT_BATCH, help="samples per simulated pilot")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the oracles' small matmuls gain "
                    "nothing from more, and other jobs on the machine stall spinning OpenMP workers)")
    ap.add_argument("--out", default="")
    ap.add_argument("--cache", default="", help="directory for the candidate runs' errors (reused when present)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suffix = "_heldout" if args.heldout else ""
    peers_json = os.path.join(bq.RESULTS, f"bench_quality_peers{suffix}.json")
    summary = json.load(open(peers_json))["summary"]
    best_peer = {(s["problem"], s["budget"]): s["best_peer_error"] for s in summary}
    seeds = qp.HELDOUT_SEEDS if args.heldout else qp.DEFAULT_SEEDS
    probs = qp.select(qp.HELDOUT if args.heldout else qp.DEFAULT, [t for t in args.problems.split(",") if t])
    rng = np.random.default_rng(0)
    # (margin, screened pilot, without the shared outliers); "plan, margin 0.6" is what solver="auto" does
    rules = {"best-of-42": (None, False, False), "plan, margin 1": (1.0, False, True),
             f"plan, margin {auto.MARGIN}, all samples": (auto.MARGIN, False, False),
             f"plan, margin {auto.MARGIN}": (auto.MARGIN, False, True),
             f"screened, margin {auto.MARGIN}": (auto.MARGIN, True, True)}
    rows, karras_rows = [], []
    print(f"bench_selection: {'HELD-OUT' if args.heldout else 'default'} problems, pilot {args.pilot} samples, "
          f"{args.draws} simulated pilots per cell")
    for prob in probs:
        if not any(p == prob.name for p, _ in best_peer):
            print(f"  ({prob.name}: not in {peers_json}; skipped)")
            continue
        errs = collect_cached(prob, seeds, args.cache)
        score = screen_scores(prob, seeds)
        for budget in BUDGETS:
            peer = best_peer[(prob.name, budget)]
            row = {"problem": prob.name, "budget": budget}
            for rule, (margin, screened, shared) in rules.items():
                if margin is None:
                    keys = [(budget, bq.label(n, o), g) for n, o in OLD_AUTO for g in cal.CANDIDATES]
                    margin = 1.0
                else:
                    keys = [(budget, bq.label(n, o), g) for n, o, g in plan_candidates(budget)]
                row[rule] = simulate(errs, keys, peer, budget, args.pilot, args.draws, margin, rng,
                                     score if screened else None, shared)
            rows.append(row)
            for lab in sorted({k[1] for k in errs}):
                lower = bq.bootstrap_ratio(errs[(budget, lab, "error")][0], errs[(budget, lab, "karras")][0])[0]
                for margin, screened, shared in KARRAS_RULES:
                    worse, full = karras_check(errs, lab, budget, args.pilot, args.draws // 4, margin, rng,
                                               score if screened else None, lower, shared)
                    karras_rows.append({"problem": prob.name, "budget": budget, "solver": lab, "margin": margin,
                                        "screened": screened, "shared_outliers_left_out": shared,
                                        "worse_than_karras": worse,
                                        "error_grid_vs_karras": full})
    names = list(rules)
    print(f"\n{'problem':30s} {'NFE':>4s} " + " ".join(f"{n + ' pass / median':>32s}" for n in names))
    for r in rows:
        cells = " ".join(f"{r[n][0]:17.2f} / {r[n][1]:8.3f}    " for n in names)
        print(f"{r['problem']:30s} {r['budget']:4d} {cells}")
    print("\nexpected cells meeting the bar (sum of pass fractions) out of", len(rows))
    for n in names:
        print(f"  {n:24s} {sum(r[n][0] for r in rows):6.2f}")
    print("\nsingle-solver calibrated grid (karras first, then 'error'): expected choices worse than karras "
          "beyond the 90% interval, over", len(karras_rows) // len(KARRAS_RULES), "(problem, solver, NFE)")
    for margin, screened, shared in KARRAS_RULES:
        sel = [r for r in karras_rows if (r["margin"], r["screened"], r["shared_outliers_left_out"])
               == (margin, screened, shared)]
        how = (", screened pilot" if screened else "") + (", without shared outliers" if shared else "")
        print(f"  margin {margin}{how}: {sum(r['worse_than_karras'] for r in sel):.1f}")
    out = args.out or os.path.join(bq.OUT, f"bench_selection{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"heldout": args.heldout, "pilot": args.pilot, "draws": args.draws, "margin": auto.MARGIN,
                   "rows": rows, "karras": karras_rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
