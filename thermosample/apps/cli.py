"""Command line: `thermosample demo | bench | sample | schedule | train-digits`. Each verb is one
`add_<verb>` function below.

Bad input is reported as one line `thermosample VERB: error: ...` on stderr with exit status 2, never a
traceback: argparse errors (see `_Parser`), the `type=` checks below, and the ValueError/TypeError/OSError a
verb raises (see `main`), including a grid or manifest file that is not a regular file, too large or
nested too deep.

`thermosample --help` and `--version` answer without importing torch: this module imports nothing heavy at
the top, and the backend names are read from thermosample.ops only when an option needs them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


class _Backends:
    """--backend's choices, read from the backend table (thermosample.ops, which imports torch) on first use:
    a membership test, an error message or a verb's --help, never the top-level --help or --version."""

    def _names(self) -> tuple:
        from ..ops import BACKEND_CHOICES  # adding a backend adds its --backend choice
        return BACKEND_CHOICES

    def __contains__(self, value) -> bool:
        return value in self._names()

    def __iter__(self):
        return iter(self._names())


BACKEND_CHOICES = _Backends()


def _add_backend_argument(p, help_text: str):
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, metavar="BACKEND",
                   help=f"{help_text}: %(choices)s")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage error on one line (the usage itself is in --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_at_least(low: int):
    """argparse type: an int >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _shape(text: str) -> tuple:
    """argparse type: the shape of one sample, 'C,H,W' of ints >= 1."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1 like 3,32,32, got {text!r}")
    return shape


def _key_value(text: str) -> tuple:
    """argparse type: KEY=VALUE, the value parsed as JSON, else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    from ..validate import check_json_depth
    try:
        parsed = json.loads(value)
    except ValueError:
        return key, value
    except RecursionError:
        raise argparse.ArgumentTypeError(f"the value of {key} nests too deeply") from None
    try:
        check_json_depth(parsed, f"the value of {key}")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, parsed


def _solver(text: str) -> str:
    """argparse type: a solver name of thermosample.solvers."""
    from ..auto import AUTO
    from ..solvers import SOLVERS
    if text not in SOLVERS and text != AUTO:
        raise argparse.ArgumentTypeError(f"unknown solver {text!r}; one of {', '.join(sorted(SOLVERS))}")
    return text


DESCRIPTION = """Fast, measurable diffusion sampling: fused solver steps with thermodynamic accounting.

  thermosample demo                          sample a Gaussian-mixture oracle; print accuracy and dissipation
  thermosample sample --model M:F --n N ...  sample N samples of your model to resumable shard files
  thermosample schedule --model M:F ...      calibrate a time grid for your model (save it, pass it to sample)
  thermosample bench                         fused-step kernel micro-benchmark
  thermosample train-digits                  train the small digits model used in the examples

MODULE:FACTORY names a function returning a ts.Denoiser (module looked up from the current directory too),
e.g. thermosample.toy:toy_factory. `thermosample VERB --help` lists a verb's options."""


MAX_GRID_BYTES = 1 << 24   # a saved grid or config is a few kB


def _grid(text: str):
    """argparse type: a grid name, or a JSON file written by `thermosample schedule --save` (a SamplerConfig
    of solver auto, or a ThermoGrid)."""
    from ..grids import GRIDS
    if text in GRIDS:
        return text
    if text.endswith(".json"):
        import numpy as np

        from ..auto import CONFIG_FORMAT, SamplerConfig
        from ..calibrate import ThermoGrid
        from ..validate import read_json_file
        try:    # read once, as a bounded regular file; then what ThermoGrid.load / SamplerConfig.load build
            blob = read_json_file(text, "the grid file", MAX_GRID_BYTES)
            if isinstance(blob, dict) and blob.get("format") == CONFIG_FORMAT:
                return SamplerConfig.from_dict(blob)
            if not isinstance(blob, dict) or "sigmas" not in blob or not isinstance(blob.get("meta", {}), dict):
                raise ValueError("not a saved ThermoGrid or SamplerConfig (no 'sigmas')")
            return ThermoGrid(np.asarray(blob["sigmas"], dtype=np.float64), blob.get("meta", {}))
        except (OSError, ValueError, TypeError, ArithmeticError) as exc:   # e.g. an int too large for a float
            message = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise argparse.ArgumentTypeError(f"cannot read the grid file {text!r}: {message}") from None
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(GRIDS)} or a grid .json file, got {text!r}")


