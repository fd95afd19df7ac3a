"""Command line: `thermosample demo | bench | ...`. Each verb is one `add_<verb>` function below."""
from __future__ import annotations

import argparse
import sys


def add_demo(sub):
    p = sub.add_parser("demo", help="sample the embedded Gaussian-mixture oracle and print the thermodynamics table")
    p.add_argument("--batch", type=int, default=1024, help="samples per run (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"])
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


VERBS = [add_demo, add_bench]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="thermosample", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    for add in VERBS:
        add(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
