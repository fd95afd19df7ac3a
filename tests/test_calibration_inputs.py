"""What a calibration takes on trust: no autograd graph in any stage, and a reused `pilot_data` checked
against the model, schedule and sample shape it is used with before it ranks anything."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch

import thermosample as ts


class Net(torch.nn.Module):
    """A small x0-predicting MLP whose parameters require grad, as a training module's do."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.f = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.SiLU(), torch.nn.Linear(16, dim))

    def forward(self, x, t):
        return self.f(x)


def _den(model, schedule="edm"):
    return ts.Denoiser(model, schedule, prediction="x0", time="t")


QUIET = ts.CalibrationOptions(progress=False, pilot_batch=16, ref_steps=32, boundary_pool=0)


class Scaled(torch.nn.Module):
    """A mixture's exact denoiser behind a parameter that requires grad (a module in training mode's habit)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.scale = inner, torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t):
        return self.inner(x, t) * self.scale


def test_no_stage_of_a_calibration_records_an_autograd_graph():
    """10 steps on image-like data: the band whose fit stage calls the model outside the sampler."""
    from benchmarks import quality_problems
    den = quality_problems.spectral_mixture(256, 4, 1.0, 0.3, 4243).denoiser("edm")
    den.model = Scaled(den.model)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*requires_grad")   # "Converting a tensor with requires_grad=True to a scalar"
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cfg = ts.thermo_grid(den, 10, solver="auto", sample_shape=(256,), options=ts.CalibrationOptions(
                progress=False, ref_steps=64, pilot_batch=128))
    assert "fit_errors" in cfg.meta                # the fit stage ran
    assert saved == [], f"{len(saved)} tensors saved for backward"
    assert torch.is_grad_enabled()                # and the caller's grad mode is back


@pytest.fixture(scope="module")
def made():
    """A calibration of Net(seed 0) on EDM for samples of shape (6,), and its pilot."""
    grid = ts.thermo_grid(_den(Net()), 10, solver="dpmpp_2m", sample_shape=(6,), options=QUIET)
    return grid, dict(grid.pilot)


def _again(pilot, den=None, shape=(6,), solver="dpmpp_2m"):
    return ts.thermo_grid(den or _den(Net()), 10, solver=solver, sample_shape=shape, pilot_data=pilot,
                          options=QUIET)


def test_a_pilot_reused_with_its_own_model_gives_the_same_grid(made):
    grid, pilot = made
    assert np.array_equal(np.asarray(_again(pilot)), np.asarray(grid))


def test_a_pilot_of_another_model_is_refused(made):
    with pytest.raises(ValueError, match="pilot_data.*another model"):
        _again(made[1], den=_den(Net(seed=1)))


def test_a_pilot_of_another_function_is_refused_by_a_probe(made):
    """A closure has no parameters to fingerprint: the pilot's first reference node is evaluated again."""
    net = Net()
    own = ts.thermo_grid(_den(lambda x, t: net(x, t)), 10, solver="dpmpp_2m", sample_shape=(6,), options=QUIET)
    again = _again(dict(own.pilot), den=_den(lambda x, t: net(x, t)))
    assert np.array_equal(np.asarray(again), np.asarray(own))
    other = Net(seed=1)
    with pytest.raises(ValueError, match="pilot_data.*another model"):
        _again(dict(own.pilot), den=_den(lambda x, t: other(x, t)))


def test_a_pilot_of_another_schedule_is_refused(made):
    with pytest.raises(ValueError, match="pilot_data.*schedule"):
        _again(made[1], den=_den(Net(), schedule=ts.schedules.VE(sigma_max=40.0)))


def test_a_pilot_of_another_sample_shape_is_refused(made):
    with pytest.raises(ValueError, match="pilot_data.*shape"):
        _again(made[1], shape=(2, 3))


@pytest.mark.parametrize("spoil, says", [
    (lambda p: p.pop("sigma"), "sigma"),                                    # a malformed pilot: a key missing
    (lambda p: p.update(D=p["D"][:, :, :3]), "D"),                           # a cut-down D
    (lambda p: p.update(D=p["D"][:-2]), "D"),                                # D for fewer pilot nodes
    (lambda p: p["ref_final"].__setitem__((0, 0), float("nan")), "ref_final"),  # NaN in the reference
    (lambda p: p["ref_noise"].__setitem__((1, 2), float("nan")), "ref_noise"),
    (lambda p: p.update(ref_weight=p["ref_weight"][:-1]), "ref_weight"),
    (lambda p: p.update(ref_sigma=p["ref_sigma"][::-1].copy()), "ref_sigma"),
])
def test_a_malformed_pilot_is_refused_with_the_field_it_lacks(made, spoil, says):
    pilot = {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v)
             for k, v in made[1].items()}
    spoil(pilot)
    with pytest.raises(ValueError, match=f"pilot_data.*{says}"):
        _again(pilot, solver="heun")       # heun's grid uses the twins pilot and the reference


def test_pilot_data_that_is_no_dict_is_refused_by_kind():
    with pytest.raises(TypeError, match="pilot_data"):
        _again([1, 2, 3])


