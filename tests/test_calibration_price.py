"""What a calibration costs and says: its price in model rows (stated before, counted after, within the
documented budgets), its progress bar, the dtypes and devices it runs in, and a config that warns when it
runs with something it was not calibrated for."""
import json
import warnings

import pytest
import torch

import thermosample as ts
from thermosample import auto, calibrate


class Net(torch.nn.Module):
    """A small x0-predicting MLP (ignores sigma): enough to calibrate, not to be accurate."""

    def __init__(self, dim=6):
        super().__init__()
        torch.manual_seed(0)
        self.f = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.SiLU(), torch.nn.Linear(16, dim))

    def forward(self, x, t):
        return self.f(x)


class Counting:
    """A model wrapper counting the rows and calls that reach the model."""

    def __init__(self, model):
        self.model, self.rows, self.calls = model, 0, 0

    def __call__(self, x, t):
        self.rows += x.shape[0]
        self.calls += 1
        return self.model(x, t)


def mixture_model():
    mix = ts.toy.GaussianMixture(torch.tensor([[1.0, -1.0, 0.5, 0.0, 1.0, -0.5], [-1.0, 1.0, 0.0, 0.5, -1.0, 0.5]]),
                                 0.2)
    return mix.as_model("edm", "x0")


@pytest.mark.parametrize("steps, most", [(6, 6000), (10, 6000), (20, 10000)])
def test_default_calibration_stays_within_its_row_budget_and_counts_what_reached_the_model(steps, most):
    model = Counting(mixture_model())
    den = ts.Denoiser(model, "edm", prediction="x0", time="t")
    cfg = ts.thermo_grid(den, steps, solver="auto", sample_shape=(6,), dtype=torch.float64,
                         options=ts.CalibrationOptions(progress=False))
    pilot = cfg.calibrated_for["pilot"]
    assert (pilot["rows"], pilot["calls"]) == (model.rows, model.calls)
    assert most * 0.9 < model.rows <= most == calibrate.row_budget("default", steps)   # the largest pilot that fits
    assert pilot["seconds"] > 0 and pilot["batch"] >= 24


def test_the_tiers_cost_what_they_say_and_a_row_budget_is_kept():
    rows = {}
    for cost in ("low", "default", "thorough", 3000):
        model = Counting(mixture_model())
        den = ts.Denoiser(model, "edm", prediction="x0", time="t")
        ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), dtype=torch.float64,
                       options=ts.CalibrationOptions(cost=cost, progress=False))
        rows[cost] = model.rows
    assert rows["low"] <= 3000 < rows["default"] <= 6000 < 6 * 6000 < rows["thorough"]
    assert 2700 < rows[3000] <= 3000
    den = ts.Denoiser(mixture_model(), "edm", prediction="x0", time="t")
    with pytest.raises(ValueError, match="too small"):
        ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(cost=100))
    single = ts.thermo_grid(den, 10, solver="dpmpp_2m", sample_shape=(6,), options=ts.CalibrationOptions(progress=False))
    assert single.pilot["ref_final"].shape[0] == calibrate.THOROUGH[0]       # a single solver's grid: as validated
    with pytest.raises(ValueError, match="cost must be"):
        ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(cost="cheap"))


def test_progress_states_the_price_first_and_shows_a_bar(capsys):
    model = Counting(mixture_model())
    den = ts.Denoiser(model, "edm", prediction="x0", time="t")
    ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), dtype=torch.float64,
                   options=ts.CalibrationOptions(progress=True))
    err = capsys.readouterr().err
    stated = int(err.split("at most ")[1].split(" model rows")[0].replace(",", ""))
    assert model.rows <= stated < 2 * model.rows
    assert "thermo_grid auto 10 steps" in err and "row" in err and "%" in err      # tqdm's bar
    ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(progress=False),
                   dtype=torch.float64)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("kind", ["module", "closure"])
def test_modules_and_closures_calibrate_in_their_dtype(model_dtype, kind):
    net = Net().to(model_dtype)
    model = net if kind == "module" else (lambda x, t: net(x, t))
    den = ts.Denoiser(model, "edm", prediction="x0", time="sigma")
    kw = {"dtype": torch.float64} if kind == "closure" and model_dtype == torch.float64 else {}
    opts = ts.CalibrationOptions(progress=False, cost="low")
    if kind == "closure" and model_dtype == torch.float16:
        with pytest.raises(TypeError, match="dtype="):       # a half closure gets float32 inputs
            ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), options=opts)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the closure's "calibrating in float32" note
        cfg = ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), options=opts, **kw)
    want = torch.float64 if model_dtype == torch.float64 else torch.float32
    assert cfg.calibrated_for["dtype"] == str(want).replace("torch.", "")
    assert cfg.pilot["ref_noise"].dtype == want and cfg.calibrated_for["device"] == "cpu"
    assert (cfg.calibrated_for["model"] is None) == (kind == "closure")


def test_a_float64_closure_without_dtype_fails_with_an_error_naming_dtype():
    net = Net().double()
    den = ts.Denoiser(lambda x, t: net(x, t), "edm", prediction="x0", time="sigma")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match=r"dtype=torch\.float64"):
            ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(progress=False))
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        ts.thermo_grid(den, 10, solver="auto", sample_shape=(6,), dtype=torch.float16)


