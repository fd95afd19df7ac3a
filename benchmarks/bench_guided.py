"""Guided sampling, measured: `solver="auto"` through a diffusers pipeline loop against diffusers' UniPC and
DPM-Solver++ (2M, 3M) on a class-conditional model under classifier-free guidance (issue 38, item 3).

    python -m benchmarks.bench_guided [--scales 1,3,7] [--budgets 6,10,20] [--batch 200] [--seeds 101,102,103]
        [--threads 1] [--json PATH]

The model is benchmarks/conditional.py's (8x8 digits, epsilon prediction, diffusers' default linear betas over
1000 steps, label dropout 0.15, trained and cached on the first run). Every method runs the same loop a
diffusers class-conditional pipeline runs (`cfg_loop`): for w > 1 scale_model_input on [x; x], one network
call with labels [class; NULL], eps_u + w (eps_c - eps_u), scheduler.step; at w = 1 the classes only. A batch
holds each class's batch / 10 rows together.

* peers: UniPCMultistepScheduler (its defaults: bh2, order 2) and DPMSolverMultistepScheduler
  (algorithm_type dpmsolver++, solver_order 2 and 3), each with its default config on the model's schedule:
  timestep_spacing "linspace", final_sigmas_type "zero", lower_order_final True; NFE = num_inference_steps.
  NFE 50 is also run for the best-peer envelope that the break-even reads.
* auto: thermosample.integrations.diffusers.calibrate_pipeline(pipe, NFE, conditioning=the ten classes,
  negative_conditioning=NULL, guidance_scale=w) (`conditional.calibrate`): solver="auto" on the denoiser the
  pipeline runs (pipeline_denoiser: the same guidance in eps space), the default cost tier with its pilot
  rounded down to a multiple of 20 samples, each keeping one class through every stage; run through
  `ThermoAutoScheduler.from_sampler_config(config, scheduler_config)` in the same loop, and checked against
  `ts.sample(den, noise, grid=config)` (column "vs ts": max |difference|).
* start: the same ODE state for every method, x_VP = z at the first timestep (999): the peers' latents
  z * init_noise_sigma (= z), the Euler-convention state z * sqrt(1 + sigma_max^2) for auto and the reference.
* reference: the converged guided ODE solution from that state (`reference`: float64 weights, DPM-Solver++(2M)
  on 1000 and 500 log-SNR steps, Richardson-extrapolated, in the runs' batches); its error bound is printed.
* scores per cell: RMS error per coordinate pooled over the seeds' batches, the median per-sample error,
  auto / best peer (the peer with the lowest RMS error at that NFE and scale) with a paired-bootstrap 90%
  interval, the calibration's model rows (state rows, each of which is two network rows at w != 1: JSON
  "calibration_network_rows") and wall seconds, and the break-even in samples: the calibration's rows over
  the evaluations one sample saves at auto's error (the best-peer envelope's NFE for that error, log-log
  between its budgets 6, 10, 20, 50, minus auto's NFE). "never" when the peers reach auto's error at auto's
  NFE or fewer; "peers>50" when no peer reaches it by NFE 50 (then it is below rows / (50 - NFE)).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings

import numpy as np
import torch

import thermosample as ts
import thermosample.ops  # noqa: F401  (bench_quality.initial_noise draws with ts.ops.randn)

from . import bench_quality as bq
from . import conditional
from .bench_price import peer_nfe

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
SCALES = (1.0, 3.0, 7.0)
BUDGETS = (6, 10, 20)
ENVELOPE = 50                   # one more peer budget, for the break-even's envelope only
SEEDS = (101, 102, 103)         # not the calibration pilot's (CalibrationOptions.pilot_seed 12345)
BATCH = 200
REF_STEPS = 1000

# name -> (diffusers class name, config beyond the defaults)
PEERS = {
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
}


def peer_scheduler(name: str):
    import diffusers

    cls, extra = PEERS[name]
    return getattr(diffusers, cls).from_config({**conditional.SCHEDULER_CONFIG, **extra})


def auto_scheduler(config):
    from thermosample.integrations.diffusers import ThermoAutoScheduler

    return ThermoAutoScheduler.from_sampler_config(config, conditional.SCHEDULER_CONFIG)


def cfg_loop(scheduler, net, w: float, latents: torch.Tensor, steps: int | None = None,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """A diffusers pipeline's denoising loop under classifier-free guidance from `latents` (already scaled
    by init_noise_sigma); returns (final latents, network calls). labels: the class of each row (default
    conditional.row_labels: each class's rows together). As diffusers' class-conditional pipelines (DiT):
    with guidance (w > 1) the network sees [x; x] with labels [class; NULL] and eps_u + w (eps_c - eps_u) goes
    to the step; at w = 1 it sees x with the classes only."""
    n = latents.shape[0]
    labels = conditional.row_labels(n) if labels is None else labels
    guided = w > 1
    both = torch.cat([labels, torch.full((n,), conditional.NULL)]) if guided else labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(steps)
    x, calls = latents, 0
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        with torch.no_grad():
            eps = net(inp, t, both)
        calls += 1
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + w * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x, calls


def start_state(seeds, batch: int) -> tuple[torch.Tensor, float]:
    """(z [len(seeds) * batch, 64] float64 unit noise, seed after seed; sigma_max of the model's schedule)."""
    z = bq.initial_noise((batch, 64), seeds, 1.0)
    return z, float(ts.schedules.DiscreteVP(conditional.alphas_cumprod()).sigma_max)


def _seeded_batches(fn, z, batch):
    """fn(z of one seed's batch) for each seed's batch, concatenated (each batch holds every class)."""
    return torch.cat([fn(z[i:i + batch]) for i in range(0, z.shape[0], batch)])


def run(scales=SCALES, budgets=BUDGETS, batch: int = BATCH, seeds=SEEDS, net=None, ref_steps: int = REF_STEPS,
        envelope: int | None = ENVELOPE, options: ts.CalibrationOptions | None = None, log=print) -> dict:
    """The table's rows (one per scale and budget) and the references' error bounds; options: the
    calibration's (None: the default tier, no progress bar)."""
    net = net if net is not None else conditional.load_model(log=log)[0]
    z, sigma_max = start_state(seeds, batch)
    x_hat = z * math.sqrt(1.0 + sigma_max ** 2)
    nseeds = len(seeds)
    peer_budgets = sorted(set(budgets) | ({envelope} if envelope else set()))
    rows, refs = [], {}
    for w in scales:
        t0 = time.perf_counter()
        den = conditional.guided_denoiser(w, net)
        ref, info = reference(den.reference_denoiser, x_hat, ref_steps, batch)
        refs[w] = info
        peers = {}
        for nfe in peer_budgets:
            for name in PEERS:
                out = _seeded_batches(lambda zb: _counted(cfg_loop(peer_scheduler(name), net, w, zb.float(), nfe),
                                                          nfe), z, batch)
                peers[name, nfe] = bq.score_run(out, ref, batch, nseeds)
        for nfe in budgets:
            c0 = time.perf_counter()
            config = conditional.calibrate(w, nfe, net, options)
            seconds = time.perf_counter() - c0
            out = _seeded_batches(lambda zb: _counted(cfg_loop(auto_scheduler(config), net, w,
                                                               (zb * math.sqrt(1 + sigma_max ** 2)).float()), nfe),
                                  z, batch)
            direct = _seeded_batches(lambda zb: ts.sample(den, noise=(zb * math.sqrt(1 + sigma_max ** 2)).float(),
                                                          grid=config, track=False).samples, z, batch)
            score = bq.score_run(out, ref, batch, nseeds)
            rows.append(_row(w, nfe, score, peers, peer_budgets, config, seconds,
                             float((out - direct).abs().max())))
        log(f"  w={w:g}: {time.perf_counter() - t0:.0f} s (reference error bound {info['error_bound']:.1e})")
    return {"rows": rows, "reference": {str(w): i for w, i in refs.items()}}


def reference(den, x_hat, steps: int, batch: int | None = None) -> tuple[torch.Tensor, dict]:
    """The converged ODE solution from x_hat (float64 den): DPM-Solver++(2M) on `steps` and steps / 2 log-SNR
    steps, Richardson-extrapolated, in the sampling batches of `batch` rows (a row's class follows its place
    in its batch, as in the runs; bench_quality's reference would re-solve subsets). info: "error_bound" RMS
    |x_steps - x_steps/2| / 3, "max_sample_bound" the largest sample's."""
    batch = batch or x_hat.shape[0]
    a = _seeded_batches(lambda xb: bq._solve(den, xb, steps), x_hat, batch)
    b = _seeded_batches(lambda xb: bq._solve(den, xb, steps // 2), x_hat, batch)
    diff = (a - b).reshape(a.shape[0], -1).square().mean(1).sqrt() / 3
    return (4 * a - b) / 3, {"error_bound": float(diff.square().mean().sqrt()), "max_sample_bound": float(diff.max()),
                             "steps": steps}


def _counted(result, nfe):
    x, calls = result
    if calls != nfe:
        raise RuntimeError(f"the loop made {calls} model calls for NFE {nfe}")
    return x


def _row(w, nfe, score, peers, peer_budgets, config, seconds, vs_ts) -> dict:
    cell = {name: peers[name, nfe] for name in PEERS}
    best = min(cell, key=lambda k: cell[k]["error"])
    lo, hi = bq.bootstrap_ratio(score["_sq"], {k: v["_sq"] for k, v in cell.items()})
    envelope = {b: min(peers[k, b]["error"] for k in PEERS) for b in peer_budgets}
    match = peer_nfe(envelope, score["error"])
    rows = int(config.meta["calibration_rows"])
    network_rows = int(config.calibrated_for["guidance"]["network_rows"])
    saves = None if match is None else match - nfe
    return {"scale": w, "budget": nfe, "solver": config.solver, "options": config.options,
            "auto_error": score["error"], "auto_median": score["median"], "auto_switched": score["switched"],
            "peers": {k: {"error": v["error"], "median": v["median"], "switched": v["switched"]}
                      for k, v in cell.items()},
            "best_peer": best, "best_peer_error": cell[best]["error"], "best_peer_median": cell[best]["median"],
            "ratio": score["error"] / cell[best]["error"], "ratio_ci90": [lo, hi],
            "median_ratio": score["median"] / cell[best]["median"],
            "calibration_rows": rows, "calibration_network_rows": network_rows,
            "calibration_seconds": round(seconds, 1), "pilot_batch": int(config.calibrated_for["pilot"]["batch"]),
            "saves_per_sample": saves,
            "break_even": None if saves is None or saves <= 0 else rows / saves,
            "pipeline_vs_ts_sample_max_abs": vs_ts}


def _break_even(r) -> str:
    if r["saves_per_sample"] is None:
        return f"peers>{ENVELOPE}"
    return "never" if r["break_even"] is None else f"{r['break_even']:,.0f}"


def choice(r) -> str:
    """auto's solver and options, fitted corrections named rather than listed, with the pilot's size."""
    opts = ", ".join(f"{k}={'fitted' if k == 'corrections' else f'{v:.3g}' if isinstance(v, float) else v}"
                     for k, v in r["options"].items())
    return f"{r['solver']}({opts}) pilot {r['pilot_batch']}"


def table(rows) -> str:
    lines = [f"{'w':>3s} {'NFE':>3s} {'unipc':>8s} {'dpmpp_2m':>8s} {'dpmpp_3m':>8s} {'auto':>8s} "
             f"{'auto/best [90%]':>20s} {'median a/p':>10s} {'rows':>6s} {'calib s':>7s} {'break-even':>10s} "
             f"{'vs ts':>7s}  auto's choice"]
    for r in rows:
        p = r["peers"]
        lines.append(f"{r['scale']:3g} {r['budget']:3d} {p['unipc']['error']:8.2e} {p['dpmpp_2m']['error']:8.2e} "
                     f"{p['dpmpp_3m']['error']:8.2e} {r['auto_error']:8.2e} "
                     f"{r['ratio']:6.3f} [{r['ratio_ci90'][0]:.2f}, {r['ratio_ci90'][1]:.2f}] "
                     f"{r['median_ratio']:10.3f} {r['calibration_rows']:6d} {r['calibration_seconds']:7.1f} "
                     f"{_break_even(r):>10s} {r['pipeline_vs_ts_sample_max_abs']:7.1e}  {choice(r)}")
    lines.append("errors: RMS per coordinate against the converged guided ODE solution (pixels in [-1, 1]); rows: "
                 "the calibration's state rows (x2 network rows at w != 1); vs ts: max |pipeline - ts.sample|")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default=",".join(f"{w:g}" for w in SCALES))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--batch", type=int, default=BATCH, help="samples per seed (a multiple of 10: class-balanced)")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(OUT, "bench_guided.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    net, info = conditional.load_model(threads=args.threads, log=print)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = run([float(w) for w in args.scales.split(",")], [int(b) for b in args.budgets.split(",")], args.batch,
              seeds, net)
    import diffusers

    print(f"device: {torch.device('cpu')} ({os.cpu_count()} cores, {args.threads} threads), torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}; {len(seeds)} seeds x {args.batch} samples")
    print("reference error bound: " + ", ".join(f"w={w}: {i['error_bound']:.1e}" for w, i in res["reference"].items()))
    print(table(res["rows"]))
    wall = time.perf_counter() - t0
    print(f"wall {wall:.0f} s; model: {info['path']} ({'cached' if info['cached'] else 'trained'}, training "
          f"{info['train_seconds']} s)")
    meta = {"device": "cpu", "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "seeds": seeds,
            "batch": args.batch, "model": {**info, "config": conditional.DEFAULT.__dict__},
            "calibration": "calibrate_pipeline (thermosample.integrations.diffusers), run by ThermoAutoScheduler",
            "reference": res["reference"], "wall_seconds": round(wall, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": res["rows"]}, f, indent=1, default=_plain)
    print(f"JSON: {args.json}")
    return 0


def _plain(o):
    return o.item() if isinstance(o, np.generic) else str(o)


if __name__ == "__main__":
    raise SystemExit(main())
