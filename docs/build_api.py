"""Render thermosample's API reference from its docstrings into docs/api.md.

    python docs/build_api.py                 # rewrite docs/api.md
    python docs/build_api.py --out API.md    # write elsewhere (tests/test_docs.py compares the two)

Uses only the standard library (`inspect`) and the package itself. The output depends on the code alone
(no addresses, versions or dates), so tests/test_docs.py can check that docs/api.md is current. diffusers
is optional: without it the diffusers section says so, and the test compares the other sections only.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "api.md")

# (module, heading note); every public name of each is rendered.
MODULES = [
    ("thermosample", "the top level: `import thermosample as ts`"),
    ("thermosample.schedules", "noise schedules x_t = m(t) y + s(t) eps"),
    ("thermosample.grids", "time grids (descending sigmas ending in 0)"),
    ("thermosample.solvers", "the solver table"),
    ("thermosample.calibrate", "calibrated grids (`ts.thermo_grid`)"),
    ("thermosample.auto", "solver=\"auto\": the plan, the rule, the config"),
    ("thermosample.thermo", "the thermodynamic report"),
    ("thermosample.toy", "exact-score toy models"),
    ("thermosample.bulk", "bulk sampling to disk (`ts.bulk`)"),
    ("thermosample.distributed", "sampling under torch.distributed (`ts.distributed`)"),
    ("thermosample.integrations.k_diffusion", "drop-in for `k_diffusion.sampling`"),
    ("thermosample.integrations.diffusers", "drop-in diffusers schedulers (needs diffusers)"),
]
OPTIONAL = {"thermosample.integrations.diffusers": "diffusers"}
NOISE_RULES = {"never": "never (an ODE solver)", "always": "always (an SDE solver)",
               "eta": "when `eta` != 0", "churn": "when `churn` > 0"}
CONSTANT_TYPES = (int, float, str, tuple, frozenset)


# ------------------------------------------------------------------------------------------------------
# Signatures and docstrings
# ------------------------------------------------------------------------------------------------------
def _annotation(ann) -> str:
    if ann is inspect.Parameter.empty:
        return ""
    if isinstance(ann, str):
        return ann
    return inspect.formatannotation(ann)


def _default(value) -> str:
    if isinstance(value, float) and value == float("inf"):
        return "math.inf"
    text = repr(value)
    if " at 0x" in text:  # an object without a stable repr
        text = f"<{type(value).__name__}>"
    return text


def signature(obj, drop_first: int = 0) -> str:
    """'(a, b=1, *, c: int = 2) -> T' with annotations as written in the source (no quotes, no addresses)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = list(sig.parameters.values())[drop_first:]
    parts, star_done = [], False
    for k, p in enumerate(params):
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
            text = "*" + p.name
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + p.name
        else:
            text = p.name
        ann = _annotation(p.annotation)
        if ann:
            text += ": " + ann
        if p.default is not inspect.Parameter.empty:
            text += (" = " if ann else "=") + _default(p.default)
        parts.append(text)
        if p.kind is p.POSITIONAL_ONLY and (k == len(params) - 1 or params[k + 1].kind is not p.POSITIONAL_ONLY):
            parts.append("/")
    ret = _annotation(sig.return_annotation)
    return f"({', '.join(parts)})" + (f" -> {ret}" if ret else "")


def doc_block(obj) -> list[str]:
    doc = inspect.getdoc(obj) if obj is not None else None
    if not doc:
        return ["*(no docstring)*", ""]
    return ["```text", doc.rstrip(), "```", ""]


def first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    line = " ".join(doc.split("\n\n")[0].split())
    return line.replace("|", "\\|")


# ------------------------------------------------------------------------------------------------------
# Which names a module makes public
# ------------------------------------------------------------------------------------------------------
def public_names(mod) -> list[str]:
    """__all__ (in its order), then any other public function or class the module defines itself, then (for a
    module without __all__) its UPPER_CASE constants."""
    declared = list(getattr(mod, "__all__", []))
    names = list(declared)
    for name, obj in vars(mod).items():
        if name.startswith("_") or name in names:
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", None) == mod.__name__:
            names.append(name)
        elif not declared and name.isupper() and isinstance(obj, CONSTANT_TYPES):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------