def test_a_closure_is_said_once_to_run_in_the_default_dtype(monkeypatch):
    monkeypatch.setattr(calibrate, "_SAID_CLOSURE", [])
    den = ts.Denoiser(mixture_model(), "edm", prediction="x0", time="t")
    with pytest.warns(UserWarning, match="default dtype"):
        ts.thermo_grid(den, 6, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.thermo_grid(den, 6, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(progress=False))


def test_a_closure_given_its_dtype_is_not_told_about_the_default_dtype(monkeypatch):
    """dtype= fixes the calibration's dtype: no warning that it runs in torch's default one."""
    monkeypatch.setattr(calibrate, "_SAID_CLOSURE", [])
    den = ts.Denoiser(mixture_model(), "edm", prediction="x0", time="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate.reference(den, (8, 6), ref_steps=8, dtype=torch.float64)
        ts.thermo_grid(den, 6, solver="auto", sample_shape=(6,), dtype=torch.float32,
                       options=ts.CalibrationOptions(progress=False))


def test_a_config_warns_once_when_run_with_what_it_was_not_calibrated_for():
    net = Net()
    den = ts.Denoiser(net, "edm", prediction="x0", time="sigma")
    cfg = ts.thermo_grid(den, 8, solver="auto", sample_shape=(6,), options=ts.CalibrationOptions(progress=False,
                                                                                                    cost="low"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.sample(den, (4, 6), grid=cfg, seed=0)                       # what it was made for: silent
    other_solver = "euler" if cfg.solver != "euler" else "heun"
    cases = [("solver", lambda: ts.sample(den, (4, 6), grid=cfg, seed=0, solver=other_solver)),
             ("schedule", lambda: ts.sample(ts.Denoiser(net, ts.schedules.EDM(t_max=100.0), prediction="x0",
                                                        time="sigma"), (4, 6), grid=cfg)),   # holds cfg's sigmas
             ("prediction", lambda: ts.sample(ts.Denoiser(net, "edm", prediction="eps", time="sigma"), (4, 6),
                                              grid=cfg)),
             ("sample_shape", lambda: ts.sample(ts.Denoiser(lambda x, t: x, "edm", prediction="x0", time="sigma"),
                                                (4, 3), grid=cfg))]
    for field, run in cases:
        with pytest.warns(UserWarning, match=f"calibrated for {field}"):
            run()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                run()                                                  # once per config and field
            except UserWarning as w:
                assert f"calibrated for {field}" not in str(w)
    fresh = ts.SamplerConfig.from_dict(cfg.to_dict())                 # a config not warned about yet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.sample(den, (4, 6), grid=fresh, seed=0)
    with torch.no_grad():
        net.f[0].weight.add_(0.5)                                      # the same module, retrained
    with pytest.warns(UserWarning, match="calibrated for model"):
        ts.sample(den, (4, 6), grid=fresh, seed=0)


def test_cli_sample_runs_the_config_s_solver_and_says_which(tmp_path, capsys):
    from thermosample.apps import cli
    path = tmp_path / "cfg.json"
    assert cli.main(["schedule", "--model", "thermosample.toy:toy_factory", "--solver", "auto", "--steps", "8",
                     "--cost", "low", "--save", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["format"] == auto.CONFIG_FORMAT
    capsys.readouterr()
    assert cli.main(["sample", "--model", "thermosample.toy:toy_factory", "--n", "4", "--batch", "4", "--out",
                     str(tmp_path / "out"), "--grid", str(path)]) == 0
    assert f"solver {saved['solver']} (from the config" in capsys.readouterr().out


def test_auto_reuses_a_larger_pilot_it_is_given_and_an_explicit_budget_names_it():
    """pilot_data with a reference fixes the pilot's batch: solver="auto" with the default cost reuses a
    "thorough" pilot of 64 samples (as bench_quality does for its recommended row), running its plan on all 64
    (the reference is paid for); with a budget given explicitly that its runs exceed, the error names the
    pilot's size and the way out (before, both failed with "a pilot of 8 samples needs ...")."""
    den = ts.Denoiser(mixture_model(), "edm", prediction="x0", time="t")
    kw = dict(sample_shape=(6,), dtype=torch.float64)
    big = ts.thermo_grid(den, 6, solver="dpmpp_2m", **kw,
                         options=ts.CalibrationOptions(cost="thorough", pilot_batch=64, ref_steps=32, progress=False))
    plan = calibrate._Plan.of(6, "auto", None, None, None)
    sized = calibrate._sized(ts.CalibrationOptions(), plan, big.pilot)
    assert sized.pilot_batch == 64
    cfg = ts.thermo_grid(den, 6, solver="auto", pilot_data=big.pilot, **kw,
                         options=ts.CalibrationOptions(progress=False))
    assert cfg.pilot["ref_final"].shape[0] == 64
    assert 4 * 6 * 64 <= cfg.meta["calibration_rows"] <= plan.rows(sized, big.pilot)   # at least the four runs
    with pytest.raises(ValueError, match="holds a reference of 64 samples"):
        ts.thermo_grid(den, 6, solver="auto", pilot_data=big.pilot, **kw,
                       options=ts.CalibrationOptions(cost=600, progress=False))
