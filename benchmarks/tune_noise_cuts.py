"""solver="auto"'s low-noise stage on tuning mixtures: which noise_below cut, and which margin.

From solvers.AUTO_NOISE_FROM steps, solver="auto" reruns its UniPC choice on the pilot with noise_below at
each of solvers.AUTO_NOISE_CUTS times the data's scale and keeps a cut whose pilot error is below
AUTO_NOISE_MARGIN times the plain run's (docs/calibration.md §13, §15). This measures, on mixtures that
no benchmark set contains (construction seeds 801-807 and 811-818), the pilot's errors for every cut and
each cut's RMS error on a large fresh batch against the converged ODE solution, next to the best peer on
karras (diffusers' UniPC-3/2, DPM++ 3M and DEIS-3), and then what two policies would have chosen:

    python benchmarks/tune_noise_cuts.py [--n 2048] [--seed 9200] [--steps 20] [--problems t512,t32]

Prints one table per problem and the policies' summary; writes --json if given. About 10 minutes for the
fourteen problems at 2048 samples on two cores. A tuning tool: its problems and seeds are not checks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import bench_quality as bq  # noqa: E402
import quality_peers as peers  # noqa: E402
from quality_problems import aniso_mixture, mixture  # noqa: E402

import thermosample as ts  # noqa: E402
from thermosample import calibrate  # noqa: E402
from thermosample.solvers import AUTO_NOISE_ORDER  # noqa: E402

VP = ts.schedules.VPLinear
TUNE = {  # name: (dimension, denoiser factory)
    "t512": (512, lambda: mixture(512, 4, 0.04, 0.12, 801).denoiser("edm")),
    "t1024vp": (1024, lambda: mixture(1024, 5, 0.03, 0.1, 802).denoiser(VP())),
    "t384an": (384, lambda: aniso_mixture(384, 3, 0.03, 0.25, 803).denoiser("cosine")),
    "t1536": (1536, lambda: mixture(1536, 4, 0.04, 0.12, 804).denoiser("condot")),
    "t768sh": (768, lambda: mixture(768, 8, 0.01, 0.04, 805).denoiser("edm")),
    "t32": (32, lambda: mixture(32, 6, 0.03, 0.15, 806).denoiser("edm")),
    "t1152an": (1152, lambda: aniso_mixture(1152, 4, 0.03, 0.2, 811).denoiser("edm")),
    "t768k6": (768, lambda: mixture(768, 6, 0.03, 0.12, 812).denoiser("edm")),
    "t384anvp": (384, lambda: aniso_mixture(384, 3, 0.03, 0.3, 813).denoiser(VP())),
    "t600sh": (600, lambda: mixture(600, 10, 0.01, 0.04, 814).denoiser("edm")),
    "t300an": (300, lambda: aniso_mixture(300, 5, 0.02, 0.2, 815).denoiser("edm")),
    "t512k6": (512, lambda: mixture(512, 6, 0.03, 0.1, 816).denoiser("edm")),
    "t2048vp": (2048, lambda: mixture(2048, 4, 0.05, 0.15, 817).denoiser(VP())),
    "t900c": (900, lambda: mixture(900, 5, 0.03, 0.12, 818).denoiser("cosine")),
}
PEERS = ("diffusers:unipc(bh2,o3)", "diffusers:unipc(bh2,o2)", "diffusers:dpmpp(o3)", "diffusers:deis(o3)")
CUTS = (0.3, 0.2, 0.1)
POLICIES = {"cuts 0.2/0.1, margin 0.6": ((0.2, 0.1), 0.6), "cuts 0.3/0.2/0.1, margin 0.8": ((0.3, 0.2, 0.1), 0.8)}


def _rms(out, ref) -> tuple[float, int]:
    """(RMS error, samples with a per-sample RMS error above 20 x the batch's median)."""
    per = (out.double() - ref).reshape(ref.shape[0], -1).square().mean(1).sqrt().numpy()
    return float(np.sqrt(np.mean(per ** 2))), int((per > 20 * np.median(per)).sum())


def measure(name: str, n: int, seed: int, steps: int) -> dict:
    dim, make = TUNE[name]
    den = make()
    x_t = bq.initial_noise((n, dim), [seed], den.schedule.sigma_max)
    ref, _ = bq.reference(den, x_t, 400)
    peer = {p: _rms(peers.run_peer(p, den, x_t.float().clone(), peers.karras_sigmas(steps, den.schedule))[0], ref)[0]
            for p in PEERS}
    saved = calibrate.AUTO_NOISE_CUTS
    calibrate.AUTO_NOISE_CUTS = CUTS      # measure every cut on the pilot (the choice is redone below)
    try:
        grid = ts.thermo_grid(den, steps, solver="auto", sample_shape=(dim,))
    finally:
        calibrate.AUTO_NOISE_CUTS = saved
    scale = calibrate.data_scale(grid.pilot)
    pilot = list(grid.meta["noise_below_errors"].values())       # off, then CUTS in order
    plain = {k: v for k, v in grid.meta["solver_options"].items() if k not in ("noise_below", "noise_order")}
    runs = {}
    for cut in (None, *CUTS):
        opts = plain if cut is None else {**plain, "noise_below": cut * scale, "noise_order": AUTO_NOISE_ORDER}
        out = ts.sample(den, noise=x_t.float(), grid=grid, solver=grid.meta["solver"], track=False, **opts).samples
        runs[cut] = _rms(out, ref)
    return {"solver": grid.meta["solver"], "options": plain, "pilot": dict(zip(["off", *CUTS], pilot)),
            "runs": {str(k): v for k, v in runs.items()}, "best_peer": min(peer.values()), "peers": peer}


def choose(pilot: dict, cuts, margin: float):
    """The cut a policy takes from the pilot's errors (calibrate.prefer_default on the plain RMS errors)."""
    k = calibrate.prefer_default([pilot["off"]] + [pilot[c] for c in cuts], margin)
    return None if k == 0 else cuts[k - 1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=9200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--problems", default=",".join(TUNE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, ratios = {}, {p: [] for p in POLICIES}
    for name in args.problems.split(","):
        t0 = time.time()
        r = results[name] = measure(name, args.n, args.seed, args.steps)
        print(f"== {name} ({time.time() - t0:.0f} s): {r['solver']} {r['options']}, best peer {r['best_peer']:.3e}")
        for cut, (rms, tail) in r["runs"].items():
            p = r["pilot"]["off" if cut == "None" else float(cut)]
            print(f"  cut {cut:5s} pilot {p:.3e}  batch {rms:.3e} ({rms / r['best_peer']:.2f} x best peer, "
                  f"{tail} samples > 20 x median)")
        for policy, (cuts, margin) in POLICIES.items():
            cut = choose(r["pilot"], cuts, margin)
            ratios[policy].append(r["runs"][str(cut)][0] / r["best_peer"])
            print(f"  {policy}: cut {cut} -> {ratios[policy][-1]:.2f} x best peer")
    for policy, v in ratios.items():
        print(f"{policy}: at most 0.8 x the best peer on {sum(x <= 0.8 for x in v)} of {len(v)}, "
              f"geometric mean {np.exp(np.mean(np.log(v))):.3f} x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
