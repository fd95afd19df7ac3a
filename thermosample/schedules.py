"""Noise schedules x_t = m(t) y + s(t) eps in physical time t (docs/theory.md §1).

A schedule gives m, s, their time derivatives, the temperature T(t) = m s d/dt(s/m), the sampler
coordinate sigma_hat(t) = s/m and its inverse. All host arithmetic is float64 (numpy); every method
takes a float or an array of floats and returns the same kind.

Subclass `Schedule` and define `m(t)` and `s(t)` (and `dm`, `ds` where a closed form is known; central
differences are used otherwise). `sigma_to_t` inverts sigma_hat by bisection unless overridden.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = ["Schedule", "CondOT", "Cosine", "VPLinear", "VE", "EDM", "DiscreteVP", "OU", "get_schedule"]


def _arr(t):
    return np.asarray(t, dtype=np.float64)


def _like(t, value):
    """Return a Python float for scalar input, an array otherwise."""
    return float(value) if np.ndim(value) == 0 and np.ndim(t) == 0 else value


class Schedule:
    """Base class: define m(t) and s(t) on [t_min, t_max]; everything else derives from them.

    Args:
        t_min: smallest time the sampler evaluates the model at (> 0 where sigma(0) = 0, since the
            entropy production diverges logarithmically at t -> 0 for sharp data, docs/theory.md §2).
        t_max: the time sampling starts from (the prior is N(0, sigma_hat(t_max)^2 I) in x_hat).
    """

    name = "custom"
    t_min: float = 1e-3
    t_max: float = 1.0

    def __init__(self, t_min: float | None = None, t_max: float | None = None):
        if t_min is not None:
            self.t_min = float(t_min)
        if t_max is not None:
            self.t_max = float(t_max)
        if not (math.isfinite(self.t_min) and math.isfinite(self.t_max) and self.t_min < self.t_max):
            raise ValueError(f"{type(self).__name__}: need finite t_min < t_max, got "
                             f"t_min={self.t_min}, t_max={self.t_max}")

    # --- to define in subclasses -------------------------------------------------------------
    def m(self, t):
        raise NotImplementedError(f"{type(self).__name__} must define m(t)")

    def s(self, t):
        raise NotImplementedError(f"{type(self).__name__} must define s(t)")

    # --- derivatives (override with closed forms where known) -------------------------------
    def _fd(self, f, t):
        t = _arr(t)
        h = 1e-6 * np.maximum(1.0, np.abs(t))
        return _like(t, (_arr(f(t + h)) - _arr(f(t - h))) / (2 * h))

    def dm(self, t):
        """dm/dt."""
        return self._fd(self.m, t)

    def ds(self, t):
        """ds/dt."""
        return self._fd(self.s, t)

    # --- derived quantities -------------------------------------------------------------------
    def sigma(self, t):
        """sigma_hat(t) = s(t) / m(t), the noise level in sampler (k-diffusion) coordinates."""
        return _like(t, _arr(self.s(t)) / _arr(self.m(t)))

    def dsigma(self, t):
        """d sigma_hat / dt = (s' m - s m') / m^2."""
        m, s = _arr(self.m(t)), _arr(self.s(t))
        return _like(t, (_arr(self.ds(t)) * m - s * _arr(self.dm(t))) / (m * m))

    def temperature(self, t):
        """T(t) = m s d/dt(s/m): half the squared diffusion coefficient of the forward SDE (>= 0)."""
        m, s = _arr(self.m(t)), _arr(self.s(t))
        return _like(t, m * s * _arr(self.dsigma(t)))

    T = temperature

    def drift(self, t):
        """f(x, t) / x = (dm/dt) / m."""
        return _like(t, _arr(self.dm(t)) / _arr(self.m(t)))

    def velocity_coeffs(self, t):
        """(alpha, beta) with physical velocity nu = alpha x_hat + beta D (docs/theory.md §2)."""
        m, sig = _arr(self.m(t)), _arr(self.sigma(t))
        k = m * _arr(self.dsigma(t)) / sig
        return _like(t, _arr(self.dm(t)) + k), _like(t, -k)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_min))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_max))

    def sigma_to_t(self, sigma):
        """Inverse of sigma_hat(t) on [t_min, t_max] (bisection; sigma_hat is increasing in t)."""
        sig = _arr(sigma)
        lo = np.full(sig.shape, self.t_min)
        hi = np.full(sig.shape, self.t_max)
        # allow sigma a little outside the range (rounding of user-supplied grids)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            below = _arr(self.sigma(mid)) < sig
            lo = np.where(below, mid, lo)
            hi = np.where(below, hi, mid)
        return _like(sigma, 0.5 * (lo + hi))

    def validate(self, t=None) -> None:
        """Check m > 0, s >= 0, sigma_hat increasing and T(t) >= 0 on a grid; raise ValueError naming
        the schedule and the first offending time."""
        t = np.linspace(self.t_min, self.t_max, 257) if t is None else _arr(t)
        m, s, temp = _arr(self.m(t)), _arr(self.s(t)), _arr(self.temperature(t))
        bad = ~(np.isfinite(m) & np.isfinite(s) & np.isfinite(temp))
        if bad.any():
            raise ValueError(f"schedule {self!r} is not finite at t={t[bad.argmax()]:.6g}")
        if (m <= 0).any():
            raise ValueError(f"schedule {self!r} has m(t) <= 0 at t={t[(m <= 0).argmax()]:.6g}")
        tol = 1e-9 * np.maximum(1.0, np.abs(temp).max())
        if (temp < -tol).any():
            i = int((temp < -tol).argmax())
            raise ValueError(f"schedule {self!r} violates T(t) >= 0: T({t[i]:.6g}) = {temp[i]:.6g} "
                             "(the noise-to-signal ratio s/m must not decrease with t)")

    def __repr__(self) -> str:
        # every parameter that changes sigma(t): a config records its schedule by this string and warns when
        # it runs with another (auto.check_made_for), so two different schedules must not print alike
        params = "".join(f"{k}={v:g}, " for k, v in self._params().items())
        return f"{type(self).__name__}({params}t_min={self.t_min:g}, t_max={self.t_max:g})"

    def _params(self) -> dict:
        """The constructor's parameters besides t_min and t_max, for repr."""
        return {}


