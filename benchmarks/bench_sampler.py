"""Whole sampling runs: thermosample.sample per step, with and without CUDA-graph capture, beside the
same Euler / DPM++(2M) / Euler-ancestral loop written in plain eager PyTorch (the update and the
per-sample squared-velocity reduction as separate torch ops). The model is a 1x1 conv, cheap on purpose,
so the figures are the per-step cost of the sampler itself: on a GPU that is mostly host launch overhead,
which CUDA graphs remove. On CUDA three variants of ours: without graphs (cuda_graph=False), the default
(cuda_graph=None: ts.sample captures a repeated configuration by itself) and cuda_graph=True. Prints a
table and writes JSON naming the device.

    python -m benchmarks.bench_sampler [--shape 4 4 64 64] [--steps 50] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import thermosample as ts
from thermosample.apps.bench import device_name


class ConvEps(torch.nn.Module):
    """The cheap eps model: a 1x1 convolution, scaled (a Module, as real models are)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)

    def forward(self, x, t):
        return self.conv(x) * 0.1


def eager_loop(model, sigmas, x, solver, gen):
    """The textbook loop in eager torch: D = x - sigma * eps, then the solver's update."""
    old_d = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = x - s * model(x, s)
        rate = ((x - d) / s).square().flatten(1).sum(1)           # what our kernels track for free
        if solver == "euler":
            x = x + (s_next - s) * (x - d) / s
        elif solver == "euler_ancestral":
            up = torch.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
            down = torch.sqrt(s_next**2 - up**2)
            x = x + (down - s) * (x - d) / s + up * torch.randn(x.shape, generator=gen, device=x.device)
        else:                                                     # dpmpp_2m with t = -log sigma
            h = torch.log(s / s_next) if s_next > 0 else None
            if s_next == 0:
                x = d
            elif old_d is None:
                x = (s_next / s) * x - torch.expm1(-h) * d
            else:
                h_last = torch.log(sigmas[i - 1] / s)
                r = h_last / h
                x = (s_next / s) * x - torch.expm1(-h) * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old_d)
            old_d = d
        del rate
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs="+", default=[4, 4, 64, 64])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "out", "bench_sampler.json"))
    args = p.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = ConvEps(args.shape[1]).to(device)
    den = ts.Denoiser(model, ts.schedules.EDM(), prediction="eps", time="sigma")
    sigmas = torch.tensor(ts.grids.make_grid("karras", args.steps, den.schedule), dtype=torch.float32,
                          device=device)
    x0 = torch.randn(args.shape, device=device) * sigmas[0]
    gen = torch.Generator(device=device).manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def best(fn):
        fn()                                                                  # warm-up / capture
        times = []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    rows = []
    with torch.no_grad():
        for solver in ["euler", "dpmpp_2m", "euler_ancestral"]:
            t = {"eager torch": best(lambda: eager_loop(model, sigmas, x0, solver, gen)),
                 "ours": best(lambda: ts.sample(den, noise=x0, grid=sigmas, solver=solver, progress=False,
                                                cuda_graph=False))}
            if device.type == "cuda":
                # the default (cuda_graph=None) captures a repeated configuration by itself: a conv model
                # qualifies (a torch.nn.Module), so from the second call on it replays
                t["ours, default"] = best(lambda: ts.sample(den, noise=x0, grid=sigmas, solver=solver,
                                                            progress=False))
                t["ours + cuda_graph"] = best(lambda: ts.sample(den, noise=x0, grid=sigmas, solver=solver,
                                                                progress=False, cuda_graph=True))
            for k, v in t.items():
                rows.append(dict(solver=solver, variant=k, ms=v * 1e3, us_per_step=v / args.steps * 1e6,
                                 speedup_vs_eager=t["eager torch"] / v))
    name = device_name(device)
    lines = [f"{args.steps}-step sampling runs, state {args.shape} float32, 1x1-conv model, device {name}, "
             f"torch {torch.__version__}",
             f"{'solver':<17}{'variant':<20}{'ms/run':>9}{'us/step':>9}{'x eager':>9}"]
    lines += [f"{r['solver']:<17}{r['variant']:<20}{r['ms']:>9.2f}{r['us_per_step']:>9.1f}"
              f"{r['speedup_vs_eager']:>9.2f}" for r in rows]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "shape": args.shape, "steps": args.steps,
                   "rows": rows, "table": "\n".join(lines)}, f, indent=1)


if __name__ == "__main__":
    main()
