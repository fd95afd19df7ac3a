"""Issue 38 part A: the calibrated path through diffusers and k-diffusion.

A tiny offline class-conditional pipeline with classifier-free guidance (a randomly initialised UNet2DModel
inside a DiffusionPipeline that loops scheduler.step) calibrates with `calibrate_pipeline`, saves, reloads
and samples with the config; the samples are compared with `ts.sample` of a guided denoiser written here by
hand (not `pipeline_denoiser`). The same for a flow-matching scheduler config. The calibration's pilot keeps
each sample's conditioning through every stage (a model that records what each trajectory saw), and the
k-diffusion drop-in runs a config as ts.sample does.
"""
import json
import os

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample.schedules import CondOT, DiscreteVP

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
TD = pytest.importorskip("thermosample.integrations.diffusers")
K = pytest.importorskip("thermosample.integrations.k_diffusion")

from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler  # noqa: E402

NULL = 2                                     # the tiny UNet's null class (classes 0 and 1 are real)
LABELS = torch.tensor([0, 1])
W = 3.0                                      # the guidance scale everything here is calibrated for
STEPS = 4
CHEAP = ts.CalibrationOptions(pilot_batch=8, ref_steps=8, pilot_steps=4, progress=False)


class TinyClassPipeline(DiffusionPipeline):
    """A class-conditional pipeline as diffusers writes them: classifier-free guidance on the two halves of
    one batched call (unconditional first), scale_model_input, scheduler.step."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, class_labels, latents, guidance_scale=W, num_inference_steps=None):
        self.scheduler.set_timesteps(num_inference_steps)
        x = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        labels = torch.cat([torch.full_like(class_labels, NULL), class_labels])
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = self.unet(inp, t, class_labels=labels).sample.chunk(2)
            x = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, x).prev_sample
        return x


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=4, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                 num_class_embeds=3).eval()


def _guided_by_hand(net, labels, w):
    """The guided network as ts.Denoiser's model(x, time), written without pipeline_denoiser."""
    def model(x, t):
        both = torch.cat([torch.full_like(labels, NULL), labels])
        uncond, cond = net(torch.cat([x, x]), torch.cat([t, t]), class_labels=both).sample.chunk(2)
        return uncond + w * (cond - uncond)
    return model


def _base(kind):
    return FlowMatchEulerDiscreteScheduler() if kind == "flow" else DDPMScheduler(prediction_type=kind)


@pytest.fixture(scope="module")
def calibrated(net):
    """kind -> the SamplerConfig calibrate_pipeline gives the tiny pipeline under that scheduler (once each)."""
    found = {}

    def get(kind):
        if kind not in found:
            found[kind] = TD.calibrate_pipeline(
                TinyClassPipeline(net, _base(kind)), STEPS, conditioning={"class_labels": LABELS},
                negative_conditioning={"class_labels": torch.tensor([NULL])}, guidance_scale=W, options=CHEAP)
        return found[kind]
    return get


@pytest.mark.filterwarnings("ignore:this SamplerConfig was calibrated for model")
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_conditional_pipeline_calibrates_saves_reloads_and_samples(net, calibrated, kind, tmp_path):
    flow = kind == "flow"
    base = _base(kind)
    pipe = TinyClassPipeline(net, base)
    config = calibrated(kind)
    assert config.calibrated_for["guidance"] == {"scale": W, "conditionings": 2, "network_rows_per_row": 2,
                                                 "network_rows": 2 * config.calibrated_for["pilot"]["rows"]}
    assert config.calibrated_for["schedule"] == repr(CondOT() if flow else DiscreteVP(base.alphas_cumprod))
    pipe.scheduler = TD.ThermoAutoScheduler.from_sampler_config(config, base.config)
    cls = TD.ThermoAutoFlowMatchScheduler if flow else TD.ThermoAutoScheduler
    assert type(pipe.scheduler) is cls

    pipe.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "scheduler", "scheduler_config.json")) as f:
        saved = json.load(f)
    assert saved["_class_name"] == cls.__name__
    loaded = TinyClassPipeline.from_pretrained(tmp_path)
    alone = TD.ThermoAutoScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    for scheduler in (loaded.scheduler, alone):
        assert type(scheduler) is cls
        got = scheduler.sampler_config
        assert got == config and got.sigmas.dtype == np.float64 and np.array_equal(got.sigmas, config.sigmas)

    latents = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = loaded(LABELS, latents, num_inference_steps=STEPS)
    if flow:    # the latents are x at the first flow time t0; ts.sample's state is x_hat = x / (1 - t0)
        den = ts.Denoiser(_guided_by_hand(net, LABELS, W), "condot", "flow_prediction", time="t", time_scale=1000)
        noise = latents * (1.0 + float(config.sigmas[0]))
    else:       # Euler's convention: the state is x_hat, the model sees x_hat / sqrt(1 + sigma^2) at the index
        den = ts.Denoiser(_guided_by_hand(net, LABELS, W), DiscreteVP(DDPMScheduler().alphas_cumprod), kind,
                          time="index")
        noise = latents * loaded.scheduler.init_noise_sigma
    want = ts.sample(den, noise=noise, grid=config).samples
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, loaded(LABELS.flip(0), latents, num_inference_steps=STEPS), atol=1e-3)
    assert loaded.scheduler.thermo.rate.shape == (STEPS, 2)


