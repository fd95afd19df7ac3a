"""End-to-end: thermosample's entry points vs the peers' own loops, 50 steps, a cheap per-channel model.

Each row is one pair run on the same device, model, inputs and sigmas: a k-diffusion sampler and its
drop-in (thermosample.integrations.k_diffusion), a diffusers scheduler and its drop-in
(thermosample.integrations.diffusers: one scheduler each, made once as a pipeline holds one; a run is
`set_timesteps` + the denoising loop, as a pipeline call does), and `ts.sample` against k-diffusion's same
sampler. The model is cheap on purpose, so the difference is the per-step update cost: the host overhead of
the loop on small states, the memory passes of the update on large ones. By default it scales each channel
(one elementwise pass); `--model conv` uses a 1x1 convolution instead, which on the 2-core CPU VM runs 3-5x
slower with torch's 2 threads than with 1 and varies by as much between calls (oneDNN; 10-15 ms against
2.9 ms at 16 MB), noise that swamps the per-step cost being measured.

Timing: per row, `--repeats` rounds of (peer, ours, model alone), interleaved so that a busy machine slows
all three alike; reported are the minimum and the spread (max - min) / min of each. speedup = peer min /
ours min. Per-step overhead = (loop min - model min) / steps, where "model alone" makes the same model
calls as the loop (the loop's NFE count of them) on the same input: it is what the loop costs beyond the
model (the solver update, the scheduler's bookkeeping, the Python around them). k-diffusion's
sample_dpmpp_2m_sde gets its `default_noise_sampler` (randn per step) rather than its default Brownian tree,
which costs seconds per step at 16 MB; the drop-in draws in-kernel Philox normals. On CUDA, `ts.sample` also
runs with cuda_graph=True: the model replays inside the graph too, so that row's "overhead" is the whole
run's time beyond the eager model calls and can be negative. Prints one table per state size and writes
JSON naming the device to benchmarks/out/bench_integrations.json.

    python -m benchmarks.bench_integrations [--sizes-kb 64 1024 16384] [--repeats 15] [--device cpu] [--threads 1]
        [--model scale|conv]
    python -m benchmarks.bench_integrations --sizes-kb 64 --only diffusers.Euler   # one row, quickly
    python -m benchmarks.bench_integrations --threads 1 --clock cpu   # CPU time: on a machine shared with others
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
import types

import torch

import thermosample as ts
from thermosample.apps.bench import device_name

STEPS = 50
SHAPES = {64: (4, 4, 32, 32), 1024: (4, 4, 128, 128), 16384: (4, 16, 256, 256)}   # float32 states
KDIFF = ("sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde")
DIFFUSERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
             "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler")
TS_SAMPLE = ("euler", "dpmpp_2m")


def shape_of(size_kb: int) -> tuple[int, ...]:
    """[4, C, H, W] float32 of size_kb KiB (the three defaults as above; others [4, 4, 1, n])."""
    if size_kb in SHAPES:
        return SHAPES[size_kb]
    numel = size_kb * 1024 // 4
    return (4, 4, 1, max(1, numel // 16))


def load_k_sampling():
    """k-diffusion's sampling.py without its package __init__ (which imports torchvision); None if absent."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        return None
    pkg, utils = types.ModuleType("_kd_peer"), types.ModuleType("_kd_peer.utils")
    pkg.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules.update({"_kd_peer": pkg, "_kd_peer.utils": utils})
    s = importlib.util.spec_from_file_location("_kd_peer.sampling", spec.submodule_search_locations[0] + "/sampling.py")
    mod = importlib.util.module_from_spec(s)
    sys.modules["_kd_peer.sampling"] = mod
    s.loader.exec_module(mod)
    return mod


