"""Issue 38: the calibrated path with the networks real pipelines run, beside test_pipeline_calibration's
class-conditional UNet2DModel: a text-conditioned UNet2DConditionModel (cross-attention on encoder_hidden_states,
Stable Diffusion's), a class-conditional DiT (a transformer that also predicts variances: 2C output channels)
and an SD3 transformer under a flow-matching scheduler (two conditioning tensors). Each, tiny and randomly
initialised, is calibrated with `calibrate_pipeline` and run by the auto scheduler in a diffusers-style guided
loop written here; the samples are compared with `ts.sample` of a guided denoiser written by hand."""
import pytest
import torch

import thermosample as ts
from thermosample.schedules import DiscreteVP

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
TD = pytest.importorskip("thermosample.integrations.diffusers")

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

W, STEPS, C = 3.0, 4, 2
CHEAP = ts.CalibrationOptions(pilot_batch=8, ref_steps=8, pilot_steps=4, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: a second thread buys nothing, and on a busy 2-core machine OpenMP's barrier
    made one UNet call 70 x slower (2.9 s against 0.04 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _text(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 6, generator=g), torch.randn(1, 5, 6, generator=g)


def unet_text():
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=C, out_channels=C, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6, attention_head_dim=4, norm_num_groups=4).eval()
    cond, uncond = _text(1)
    return net, DDPMScheduler(), {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}


def dit_classes():
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=C,
                                          out_channels=2 * C, num_layers=1, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=1000, norm_num_groups=1).eval()
    return net, DDPMScheduler(), {"class_labels": torch.tensor([3, 7])}, {"class_labels": torch.tensor([1000])}


def sd3_flow():
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=C, num_layers=1,
                                          attention_head_dim=4, num_attention_heads=2, joint_attention_dim=6,
                                          caption_projection_dim=8, pooled_projection_dim=5, out_channels=C,
                                          pos_embed_max_size=8).eval()
    cond, uncond = _text(2)
    g = torch.Generator().manual_seed(3)
    pooled, pooled_null = torch.randn(2, 5, generator=g), torch.zeros(1, 5)
    return (net, FlowMatchEulerDiscreteScheduler(), {"encoder_hidden_states": cond, "pooled_projections": pooled},
            {"encoder_hidden_states": uncond, "pooled_projections": pooled_null})


class Pipe:
    """What calibrate_pipeline reads of a pipeline: its network (unet or transformer) and scheduler."""

    def __init__(self, net, scheduler):
        self.scheduler = scheduler
        setattr(self, "unet" if isinstance(net, diffusers.UNet2DConditionModel) else "transformer", net)


def _both(uncond, cond):
    return {k: torch.cat([uncond[k].expand(cond[k].shape), cond[k]]) for k in cond}


def _guided_loop(net, scheduler, cond, uncond, latents):
    """A guided pipeline loop as diffusers writes one: one batched call on [uncond, cond], the timestep
    expanded to the batch, the first C output channels, scheduler.step."""
    scheduler.set_timesteps(STEPS)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    kwargs = _both(uncond, cond)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = net(inp, timestep=t.expand(inp.shape[0]), **kwargs).sample[:, :C]
        u, c = out.chunk(2)
        x = scheduler.step(u + W * (c - u), t, x).prev_sample
    return x


def _guided_by_hand(net, cond, uncond):
    kwargs = _both(uncond, cond)

    def model(x, t):
        u, c = net(torch.cat([x, x]), timestep=torch.cat([t, t]), **kwargs).sample[:, :C].chunk(2)
        return u + W * (c - u)
    return model


@pytest.mark.filterwarnings("ignore:this SamplerConfig was calibrated for model")
@pytest.mark.parametrize("build", [unet_text, dit_classes, sd3_flow], ids=lambda f: f.__name__)
def test_a_real_pipelines_network_calibrates_and_runs_its_config(build):
    net, base, cond, uncond = build()
    flow = isinstance(base, FlowMatchEulerDiscreteScheduler)
    with torch.no_grad():
        config = TD.calibrate_pipeline(Pipe(net, base), STEPS, conditioning=cond, negative_conditioning=uncond,
                                       guidance_scale=W, options=CHEAP)
        assert config.steps == STEPS and config.calibrated_for["guidance"]["scale"] == W
        scheduler = TD.ThermoAutoScheduler.from_sampler_config(config, base.config)
        assert isinstance(scheduler, TD.ThermoAutoFlowMatchScheduler) == flow

        latents = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(4))
        out = _guided_loop(net, scheduler, cond, uncond, latents)
        model = _guided_by_hand(net, cond, uncond)
        if flow:
            den = ts.Denoiser(model, "condot", "flow_prediction", time="t", time_scale=1000)
            noise = latents * (1.0 + float(config.sigmas[0]))
        else:
            den = ts.Denoiser(model, DiscreteVP(base.alphas_cumprod), "epsilon", time="index")
            noise = latents * scheduler.init_noise_sigma
        want = ts.sample(den, noise=noise, grid=config).samples
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    swapped = {k: v.flip(0) for k, v in cond.items()}
    with torch.no_grad():
        other = _guided_loop(net, scheduler, swapped, uncond, latents)
    assert not torch.allclose(out, other, atol=1e-4), "the conditioning must reach the network"