def test_a_diffusers_pipeline_class_loads_the_auto_scheduler_by_name(net, calibrated, tmp_path):
    """model_index.json names ["thermosample.integrations.diffusers", "ThermoAutoScheduler"]: the generic
    DiffusionPipeline.from_pretrained resolves a pipeline class diffusers knows and this scheduler with its config."""
    config = calibrated("epsilon")
    pipe = diffusers.DDPMPipeline(unet=net, scheduler=TD.ThermoAutoScheduler.from_sampler_config(
        config, DDPMScheduler().config))
    pipe.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "model_index.json")) as f:
        assert json.load(f)["scheduler"] == ["thermosample.integrations.diffusers", "ThermoAutoScheduler"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is diffusers.DDPMPipeline and type(loaded.scheduler) is TD.ThermoAutoScheduler
    assert loaded.scheduler.sampler_config == config
    swapped = DiffusionPipeline.from_pretrained(tmp_path, scheduler=TD.ThermoAutoScheduler.from_pretrained(
        tmp_path, subfolder="scheduler"))
    assert swapped.scheduler.sampler_config == config


def test_pipeline_denoiser_is_the_guided_model(net):
    """pipeline_denoiser's D equals the hand-written guided denoiser's, chunked or not, and w = 1 is one
    conditional call."""
    pipe = TinyClassPipeline(net, DDPMScheduler())
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 3.0
    labels = torch.tensor([0, 0, 1, 1])     # two rows per conditioning, diffusers' num_images_per_prompt order
    hand = ts.Denoiser(_guided_by_hand(net, labels, W), DiscreteVP(DDPMScheduler().alphas_cumprod), "epsilon",
                       time="index")
    for rows in (None, 1, 3):
        den = TD.pipeline_denoiser(pipe, {"class_labels": LABELS}, {"class_labels": torch.tensor([NULL])}, W,
                                   rows=rows)
        torch.testing.assert_close(den(x, 3.0), hand(x, 3.0), rtol=1e-5, atol=1e-5)   # batch sizes round apart
    plain = TD.pipeline_denoiser(pipe, {"class_labels": labels})
    direct = ts.Denoiser(lambda x, t: net(x, t, class_labels=labels).sample, plain.schedule, "epsilon", time="index")
    torch.testing.assert_close(plain(x, 3.0), direct(x, 3.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 2"):
        den(x[:3], 3.0)
    with pytest.raises(ValueError, match="negative_conditioning"):
        TD.pipeline_denoiser(pipe, {"class_labels": LABELS}, guidance_scale=2.0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "continuous", "flow"])
def test_pipeline_denoiser_hands_the_network_the_schedulers_timesteps(net, calibrated, kind):
    """The den's model time at each sigma of a config is the timestep the auto scheduler gives the pipeline
    (diffusers' own set_timesteps: log-sigma interpolation, 0.25 log sigma, t * 1000)."""
    flow = kind == "flow"
    base = dict(_base("flow" if flow else "epsilon" if kind == "epsilon" else "v_prediction").config)
    if kind == "continuous":
        base["timestep_type"] = "continuous"
    config = ts.SamplerConfig("euler", {}, calibrated("flow" if flow else "epsilon").sigmas)
    den = TD.pipeline_denoiser(TinyClassPipeline(net, _base("epsilon")), scheduler_config=base)
    scheduler = TD.ThermoAutoScheduler.from_sampler_config(config, base)
    scheduler.set_timesteps()
    times = [den.model_time(den.coeffs(s)[0], float(s)) for s in config.sigmas[:-1]]
    np.testing.assert_allclose(times, scheduler.timesteps.double().numpy(), rtol=1e-5, atol=1e-3)


class _TextNet(torch.nn.Module):
    """A network conditioned as SDXL's UNet is: encoder_hidden_states and added_cond_kwargs (a dict)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        assert encoder_hidden_states.dtype == sample.dtype          # float64 embeddings come in the input's dtype
        e = encoder_hidden_states.mean((1, 2)) + added_cond_kwargs["text_embeds"].sum(1) * added_cond_kwargs["time_ids"][:, 0]
        return self.w * sample + e.view(-1, 1, 1, 1) * (1.0 + timestep.view(-1, 1, 1, 1) / 1000)


def test_nested_conditioning_is_guided_like_a_pipeline():
    g = torch.Generator().manual_seed(4)
    emb, text, ids = (torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g),
                      torch.rand(2, 2, generator=g) + 1)
    cond = {"encoder_hidden_states": emb, "added_cond_kwargs": {"time_ids": ids, "text_embeds": text}}
    neg = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 4), "time_ids": ids[:1]},
           "encoder_hidden_states": torch.zeros(1, 3, 5)}
    net = _TextNet()
    x = torch.randn(2, 1, 2, 2, generator=g) * 5.0

    def by_hand(x, t):
        u = net(x, t, torch.zeros(2, 3, 5), {"text_embeds": torch.zeros(2, 4), "time_ids": ids[:1].expand(2, 2)})
        c = net(x, t, emb.float(), {"text_embeds": text, "time_ids": ids})
        return u + 2.5 * (c - u)
    hand = ts.Denoiser(by_hand, DiscreteVP(DDPMScheduler().alphas_cumprod), "epsilon", time="index")
    den = TD.pipeline_denoiser(TinyClassPipeline(net, DDPMScheduler()), cond, neg, 2.5)
    torch.testing.assert_close(den(x, 2.0), hand(x, 2.0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="added_cond_kwargs.text_embeds"):
        TD.pipeline_denoiser(TinyClassPipeline(net, DDPMScheduler()), cond, {"encoder_hidden_states": emb}, 2.5)


class _Recorder(torch.nn.Module):
    """An eps network for Gaussian classes N(mu_k, 1) (mu_k = k - 1) that records, per call, the conditional
    half's inputs and labels and its timestep."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("ac", alphas_cumprod.double())
        self.calls = []

    def forward(self, sample, timestep, class_labels=None):
        n = sample.shape[0] // 2
        self.calls.append((sample[n:].detach().clone(), class_labels[n:].clone(), float(timestep[0])))
        a = self.ac[timestep.round().long().clamp(0, len(self.ac) - 1)].to(sample.dtype).view(-1, 1, 1, 1)
        mu = (class_labels.to(sample.dtype) - 1.0).view(-1, 1, 1, 1)
        return (1.0 - a).sqrt() * (sample - a.sqrt() * mu)


def _inconsistencies(calls):
    """Trajectories that saw more than one conditioning. A run is a sequence of calls on one batch size with
    falling time; its rows are trajectories. A trajectory is known by its starting direction: runs that start
    from the same noise (the reference and every candidate run, or a subset of it) and the twins pilot's twins
    (1e-3 apart) are the same sample and must see the same conditioning."""
    seen, bad, run = [], 0, None
    for x, labels, t in calls:
        if run is None or x.shape[0] != run[0].shape[0] or t > run[2]:
            start = x.reshape(len(x), -1).double()
            start = start / start.norm(dim=1, keepdim=True)
            for row, label in zip(start, labels.tolist()):
                hit = next((lab for v, lab in seen if (v - row).norm() < 1e-2), None)
                if hit is None:
                    seen.append((row, label))
                elif hit != label:
                    bad += 1
            run = (x, labels, t)
        else:
            bad += int((labels != run[1]).sum())
            run = (x, run[1], t)
    return bad, len(seen)


def _record(monkeypatch=None, rows=None):
    scheduler = DDPMScheduler()
    net = _Recorder(scheduler.alphas_cumprod)
    pipe = TinyClassPipeline(net, scheduler)
    opts = ts.CalibrationOptions(pilot_batch=10, ref_steps=8, pilot_steps=8, progress=False, pilot_rows=None)
    TD.calibrate_pipeline(pipe, 10, conditioning={"class_labels": torch.tensor([0, 1, 2])},
                          negative_conditioning={"class_labels": torch.tensor([3])}, guidance_scale=2.0,
                          sample_shape=(1, 2, 2), options=opts)
    return net.calls


def test_calibration_keeps_each_samples_conditioning(monkeypatch):
    calls = _record()
    sizes = {len(c[0]) for c in calls}
    assert {20, 10} <= sizes <= {20, 10, 5, 2}      # the twins pilot, the reference and its runs (and halves)
    bad, samples = _inconsistencies(calls)
    assert bad == 0 and samples >= 20
    labels = torch.cat([c[1] for c in calls if len(c[0]) == 10])
    assert set(labels.tolist()) == {0, 1, 2}
    # the check can fail: conditioning r mod K by batch position gives a twin (row r + 10) another label
    monkeypatch.setattr(TD, "_calibration_rows", lambda n, k, batch: torch.arange(n) % k)
    assert _inconsistencies(_record())[0] > 0


def test_auto_schedulers_refuse_a_config_in_other_coordinates(calibrated):
    flow_config = calibrated("flow")
    vp = TD.ThermoAutoScheduler.from_sampler_config(flow_config, DDPMScheduler().config)
    assert type(vp) is TD.ThermoAutoScheduler
    with pytest.raises(ValueError, match="calibrated for schedule CondOT"):
        vp.set_timesteps()
    with pytest.raises(ValueError, match="no SamplerConfig"):
        TD.ThermoAutoFlowMatchScheduler.from_config(FlowMatchEulerDiscreteScheduler().config).set_timesteps()


# -- k-diffusion -------------------------------------------------------------------------------------------
ALPHAS_CUMPROD = torch.cumprod(1.0 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32), 0)
MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.5, 1.0, -0.5, 2.0]]), [0.3, 0.5])


