"""solver="auto" at few steps on tuning mixtures: which (solver, grid) candidates, and which rule.

solver="auto" measures the default and the alternative (solver, options, grid) of auto.band_for(steps) on
its pilot and keeps the default unless the alternative wins auto.challenge with margin auto.MARGIN
(docs/decisions/0002-default-and-margin.md, 0003-two-candidates-per-band.md), then the band's check, noise
cuts and fitted corrections. This measures, on mixtures that no benchmark set contains (construction seeds
801-818 of tune_noise_cuts.py and 821-838 here), every configuration of BAND_CONFIGS[steps] on the pilot (its
errors against the pilot's converged samples) and on a large fresh batch (RMS error against the converged ODE
solution), next to every peer on karras, and then what each policy of POLICIES[steps] would have chosen,
and the plan itself ("plan": the band as auto.PLAN has it, less the fitted corrections) where
BAND_CONFIGS[steps] holds every configuration it measures:

    python -m benchmarks.tuning.tune_low_nfe [--n 4096] [--seed 9300] [--steps 6] [--problems t512,t32]

Prints one table per problem and the policies' summary; writes --json if given. A tuning tool: its
problems and seeds are not checks.
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
from thermosample.solvers import get_solver

from .. import bench_quality as bq
from .. import quality_peers as peers
from ..quality_problems import aniso_mixture, mixture, spectral_mixture
from . import tune_noise_cuts as tnc

VP, COS = ts.schedules.VPLinear, "cosine"
TUNE = dict(tnc.TUNE)
TUNE.update({  # shaped like the NFE-6 misses of the unseen sets: 256-2048 dimensions, 3-8 modes, VP/cosine
    "u1280vp": (1280, lambda: mixture(1280, 8, 0.03, 0.12, 821, weight_spread=4.0).denoiser(VP())),
    "u448an": (448, lambda: aniso_mixture(448, 4, 0.03, 0.25, 822).denoiser(VP())),
    "u1664vp": (1664, lambda: mixture(1664, 5, 0.04, 0.12, 823).denoiser(VP())),
    "u256an": (256, lambda: aniso_mixture(256, 4, 0.03, 0.2, 824).denoiser("edm")),
    "u1408c": (1408, lambda: mixture(1408, 3, 0.03, 0.12, 825, weight_spread=4.0).denoiser(COS)),
    "u480vp": (480, lambda: mixture(480, 6, 0.03, 0.1, 826).denoiser(VP())),
    "u1792c": (1792, lambda: mixture(1792, 3, 0.04, 0.12, 827).denoiser(COS)),
    "u352anvp": (352, lambda: aniso_mixture(352, 6, 0.02, 0.2, 828).denoiser(VP())),
})
TUNE.update({  # image-like spectra and overlapping classes (the kind of fresh17/fresh18; other seeds)
    "s1024": (1024, lambda: spectral_mixture(1024, 5, 1.0, 0.3, 831).denoiser("edm")),
    "s768vp": (768, lambda: spectral_mixture(768, 4, 1.5, 0.3, 832).denoiser(VP())),
    "s512c": (512, lambda: spectral_mixture(512, 3, 1.2, 0.5, 833).denoiser(COS)),
    "s2048": (2048, lambda: spectral_mixture(2048, 3, 1.0, 0.2, 834).denoiser("edm")),
    "s384vp": (384, lambda: spectral_mixture(384, 6, 2.0, 0.4, 835).denoiser(VP())),
    "s256": (256, lambda: spectral_mixture(256, 8, 0.7, 0.6, 836).denoiser("condot")),
    "s1536c": (1536, lambda: spectral_mixture(1536, 2, 1.0, 0.5, 837).denoiser(COS)),
    "s128": (128, lambda: spectral_mixture(128, 10, 1.0, 0.3, 838).denoiser("edm")),
})
_O3, _U2, _U3H = {"order": 3}, {}, {"order": 3, "max_h": auto.MAX_H}


def _cut(opts: dict, c: float) -> dict:
    """`opts` with noise prediction below c x the data's scale (calibrate.data_scale of the pilot), DEIS-3."""
    return {**opts, "noise_below": ("scale", c), "noise_order": auto.NOISE_ORDER}


