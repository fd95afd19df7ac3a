"""A small trained score model: scikit-learn's bundled 8x8 digits, EDM preconditioning (Karras et al. 2022).

Data: sklearn.datasets.load_digits (1797 images, 8x8, values 0..16) scaled to [-1, 1], shape [N, 1, 8, 8].
Model: an MLP denoiser D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's preconditioning
(c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd / sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2),
c_noise = log(sigma)/4), trained with EDM's loss weighting and log-normal sigma (P_mean=-1.2, P_std=1.2).
The shipped weights are thermosample/data/digits.safetensors; `load_denoiser()` wraps them as a
`ts.Denoiser` under the EDM schedule (x0 prediction, time = sigma). `train()` reproduces them
(`thermosample train-digits`), seeded, in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from torch import nn

from ..denoiser import Denoiser
from ..schedules import EDM
from ..validate import import_optional

WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "digits.safetensors")
SHAPE = (1, 8, 8)


def load_data() -> torch.Tensor:
    """The digits as float32 [1797, 1, 8, 8] in [-1, 1]."""
    load_digits = import_optional("sklearn.datasets", "digits", "the digits data").load_digits
    x = load_digits().data.astype(np.float32) / 16.0 * 2.0 - 1.0
    return torch.from_numpy(x).reshape(-1, *SHAPE)


def load_labels() -> np.ndarray:
    """The digit labels [1797] (ints 0..9)."""
    load_digits = import_optional("sklearn.datasets", "digits", "the digits data").load_digits
    return load_digits().target


class DigitsNet(nn.Module):
    """EDM-preconditioned residual MLP: forward(x [B, 1, 8, 8], sigma [B]) -> D [B, 1, 8, 8].

    Args:
        hidden: width of the residual blocks.
        blocks: number of residual blocks.
        sigma_data: the data standard deviation used by the preconditioning.
    """

    def __init__(self, hidden: int = 256, blocks: int = 3, emb: int = 64, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), emb // 2)))
        self.emb = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(64, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                                  nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, 64))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float().reshape(x.shape[0], 64)
        sigma = sigma.float().reshape(-1, 1).expand(x.shape[0], 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1.0 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4.0
        arg = c_noise * self.freqs[None]
        e = self.emb(torch.cat([arg.sin(), arg.cos()], dim=1))
        h = self.inp(c_in * x) + e
        for blk in self.blocks:
            h = h + blk(h + e)
        d = c_skip * x + c_out * self.out(h)
        return d.reshape(-1, *SHAPE).to(dtype)


def train(steps: int = 4000, batch: int = 256, lr: float = 2e-3, seed: int = 0, path: str | None = WEIGHTS,
          log_every: int = 1000, threads: int = 2) -> DigitsNet:
    """Train DigitsNet with EDM's loss (Karras et al. 2022, Sec. 5) and save an EMA of the weights.

    Args:
        steps: optimiser steps (Adam, cosine-decayed learning rate).
        batch: minibatch size (images [batch, 1, 8, 8]).
        lr: peak learning rate.
        seed: seeds torch (initialisation, minibatches, noise): the run is reproducible.
        path: where to write the safetensors weights (None: do not save).
        threads: torch CPU threads.
    Returns:
        the EMA model (eval mode).
    """
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = load_data()
    sd = float(data.std())
    net = DigitsNet(sigma_data=sd)
    ema = DigitsNet(sigma_data=sd)
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        y = data[idx]
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(batch, generator=g))
        n = torch.randn(y.shape, generator=g) * sigma.reshape(-1, 1, 1, 1)
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        loss = (weight.reshape(-1, 1, 1, 1) * (net(y + n, sigma) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - decay)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    ema.eval()
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
        save_file(tensors, path, metadata={"sigma_data": repr(sd), "steps": str(steps), "seed": str(seed)})
    return ema


def load_model(path: str = WEIGHTS) -> DigitsNet:
    """The shipped DigitsNet (eval mode, CPU)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no digits weights at {path}; run `thermosample train-digits`")
    with safe_open(path, framework="pt") as f:
        sd = float(f.metadata()["sigma_data"])
    net = DigitsNet(sigma_data=sd)
    net.load_state_dict(load_file(path))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_denoiser(path: str = WEIGHTS) -> Denoiser:
    """The shipped digits model as a `ts.Denoiser` (EDM schedule, x0 prediction, time = sigma).

    Samples have shape [B, 1, 8, 8] in [-1, 1]; the denoiser carries `sample_shape = (1, 8, 8)` so that
    `ts.thermo_grid(den, steps)` needs no shape."""
    net = load_model(path)

    def model(x, sigma):
        with torch.no_grad():
            return net(x, sigma)

    den = Denoiser(model, EDM(), prediction="x0", time="sigma", scale_input=False)
    den.sample_shape = SHAPE
    den.net = net
    return den


def save_grid_image(samples: torch.Tensor, path: str, nrow: int = 16) -> str:
    """Write samples [B, 1, 8, 8] in [-1, 1] as a grid PNG."""
    image = import_optional("matplotlib.image", "plot", "saving the digits grid image")

    x = samples.detach().float().cpu().clamp(-1, 1).reshape(-1, 8, 8).numpy()
    rows = math.ceil(x.shape[0] / nrow)
    canvas = np.ones((rows * 9 + 1, nrow * 9 + 1)) * -1
    for i, img in enumerate(x):
        r, c = divmod(i, nrow)
        canvas[1 + r * 9:1 + r * 9 + 8, 1 + c * 9:1 + c * 9 + 8] = img
    image.imsave(path, np.kron(canvas, np.ones((6, 6))), cmap="gray_r", vmin=-1, vmax=1)
    return path


def main(args) -> int:
    """`thermosample train-digits`: train, save the weights, sample a grid image."""
    from ..sampler import sample
    start = time.perf_counter()
    train(steps=args.steps, seed=args.seed, path=args.out, threads=args.threads)
    print(f"trained in {time.perf_counter() - start:.0f} s; wrote {args.out}")
    den = load_denoiser(args.out)
    out = sample(den, (128, *SHAPE), steps=30, solver="heun", grid="karras", seed=0)
    if args.png:
        print(f"wrote {save_grid_image(out.samples, args.png)}")
    return 0
