"""A SamplerConfig from ts.thermo_grid(solver="auto") runs through both integrations as ts.sample runs it:
k-diffusion's sample_auto and diffusers' ThermoAutoScheduler give ts.sample(den, noise=..., grid=config)'s
samples, bit for bit where the model sees the same inputs."""
import warnings

import pytest
import torch

import thermosample as ts
from thermosample.schedules import DiscreteVP

K = pytest.importorskip("thermosample.integrations.k_diffusion")

# DDPMScheduler's default training schedule (linear betas, float32), so that one config serves both tests
ALPHAS_CUMPROD = torch.cumprod(1.0 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32), 0)
MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.5, -1.0, 0.3],
                                           [-1.5, 1.0, -0.5, 2.0, 0.0, 0.7, -0.2]]), [0.3, 0.5])


@pytest.fixture(scope="module")
def den():
    return MIX.denoiser(DiscreteVP(ALPHAS_CUMPROD))


@pytest.fixture(scope="module")
def config(den):
    return ts.thermo_grid(den, 10, solver="auto", sample_shape=(7,), backend="torch",
                          options=ts.CalibrationOptions(pilot_batch=16, ref_steps=32))


def _variants(config):
    """The config and hand-made ones for auto's other choices and variants, on its sigmas."""
    return [config,
            ts.SamplerConfig("unipc", {"order": 3, "max_h": 0.8, "noise_below": 0.3, "noise_order": 3}, config.sigmas),
            ts.SamplerConfig("ipndm", {}, config.sigmas), ts.SamplerConfig("euler", {}, config.sigmas)]


def _noise(config, dtype):
    return torch.randn(6, 7, generator=torch.Generator().manual_seed(3), dtype=dtype) * float(config.sigmas[0])


def _kmodel(den):
    return lambda x, sigma: den(x, float(sigma[0]))   # k-diffusion's model(x, sigma * s_in)


# -- k-diffusion ---------------------------------------------------------------------------------------
def test_sample_auto_float64_is_ts_sample_bit_for_bit(den, config):
    # float64: k-diffusion's sigma * s_in holds the config's sigma exactly, so the model sees what ts.sample's does
    noise = _noise(config, torch.float64)
    for cfg in _variants(config):
        want = ts.sample(den, noise=noise, grid=cfg, backend="torch").samples
        got = K.sample_auto(_kmodel(den), noise.clone(), cfg, disable=True, backend="torch")
        assert torch.equal(got, want), cfg


def test_sample_auto_float32_within_float32_rounding(den, config):
    # float32: k-diffusion hands the model sigma * s_in in x's dtype, so the model runs at float32-rounded sigmas
    # where ts.sample passes the host float64 sigma; the solver's arithmetic is the same
    noise = _noise(config, torch.float32)
    want = ts.sample(den, noise=noise, grid=config, backend="torch").samples
    thermo = {}
    got = K.sample_auto(_kmodel(den), noise.clone(), config, disable=True, backend="torch", thermo=thermo)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert thermo["nfe"] == config.steps


def test_sample_auto_reads_a_saved_config(den, config, tmp_path):
    noise = _noise(config, torch.float64)
    loaded = ts.SamplerConfig.load(config.save(tmp_path / "auto.json"))
    want = K.sample_auto(_kmodel(den), noise.clone(), config, disable=True, backend="torch")
    assert torch.equal(K.sample_auto(_kmodel(den), noise.clone(), loaded, disable=True, backend="torch"), want)


def test_sample_auto_on_plain_sigmas_runs_the_uncalibrated_default(den, config):
    noise = _noise(config, torch.float64)
    sigmas = torch.as_tensor(config.sigmas)
    with warnings.catch_warnings():    # the uncalibrated default is said once per band, whichever call comes first
        warnings.simplefilter("ignore", UserWarning)
        want = ts.sample(den, noise=noise, grid=config.sigmas, solver="auto", backend="torch").samples
        got = K.sample_auto(_kmodel(den), noise.clone(), sigmas, disable=True, backend="torch")
    assert torch.equal(got, want)


