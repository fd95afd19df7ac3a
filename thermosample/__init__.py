"""thermosample: fast, measurable diffusion sampling.

    import thermosample as ts
    den = ts.Denoiser(model, ts.schedules.CondOT(), prediction="velocity")
    out = ts.sample(den, (16, 3, 32, 32), steps=20, solver="heun", grid="karras", seed=0)
    out.samples, out.thermo
"""
from . import grids, schedules, toy
from .denoiser import Denoiser
from .errors import BackendUnavailableWarning, NonFiniteError
from .sampler import SampleOutput, sample
from .thermo import ThermoReport

__version__ = "0.1.0"
__all__ = ["sample", "Denoiser", "schedules", "grids", "toy", "ThermoReport", "SampleOutput",
           "NonFiniteError", "BackendUnavailableWarning", "__version__"]
