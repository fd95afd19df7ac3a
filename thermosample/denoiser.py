"""Prediction and time-convention adapters: any torch model -> D(x_hat; sigma_hat) = E[y | x_hat].

The model sees the physical state x = m(t) x_hat (or x_hat itself with scale_input=False) and the time in
its own training convention; its output is turned into the denoised estimate with host-side float
coefficients, so no device value is read:

    x0:        D = o
    eps:       D = x_hat - sigma o
    v:         D = (m^2 x_hat - s o) / (m^2 + s^2)            (v = m eps - s y; Salimans & Ho 2022)
    score:     D = x_hat + (s^2 / m) o                        (o = grad_x log p_t(x))
    velocity:  D = (s' m x_hat - s o) / (s' m - s m')         (o = dx/dt = m' y + s' eps; flow matching)

diffusers' `prediction_type` names are accepted as aliases (PREDICTION_ALIASES): "epsilon" = "eps",
"v_prediction" = "v", "sample" = "x0", "flow_prediction" = "velocity" (diffusers' flow-matching models
predict noise - sample = dx/dt along x = (1 - t) sample + t noise, i.e. "velocity" under CondOT).

Precision: the sampler state stays float32 (or float64) and all its arithmetic runs in it; a model whose
parameters are float16/bfloat16 (`model.half()`) gets its input x and time cast to its parameter dtype,
and its output is cast back to the state's dtype before the denoised estimate is formed.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .schedules import DiscreteVP, Schedule, get_schedule

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")
PREDICTION_ALIASES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
TIME_CONVENTIONS = ("t", "sigma", "index")
_MAX_FILLED = 1024    # time tensors a Denoiser keeps (a few grids of a few batch sizes)


class Denoiser:
    """Wrap a model so that `den(x_hat, sigma)` returns D(x_hat; sigma_hat).

    Args:
        model: callable `model(x, time, **kwargs)` -> tensor shaped like x.
        schedule: the Schedule the model was trained with (or a name: "condot", "cosine", ...).
        prediction: what the model outputs: "eps" | "x0" | "v" | "score" | "velocity", or diffusers' name
            for it: "epsilon" | "v_prediction" | "sample" | "flow_prediction" (stored as the short name).
        time: what the model takes as its time argument: "t" (physical time, times `time_scale`,
            e.g. 1000 for continuous VP models trained on t * 1000), "sigma" (sigma_hat), "index"
            (fractional training index of a DiscreteVP schedule, as DDPM models need), or a callable
            `time(t, sigma) -> float`.
        time_scale: multiplies t for time="t".
        scale_input: feed the model x = m(t) x_hat (True, the physical state) or x_hat (False, as
            EDM/k-diffusion denoisers expect).
        model_kwargs: fixed keyword arguments for every call (class labels, text embeddings, ...).

    A model with float16/bfloat16 parameters receives x and the time [B] in that dtype; its output is cast
    back to the state's dtype (float32 or float64), in which every sampler computation stays.
    """

    def __init__(self, model: Callable, schedule: Schedule | str, prediction: str = "eps", time="t",
                 time_scale: float = 1.0, scale_input: bool = True, model_kwargs: dict | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        prediction = PREDICTION_ALIASES.get(prediction, prediction) if isinstance(prediction, str) else prediction
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} (or diffusers' "
                             f"{tuple(PREDICTION_ALIASES)}), got {prediction!r}")
        if not (callable(time) or time in TIME_CONVENTIONS):
            raise ValueError(f"time must be one of {TIME_CONVENTIONS} or a callable, got {time!r}")
        self.schedule = get_schedule(schedule)
        if time == "index" and not isinstance(self.schedule, DiscreteVP):
            raise ValueError("time='index' needs a DiscreteVP schedule (it maps t to the training index)")
        self.schedule.validate()
        self.model = model
        self.prediction = prediction
        self.time = time
        self.time_scale = float(time_scale)
        if not math.isfinite(self.time_scale) or self.time_scale <= 0:
            raise ValueError(f"time_scale must be a finite positive float, got {time_scale!r}")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict (or None), got {type(model_kwargs).__name__}")
        self.scale_input = bool(scale_input)
        self.model_kwargs = dict(model_kwargs or {})

    def model_time(self, t: float, sigma: float) -> float:
        """The model's time argument for physical time t (noise level sigma)."""
        if callable(self.time):
            return float(self.time(t, sigma))
        if self.time == "sigma":
            return sigma
        if self.time == "index":
            return float(self.schedule.index(t))
        return t * self.time_scale

    def output_coeffs(self, t: float, sigma: float) -> tuple[float, float, float]:
        """(input scale c_in, a, b) with model input c_in x_hat and D = a x_hat + b o."""
        sch = self.schedule
        m, s = float(sch.m(t)), float(sch.s(t))
        c_in = m if self.scale_input else 1.0
        p = self.prediction
        if p == "x0":
            return c_in, 0.0, 1.0
        if p == "eps":
            return c_in, 1.0, -sigma
        if p == "v":
            n = m * m + s * s
            return c_in, m * m / n, -s / n
        if p == "score":
            return c_in, 1.0, s * s / m
        dm, ds = float(sch.dm(t)), float(sch.ds(t))
        den = ds * m - s * dm
        return c_in, ds * m / den, -s / den

    def coeffs(self, sigma: float) -> tuple[float, float, float, float]:
        """(t, c_in, a, b) at noise level sigma (host floats, cached): D = a x_hat + b model(c_in x_hat, time(t))."""
        return self._coeffs(float(sigma))

    def _coeffs(self, sigma: float) -> tuple[float, float, float, float]:
        """(t, c_in, a, b) at sigma, cached: a sampling run asks for the same few dozen levels every time,
        and the schedule's inverse (a bisection) costs more host time than a small state's step."""
        owner, cache = self.__dict__.get("_coeff_cache", (None, None))
        if owner is not self.schedule:              # a new schedule: start over (schedules may be unhashable)
            cache = {}
            self.__dict__["_coeff_cache"] = (self.schedule, cache)
        key = (sigma, self.prediction, self.scale_input)
        hit = cache.get(key)
        if hit is None:
            if len(cache) > 4096:
                cache.clear()
            t = float(self.schedule.sigma_to_t(sigma))
            hit = cache[key] = (t, *self.output_coeffs(t, sigma))
        return hit

    def __call__(self, x_hat: torch.Tensor, sigma: float, **kwargs) -> torch.Tensor:
        """D(x_hat; sigma) [B, ...]. `sigma` is a Python float (host), so nothing syncs."""
        sigma = float(sigma)
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite positive float, got {sigma}")
        return self.evaluate(x_hat, sigma, self._coeffs(sigma), **kwargs)

    def evaluate(self, x_hat: torch.Tensor, sigma: float, coeffs: tuple[float, float, float, float],
                 **kwargs) -> torch.Tensor:
        """D(x_hat; sigma) [B, ...] with the coefficients `coeffs` = self.coeffs(sigma) already looked up
        (a compiled loop passes them from a host table, so no schedule maths is traced)."""
        t, c_in, a, b = coeffs
        x_in = x_hat * c_in if c_in != 1.0 else x_hat
        in_dtype = self.model_dtype() or x_hat.dtype
        if x_in.dtype != in_dtype:
            x_in = x_in.to(in_dtype)
        time = self._time_tensor(self.model_time(t, sigma), x_hat.shape[0], in_dtype, x_hat.device)
        out = self.model(x_in, time, **self.model_kwargs, **kwargs)
        check_model_output(out, x_hat)
        if out.dtype != x_hat.dtype:
            out = out.to(x_hat.dtype)
        if a == 0.0:
            return out if b == 1.0 else out * b
        # eps and score have a = 1: x_hat itself (x_hat * 1.0 is x_hat, one kernel and allocation fewer)
        return torch.add(x_hat if a == 1.0 else x_hat * a, out, alpha=b)

    def _time_tensor(self, value: float, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The model's time argument, [batch] filled with `value`, kept across calls and runs (filled())."""
        return filled(self.__dict__.setdefault("_times", {}), value, batch, dtype, device)

    def model_dtype(self) -> torch.dtype | None:
        """The floating dtype of the model's first parameter (None for a model without parameters, such
        as a plain function): the dtype its input and time are cast to."""
        params = getattr(self.model, "parameters", None)
        if not callable(params):
            return None
        p = next(iter(params()), None)
        return p.dtype if isinstance(p, torch.Tensor) and p.is_floating_point() else None

    def __repr__(self) -> str:
        return f"Denoiser({type(self.model).__name__}, {self.schedule!r}, prediction={self.prediction!r})"


def filled(cache: dict, value: float, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [batch] tensor filled with `value`; on CUDA one per (value, batch, dtype, device) kept in `cache`
    across calls and runs: a model's time or sigma argument (a fill is a kernel launch and several
    microseconds of host time per step). A kept tensor that was written in place (its version moved) is made
    again. It is a normal tensor even in inference mode (an inference tensor has no version and cannot enter
    autograd later). Nothing is kept while torch.compile traces or a CUDA graph is captured (its fill would
    not have run), nor on CPU: small tensors kept alive between a run's freed states pin glibc's heap, and
    RSS grows by a state per step (issue 13; tests/test_memory.py)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return torch.full((batch,), value, dtype=dtype, device=device)
    key = (value, batch, dtype, device)
    hit = cache.get(key)
    if hit is not None and hit[0]._version == hit[1]:
        return hit[0]
    with torch.inference_mode(False):
        made = torch.full((batch,), value, dtype=dtype, device=device)
    if not torch.cuda.is_current_stream_capturing():
        if len(cache) >= _MAX_FILLED:
            cache.clear()
        cache[key] = (made, made._version)
    return made


def check_model_output(out, x: torch.Tensor) -> None:
    """Raise a clear error when a model returns something that is not a float tensor shaped like x."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(out.shape)}, expected the input's {tuple(x.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"the model returned dtype {out.dtype}; expected a floating-point tensor")
    if out.device != x.device:
        raise ValueError(f"the model returned a tensor on {out.device}, expected {x.device}")
