"""benchmarks/bench_quality.py's statistics: the problem selector and the paired bootstrap interval."""
import importlib.util
import pathlib

import numpy as np

_path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"
_spec = importlib.util.spec_from_file_location("_bench_quality", _path)
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


def test_selector_matches_tokens_not_prefixes():
    names = [p[0] for p in bq.problems(select=["d2"])]
    assert names == ["mix-d2-k5-wide/condot"]                      # not d256
    names = [p[0] for p in bq.problems(select=["vp", "mix-d64-k8-sharp/condot"])]
    assert sorted(names) == ["mix-d16-k3-vsharp/vp", "mix-d64-k8-sharp/condot"]


def test_bootstrap_interval_covers_the_population_ratio():
    """Per-sample squared errors with known means: calibrated 1.0, fixed grids 4.0 and 2.25, so the
    population ratio of RMS errors is sqrt(1 / 2.25) = 2/3; the 90% interval must contain it and shrink
    with more samples."""
    rng = np.random.default_rng(1)
    widths = []
    for n in (400, 6400):
        cal = rng.exponential(1.0, n)
        fixed = {"a": rng.exponential(4.0, n), "b": rng.exponential(2.25, n)}
        lo, hi = bq.bootstrap_ratio(cal, fixed)
        assert lo < 2 / 3 < hi, (n, lo, hi)
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]
