"""Fused solver step micro-benchmark: GB/s against the copy bandwidth of the same machine (roofline).

For each solver step and state size it times, in one run and interleaved (so that a busy machine slows
every variant alike):

- ours:     the fused op on this device's backend (cpp on CPU, triton on CUDA), tracking on and off;
            the backend function itself, without ops.fused_step's argument validation
- eager:    the same math as plain eager torch expressions (linear combination + per-sample squared norm)
- ref:      thermosample.ops.reference.launch (the oracle; slow for noise steps, capped in size)
- compile:  torch.compile of the eager function, timed in a second pass beside ours ("x comp" compares
            the two from that pass; see bench_one for why)
- copy:     dst.copy_(src) of one state; copy GB/s = 2 * state bytes / time

The bytes a step must move are (n_inputs + 1) * state bytes (read every input once, write the state once;
noise is generated, not read); GB/s = those bytes / time, and "frac" = GB/s / copy GB/s. Times are the
minimum over repeats (on CUDA: device events around each call, L2 flushed before it). Writes a table
to stdout and JSON (device name included) to --out (default: thermosample's cache folder, printed).
Lives in the package so that `thermosample bench` works from any install; benchmarks/bench_step.py runs it.

    python benchmarks/bench_step.py                 # sizes 1 8 64 512 MB of float32 state
    python benchmarks/bench_step.py --quick         # small sizes, a few seconds plus compile time
    python benchmarks/bench_step.py --sizes 64 --steps euler dpmpp_2m
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable

import torch

from thermosample import ops
from thermosample.ops import reference as _reference

# name -> (n_inputs, coeffs, noise, u, d): coefficients of a representative step (values do not matter
# for speed, only which tensors are read).
STEPS = {
    "euler": (2, [0.9, 0.1], 0.0, 0, 1),               # x + dt (x - D) / sigma
    "heun": (4, [0.5, 0.2, 0.25, 0.05], 0.0, 2, 3),    # 2nd stage: x, D, x_pred, D_pred; rate at the stage
    "dpmpp_2m": (3, [0.8, 0.3, -0.1], 0.0, 0, 1),      # x, D, D_prev
    "euler_ancestral": (2, [0.9, 0.1], 0.3, 0, 1),     # x, D + Philox noise
    "unipc_3": (5, [0.8, 0.5, -0.4, 0.15, -0.05], 0.0, 0, 1),          # x, D, D_1, D_2, D_3 (UniC + UniP-3)
    "ipndm_3": (6, [0.9, 0.2, -0.1, 0.05, 0.03, -0.02], 0.0, 0, 1),    # (x, D) of the last three steps
}
ALPHA, BETA = 1.5, -1.5
BATCH = 16


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_fn(backend: str) -> Callable:
    """The backend's launch(StepArgs) itself (ops.fused_step adds the argument check, ~20 us per call)."""
    return ops.implementation(backend)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_step(inputs, coeffs, noise, u, d, track):
    """The step as plain torch expressions (noise from torch's own generator)."""
    acc = coeffs[0] * inputs[0]
    for c, t in zip(coeffs[1:], inputs[1:]):
        acc = acc + c * t
    if noise:
        acc = acc + noise * torch.randn_like(acc)
    if track:
        v = ALPHA * inputs[u] + BETA * inputs[d]
        return acc, (v * v).flatten(1).sum(1)
    return acc, (acc * 0).flatten(1).sum(1)


class Timer:
    """Interleaved min-of-repeats timing of several callables."""

    def __init__(self, device: torch.device, budget_s: float, min_reps: int, max_reps: int):
        self.device, self.budget_s, self.min_reps, self.max_reps = device, budget_s, min_reps, max_reps
        # CUDA: device-event timing of each call after overwriting a buffer larger than L2, so every
        # call starts with a cold cache (as a sampling step does, after the model ran), and after a
        # ~0.5 ms spin that keeps the GPU busy while the host enqueues the call: the events then time
        # the kernels, not the launch (host cost per call is measured separately, as call_us).
        self._flush = (torch.empty(256 * 2**20, dtype=torch.int8, device=device)
                       if device.type == "cuda" else None)

    def once(self, fn: Callable[[], object]) -> float:
        if self._flush is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._flush.zero_()
            torch.cuda._sleep(1_000_000)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        _sync(self.device)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        return time.perf_counter() - t0

    def run(self, fns: dict[str, Callable[[], object]]) -> dict[str, float]:
        """Min time of each callable; each gets about budget_s of repeats (within [min_reps, max_reps]),
        run round-robin so that a burst of load elsewhere hits every variant alike."""
        best = {k: self.once(f) for k, f in fns.items()}              # warm-up (and a first estimate)
        left = {k: int(min(self.max_reps, max(self.min_reps, self.budget_s / max(t, 1e-9))))
                for k, t in best.items()}
        while any(left.values()):
            for k, f in fns.items():
                if left[k]:
                    best[k] = min(best[k], self.once(f))
                    left[k] -= 1
        return best


