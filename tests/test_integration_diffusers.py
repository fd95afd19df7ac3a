"""thermosample.integrations.diffusers against the real diffusers schedulers, offline, with a tiny
randomly initialised UNet2DModel (DDPMPipeline and the standard hand-written loop) and a 1x1-conv
flow-matching model. Skips only when diffusers is not installed."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
import diffusers  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from thermosample.integrations import diffusers as TD  # noqa: E402

PAIRS = {"euler": ("EulerDiscreteScheduler", "ThermoEulerDiscreteScheduler"),
         "euler_a": ("EulerAncestralDiscreteScheduler", "ThermoEulerAncestralDiscreteScheduler"),
         "heun": ("HeunDiscreteScheduler", "ThermoHeunDiscreteScheduler"),
         "dpmpp_2m": ("DPMSolverMultistepScheduler", "ThermoDPMSolverMultistepScheduler")}


BASE = {k: v for k, v in DDPMScheduler(num_train_timesteps=1000).config.items() if not k.startswith("_")}


def close(a, b, rel=1e-5):
    err, scale = (a - b).abs().max().item(), a.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


def loop(unet, sch, steps=8, seed=0):
    """The standard diffusers denoising loop (as in StableDiffusionPipeline)."""
    g = torch.Generator().manual_seed(seed)
    sch.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=g) * sch.init_noise_sigma
    kw = {} if isinstance(sch, diffusers.HeunDiscreteScheduler) else {"generator": g}
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("key,extra", [("euler", {}), ("euler_a", {}), ("heun", {}), ("dpmpp_2m", {}),
                                       ("euler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}),
                                       ("heun", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
                                       ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}),
                                       ("dpmpp_2m", {"prediction_type": "v_prediction", "use_karras_sigmas": True,
                                                     "final_sigmas_type": "sigma_min"})])
def test_loop_matches_diffusers(unet, key, extra):
    cfg = dict(BASE, **extra)
    peer = getattr(diffusers, PAIRS[key][0]).from_config(cfg)
    ours = getattr(TD, PAIRS[key][1]).from_config(peer.config)
    assert ours.order == peer.order and float(ours.init_noise_sigma) == float(peer.init_noise_sigma)
    close(loop(unet, peer), loop(unet, ours))
    rep = ours.thermo
    assert rep is not None and rep.t.numel() == len(ours.timesteps) and rep.rate.shape[1] == 2
    assert torch.isfinite(rep.kinetic).all() and rep.kinetic_mean > 0
    if not extra.get("algorithm_type", "").startswith("sde") and key != "euler_a":
        assert 0 < rep.efficiency <= 1


@pytest.mark.parametrize("key", ["euler", "euler_a", "dpmpp_2m"])
def test_ddpm_pipeline_runs_and_matches(unet, key):
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for cls in (getattr(diffusers, PAIRS[key][0]), getattr(TD, PAIRS[key][1])):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        out = pipe(batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
        images.append(torch.from_numpy(out.images))
    assert images[1].shape == (2, 8, 8, 3)
    assert (images[0] - images[1]).abs().max() < 1e-5
    assert pipe.scheduler.thermo.t.numel() == 6


class TinyFlow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("cfg", [{}, {"shift": 3.0}])
def test_flow_match_euler_matches(cfg):
    torch.manual_seed(1)
    net = TinyFlow()
    outs, scheds = [], []
    for cls in (diffusers.FlowMatchEulerDiscreteScheduler, TD.ThermoFlowMatchEulerDiscreteScheduler):
        sch = cls(**cfg)
        sch.set_timesteps(12)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in sch.timesteps:
                x = sch.step(net(x, t.expand(2)), t, x).prev_sample
        outs.append(x)
        scheds.append(sch)
    close(outs[0], outs[1])
    rep = scheds[1].thermo
    # The report integrates the rate by the trapezoid rule, the Euler path is left-Riemann: the pathwise
    # bound holds up to that quadrature difference (a few % at 12 steps with shift 3).
    assert rep.t.numel() == 12 and 0.9 < rep.efficiency < 1.05
    # CondOT: the rate is ||v||^2 of the model output; check the first evaluation independently.
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v0 = net(x0, scheds[1].timesteps[0].expand(2)).detach()
    assert torch.allclose(rep.rate[0].double(), v0.flatten(1).square().sum(1).double(), rtol=1e-5)


def test_step_never_reads_the_device(unet, monkeypatch):
    """No .item()/.tolist()/.cpu() inside step or scale_model_input (diffusers' own calls .item()).
    With set_begin_index (what a pipeline on a GPU does) not even the CPU timestep is read."""
    sch = TD.ThermoDPMSolverMultistepScheduler.from_config(BASE)
    sch.set_timesteps(5)
    sch.set_begin_index(0)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        outs = [unet(x, t).sample for t in sch.timesteps[:2]]

    def boom(*a, **k):
        raise AssertionError("host read inside step")
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for t, o in zip(sch.timesteps[:2], outs):
        x = sch.step(o, t, sch.scale_model_input(x, t)).prev_sample
    monkeypatch.undo()
    assert sch.step_index == 2


def test_import_thermosample_does_not_import_diffusers():
    code = "import sys, thermosample; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("cls", ["ThermoEulerDiscreteScheduler", "ThermoEulerAncestralDiscreteScheduler",
                                 "ThermoDPMSolverMultistepScheduler"])
def test_fp16_latents_that_overflow_are_reported(cls):
    """The step runs in float32 and the latent goes back to fp16: an overflow there is a non-finite state
    (issue 13, item 6) and `thermo` raises instead of reporting a finite run."""
    import thermosample as ts
    sch = getattr(TD, cls).from_config(BASE)
    sch.set_timesteps(4)
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float16)
    huge = torch.full((2, 3, 4, 4), 6.0e4, dtype=torch.float16)
    x = sch.step(huge, sch.timesteps[0], x).prev_sample     # finite in float32, inf once stored as fp16
    assert x.dtype == torch.float16 and not torch.isfinite(x).all()
    with pytest.raises(ts.NonFiniteError):
        _ = sch.thermo


# ---- issue 15: per-run precomputation (host grid, velocity table, checked op) must follow the run ---------

ALL = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
       "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler",
       "DDIMScheduler", "DDPMScheduler", "FlowMatchEulerDiscreteScheduler"]


def pair(name, **extra):
    """(diffusers' scheduler, thermosample's) of one config."""
    if name.startswith("Flow"):
        return getattr(diffusers, name)(**extra), getattr(TD, "Thermo" + name)(**extra)
    peer = getattr(diffusers, name).from_config(dict(BASE, **extra))
    return peer, getattr(TD, "Thermo" + name).from_config(peer.config)


def toy(x, t):
    return 0.3 * torch.tanh(x) + 1e-5 * float(t) * x


def toy_loop(sch, steps, batch, seed, timesteps=None, stop=None):
    """The pipeline loop with a cheap model; diffusers' generator noise where step takes one (same numbers);
    `timesteps` replaces the scheduler's (a run begun mid-grid), `stop` interrupts it."""
    import inspect
    g = torch.Generator().manual_seed(seed)
    sch.set_timesteps(steps)
    x = torch.randn(batch, 3, 4, 4, generator=g) * getattr(sch, "init_noise_sigma", 1.0)
    kw = {"generator": g} if "generator" in inspect.signature(sch.step).parameters else {}
    scale = getattr(sch, "scale_model_input", lambda x, t: x)
    for k, t in enumerate(sch.timesteps if timesteps is None else timesteps(sch.timesteps)):
        if k == stop:
            break
        x = sch.step(toy(scale(x, t), t), t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("name", ALL)
def test_set_timesteps_again_gives_a_fresh_matching_run(name):
    """The host grid, the velocity table and the checked op belong to a run: an interrupted run, then runs of
    other step counts and batch sizes on the same scheduler, each match diffusers and report only their own
    evaluations."""
    peer, ours = pair(name)
    for sch in (peer, ours):
        toy_loop(sch, 12, 2, 0, stop=5)
    for steps, batch in ((7, 3), (12, 2)):
        close(toy_loop(peer, steps, batch, steps), toy_loop(ours, steps, batch, steps))
        fresh = pair(name)[1]
        toy_loop(fresh, steps, batch, steps)
        rep, want = ours.thermo, fresh.thermo
        assert rep.rate.shape == (len(ours.timesteps), batch)
        assert torch.equal(rep.t, want.t) and torch.equal(rep.rate, want.rate)   # as a fresh scheduler's run
        assert ours._run._checked.shape[0] == batch             # the checked op follows the new batch size


@pytest.mark.parametrize("name", ALL)
def test_a_run_begun_mid_grid_matches(name):
    """The first step's timestep sets the step index (no set_begin_index), as diffusers' img2img loops do."""
    peer, ours = pair(name)
    start = 2 * getattr(ours, "order", 1)
    close(toy_loop(peer, 8, 2, 0, timesteps=lambda ts: ts[start:]),
          toy_loop(ours, 8, 2, 0, timesteps=lambda ts: ts[start:]))
    assert ours.thermo.t.numel() == len(ours.timesteps) - start


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_timesteps_out_of_order_follow_the_timestep(name):
    """DDIM/DDPM index their step by the timestep value, in any order, as diffusers does."""
    peer, ours = pair(name)
    order = lambda ts: torch.cat([ts[3:5], ts[:3], ts[5:]])   # noqa: E731
    close(toy_loop(peer, 8, 2, 0, timesteps=order), toy_loop(ours, 8, 2, 0, timesteps=order))


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "DEISMultistepScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_a_step_past_the_end_raises_as_diffusers(name):
    for sch in pair(name):
        x = toy_loop(sch, 5, 2, 0)
        t = sch.timesteps[-1]
        with pytest.raises(IndexError):
            sch.step(toy(x, t), t, x)


def test_the_backend_is_read_at_every_step(monkeypatch):
    """scheduler.backend may change between steps; the run's checked op must not keep the old one."""
    from thermosample import ops
    sch = TD.ThermoEulerDiscreteScheduler.from_config(BASE)
    sch.set_timesteps(6)
    x = torch.randn(2, 3, 4, 4) * sch.init_noise_sigma
    seen = []
    reference = ops.reference.launch
    monkeypatch.setattr(ops.reference, "launch", lambda *a, **k: seen.append(1) or reference(*a, **k))
    ops.implementation.cache_clear()
    try:
        for k, t in enumerate(sch.timesteps):
            sch.backend = "torch" if k >= 3 else "auto"
            x = sch.step(toy(sch.scale_model_input(x, t), t), t, x).prev_sample
    finally:
        ops.implementation.cache_clear()
    assert len(seen) == 2 * 3                     # two ops per Euler step, on the last three steps


def test_velocity_table_is_the_schedule_s_velocity():
    """The run's table (one vectorised call at its first step) gives the schedule's scalar velocity at every
    sigma of the grid, also with use_flow_sigmas (where the scheduler's sigma is not sigma_hat)."""
    import numpy as np
    for extra in ({}, {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}):
        _, ours = pair("DPMSolverMultistepScheduler", **extra)
        toy_loop(ours, 9, 2, 0)
        run = ours._run
        for s in ours._sig:
            if s <= 0:
                continue
            t = float(run.schedule.sigma_to_t(run._sigma_hat(s)))
            want = np.array((t, *run.schedule.velocity_coeffs(t)))
            np.testing.assert_allclose(run.velocity(s), want, rtol=1e-13, atol=0)


def test_a_scheduler_s_later_runs_skip_the_full_checks(monkeypatch):
    """The checked op carries over from one run of a scheduler to the next (a pipeline's next call)."""
    from thermosample import run as run_module
    calls = []
    full = run_module.fused_step_op
    monkeypatch.setattr(run_module, "fused_step_op", lambda *a, **k: calls.append(1) or full(*a, **k))
    _, ours = pair("DPMSolverMultistepScheduler")
    toy_loop(ours, 6, 2, 0)
    assert len(calls) == 1
    toy_loop(ours, 8, 2, 1)
    assert len(calls) == 1 and ours.thermo.t.numel() == 8


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                                  "DDIMScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_construct_set_timesteps_and_deterministic_steps_leave_torch_s_generator_as_diffusers(name):
    """Heun/LMS call set_timesteps from __init__; no deterministic step draws: the Philox seed of a run is
    drawn only at its first in-kernel noise, so a seeded script's later torch.randn is diffusers'."""
    after = []
    for cls in (getattr(diffusers, name), getattr(TD, "Thermo" + name)):
        torch.manual_seed(0)
        sch = cls()
        sch.set_timesteps(5)
        x = torch.ones(2, 3, 4, 4) * float(getattr(sch, "init_noise_sigma", 1.0))
        scale = getattr(sch, "scale_model_input", lambda x, t: x)
        for t in sch.timesteps:
            x = sch.step(toy(scale(x, t), t), t, x).prev_sample
        after.append(torch.randn(3))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_step_without_set_timesteps_uses_the_init_grid_like_diffusers(name):
    outs = []
    for cls in (getattr(diffusers, name), getattr(TD, "Thermo" + name)):
        sch = cls()
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        kw = {"generator": g} if name.startswith("EulerAncestral") else {}
        scale = getattr(sch, "scale_model_input", lambda x, t: x)
        for t in sch.timesteps[:3]:
            x = sch.step(toy(scale(x, t), t), t, x, **kw).prev_sample
        outs.append(x)
    close(outs[0], outs[1])
