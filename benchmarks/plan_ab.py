"""solver="auto" under the committed PLAN against PLAN with one band's `last` moved, side by side on the same
problems and noise: the before / after of a change to the plan's band boundaries, at the default cost tier
(the tier the done-when of a change is about), before any peer is run.

    python -m benchmarks.plan_ab SET STEPS --last BAND=LAST [--seeds 500,501]

SET: default | heldout | learned (bench_quality's problems; --seeds picks other noise than their benchmark
seeds, the default 500-503, for learned 500-501) or a set of bench_quality_fresh (its own problems and
seeds). --last 3=19: the other arm's PLAN[3] ends at 19 steps. Prints per problem the error ratio (this
tree's PLAN over the other), the switched samples and the median error of both; identical configs are said
as such. Decision 0031 measured the 9-19-step band to 20 steps with a tree whose PLAN[3] ended at 20:
`python -m benchmarks.plan_ab fresh24 20 --last 3=19`; on the committed PLAN, `--last 3=20` is the same
comparison with the arms swapped.
"""
from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import replace

import torch

import thermosample as ts
from thermosample import auto

from . import bench_quality as bq
from . import quality_problems as qp


def problems(name: str, seeds: str | None):
    if name in ("default", "heldout", "learned"):
        chosen = tuple(int(s) for s in seeds.split(",")) if seeds else (
            (500, 501) if name == "learned" else (500, 501, 502, 503))
        return {"default": qp.DEFAULT, "heldout": qp.HELDOUT, "learned": qp.LEARNED}[name], chosen
    from .bench_quality_fresh import SETS
    return SETS[name]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("set")
    ap.add_argument("steps", type=int)
    ap.add_argument("--last", required=True, help="BAND=LAST: the other arm's PLAN[BAND].last (None: open)")
    ap.add_argument("--seeds", default=None)
    args = ap.parse_args(argv)
    index, value = args.last.split("=")
    mine = auto.PLAN
    other = list(mine)
    other[int(index)] = replace(other[int(index)], last=None if value == "None" else int(value))
    other = tuple(other)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    probs, seeds = problems(args.set, args.seeds)
    print(f"auto at {args.steps} steps, default tier: this PLAN / PLAN[{index}].last = {value}")
    for prob in probs:
        t0 = time.perf_counter()
        den, b = prob.make(), prob.batch
        configs = {}
        for name, plan in (("this", mine), ("other", other)):
            auto.PLAN = plan
            try:
                configs[name] = ts.thermo_grid(den, args.steps, solver="auto", sample_shape=tuple(prob.shape),
                                               options=ts.CalibrationOptions(progress=False))
            finally:
                auto.PLAN = mine
        choice = {k: (c.solver, c.options, c.sigmas.tolist()) for k, c in configs.items()}   # not their timings
        if choice["this"] == choice["other"]:
            print(f"{prob.name:34s} same config {configs['this']!r}", flush=True)
            continue
        x_t = bq.initial_noise((b, *prob.shape), seeds, den.schedule.sigma_max)
        ref, _ = bq.reference(getattr(den, "reference_denoiser", None) or den, x_t, 400)
        score = {k: bq.score_run(ts.sample(den, noise=x_t.float(), grid=c, track=False).samples, ref, b, len(seeds))
                 for k, c in configs.items()}
        t, o = score["this"], score["other"]
        print(f"{prob.name:34s} {t['error'] / o['error']:.3f} x  switched {o['switched']} -> {t['switched']}  median "
              f"{o['median']:.3g} -> {t['median']:.3g}  ({configs['other']!r} -> {configs['this']!r}, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
