"""Tuning tool: solver="auto" with and without its fitted check (DEIS-3 with pilot-fitted corrections).

Where a band of auto.PLAN lists solvers in `fit_after` (9 to 14 steps, after DEIS or iPNDM), solver="auto"
fits deis's `corrections` on half of its pilot (calibrate.fit_corrections: per step, the least-squares
combination of the last two D and eps differences that moves the DEIS-3 update toward the converged
trajectory) on the choice's grid moved to the reference's nodes, and takes it if the other half measures it
better (auto.challenge with auto.CHALLENGE_MARGIN). This measures, on the tuning mixtures of
benchmarks/tuning/tune_low_nfe.py (none of them in a benchmark set), the choice without the fitted check
("before": the plan with every band's fit_after emptied), with it ("after": the plan as it is), and the
fitted run itself whatever the choice (on its grid) on a fresh batch (noise seed 9300), against the choice
and the best peer on karras, with paired-bootstrap 90 % intervals:

    python -m benchmarks.tuning.tune_fitted_steps [--steps 10] [--problems s1024,t512] [--n 1024]

A tuning tool: its problems and seeds are not checks (docs/decisions/0019-fitted-corrections.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time

import numpy as np
import torch

import thermosample as ts
from thermosample import auto, calibrate

from .. import bench_quality as bq
from .. import quality_peers as peers
from . import tune_low_nfe as tl


@contextlib.contextmanager
def plan_without_fit():
    """auto.PLAN with no band's fitted check (fit_after emptied) while the block runs."""
    saved = auto.PLAN
    auto.PLAN = tuple(dataclasses.replace(band, fit_after=()) for band in saved)
    try:
        yield
    finally:
        auto.PLAN = saved


def auto_config(den, steps: int, pd: dict, fit: bool) -> ts.SamplerConfig:
    """thermo_grid(solver="auto") on the pilot `pd`, with or without the fitted check."""
    with plan_without_fit() if not fit else contextlib.nullcontext():
        return ts.thermo_grid(den, steps, solver="auto", pilot_data=pd)


def measure(pname: str, steps: int, n: int, seed: int) -> dict:
    dim, make = tl.TUNE[pname]
    den = make()
    pd = ts.thermo_grid(den, steps, solver="dpmpp_2m", sample_shape=(dim,)).pilot
    before, after = auto_config(den, steps, pd, False), auto_config(den, steps, pd, True)
    sig = calibrate.reference_nodes(before.sigmas[:-1], pd)
    b = pd["ref_final"].shape[0]
    fitted = calibrate.fit_corrections(den, sig, pd, np.arange(0, b, 2))
    x_t = bq.initial_noise((n, dim), [seed], den.schedule.sigma_max)
    ref, _ = bq.reference(den, x_t, 400)

    def run(grid, solver, opts):
        out = ts.sample(den, noise=x_t.float(), grid=grid, solver=solver, track=False, progress=False, **opts)
        return bq.score_run(out.samples, ref, n, 1)

    out = {"before": run(before.sigmas, before.solver, before.options),
           "after": run(after.sigmas, after.solver, after.options),
           "fitted": run(np.append(sig, 0.0), "deis", {"corrections": fitted}),
           "choice": [before.solver, before.meta["chosen"]],
           "taken": after.options.get("corrections") is not None,
           "pilot": after.meta.get("fit_errors", {})}
    out["peers"] = {}
    for p, ev in peers.peer_configs().items():
        res, _ = peers.run_peer(p, den, x_t.float().clone(), peers.karras_sigmas(bq.steps_within(ev, steps),
                                                                                  den.schedule))
        out["peers"][p] = bq.score_run(res, ref, n, 1)["_sq"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--problems", default=",".join(tl.TUNE))
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=9300)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'problem':10s} {'choice':22s} {'fitted / choice [90%]':22s} {'check':6s} "
          f"{'before / best peer':19s} {'after / best peer':19s}")
    for pname in args.problems.split(","):
        t0 = time.time()
        r = measure(pname, args.steps, args.n, args.seed)
        fs, bs, as_ = r["fitted"]["_sq"], r["before"]["_sq"], r["after"]["_sq"]
        best = min(float(v.mean()) for v in r["peers"].values())
        ratio = lambda sq: float(np.sqrt(sq.mean() / best))  # noqa: E731
        lo, hi = bq.bootstrap_ratio(fs, bs)
        rows.append((ratio(bs), ratio(as_)))
        print(f"{pname:10s} {'@'.join(r['choice']):22s} {np.sqrt(fs.mean() / bs.mean()):5.2f} [{lo:.2f}-{hi:.2f}]"
              f"{'':6s} {'takes' if r['taken'] else 'keeps':6s} {ratio(bs):5.2f}{'':14s} {ratio(as_):5.2f}"
              f"   ({time.time() - t0:.0f} s)", flush=True)
    v = np.asarray(rows)
    for k, name in enumerate(("before", "after")):
        col = v[:, k]
        print(f"{name:6s}: at most 1.0 x the best peer on {int((col <= 1.0).sum())} of {len(v)}, at most 0.8 x on "
              f"{int((col <= 0.8).sum())}, geo-mean {np.exp(np.log(col).mean()):.3f} x, worst {col.max():.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