class Counted:
    """A model that counts its calls (the NFE of a loop, for the model-alone timing)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def diffusers_loop(sch, model, x0):
    sch.set_timesteps(STEPS, device=x0.device)
    x = x0 * getattr(sch, "init_noise_sigma", 1.0)
    scale = getattr(sch, "scale_model_input", lambda x, t: x)  # flow matching has none
    for t in sch.timesteps:
        x = sch.step(model(scale(x, t), t), t, x).prev_sample
    return x


def make_net(kind, channels, dev):
    """The cheap model: "scale" multiplies each channel by its own weight, "conv" is a 1x1 convolution."""
    if kind == "conv":
        return torch.nn.Conv2d(channels, channels, 1).to(dev).requires_grad_(False)
    w = (1.0 + 0.1 * torch.randn(1, channels, 1, 1)).to(dev)
    return lambda x: x * w


def make_cases(dev, shape, only, model_kind="scale"):
    """[(name, peer(model), ours(model), model_alone(n), model)]: peer/ours run one whole loop."""
    torch.manual_seed(0)
    conv = make_net(model_kind, shape[1], dev)
    x0 = torch.randn(shape, device=dev)
    cases = []

    kd = load_k_sampling()
    if kd is not None:
        from thermosample.integrations import k_diffusion as tk
        sig = kd.get_sigmas_karras(STEPS, 0.002, 80.0, device=dev)
        kmodel = Counted(lambda x, s: conv(x) / (1 + s.view(-1, 1, 1, 1) ** 2) ** 0.5)
        s_in = torch.full((shape[0],), 1.0, device=dev)

        def kalone(n):
            for _ in range(n):
                kmodel.fn(x0, s_in)
        for name in KDIFF:
            peer, ours = getattr(kd, name), getattr(tk, name)
            # The SDE sampler's default noise is a Brownian tree, seconds per step at 16 MB: the peer draws
            # randn instead (its default_noise_sampler), as ours draws in-kernel Philox normals.
            kw = {"noise_sampler": kd.default_noise_sampler(x0)} if name.endswith("_sde") else {}
            label = f"k_diffusion.{name}" + (" (randn)" if kw else "")
            cases.append((label, lambda p=peer, kw=kw: p(kmodel, x0 * sig[0], sig, disable=True, **kw),
                          lambda o=ours: o(kmodel, x0 * sig[0], sig, disable=True), kalone, kmodel))
        den = ts.Denoiser(kmodel, ts.schedules.EDM(), prediction="x0", time="sigma", scale_input=False)
        for solver in TS_SAMPLE:
            for graph in (False, True) if dev.type == "cuda" else (False,):
                cases.append((f"ts.sample({solver}{', cuda_graph' if graph else ''}) vs k_diffusion",
                              lambda p=getattr(kd, "sample_" + solver): p(kmodel, x0 * sig[0], sig, disable=True),
                              lambda s=solver, g=graph: ts.sample(den, noise=x0 * sig[0], grid=sig, solver=s,
                                                                  progress=False, cuda_graph=g),
                              kalone, kmodel))
    try:
        import diffusers
        from diffusers import DDPMScheduler

        from thermosample.integrations import diffusers as td
        cfg = DDPMScheduler(num_train_timesteps=1000).config
        dmodel = Counted(lambda x, t: conv(x))

        def dalone(n):
            for _ in range(n):
                conv(x0)
        for peer_name in DIFFUSERS:
            flow = "Flow" in peer_name
            # one scheduler per side, as a pipeline holds one: each run is set_timesteps + the loop
            peer_sch, ours_sch = (getattr(mod, prefix + peer_name)() if flow else
                                  getattr(mod, prefix + peer_name).from_config(cfg)
                                  for mod, prefix in ((diffusers, ""), (td, "Thermo")))
            cases.append((f"diffusers.{peer_name}", lambda s=peer_sch: diffusers_loop(s, dmodel, x0),
                          lambda s=ours_sch: diffusers_loop(s, dmodel, x0), dalone, dmodel))
    except ImportError:
        pass
    return [c for c in cases if not only or any(o.lower() in c[0].lower() for o in only)]


CLOCK = time.perf_counter      # --clock cpu: time.process_time (CPU time of this process, on CPU only)


def timed(fn, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = CLOCK()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return CLOCK() - t0


def stats(times) -> dict:
    lo = min(times)
    return {"min_s": lo, "spread": (max(times) - lo) / lo, "times_s": times}


def bench_size(dev, size_kb, repeats, only, model_kind="scale"):
    shape = shape_of(size_kb)
    rows = []
    with torch.no_grad():
        for name, peer, ours, alone, model in make_cases(dev, shape, only, model_kind):
            model.calls = 0
            peer()                                            # warm-up (lazy imports, caches, graph capture)
            nfe = model.calls                                 # the loop's model calls (ours make as many)
            ours()
            tp, to, tm = [], [], []
            for _ in range(repeats):
                tp.append(timed(peer, dev))
                to.append(timed(ours, dev))
                tm.append(timed(lambda: alone(nfe), dev))
            p, o, m = stats(tp), stats(to), stats(tm)
            rows.append({"case": name, "nfe": nfe, "peer": p, "ours": o, "model": m,
                         "speedup": p["min_s"] / o["min_s"],
                         "peer_overhead_us_per_step": (p["min_s"] - m["min_s"]) / STEPS * 1e6,
                         "ours_overhead_us_per_step": (o["min_s"] - m["min_s"]) / STEPS * 1e6})
    return shape, rows


def table(dev_name, threads, size_kb, shape, repeats, rows, model_kind="scale") -> str:
    model = "1x1-conv" if model_kind == "conv" else "per-channel scale"
    lines = [f"state {size_kb} KB {tuple(shape)} float32, {STEPS} steps, {model} model, {dev_name}, "
             f"threads={threads}, torch {torch.__version__}, min of {repeats} interleaved runs "
             "(spr = spread, (max - min) / min; us/st = (loop - model alone) / steps)",
             f"{'case':40s} {'peer ms':>8s} {'spr':>5s} {'ours ms':>8s} {'spr':>5s} {'speedup':>8s} "
             f"{'model ms':>8s} {'peer us/st':>10s} {'ours us/st':>10s}"]
    for r in rows:
        lines.append(f"{r['case']:40s} {1e3 * r['peer']['min_s']:8.2f} {100 * r['peer']['spread']:4.0f}% "
                     f"{1e3 * r['ours']['min_s']:8.2f} {100 * r['ours']['spread']:4.0f}% {r['speedup']:7.2f}x "
                     f"{1e3 * r['model']['min_s']:8.2f} {r['peer_overhead_us_per_step']:10.1f} "
                     f"{r['ours_overhead_us_per_step']:10.1f}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-kb", type=int, nargs="+", default=[64, 1024, 16384])
    ap.add_argument("--repeats", type=int, default=15,
                    help="interleaved rounds at 64 KB; larger states get fewer (at least 3) to bound the run time")
    ap.add_argument("--only", nargs="*", default=None, help="run the rows whose name contains one of these")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--model", choices=("scale", "conv"), default="scale",
                    help="the cheap model: per-channel scale (default) or a 1x1 convolution")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU time of the process instead of wall time (CPU device; with --threads 1 a "
                         "machine shared with other jobs then measures the work, not the time others held the CPU)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_integrations.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.clock == "cpu":
        if dev.type != "cpu":
            sys.exit("--clock cpu measures CPU work: use it with --device cpu")
        global CLOCK
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    name = device_name(dev)
    threads = torch.get_num_threads()
    result = {"device": str(dev), "device_name": name, "threads": threads, "steps": STEPS, "model": args.model,
              "clock": args.clock,
              "torch": torch.__version__, "sizes": []}
    for size_kb in args.sizes_kb:
        # CPU loops grow with the state; a GPU's stay launch-bound, so it keeps every repeat.
        scale = 1 if dev.type == "cuda" else max(1, int(math.sqrt(size_kb / 64)) // 2)
        repeats = max(3, args.repeats // scale)
        shape, rows = bench_size(dev, size_kb, repeats, args.only, args.model)
        text = table(name, threads, size_kb, shape, repeats, rows, args.model)
        if args.clock == "cpu":
            text = text.replace("min of", "CPU time, min of", 1)
        print(text + "\n", flush=True)
        result["sizes"].append({"size_kb": size_kb, "shape": list(shape), "repeats": repeats, "rows": rows,
                                "table": text})
    if not any(s["rows"] for s in result["sizes"]):
        sys.exit("nothing to compare: neither k-diffusion nor diffusers is installed (or --only matched no row)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