def test_sample_auto_refuses_a_config_it_cannot_run(den, config):
    noise = _noise(config, torch.float64)
    with pytest.raises(TypeError, match="max_h"):
        K.sample_auto(_kmodel(den), noise, ts.SamplerConfig("ipndm", {"max_h": 0.8}, config.sigmas), disable=True)
    with pytest.raises(ValueError, match="solver must be one of"):
        K.sample_auto(_kmodel(den), noise, ts.SamplerConfig("nope", {}, config.sigmas), disable=True)


# -- diffusers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_config():
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    assert torch.equal(scheduler.alphas_cumprod, ALPHAS_CUMPROD)
    return dict(scheduler.config)


def _scheduler(cfg, diffusers_config, **kwargs):
    from thermosample.integrations.diffusers import ThermoAutoScheduler
    scheduler = ThermoAutoScheduler.from_sampler_config(cfg, diffusers_config, **kwargs)
    scheduler.backend = "torch"
    return scheduler


def test_auto_scheduler_is_ts_sample_bit_for_bit(den, config, diffusers_config):
    # an x0 model given the scheduler's state and the config's sigma: the solver sees ts.sample's D's, and the
    # scheduler's x0 conversion of a "sample" prediction is exact, so the samples are identical
    noise = _noise(config, torch.float32)
    for cfg in _variants(config):
        want = ts.sample(den, noise=noise, grid=cfg, backend="torch").samples
        for edit in (False, True):
            scheduler = _scheduler(cfg, diffusers_config, prediction_type="sample")
            scheduler.set_timesteps(cfg.steps)
            x = noise.clone()
            for i, t in enumerate(scheduler.timesteps):
                x = scheduler.step(den(x, float(cfg.sigmas[i])), t, x).prev_sample
                if edit:   # a pipeline that hands back other latents (here equal ones): the solver goes on from them
                    x = x.clone()
            assert torch.equal(x, want), (cfg, edit)
            assert scheduler.thermo.rate.shape == (cfg.steps, 6)


def test_auto_scheduler_in_a_pipeline_loop(config, diffusers_config):
    # the pipeline's convention: an eps model of the physical x at the timestep; scale_model_input, diffusers'
    # timesteps (float32, log-sigma interpolated) and the eps -> x0 conversion round in float32
    schedule = DiscreteVP(ALPHAS_CUMPROD)
    eps = MIX.as_model(schedule, "eps")
    noise = _noise(config, torch.float32)
    want = ts.sample(MIX.denoiser(schedule, "eps"), noise=noise, grid=config, backend="torch").samples
    scheduler = _scheduler(config, diffusers_config)
    scheduler.set_timesteps(config.steps)
    x = noise * 1.0
    for t in scheduler.timesteps:
        t_phys = torch.full((x.shape[0],), float(t) / 999.0, dtype=torch.float64)
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), t_phys), t, x).prev_sample
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


def test_auto_scheduler_refusals(config, diffusers_config, tmp_path):
    from thermosample.integrations.diffusers import ThermoAutoScheduler
    scheduler = _scheduler(str(config.save(tmp_path / "auto.json")), diffusers_config)
    with pytest.raises(ValueError, match="calibrated for 10 steps"):
        scheduler.set_timesteps(12)
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(sigmas=[1.0, 0.0])
    scheduler.set_timesteps()
    assert len(scheduler.timesteps) == 10
    with pytest.raises(ValueError, match="one model evaluation per step"):
        _scheduler(ts.SamplerConfig("heun", {}, config.sigmas), diffusers_config)
    with pytest.raises(ValueError, match="no SamplerConfig"):
        ThermoAutoScheduler.from_config(diffusers_config).set_timesteps(10)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(3)
    x = _noise(config, torch.float32)
    with pytest.raises(ValueError, match="from the first step"):
        scheduler.step(x, scheduler.timesteps[3], x)
