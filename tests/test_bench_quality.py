"""benchmarks/bench_quality.py: the problem selector, the paired bootstrap interval, the peers' mapping and a
reduced --quick run (JSON structure, peers in the same table, every deterministic solver of the table).
The benchmarks are a package run from the repository root (python -m pytest puts it on sys.path)."""
import json
import math
import pathlib

import numpy as np
import pytest

import thermosample as ts
from benchmarks import bench_population as pop
from benchmarks import bench_quality as bq
from benchmarks import bench_quality_fresh as fresh
from benchmarks.tuning import bench_selection_population as sp
from benchmarks.tuning import compare_fresh as cf


def test_fresh_sets_are_disjoint_from_the_tuned_ones_and_run_one_problem(tmp_path, monkeypatch):
    """benchmarks/bench_quality_fresh.py: its problems and seeds share nothing with the default and held-out
    sets, an unknown set name is refused, and one fresh problem runs end to end through bench_quality: the
    full JSON under out/, and with --save-results the summary (no per-run rows) under results/."""
    tuned = {p.name for p in bq.problems()} | {p.name for p in bq.problems(heldout=True)}
    seeds = set(bq.qp.DEFAULT_SEEDS) | set(bq.qp.HELDOUT_SEEDS)
    names = [p.name for probs, _ in fresh.SETS.values() for p in probs]
    assert len(names) == len(set(names)) and not set(names) & tuned
    assert not any(set(s) & seeds for _, s in fresh.SETS.values())
    fresh_seeds = [seed for _, s in fresh.SETS.values() for seed in s]
    assert len(fresh_seeds) == len(set(fresh_seeds))                     # and from one another
    assert fresh.main(["nope"]) == 2
    held, held_seeds = list(bq.qp.HELDOUT), bq.qp.HELDOUT_SEEDS
    monkeypatch.setattr(fresh, "HERE", str(tmp_path))
    try:
        rc = fresh.main(["fresh", "--problems", "d3", "--batch", "32", "--budgets", "6", "--solvers", "euler",
                         "--peers", "none", "--ref-steps", "40", "--save-results"])
    finally:
        bq.qp.HELDOUT[:], bq.qp.HELDOUT_SEEDS = held, held_seeds
    assert rc == 0
    full = json.loads((tmp_path / "out" / "bench_quality_fresh.json").read_text())
    doc = json.loads((tmp_path / "results" / "bench_quality_fresh.json").read_text())
    assert doc["meta"]["seeds"] == [3000, 3001, 3002, 3003] and list(doc["meta"]["problems"]) == ["fr-mix-d3-k4/edm"]
    assert full["rows"] and set(doc) == {"meta", "summary", "acceptance"} and doc["summary"] == full["summary"]
    assert (tmp_path / "results" / "bench_quality_fresh.txt").read_text() == (
        tmp_path / "out" / "bench_quality_fresh.txt").read_text()


