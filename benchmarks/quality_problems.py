"""Problems of benchmarks/bench_quality.py: exact-score Gaussian-mixture oracles, the shipped digits model and
learned denoisers trained here (benchmarks/learned.py).

Three disjoint sets:

* DEFAULT (seeds 0-3): the problems the package may be tuned on (grids, defaults, recommended configuration).
* HELDOUT (seeds 1000-1003): run only with `bench_quality.py --heldout`. Nobody tunes on them: they exist to
  check that whatever was tuned on DEFAULT transfers. Do not look at their numbers while tuning; change them
  only by adding problems, never to make a result look better.
* LEARNED (seeds 0-1): run with `bench_quality.py --learned`: MLP denoisers trained on scikit-learn's bundled
  data (benchmarks/learned.py) of three kinds (image-like digits, tabular wine, the 3-d swiss roll), which
  tuning may use, and last the held-out one (learned.HELDOUT_LEARNED, breast_cancer, named "ho-..."),
  which nobody tunes on. Two seeds and smaller batches than DEFAULT: a network evaluation costs more than a
  mixture's, and the whole set runs in 10 minutes on two shared cores (the models cached).

Every mixture is standardised so that each coordinate has variance about 1 (spectral_mixture: 1 on average
over the coordinates, falling as a power law). The anisotropic and spectral mixtures have a
diagonal covariance per component (widths differing by up to 10x between coordinates), for which
`DiagonalMixture` gives the exact denoiser:

    D(x_hat; sigma) = sum_k r_k(x_hat) [mu_k + S_k / (S_k + sigma^2) (x_hat - mu_k)],
    r_k proportional to w_k N(x_hat; mu_k, diag(S_k + sigma^2)).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import thermosample as ts
from thermosample import toy

DEFAULT_SEEDS = (0, 1, 2, 3)
HELDOUT_SEEDS = (1000, 1001, 1002, 1003)
LEARNED_SEEDS = (0, 1)


class DiagonalMixture:
    """Gaussian mixture with diagonal component covariances: means [K, d], stds [K, d], weights [K]."""

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.var = torch.as_tensor(stds, dtype=torch.float64).square()
        w = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoise(self, x_hat: torch.Tensor, sigma) -> torch.Tensor:
        """Exact E[y | x_hat] at noise level sigma (float or [B] tensor); float64 inside."""
        shape, dtype = x_hat.shape, x_hat.dtype
        x = x_hat.reshape(shape[0], -1).to(torch.float64)
        sig2 = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1) ** 2        # [B or 1, 1, 1]
        var = self.var[None] + sig2                                                      # [B|1, K, d]
        inv = 1.0 / var
        # sum_j (x_j - mu_kj)^2 / var_kj = x^2 . inv - 2 x . (mu inv) + mu^2 . inv
        if var.shape[0] == 1:
            inv0 = inv[0]
            q = x.square() @ inv0.T - 2 * x @ (self.means * inv0).T + (self.means.square() * inv0).sum(1)
            logdet = torch.log(var[0]).sum(1)[None]
        else:
            diff = x[:, None, :] - self.means[None]
            q = (diff.square() * inv).sum(2)
            logdet = torch.log(var).sum(2)
        logits = torch.log(self.weights)[None] - 0.5 * q - 0.5 * logdet                  # [B, K]
        r = torch.softmax(logits, dim=1)
        shrink = self.var[None] * inv                                                    # [B|1, K, d]
        # sum_k r_k [mu_k + shrink_k (x - mu_k)] = (sum_k r_k shrink_k) * x + sum_k r_k (1 - shrink_k) mu_k
        if shrink.shape[0] == 1:
            a = r @ shrink[0]
            b = r @ ((1 - shrink[0]) * self.means)
        else:
            a = torch.einsum("bk,bkd->bd", r, shrink)
            b = torch.einsum("bk,bkd->bd", r, (1 - shrink) * self.means[None])
        return (a * x + b).reshape(shape).to(dtype)

    def denoiser(self, schedule) -> ts.Denoiser:
        sch = ts.schedules.get_schedule(schedule)

        def model(x, t):  # x0 prediction in physical coordinates (time convention "t")
            tt = t.detach().double().cpu().numpy()
            m = torch.as_tensor(np.asarray(sch.m(tt)), dtype=torch.float64).reshape(-1, 1)
            s = torch.as_tensor(np.asarray(sch.s(tt)), dtype=torch.float64).reshape(-1)
            xs = x.double().reshape(x.shape[0], -1) / m
            sig = s / m.reshape(-1)
            return self.denoise(xs, float(sig[0])).reshape(x.shape).to(x.dtype)  # one noise level per call

        return ts.Denoiser(model, sch, "x0", time="t")


def _weights(modes: int, g: torch.Generator, weight_spread: float) -> torch.Tensor:
    """Component weights, the generator's next `modes` uniforms u: 0.5 + u for weight_spread 1, otherwise
    exp(U(-1, 1) * log(weight_spread) / 2), a ratio of up to `weight_spread` between the heaviest and the
    lightest component (normalised by the mixture)."""
    u = torch.rand(modes, generator=g, dtype=torch.float64)
    return 0.5 + u if weight_spread == 1.0 else torch.exp((2 * u - 1) * math.log(weight_spread) / 2)


def mixture(dim, modes, std_lo, std_hi, seed, weight_spread: float = 1.0):
    """Isotropic mixture (as the original bench_quality.mixture): `modes` components with stds in
    [std_lo, std_hi], means on a sphere so that each coordinate has variance about 1. Weights are
    0.5 + U(0, 1) for weight_spread 1; otherwise exp(U(-1, 1) * log(weight_spread) / 2): a ratio of up to
    `weight_spread` between the heaviest and the lightest component."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=g, dtype=torch.float64)
    stds = std_lo + (std_hi - std_lo) * torch.rand(modes, generator=g, dtype=torch.float64)
    means = means / means.norm(dim=1, keepdim=True) * math.sqrt(dim * (1 - float(stds.square().mean())))
    weights = _weights(modes, g, weight_spread)
    return toy.GaussianMixture(means, stds, weights)


