"""A class-conditional digits model for benchmarks/bench_guided.py: classifier-free guidance on a DDPM schedule.

Data: scikit-learn's 8x8 digits (`learned.load_dataset("digits")`: pixels scaled to [-1, 1], labels 0-9),
flattened to 64-d; `learned.split` holds 10 % of the rows out of training under the config's seed.

Schedule: diffusers' default DDPM betas (the `DDPMScheduler()` / `DPMSolverMultistepScheduler()` config:
"linear" from 1e-4 to 0.02 over 1000 training steps), so the schedulers run on their own defaults.

Model (`CondMLP`): epsilon prediction eps(x_t, t, class) with x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
t the (possibly fractional) training index, which is what a pipeline sees. Inside, eps = (x_hat - D) / sigma_t
from an x0 estimate D with EDM's preconditioning (as benchmarks/learned.py's EDMMLP: x_hat = x_t / alpha_t,
D = c_skip x_hat + c_out F(c_in x_hat, log(sigma) / 4, class)): a plain eps network is amplified by
sigma_max = 157 at the first step of this schedule, and its samples land far off the data. F is an MLP of
`depth` SiLU layers of `hidden` units on the 64 pixels, with a Fourier embedding of the noise level and a
learned embedding of the class added to every layer. There are 11 classes: 0-9 and NULL = 10, the
unconditional one; training replaces a `p_uncond` share of the labels by NULL (label dropout), so the same
network gives the conditional and the unconditional prediction. Trained on DDPM's timesteps (uniform t) with
EDM's loss weight on D ((sigma^2 + sd^2) / (sigma sd)^2), Adam with a one-cycle learning rate and an EMA of
the weights (torch's AveragedModel), which is what is saved.

Guidance goes through thermosample.integrations.diffusers, as for a real pipeline (`pipeline(net)` stands in
for one): `guided_denoiser(w)` is `pipeline_denoiser` (eps_u + w (eps_c - eps_u) from one batched call, the
ten classes as conditioning, NULL as the negative one; a sampling batch holds each class's rows together,
`row_labels`) with a float64 twin for the reference, and `calibrate(w, steps)` is `calibrate_pipeline`.

Cache: `learned.cache_dir()` (``$THERMOSAMPLE_LEARNED_CACHE`` or ``~/.cache/thermosample/learned``), one file
``cond_digits-<hash>.pt`` per config; the hash covers the whole `CondConfig` and CODE_VERSION.
`python -m benchmarks.conditional [--threads N]` trains (or loads) it and prints the time and validation loss.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

import thermosample as ts

from . import learned

CODE_VERSION = 3           # bump when the training code changes what a CondConfig produces
CLASSES = 10
NULL = CLASSES             # the unconditional label
TRAINED = 0                # models trained (not loaded) in this process; the tests read it


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """diffusers' default DDPM schedule ("linear" betas), computed as diffusers does (float32), as float64
    [num_train_timesteps]: the schedulers' own alphas_cumprod, exactly."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).double().numpy()


SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                    "prediction_type": "epsilon"}