def bench_one(name: str, size_mb: float, dtype: torch.dtype, device: torch.device, backend: str,
              timer: Timer, ref_max_mb: float, compiled: dict | None = None) -> dict:
    """Time one (step, size). With `compiled` (a cache dict) it times only copy, ours and torch.compile:
    the compile pass runs after every other measurement, because on a small CPU box a process that has
    run torch.compile slows later small timings (OpenMP teams spinning) and would skew the rest."""
    n_in, coeffs, noise, u, d = STEPS[name]
    elem = torch.empty((), dtype=dtype).element_size()
    per_sample = max(1, int(size_mb * 2**20) // (elem * BATCH))
    shape = (BATCH, per_sample)
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(n_in)]
    out = torch.empty_like(inputs[0])
    state_bytes = inputs[0].numel() * elem
    kw = dict(noise=noise, seed=1234, step=3, alpha=ALPHA, beta=BETA, u=u, d=d)

    ours = backend_fn(backend)
    tracked = ops.check(ops.StepArgs(inputs, coeffs, out=out, track=True, **kw))    # checked once, not timed
    untracked = tracked._replace(track=False)
    fns = {
        "copy": lambda: out.copy_(inputs[0]),
        "ours": lambda: ours(tracked),
    }
    if compiled is None:
        fns["ours_notrack"] = lambda: ours(untracked)
        fns["eager"] = lambda: eager_step(inputs, coeffs, noise, u, d, True)
        if size_mb <= ref_max_mb or noise == 0.0:
            fns["ref"] = lambda: _reference.launch(tracked)
    else:
        if name not in compiled:
            compiled[name] = torch.compile(eager_step, dynamic=False)
        cfn = compiled[name]
        fns["compile"] = lambda: cfn(inputs, coeffs, noise, u, d, True)
        cfn(inputs, coeffs, noise, u, d, True)                         # compile outside the timing
    times = timer.run(fns)

    # Host-inclusive cost: back-to-back calls, synchronised once (what a sampling loop without CUDA
    # graphs pays; on CPU it equals the kernel time).
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        fns["ours"]()
    _sync(device)
    call_us = (time.perf_counter() - t0) / 10 * 1e6

    moved = (n_in + 1) * state_bytes
    copy_gbs = 2 * state_bytes / times["copy"] / 1e9
    rec = {"step": name, "size_mb": state_bytes / 2**20, "dtype": str(dtype).replace("torch.", ""),
           "shape": list(shape), "n_inputs": n_in, "bytes_moved": moved, "backend": backend,
           "copy_gbs": copy_gbs, "times_s": times, "call_us": call_us}
    rec["gbs"] = {k: moved / t / 1e9 for k, t in times.items() if k != "copy"}
    if compiled is not None:
        rec["speedup_vs_compile"] = times["compile"] / times["ours"]
        return rec
    rec["frac_copy"] = rec["gbs"]["ours"] / copy_gbs
    rec["speedup_vs_eager"] = times["eager"] / times["ours"]
    rec["speedup_vs_ref"] = times["ref"] / times["ours"] if "ref" in times else None
    rec["speedup_vs_compile"] = None
    rec["track_overhead"] = times["ours"] / times["ours_notrack"] - 1.0
    return rec


def _cell(x, spec):
    return "-" if x is None else format(x, spec)


# (header, value of a record, format): one column each; print_table right-aligns each column to its widest cell
COLUMNS = [
    ("step", lambda r: r["step"], "s"),
    ("MB", lambda r: r["size_mb"], ".0f"),
    ("ours GB/s", lambda r: r["gbs"]["ours"], ".1f"),
    ("copy GB/s", lambda r: r["copy_gbs"], ".1f"),
    ("frac", lambda r: r["frac_copy"], ".2f"),
    ("eager", lambda r: r["gbs"]["eager"], ".2f"),
    ("ref", lambda r: r["gbs"].get("ref"), ".2f"),
    ("compile", lambda r: r["gbs"].get("compile"), ".2f"),
    ("x eager", lambda r: r["speedup_vs_eager"], ".1f"),
    ("x ref", lambda r: r["speedup_vs_ref"], ".1f"),
    ("x comp", lambda r: r["speedup_vs_compile"], ".2f"),
    ("track+", lambda r: 100 * r["track_overhead"], ".1f"),
    ("call us", lambda r: r["call_us"], ".1f"),
]


