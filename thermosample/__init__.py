"""thermosample: fast, measurable diffusion sampling.

    import thermosample as ts
    den = ts.Denoiser(model, ts.schedules.CondOT(), prediction="velocity")
    out = ts.sample(den, (16, 3, 32, 32), steps=20, solver="heun", grid="karras", seed=0)
    out.samples, out.thermo
"""
from . import auto, calibrate, grids, schedules, toy
from ._version import __version__
from .auto import SamplerConfig
from .calibrate import CalibrationOptions, ThermoGrid, thermo_grid
from .denoiser import Denoiser
from .errors import BackendUnavailableWarning, NonFiniteError
from .sampler import SampleOutput, sample
from .thermo import ThermoReport

_LAZY_MODULES = ("distributed", "bulk")


def __getattr__(name):
    """Import `ts.distributed` and `ts.bulk` on first use (they need torch.distributed / safetensors)."""
    if name in _LAZY_MODULES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["sample", "thermo_grid", "ThermoGrid", "SamplerConfig", "CalibrationOptions", "auto", "calibrate",
           "Denoiser", "schedules", "grids", "toy",
           "ThermoReport", "SampleOutput", "NonFiniteError", "BackendUnavailableWarning", "__version__"]