class CondMLP(nn.Module):
    """forward(x_t [B, 64], t [B] or scalar training index (fractional too), class_labels [B] in 0..NULL)
    -> eps [B, 64], computed from an EDM-preconditioned estimate of x0 (module docstring)."""

    def __init__(self, dim: int = 64, hidden: int = 256, depth: int = 3, emb: int = 32, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = float(sigma_data)
        ac = torch.as_tensor(alphas_cumprod(), dtype=torch.float64)
        self.register_buffer("log_sigmas", 0.5 * ((1 - ac) / ac).log())
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), emb // 2)))
        self.temb = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU())
        self.cemb = nn.Embedding(CLASSES + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t), log sigma interpolated linearly in a fractional t (as
        diffusers' Euler and ts.schedules.DiscreteVP do)."""
        ls = self.log_sigmas.to(t.dtype)
        i = t.clamp(0, ls.shape[0] - 1)
        lo = i.floor().long().clamp(max=ls.shape[0] - 2)
        f = i - lo
        return (ls[lo] * (1 - f) + ls[lo + 1] * f).exp()

    def denoised(self, x: torch.Tensor, t, class_labels: torch.Tensor) -> torch.Tensor:
        """(x0 estimate D(x_hat; sigma), x_hat = x_t sqrt(1 + sigma^2), sigma [B, 1])."""
        x = x.reshape(x.shape[0], -1)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        sigma = self.sigma(t).reshape(-1, 1)
        x_hat = x * (1 + sigma ** 2).sqrt()
        sd2 = self.sigma_data ** 2
        norm = (sigma ** 2 + sd2).sqrt()
        c_skip, c_out, c_in = sd2 / norm ** 2, sigma * self.sigma_data / norm, 1.0 / norm
        arg = (sigma.log() / 4.0) * self.freqs[None]
        e = self.temb(torch.cat([arg.sin(), arg.cos()], dim=1)) + self.cemb(class_labels.to(x.device).long())
        h = nn.functional.silu(self.inp(c_in * x_hat) + e)
        for layer in self.layers:
            h = nn.functional.silu(layer(h) + e)
        return c_skip * x_hat + c_out * self.out(h), x_hat, sigma

    def forward(self, x: torch.Tensor, timestep, class_labels: torch.Tensor) -> torch.Tensor:
        d, x_hat, sigma = self.denoised(x, timestep, class_labels)
        return ((x_hat - d) / sigma).reshape(x.shape)


@dataclass(frozen=True)
class CondConfig(learned.TrainConfig):
    """learned.TrainConfig's fields (its p_mean / p_std are unused: DDPM's timesteps are uniform) and the label
    dropout; the cache key hashes all of them, learned.CODE_VERSION and this module's CODE_VERSION."""

    dataset: str = "digits"
    steps: int = 5000
    seed: int = 21
    p_uncond: float = 0.15      # label dropout: the share of rows trained as NULL

    def key(self) -> str:
        return hashlib.sha256(f"cond_digits {CODE_VERSION} {super().key()}".encode()).hexdigest()[:12]


DEFAULT = CondConfig()


def _data(cfg: CondConfig):
    data = learned.load_dataset("digits")
    tr, val = learned.split(data.data.shape[0], cfg)
    x = data.data.reshape(data.data.shape[0], -1)
    y = torch.as_tensor(data.labels, dtype=torch.long)
    return (x[tr], y[tr]), (x[val], y[val])


@contextlib.contextmanager
def _on_threads(threads: int):
    """torch on `threads` threads inside the block, its setting restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train(cfg: CondConfig = DEFAULT, threads: int | None = None, log=None) -> tuple[CondMLP, dict]:
    """Train a CondMLP with the DDPM loss and label dropout on `threads` torch threads; (EMA model, info)."""
    global TRAINED
    (x_all, y_all), _ = _data(cfg)
    ac = torch.as_tensor(alphas_cumprod(), dtype=torch.float32)
    threads = threads or torch.get_num_threads()
    with _on_threads(threads):
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        sd = float(x_all.std())
        net = CondMLP(x_all.shape[1], cfg.hidden, cfg.depth, cfg.emb, sigma_data=sd)
        ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema))
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
        start = time.perf_counter()
        for _ in range(cfg.steps):
            idx = torch.randint(0, x_all.shape[0], (cfg.batch,), generator=g)
            x0, y = x_all[idx], y_all[idx].clone()
            y[torch.rand(cfg.batch, generator=g) < cfg.p_uncond] = NULL
            t = torch.randint(0, ac.shape[0], (cfg.batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = ac[t].reshape(-1, 1)
            d, _, sigma = net.denoised(a.sqrt() * x0 + (1 - a).sqrt() * eps, t.float(), y)
            weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
            loss = (weight * (d - x0) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(net)
        seconds = time.perf_counter() - start
    TRAINED += 1
    if log:
        log(f"trained cond_digits ({cfg.steps} steps, hidden {cfg.hidden} x {cfg.depth}) in {seconds:.1f} s on "
            f"{threads} threads; last loss {loss.item():.4f}")
    info = {"train_seconds": round(seconds, 2), "threads": threads, "dim": int(x_all.shape[1]), "sigma_data": sd}
    return learned._frozen(ema.module), info


def cache_path(cfg: CondConfig) -> str:
    return os.path.join(learned.cache_dir(), f"cond_digits-{cfg.key()}.pt")


def load_model(cfg: CondConfig = DEFAULT, threads: int | None = None, log=None) -> tuple[CondMLP, dict]:
    """The trained model of `cfg`: from the cache, else trained and cached; info["cached"] tells which."""
    return learned.cached(cache_path(cfg), cfg, lambda info: CondMLP(info["dim"], cfg.hidden, cfg.depth, cfg.emb,
                                                                     sigma_data=info["sigma_data"]),
                          lambda: train(cfg, threads=threads, log=log))


def validation_loss(net: CondMLP, cfg: CondConfig, label_of=None, seed: int = 0) -> float:
    """The DDPM loss (eps MSE) on the held-out rows at 1000 seeded (t, eps) draws; `label_of(y)` replaces the
    labels (e.g. all NULL for the unconditional prediction). An untrained network scores about 1."""
    _, (x, y) = _data(cfg)
    g = torch.Generator().manual_seed(seed)
    ac = torch.as_tensor(alphas_cumprod(), dtype=torch.float32)
    idx = torch.randint(0, x.shape[0], (1000,), generator=g)
    t = torch.randint(0, ac.shape[0], (1000,), generator=g)
    eps = torch.randn((1000, x.shape[1]), generator=g)
    a = ac[t].reshape(-1, 1)
    labels = y[idx] if label_of is None else label_of(y[idx])
    with torch.no_grad():
        return float((net(a.sqrt() * x[idx] + (1 - a).sqrt() * eps, t.float(), labels) - eps).square().mean())


# ------------------------------------------------------------------------------------------------ guidance
CONDITIONING = {"class_labels": torch.arange(CLASSES)}          # the ten classes
NEGATIVE = {"class_labels": torch.tensor([NULL])}               # the null class of classifier-free guidance


def pipeline(net: CondMLP):
    """What thermosample.integrations.diffusers' pipeline_denoiser / calibrate_pipeline read of a pipeline:
    its network (`unet`) and its scheduler's config (diffusers' defaults, SCHEDULER_CONFIG)."""
    return SimpleNamespace(unet=net, scheduler=SimpleNamespace(config=dict(SCHEDULER_CONFIG)))


def row_labels(n: int) -> torch.Tensor:
    """The class of each row of a sampling batch of n (a multiple of 10): each class's n / 10 rows together,
    as a pipeline lays out num_images_per_prompt (and pipeline_denoiser reads a batch)."""
    if n % CLASSES:
        raise ValueError(f"a batch of {n} rows: give a multiple of {CLASSES} (each class's rows together)")
    return torch.arange(n) // (n // CLASSES)


def guided_denoiser(w: float, net: CondMLP | None = None) -> ts.Denoiser:
    """The ts.Denoiser a pipeline runs at guidance scale w (`pipeline_denoiser`: eps_u + w (eps_c - eps_u) from
    one batched call, labels [NULL; class], DiscreteVP of the config, eps, time = training index), with
    `reference_denoiser` (the same on float64 weights) and `sample_shape` (64,) attached."""
    from thermosample.integrations.diffusers import pipeline_denoiser

    net = net if net is not None else load_model()[0]
    den = pipeline_denoiser(pipeline(net), CONDITIONING, NEGATIVE, w)
    den.reference_denoiser = pipeline_denoiser(pipeline(copy.deepcopy(net).double()), CONDITIONING, NEGATIVE, w)
    den.sample_shape = (64,)
    return den


def calibrate(w: float, steps: int, net: CondMLP, options: ts.CalibrationOptions | None = None):
    """`calibrate_pipeline` for this model at guidance scale w: the SamplerConfig of solver="auto" (its pilot
    samples take the ten classes in turn, each keeping its class through every stage)."""
    from thermosample.integrations.diffusers import calibrate_pipeline

    return calibrate_pipeline(pipeline(net), steps, conditioning=CONDITIONING, negative_conditioning=NEGATIVE,
                              guidance_scale=w, sample_shape=(64,),
                              options=options or ts.CalibrationOptions(progress=False))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="train or load the class-conditional digits model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    net, info = load_model(DEFAULT, threads=args.threads, log=print)
    print(f"cond_digits {'loaded' if info['cached'] else 'trained'} in {time.perf_counter() - t0:.1f} s (training "
          f"took {info['train_seconds']} s on {info['threads']} threads) -> {info['path']}")
    print(f"validation eps MSE: conditional {validation_loss(net, DEFAULT):.4f}, unconditional "
          f"{validation_loss(net, DEFAULT, lambda y: torch.full_like(y, NULL)):.4f}, wrong class "
          f"{validation_loss(net, DEFAULT, lambda y: (y + 5) % CLASSES):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
