"""thermosample: fast, measurable diffusion sampling.

    import thermosample as ts
    den = ts.Denoiser(model, ts.schedules.CondOT(), prediction="velocity")
    out = ts.sample(den, (16, 3, 32, 32), steps=20, solver="heun", grid="karras", seed=0)
    out.samples, out.thermo
"""
from __future__ import annotations

import importlib

from ._version import __version__

# Every public name is imported on first use (PEP 562): `import thermosample` costs no torch import, so the
# CLI's --help and --version answer at once; `ts.sample` and friends load what they need when touched.
_NAMES = {
    "sample": ".sampler", "SampleOutput": ".sampler", "thermo_grid": ".calibrate", "ThermoGrid": ".calibrate",
    "CalibrationOptions": ".calibrate", "SamplerConfig": ".auto", "Denoiser": ".denoiser",
    "ThermoReport": ".thermo", "NonFiniteError": ".errors", "BackendUnavailableWarning": ".errors",
}
_LAZY_MODULES = ("distributed", "bulk")        # need torch.distributed / safetensors
_MODULES = ("analysis", "auto", "calibrate", "denoiser", "graphs", "grids", "ops", "run", "sampler", "schedules",
            "solvers", "thermo", "toy") + _LAZY_MODULES


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value          # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_MODULES))


__all__ = ["sample", "thermo_grid", "ThermoGrid", "SamplerConfig", "CalibrationOptions", "auto", "calibrate",
           "Denoiser", "schedules", "grids", "toy",
           "ThermoReport", "SampleOutput", "NonFiniteError", "BackendUnavailableWarning", "__version__"]