def _add_model_arguments(p, required: bool):
    p.add_argument("--model", required=required, metavar="MODULE:FACTORY",
                   help="factory returning a ts.Denoiser, e.g. thermosample.toy:toy_factory (the module may live "
                        "in the current directory)")
    p.add_argument("--weights", metavar="PATH", help="weights for the factory (.safetensors or a torch file, "
                   "loaded with weights_only=True)")
    p.add_argument("--factory-arg", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="keyword argument for the factory (VALUE parsed as JSON, else a string); repeatable")


def add_demo(sub):
    p = sub.add_parser("demo", help="sample the embedded Gaussian-mixture oracle and print the thermodynamics table")
    p.add_argument("--batch", type=_positive_int, default=1024, help="samples per run (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="Philox seed of the noise (default 0)")
    _add_backend_argument(p, "fused-op backend (default auto: C++ on CPU, Triton on CUDA)")
    p.add_argument("--plot", metavar="PNG", help="write the dissipation profile and accuracy figure")
    p.add_argument("--json", metavar="PATH", help="write the table as JSON")

    def run(args):
        from . import demo
        return demo.main(args)
    p.set_defaults(func=run)


def add_bench(sub):
    p = sub.add_parser("bench", help="fused-step kernel micro-benchmark (benchmarks/bench_step.py)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (see --help there)")

    def run(args):
        from . import bench
        return bench.main(args.rest)
    p.set_defaults(func=run)


def add_sample(sub):
    p = sub.add_parser("sample", help="sample N samples to shard files in DIR, resumable (thermosample.bulk)")
    _add_model_arguments(p, required=True)
    p.add_argument("--n", type=_positive_int, required=True, help="total number of samples (at most 2**32)")
    p.add_argument("--batch", type=_positive_int, required=True, help="samples per shard and per model batch")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (manifest.json + shards)")
    p.add_argument("--shape", metavar="C,H,W", type=_shape, help="shape of one sample (default: the factory's)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="solver steps (model evaluations: steps, 2 steps - 1 for heun/dpm_2; default 20, or a "
                        "grid file's own count)")
    p.add_argument("--solver", default=None, type=_solver,
                   help="solver name, or auto (default: the solver of a `schedule --solver auto` config given as "
                        "--grid, else euler)")
    p.add_argument("--grid", default="karras", type=_grid,
                   help="karras | logsnr | kl_optimal | uniform, or a grid .json from `thermosample schedule "
                        "--save` (default karras)")
    p.add_argument("--seed", type=int, default=0, help="Philox seed: sample i depends only on (seed, i) (default 0)")
    _add_backend_argument(p, "fused-op backend (default auto: C++ on CPU, Triton on CUDA)")
    p.add_argument("--eta", type=float, help="eta of ddim / euler_ancestral")
    p.add_argument("--no-track", action="store_true", help="do not store the per-sample rates")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over the shards (default: when stderr is a terminal)")

    def run(args):
        from .. import bulk
        options = {} if args.eta is None else {"eta": args.eta}
        from ..auto import AUTO, is_config, runnable
        solver, options, grid = runnable(args.solver, args.grid, args.steps, options)
        if args.solver == AUTO or (args.solver is None and is_config(args.grid)):   # say what auto chose
            print(f"solver {solver}" + (" (from the config; --solver overrides it)" if is_config(args.grid) else ""))
        # sample_to_disk checks every argument (and runs one trial step) before it creates the folder
        res = bulk.sample_to_disk(args.model, args.n, args.batch, args.out, sample_shape=args.shape,
                                  steps=args.steps, solver=solver, grid=grid, seed=args.seed,
                                  backend=args.backend, track=not args.no_track, weights=args.weights,
                                  factory_kwargs=dict(args.factory_arg), solver_options=options,
                                  progress=args.progress)
        print(f"{res.out}: {res.num_shards} shards, {len(res.written)} written, {len(res.skipped)} already done")
    p.set_defaults(func=run)


def add_train_digits(sub):
    p = sub.add_parser("train-digits", help="train the small digits score model (sklearn digits, EDM preconditioning)")
    p.add_argument("--steps", type=_positive_int, default=4000, help="optimiser steps (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batches (default 0)")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default="digits.safetensors",
                   help="weights path (default ./digits.safetensors; the shipped weights are never overwritten)")
    p.add_argument("--png", default="digits.png", help="sample grid image (default ./digits.png; '' to skip)")

    def run(args):
        from . import digits
        if os.path.abspath(args.out) == os.path.abspath(digits.WEIGHTS):
            raise ValueError(f"--out {args.out} is the shipped weights file, which stays read-only; pick another path")
        return digits.main(args)
    p.set_defaults(func=run)


def add_schedule(sub):
    p = sub.add_parser("schedule", help="calibrate a time grid from a pilot run (ts.thermo_grid), save and print it")
    p.add_argument("--model", default="mixture", metavar="mixture|digits|MODULE:FACTORY",
                   help="the embedded Gaussian-mixture oracle (default), the shipped digits model, or your factory "
                        "returning a ts.Denoiser (module looked up from the current directory too)")
    p.add_argument("--weights", metavar="PATH", help="weights for the factory")
    p.add_argument("--factory-arg", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="keyword argument for the factory (VALUE parsed as JSON, else a string); repeatable")
    p.add_argument("--shape", metavar="C,H,W", type=_shape,
                   help="shape of one sample (default: the factory's sample_shape)")
    p.add_argument("--steps", type=_positive_int, default=10, help="solver steps of the grid (default 10)")
    p.add_argument("--solver", default="dpmpp_2m", type=_solver,
                   help="the solver the grid is for (default dpmpp_2m), or auto: choose solver and grid on the pilot")
    p.add_argument("--method", default=None, choices=["select", "error", "length", "blend"],
                   help="calibration method (default: select for deterministic solvers, error for stochastic)")
    p.add_argument("--pilot-steps", type=_positive_int, default=24, help="evaluations of the twin pilot (default 24)")
    p.add_argument("--cost", default=None,
                   help="low | default | thorough, or a budget of model rows (default: default for --solver auto, "
                        "thorough otherwise; see ts.CalibrationOptions)")
    p.add_argument("--pilot-batch", type=_positive_int, default=None, help="pilot batch size (default: from --cost)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar over the calibration's model rows (default: when stderr is a terminal)")
    p.add_argument("--pilot-rows", type=_positive_int, default=64,
                   help="most rows the model sees per call during the calibration (default 64; lower it for a "
                        "large model, the grid does not change)")
    p.add_argument("--boundary-pool", type=_non_negative_int, default=0,
                   help="starting points to screen for the 64 nearest a mode boundary, added to the calibration's "
                        "reference batch with their share's weight (default 0: no screen; e.g. 4096)")
    _add_backend_argument(p, "fused-op backend (default auto)")
    p.add_argument("--save", metavar="JSON", help="write the grid (ThermoGrid.save); pass it to `sample --grid`")

    def run(args):
        from . import schedule
        return schedule.main(args)
    p.set_defaults(func=run)


VERBS = [add_demo, add_bench, add_sample, add_train_digits, add_schedule]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (see `thermosample bench --help`)
        from . import bench
        return int(bench.main(argv[1:]) or 0)
    parser = _Parser(prog="thermosample", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .._version import __version__
    parser.add_argument("--version", action="version", version=f"thermosample {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in VERBS:
        add(sub)
    args = parser.parse_args(argv)
    if os.getcwd() not in sys.path and "" not in sys.path:  # --model MODULE:FACTORY from the current directory
        sys.path.insert(0, os.getcwd())
    from ..errors import NonFiniteError, ThermosampleDeprecationWarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", ThermosampleDeprecationWarning)   # e.g. an old --model name: say so
            return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, ArithmeticError) as exc:  # bad input, disk or model: one line
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"thermosample {args.verb}: error: {message}", file=sys.stderr)
        return 1 if isinstance(exc, NonFiniteError) else 2


if __name__ == "__main__":
    sys.exit(main())
