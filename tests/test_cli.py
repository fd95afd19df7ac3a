"""The command line: `thermosample demo` and `thermosample bench` end to end (small sizes)."""
import json
import math

import thermosample.apps.cli as cli


def test_demo_runs_and_writes_table_and_figure(tmp_path, capsys):
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    assert cli.main(["demo", "--batch", "64", "--json", str(out_json), "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "CondOT dissipates less than cosine" in text and "samples/s" in text
    rows = json.loads(out_json.read_text())
    assert {r["schedule"] for r in rows} >= {"condot", "cosine"}
    for r in rows:
        assert math.isfinite(r["kinetic"]) and r["kinetic"] > 0 and math.isfinite(r["entropy"])
        if r["solver"] in ("euler_maruyama", "euler_ancestral"):
            assert math.isnan(r["speed_limit"])  # no pathwise speed limit for noisy paths
        else:
            assert 0 < r["speed_limit"] and r["nfe"] >= r["steps"]
    assert out_png.stat().st_size > 10_000


def test_bench_quick_writes_json_naming_the_device(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--no-compile", "--sizes", "1", "--steps", "euler",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("fused step, float32") == 1   # the table's header once; progress goes to stderr
    assert "euler 1.0 MB: ours" in printed.err
    data = json.loads(out.read_text())
    assert data["device"] and json.dumps(data).count("euler") >= 1


def test_schedule_pilot_rows_reach_the_calibration_and_leave_the_grid_alone(capsys, monkeypatch):
    from thermosample.apps import schedule
    seen = []
    real = schedule.thermo_grid
    monkeypatch.setattr(schedule, "thermo_grid",
                        lambda *a, **k: (seen.append(k["options"].pilot_rows), real(*a, **k))[1])
    grids = []
    for rows in ("8", "64"):
        assert cli.main(["schedule", "--steps", "6", "--pilot-rows", rows]) == 0
        grids.append([line for line in capsys.readouterr().out.splitlines() if line[:3].strip().isdigit()])
    assert seen == [8, 64] and grids[0] == grids[1] and len(grids[0]) == 7
    pools = []
    monkeypatch.setattr(schedule, "thermo_grid",
                        lambda *a, **k: (pools.append(k["options"].boundary_pool), real(*a, **k))[1])
    assert cli.main(["schedule", "--steps", "6", "--boundary-pool", "0"]) == 0
    assert pools == [0] and "calibration:" in capsys.readouterr().out
