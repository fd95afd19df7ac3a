"""`thermosample --help` and `--version` answer without importing torch (issue 36, item 5): torch costs
seconds of CPU (tens of seconds of wall on a loaded machine) and neither answer needs it."""
import os
import subprocess
import sys

import pytest

import thermosample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

# The CLI module on its own: the package's __init__ (outside the CLI) is replaced by an empty package object,
# so this measures what thermosample/apps/cli.py itself imports.
CLI_ALONE = """
import sys, types
pkg = types.ModuleType("thermosample"); pkg.__path__ = [sys.argv[1]]; sys.modules["thermosample"] = pkg
from thermosample.apps import cli
try:
    cli.main(sys.argv[2:])
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""

# What the `thermosample` console script does (its entry point is thermosample.apps.cli:main).
ENTRY_POINT = """
import sys
from thermosample.apps.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def run(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flag", ["--help", "--version", "-h"])
def test_the_cli_module_answers_without_torch(flag):
    proc = run(CLI_ALONE, os.path.dirname(thermosample.__file__), flag)
    assert "torch imported: False" in proc.stderr, proc.stderr[-2000:]
    assert ("usage: thermosample" in proc.stdout) if flag != "--version" else \
        proc.stdout.strip() == f"thermosample {thermosample.__version__}"


def test_the_entry_point_answers_without_torch():
    proc = run(ENTRY_POINT, "--version")
    assert proc.stdout.strip() == f"thermosample {thermosample.__version__}"
    assert "torch imported: False" in proc.stderr, proc.stderr[-2000:]


def test_verb_help_still_lists_the_backends():
    proc = run(ENTRY_POINT, "sample", "--help")
    assert "--backend BACKEND" in proc.stdout and "auto, torch, cpp" in proc.stdout.replace("\n", " "), proc.stdout


def test_every_documented_submodule_is_an_attribute_in_a_fresh_process():
    """`import thermosample as ts; ts.ops.fused_step(...)` worked while __init__ imported everything; with the
    lazy __init__ `ts.ops` raised AttributeError unless another import had loaded it first (tests/test_memory.py
    and bench_price failed when run alone). Every `ts.<module>.` the README, docs, tests and benchmarks use
    resolves in a process that imported nothing else."""
    names = ("analysis", "auto", "bulk", "calibrate", "denoiser", "distributed", "graphs", "grids", "ops", "run",
             "sampler", "schedules", "solvers", "thermo", "toy")
    code = ("import sys, thermosample as ts\n"
            "for name in sys.argv[1:]:\n"
            "    assert getattr(ts, name).__name__ == 'thermosample.' + name, name\n"
            "print('ok')\n")
    proc = run(code, *names)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