def test_a_pilot_too_short_for_the_solvers_order_names_pilot_steps():
    """iPNDM (order 4) in auto's 10-step band differentiates the pilot's D four times: a 4-node pilot has
    nothing left, which numpy reported as 'array of sample points is empty'."""
    den = ts.toy.default_mixture(dim=4, modes=2).denoiser("edm")
    short = ts.CalibrationOptions(progress=False, pilot_batch=8, ref_steps=16, boundary_pool=0, pilot_steps=4)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"pilot_steps .* at least 5"):
        warnings.simplefilter("ignore")
        ts.thermo_grid(den, 10, solver="auto", sample_shape=(4,), options=short)
    p = ts.calibrate.pilot(den, (8, 4), pilot_steps=5)
    lam, rho = ts.calibrate.density(p, den.schedule, order=4)
    assert np.isfinite(rho).all() and np.isclose(np.trapezoid(rho, lam), 1.0)


def _mixture():
    from thermosample import toy
    return toy.default_mixture(dim=4, modes=3, seed=2).denoiser("edm")


SMALL = ts.CalibrationOptions(progress=False, pilot_batch=8, ref_steps=16, boundary_pool=0)


@pytest.mark.parametrize("candidate", ["error", "length"])
def test_a_one_step_density_grid_is_the_single_step_from_sigma_max(candidate):
    """One step runs from sigma_max to 0: a placed grid pinned sigma_min over sigma_max and so started the
    run at sigma_min, where the output is nearly the noise."""
    den = _mixture()
    g = ts.thermo_grid(den, 1, sample_shape=4, options=dataclasses.replace(SMALL, candidates=(candidate,)))
    np.testing.assert_array_equal(np.asarray(g), [den.schedule.sigma_max, 0.0])


def test_a_jump_grid_longer_than_its_reference_is_refused_not_shortened():
    """The jump grid picks nodes of the reference: asking for more steps than it has returned a shorter grid
    whose meta still said the steps asked for."""
    with pytest.raises(ValueError, match="needs a reference of at least 20 nodes"):
        ts.thermo_grid(_mixture(), 20, sample_shape=(4,), options=dataclasses.replace(SMALL, candidates=("jump",)))
    g = ts.thermo_grid(_mixture(), 16, sample_shape=(4,), options=dataclasses.replace(SMALL, candidates=("jump",)))
    assert len(g) == 17


def test_the_error_candidate_without_the_twins_pilot_names_what_to_pass():
    from thermosample import calibrate
    den = _mixture()
    ref = calibrate.reference(den, (8, 4), ref_steps=16)
    with pytest.raises(ValueError, match="needs the twins pilot"):
        calibrate.select(den, 10, "dpmpp_2m", ref)


@pytest.mark.parametrize("options, error, says", [
    (dict(candidates="karras"), TypeError, "tuple of grid names"),
    (dict(boundary_pool=10), ValueError, "must exceed boundary_samples"),
])
def test_calibration_options_that_would_mislead_are_refused(options, error, says):
    """A string of candidates was read letter by letter; a boundary pool no larger than its screened sample
    gave every random pilot sample weight 0."""
    with pytest.raises(error, match=says):
        ts.thermo_grid(_mixture(), 6, sample_shape=(4,), options=dataclasses.replace(SMALL, **options))


def test_planned_rows_checks_steps_and_takes_numpy_row_budgets():
    from thermosample import calibrate
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        calibrate.planned_rows(0)
    assert calibrate.planned_rows(10, options=ts.CalibrationOptions(cost=np.int64(5000))) == \
        calibrate.planned_rows(10, options=ts.CalibrationOptions(cost=5000)) <= 5000


def test_a_twins_pilot_of_larger_samples_is_refused():
    """A pilot holding only the twins part (no reference to probe) made for 8-d samples was taken for a 4-d
    model and placed a grid from another model's measurements."""
    from thermosample import calibrate, toy
    wide = toy.default_mixture(dim=8, modes=3, seed=2).denoiser("edm")
    twins = calibrate.pilot(wide, (8, 8), pilot_steps=12)
    with pytest.raises(ValueError, match="coordinates per sample"):
        ts.thermo_grid(_mixture(), 6, "euler_ancestral", sample_shape=(4,), pilot_data=twins, options=SMALL)
    ts.thermo_grid(wide, 6, "euler_ancestral", sample_shape=(8,), pilot_data=twins, options=SMALL)


def test_a_denoiser_subclass_s_calibration_records_its_rows_as_not_counted():
    """Only a plain Denoiser's model is metered: a subclass's calls used to be recorded as 0 rows, which reads
    as a free calibration."""
    den = _mixture()

    class Mine(ts.Denoiser):
        pass

    mine = Mine(den.model, den.schedule, prediction=den.prediction, time=den.time)
    plain = ts.thermo_grid(den, 6, sample_shape=(4,), options=SMALL)
    sub = ts.thermo_grid(mine, 6, sample_shape=(4,), options=SMALL)
    assert plain.meta["calibration_rows"] > 0 and plain.meta["calibration_calls"] > 0
    assert sub.meta["calibration_rows"] is None and sub.meta["calibration_calls"] is None
    np.testing.assert_array_equal(np.asarray(sub), np.asarray(plain))
