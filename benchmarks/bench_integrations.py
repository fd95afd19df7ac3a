"""End-to-end: thermosample's drop-in integrations vs the peers' own loops, 50 steps, a 1x1-conv model.

For each pair (k-diffusion sampler, diffusers scheduler) it times one full 50-step run of the peer and of
thermosample on the same device, model, inputs and sigmas (interleaved, best of --repeats), so the
difference is the per-step update cost (the model is cheap on purpose). Prints a table and writes JSON
naming the device to benchmarks/out/bench_integrations.json.

    python benchmarks/bench_integrations.py [--shape 4 4 128 128] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import types

import torch

STEPS = 50


def load_k_sampling():
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


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def diffusers_loop(sch, conv, x0):
    sch.set_timesteps(STEPS, device=x0.device)
    x = x0 * getattr(sch, "init_noise_sigma", 1.0)
    scale = getattr(sch, "scale_model_input", lambda x, t: x)  # flow matching has none
    for t in sch.timesteps:
        x = sch.step(conv(scale(x, t)), t, x).prev_sample
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[4, 4, 128, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_integrations.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(args.shape[1], args.shape[1], 1).to(dev).requires_grad_(False)
    x0 = torch.randn(args.shape, device=dev)
    cases = []  # (name, peer_fn, ours_fn)

    kd = load_k_sampling()
    if kd is not None:
        from thermosample.integrations import k_diffusion as tk
        sig = kd.get_sigmas_karras(STEPS, 0.002, 80.0, device=dev)
        model = lambda x, s: conv(x) / (1 + s.view(-1, 1, 1, 1) ** 2) ** 0.5  # noqa: E731
        for name in ("sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde"):
            peer, ours = getattr(kd, name), getattr(tk, name)
            cases.append((f"k_diffusion.{name}", lambda p=peer: p(model, x0 * sig[0], sig, disable=True),
                          lambda o=ours: o(model, x0 * sig[0], sig, disable=True)))
    try:
        import diffusers
        from diffusers import DDPMScheduler

        from thermosample.integrations import diffusers as td
        cfg = DDPMScheduler(num_train_timesteps=1000).config
        for peer_name, ours_name in (("EulerDiscreteScheduler", "ThermoEulerDiscreteScheduler"),
                                     ("EulerAncestralDiscreteScheduler", "ThermoEulerAncestralDiscreteScheduler"),
                                     ("HeunDiscreteScheduler", "ThermoHeunDiscreteScheduler"),
                                     ("DPMSolverMultistepScheduler", "ThermoDPMSolverMultistepScheduler"),
                                     ("FlowMatchEulerDiscreteScheduler", "ThermoFlowMatchEulerDiscreteScheduler")):
            flow = "Flow" in peer_name
            mk_p = (lambda c=getattr(diffusers, peer_name), f=flow: c() if f else c.from_config(cfg))
            mk_o = (lambda c=getattr(td, ours_name), f=flow: c() if f else c.from_config(cfg))
            cases.append((f"diffusers.{peer_name}", lambda m=mk_p: diffusers_loop(m(), conv, x0),
                          lambda m=mk_o: diffusers_loop(m(), conv, x0)))
    except ImportError:
        pass
    if not cases:
        sys.exit("neither k-diffusion nor diffusers is installed")

    rows = []
    with torch.no_grad():
        for name, peer, ours in cases:
            peer(), ours()  # warm-up
            tp, to = [], []
            for _ in range(args.repeats):
                tp.append(timed(peer, dev))
                to.append(timed(ours, dev))
            rows.append({"case": name, "peer_s": min(tp), "thermosample_s": min(to), "speedup": min(tp) / min(to)})
    cpu_name = platform.processor() or platform.machine()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name
    print(f"device: {dev} ({device_name}), threads={torch.get_num_threads()}, state {tuple(args.shape)} float32, "
          f"{STEPS} steps, 1x1-conv model, best of {args.repeats}")
    print(f"{'case':48s} {'peer ms':>10s} {'ours ms':>10s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['case']:48s} {1e3 * r['peer_s']:10.1f} {1e3 * r['thermosample_s']:10.1f} {r['speedup']:8.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": str(dev), "device_name": device_name, "threads": torch.get_num_threads(),
                   "shape": args.shape, "steps": STEPS, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
