"""`thermosample demo`: the main job on the embedded exact-score Gaussian mixture.

Samples the mixture with several solvers, grids and schedules from the same noise and prints, per run:
steps, model evaluations, samples/s, RMS error against the converged ODE solution from the same noise,
sliced W2 to the data distribution, kinetic cost K, entropy production S, the speed-limit bound and the
efficiency. The headline (Ikeda et al. 2025): CondOT dissipates less than cosine for the same data.
Rows with grid "calibrated" use `ts.thermo_grid` (a pilot-calibrated grid, docs/theory.md §6) beside karras.
"""
from __future__ import annotations

import json
import math
import time

import torch

from .. import toy
from ..calibrate import thermo_grid
from ..sampler import sample
from ..schedules import get_schedule
from ..solvers import injects_noise
from ..validate import import_optional

# (schedule, solver, grid, steps)
DEFAULT_RUNS = [
    ("condot", "euler", "uniform", 20),
    ("cosine", "euler", "uniform", 20),
    ("condot", "heun", "karras", 10),
    ("cosine", "heun", "karras", 10),
    ("condot", "dpmpp_2m", "logsnr", 10),
    ("cosine", "dpmpp_2m", "logsnr", 10),
    ("condot", "dpmpp_2m", "karras", 20),
    ("cosine", "dpmpp_2m", "karras", 20),
    ("condot", "dpmpp_2m", "karras", 10),
    ("condot", "dpmpp_2m", "calibrated", 10),   # ts.thermo_grid: pilot-calibrated grid (docs/theory.md §6)
    ("condot", "dpmpp_2m", "calibrated", 20),
    ("condot", "auto", "calibrated", 10),       # the recommended configuration: solver and grid from the pilot
    ("condot", "auto", "calibrated", 20),
    ("condot", "euler_maruyama", "logsnr", 100),
    ("cosine", "euler_maruyama", "logsnr", 100),
]
REFERENCE = ("dpmpp_2m", "logsnr", 200)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference per coordinate."""
    return float((a.double() - b.double()).square().mean().sqrt())


def run_demo(batch: int = 1024, seed: int = 0, runs=None, backend: str = "auto", extra_rows=None) -> list[dict]:
    """Run the demo table; returns one dict per row. `extra_rows(den_by_schedule, noise_by_schedule,
    reference)` may add rows (used for the calibrated grid)."""
    mix = toy.default_mixture()
    data = mix.sample(20000, seed=seed + 1)
    rows, refs = [], {}
    for name, solver, grid, steps in runs or DEFAULT_RUNS:
        den = mix.denoiser(name)
        if name not in refs:
            ref = sample(den, (batch, mix.dim), steps=REFERENCE[2], solver=REFERENCE[0], grid=REFERENCE[1],
                         seed=seed, backend=backend, track=False, dtype=torch.float64)
            refs[name] = ref.samples
            # warm-up in float32 (the reference ran float64), so one-time set-up is not timed below
            sample(den, (batch, mix.dim), steps=2, solver="heun", seed=seed, backend=backend)
        grid_arg = grid
        if grid == "calibrated":  # the calibration (its own pilot batch and seed) is not timed: reusable
            grid_arg = thermo_grid(den, steps, solver=solver, sample_shape=(mix.dim,), backend=backend)
        start = time.perf_counter()
        out = sample(den, (batch, mix.dim), steps=steps, solver=solver, grid=grid_arg, seed=seed, backend=backend)
        elapsed = time.perf_counter() - start
        th = out.thermo.summary()
        label = f"auto:{grid_arg.meta['solver']}" if solver == "auto" else solver
        rows.append({"schedule": name, "solver": label, "stochastic": solver != "auto" and injects_noise(solver, {}),
                     "grid": grid, "steps": steps, "nfe": out.nfe,
                     "samples_per_s": batch / elapsed, "error": rms(out.samples, refs[name]),
                     "sliced_w2": toy.sliced_w2(out.samples, data), **th, "_report": out.thermo})
    return rows


def format_table(rows: list[dict]) -> str:
    head = (f"{'schedule':<8} {'solver':<15} {'grid':<10} {'steps':>5} {'NFE':>4} {'samples/s':>10} "
            f"{'err vs ODE':>10} {'sliced W2':>9} {'K':>8} {'S':>8} {'bound':>8} {'effic.':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "   (SDE)" if r["stochastic"] else f"{r['error']:.2e}"
        lines.append(f"{r['schedule']:<8} {r['solver']:<15} {r['grid']:<10} {r['steps']:>5} {r['nfe']:>4} "
                     f"{r['samples_per_s']:>10.0f} {err:>10} {r['sliced_w2']:>9.4f} {r['kinetic']:>8.3f} "
                     f"{r['entropy']:>8.2f} {r['speed_limit']:>8.3f} {r['efficiency']:>6.3f}")
    return "\n".join(lines)


def headline(rows: list[dict]) -> str:
    """Compare CondOT and cosine kinetic cost on matching (solver, grid, steps) rows."""
    pairs = []
    for r in rows:
        if r["schedule"] != "condot":
            continue
        for q in rows:
            same_run = (q["solver"], q["grid"], q["steps"]) == (r["solver"], r["grid"], r["steps"])
            if q["schedule"] == "cosine" and same_run:
                pairs.append((r["kinetic"], q["kinetic"]))
    if not pairs:
        return ""
    wins = sum(k_ot < k_cos for k_ot, k_cos in pairs)
    ratio = sum(k_ot / k_cos for k_ot, k_cos in pairs) / len(pairs)
    return (f"CondOT dissipates less than cosine in {wins}/{len(pairs)} matched runs "
            f"(mean K ratio CondOT/cosine = {ratio:.3f}; Ikeda et al., PRX 15, 031031, Eqs. 93-95).")


def calibrated_line(rows: list[dict]) -> str:
    """Error of the calibrated grid against karras at the same solver and budget."""
    out = []
    for r in rows:
        if r["grid"] != "calibrated":
            continue
        k = [q for q in rows if q["grid"] == "karras" and (q["schedule"], q["solver"], q["steps"]) ==
             (r["schedule"], r["solver"], r["steps"])]
        if k:
            out.append(f"NFE {r['nfe']}: x{r['error'] / k[0]['error']:.2f}")
    line = ("calibrated grid (ts.thermo_grid) error relative to karras, DPM++(2M): " + ", ".join(out)) if out else ""
    auto = []
    for r in rows:
        k = [q for q in rows if q["grid"] == "karras" and q["solver"] == "dpmpp_2m" and q["steps"] == r["steps"]
             and q["schedule"] == r["schedule"]]
        if r["solver"].startswith("auto:") and k:
            auto.append(f"NFE {r['nfe']}: x{r['error'] / k[0]['error']:.2f}")
    if auto:
        line += ("\n" if line else "") + ("recommended solver='auto' (solver and grid chosen on the pilot) error "
                                          "relative to DPM++(2M) on karras: " + ", ".join(auto))
    return line


def plot_rows(rows: list[dict], path: str) -> str:
    # a Figure of its own (no pyplot state, the user's matplotlib backend untouched)
    figure = import_optional("matplotlib.figure", "plot", "thermosample demo --plot")
    fig = figure.Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2)
    for r in rows:
        if r["solver"] != "dpmpp_2m" or r["grid"] != "karras" or r["steps"] != 20:
            continue
        t, rate = r["_report"].profile()
        axes[0].plot(t, rate, marker=".", label=f"{r['schedule']} (K={r['kinetic']:.2f})")
    axes[0].set(xlabel="physical time t", ylabel="E ||nu||^2", title="dissipation profile (DPM++(2M), karras, 20)")
    axes[0].legend()
    # One point per deterministic run: position = (NFE, error), colour = schedule, label = solver/grid.
    colours = {"condot": "tab:blue", "cosine": "tab:orange"}
    for r in rows:
        if r["stochastic"]:
            continue
        axes[1].scatter(r["nfe"], r["error"], color=colours.get(r["schedule"], "gray"))
        axes[1].annotate(f"{r['solver']}/{r['grid']}", (r["nfe"], r["error"]), fontsize=6,
                         xytext=(3, 2), textcoords="offset points")
    for name, colour in colours.items():
        axes[1].scatter([], [], color=colour, label=name)
    axes[1].set(xscale="log", yscale="log", xlabel="model evaluations", ylabel="RMS error vs converged ODE",
                title="accuracy (same noise)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def machine() -> str:
    """The CPU and torch's thread count: samples/s and the wall time depend on both (and on the load)."""
    from .bench import device_name
    return f"{device_name(torch.device('cpu'))}, torch threads {torch.get_num_threads()}"


def main(args) -> int:
    start = time.perf_counter()
    rows = run_demo(batch=args.batch, seed=args.seed, backend=args.backend)
    print(f"thermosample demo: exact-score Gaussian mixture (d={toy.default_mixture().dim}, 8 modes), "
          f"batch {args.batch}, seed {args.seed}, backend {args.backend}\non {machine()}")
    print(format_table(rows))
    print(headline(rows))
    print(calibrated_line(rows))
    sch = get_schedule("condot")
    print(f"(t in [{sch.t_min:g}, {sch.t_max:g}]; K = integral E||nu||^2 dt, S = integral E||nu||^2/T dt, "
          f"bound = E||x_end - x_start||^2/t, efficiency = bound/K)")
    if args.plot:
        print(f"wrote {plot_rows(rows, args.plot)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], f, indent=1)
        print(f"wrote {args.json}")
    print(f"done in {time.perf_counter() - start:.1f} s wall, torch threads {torch.get_num_threads()} (samples/s and "
          "time depend on the machine and its load)")
    return 0 if all(math.isfinite(r["kinetic"]) for r in rows) else 1
