"""The run engine: one `Run` serves ts.sample, the k-diffusion wrappers and the diffusers schedulers.

A solver (solvers.py) drives a Run through three calls: `denoise(x, sigma)` evaluates the model,
`update(inputs, coeffs, i, ...)` is one fused op (the torch.library op: compile- and graph-safe) that
also reduces the tracked evaluation's velocity, and `callback(...)`. After the loop `check_finite`
raises NonFiniteError naming the first bad step and sample, and `report` builds the ThermoReport.

The loop never reads a device value: coefficients are Python floats from the host sigma grid, rates stay
on the device, and non-finite values are found from them once at the end (or every `check_every` steps).
Host time per step is kept to the op call (issue 15): the velocity coefficients are tabled over the grid
at the start, the op's full argument checks run on the run's first call only (later calls of the same kind
go straight to the backend through ops.CheckedStep), and each rate is written into the run's rate buffer
by the kernel itself.
Entry points adapt a Run by subclassing its small hooks (`steps`, `callback`, `velocity`,
`physical_m`, `temperature`) rather than copying the loop.
"""
from __future__ import annotations

import sys
import weakref

import numpy as np
import torch

from .errors import NonFiniteError
from .ops import CheckedStep, StepArgs
from .ops.contract import extents_share, memory_extent
from .ops.library import _needs_op, fused_step_op
from .ops.reference import fixed_order_sum
from .thermo import ThermoReport


