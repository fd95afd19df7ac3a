"""benchmarks/tuning/bench_selection.py: the simulated-pilot scoring on hand-built per-sample errors whose
outcome is known (the collection step is the bench_quality machinery, tested in test_bench_quality)."""
import numpy as np

from benchmarks.tuning import bench_selection as bs


def _errors(n, typical, rare_every, rare):
    """[2, n] squared errors: `typical` everywhere, `rare` on every `rare_every`-th sample (both rows:
    whole-batch reference and pilot reference agree)."""
    e = np.full(n, typical)
    e[::rare_every] = rare
    return np.stack([e, e])


def test_a_rare_failure_fools_the_plain_minimum_but_not_the_margin():
    """Candidate A (the default): typical error 1e-4, no rare failures. Candidate B: typical 0.8e-4 but a
    rare 100.0 on one sample in 1024, so its whole-batch RMS is ~30x A's. A 32-sample pilot almost never
    holds the rare sample: the plain minimum picks B, the 0.6 margin keeps A."""
    n = 8192
    errs = {"A": _errors(n, 1e-4, n + 1, 1e-4), "B": _errors(n, 0.8e-4, 1024, 100.0)}
    rng = np.random.default_rng(0)
    peer = float(np.sqrt(errs["A"][0].mean())) / 0.5           # A is 0.5x the peer, B ~15x
    plain, _ = bs.simulate(errs, ["A", "B"], peer, 20, 32, 200, 1.0, rng)
    margin, median = bs.simulate(errs, ["A", "B"], peer, 20, 32, 200, 0.6, rng)
    assert plain < 0.2 and margin == 1.0 and abs(median - 0.5) < 1e-9


def test_karras_check_counts_only_choices_beyond_the_interval():
    n = 4096
    rng = np.random.default_rng(1)
    worse = {(10, "s", "karras"): _errors(n, 1e-4, n + 1, 1e-4), (10, "s", "error"): _errors(n, 0.5e-4, 512, 1.0)}
    frac, ratio = bs.karras_check(worse, "s", 10, 32, 100, 1.0, rng)
    assert ratio > 4 and frac > 0.5        # the pilot prefers "error", which is far worse on the whole batch
    better = {(10, "s", "karras"): worse[(10, "s", "karras")], (10, "s", "error"): _errors(n, 0.2e-4, n + 1, 0)}
    frac, ratio = bs.karras_check(better, "s", 10, 32, 100, 0.6, rng)
    assert ratio < 0.5 and frac == 0.0     # chosen, and better: not counted


def test_the_screened_pilot_sees_the_rare_failure_when_the_score_ranks_it_high():
    """The same two candidates, scored by the plain minimum (margin 1). With screen scores that rank B's
    rare samples first, the simulated pilot holds them at their stratum's weight and keeps A; with scores
    that know nothing of them, it picks B as a random pilot does."""
    n = 8192
    errs = {"A": _errors(n, 1e-4, n + 1, 1e-4), "B": _errors(n, 0.8e-4, 1024, 100.0)}
    peer = float(np.sqrt(errs["A"][0].mean())) / 0.5
    ranked = np.zeros(n)
    ranked[::1024] = 1.0                                          # the rare samples score highest
    blind = np.random.default_rng(2).random(n)
    seen, _ = bs.simulate(errs, ["A", "B"], peer, 20, 32, 200, 1.0, np.random.default_rng(0), ranked)
    missed, _ = bs.simulate(errs, ["A", "B"], peer, 20, 32, 200, 1.0, np.random.default_rng(0), blind)
    assert seen == 1.0 and missed < 0.5
    idx, w = bs.pilot_draw(n, 32, np.random.default_rng(0), ranked)
    assert len(idx) == 32 + 64 and len(set(idx)) == len(idx) and abs(w.sum() - 1) < 1e-12
