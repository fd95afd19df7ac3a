"""The CLI as a user meets it (issue 14, item 5): --version, help on every option, no developer notes in
the top-level help, a calibrated grid for the user's own model from the current directory reused by
`sample --grid`, and train-digits writing only into the current directory."""
import os
import subprocess
import sys
import textwrap

import pytest

import thermosample
from thermosample.apps import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "thermosample.apps.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_version():
    res = run(["--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"thermosample {thermosample.__version__}"


def test_every_option_has_help_and_the_top_level_help_is_for_users(capsys):
    parser = cli._Parser(prog="thermosample")
    sub = parser.add_subparsers(dest="verb")
    for add in cli.VERBS:
        add(sub)
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"thermosample {name} {action.option_strings[0]} has no help text"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "add_<verb>" not in text and "function below" not in text
    assert "thermosample sample --model" in text


def test_schedule_for_a_model_in_the_current_directory_feeds_sample(tmp_path):
    (tmp_path / "mymodel.py").write_text(textwrap.dedent("""
        import thermosample as ts
        def make():
            den = ts.toy.toy_factory(dim=3)
            return den
    """))
    res = run(["schedule", "--model", "mymodel:make", "--steps", "5", "--save", "grid.json"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "grid.json").exists() and "chose" in res.stdout
    res = run(["sample", "--model", "mymodel:make", "--n", "4", "--batch", "2", "--out", "out", "--steps", "5",
               "--grid", "grid.json"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    import json
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    saved = json.loads((tmp_path / "grid.json").read_text())["sigmas"]
    assert manifest["config"]["grid"] == saved
    # without --steps the grid file sets the count; a --steps that disagrees is refused before any output
    res = run(["sample", "--model", "mymodel:make", "--n", "4", "--batch", "2", "--out", "o3", "--grid", "grid.json"],
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "o3" / "manifest.json").read_text())["config"]["steps"] == len(saved) - 1 == 5
    res = run(["sample", "--model", "mymodel:make", "--n", "4", "--batch", "2", "--out", "o4", "--steps", "7",
               "--grid", "grid.json"], cwd=tmp_path)
    assert res.returncode != 0 and "disagrees" in res.stderr and not (tmp_path / "o4").exists()
    res = run(["sample", "--model", "mymodel:make", "--n", "4", "--batch", "2", "--out", "o2", "--grid", "nope.json"],
              cwd=tmp_path)
    assert res.returncode == 2 and "cannot read the grid file" in res.stderr and "Traceback" not in res.stderr


def test_train_digits_writes_into_the_current_directory(tmp_path):
    from thermosample.apps import digits
    before = os.path.getmtime(digits.WEIGHTS)
    res = run(["train-digits", "--steps", "2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "digits.safetensors").exists() and (tmp_path / "digits.png").exists()
    assert os.path.getmtime(digits.WEIGHTS) == before
    res = run(["train-digits", "--steps", "2", "--out", digits.WEIGHTS], cwd=tmp_path)
    assert res.returncode == 2 and "read-only" in res.stderr
