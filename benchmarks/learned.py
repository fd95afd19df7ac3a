"""Learned denoisers for benchmarks/bench_quality.py (`--learned`): small MLPs trained here, seeded and cached.

The mixtures of quality_problems.py have exact scores; these are networks trained on data, whose ODE
is whatever the fit made of it (smooth in places, sharp where the model memorised a few points). Every
dataset is bundled with scikit-learn (no download):

* ``digits``   image-like: load_digits, 8x8 pixels scaled to [-1, 1], sample shape (1, 8, 8), 10 classes.
  A different architecture (plain MLP, no residual blocks or LayerNorm) and seed than the shipped
  thermosample.apps.digits model.
* ``wine``     tabular: load_wine, 13 features standardised to mean 0 and std 1, 3 classes, 178 rows.
* ``swiss_roll`` a 2-d manifold in 3-d: make_swiss_roll(2000, noise=0.1, random_state=0), standardised.
* ``breast_cancer`` tabular: load_breast_cancer, 30 features standardised, 2 classes, 569 rows. HELD OUT
  (`HELDOUT_LEARNED`): no setting of thermosample (plan, grids, margins, defaults) may be chosen on its
  numbers; bench_quality --learned lists it last, labelled held out, to check that what was tuned
  elsewhere transfers to a learned model nothing was tuned on.

Model (`EDMMLP`): D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's preconditioning (Karras et
al. 2022, Table 1: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = log(sigma) / 4, sd = the data's std); F is an MLP of `depth`
SiLU layers of `hidden` units on the flattened input, with a Fourier embedding of c_noise added to every
layer. Trained with EDM's loss (log-normal sigma, P_mean -1.2, P_std 1.2, weight (sigma^2 + sd^2) /
(sigma sd)^2), Adam with a one-cycle learning rate, and an EMA of the weights, which is what is saved.
10 % of the rows (a seeded split) are never trained on: `validation_mse` scores them.

Cache: ``$THERMOSAMPLE_LEARNED_CACHE`` or ``~/.cache/thermosample/learned``, one file
``<name>-<hash>.pt`` per model, where the hash covers the whole `TrainConfig` and `CODE_VERSION` (bump it
when the training code changes what a config produces). A cached model loads in well under a second; a
missing one is trained on torch's current thread count (`python -m benchmarks.learned [--threads N]` trains
and times them all): 16-71 s of CPU time each, so well under a minute on two idle cores. On the shared 2-core
VM, with other jobs at a load of 5-10, one thread took 33-94 s and two threads 208-307 s per model (the two
threads wait on each other); the weights are bit-identical either way.

`denoiser(name)` returns a ts.Denoiser (EDM schedule, x0 prediction, time = sigma) over the float32
network, with `reference_denoiser` (the same weights in float64, for bench_quality's converged
reference), `sample_shape`, `classes(x)` (the class of each sample's nearest training row; None for the
unlabelled swiss roll) and `train_info` attached.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import thermosample as ts

CODE_VERSION = 1             # bump when the training code changes what a TrainConfig produces
CACHE_ENV = "THERMOSAMPLE_LEARNED_CACHE"
HELDOUT_LEARNED = "breast_cancer"
TRAINED = 0                  # models trained (not loaded) in this process; the tests read it


# ------------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class Dataset:
    """name, kind ("image" / "tabular" / "manifold"), data float32 [N, *shape], labels [N] or None."""

    name: str
    kind: str
    data: torch.Tensor
    labels: np.ndarray | None

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[1:])


def _standardise(x: np.ndarray) -> torch.Tensor:
    x = x.astype(np.float64)
    return torch.from_numpy(((x - x.mean(0)) / x.std(0)).astype(np.float32))


def load_dataset(name: str) -> Dataset:
    """One of DATASETS (scikit-learn's bundled data)."""
    from sklearn import datasets as skd

    if name == "digits":
        d = skd.load_digits()
        x = torch.from_numpy((d.data / 16.0 * 2.0 - 1.0).astype(np.float32)).reshape(-1, 1, 8, 8)
        return Dataset(name, "image", x, d.target)
    if name == "wine":
        d = skd.load_wine()
        return Dataset(name, "tabular", _standardise(d.data), d.target)
    if name == "breast_cancer":
        d = skd.load_breast_cancer()
        return Dataset(name, "tabular", _standardise(d.data), d.target)
    if name == "swiss_roll":
        x, _ = skd.make_swiss_roll(2000, noise=0.1, random_state=0)
        return Dataset(name, "manifold", _standardise(x), None)
    raise KeyError(f"unknown dataset {name!r}; one of {DATASETS}")


DATASETS = ("digits", "wine", "swiss_roll", "breast_cancer")   # the held-out one last


# ------------------------------------------------------------------------------------------------ model
class EDMMLP(nn.Module):
    """forward(x [B, *shape], sigma [B]) -> D(x; sigma) [B, *shape]: EDM-preconditioned MLP (module docstring).
    Runs in the dtype of its parameters (`.double()` gives the float64 twin)."""

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, emb: int = 32, sigma_data: float = 1.0):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), emb // 2)))
        self.emb = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1)
        sigma = sigma.to(x.dtype).reshape(-1, 1).expand(shape[0], 1)
        sd2 = self.sigma_data ** 2
        norm = (sigma ** 2 + sd2).sqrt()
        c_skip, c_out, c_in = sd2 / norm ** 2, sigma * self.sigma_data / norm, 1.0 / norm
        arg = (sigma.log() / 4.0) * self.freqs[None]
        e = self.emb(torch.cat([arg.sin(), arg.cos()], dim=1))
        h = nn.functional.silu(self.inp(c_in * x) + e)
        for layer in self.layers:
            h = nn.functional.silu(layer(h) + e)
        return (c_skip * x + c_out * self.out(h)).reshape(shape)


