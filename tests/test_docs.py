"""The user docs cannot go stale: docs/api.md is what docs/build_api.py renders from the docstrings now, and
every ```python block of docs/tutorials/*.md runs.

Fences: ```python runs; ```python skip never runs (the page says why: a GPU, torchrun, a real checkpoint);
```python requires=PKG[,PKG] runs when every PKG imports, else that block is skipped. The blocks of one
page run in order in one fresh interpreter (notebook style: later blocks see earlier names), in a
temporary directory, so files a page writes (grid.json, samples/) land there.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
TUTORIALS = os.path.join(DOCS, "tutorials")
DIFFUSERS_SECTION = "## `thermosample.integrations.diffusers`"
FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest, and the machine may be shared
    return env


def _without_section(text: str, heading: str) -> str:
    """text without the section that starts at `heading` (up to the next '## ' heading)."""
    start = text.find(heading)
    if start < 0:
        return text
    end = text.find("\n## ", start + len(heading))
    return text[:start] + (text[end + 1:] if end >= 0 else "")


def test_api_reference_is_current(tmp_path):
    out = tmp_path / "api.md"
    res = subprocess.run([sys.executable, os.path.join(DOCS, "build_api.py"), "--out", str(out)],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    fresh = out.read_text(encoding="utf-8")
    with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as f:
        stored = f.read()
    if importlib.util.find_spec("diffusers") is None:  # the optional section renders only with diffusers
        fresh, stored = (_without_section(t, DIFFUSERS_SECTION) for t in (fresh, stored))
    assert fresh == stored, "docs/api.md is stale: run `python docs/build_api.py` and commit docs/api.md"


def blocks(path):
    """[(info words, code)] of the page's fenced ```python blocks."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(info.split(), code) for lang, info, code in FENCE.findall(text) if lang == "python"]


def _missing(words):
    for w in words:
        if w.startswith("requires="):
            for pkg in w.split("=", 1)[1].split(","):
                if importlib.util.find_spec(pkg) is None:
                    return pkg
    return None


PAGES = sorted(f for f in os.listdir(TUTORIALS) if f.endswith(".md")) if os.path.isdir(TUTORIALS) else []


def test_tutorials_exist():
    assert {"own-model.md", "diffusers.md", "k-diffusion.md", "bulk-and-distributed.md"} <= set(PAGES)


@pytest.mark.parametrize("page", PAGES)
def test_tutorial_code_runs(page, tmp_path):
    found = blocks(os.path.join(TUTORIALS, page))
    assert found, f"{page} has no ```python block"
    parts, skipped = [], []
    for k, (words, code) in enumerate(found):
        if "skip" in words:
            continue
        missing = _missing(words)
        if missing:
            skipped.append(f"block {k} needs {missing}")
            continue
        parts.append(f"# ---- {page}, block {k} ----\n{code}")
    if not parts:
        pytest.skip(f"{page}: every block needs a missing package ({'; '.join(skipped)})")
    script = tmp_path / "page.py"
    script.write_text("\n".join(parts), encoding="utf-8")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert res.returncode == 0, f"{page}: a code block failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