class CondOT(Schedule):
    """Conditional optimal transport / rectified flow: m = 1 - t, s = t (Lipman et al. 2023)."""

    name = "condot"
    t_min, t_max = 1e-3, 1.0 - 1e-3

    def m(self, t):
        return 1.0 - t

    def s(self, t):
        return _like(t, _arr(t) * 1.0)

    def dm(self, t):
        return _like(t, np.full(np.shape(t), -1.0))

    def ds(self, t):
        return _like(t, np.full(np.shape(t), 1.0))

    def sigma_to_t(self, sigma):
        sig = _arr(sigma)
        return _like(sigma, sig / (1.0 + sig))


class Cosine(Schedule):
    """Cosine (VP): m = cos(pi t / 2), s = sin(pi t / 2) (Nichol & Dhariwal 2021)."""

    name = "cosine"
    t_min, t_max = 1e-3, 1.0 - 1e-3

    def m(self, t):
        return _like(t, np.cos(0.5 * np.pi * _arr(t)))

    def s(self, t):
        return _like(t, np.sin(0.5 * np.pi * _arr(t)))

    def dm(self, t):
        return _like(t, -0.5 * np.pi * np.sin(0.5 * np.pi * _arr(t)))

    def ds(self, t):
        return _like(t, 0.5 * np.pi * np.cos(0.5 * np.pi * _arr(t)))

    def sigma_to_t(self, sigma):
        return _like(sigma, np.arctan(_arr(sigma)) * 2.0 / np.pi)


