"""The Thermo versions of diffusers' UniPC, DDIM, DDPM, DEIS, LMS and DPM-Solver (order 3) schedulers against
diffusers' own, offline, with a tiny random UNet2DModel; and save_pretrained -> from_pretrained round trips
of pipelines that hold a Thermo scheduler. Skips only when diffusers is not installed."""
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
import diffusers  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from thermosample.integrations import diffusers as TD  # noqa: E402

# without "_use_default_values": from_config would drop the overrides of keys listed there (DDPM defaults)
BASE = {k: v for k, v in DDPMScheduler(num_train_timesteps=1000).config.items() if not k.startswith("_")}


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def loop(unet, sch, steps, seed=0, edit=False, **kw):
    """diffusers' standard loop; `generator=True` passes the loop's generator to step (diffusers' noise);
    `edit` rebuilds the latents between steps (as inpainting pipelines do)."""
    g = torch.Generator().manual_seed(seed)
    if kw.pop("generator", False):
        kw["generator"] = g
    sch.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=g) * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
            if edit:
                x = x * 1.0
    return x


CASES = [
    ("UniPCMultistepScheduler", {}, {}, 8),
    ("UniPCMultistepScheduler", {"solver_order": 1}, {}, 8),
    ("UniPCMultistepScheduler", {"solver_order": 3}, {}, 10),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {}, 10),
    ("UniPCMultistepScheduler", {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min",
                                 "disable_corrector": [0, 3]}, {}, 16),
    ("UniPCMultistepScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}, {}, 12),
    ("DDIMScheduler", {}, {}, 6),
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 1.0, "generator": True}, 8),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
     {"eta": 0.5, "generator": True, "use_clipped_model_output": True}, 8),
    ("DDPMScheduler", {}, {"generator": True}, 10),
    ("DDPMScheduler", {"variance_type": "fixed_small_log", "clip_sample": False}, {"generator": True}, 10),
    ("DDPMScheduler", {"prediction_type": "sample", "variance_type": "fixed_large"}, {"generator": True}, 10),
    ("DEISMultistepScheduler", {}, {}, 10),
    ("DEISMultistepScheduler", {"solver_order": 1}, {}, 8),
    ("DEISMultistepScheduler", {"solver_order": 2}, {}, 8),
    ("DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, {}, 20),
    ("LMSDiscreteScheduler", {}, {}, 10),
    ("LMSDiscreteScheduler", {"prediction_type": "v_prediction"}, {"order": 3}, 10),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}, 10),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}, 20),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, {"generator": True}, 10),
    ("DPMSolverMultistepScheduler", {"solver_order": 2, "solver_type": "heun"}, {}, 10),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "prediction_type": "v_prediction", "use_karras_sigmas": True,
                                     "final_sigmas_type": "sigma_min"}, {}, 12),
]


@pytest.mark.parametrize("name,extra,kw,steps", CASES, ids=[f"{c[0][:-9]}-{i}" for i, c in enumerate(CASES)])
def test_loop_matches_diffusers(unet, name, extra, kw, steps):
    peer = getattr(diffusers, name).from_config(dict(BASE, **extra))
    ours = getattr(TD, "Thermo" + name).from_config(peer.config)
    assert ours.order == peer.order and float(ours.init_noise_sigma) == float(peer.init_noise_sigma)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)    # fused: no fallback warning
        b = loop(unet, ours, steps, **dict(kw))
    a = loop(unet, peer, steps, **dict(kw))
    assert rel_err(a, b) <= 1e-5
    rep = ours.thermo
    assert rep is not None and rep.t.numel() == steps and rep.rate.shape[1] == 2
    assert torch.isfinite(rep.kinetic).all() and rep.kinetic_mean > 0