# ------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (the cache key hashes all of it and CODE_VERSION)."""

    dataset: str
    hidden: int = 256
    depth: int = 3
    emb: int = 32
    steps: int = 3000
    batch: int = 256
    lr: float = 2e-3
    seed: int = 0
    p_mean: float = -1.2
    p_std: float = 1.2
    ema: float = 0.999
    holdout: float = 0.1        # share of the rows never trained on (validation_mse scores them)

    def key(self) -> str:
        blob = json.dumps({"code": CODE_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# the benchmark's models: sizes chosen so that each trains in well under a minute of CPU time (module docstring)
CONFIGS = {
    "digits": TrainConfig("digits", hidden=256, depth=3, steps=3000, seed=11),
    "wine": TrainConfig("wine", hidden=256, depth=3, steps=2000, batch=128, seed=12),
    "swiss_roll": TrainConfig("swiss_roll", hidden=128, depth=4, steps=3000, seed=13),
    "breast_cancer": TrainConfig("breast_cancer", hidden=256, depth=3, steps=2000, batch=128, seed=14),
}


def split(n: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a permutation seeded by cfg.seed, the last cfg.holdout share held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = int(round(cfg.holdout * n))
    return perm[:n - n_val], perm[n - n_val:]


def train(cfg: TrainConfig, data: Dataset | None = None, threads: int | None = None,
          log=None) -> tuple[EDMMLP, dict]:
    """Train an EDMMLP on cfg.dataset with EDM's loss on `threads` torch threads (None: torch's current
    setting); returns (EMA model in eval mode, info)."""
    global TRAINED
    data = data or load_dataset(cfg.dataset)
    threads = threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        tr, _ = split(data.data.shape[0], cfg)
        y_all = data.data[tr]
        sd = float(y_all.std())
        dim = int(np.prod(data.shape))
        net = EDMMLP(dim, cfg.hidden, cfg.depth, cfg.emb, sigma_data=sd)
        ema = copy.deepcopy(net)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
        view = (-1,) + (1,) * len(data.shape)
        start = time.perf_counter()
        for step in range(cfg.steps):
            y = y_all[torch.randint(0, y_all.shape[0], (cfg.batch,), generator=g)]
            sigma = torch.exp(cfg.p_mean + cfg.p_std * torch.randn(cfg.batch, generator=g))
            noisy = y + torch.randn(y.shape, generator=g) * sigma.reshape(view)
            weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
            loss = (weight.reshape(view) * (net(noisy, sigma) - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pn in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(pn, 1 - decay)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
    TRAINED += 1
    if log:
        log(f"trained {cfg.dataset} ({cfg.steps} steps, {dim}-d, hidden {cfg.hidden} x {cfg.depth}) in "
            f"{seconds:.1f} s on {threads} threads; last loss {loss.item():.4f}")
    return _frozen(ema), {"train_seconds": round(seconds, 2), "sigma_data": sd, "dim": dim, "threads": threads}


def _frozen(net: EDMMLP) -> EDMMLP:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "thermosample", "learned")


def cache_path(cfg: TrainConfig) -> str:
    return os.path.join(cache_dir(), f"{cfg.dataset}-{cfg.key()}.pt")


def load_model(cfg: TrainConfig | str, threads: int | None = None, log=None) -> tuple[EDMMLP, dict]:
    """The trained model of `cfg` (or CONFIGS[name]): from the cache, else trained and cached. Returns
    (float32 model, info) with info["cached"] telling which."""
    cfg = CONFIGS[cfg] if isinstance(cfg, str) else cfg
    return cached(cache_path(cfg), cfg, lambda info: EDMMLP(info["dim"], cfg.hidden, cfg.depth, cfg.emb,
                                                            sigma_data=info["sigma_data"]),
                  lambda: train(cfg, threads=threads, log=log))


def cached(path: str, cfg, build, train_fn) -> tuple[torch.nn.Module, dict]:
    """The model cached at `path` (made by `build(info)`, its weights loaded), else `train_fn()` -> (net, info)
    saved there with `cfg`; info["cached"] tells which."""
    if os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        info = dict(blob["info"])
        net = build(info)
        net.load_state_dict(blob["state"])
        return _frozen(net), {**info, "cached": True, "path": path}
    net, info = train_fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"state": net.state_dict(), "info": info, "config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, path)                       # atomic: a concurrent reader sees the whole file or none
    return net, {**info, "cached": False, "path": path}


def validation_mse(net: EDMMLP, cfg: TrainConfig, sigma: float, data: Dataset | None = None,
                   seed: int = 0) -> tuple[float, float]:
    """(model MSE, identity MSE) of denoising the held-out rows at noise level sigma (float64 noise, same
    draws for both); the identity D(x) = x scores sigma^2."""
    data = data or load_dataset(cfg.dataset)
    _, val = split(data.data.shape[0], cfg)
    y = data.data[val].double()
    x = y + sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        d = copy.deepcopy(net).double()(x, torch.full((y.shape[0],), sigma, dtype=torch.float64))
    return float((d - y).square().mean()), float((x - y).square().mean())


# ------------------------------------------------------------------------------------------------ denoisers
def _nearest_class(train_x: torch.Tensor, labels: np.ndarray):
    ref = train_x.reshape(train_x.shape[0], -1).double()
    lab = torch.as_tensor(labels)

    def classes(x: torch.Tensor) -> np.ndarray:
        """The class of each sample's nearest training row (Euclidean)."""
        d = torch.cdist(x.reshape(x.shape[0], -1).double(), ref)
        return lab[d.argmin(1)].numpy()

    return classes


def denoiser(name: str, threads: int | None = None, log=None) -> ts.Denoiser:
    """CONFIGS[name] as a ts.Denoiser (EDM, x0 prediction, time = sigma) over the float32 network, with
    `reference_denoiser` (float64 weights), `sample_shape`, `classes` and `train_info` attached."""
    cfg = CONFIGS[name]
    net, info = load_model(cfg, threads=threads, log=log)
    data = load_dataset(name)
    den = ts.Denoiser(net, ts.schedules.EDM(), prediction="x0", time="sigma", scale_input=False)
    den.reference_denoiser = ts.Denoiser(copy.deepcopy(net).double(), ts.schedules.EDM(), prediction="x0",
                                         time="sigma", scale_input=False)
    den.sample_shape = data.shape
    tr, _ = split(data.data.shape[0], cfg)
    den.classes = None if data.labels is None else _nearest_class(data.data[tr], data.labels[tr.numpy()])
    den.train_info = info
    den.kind = data.kind
    return den


def main(argv=None) -> int:
    """Train (or load) every model of CONFIGS, print the time and the validation MSE against the identity's."""
    import argparse

    ap = argparse.ArgumentParser(description="train or load the learned benchmark models")
    ap.add_argument("names", nargs="*", default=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for name in args.names:
        t0 = time.perf_counter()
        net, info = load_model(name, threads=args.threads, log=print)
        got = time.perf_counter() - t0
        mse = [validation_mse(net, CONFIGS[name], s) for s in (0.1, 0.5, 2.0)]
        print(f"{name:<14} {'held out ' if name == HELDOUT_LEARNED else ''}{'loaded' if info['cached'] else 'trained'}"
              f" in {got:.1f} s (training took {info['train_seconds']} s) -> {info['path']}; validation MSE "
              + ", ".join(f"sigma {s}: {m:.4f} (identity {i:.4f})" for s, (m, i) in zip((0.1, 0.5, 2.0), mse)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