class VPLinear(Schedule):
    """Variance preserving SDE with linear beta (Song et al. 2021): m = exp(-B(t)/2), s = sqrt(1 - m^2),
    B(t) = beta_min t + (beta_max - beta_min) t^2 / 2."""

    name = "vp"
    t_min, t_max = 1e-3, 1.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min=None, t_max=None):
        super().__init__(t_min, t_max)
        if not 0 <= beta_min <= beta_max:
            raise ValueError(f"VPLinear needs 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _params(self) -> dict:
        return {"beta_min": self.beta_min, "beta_max": self.beta_max}

    def _B(self, t):
        t = _arr(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * _arr(t)

    def m(self, t):
        return _like(t, np.exp(-0.5 * self._B(t)))

    def s(self, t):
        return _like(t, np.sqrt(-np.expm1(-self._B(t))))

    def dm(self, t):
        return _like(t, -0.5 * self._beta(t) * np.exp(-0.5 * self._B(t)))

    def ds(self, t):
        B = self._B(t)
        return _like(t, 0.5 * self._beta(t) * np.exp(-B) / np.sqrt(-np.expm1(-B)))

    def sigma_to_t(self, sigma):
        # sigma^2 = e^B - 1  =>  B = log1p(sigma^2); solve the quadratic for t
        B = np.log1p(_arr(sigma) ** 2)
        a = 0.5 * (self.beta_max - self.beta_min)
        if a == 0:
            return _like(sigma, B / self.beta_min)
        return _like(sigma, (-self.beta_min + np.sqrt(self.beta_min ** 2 + 4 * a * B)) / (2 * a))


class VE(Schedule):
    """Variance exploding SDE (Song et al. 2021): m = 1, s = sigma_min (sigma_max / sigma_min)^t."""

    name = "ve"
    t_min, t_max = 0.0, 1.0

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min=None, t_max=None):
        super().__init__(t_min, t_max)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.smin, self.smax = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.smax / self.smin)

    def _params(self) -> dict:
        return {"sigma_min": self.smin, "sigma_max": self.smax}

    def m(self, t):
        return _like(t, np.ones(np.shape(t)))

    def s(self, t):
        return _like(t, self.smin * np.exp(self._log_ratio * _arr(t)))

    def dm(self, t):
        return _like(t, np.zeros(np.shape(t)))

    def ds(self, t):
        return _like(t, self._log_ratio * _arr(self.s(t)))

    def sigma_to_t(self, sigma):
        return _like(sigma, np.log(_arr(sigma) / self.smin) / self._log_ratio)


class EDM(Schedule):
    """EDM (Karras et al. 2022): m = 1, s = t, so sigma_hat = t, t in [0.002, 80]."""

    name = "edm"
    t_min, t_max = 0.002, 80.0

    def m(self, t):
        return _like(t, np.ones(np.shape(t)))

    def s(self, t):
        return _like(t, _arr(t) * 1.0)

    def dm(self, t):
        return _like(t, np.zeros(np.shape(t)))

    def ds(self, t):
        return _like(t, np.ones(np.shape(t)))

    def sigma_to_t(self, sigma):
        return _like(sigma, _arr(sigma) * 1.0)


class OU(Schedule):
    """Ornstein-Uhlenbeck process: m = e^{-t}, s = sqrt(1 - e^{-2t}) (docs/theory.md §5; Biroli et al.)."""

    name = "ou"
    t_min, t_max = 1e-3, 8.0

    def m(self, t):
        return _like(t, np.exp(-_arr(t)))

    def s(self, t):
        return _like(t, np.sqrt(-np.expm1(-2.0 * _arr(t))))

    def dm(self, t):
        return _like(t, -np.exp(-_arr(t)))

    def ds(self, t):
        t = _arr(t)
        return _like(t, np.exp(-2.0 * t) / np.sqrt(-np.expm1(-2.0 * t)))

    def sigma_to_t(self, sigma):
        return _like(sigma, 0.5 * np.log1p(_arr(sigma) ** 2))


