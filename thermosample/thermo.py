"""Thermodynamic accounting of a sampling run (docs/theory.md §2-3; Ikeda et al., PRX 15, 031031 (2025)).

The fused op reduces rate[e, b] = ||nu||^2 for every model evaluation e and sample b, where
nu = alpha(t) x_hat + beta(t) D is the local mean (probability-flow) velocity in physical coordinates.
From it:

    kinetic cost      K[b] = integral ||nu||^2 dt          (trapezoid over the evaluations, in order)
    entropy production S[b] = integral ||nu||^2 / T(t) dt
    speed limit        E||x_end - x_start||^2 / (t_start - t_end) <= K   (Cauchy-Schwarz, Benamou-Brenier)
    efficiency         speed_limit / mean K, in [0, 1]; 1 for straight, constant-speed trajectories
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def _trapezoid(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Integral over the evaluations in their order (reverse time): sum (v_j + v_j+1)/2 |t_j - t_j+1|."""
    if values.shape[0] < 2:
        return torch.zeros(values.shape[1:], dtype=values.dtype, device=values.device)
    dt = (t[:-1] - t[1:]).abs().to(values.dtype).to(values.device)
    return (0.5 * (values[:-1] + values[1:]) * dt[:, None]).sum(dim=0)


@dataclass
class ThermoReport:
    """Per-run thermodynamics; tensors stay on the sampling device until read.

    Attributes:
        t: [E] physical time of each model evaluation (float64, CPU), in evaluation order.
        rate: [E, B] ||nu||^2 per evaluation and sample (float32, device).
        temperature: [E] T(t) at each evaluation (float64, CPU).
        displacement: [B] ||x(t_end) - x(t_start)||^2 in physical coordinates, from the states at the
            first and the last evaluation; None for stochastic solvers, whose noisy paths obey no
            pathwise speed limit (their kinetic cost is still measured from nu, never from dx).
    """

    t: torch.Tensor
    rate: torch.Tensor
    temperature: torch.Tensor
    displacement: torch.Tensor | None
    schedule_name: str = ""
    solver: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def kinetic(self) -> torch.Tensor:
        """[B] kinetic cost per sample: integral ||nu||^2 dt (Eq. 36)."""
        if "kinetic" not in self._cache:
            self._cache["kinetic"] = _trapezoid(self.rate.double(), self.t)
        return self._cache["kinetic"]

    @property
    def entropy(self) -> torch.Tensor:
        """[B] entropy production per sample: integral ||nu||^2 / T dt (from t_min > 0)."""
        if "entropy" not in self._cache:
            temp = self.temperature.to(self.rate.device)
            self._cache["entropy"] = _trapezoid(self.rate.double() / temp[:, None], self.t)
        return self._cache["entropy"]

    @property
    def duration(self) -> float:
        """t_start - t_end covered by the evaluations."""
        return float(abs(self.t[0] - self.t[-1])) if self.t.numel() else 0.0

    @property
    def kinetic_mean(self) -> float:
        return float(self.kinetic.mean())

    @property
    def entropy_mean(self) -> float:
        return float(self.entropy.mean())

    @property
    def speed_limit(self) -> float:
        """E||x_end - x_start||^2 / (t_start - t_end): the lower bound the kinetic cost obeys."""
        if self.displacement is None:
            return float("nan")
        if self.duration == 0:
            return 0.0
        return float(self.displacement.double().mean()) / self.duration

    @property
    def efficiency(self) -> float:
        """speed_limit / kinetic_mean in [0, 1]; 1 means straight, constant-speed trajectories."""
        k = self.kinetic_mean
        return self.speed_limit / k if k > 0 else float("nan")

    def profile(self) -> tuple[np.ndarray, np.ndarray]:
        """(t [E], batch-mean rate [E]) as numpy arrays, sorted by time."""
        t = self.t.numpy()
        r = self.rate.double().mean(dim=1).cpu().numpy()
        order = np.argsort(t, kind="stable")
        return t[order], r[order]

    def summary(self) -> dict:
        """Scalars as Python floats (one host sync)."""
        return {"kinetic": self.kinetic_mean, "entropy": self.entropy_mean, "speed_limit": self.speed_limit,
                "efficiency": self.efficiency, "evaluations": int(self.t.numel())}

    def plot(self, path=None, *, ax=None, label: str | None = None, dpi: int = 120):
        """Draw the dissipation profile: rate E||nu||^2 and entropy rate E||nu||^2 / T against physical time.

        Uses matplotlib's object API only (matplotlib.figure.Figure): it never calls pyplot and never
        switches the backend, so it is safe in notebooks, GUIs and scripts alike.

        Args:
            path: if given, also save the figure there (PNG, SVG, PDF: by the extension).
            ax: None (a new Figure with both panels), one matplotlib Axes (the rate panel only, drawn into
                it, e.g. to overlay several runs) or a pair of Axes (rate, entropy rate).
            label: legend label of this run's curves (a legend is drawn when given).
            dpi: resolution of the saved file.
        Returns:
            the matplotlib Figure drawn into.
        Raises:
            ModuleNotFoundError with the install hint when matplotlib is missing (pip install
            'thermosample[plot]').
        """
        from .validate import import_optional
        Figure = import_optional("matplotlib.figure", "plot", "ThermoReport.plot").Figure

        t, r = self.profile()
        temp = np.interp(t, self.t.numpy()[::-1], self.temperature.numpy()[::-1]) \
            if self.t.numel() > 1 else self.temperature.numpy()
        if ax is None:
            fig = Figure(figsize=(9, 3.4))
            axes = list(fig.subplots(1, 2))
            axes[0].set_title(f"speed cost  K = {self.kinetic_mean:.4g}")
            axes[1].set_title(f"entropy rate  S = {self.entropy_mean:.4g}")
        else:
            axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
            if not 1 <= len(axes) <= 2 or not all(hasattr(a, "plot") and hasattr(a, "figure") for a in axes):
                raise TypeError(f"ax must be a matplotlib Axes or a pair of Axes, got {ax!r}")
            fig = axes[0].figure
        axes[0].plot(t, r, marker=".", label=label)
        axes[0].set(xlabel="t", ylabel="E ||nu||^2")
        if len(axes) > 1:
            axes[1].semilogy(t, r / temp, marker=".", label=label)
            axes[1].set(xlabel="t", ylabel="E ||nu||^2 / T")
        for a in axes:
            a.grid(alpha=0.3)
            if label is not None:
                a.legend()
        if ax is None:
            fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=dpi)
        return fig

    def __repr__(self) -> str:
        if self.t.numel() == 0:
            return "ThermoReport(empty)"
        return (f"ThermoReport(evaluations={self.t.numel()}, batch={self.rate.shape[1]}, "
                f"kinetic={self.kinetic_mean:.5g}, entropy={self.entropy_mean:.5g}, "
                f"speed_limit={self.speed_limit:.5g}, efficiency={self.efficiency:.4f})")