def format_table(records: list[dict]) -> list[str]:
    """The table's lines: every column as wide as its widest cell and two spaces between columns, so no
    value runs into the next whatever its size (track+ is a percentage)."""
    cells = [[h for h, _, _ in COLUMNS]]
    cells += [[_cell(get(r), spec) + ("%" if h == "track+" and get(r) is not None else "") for h, get, spec in COLUMNS]
              for r in records]
    widths = [max(len(row[k]) for row in cells) for k in range(len(COLUMNS))]
    return ["  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths)))
            for row in cells]


def print_table(records: list[dict], header: str) -> str:
    text = "\n".join([header] + format_table(records))
    print(text, flush=True)
    return text


def default_out() -> str:
    """Where the JSON goes without --out: thermosample's folder in the user's cache ($XDG_CACHE_HOME or
    ~/.cache), never the working directory; the path is printed."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "thermosample", "bench_step.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="thermosample bench", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=None, help="state sizes in MB (default 1 8 64 512)")
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--ref-max-mb", type=float, default=64.0,
                   help="largest size at which the (slow) reference runs a noise step")
    p.add_argument("--out", default=None,
                   help="JSON output path (default: bench_step.json in thermosample's cache folder, "
                        "$XDG_CACHE_HOME/thermosample or ~/.cache/thermosample; printed)")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = ops.AUTO.get(device.type, "torch")
    chosen = ops.resolve_backend(backend, device)
    if chosen != backend:
        print(f"warning: backend {backend} unavailable, 'ours' is {chosen}", file=sys.stderr)
    sizes = args.sizes or ([1, 4] if args.quick else [1, 8, 64, 512])
    timer = Timer(device, budget_s=0.2 if args.quick else 1.5, min_reps=3,
                  max_reps=30 if args.quick else 200)
    dtype = getattr(torch, args.dtype)
    name = device_name(device)
    header = (f"fused step, {args.dtype}, device {name}, backend {chosen}, torch {torch.__version__}, "
              f"threads {torch.get_num_threads()}\nGB/s = (n_inputs + 1) * state bytes / time; frac = ours / "
              f"copy; x eager/ref/comp = speedup of ours (tracking on); track+ = tracking overhead")
    print(header.splitlines()[0], file=sys.stderr, flush=True)   # progress; stdout gets it once, with the table

    records = []
    t_start = time.time()
    for step in args.steps:
        for size in sizes:
            rec = bench_one(step, size, dtype, device, chosen, timer, args.ref_max_mb)
            records.append(rec)
            print(f"  {step} {size} MB: ours {rec['gbs']['ours']:.1f} GB/s, copy {rec['copy_gbs']:.1f} GB/s",
                  file=sys.stderr, flush=True)
    if not args.no_compile:   # second pass: ours beside torch.compile (see bench_one)
        import torch._dynamo.config as dynamo_config
        for limit in ("recompile_limit", "cache_size_limit"):   # one code object, many (step, size)
            if hasattr(dynamo_config, limit):
                setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 256))
        compiled: dict = {}
        for rec in records:
            crec = bench_one(rec["step"], rec["size_mb"], dtype, device, chosen, timer, args.ref_max_mb, compiled)
            rec["compile_pass"] = crec
            rec["gbs"]["compile"] = crec["gbs"]["compile"]
            rec["speedup_vs_compile"] = crec["speedup_vs_compile"]
            print(f"  {rec['step']} {rec['size_mb']:.0f} MB: compile {crec['gbs']['compile']:.1f} GB/s, ours "
                  f"{crec['gbs']['ours']:.1f} GB/s in the same pass", file=sys.stderr, flush=True)
    table = print_table(records, header)

    args.out = args.out or default_out()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": name, "device_type": device.type, "backend": chosen, "dtype": args.dtype,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "command": " ".join(["python benchmarks/bench_step.py"] + (argv if argv is not None else
                                                                               sys.argv[1:])),
                   "wall_s": time.time() - t_start, "records": records, "table": table}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
