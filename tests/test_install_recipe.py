"""The k-diffusion install recipe is one line, the same in the README, in .ci/run (so CI runs it as written),
in the pyproject extra and in the drop-in's install hint; it leaves pip with no conflicts to report, and CI
checks that (`pip check`) after its last install.

Why this line: k-diffusion 0.1.x depends on dctorch, which pins numpy < 2, so `pip install k-diffusion` either
downgrades numpy (thermosample needs 2) or backtracks; `--no-deps` leaves k-diffusion's declared dependencies
missing, which pip reports as a red "dependency resolver" ERROR block at every later install that touches one
of them (`pip install .` included). 0.0.16 has the same sampling.py and no dctorch."""
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["torch==2.13.0", "k-diffusion==0.0.16", "setuptools<81"]


def _pip_installs(text, prefix):
    return [shlex.split(m.group(1)) for m in re.finditer(prefix + r"pip install ([^\n`]*)", text)]


def test_readme_ci_and_extra_name_one_recipe_without_no_deps():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    kd_readme = [a for a in _pip_installs(readme, "") if any(x.startswith("k-diffusion") for x in a)]
    kd_ci = [a for a in _pip_installs(ci, r"\$py -m ") if any(x.startswith("k-diffusion") for x in a)]
    assert kd_readme and all(a == RECIPE for a in kd_readme), kd_readme
    assert kd_ci == [["-q"] + RECIPE], kd_ci
    assert "--no-deps" not in readme and "--no-deps" not in ci
    extra = re.search(r'^k-diffusion = \[(.*)\]', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert [x.strip().strip('"') for x in extra.split(",")] == RECIPE[1:]


def test_ci_checks_for_conflicts_after_its_last_install():
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("$py")]
    installs = [k for k, ln in enumerate(lines) if "pip install" in ln]
    checks = [k for k, ln in enumerate(lines) if ln.split()[1:4] == ["-m", "pip", "check"]]
    assert checks and checks[-1] > installs[-1]


def test_the_drop_in_hint_is_the_recipe():
    import torch

    from thermosample.integrations import k_diffusion as T
    assert shlex.split(T._INSTALL_PEER)[2:] == [f"torch=={torch.__version__.split('+')[0]}"] + RECIPE[1:]