BAND_CONFIGS = {  # steps: (solver, options, grid) to measure at that many steps
    6: (("euler", {}, "jump"), ("deis", {}, "error"), ("deis", {}, "karras"), ("deis", {"order": 2}, "karras"),
        ("deis", {}, "jump"), ("deis", {}, "logsnr"), ("unipc", {}, "karras"), ("unipc", {"order": 3}, "karras"),
        ("unipc", {}, "error"), ("unipc", {}, "jump"), ("ipndm", {}, "error"), ("ipndm", {}, "karras"),
        ("ipndm", {}, "jump"), ("dpmpp_3m", {}, "karras"), ("dpmpp_2m", {}, "jump")),
    10: (("unipc", _U3H, "error"), ("ipndm", {}, "error"), ("ipndm", {}, "jump"),
         ("unipc", {}, "jump"), ("unipc", {"order": 3}, "jump"), ("unipc", _U3H, "jump"),
         ("deis", {}, "jump"), ("ipndm", {}, "karras"), ("unipc", {"order": 3}, "karras"), ("unipc", {}, "karras"),
         ("deis", {}, "karras"), ("deis", {}, "error"), ("unipc", {}, "error"), ("dpmpp_3m", {}, "karras"),
         ("deis", {}, "logsnr"), *(("unipc", _cut(_U3H, c), "error") for c in (1.0, 0.3, 0.2, 0.1))),
}
BAND_CONFIGS[20] = (
    ("unipc", _O3, "error"), *(("unipc", _cut(_O3, c), "error") for c in (0.3, 0.2, 0.1)),
    ("deis", {}, "karras"), ("deis", {}, "error"), ("deis", {}, "logsnr"), ("deis", {}, "kl_optimal"),
    ("unipc", _O3, "karras"), ("unipc", _cut(_O3, 0.3), "karras"), ("unipc", _cut(_O3, 1.0), "karras"),
    ("unipc", _cut(_O3, 1.0), "error"),
    ("ipndm", {}, "karras"), ("dpmpp_3m", {}, "karras"), ("deis", {}, "jump"), ("unipc", _O3, "logsnr"),
)
BAND_CONFIGS[16] = (  # the 15-17 band: each UniPC default with and without solver="auto"'s noise cuts
    *(cfg for o in (_U2, _U3H, _O3)
      for cfg in (("unipc", o, "error"), *(("unipc", _cut(o, c), "error") for c in auto.NOISE_CUTS))),
    ("ipndm", {}, "error"), ("ipndm", {}, "karras"), ("deis", {}, "karras"), ("deis", {}, "error"),
    ("deis", {}, "logsnr"), ("unipc", _O3, "karras"), ("dpmpp_3m", {}, "karras"))
BAND_CONFIGS[18] = BAND_CONFIGS[16]
SMALL = (("ipndm", {}, "jump"), ("euler", {}, "jump"), ("deis", {}, "jump"), ("deis", {}, "error"),
         ("deis", {}, "karras"), ("deis", {"order": 2}, "karras"), ("unipc", {}, "karras"))
BAND_CONFIGS.update({5: SMALL, 7: SMALL})
BAND_CONFIGS[8] = BAND_CONFIGS[9] = (  # where the first band hands over to the second
    ("unipc", {"order": 3, "max_h": auto.MAX_H}, "error"), ("ipndm", {}, "error"), ("ipndm", {}, "jump"),
    ("euler", {}, "jump"), ("deis", {}, "jump"), ("unipc", {}, "jump"), ("deis", {}, "karras"),
    ("unipc", {"order": 3}, "karras"))


def name(cfg) -> str:
    solver, opts, grid = cfg
    opts = {k: (f"{v[1]}xscale" if isinstance(v, tuple) else v) for k, v in opts.items()}
    return bq.label(solver, opts) + "@" + grid