@pytest.fixture(scope="module")
def kconfig():
    den = MIX.denoiser(DiscreteVP(ALPHAS_CUMPROD))
    opts = ts.CalibrationOptions(pilot_batch=16, ref_steps=32, progress=False)
    return den, ts.thermo_grid(den, 10, solver="auto", sample_shape=(4,), dtype=torch.float64, device="cpu",
                               options=opts)


def test_get_sigmas_auto_runs_the_configs_choice(kconfig):
    den, config = kconfig
    sigmas = K.get_sigmas_auto(config)
    assert sigmas.dtype == torch.float64 and sigmas[-1] == 0 and np.array_equal(sigmas.numpy(), config.sigmas)
    model = lambda x, sigma: den(x, float(sigma[0]))   # noqa: E731  (k-diffusion's model(x, sigma * s_in))
    for dtype in (torch.float64, torch.float32):
        noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=dtype) * float(config.sigmas[0])
        want = ts.sample(den, noise=noise, grid=config).samples
        by_config = K.sample_auto(model, noise.clone(), config, disable=True)
        seen = []
        by_sigmas = K.sample_auto(lambda x, sigma, shift: model(x, sigma) + shift, noise.clone(), sigmas,
                                  extra_args={"shift": 0.0}, callback=lambda info, seen=seen: seen.append(info["i"]),
                                  disable=True)
        assert torch.equal(by_sigmas, by_config) and seen == list(range(config.steps))
        if dtype == torch.float64:
            assert torch.equal(by_config, want)
        else:   # float32: k-diffusion hands the model sigma * s_in in x's dtype
            torch.testing.assert_close(by_config, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="SamplerConfig"):
        K.get_sigmas_auto(config.sigmas)


def test_guided_model_hands_the_conditioning_in_each_calls_dtype_moved_once_per_dtype():
    """GuidedModel moves its conditioning to the state's device and dtype once per (device, dtype), not on every
    call; switching the state's dtype back and forth still hands the network the conditioning in that dtype,
    with each row's own values, and the guided output of a network linear in its embedding."""
    emb = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)        # K = 2 conditionings
    seen = []

    def net(x, timestep, emb):
        seen.append(emb)
        return x * emb[:, :1] + emb[:, 1:]

    model = TD.GuidedModel(net, {"emb": emb}, {"emb": torch.zeros(1, 2)}, guidance_scale=W)
    for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):
        x = torch.arange(4, dtype=dtype)[:, None] + 1.0
        out = model(x, torch.ones(4, dtype=dtype))
        rows = emb[[0, 0, 1, 1]].to(dtype)                # n // K rows per conditioning, in batch order
        assert seen[-1].dtype == dtype and out.dtype == dtype
        torch.testing.assert_close(seen[-1][4:], rows)    # the conditional half; the unconditional first
        torch.testing.assert_close(out, W * (x * rows[:, :1] + rows[:, 1:]))
    assert len(model._moved) == 4                         # (cond, uncond) x two dtypes, reused after
