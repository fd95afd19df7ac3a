"""`thermosample demo` says what it ran on: the CPU and torch's thread count up front, the wall time and the
thread count at the end (its samples/s and time depend on both; the README's figures name their machine)."""
import argparse
import re

import torch

from thermosample.apps import demo


def test_demo_prints_its_machine_threads_and_wall_time(monkeypatch, capsys):
    # the table itself is test_cli's; here only what main prints around it
    monkeypatch.setattr(demo, "run_demo", lambda **kw: [{"kinetic": 1.0}])
    for name in ("format_table", "headline", "calibrated_line"):
        monkeypatch.setattr(demo, name, lambda rows: "...")
    assert demo.main(argparse.Namespace(batch=16, seed=0, backend="torch", plot=None, json=None)) == 0
    out = capsys.readouterr().out.splitlines()
    threads = torch.get_num_threads()
    assert out[1].startswith("on ") and out[1].endswith(f"torch threads {threads}")
    assert re.fullmatch(rf"done in \d+\.\d s wall, torch threads {threads} \(samples/s and time depend on the "
                        r"machine and its load\)", out[-1])