def aniso_mixture(dim, modes, std_lo, std_hi, seed, weight_spread: float = 1.0):
    """Diagonal-covariance mixture: every coordinate of every component has its own std, log-uniform in
    [std_lo, std_hi]; means scaled so that each coordinate has variance about 1."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(modes, dim, generator=g, dtype=torch.float64)
    stds = torch.exp(math.log(std_lo) + (math.log(std_hi) - math.log(std_lo))
                     * torch.rand(modes, dim, generator=g, dtype=torch.float64))
    means = means / means.norm(dim=1, keepdim=True) * math.sqrt(dim * max(0.05, 1 - float(stds.square().mean())))
    weights = _weights(modes, g, weight_spread)
    return DiagonalMixture(means, stds, weights)


def spectral_mixture(dim, modes, alpha, class_share, seed, floor: float = 0.02, weight_spread: float = 1.0):
    """Image-like diagonal mixture: the variance of coordinate j falls as a power law (j + 1)^-alpha (the
    spectrum of natural images in a Fourier basis spans decades), and the classes are not well separated:
    the means carry `class_share` of each coordinate's variance, the components the rest, each with its own
    factor exp(0.3 N(0, 1)) per coordinate, and stds at least `floor`. Coordinates have variance about 1
    on average. Unlike mixture/aniso_mixture, whose means carry almost all the variance, most of the error
    here is in the bulk of overlapping components, not in samples sent to another mode."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, dim + 1, dtype=torch.float64) ** -alpha
    spectrum = spectrum / spectrum.mean()
    means = torch.randn(modes, dim, generator=g, dtype=torch.float64) * (class_share * spectrum).sqrt()
    jitter = torch.exp(0.3 * torch.randn(modes, dim, generator=g, dtype=torch.float64))
    stds = ((1 - class_share) * spectrum).sqrt() * jitter
    stds = stds.clamp(min=floor)
    weights = _weights(modes, g, weight_spread)
    return DiagonalMixture(means, stds, weights)


@dataclass
class Problem:
    """name, a factory of the denoiser, sample shape, samples per seed (full run), in the --quick set."""

    name: str
    make: Callable
    shape: tuple
    batch: int
    quick: bool = False


