"""Exact-score oracles (docs/theory.md §4): Gaussian, Dirac and isotropic Gaussian-mixture data.

For data sum_k w_k N(mu_k, s_k^2 I) the denoiser is exact for every schedule:

    D(x_hat; sigma) = sum_k r_k(x_hat) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x_hat - mu_k)],
    r_k proportional to w_k N(x_hat; mu_k, (s_k^2 + sigma^2) I).

`oracle.denoiser(schedule, prediction=...)` wraps the oracle as a model of any prediction type, so the
adapters in denoiser.py can be tested against the exact answer.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .denoiser import Denoiser
from .schedules import Schedule, get_schedule


class GaussianMixture:
    """Isotropic Gaussian mixture in R^d (samples are [B, d] or any [B, ...] with prod(...) = d).

    Args:
        means: [K, d] component means.
        stds: [K] (or a float) component standard deviations (0 gives point masses).
        weights: [K] mixture weights (normalised here); uniform by default.
    """

    def __init__(self, means, stds=0.5, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() == 1:
            self.means = self.means[None]
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be [K] non-negative with a positive sum")
        if (self.stds < 0).any():
            raise ValueError("stds must be >= 0")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoise(self, x_hat: torch.Tensor, sigma) -> torch.Tensor:
        """Exact E[y | x_hat] at noise level sigma (float or [B] tensor); float64 inside."""
        shape, dtype = x_hat.shape, x_hat.dtype
        x = x_hat.reshape(shape[0], -1).to(torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"oracle of dimension {self.dim} got samples of size {x.shape[1]}")
        mu, s2, w = (v.to(x.device) for v in (self.means, self.stds ** 2, self.weights))
        sig2 = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1) ** 2   # [B or 1, 1]
        var = s2[None, :] + sig2                                                              # [B, K]
        dist2 = (x.square().sum(1, keepdim=True) - 2 * x @ mu.T + mu.square().sum(1)).clamp_min(0)  # [B, K]
        logits = torch.log(w)[None] - 0.5 * dist2 / var - 0.5 * self.dim * torch.log(var)
        r = torch.softmax(logits, dim=1)                                                      # [B, K]
        shrink = s2[None] / var                                                               # [B, K]
        # sum_k r_k [mu_k + shrink_k (x - mu_k)] = (sum r_k shrink_k) x + sum_k r_k (1 - shrink_k) mu_k
        d = (r * shrink).sum(1, keepdim=True) * x + (r * (1 - shrink)) @ mu
        return d.reshape(shape).to(dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """n samples [n, d] (float64) from the data distribution."""
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * z

    def as_model(self, schedule: Schedule | str, prediction: str = "x0"):
        """A model(x, t) in physical coordinates (time convention "t") predicting `prediction`."""
        sch = get_schedule(schedule)

        def model(x, t):
            tt = t.detach().double().cpu().numpy()
            m, s = (torch.as_tensor(np.asarray(f(tt)), dtype=torch.float64, device=x.device) for f in (sch.m, sch.s))
            view = (-1,) + (1,) * (x.dim() - 1)
            m, s = m.reshape(view), s.reshape(view)
            x64 = x.double()
            x_hat = x64 / m
            sig = (s / m).reshape(-1)
            d = self.denoise(x_hat, sig).double()
            eps = (x_hat - d) / (s / m)
            if prediction == "x0":
                out = d
            elif prediction == "eps":
                out = eps
            elif prediction == "v":
                out = m * eps - s * d
            elif prediction == "score":
                out = -(x64 - m * d) / (s * s)
            elif prediction == "velocity":
                dm = torch.as_tensor(np.asarray(sch.dm(tt)), dtype=torch.float64, device=x.device).reshape(view)
                ds = torch.as_tensor(np.asarray(sch.ds(tt)), dtype=torch.float64, device=x.device).reshape(view)
                out = dm * d + ds * eps
            else:
                raise ValueError(f"unknown prediction {prediction!r}")
            return out.to(x.dtype)

        return model

    def denoiser(self, schedule: Schedule | str = "condot", prediction: str = "x0") -> Denoiser:
        """A `Denoiser` for this oracle expressed as a model of the given prediction type."""
        if prediction == "x0":
            # Direct path: no round trip through a prediction type.
            return Denoiser(lambda x, t: self._x0_model(x, t, get_schedule(schedule)), schedule, "x0", time="t")
        return Denoiser(self.as_model(schedule, prediction), schedule, prediction, time="t")

    def _x0_model(self, x, t, sch):
        tt = t.detach().double().cpu().numpy()
        m = torch.as_tensor(np.asarray(sch.m(tt)), dtype=torch.float64, device=x.device)
        s = torch.as_tensor(np.asarray(sch.s(tt)), dtype=torch.float64, device=x.device)
        view = (-1,) + (1,) * (x.dim() - 1)
        return self.denoise(x.double() / m.reshape(view), s / m).to(x.dtype)

    def covariance(self) -> torch.Tensor:
        """[d, d] data covariance."""
        mean = self.weights @ self.means
        centred = self.means - mean
        cov = (self.weights[:, None] * centred).T @ centred
        return cov + torch.diag(torch.full((self.dim,), float(self.weights @ self.stds ** 2), dtype=torch.float64))


def Gaussian(mean, std: float) -> GaussianMixture:
    """Gaussian data N(mean, std^2 I)."""
    return GaussianMixture(torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1), std)


def Dirac(point) -> GaussianMixture:
    """Point-mass data at `point`."""
    return GaussianMixture(torch.as_tensor(point, dtype=torch.float64).reshape(1, -1), 0.0)


def default_mixture(dim: int = 64, modes: int = 8, seed: int = 0) -> GaussianMixture:
    """The embedded demo problem: `modes` sharp, well-separated components of unequal width and weight,
    standardised so that each coordinate has variance about 1 (the regime of docs/theory.md §3)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=g, dtype=torch.float64)
    stds = 0.06 + 0.08 * torch.rand(modes, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * math.sqrt(dim * (1 - float(stds.square().mean())))
    weights = 0.5 + torch.rand(modes, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two point clouds [N, d] and [M, d] (quantile matching)."""
    a = a.reshape(a.shape[0], -1).double().cpu()
    b = b.reshape(b.shape[0], -1).double().cpu()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values
    n = max(pa.shape[0], pb.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    ia = (q * pa.shape[0]).long().clamp(max=pa.shape[0] - 1)
    ib = (q * pb.shape[0]).long().clamp(max=pb.shape[0] - 1)
    return float((pa[ia] - pb[ib]).square().mean().sqrt())


class _DiagonalGaussianX0(torch.nn.Module):
    """Exact x0-prediction for data N(mean, diag(std^2)) under any schedule, elementwise (batch invariant)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, schedule, delay: float = 0.0):
        super().__init__()
        self.register_buffer("mean", mean.double())
        self.register_buffer("std", std.double())
        self.schedule = schedule
        self.delay = float(delay)

    def forward(self, x, t):
        if tuple(x.shape[1:]) != tuple(self.mean.shape):
            raise ValueError(f"toy model of dimension {tuple(self.mean.shape)} got samples of shape "
                             f"{tuple(x.shape[1:])}")
        if self.delay:
            time.sleep(self.delay)
        tt = t.detach().double().cpu().numpy()
        view = (-1,) + (1,) * (x.dim() - 1)
        m = torch.as_tensor(np.asarray(self.schedule.m(tt)), dtype=torch.float64).reshape(view)
        s = torch.as_tensor(np.asarray(self.schedule.s(tt)), dtype=torch.float64).reshape(view)
        x_hat, sig2 = x.double() / m, (s / m) ** 2
        v = self.std ** 2
        return (self.mean + v / (v + sig2) * (x_hat - self.mean)).to(x.dtype)


def toy_factory(weights: str | None = None, dim: int = 8, schedule: str = "condot", delay: float = 0.0) -> Denoiser:
    """A tiny exact denoiser for tests and demos: data N(mean, diag(std^2)) in R^dim.

    Args:
        weights: optional .safetensors / torch file with tensors "mean" [dim] and "std" [dim]; default a fixed
            mean 0.5 * sin(1..dim) and std 0.2 + 0.1 * |cos(1..dim)|.
        dim: data dimension when no weights are given.
        schedule: schedule name.
        delay: seconds slept per model call (to make a run slow enough to interrupt in tests).
    """
    if weights is not None:
        from .bulk import load_weights
        state = load_weights(weights)
        mean, std = state["mean"], state["std"]
    else:
        k = torch.arange(1, dim + 1, dtype=torch.float64)
        mean, std = 0.5 * torch.sin(k), 0.2 + 0.1 * torch.cos(k).abs()
    sch = get_schedule(schedule)
    den = Denoiser(_DiagonalGaussianX0(mean, std, sch, delay), sch, prediction="x0", time="t")
    den.sample_shape = tuple(mean.shape)  # bulk.sample_to_disk reads it when no sample_shape is given
    return den
