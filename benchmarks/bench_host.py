"""Host cost per step of the CUDA dispatch path, on any machine: the Triton backend's launch with the device
launch replaced by a no-op.

What a GPU run pays per step beyond its kernels is Python: the Run's bookkeeping, the op's checks, the
backend's argument packing, allocations, and the launch call. This benchmark routes every entry point
(`ts.sample`, the k-diffusion and diffusers drop-ins) through the Triton backend on CPU tensors, with the
compiled kernel's launcher (the C call that queues the kernel on a CUDA stream, a few microseconds on a
GPU host) replaced by a function that does nothing. Rows, in CPU time of the process (time.process_time,
the minimum over interleaved repeats):

- `Run.update: fused steps of a run`: the fused step as every entry point makes it, per step: a run of
  50 tracked two-input updates (Euler's: its arguments, the per-step acceptance test, the rate's row, the
  launch) and the run's one reduction of its deferred partial sums. Issue 37's bar (<= 15 us) is this row.
- the backend's `launch(StepArgs)` and the checked public `ops.fused_step`, per call;
- whole loops, `us/step = (loop - model alone) / steps`: everything ts.sample or a drop-in does beyond
  the model, its per-run work (argument checks, grid, report) included; for ts.sample also `fixed us`,
  the per-run part (from a 2-step run of the same solver), and `step us`, the rest per step.

The tensors are CPU tensors, so allocations cost what CPU allocations cost (a CUDA caching allocator is in
the same range for these sizes). Before the bound launchers (kernels/fused_step.py), "the device launch" was the whole
`kernel[grid](...)` call, Triton's Python launcher included; replacing it by a no-op hid that cost, so
figures measured on that code are lower bounds. Prints a table and writes JSON naming the machine.

    python -m benchmarks.bench_host [--size-kb 64] [--repeats 15] [--out benchmarks/out/bench_host.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":   # the interpreter runs kernels: this measures the launch path
    sys.exit("bench_host measures the compiled launch path: unset TRITON_INTERPRET")

import torch  # noqa: E402

import thermosample as ts  # noqa: E402
from thermosample import ops  # noqa: E402
from thermosample.apps.bench import device_name  # noqa: E402
from thermosample.run import Run  # noqa: E402

from . import bench_integrations as bi  # noqa: E402

SOLVERS = ("euler", "heun", "dpmpp_2m", "euler_ancestral")
BAR_US = 15.0
BAR_ROW = "Run.update: fused steps of a run"
SHORT = 2                    # steps of the short ts.sample runs that split per-run from per-step cost


class _NoLaunch:
    """A compiled kernel's launcher that launches nothing (bound launchers: kernels/fused_step._Bound)."""

    def __call__(self, g0, g1, stream, args):
        pass

    def __getitem__(self, grid):        # Triton's `kernel[grid](...)`, for code without bound launchers
        return lambda *args, **kwargs: None


def route_through_triton() -> str:
    """Make backend "auto" on CPU the Triton backend with no-op device launches; returns what was replaced."""
    from thermosample.kernels import fused_step as fs
    if hasattr(fs, "_compile"):
        fs._compile = lambda jit, grid, args, options: _NoLaunch()
        fs._INTERPRETED = False
        replaced = "the compiled kernels' launcher calls (bound launchers)"
    else:
        fs._fused_step_kernel = fs._sum_partials_kernel = _NoLaunch()
        replaced = "kernel[grid](...) calls, Triton's Python launcher included (a lower bound)"
    ops.BACKENDS["triton"] = dataclasses.replace(ops.BACKENDS["triton"], devices=None, available=lambda: True)
    ops.AUTO["cpu"] = "triton"
    ops.implementation.cache_clear()
    return replaced


def clock() -> float:
    """CPU time of this process: host cost is CPU work, and on a shared machine wall time also counts the
    time other processes held the CPU (the minimum over repeats is taken all the same)."""
    return time.process_time()


def timed(fn) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def per_call_us(fn, calls: int, repeats: int) -> float:
    return min(timed(lambda: [fn() for _ in range(calls)]) for _ in range(repeats)) / calls * 1e6


def op_rows(shape, repeats: int) -> list[dict]:
    """Run.update per step (the bar's row), the backend's launch and the checked public op per call (a
    2-input tracked step, as Euler's)."""
    from thermosample.kernels import fused_step as fs
    gen = torch.Generator().manual_seed(0)
    x, d = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    rate = torch.empty(shape[0])
    args = ops.contract.check(ops.StepArgs([x, d], [0.9, 0.1], rate=rate, track=True, alpha=0.5, beta=-0.5, step=3))
    den = ts.Denoiser(lambda x, s: x, ts.schedules.EDM(), prediction="x0", time="sigma", scale_input=False)
    sigmas = [float(s) for s in ts.grids.make_grid("karras", bi.STEPS, den.schedule)]
    run = Run(den, sigmas, seed=0, backend="auto", track=True)

    def updates():                   # a run's fused steps, then what its report reads them with (rows reused)
        for i in range(bi.STEPS):
            run.update([x, d], [0.9, 0.1], i, track_sigma=sigmas[i], u=0, d=1)
        getattr(run, "_flush", lambda: None)()     # (a tree before the deferred sums has none)
        run._rows, run.eval_t, run.eval_rows, run.probes = 1, [], [], []
    run.update([x, d], [0.9, 0.1], 0, track_sigma=sigmas[0])        # the run's first, fully checked call
    rows = [("Run.update: fused steps of a run", lambda: per_call_us(updates, 4, repeats) / bi.STEPS),
            ("triton launch(StepArgs), rate given", lambda: per_call_us(lambda: fs.launch(args), 200, repeats)),
            ("ops.fused_step (checked), new out",
             lambda: per_call_us(lambda: ops.fused_step([x, d], [0.9, 0.1], track=True, alpha=0.5, beta=-0.5,
                                                        step=3), 200, repeats))]
    return [{"case": name, "us_per_step": measure(), "kind": "op"} for name, measure in rows]