def test_compare_fresh_counts_cells_at_each_bar(tmp_path, capsys):
    """benchmarks/tuning/compare_fresh.py: per cell both ratios and a mark where one moved by over 5 %; per group
    the cells within 1.0 x and 0.8 x before -> after, and how many moved; cells only one run holds are left out."""

    def write(directory, ratios):
        directory.mkdir()
        rows = [{"problem": f"p{i}", "budget": 16, "recommended_ratio": r, "recommended_ci90": [r / 2, r * 2]}
                for i, r in enumerate(ratios)]
        (directory / "fresh2.json").write_text(json.dumps({"summary": rows}))

    write(tmp_path / "b", [0.5, 2.0, 0.9, 0.3])
    write(tmp_path / "a", [0.51, 0.7, 1.2])
    assert cf.main([str(tmp_path / "b"), str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "within 1.0 x 2 -> 2, within 0.8 x 1 -> 2" in out and "1 better, 1 worse" in out
    assert out.count("fresh2 ") == 3 and "p3" not in out
    assert cf.main([]) == 2


def test_selector_matches_tokens_not_prefixes():
    names = [p.name for p in bq.problems(select=["d2"])]
    assert names == ["mix-d2-k5-wide/condot"]                      # not d256
    names = [p.name for p in bq.problems(select=["vp", "mix-d64-k8-sharp/condot"])]
    assert sorted(names) == ["mix-d16-k3-vsharp/vp", "mix-d64-k8-sharp/condot"]


def test_problem_sets():
    """At least six default problems (the digits model among them), a disjoint held-out set with its own
    seeds, and a three-problem quick set."""
    default = [p.name for p in bq.problems()]
    held = [p.name for p in bq.problems(heldout=True)]
    assert len(default) >= 6 and "digits-8x8/edm" in default
    assert len(held) >= 4 and not set(default) & set(held)
    assert not set(bq.qp.DEFAULT_SEEDS) & set(bq.qp.HELDOUT_SEEDS) and len(bq.qp.DEFAULT_SEEDS) >= 4
    assert len(bq.problems(quick=True)) == 3


def test_bootstrap_interval_covers_the_population_ratio():
    """Per-sample squared errors with known means: a 1.0 vs b 2.25 (ratio of RMS 2/3), and the min over a
    set {4.0, 2.25}; the 90% interval must contain the ratio and shrink with more samples."""
    rng = np.random.default_rng(1)
    widths = []
    for n in (400, 6400):
        a = rng.exponential(1.0, n)
        fixed = {"x": rng.exponential(4.0, n), "y": rng.exponential(2.25, n)}
        lo, hi = bq.bootstrap_ratio(a, fixed)
        assert lo < 2 / 3 < hi, (n, lo, hi)
        lo2, hi2 = bq.bootstrap_ratio(a, fixed["y"])
        assert lo2 < 2 / 3 < hi2, (n, lo2, hi2)
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]


def test_steps_within_budget():
    assert bq.steps_within(lambda n: 2 * n - 1, 6) == 3
    assert bq.steps_within(lambda n: n, 10) == 10


def test_quick_run_json(tmp_path):
    """A reduced --quick run (two mixtures, NFE 6 and 10) through main(): every deterministic solver of
    thermosample's table and the peers are in the JSON rows, the NFE counts fit the budget, and the summary
    pairs the best thermosample configuration with the best peer."""
    pytest.importorskip("diffusers")
    out = tmp_path / "q.json"
    rc = bq.main(["--quick", "--problems", "d2,d8", "--budgets", "6,10", "--json", str(out),
                  "--out", str(tmp_path / "q.txt"), "--plot", str(tmp_path / "q.png")])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"meta", "summary", "acceptance", "rows", "calibrated_vs_karras"}
    rows = doc["rows"]
    assert {r["problem"] for r in rows} == {"mix-d2-k5-wide/condot", "mix-d8-k3-narrow/edm"}
    for r in rows:
        assert set(r) >= {"problem", "method", "config", "grid", "budget", "nfe", "error", "seed_errors", "batch"}
        assert r["nfe"] <= r["budget"]
        assert len(r["seed_errors"]) == 2 or r.get("failed")
    ts_solvers = {r["solver"] for r in rows if r["method"] == "thermosample"}
    want = {n for n in bq.ts_solvers.SOLVERS if not bq.ts_solvers.injects_noise(n, {})}
    assert ts_solvers == want
    assert {r["grid"] for r in rows if r["method"] == "thermosample"} >= {"karras", "logsnr", "calibrated"}
    peer_names = {r["config"] for r in rows if r["method"] == "peer"}
    assert any(p.startswith("diffusers:unipc") for p in peer_names)
    assert any(p.startswith("diffusers:deis") for p in peer_names)
    if bq.peers.load_k_diffusion() is not None:
        assert "kd:dpmpp_3m_sde(eta0)" in peer_names
    for r in rows:  # the peers' NFE equals their step count (multistep: one evaluation per step)
        if r["method"] == "peer" and r["config"].startswith("diffusers:"):
            assert r["nfe"] == r["steps"] == r["budget"]
    assert all(not r.get("failed") for r in rows if r["method"] == "peer"), [r for r in rows if r.get("failed")]
    summ = doc["summary"]
    assert len(summ) == 4
    for s in summ:
        assert s["best_peer"] in peer_names and "best_ours" in s
        assert math.isclose(s["ratio"], s["best_ours_error"] / s["best_peer_error"], rel_tol=1e-9)
        lo, hi = s["ratio_ci90"]
        assert lo <= hi
    assert any(line.split()[0] in ("PASS", "FAIL", "SKIP") for line in doc["acceptance"])
    # the mapping check: every peer converges on the Gaussian (error at 40 steps at most half that at 10)
    chk = doc["meta"]["mapping_check"]["errors"]
    assert chk and all(v[-1] < 0.5 * v[0] for v in chk.values()), chk
    assert (tmp_path / "q.txt").read_text().count("best thermosample") >= 1
    assert (tmp_path / "q.png").stat().st_size > 0


