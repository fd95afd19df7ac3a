"""solver="auto"'s low-noise stage on tuning mixtures: which noise_below cut, and which margin.

In the bands of auto.PLAN with a `noise_cut`, solver="auto" reruns its UniPC run on the pilot with
noise_below at each of auto.NOISE_CUTS times the data's scale (DEIS-auto.NOISE_ORDER below the cut) and
keeps the cut that wins auto.challenge with auto.CHALLENGE_MARGIN (docs/decisions/0012-noise-below.md,
0015-cut-03-margin-08.md). This measures, on mixtures that no benchmark set contains (construction seeds
801-807 and 811-818), the pilot's errors for every cut of CUTS on the grid solver="auto" chose
(calibrate.pilot_errors) and each cut's RMS error on a large fresh batch against the converged ODE solution,
next to the best peer on karras (diffusers' UniPC-3/2, DPM++ 3M and DEIS-3), and then what each policy
(cuts, margin; auto.challenge on the pilot's per-sample errors) would have chosen. A problem on which auto
chooses another solver than UniPC is reported and skipped.

    python -m benchmarks.tuning.tune_noise_cuts [--n 2048] [--seed 9200] [--steps 20] [--problems t512,t32]

Prints one table per problem and the policies' summary; writes --json if given. About 10 minutes for the
fourteen problems at 2048 samples on two cores. A tuning tool: its problems and seeds are not checks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import thermosample as ts
from thermosample import auto, calibrate

from .. import bench_quality as bq
from .. import quality_peers as peers
from ..quality_problems import aniso_mixture, mixture

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
POLICIES = {"cuts 0.2/0.1, margin 0.6": ((0.2, 0.1), 0.6),
            f"plan: cuts {'/'.join(map(str, auto.NOISE_CUTS))}, margin {auto.CHALLENGE_MARGIN}":
            (auto.NOISE_CUTS, auto.CHALLENGE_MARGIN)}
CUTS = tuple(sorted({c for cuts, _ in POLICIES.values() for c in cuts}, reverse=True))   # every cut measured


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
    config = ts.thermo_grid(den, steps, solver="auto", sample_shape=(dim,))
    plain = {k: v for k, v in config.options.items() if k not in ("noise_below", "noise_order")}
    out = {"solver": config.solver, "options": plain, "best_peer": min(peer.values()), "peers": peer}
    if config.solver != "unipc":      # the noise cuts are UniPC's
        return out
    pd, sig = config.pilot, config.sigmas[:-1]
    scale = calibrate.data_scale(pd)
    pilot, pilot_sq, runs = {}, {}, {}
    for cut in (None, *CUTS):
        key = "off" if cut is None else str(cut)
        opts = plain if cut is None else {**plain, "noise_below": cut * scale, "noise_order": auto.NOISE_ORDER}
        pilot[key], sq = calibrate.pilot_errors(den, sig, config.solver, pd, "auto", opts)
        pilot_sq[key] = sq.tolist()
        res = ts.sample(den, noise=x_t.float(), grid=config.sigmas, solver=config.solver, track=False, **opts)
        runs[key] = _rms(res.samples, ref)
    weight = calibrate.sample_weights(pd, len(sq)).tolist()
    return {**out, "pilot": pilot, "pilot_sq": pilot_sq, "weight": weight, "runs": runs}


def choose(r: dict, cuts, margin: float) -> str:
    """The cut a policy takes from the pilot's per-sample errors: auto.challenge of every cut against the
    plain run ("off"), as solver="auto"'s noise stage decides."""
    sq = np.stack([r["pilot_sq"]["off"]] + [r["pilot_sq"][str(c)] for c in cuts])
    k = auto.challenge(sq, np.asarray(r["weight"]), margin)
    return "off" if k == 0 else str(cuts[k - 1])


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
        if "runs" not in r:
            print(f"  auto chose {r['solver']}, not UniPC: no noise cut to measure")
            continue
        for cut, (rms, tail) in r["runs"].items():
            print(f"  cut {cut:5s} pilot {r['pilot'][cut]:.3e}  batch {rms:.3e} ({rms / r['best_peer']:.2f} x best "
                  f"peer, {tail} samples > 20 x median)")
        for policy, (cuts, margin) in POLICIES.items():
            cut = choose(r, cuts, margin)
            ratios[policy].append(r["runs"][cut][0] / r["best_peer"])
            print(f"  {policy}: cut {cut} -> {ratios[policy][-1]:.2f} x best peer")
    for policy, v in ratios.items():
        if not v:
            continue
        print(f"{policy}: at most 0.8 x the best peer on {sum(x <= 0.8 for x in v)} of {len(v)}, "
              f"geometric mean {np.exp(np.mean(np.log(v))):.3f} x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
