"""The k-diffusion install recipes are the same in the README, in .ci/run (so CI runs one as written), in the
pyproject extra and in the drop-in's install hint.

The full recipe installs k-diffusion 0.0.16 with every dependency it declares (0.1.x depends on dctorch, which
pins numpy < 2; 0.0.16 has the same sampling.py), so pip has no conflicts to report. It brings torchvision,
which loads only as the build for the installed torch: where the index has none for a +cpu torch (this CI's),
the README's second line installs only what sampling.py needs, last, and CI runs that line as written after
removing a torchvision that does not load (it breaks diffusers' imports)."""
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["torch==2.13.0", "k-diffusion==0.0.16", "setuptools<81"]
SAMPLING_ONLY = ["--no-deps", "k-diffusion==0.0.16", "torchsde", "torchdiffeq", "trampoline"]


def _pip_installs(text, prefix):
    return [shlex.split(m.group(1)) for m in re.finditer(prefix + r"pip install ([^\n`]*)", text)]


def test_readme_gives_the_full_recipe_and_the_sampling_only_line_and_ci_runs_the_latter_as_written():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    kd_readme = [a for a in _pip_installs(readme, "") if any(x.startswith("k-diffusion") for x in a)]
    kd_ci = [a for a in _pip_installs(ci, r"\$py -m ") if any(x.startswith("k-diffusion") for x in a)]
    assert RECIPE in kd_readme and SAMPLING_ONLY in kd_readme
    assert all(a in (RECIPE, SAMPLING_ONLY) for a in kd_readme), kd_readme
    assert kd_ci == [["-q"] + SAMPLING_ONLY], kd_ci
    extra = re.search(r'^k-diffusion = \[(.*)\]', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert [x.strip().strip('"') for x in extra.split(",")] == RECIPE[1:]


def test_ci_installs_k_diffusion_last_after_removing_a_torchvision_that_does_not_load():
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("$py")]
    installs = [k for k, ln in enumerate(lines) if "pip install" in ln]
    assert "k-diffusion" in lines[installs[-1]]             # nothing installed after it reports its unmet needs
    guard = [k for k, ln in enumerate(lines) if "uninstall -y -q torchvision" in ln]
    assert guard and guard[0] < installs[-1]


def test_the_drop_in_hint_is_the_recipe():
    import torch

    from thermosample.integrations import k_diffusion as T
    assert shlex.split(T._INSTALL_PEER)[2:] == [f"torch=={torch.__version__.split('+')[0]}"] + RECIPE[1:]
