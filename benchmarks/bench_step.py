"""Fused solver step micro-benchmark (the code lives in thermosample/bench.py, also `thermosample bench`).

    python -m benchmarks.bench_step                 # sizes 1 8 64 512 MB of float32 state
    python -m benchmarks.bench_step --quick         # small sizes
    python -m benchmarks.bench_step --sizes 64 --steps euler dpmpp_2m
"""
import sys

from thermosample.apps.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