def _digits():
    from thermosample.apps import digits
    return digits.load_denoiser()


EDM = "edm"

DEFAULT = [
    # the four original mixtures (their own schedules and sigma ranges) and the digits model
    Problem("mix-d64-k8-sharp/condot", lambda: toy.default_mixture().denoiser("condot"), (64,), 1024),
    Problem("mix-d2-k5-wide/condot", lambda: mixture(2, 5, 0.2, 0.35, 1).denoiser("condot"), (2,), 2048, quick=True),
    Problem("mix-d256-k16/cosine", lambda: mixture(256, 16, 0.1, 0.3, 2).denoiser("cosine"), (256,), 1024),
    Problem("mix-d16-k3-vsharp/vp", lambda: mixture(16, 3, 0.01, 0.03, 3).denoiser(ts.schedules.VPLinear()),
            (16,), 2048),
    Problem("digits-8x8/edm", _digits, (1, 8, 8), 256, quick=True),  # the costliest model per sample
    # new: EDM schedule, sigma 0.002-80
    Problem("mix-d8-k3-narrow/edm", lambda: mixture(8, 3, 0.02, 0.05, 4).denoiser(EDM), (8,), 2048, quick=True),
    Problem("mix-d128-k32/edm", lambda: mixture(128, 32, 0.1, 0.3, 5).denoiser(EDM), (128,), 1024),
    Problem("mix-d32-k6-aniso/edm", lambda: aniso_mixture(32, 6, 0.03, 0.3, 6).denoiser(EDM), (32,), 1024),
    Problem("mix-d16-k10-unequal/edm", lambda: mixture(16, 10, 0.05, 0.15, 7, weight_spread=100.0).denoiser(EDM),
            (16,), 2048),
]

HELDOUT = [
    Problem("ho-mix-d4-k7/edm", lambda: mixture(4, 7, 0.05, 0.2, 101).denoiser(EDM), (4,), 2048),
    Problem("ho-mix-d48-k12-aniso/edm", lambda: aniso_mixture(48, 12, 0.02, 0.2, 102, weight_spread=20.0
                                                             ).denoiser(EDM), (48,), 1024),
    Problem("ho-mix-d512-k4/edm", lambda: mixture(512, 4, 0.05, 0.1, 103).denoiser(EDM), (512,), 512),
    Problem("ho-mix-d24-k2-unequal/condot", lambda: mixture(24, 2, 0.03, 0.08, 104, weight_spread=50.0
                                                            ).denoiser("condot"), (24,), 2048),
    Problem("ho-mix-d12-k5-aniso/vp", lambda: aniso_mixture(12, 5, 0.01, 0.1, 105).denoiser(ts.schedules.VPLinear()),
            (12,), 2048),
    Problem("ho-mix-d96-k20-vsharp/edm", lambda: mixture(96, 20, 0.005, 0.02, 106).denoiser(EDM), (96,), 1024),
]


def _learned(name):
    """The factory of learned model `name` (benchmarks/learned.py: trained on first use, then cached)."""
    def make():
        from . import learned
        return learned.denoiser(name, log=lambda m: print(m, file=sys.stderr, flush=True))
    make.dataset = name
    return make


LEARNED = [
    Problem("learned-digits-8x8/edm", _learned("digits"), (1, 8, 8), 512),
    Problem("learned-wine-d13/edm", _learned("wine"), (13,), 1024),
    Problem("learned-swissroll-d3/edm", _learned("swiss_roll"), (3,), 1024),
    # held out of all tuning (learned.HELDOUT_LEARNED): listed last, "ho-" like the HELDOUT set
    Problem("ho-learned-breastcancer-d30/edm", _learned("breast_cancer"), (30,), 1024),
]


def select(problems, tokens):
    """Keep the problems named by one of `tokens`: a full name or one of its "-" / "/" separated tokens
    (d2 is not d256)."""
    if not tokens:
        return list(problems)
    return [p for p in problems if any(s == p.name or s in p.name.replace("/", "-").split("-") for s in tokens)]
