"""Side by side: solver="auto" against the best peer in two runs of bench_quality_fresh.py (before, after).

    python -m benchmarks.tuning.compare_fresh BEFORE_DIR AFTER_DIR

Each directory holds <set>.json files written with `python -m benchmarks.bench_quality_fresh <set> --json
DIR/<set>.json`, or bench_quality_<set>.json as --save-results writes them (so BEFORE_DIR may be
benchmarks/results, the committed summaries). Prints, for every problem and budget both runs hold, the
recommended/best-peer ratio with its paired-bootstrap 90 % interval before and after (marked when it moved
by more than 5 %), then per group of sets how many cells meet 1.0 x and 0.8 x, the geometric mean, and how
many moved.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from ..bench_quality_fresh import SETS

GROUPS = {"fresh-fresh16": list(SETS)[:16], "fresh17-fresh20": list(SETS)[16:20], "fresh21-": list(SETS)[20:]}


def load(directory: str, name: str) -> dict:
    path = os.path.join(directory, name + ".json")
    if not os.path.exists(path):
        path = os.path.join(directory, f"bench_quality_{name}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {(r["problem"], r["budget"]): r for r in json.load(f)["summary"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    cells = []     # (set, before ratio, after ratio)
    for name in SETS:
        before, after = load(argv[0], name), load(argv[1], name)
        for key in [k for k in before if k in after]:
            b, a = before[key], after[key]
            rb, ra = b["recommended_ratio"], a["recommended_ratio"]
            mark = "better" if ra < 0.95 * rb else "WORSE" if ra > 1.05 * rb else ""
            (lb, hb), (la, ha) = b["recommended_ci90"], a["recommended_ci90"]
            print(f"{name:8s} {key[0]:40s} {key[1]:3d} {rb:7.3f} [{lb:.2f}-{hb:.2f}] -> {ra:7.3f} [{la:.2f}-{ha:.2f}] "
                  f"{mark}")
            cells.append((name, rb, ra))
    print()
    for group, members in [*GROUPS.items(), ("all", list(SETS))]:
        sel = [c for c in cells if c[0] in members]
        if not sel:
            continue
        b, a = np.array([c[1] for c in sel]), np.array([c[2] for c in sel])
        print(f"{group:16s} {len(sel):3d} cells: within 1.0 x {int((b <= 1.0).sum())} -> {int((a <= 1.0).sum())}, "
              f"within 0.8 x {int((b <= 0.8).sum())} -> {int((a <= 0.8).sum())}, geo-mean "
              f"{np.exp(np.log(b).mean()):.3f} -> {np.exp(np.log(a).mean()):.3f}; moved by > 5 %: "
              f"{int((a < 0.95 * b).sum())} better, {int((a > 1.05 * b).sum())} worse")
    return 0


if __name__ == "__main__":
    sys.exit(main())