def render_function(qual: str, fn, level: str = "###") -> list[str]:
    return [f"{level} `{qual}{signature(fn)}`", ""] + doc_block(fn)


def _bases(cls) -> str:
    names = []
    for b in cls.__bases__:
        if b is object or b.__name__.startswith("_"):
            continue
        mod = b.__module__.split(".")[0]
        names.append(f"{mod}.{b.__name__}" if mod not in ("builtins",) else b.__name__)
    return ", ".join(f"`{n}`" for n in names)


def _members(cls):
    """cls's own members and those it takes from the package's private bases (`_AutoSteps`): a public class's
    API wherever its code lives; the first definition along the MRO wins."""
    found = {}
    for klass in cls.__mro__:
        if klass is cls or (klass.__name__.startswith("_") and klass.__module__.startswith("thermosample")):
            for name, member in vars(klass).items():
                found.setdefault(name, member)
    return found.items()


def render_members(cls, qual: str) -> list[str]:
    out = []
    fields = set(getattr(cls, "__dataclass_fields__", {}))
    for name, member in _members(cls):
        if name.startswith("_") or name in fields:
            continue
        if isinstance(member, property):
            out += [f"#### `{qual}.{name}` (property)", ""] + doc_block(member.fget)
        elif isinstance(member, (classmethod, staticmethod)):
            fn = member.__func__
            kind = "classmethod" if isinstance(member, classmethod) else "staticmethod"
            sig = signature(fn, drop_first=1 if kind == "classmethod" else 0)
            out += [f"#### `{qual}.{name}{sig}` ({kind})", ""] + doc_block(fn)
        elif inspect.isfunction(member):
            if "__signature__" in vars(member):  # a wrapper that shows its peer's signature (diffusers)
                out += [f"#### `{qual}.{name}(...)`", "", "The signature of the diffusers base class.", ""]
                out += doc_block(member)
            else:
                out += [f"#### `{qual}.{name}{signature(member, drop_first=1)}`", ""] + doc_block(member)
        elif isinstance(member, CONSTANT_TYPES) and not isinstance(member, tuple):
            out += [f"#### `{qual}.{name} = {member!r}` (class attribute)", ""]
    return out


def render_class(qual: str, cls) -> list[str]:
    if issubclass(cls, BaseException):
        head = f"### `{qual}` (exception)"
    elif any(b.__module__.startswith("diffusers") for b in cls.__mro__[1:]):
        head = f"### `{qual}(**config)`"  # the peer's constructor: its signature follows the installed diffusers
    else:
        head = f"### `{qual}{signature(cls)}`"
    lines = [head, ""]
    bases = _bases(cls)
    if bases:
        lines += [f"Subclass of {bases}" + (" (its constructor and config)" if head.endswith("(**config)`") else "")
                  + ".", ""]
    lines += doc_block(cls)
    return lines + render_members(cls, qual)


def render_solver_table() -> list[str]:
    from thermosample.solvers import SOLVERS
    lines = ["### `SOLVERS`: the solver table", "",
             "Every name below is a valid `solver=` of `ts.sample`, `ts.thermo_grid`, `ts.bulk.sample_to_disk` "
             "and `thermosample sample --solver`; its options are keyword arguments of `ts.sample`. "
             "Evaluations per step: model calls per step (a multi-stage step to sigma = 0 takes one, so "
             "`heun` with `steps=n` spends 2n - 1). Noise: when the solver leaves the probability-flow ODE "
             "(then the report has no speed limit and `thermo_grid` defaults to method \"error\").", "",
             "| solver | order | evaluations per step | noise | options (defaults) | what it is |",
             "|---|---|---|---|---|---|"]
    for name, spec in SOLVERS.items():
        opts = ", ".join(f"`{k}={_default(v)}`" for k, v in spec.options.items()) or "none"
        lines.append(f"| `{name}` | {spec.order} | {spec.evals_per_step} | {NOISE_RULES.get(spec.noise, spec.noise)} "
                     f"| {opts} | {first_line(spec.fn)} |")
    return lines + [""]


