"""`thermosample bench` output: a table whose columns never run together, and the JSON where the user says
(default: thermosample's cache folder, printed), never benchmarks/out/ under the working directory."""
import json
import os

import thermosample.apps.bench as bench
import thermosample.apps.cli as cli


def _record(step="euler_ancestral", **over):
    rec = {"step": step, "size_mb": 512.0, "copy_gbs": 12.3, "frac_copy": 0.6112, "call_us": 123456.7,
           "gbs": {"ours": 7.5, "eager": 12.14, "ref": None, "compile": 2.426},
           "speedup_vs_eager": 6191.3, "speedup_vs_ref": None, "speedup_vs_compile": 2.42, "track_overhead": 61.913}
    rec.update(over)
    return rec


def test_table_columns_are_fixed_width_and_separated_whatever_the_values():
    """Wide values (a 6191 % tracking overhead, 6191 x eager) used to fill their column and run into the
    next ("0.6112.14", "2.426191.3%"): every cell is now apart from its neighbours and every line as wide."""
    records = [_record(), _record("euler", size_mb=1.0, frac_copy=1.07, track_overhead=0.003,
                                  gbs={"ours": 34.6, "eager": 1.8, "ref": 0.5, "compile": None})]
    lines = bench.format_table(records)
    assert len({len(line) for line in lines}) == 1
    header = [h for h, _, _ in bench.COLUMNS]
    for line, rec in zip(lines[1:], records):
        cells = line.split()
        assert len(cells) == len(header), line
        assert cells[0] == rec["step"] and cells[4] == format(rec["frac_copy"], ".2f")
        assert cells[5] == format(rec["gbs"]["eager"], ".2f")
        assert cells[11] == format(100 * rec["track_overhead"], ".1f") + "%"
    assert "0.61  " in lines[1] and "6191.3%" in lines[1]
    # each header sits over its column: the right edge of a header is the right edge of its cells
    for h in header[1:]:
        end = lines[0].index(h) + len(h)
        assert all(line[end - 1] != " " and (end == len(line) or line[end] == " ") for line in lines[1:]), h


def test_bench_writes_its_json_to_the_cache_folder_not_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "bench_one", lambda step, size, *a, **k: _record(step, size_mb=size))
    assert cli.main(["bench", "--quick", "--no-compile", "--sizes", "1", "--steps", "euler"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "cache" / "thermosample" / "bench_step.json"
    assert f"wrote {path}" in out
    assert json.loads(path.read_text())["records"][0]["step"] == "euler"
    assert os.listdir(tmp_path) == ["cache"]          # nothing else in the working directory
    chosen = tmp_path / "elsewhere" / "b.json"
    assert cli.main(["bench", "--quick", "--no-compile", "--sizes", "1", "--steps", "euler", "--out", str(chosen)]) == 0
    assert chosen.exists() and f"wrote {chosen}" in capsys.readouterr().out
