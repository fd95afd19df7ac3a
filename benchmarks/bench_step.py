"""Fused solver step micro-benchmark (the code lives in thermosample/bench.py, also `thermosample bench`).

    python benchmarks/bench_step.py                 # sizes 1 8 64 512 MB of float32 state
    python benchmarks/bench_step.py --quick         # small sizes
    python benchmarks/bench_step.py --sizes 64 --steps euler dpmpp_2m
"""
import sys

from thermosample.apps.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