def render_module(modname: str, note: str) -> list[str]:
    lines = [f"## `{modname}`", "", f"*{note}*", ""]
    try:
        mod = importlib.import_module(modname)
    except ImportError as exc:
        if modname in OPTIONAL:
            return lines + [f"Not rendered here: `{OPTIONAL[modname]}` is not installed "
                            f"(`pip install {OPTIONAL[modname]}`; {exc.name} missing).", ""]
        raise
    lines += doc_block(mod)
    solver_fns = set()
    if modname == "thermosample.solvers":
        lines += render_solver_table()
        solver_fns = {spec.fn.__name__ for spec in mod.SOLVERS.values()}
    for name in list(getattr(mod, "_NAMES", ())) + [m for m in getattr(mod, "_MODULES", ())
                                                   if m not in getattr(mod, "_LAZY_MODULES", ())]:
        getattr(mod, name)    # a package that loads its public names on first use (thermosample/__init__.py)
    names = public_names(mod)
    lazy = list(getattr(mod, "_LAZY_MODULES", ()))
    for name in names + [n for n in lazy if n not in names]:
        qual = f"{modname}.{name}"
        if name in solver_fns:
            continue  # in the table above; called through ts.sample(solver=name)
        if name not in vars(mod) and name not in lazy:
            hook = vars(mod).get("__getattr__")
            lines += [f"### `{qual}`", "", "Resolved lazily on first access (it may need an optional package):", ""]
            lines += doc_block(hook)
            continue
        if name in lazy:
            lines += [f"### `{qual}` (module)", "", f"Imported on first use; see the `{modname}.{name}` section.", ""]
            continue
        obj = vars(mod)[name]
        if inspect.ismodule(obj):
            lines += [f"### `{qual}` (module)", "", f"See the `{obj.__name__}` section.", ""]
        elif inspect.isclass(obj):
            lines += render_class(qual, obj)
        elif callable(obj):
            lines += render_function(qual, obj)
        elif name == "__version__":
            lines += [f"### `{qual}`", "", "The package version (a string, from `thermosample/_version.py`).", ""]
        else:
            lines += [f"### `{qual} = {_default(obj)}`", ""]
    if modname == "thermosample.integrations.diffusers":
        base = mod._ThermoStep
        lines += ["### Common to every Thermo scheduler", "",
                  "Members every class above inherits from the shared base (besides diffusers' own):", ""]
        lines += render_members(base, "Thermo*Scheduler")
    if modname == "thermosample.solvers":
        lines += ["### Solver functions", "",
                  "Each row of `SOLVERS` names a function `solver(run, x, sigmas, **options) -> x` in this module; "
                  "call it through `ts.sample(..., solver=NAME, **options)`.", ""]
        for name, spec in mod.SOLVERS.items():
            lines += [f"#### `{name}{signature(spec.fn, drop_first=3)}`", ""] + doc_block(spec.fn)
    return lines


def render() -> str:
    sys.path.insert(0, os.path.dirname(HERE))  # the checkout's package when run from the repo
    lines = ["# thermosample API reference", "",
             "Generated from the docstrings by `python docs/build_api.py`; do not edit by hand "
             "(`tests/test_docs.py` fails when this file is stale). Tutorials: [docs/tutorials/](tutorials/); "
             "jargon: [glossary.md](glossary.md).", "", "Modules:", ""]
    for modname, note in MODULES:
        anchor = modname.replace(".", "")
        lines.append(f"- [`{modname}`](#{anchor}): {note}")
    lines.append("")
    for modname, note in MODULES:
        lines += render_module(modname, note)
    text = "\n".join(lines).rstrip() + "\n"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output path (default docs/api.md)")
    args = parser.parse_args(argv)
    text = render()
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
