"""Non-finite values are detected on device and raised as NonFiniteError naming the first bad step (0-based,
the callback's 'i') and sample (global index), at the end of the run or at `check_every` — never returned."""
import math

import pytest
import torch

import thermosample as ts
from thermosample.errors import NonFiniteError
from thermosample.toy import toy_factory

BACKENDS = ["torch"] + (["cpp"] if ts.ops.cpp_available() else [])


class Poisoned:
    """A denoiser that wraps the toy one and writes `value` into sample `sample` at solver step `step`
    (identified by sigma, so it also works for two evaluations per step); counts model calls."""

    def __init__(self, step, sample=None, value=math.nan, steps=20, solver="euler"):
        self.inner = toy_factory(dim=6)
        self.schedule = self.inner.schedule
        self.sigmas = ts.grids.make_grid("karras", steps, self.schedule)
        self.step, self.sample, self.value = step, sample, value
        self.calls = 0
        self.first_sigma_calls = 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        d = self.inner(x, sigma)
        if self.step is not None and abs(sigma - self.sigmas[self.step]) <= 1e-12 * self.sigmas[self.step]:
            d = d.clone()
            if self.sample is None:
                d[:] = self.value
            else:
                d[self.sample, 0] = self.value
        return d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("track", [True, False])
def test_nan_at_step_7_of_20_names_step_7(backend, track):
    den = Poisoned(step=7)
    with pytest.raises(NonFiniteError) as info:
        ts.sample(den, (5, 6), steps=20, solver="euler", backend=backend, track=track)
    assert info.value.step == 7
    assert info.value.sample == 0
    assert "step 7" in str(info.value)
    # detection happens at the end of the run: no sync per step, so all 20 evaluations ran
    assert den.calls == 20


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "ddim", "euler_ancestral", "euler_maruyama"])
def test_every_solver_names_the_first_bad_step_and_sample(solver):
    den = Poisoned(step=7, sample=3)
    with pytest.raises(NonFiniteError) as info:
        ts.sample(den, (5, 6), steps=20, solver=solver, backend="torch", sample_offset=100)
    # Heun's corrector of step 6 already evaluates the model at sigma_7: that is the first bad step.
    assert (info.value.step, info.value.sample) == (6 if solver == "heun" else 7, 103)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_inf_and_nan_in_one_sample(value):
    den = Poisoned(step=12, sample=2, value=value)
    with pytest.raises(NonFiniteError) as info:
        ts.sample(den, (4, 6), steps=20, backend="torch")
    assert (info.value.step, info.value.sample) == (12, 2)


def test_model_output_overflowing_the_state_dtype_is_detected():
    """A float64 model output too large for the float32 state becomes Inf there: still raised."""
    def model(x, t):
        out = x.double() * 0.5
        late = (t <= 0.5).double()                      # only in the second half of the run
        out[:, 0] = late * 1e300
        return out
    den = ts.Denoiser(model, "condot", prediction="x0")
    with pytest.raises(NonFiniteError) as info:
        ts.sample(den, (3, 4), steps=10, backend="torch", grid="uniform")
    ts_t = [den.schedule.sigma_to_t(s) for s in ts.grids.make_grid("uniform", 10, den.schedule)[:-1]]
    assert info.value.step == next(i for i, t in enumerate(ts_t) if t <= 0.5)


def test_check_every_stops_early():
    den = Poisoned(step=7)
    with pytest.raises(NonFiniteError) as info:
        ts.sample(den, (5, 6), steps=20, backend="torch", check_every=5)
    assert info.value.step == 7
    # checked after steps 4 and 9: the run stops at the second check point, not at step 19
    assert den.calls == 10


def test_nan_initial_noise_is_step_0():
    den = Poisoned(step=None)
    noise = torch.randn(3, 6) * float(den.sigmas[0])
    noise[1, 2] = math.nan
    with pytest.raises(NonFiniteError) as info:
        ts.sample(den, noise=noise, steps=20, backend="torch")
    assert (info.value.step, info.value.sample) == (0, 1)


def test_finite_run_raises_nothing_and_is_finite():
    den = Poisoned(step=None)
    out = ts.sample(den, (4, 6), steps=20, backend="torch", check_every=3)
    assert torch.isfinite(out.samples).all()
    assert den.calls == 20


def test_nonfinite_error_is_a_floating_point_error():
    assert issubclass(NonFiniteError, FloatingPointError)