class DiscreteVP(Schedule):
    """A discrete DDPM schedule given by alphas_cumprod [N] (index i = 0 is the least noisy).

    Physical time t in [0, 1] maps to the fractional training index i = t (N - 1); log sigma_hat is
    interpolated linearly in i (as k-diffusion's DiscreteSchedule does), m = 1/sqrt(1 + sigma^2),
    s = sigma m. `index(t)` gives the (fractional) training timestep to feed the model.
    """

    name = "discrete_vp"
    t_min, t_max = 0.0, 1.0

    def __init__(self, alphas_cumprod, t_min=None, t_max=None):
        super().__init__(t_min, t_max)
        ac = np.asarray(getattr(alphas_cumprod, "cpu", lambda: alphas_cumprod)(), dtype=np.float64).reshape(-1)
        if ac.size < 2:
            raise ValueError("DiscreteVP needs alphas_cumprod with at least 2 entries")
        if not (np.all(ac > 0) and np.all(ac < 1) and np.all(np.diff(ac) < 0)):
            raise ValueError("alphas_cumprod must lie in (0, 1) and strictly decrease with the index")
        self.alphas_cumprod = ac
        self.log_sigmas = 0.5 * np.log((1.0 - ac) / ac)
        self.n = ac.size

    def index(self, t):
        """Fractional training index i = t (N - 1)."""
        return _like(t, _arr(t) * (self.n - 1))

    def _log_sigma(self, t):
        return np.interp(_arr(t) * (self.n - 1), np.arange(self.n), self.log_sigmas)

    def _dlog_sigma(self, t):
        i = np.clip(_arr(t) * (self.n - 1), 0, self.n - 1 - 1e-9)
        k = np.floor(i).astype(np.int64)
        return (self.log_sigmas[k + 1] - self.log_sigmas[k]) * (self.n - 1)

    def sigma(self, t):
        return _like(t, np.exp(self._log_sigma(t)))

    def m(self, t):
        return _like(t, 1.0 / np.sqrt(1.0 + np.exp(2 * self._log_sigma(t))))

    def s(self, t):
        sig = np.exp(self._log_sigma(t))
        return _like(t, sig / np.sqrt(1.0 + sig * sig))

    def dsigma(self, t):
        return _like(t, np.exp(self._log_sigma(t)) * self._dlog_sigma(t))

    def dm(self, t):
        sig = np.exp(self._log_sigma(t))
        return _like(t, -sig * _arr(self.dsigma(t)) / (1.0 + sig * sig) ** 1.5)

    def ds(self, t):
        sig = np.exp(self._log_sigma(t))
        return _like(t, _arr(self.dsigma(t)) / (1.0 + sig * sig) ** 1.5)

    def sigma_to_t(self, sigma):
        idx = np.interp(np.log(_arr(sigma)), self.log_sigmas, np.arange(self.n))
        return _like(sigma, idx / (self.n - 1))

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.alphas_cumprod.tobytes()).hexdigest()[:12]   # the table, not just its length
        return f"DiscreteVP(N={self.n}, alphas_cumprod={digest})"


_NAMED = {"condot": CondOT, "flow": CondOT, "rectified_flow": CondOT, "cosine": Cosine, "vp": VPLinear,
          "vp_linear": VPLinear, "ve": VE, "edm": EDM, "ou": OU}


def get_schedule(schedule) -> Schedule:
    """A Schedule instance from an instance or a name ("condot", "cosine", "vp", "ve", "edm", "ou")."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, type) and issubclass(schedule, Schedule):
        return schedule()
    if isinstance(schedule, str) and schedule.lower() in _NAMED:
        return _NAMED[schedule.lower()]()
    raise ValueError(f"schedule must be a Schedule or one of {sorted(_NAMED)}, got {schedule!r}")