_C6, _C10 = BAND_CONFIGS[6], BAND_CONFIGS[10]
POLICIES = {  # steps: {name: (candidates, default first; margin[; the check: a configuration on karras])}
    6: {"before: euler@jump | deis@error, 0.6": ([_C6[0], _C6[1]], 0.6),
        "band: ipndm@jump | euler@jump, 0.6": ([_C6[12], _C6[0]], 0.6),
        "now: band, check ipndm@karras": ([_C6[12], _C6[0]], 0.6, _C6[11]),
        "min of all": (list(_C6), 1.0)},
    10: {"band: unipc(o3,max_h)@error | ipndm@error, 0.6": ([_C10[0], _C10[1]], 0.6),
         "now: band, check deis@karras": ([_C10[0], _C10[1]], 0.6, _C10[10]),
         "min of all": (list(_C10), 1.0)},
}
_E = {k: ("unipc", o, "error") for k, o in (("u2", _U2), ("u3h", _U3H), ("u3", _O3))}
_IE, _DK = ("ipndm", {}, "error"), ("deis", {}, "karras")
for _n in (16, 18):
    POLICIES[_n] = {  # choose's arguments: candidates, margin, check or None, noise, check_last, noise_first
        "15-17 band: u2@error | ipndm@error + noise": ([_E["u2"], _IE], 0.6, None, True),
        "15-17 band + check deis@karras": ([_E["u2"], _IE], 0.6, _DK, True),
        "9-14 band: u3h@error | ipndm@error + noise": ([_E["u3h"], _IE], 0.6, None, True),
        "9-14 band + check deis@karras": ([_E["u3h"], _IE], 0.6, _DK, True),
        "18+ band: u3@error | u2@error + noise": ([_E["u3"], _E["u2"]], 0.6, None, True),
        "18+ band + check deis@karras": ([_E["u3"], _E["u2"]], 0.6, _DK, True),
        "15-17 band, noise, then check": ([_E["u2"], _IE], 0.6, _DK, True, True),
        "9-14 band, noise, then check": ([_E["u3h"], _IE], 0.6, _DK, True, True),
        "u3h@error | u2@error + noise": ([_E["u3h"], _E["u2"]], 0.6, None, True),
        "u3h@error | u2@error | ipndm@error + noise": ([_E["u3h"], _E["u2"], _IE], 0.6, None, True),
        "u2@error | u3h@error | ipndm@error + noise": ([_E["u2"], _E["u3h"], _IE], 0.6, None, True),
        "u3h@error | u2@error | ipndm@error, 1.0 + noise": ([_E["u3h"], _E["u2"], _IE], 1.0, None, True),
        "noise first: u3h@error | ipndm@error": ([_E["u3h"], _IE], 0.6, None, False, False, True),
        "noise first: u3h@error | ipndm@error + check": ([_E["u3h"], _IE], 0.6, _DK, False, True, True),
        "noise first: u2@error | ipndm@error": ([_E["u2"], _IE], 0.6, None, False, False, True),
        "noise first: u3h@error | u2@error": ([_E["u3h"], _E["u2"]], 0.6, None, False, False, True),
        "noise first: u3@error | u2@error": ([_E["u3"], _E["u2"]], 0.6, None, False, False, True),
        "min of all": (list(BAND_CONFIGS[_n]), 1.0)}
for _n in (8, 9):
    _C = BAND_CONFIGS[_n]
    POLICIES[_n] = {"second band's: unipc(o3,max_h)@error | ipndm@error, 0.6": ([_C[0], _C[1]], 0.6),
                    "first band's: ipndm@jump | euler@jump, 0.6": ([_C[2], _C[3]], 0.6)}
for _n in (5, 7):
    POLICIES[_n] = {"before: euler@jump | deis@error, 0.6": ([SMALL[1], SMALL[3]], 0.6),
                    "band: ipndm@jump | euler@jump, 0.6": ([SMALL[0], SMALL[1]], 0.6)}


def _config(c: auto.Candidate) -> tuple[str, dict, str]:
    return c.solver, dict(c.options), c.grid


def plan_policy(steps: int):
    """The policy (choose's arguments) that auto.band_for(steps) runs, less its fitted corrections, or None
    when BAND_CONFIGS[steps] lacks a configuration it measures."""
    band = auto.band_for(steps)
    cands = [_config(band.default), _config(band.alternative)]
    check = _config(band.check) if band.check is not None else None
    needed = cands + ([check] if check else [])
    if band.noise_cut:
        needed += [(s, _cut(o, c), g) for s, o, g in cands if s == "unipc" for c in auto.NOISE_CUTS]
    measured = {name(c) for c in BAND_CONFIGS.get(steps, ())}
    if not all(name(c) in measured for c in needed):
        return None
    return cands, auto.MARGIN, check, band.noise_cut == "after", False, band.noise_cut == "before"


def measure(pname: str, n: int, seed: int, steps: int) -> dict:
    dim, make = TUNE[pname]
    den = make()
    # a single-solver grid runs both pilots ("error" needs the twin pilot, which auto skips up to 8 steps)
    pd = ts.thermo_grid(den, steps, solver="dpmpp_2m", sample_shape=(dim,)).pilot
    config = ts.thermo_grid(den, steps, solver="auto", pilot_data=pd)
    scale = calibrate.data_scale(pd)
    x_t = bq.initial_noise((n, dim), [seed], den.schedule.sigma_max)
    ref, _ = bq.reference(den, x_t, 400)

    def score(res) -> dict:
        s = bq.score_run(res, ref, n, 1)
        return {"rms": s["error"], "switched": s["switched"]}

    out = {"auto": [config.solver, bq.choice_label(config.solver, config.options), config.meta["chosen"]],
           "configs": {}, "peers": {}}
    for cfg in BAND_CONFIGS[steps]:
        solver, opts, g = cfg
        opts = {k: (v[1] * scale if isinstance(v, tuple) else v) for k, v in opts.items()}
        sig = calibrate.candidate_sigmas(g, den, bq.steps_within(get_solver(solver).evaluations, steps), solver,
                                         pd, pd)
        err, sq = calibrate.pilot_errors(den, sig, solver, pd, "auto", opts)
        res = ts.sample(den, noise=x_t.float(), grid=np.append(sig, 0.0), solver=solver, track=False,
                        progress=False, **opts).samples
        out["configs"][name(cfg)] = {"pilot": err, "pilot_sq": sq.tolist(), **score(res)}
    for p, ev in peers.peer_configs().items():
        res, _ = peers.run_peer(p, den, x_t.float().clone(),
                                peers.karras_sigmas(bq.steps_within(ev, steps), den.schedule))
        out["peers"][p] = score(res)
    return out


