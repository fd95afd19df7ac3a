"""Plots, optional packages and packaging (issue 14, item 6)."""
import ast
import os
import sys

import pytest
import torch

import thermosample as ts

matplotlib = pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIX = ts.toy.GaussianMixture(torch.tensor([[1.5, -1.0], [-1.0, 1.0]]), [0.4, 0.6])


@pytest.fixture(scope="module")
def report():
    return ts.sample(MIX.denoiser("edm"), (8, 2), steps=6, solver="heun", backend="torch").thermo


@pytest.fixture
def svg_backend():
    """Run with a backend other than Agg selected, and put the old one back afterwards."""
    old = matplotlib.get_backend()
    matplotlib.use("svg", force=True)
    yield "svg"
    matplotlib.use(old, force=True)


def test_plot_keeps_the_backend_and_returns_a_figure(report, svg_backend, tmp_path):
    from matplotlib.figure import Figure
    path = tmp_path / "profile.png"
    fig = report.plot(path)
    assert matplotlib.get_backend() == svg_backend                 # not switched to Agg
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(report.plot(), Figure)                       # no path: just the figure


def test_plot_into_given_axes_with_label(report):
    from matplotlib.figure import Figure
    fig = Figure()
    ax = fig.add_subplot()
    got = report.plot(ax=ax, label="heun, 6 steps")
    report.plot(ax=ax, label="again")
    assert got is fig and len(fig.axes) == 1 and len(ax.lines) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["heun, 6 steps", "again"]
    fig2 = Figure()
    pair = fig2.subplots(1, 2)
    assert report.plot(ax=pair, label="x") is fig2
    assert all(a.get_legend() is not None and len(a.lines) == 1 for a in pair)
    with pytest.raises(TypeError, match="Axes"):
        report.plot(ax="not axes")


def test_missing_matplotlib_gives_the_install_hint(report, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'thermosample\[plot\]'"):
        report.plot()


# -- packaging ---------------------------------------------------------------------------------------
def _pyproject():
    try:
        import tomllib
    except ImportError:                                            # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _dist(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.strip().lower()


# import name -> distribution name where they differ
DIST = {"sklearn": "scikit-learn", "k_diffusion": "k-diffusion"}


def _third_party_imports():
    """Top-level modules imported anywhere in the installed package (thermosample/, kernels/)."""
    found = {}
    for base in ("thermosample", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        mods = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        mods = [node.module]
                    else:
                        continue
                    for m in mods:
                        top = m.split(".")[0]
                        if top not in sys.stdlib_module_names and top not in ("thermosample", "kernels", "__future__"):
                            found.setdefault(top, os.path.relpath(path, ROOT))
    return found


def test_every_imported_package_is_declared():
    project = _pyproject()
    core = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    missing = {m: where for m, where in _third_party_imports().items()
               if DIST.get(m, m).replace("_", "-") not in core | extras}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "safetensors" in core                  # bulk sampling (resume) and the shipped digits model need it
    assert "matplotlib" in {_dist(r) for r in project["optional-dependencies"]["plot"]}
    assert any("scikit-learn" in {_dist(r) for r in reqs} for name, reqs in
               project["optional-dependencies"].items() if name != "test")


def test_py_typed_is_shipped():
    assert os.path.isfile(os.path.join(ROOT, "thermosample", "py.typed"))
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    package_data = [kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                    for kw in node.keywords if kw.arg == "package_data"]
    assert package_data and "py.typed" in ast.literal_eval(package_data[0])["thermosample"]