class Run:
    """State of one sampling run: model evaluation, the fused update, tracking, callback and progress.

    Args:
        den: the denoiser, den(x_hat, sigma, **extra_args) -> D (None when the caller evaluates the model
            itself, as a diffusers pipeline does).
        sigmas: host list of floats, the descending noise levels of the run.
        seed, sample_offset: key of the Philox noise stream.
        backend: fused-op backend ("auto" | a key of ops.BACKENDS).
        track: reduce the velocity of each evaluation and build a ThermoReport.
        callback: k-diffusion-style callback(dict) or None; progress: tqdm bar (None: 50+ steps on a tty).
        noise_sampler: noise_sampler(sigma, sigma_next) -> [B, ...] replacing the in-kernel noise.
        extra_args: keyword arguments for every model call.
        check_every: also check for NaN/Inf every this many steps (one sync each).
        solver: the solver's name (progress bar, report); stochastic: whether the run leaves the ODE
            (no pathwise speed limit then).
        schedule: the physical schedule of the report (default den.schedule).
    """

    def __init__(self, den, sigmas, *, seed, sample_offset=0, backend="auto", track=True, callback=None,
                 progress=None, noise_sampler=None, extra_args=None, check_every=None, solver="",
                 stochastic=False, schedule=None):
        self.den = den
        self.schedule = schedule if schedule is not None else den.schedule
        self.sigmas = sigmas
        self.seed, self.sample_offset, self.backend = seed, sample_offset, backend
        self.track = track
        self.user_callback = callback
        self.progress = progress
        self.noise_sampler = noise_sampler
        self.extra_args = extra_args or {}
        self.check_every = check_every
        self.solver = solver
        self.stochastic = stochastic
        self.nfe = 0
        # Every update's per-sample rate (or NaN probe) goes into one growing [rows, B] device buffer; the
        # lists hold host ints only. Keeping a small tensor alive per step instead pinned the glibc heap
        # between the freed states, so RSS grew by one state per step (issue 13).
        self._rates: torch.Tensor | None = None
        self._rows = 0
        self.eval_t: list[float] = []            # physical time of each tracked evaluation
        self.eval_rows: list[int] = []           # its row in the rate buffer
        self.probes: list[int] = []              # solver step of each row
        self.first_state = self.last_state = None           # (sigma, x, scale): physical x = m scale x
        self._outputs: list[tuple] = []          # (weakref, memory extent) of the model's recent outputs (_own)
        self._copy_outputs = False
        self._first_output: tuple | None = None  # (first output, its extent), held until the second call
        self._velocity = self._velocity_table(sigmas) if track else {}
        self._checked: CheckedStep | None = None     # the fused op once its run-constant checks passed

    def _velocity_table(self, sigmas) -> dict[float, tuple[float, float, float]]:
        """(t, alpha, beta) of the velocity at each noise level of the grid, in one vectorised call:
        per-step scalar schedule math (bisection for t) cost more host time than the fused step itself."""
        pos = np.asarray([s for s in sigmas if s > 0], dtype=np.float64)
        if not pos.size:
            return {}
        t = np.atleast_1d(self.schedule.sigma_to_t(pos))
        a, b = (np.broadcast_to(np.asarray(c, dtype=np.float64), t.shape)
                for c in self.schedule.velocity_coeffs(t))
        return {float(k): (float(tk), float(ak), float(bk)) for k, tk, ak, bk in zip(pos, t, a, b)}

    # -- what a solver calls ----------------------------------------------------------------------
    def steps(self):
        n = len(self.sigmas) - 1
        show = self.progress if self.progress is not None else (n >= 50 and sys.stderr.isatty())
        if show:
            from tqdm.auto import tqdm
            return tqdm(range(n), desc=f"thermosample {self.solver}", leave=False)
        return range(n)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        d = self.den(x, sigma, **self.extra_args)
        self.nfe += 1
        self.record_state(sigma, x)
        return self._own(d)

    def _own(self, d: torch.Tensor) -> torch.Tensor:
        """A model that returns the same buffer, or views of one buffer (`buf[:B]`, `buf.view(...)`, halves in
        turn), every call would overwrite the D that a Heun or multistep solver still holds. The first output
        of a run is copied (one copy per run); an output that shares storage or memory with an earlier,
        still-alive output of the model (`ops.contract.shares_memory`) reveals such a model, and from then on
        every output is copied. The earlier outputs are kept as weak references with their memory extents
        (taken once each, not once per later call)."""
        if self._copy_outputs:
            return d.clone()
        extent = memory_extent(d)
        alive = [(ref, ext) for ref, ext in self._outputs if ref() is not None]
        # the first output is copied, so its view object may be gone when the model writes the buffer again:
        # keep it until the second call (alive, its memory is not handed to a new output meanwhile)
        known = [ext for _, ext in alive] + ([self._first_output[1]] if self._first_output is not None else [])
        reused = any(extents_share(ext, extent) for ext in known)
        self._outputs = alive[-3:] + [(weakref.ref(d), extent)]
        self._first_output = (d, extent) if self.nfe == 1 and not reused else None
        if reused:
            self._copy_outputs = True
        return d.clone() if reused or self.nfe == 1 else d

    def record_state(self, sigma: float, x: torch.Tensor, scale: float = 1.0) -> None:
        """Remember the state at an evaluation (the first and the last feed the speed limit)."""
        if self.first_state is None:
            self.first_state = (sigma, x, scale)
        self.last_state = (sigma, x, scale)

    def update(self, inputs, coeffs, i, *, noise=0.0, noise_sigmas=None, track_sigma=None, u=0, d=1,
               track_map=None, out=None):
        """One fused step out = sum coeffs[k] inputs[k] + noise z.

        `track_sigma` is the noise level of the evaluation whose velocity this update reduces, with
        x_hat = inputs[u] and D = inputs[d]; `track_map` = (cx, kx, ko) instead says x_hat = cx inputs[u]
        and D = kx inputs[u] + ko inputs[d] (a scheduler that holds the model output, not D).
        """
        if noise != 0.0 and self.noise_sampler is not None:
            inputs = list(inputs) + [self._sampled_noise(inputs[0], noise_sigmas)]
            coeffs = list(coeffs) + [noise]
            noise = 0.0
        tracked = bool(self.track) and track_sigma is not None
        alpha = beta = 0.0
        if tracked:
            t, alpha, beta = self.tracked_velocity(track_sigma, track_map)
        seed, offset, checked = self.seed, self.sample_offset, self._checked
        if (out is None and checked is not None and checked.backend == self.backend
                and checked.accepts_step(inputs, coeffs, noise, seed, i, offset, tracked, alpha, beta, u, d)):
            # The run's first call of this kind passed the op's checks: the backend directly, the rate into its row.
            row = self._new_row(inputs[0])
            out = checked.step(inputs, coeffs, noise, seed, i, offset, tracked, alpha, beta, u, d, self._rates, row)
        else:
            out, row = self._checked_op(StepArgs(inputs, coeffs, out=out, noise=noise, seed=seed, step=i,
                                                 sample_offset=offset, track=tracked, alpha=alpha, beta=beta, u=u, d=d))
        if tracked:
            self.eval_t.append(t)
            self.eval_rows.append(row)
        self.probes.append(i)
        if self.check_every and (i + 1) % self.check_every == 0 and (len(self.probes) == 1 or self.probes[-2] != i):
            self.check_finite()
        return out

    def _checked_op(self, args: StepArgs):
        """The fused op with every argument check (and the torch.library op under compile/autograd): a run's
        first call, and any call `CheckedStep.accepts` turns down. Returns (out, row of its rate). After an
        eager call passed, the run keeps a CheckedStep of its kind for the calls that follow."""
        out, rate = fused_step_op(backend=self.backend, **args._asdict())
        row = self._new_row(rate)              # (before indexing: it allocates the buffer on the first call)
        self._rates[row].copy_(rate)
        checked, x = self._checked, args.inputs[0]
        if not _needs_op(args.inputs) and (checked is None or checked.backend != self.backend
                                           or checked.shape != x.shape or checked.dtype != x.dtype
                                           or checked.device != x.device):
            self._flush()                                  # the steps the replaced CheckedStep left pending
            self._checked = CheckedStep(self.backend, x)   # this kind of call: checked above
        return out, row

    def _sampled_noise(self, like: torch.Tensor, sigmas) -> torch.Tensor:
        """The user's noise_sampler(sigma, sigma_next), checked: a floating tensor of the state's shape."""
        z = self.noise_sampler(*sigmas)
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            kind = type(z).__name__ if not isinstance(z, torch.Tensor) else f"{z.dtype} tensor"
            raise TypeError(f"noise_sampler must return a floating-point torch.Tensor, got a {kind}")
        if z.shape != like.shape:
            raise ValueError(f"noise_sampler returned shape {tuple(z.shape)}; expected the state's {tuple(like.shape)}")
        if z.device != like.device:
            raise ValueError(f"noise_sampler returned a tensor on {z.device}; the state is on {like.device}")
        return z if z.dtype == like.dtype else z.to(like.dtype)

    def probe(self, i: int, x: torch.Tensor) -> None:
        """Record whether each sample of a tensor made outside the fused op is finite (checked with the
        rates at the end of the run: NaN where a sample is not finite)."""
        finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        row = self._new_row(x)
        self._rates[row].copy_(torch.where(finite, 0.0, float("nan")))
        self.probes.append(i)

    def _new_row(self, like: torch.Tensor) -> int:
        """The index of the next row, float32 [B], of the rate buffer (B and device from `like`; the buffer
        doubles when full)."""
        if self._rates is None:
            self._rates = torch.empty((max(8, 3 * len(self.sigmas)), like.shape[0]), dtype=torch.float32,
                                      device=like.device)
        elif self._rows == self._rates.shape[0]:
            self._flush()
            grown = self._rates.new_empty((2 * self._rows, self._rates.shape[1]))
            grown[:self._rows].copy_(self._rates)
            self._rates = grown
        self._rows += 1
        return self._rows - 1

    def _flush(self) -> None:
        """Finish the steps whose rates the backend left pending (Triton's deferred partial sums)."""
        if self._checked is not None:
            self._checked.flush()

    @property
    def eval_rates(self) -> torch.Tensor:
        """[E, B] rates of the tracked evaluations, in order (a view-free copy of their rows)."""
        if not self.eval_rows:
            return torch.empty(0)
        self._flush()
        return self._rates[torch.tensor(self.eval_rows, device=self._rates.device)]

    def callback(self, i, x, sigma, sigma_hat, denoised):
        """k-diffusion's dict: 'sigma' and 'sigma_hat' are 0-d tensors on the state's device and in its dtype
        (a fill, no host-device copy, so nothing syncs); 'sigma_float' / 'sigma_hat_float' keep the exact
        host floats of the grid."""
        if self.user_callback is not None:
            self.user_callback({"x": x, "i": i, "sigma": x.new_full((), sigma), "sigma_hat": x.new_full((), sigma_hat),
                                "denoised": denoised, "sigma_float": float(sigma), "sigma_hat_float": float(sigma_hat)})

    # -- physical coordinates (hooks an entry point may override) ---------------------------------
    def velocity(self, sigma: float) -> tuple[float, float, float]:
        """(t, alpha, beta) at noise level sigma: nu = alpha x_hat + beta D (cached over the grid)."""
        hit = self._velocity.get(float(sigma))
        if hit is None:                             # a level off the grid (EDM churn's sigma_hat)
            t = float(self.schedule.sigma_to_t(sigma))
            alpha, beta = self.schedule.velocity_coeffs(t)
            hit = self._velocity[float(sigma)] = (t, float(alpha), float(beta))
        return hit

    def tracked_velocity(self, sigma: float, track_map=None) -> tuple[float, float, float]:
        """(t, alpha, beta) of the rate reduced over the update's inputs (see `update`)."""
        t, alpha, beta = self.velocity(sigma)
        if track_map is not None:
            cx, kx, ko = track_map
            alpha, beta = alpha * cx + beta * kx, beta * ko
        return t, alpha, beta

    def physical_m(self, sigma: float) -> float:
        """m(t) at noise level sigma: physical x = m x_hat."""
        return float(self.schedule.m(self.schedule.sigma_to_t(sigma)))

    def temperature(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.schedule.temperature(t.numpy()), dtype=torch.float64)

    # -- after the loop ---------------------------------------------------------------------------
    def check_finite(self, samples: torch.Tensor | None = None) -> None:
        """Raise NonFiniteError naming the first step and sample whose values are not finite (one sync)."""
        if not self.probes:
            return
        self._flush()
        bad = ~torch.isfinite(self._rates[:self._rows])
        if samples is not None:
            tail = ~torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)
            bad = torch.cat([bad, tail[None]])
        if not bool(bad.any()):
            return
        op, b = divmod(int(torch.nonzero(bad.flatten())[0]), bad.shape[1])
        step = self.probes[min(op, len(self.probes) - 1)]
        raise NonFiniteError(
            f"non-finite value (NaN or Inf) in the model output or the state at step {step} of "
            f"{len(self.sigmas) - 1} (sigma={self.sigmas[step]:.6g}), sample {b + self.sample_offset}; "
            "check the model, its dtype and the schedule's time convention", step=step,
            sample=b + self.sample_offset)

    def report(self) -> ThermoReport | None:
        if not self.track or not self.eval_rows:
            return None
        t = torch.tensor(self.eval_t, dtype=torch.float64)
        disp = None
        if not self.stochastic:  # the pathwise speed limit holds for deterministic (ODE) trajectories only
            (s0, x0, c0), (s1, x1, c1) = self.first_state, self.last_state
            p0, p1 = self.physical_m(s0) * c0, self.physical_m(s1) * c1
            # fixed-order sum: the same bits whatever the thread count or batch (issue 13, item 7)
            disp = fixed_order_sum((p1 * x1.double() - p0 * x0.double()).reshape(x0.shape[0], -1).square())
        return ThermoReport(t=t, rate=self.eval_rates, temperature=self.temperature(t),
                            displacement=disp, schedule_name=getattr(self.schedule, "name", ""), solver=self.solver)