def choose(r: dict, cands, margin: float, check=None, noise: bool = False, check_last: bool = False,
           noise_first: bool = False) -> str:
    """The configuration `cands` (default first) gives under auto.challenge on the pilot's errors with
    `margin`, then `check` if it wins auto.challenge with auto.CHALLENGE_MARGIN leaving out the samples either
    run misses by far (solver="auto"'s check), then, with `noise` and UniPC chosen, the noise cut at
    auto.NOISE_CUTS that wins auto.challenge with auto.CHALLENGE_MARGIN (the bands with noise_cut="after");
    `check_last`: the check after the noise stage; `noise_first`: each UniPC candidate is replaced by its
    noise stage's choice before the candidates compete (noise_cut="before")."""
    pilot_sq = {k: np.asarray(v["pilot_sq"]) for k, v in r["configs"].items()}
    n = len(next(iter(pilot_sq.values())))
    weight = np.full(n, 1.0 / n)

    def noise_stage(cfg):
        if cfg[0] != "unipc":
            return cfg
        cuts = [cfg] + [(cfg[0], _cut(cfg[1], c), cfg[2]) for c in auto.NOISE_CUTS]
        best = auto.challenge(np.stack([pilot_sq[name(c)] for c in cuts]), weight, max(margin, auto.CHALLENGE_MARGIN))
        return cuts[best]

    def checked(chosen):
        pair = np.stack([pilot_sq[name(chosen)], pilot_sq[name(check)]])
        return check if auto.challenge(pair, weight, max(margin, auto.CHALLENGE_MARGIN), outliers="each") else chosen

    if noise_first:
        cands = [noise_stage(c) for c in cands]
    chosen = cands[auto.challenge(np.stack([pilot_sq[name(c)] for c in cands]), weight, margin)]
    if check is not None and not check_last:
        chosen = checked(chosen)
    if noise and not noise_first:
        chosen = noise_stage(chosen)
    if check is not None and check_last:
        chosen = checked(chosen)
    return name(chosen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=9300)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--problems", default=",".join(TUNE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--load", default=None, help="re-score the policies on a saved --json instead of measuring")
    args = ap.parse_args(argv)
    if args.steps not in BAND_CONFIGS:
        ap.error(f"--steps must be one of {sorted(BAND_CONFIGS)} (the step counts BAND_CONFIGS lists)")
    torch.set_num_threads(args.threads)
    if args.load:
        with open(args.load) as f:
            results = json.load(f)["results"]
    else:
        results = {}
        for pname in args.problems.split(","):
            t0 = time.time()
            r = results[pname] = measure(pname, args.n, args.seed, args.steps)
            best_peer = min(r["peers"], key=lambda p: r["peers"][p]["rms"])
            bp = r["peers"][best_peer]
            print(f"== {pname} ({time.time() - t0:.0f} s): auto took {r['auto']}; best peer {best_peer} "
                  f"{bp['rms']:.3e} ({bp['switched']} switched)")
            for k, v in sorted(r["configs"].items(), key=lambda kv: kv[1]["rms"]):
                print(f"  {k:28s} pilot {v['pilot']:.3e}  batch {v['rms']:.3e} ({v['rms'] / bp['rms']:.2f} x, "
                      f"{v['switched']} switched)")
            sys.stdout.flush()
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "results": results}, f)
    policies = dict(POLICIES.get(args.steps, {}))
    plan = plan_policy(args.steps)
    if plan is not None:
        policies["plan: auto.band_for(steps), no fit"] = plan
    ratios = {p: [] for p in policies}
    for pname, r in results.items():
        bp = min(v["rms"] for v in r["peers"].values())
        row = []
        for pol, spec in policies.items():
            k = choose(r, *spec)
            ratios[pol].append(r["configs"][k]["rms"] / bp)
            row.append(f"{ratios[pol][-1]:.2f}")
        print(f"{pname:10s} " + " ".join(row))
    for pol, v in ratios.items():
        print(f"{pol:45s}: at most 1.0 x the best peer on {sum(x <= 1.0 for x in v):2d} of {len(v)}, "
              f"geo-mean {np.exp(np.mean(np.log(v))):.3f} x, worst {max(v):.2f} x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