def run_rows(shape, repeats: int, only) -> list[dict]:
    """Whole loops: ts.sample per solver and the drop-ins of bench_integrations, (loop - model) / steps; for
    ts.sample also the same loop over a 2-step grid, which splits that into a per-run and a per-step part."""
    torch.manual_seed(0)
    x0 = torch.randn(shape)
    w = 1.0 + 0.1 * torch.randn(1, shape[1], 1, 1)
    model = bi.Counted(lambda x, s: x * w)
    den = ts.Denoiser(model, ts.schedules.EDM(), prediction="x0", time="sigma", scale_input=False)
    grids = {n: ts.grids.make_grid("karras", n, den.schedule) for n in (bi.STEPS, SHORT)}

    def sample(solver, n):
        return lambda: ts.sample(den, noise=x0 * 80.0, grid=grids[n], solver=solver, progress=False)
    alone = lambda n: [model.fn(x0, 1.0) for _ in range(n)]    # noqa: E731
    cases = [(f"ts.sample({s})", sample(s, bi.STEPS), sample(s, SHORT), alone, model) for s in SOLVERS]
    cases += [(name, ours, None, alone, m) for name, _peer, ours, alone, m in bi.make_cases(torch.device("cpu"), shape,
                                                                                              None)
              if not name.startswith("ts.sample")]
    rows = []
    for name, loop, short, alone, m in cases:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        nfe, t_run, per_call = _loop_times(loop, alone, m, repeats)
        row = {"case": name, "kind": "run", "nfe": nfe, "run_ms": t_run * 1e3, "model_ms": nfe * per_call * 1e3,
               "us_per_step": (t_run - nfe * per_call) / bi.STEPS * 1e6}
        if short is not None:
            nfe_short, t_short, per_call_short = _loop_times(short, alone, m, repeats)
            per_call = min(per_call, per_call_short)
            row["step_us"] = ((t_run - t_short) - (nfe - nfe_short) * per_call) / (bi.STEPS - SHORT) * 1e6
            row["fixed_us"] = (t_short - nfe_short * per_call) * 1e6 - SHORT * row["step_us"]
        rows.append(row)
    return rows


def _loop_times(loop, alone, m, repeats: int) -> tuple[int, float, float]:
    """(model calls, min CPU seconds of the loop, min seconds per call of the model alone: alone(calls),
    timed interleaved with the loop)."""
    def ours():
        try:
            loop()
        except ts.NonFiniteError:     # nothing was launched: the outputs hold whatever memory held
            pass
    m.calls = 0
    ours()                                   # warm-up: plans, caches
    nfe = m.calls
    t_run, t_model = [], []
    for _ in range(repeats):
        t_run.append(timed(ours))
        t_model.append(timed(lambda: alone(nfe)))
    return nfe, min(t_run), min(t_model) / nfe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-kb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--only", nargs="*", default=None, help="run the loop rows whose name contains one of these")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "bench_host.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    replaced = route_through_triton()
    shape = bi.shape_of(args.size_kb)
    with torch.no_grad():
        rows = op_rows(shape, args.repeats) + run_rows(shape, args.repeats, args.only)
    name = device_name(torch.device("cpu"))
    lines = [f"host cost of the CUDA dispatch path (Triton backend, device launch = no-op), state {args.size_kb} KB "
             f"{tuple(shape)} float32, {bi.STEPS} steps, {name}, torch {torch.__version__}, 1 thread, CPU time, min of "
             f"{args.repeats}; no-op'd: {replaced}",
             f"{'case':44s} {'us/step':>8s} {'run ms':>8s} {'model ms':>9s} {'fixed us':>9s} {'step us':>8s}"
             f"  bar {BAR_US:.0f} us: {BAR_ROW}"]
    for r in rows:
        extra = f" {r['run_ms']:8.2f} {r['model_ms']:9.2f}" if r["kind"] == "run" else f" {'':8s} {'':9s}"
        split = f" {r['fixed_us']:9.0f} {r['step_us']:8.1f}" if "fixed_us" in r else f" {'':9s} {'':8s}"
        flag = ("  ok" if r["us_per_step"] <= BAR_US else "  OVER") if r["case"] == BAR_ROW else ""
        lines.append(f"{r['case']:44s} {r['us_per_step']:8.1f}{extra}{split}{flag}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": name, "torch": torch.__version__, "size_kb": args.size_kb, "shape": list(shape),
                   "steps": bi.STEPS, "replaced": replaced, "bar_us": BAR_US, "rows": rows, "table": text}, f,
                  indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