def test_ddim_each_step_matches(unet):
    """Step by step from diffusers' own states (1e-6): the DDIM loop with this random UNet amplifies a 1e-7
    input change ~400x over 10 steps, so whole loops are compared at 6 steps above."""
    peer = diffusers.DDIMScheduler.from_config(BASE)
    ours = TD.ThermoDDIMScheduler.from_config(peer.config)
    peer.set_timesteps(10)
    ours.set_timesteps(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in peer.timesteps:
            o = unet(x, t).sample
            a, b = peer.step(o, t, x), ours.step(o, t, x)
            assert rel_err(a.prev_sample, b.prev_sample) <= 1e-6
            assert rel_err(a.pred_original_sample, b.pred_original_sample) <= 2e-6
            x = a.prev_sample


def test_unipc_edited_latents_use_diffusers_corrector(unet):
    """A pipeline that replaces the latents between steps: the corrector runs from last_sample as diffusers'."""
    cfg = dict(BASE, solver_order=3)
    a = loop(unet, diffusers.UniPCMultistepScheduler.from_config(cfg), 10, edit=True)
    ours = TD.ThermoUniPCMultistepScheduler.from_config(cfg)
    b = loop(unet, ours, 10, edit=True)
    assert rel_err(a, b) <= 1e-5
    assert ours.last_sample is not None and ours.last_sample.shape == (2, 3, 8, 8)


def test_unipc_bh1_final_step_to_zero_is_finite(unet):
    """diffusers' bh1 gives NaN on a final step to sigma = 0 (B(h) = -inf); the fused step gives x = D."""
    x = loop(unet, TD.ThermoUniPCMultistepScheduler.from_config(dict(BASE, solver_type="bh1")), 6)
    assert torch.isfinite(x).all()


def test_ddim_variance_noise(unet):
    peer = diffusers.DDIMScheduler.from_config(BASE)
    ours = TD.ThermoDDIMScheduler.from_config(BASE)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for s in (peer, ours):
        s.set_timesteps(5)
    t = peer.timesteps[1]
    with torch.no_grad():
        o = unet(x, t).sample
    a = peer.step(o, t, x, eta=0.7, variance_noise=z).prev_sample
    b = ours.step(o, t, x, eta=0.7, variance_noise=z).prev_sample
    assert rel_err(a, b) <= 1e-6
    with pytest.raises(ValueError, match="generator and variance_noise"):
        ours.step(o, t, x, eta=0.7, variance_noise=z, generator=torch.Generator())


def test_ddpm_learned_variance_falls_back_with_one_warning():
    cfg = dict(BASE, variance_type="learned_range")
    o = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    outs = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for cls in (diffusers.DDPMScheduler, TD.ThermoDDPMScheduler):
            sch = cls.from_config(cfg)
            sch.set_timesteps(4)
            for t in sch.timesteps[:2]:
                outs.append(sch.step(o, t, x, generator=torch.Generator().manual_seed(3)).prev_sample)
    assert sum("not fused" in str(m.message) for m in w) == 1
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@pytest.mark.parametrize("name,extra", [("UniPCMultistepScheduler", {"predict_x0": False,
                                                                     "final_sigmas_type": "sigma_min"}),
                                        ("DDIMScheduler", {"thresholding": True}),
                                        ("DEISMultistepScheduler", {"thresholding": True})])
def test_unfused_configs_fall_back_with_one_warning(unet, name, extra):
    cfg = dict(BASE, **extra)
    a = loop(unet, getattr(diffusers, name).from_config(cfg), 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        b = loop(unet, getattr(TD, "Thermo" + name).from_config(cfg), 5)
    assert sum("not fused" in str(x.message) for x in w) == 1
    assert torch.isfinite(a).all() and torch.allclose(a, b)


def test_philox_noise_without_generator_is_seeded_by_torch(unet):
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(loop(unet, TD.ThermoDDPMScheduler.from_config(BASE), 5))
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()


def test_ddpm_step_on_gpu_style_timesteps_never_reads_the_device(unet, monkeypatch):
    """DDPM/DDIM read a CPU timestep on the host (no sync); step itself does no .item() on tensors."""
    sch = TD.ThermoDDIMScheduler.from_config(BASE)
    sch.set_timesteps(4)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        o = unet(x, sch.timesteps[0]).sample

    def boom(*a, **k):
        raise AssertionError("host read inside step")
    for name in ("item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    sch.step(o, 750, x)
    monkeypatch.undo()


# -- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler", "LMSDiscreteScheduler"])
def test_pipeline_save_load_round_trip(unet, name):
    """model_index.json names ["thermosample.integrations.diffusers", "Thermo..."]; from_pretrained finds the
    class and its loading method in that module (imported here, as diffusers requires for a non-diffusers
    library) and gives back the Thermo scheduler, with the same config and the same images."""
    cls = getattr(TD, "Thermo" + name)
    pipe = DDPMPipeline(unet=unet, scheduler=cls.from_config(BASE))
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as d:
        pipe.save_pretrained(d)
        loaded = DDPMPipeline.from_pretrained(d)
        assert type(loaded.scheduler) is cls
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
        other = DDPMPipeline.from_pretrained(d, scheduler=TD.ThermoEulerDiscreteScheduler.from_config(BASE))
        assert type(other.scheduler) is TD.ThermoEulerDiscreteScheduler
        alone = cls.from_pretrained(d, subfolder="scheduler")
        assert type(alone) is cls
    if name in ("UniPCMultistepScheduler", "LMSDiscreteScheduler"):
        return  # DDPMPipeline passes generator= to step, which diffusers' UniPC/LMS steps do not take
    loaded.set_progress_bar_config(disable=True)
    imgs = [p(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
            for p in (pipe, loaded)]
    assert abs(imgs[0] - imgs[1]).max() < 1e-5
    assert loaded.scheduler.thermo.t.numel() == 4


INDEXED = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
           "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LMSDiscreteScheduler",
           "FlowMatchEulerDiscreteScheduler"]


@pytest.mark.parametrize("name", INDEXED)
def test_step_past_the_end_says_so_and_keeps_the_run(name):
    """One step() too many: diffusers raises an IndexError from deep inside (UniPC an empty AssertionError,
    Heun nothing at all); ours an IndexError that says what happened, with the finished run's report intact
    and set_timesteps starting a fresh one."""
    flow = name.startswith("FlowMatch")
    ours = getattr(TD, "Thermo" + name).from_config({} if flow else BASE)
    g = torch.Generator().manual_seed(0)

    def run():
        ours.set_timesteps(4)
        x = torch.randn(2, 3, 4, 4, generator=g) * float(getattr(ours, "init_noise_sigma", 1.0))
        for t in ours.timesteps:
            x = ours.step(0.1 * torch.randn(x.shape, generator=g), t, ours.scale_model_input(x, t)).prev_sample
        return x

    run()
    rows = ours.thermo.rate.shape[0]
    with pytest.raises(IndexError, match="after the last of its"):
        ours.step(torch.zeros(2, 3, 4, 4), ours.timesteps[-1], torch.zeros(2, 3, 4, 4))
    assert ours.thermo.rate.shape[0] == rows
    assert torch.isfinite(run()).all()


# -- zero terminal SNR (rescale_betas_zero_snr): alphas_cumprod ends at 0, sigma = inf at t = 999 ----------
def _zsnr_loop(sch, steps=10, **step_kw):
    """A short loop with a deterministic model output; a fresh generator for any noise (diffusers' numbers)."""
    sch.set_timesteps(steps)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    if step_kw.pop("generator", False):
        step_kw["generator"] = torch.Generator().manual_seed(1)
    for t in sch.timesteps:
        x = sch.step(0.3 * torch.tanh(x) - 0.05 * x + 1e-3 * float(t), t, x, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("name,kw", [("DDIMScheduler", {}), ("DDIMScheduler", {"eta": 0.5, "generator": True}),
                                     ("DDPMScheduler", {"generator": True})])
@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_zero_terminal_snr_matches_diffusers(name, kw, prediction):
    cfg = dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type=prediction, clip_sample=False)
    peer, ours = getattr(diffusers, name)(**cfg), getattr(TD, "Thermo" + name)(**cfg)
    assert float(peer.alphas_cumprod[-1]) == 0.0        # the premise: sigma = inf at the first timestep
    a, b = _zsnr_loop(peer, **kw), _zsnr_loop(ours, **kw)
    assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5
    rep = ours.thermo          # the alpha = 0 step has no finite velocity: not tracked, nothing infinite recorded
    assert rep.t.numel() == 9 and torch.isfinite(rep.t).all() and torch.isfinite(rep.rate).all()


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_zero_terminal_snr_with_epsilon_prediction_is_a_clear_error(name):
    """diffusers divides by sqrt(alphas_cumprod) = 0 and returns NaN; ours says why."""
    cfg = dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, clip_sample=False)
    assert not torch.isfinite(_zsnr_loop(getattr(diffusers, name)(**cfg), 3)).all()
    with pytest.raises(ValueError, match="zero terminal SNR"):
        _zsnr_loop(getattr(TD, "Thermo" + name)(**cfg), 3)


PEER_TAKES_LAST_STEP = ("UniPCMultistepScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler")


@pytest.mark.parametrize("name", INDEXED + ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("timestep", [12345.0, 500.5, torch.tensor(12345.0)], ids=["far", "between", "tensor"])
def test_a_timestep_not_in_the_schedule_is_refused(name, timestep):
    """The first step() with a timestep the schedule does not hold raises IndexError, as diffusers' Euler, Heun,
    LMS, flow-match, DDIM and DDPM schedulers do (diffusers' multistep ones silently take it as the last step;
    ours refuse it too), instead of stepping from the first sigma."""
    flow = name.startswith("FlowMatch")
    peer, ours = (cls.from_config({} if flow else BASE)
                  for cls in (getattr(diffusers, name), getattr(TD, "Thermo" + name)))
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for s in (peer, ours):
        s.set_timesteps(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name not in PEER_TAKES_LAST_STEP:
            with pytest.raises(IndexError):
                peer.step(0.1 * x, timestep, x)
        with pytest.raises(IndexError, match="timestep 12345 is not|timestep 500.5 is not"):
            ours.step(0.1 * x, timestep, x)
    assert ours.thermo is None          # nothing ran


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_integer_timesteps_are_refused_as_diffusers_refuses_them(name):
    """diffusers' Euler-type step() refuses an int timestep (an index from enumerate()) with a ValueError."""
    flow = name.startswith("FlowMatch")
    ours = getattr(TD, "Thermo" + name).from_config({} if flow else BASE)
    ours.set_timesteps(4)
    x = torch.zeros(2, 3, 4, 4)
    for t in (int(ours.timesteps[0]), torch.tensor(int(ours.timesteps[0]))):
        with pytest.raises(ValueError, match="Passing integer indices"):
            ours.step(x, t, x)
    ours.step(x, ours.timesteps[0], x)  # the schedule's own (float) timestep steps
