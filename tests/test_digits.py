"""The shipped digits model (thermosample/digits.py, thermosample/data/digits.safetensors)."""
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import thermosample as ts
from thermosample.apps import digits


@pytest.fixture(scope="module")
def classifier():
    x = digits.load_data().reshape(-1, 64).numpy()
    return LogisticRegression(max_iter=2000, C=0.5).fit(x, digits.load_labels())


def quality(samples, clf):
    """(mean classifier confidence, number of classes predicted, |mean pixel - data mean pixel|)."""
    x = samples.reshape(samples.shape[0], 64).double().clamp(-1, 1).numpy()
    prob = clf.predict_proba(x)
    data_mean = float(digits.load_data().mean())
    return float(prob.max(1).mean()), len(set(prob.argmax(1).tolist())), abs(float(x.mean()) - data_mean)


def test_load_denoiser_and_samples_look_like_digits(classifier):
    den = digits.load_denoiser()
    assert isinstance(den, ts.Denoiser) and den.sample_shape == (1, 8, 8)
    out = ts.sample(den, (128, 1, 8, 8), steps=12, solver="heun", grid="karras", seed=0)
    assert out.samples.shape == (128, 1, 8, 8) and torch.isfinite(out.samples).all()
    conf, classes, dmean = quality(out.samples, classifier)
    assert conf > 0.85, conf          # a linear classifier trained on the data is confident on the samples
    assert classes >= 9, classes      # and sees (nearly) every digit: no mode collapse
    assert dmean < 0.08, dmean        # pixel statistics match the data
    assert out.samples.abs().max() < 3.0  # no blow-up (pixels live in [-1, 1])


def test_an_untrained_network_fails_the_same_check(classifier):
    torch.manual_seed(0)
    net = digits.DigitsNet(sigma_data=0.6).eval()
    den = ts.Denoiser(lambda x, s: net(x, s).detach(), ts.schedules.EDM(), prediction="x0", time="sigma",
                      scale_input=False)
    x = ts.sample(den, (128, 1, 8, 8), steps=12, solver="heun", grid="karras", seed=0).samples
    conf, _, _ = quality(x, classifier)
    assert conf < 0.85


def test_denoiser_is_a_denoiser():
    """At small sigma D(y + sigma z) returns close to the clean image y (better than the noisy input)."""
    den = digits.load_denoiser()
    y = digits.load_data()[:64]
    g = torch.Generator().manual_seed(1)
    for sigma, bound in ((0.1, 0.8), (0.3, 0.6), (1.0, 0.45)):
        noisy = y + sigma * torch.randn(y.shape, generator=g)
        err = (den(noisy, sigma) - y).square().mean().sqrt()
        assert err < bound * sigma, (sigma, float(err))


def test_calibrated_grid_for_the_digits_model_runs():
    den = digits.load_denoiser()
    g = ts.thermo_grid(den, 10, options=ts.CalibrationOptions(pilot_batch=16, pilot_steps=16))
    out = ts.sample(den, (4, 1, 8, 8), grid=g, solver="dpmpp_2m", seed=0)
    assert out.nfe == 10 and torch.isfinite(out.samples).all()