def test_population_check_runs_and_names_the_best_peer(tmp_path):
    """benchmarks/bench_population.py on one small problem: its best peer is the smallest error of its peer
    table, the ratio is auto's error over it, and a bad problem spec is refused."""
    assert pop.main(["default:d2", "--n", "64", "--budgets", "6", "--out", str(tmp_path / "pop")]) == 0
    doc = json.loads((tmp_path / "pop.json").read_text())
    (row,) = doc["rows"]
    assert row["problem"] == "mix-d2-k5-wide/condot" and row["n"] == 64
    band = ts.auto.band_for(6)
    plan = {(c.solver, c.grid) for c in (band.default, band.alternative, band.check) if c is not None}
    assert (row["auto_choice"], row["auto_grid"]) in plan                          # one of auto's 6-NFE runs
    errors = {p: v["error"] for p, v in row["peers"].items()}
    assert row["best_peer"] == min(errors, key=errors.get) and len(errors) >= 1
    assert row["ratio"] == pytest.approx(row["auto_error"] / row["best_peer_error"])
    assert row["ratio_ci90"][0] <= row["ratio"] * 1.5
    for bad in ("nope:d2", "default:", "default:d999"):
        with pytest.raises(SystemExit):
            pop.problem(bad)


def test_bench_selection_population_reproduces_bench_populations_auto_run(tmp_path):
    """benchmarks/tuning/bench_selection_population.py rebuilds auto's candidates from the calibration's parts;
    on default d2 at NFE 10 (where bench_population's auto chose iPNDM on "error") that candidate's error over
    the best peer must equal the ratio bench_population recorded, and the simulated pass fractions must be
    fractions."""
    out = tmp_path / "sel.json"
    assert sp.main(["default:d2", "--budgets", "10", "--draws", "5", "--threads", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    recorded = json.loads((pathlib.Path(bq.RESULTS) / "bench_population.json").read_text())["rows"]
    auto = next(r for r in recorded if r["problem"] == row["problem"] and r["budget"] == 10)
    assert auto["auto_choice"] == "ipndm" and auto["auto_grid"] == "error"
    k = [(name, grid) for name, _, grid in sp.bs.plan_candidates(10)].index(("ipndm", "error"))
    assert row["candidates_vs_peer"][k] == pytest.approx(auto["ratio"], rel=1e-4)   # float32 runs, any CPU
    assert all(0.0 <= row[rule] <= 1.0 for rule in sp.RULES)


def test_acceptance_totals_count_misses_and_firm_misses():
    """The TOTAL lines: cells meeting the bar, misses whose whole interval is above it, and calibrated
    grids worse than karras beyond their interval, counted from the rows given."""
    def cell(budget, ratio, ci):
        return {"problem": f"p{budget}-{ratio}", "budget": budget, "recommended": "auto@calibrated",
                "best_peer": "peer", "recommended_ratio": ratio, "recommended_ci90": ci}
    summary = [cell(6, 0.9, [0.8, 1.0]), cell(10, 0.85, [0.7, 1.1]), cell(20, 1.3, [1.1, 1.5]),
               cell(50, 1.2, [0.9, 1.4]), cell(10, 0.5, [0.4, 0.6])]
    cvk = [{"problem": "a", "config": "deis", "budget": b, "ratio": r, "ci90": ci}
           for b, r, ci in ((6, 1.1, [1.01, 1.2]), (10, 1.0, [1.0, 1.0]), (20, 0.5, [0.4, 0.6]))]
    lines = bq.acceptance(summary, cvk)
    totals = [line for line in lines if line.startswith("TOTAL")]
    assert totals == ["TOTAL recommended meets the bar in 2 of 5 cells; of the 3 misses 1 have the whole 90% "
                      "interval above the bar",
                      "TOTAL calibrated worse than karras beyond the 90% interval in 1 of 3 cells"]
    assert sum(line.startswith("FAIL") for line in lines) == 4   # three misses and one calibrated group
