"""Bad input across the public API: every case raises ValueError or TypeError naming the argument, before
any kernel runs (the fused op is instrumented to prove it for the sampler-level cases)."""
import math

import numpy as np
import pytest
import torch

import thermosample as ts
from thermosample import ops
from thermosample.toy import toy_factory


def den():
    return toy_factory(dim=2)


def S(**kw):
    args = dict(shape=(3, 2), steps=2, backend="torch", track=False)
    args.update(kw)
    return ts.sample(args.pop("den", None) or den(), **args)


def model_den(fn, **kw):
    return ts.Denoiser(fn, "condot", prediction="x0", **kw)


class NegativeT(ts.schedules.Schedule):
    """sigma_hat = (2 - t) decreases with t: T(t) < 0."""

    def m(self, t):
        return np.ones_like(np.asarray(t, dtype=np.float64))

    def s(self, t):
        return 2.0 - np.asarray(t, dtype=np.float64)


class NanSchedule(ts.schedules.Schedule):
    def m(self, t):
        return np.ones_like(np.asarray(t, dtype=np.float64))

    def s(self, t):
        t = np.asarray(t, dtype=np.float64)
        return np.where(t > 0.5, np.nan, t)


class MetaModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, device="meta"))

    def forward(self, x, t):
        return x


X = torch.randn(4, 3)
BUF = torch.randn(12)

# (id, callable, expected exception type, substring the message must contain)
CASES = [
    # --- ts.sample: arguments -----------------------------------------------------------------------
    ("shape-negative", lambda: S(shape=(3, -2)), ValueError, "shape"),
    ("shape-string", lambda: S(shape="3x2"), TypeError, "shape"),
    ("shape-empty", lambda: S(shape=()), ValueError, "shape"),
    ("shape-float", lambda: S(shape=(3, 2.0)), TypeError, "shape"),
    ("shape-and-noise", lambda: S(noise=torch.zeros(3, 2)), ValueError, "noise"),
    ("neither-shape-nor-noise", lambda: ts.sample(den(), steps=2), ValueError, "shape"),
    ("steps-zero", lambda: S(steps=0), ValueError, "steps"),
    ("steps-float", lambda: S(steps=2.5), TypeError, "steps"),
    ("seed-negative", lambda: S(seed=-1), ValueError, "seed"),
    ("seed-too-big", lambda: S(seed=2 ** 64), ValueError, "seed"),
    ("seed-float", lambda: S(seed=1.0), TypeError, "seed"),
    ("offset-negative", lambda: S(sample_offset=-1), ValueError, "sample_offset"),
    ("offset-overflow", lambda: S(sample_offset=2 ** 32 - 2), ValueError, "sample_offset"),
    ("backend-unknown", lambda: S(backend="cuda"), ValueError, "backend"),
    ("backend-triton-on-cpu", lambda: S(backend="triton"), ValueError, "triton"),
    ("dtype-int", lambda: S(dtype=torch.int32), TypeError, "dtype"),
    ("dtype-half-state", lambda: S(dtype=torch.float16), TypeError, "dtype"),
    ("device-unknown", lambda: S(device="warpdrive"), ValueError, "device"),
    ("device-meta", lambda: S(device="meta"), ValueError, "meta"),
    ("solver-unknown", lambda: S(solver="rk4"), ValueError, "solver"),
    ("solver-option-unknown", lambda: S(solver="euler", eta=1.0), TypeError, "eta"),
    ("churn-negative", lambda: S(solver="heun", churn=-1.0), ValueError, "churn"),
    ("eta-negative", lambda: S(solver="ddim", eta=-0.5), ValueError, "eta"),
    ("eta-nan", lambda: S(solver="ddim", eta=math.nan), ValueError, "eta"),
    ("s_noise-string", lambda: S(solver="euler_ancestral", s_noise="1"), TypeError, "s_noise"),
    ("check_every-zero", lambda: S(check_every=0), ValueError, "check_every"),
    ("check_every-bool", lambda: S(check_every=True), TypeError, "check_every"),
    ("callback-not-callable", lambda: S(callback=3), TypeError, "callback"),
    ("noise_sampler-not-callable", lambda: S(noise_sampler="z"), TypeError, "noise_sampler"),
    ("extra_args-list", lambda: S(extra_args=[1]), TypeError, "extra_args"),
    ("den-plain-function", lambda: ts.sample(lambda x, t: x, (2, 2)), TypeError, "den"),
    # --- grids ---------------------------------------------------------------------------------------
    ("grid-unknown-name", lambda: S(grid="cosine"), ValueError, "grid"),
    ("grid-nan", lambda: S(grid=[1.0, math.nan, 0.0]), ValueError, "non-finite"),
    ("grid-inf", lambda: S(grid=[math.inf, 1.0, 0.0]), ValueError, "non-finite"),
    ("grid-increasing", lambda: S(grid=[0.5, 1.0, 0.0]), ValueError, "decreasing"),
    ("grid-repeated", lambda: S(grid=[1.0, 1.0, 0.0]), ValueError, "decreasing"),
    ("grid-negative", lambda: S(grid=[1.0, 0.5, -0.1]), ValueError, "negative"),
    ("grid-2d", lambda: S(grid=torch.ones(2, 2)), ValueError, "1-D"),
    ("grid-single", lambda: S(grid=[1.0]), ValueError, "at least 2"),
    ("grid-strings", lambda: S(grid=["a", "b"]), TypeError, "grid"),
    ("grid-complex", lambda: S(grid=torch.tensor([2 + 1j, 1 + 0j, 0j])), TypeError, "real"),
    ("grid-bool", lambda: S(grid=True), TypeError, "grid"),
    ("grid-beyond-sigma_max", lambda: S(grid=[1e7, 1.0, 0.0]), ValueError, "range"),
    ("grid-all-zero-start", lambda: S(grid=[0.0, -1.0]), ValueError, "grid"),
    ("grid-steps-disagree", lambda: S(grid=[1.0, 0.5, 0.0], steps=5), ValueError, "steps=5"),
    ("grid-tensor-steps-disagree", lambda: S(grid=torch.tensor([1.0, 0.5, 0.0]), steps=1), ValueError, "steps=1"),
    # --- noise= (k-diffusion convention) ---------------------------------------------------------------
    ("noise-int", lambda: ts.sample(den(), noise=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "noise"),
    ("noise-complex", lambda: ts.sample(den(), noise=torch.zeros(3, 2, dtype=torch.complex64)), TypeError, "noise"),
    ("noise-0d", lambda: ts.sample(den(), noise=torch.tensor(1.0)), ValueError, "noise"),
    ("noise-empty", lambda: ts.sample(den(), noise=torch.zeros(0, 2)), ValueError, "noise"),
    ("noise-list", lambda: ts.sample(den(), noise=[[1.0, 2.0]]), TypeError, "noise"),
    ("noise-meta", lambda: ts.sample(den(), noise=torch.zeros(3, 2, device="meta")), ValueError, "meta"),
    ("device-mix-noise-vs-device", lambda: ts.sample(den(), noise=torch.zeros(3, 2), device="meta"),
     ValueError, "device"),
    ("device-mix-model-params", lambda: ts.sample(ts.Denoiser(MetaModel(), "condot"), noise=torch.ones(3, 2)),
     ValueError, "device"),
    # --- the model's output -------------------------------------------------------------------------
    ("model-wrong-shape", lambda: S(den=model_den(lambda x, t: x[:1])), ValueError, "shape"),
    ("model-int-dtype", lambda: S(den=model_den(lambda x, t: x.long())), TypeError, "dtype"),
    ("model-complex", lambda: S(den=model_den(lambda x, t: x.to(torch.complex64))), TypeError, "dtype"),
    ("model-numpy", lambda: S(den=model_den(lambda x, t: x.numpy())), TypeError, "torch.Tensor"),
    ("model-none", lambda: S(den=model_den(lambda x, t: None)), TypeError, "torch.Tensor"),
    ("model-dim-mismatch", lambda: S(shape=(3, 5)), ValueError, "dimension"),
    # --- Denoiser and schedules ------------------------------------------------------------------------
    ("denoiser-model-not-callable", lambda: ts.Denoiser(3, "condot"), TypeError, "model"),
    ("denoiser-prediction", lambda: ts.Denoiser(lambda x, t: x, "condot", prediction="noise"), ValueError, "prediction"),
    ("denoiser-time", lambda: ts.Denoiser(lambda x, t: x, "condot", time="step"), ValueError, "time"),
    ("denoiser-index-needs-discrete", lambda: ts.Denoiser(lambda x, t: x, "condot", time="index"), ValueError, "index"),
    ("denoiser-time_scale-nan", lambda: ts.Denoiser(lambda x, t: x, "condot", time_scale=math.nan), ValueError, "time_scale"),
    ("denoiser-model_kwargs-list", lambda: ts.Denoiser(lambda x, t: x, "condot", model_kwargs=[1]), TypeError, "model_kwargs"),
    ("schedule-unknown-name", lambda: ts.Denoiser(lambda x, t: x, "linear-ish"), ValueError, "schedule"),
    ("schedule-negative-temperature", lambda: ts.Denoiser(lambda x, t: x, NegativeT()), ValueError, "T(t)"),
    ("schedule-non-finite", lambda: ts.Denoiser(lambda x, t: x, NanSchedule()), ValueError, "finite"),
    ("schedule-t_min-above-t_max", lambda: ts.schedules.CondOT(t_min=0.9, t_max=0.1), ValueError, "t_min"),
    ("discretevp-increasing", lambda: ts.schedules.DiscreteVP(torch.tensor([0.5, 0.9])), ValueError, "alphas_cumprod"),
    ("denoiser-sigma-zero", lambda: den()(torch.zeros(2, 2), 0.0), ValueError, "sigma"),
    # --- the fused op (the C++ / Triton boundary) ------------------------------------------------------
    ("op-inputs-tensor", lambda: ops.fused_step(X, [1.0]), TypeError, "inputs"),
    ("op-inputs-empty", lambda: ops.fused_step([], []), ValueError, "inputs"),
    ("op-too-many-inputs", lambda: ops.fused_step([X] * 7, [1.0] * 7), ValueError, "inputs"),
    ("op-int-input", lambda: ops.fused_step([X.long()], [1.0]), TypeError, "dtype"),
    ("op-mixed-dtype", lambda: ops.fused_step([X, X.double()], [1.0, 1.0]), ValueError, "inputs[1]"),
    ("op-shape-mismatch", lambda: ops.fused_step([X, X[:2]], [1.0, 1.0]), ValueError, "inputs[1]"),
    ("op-device-mix", lambda: ops.fused_step([X, torch.zeros(4, 3, device="meta")], [1.0, 1.0]), ValueError, "inputs[1]"),
    ("op-meta", lambda: ops.fused_step([torch.zeros(4, 3, device="meta")], [1.0]), ValueError, "meta"),
    ("op-sparse", lambda: ops.fused_step([X.to_sparse()], [1.0]), TypeError, "layout"),
    ("op-coeffs-none", lambda: ops.fused_step([X], None), TypeError, "coeffs"),
    ("op-coeffs-length", lambda: ops.fused_step([X], [1.0, 2.0]), ValueError, "coeffs"),
    ("op-coeff-nan", lambda: ops.fused_step([X], [math.nan]), TypeError, "finite"),
    ("op-coeff-tensor", lambda: ops.fused_step([X], [torch.tensor(1.0)]), TypeError, "Python floats"),
    ("op-noise-inf", lambda: ops.fused_step([X], [1.0], noise=math.inf), TypeError, "finite"),
    ("op-alpha-nan", lambda: ops.fused_step([X, X], [1.0, 1.0], track=True, alpha=math.nan), TypeError, "finite"),
    ("op-step-negative", lambda: ops.fused_step([X], [1.0], step=-1), ValueError, "step"),
    ("op-step-overflow", lambda: ops.fused_step([X], [1.0], step=2 ** 32), ValueError, "step"),
    ("op-u-out-of-range", lambda: ops.fused_step([X, X], [1.0, 1.0], track=True, u=0, d=2), ValueError, "u and d"),
    ("op-u-bool", lambda: ops.fused_step([X, X], [1.0, 1.0], track=True, u=True, d=False), ValueError, "u and d"),
    ("op-batch-zero", lambda: ops.fused_step([torch.zeros(0, 3)], [1.0]), ValueError, "B >= 1"),
    ("op-0d", lambda: ops.fused_step([torch.tensor(1.0)], [1.0]), ValueError, "[B, ...]"),
    ("op-out-wrong-dtype", lambda: ops.fused_step([X], [1.0], out=torch.zeros(4, 3, dtype=torch.float64)), ValueError, "out"),
    ("op-out-wrong-shape", lambda: ops.fused_step([X], [1.0], out=torch.zeros(3, 4)), ValueError, "out"),
    ("op-out-non-contiguous", lambda: ops.fused_step([X], [1.0], out=torch.zeros(3, 4).t()), ValueError, "contiguous"),
    ("op-out-expanded", lambda: ops.fused_step([X], [1.0], out=torch.zeros(1, 3).expand(4, 3)), ValueError, "contiguous"),
    ("op-out-partial-overlap", lambda: ops.fused_step([BUF[:6].view(2, 3)], [1.0], out=BUF[2:8].view(2, 3)),
     ValueError, "overlap"),
    ("op-out-list", lambda: ops.fused_step([X], [1.0], out=[0.0]), TypeError, "out"),
    ("op-backend-unknown", lambda: ops.fused_step([X], [1.0], backend="gpu"), ValueError, "backend"),
    # --- bulk / CLI ----------------------------------------------------------------------------------
    ("bulk-n-zero", lambda: ts.bulk.sample_to_disk("thermosample.toy:toy_factory", 0, 4, "/nonexistent/x"),
     ValueError, "n must"),
    ("bulk-bad-spec", lambda: ts.bulk.sample_to_disk("no_colon", 4, 4, "/nonexistent/x"), ValueError, "MODULE:FACTORY"),
    ("bulk-missing-module", lambda: ts.bulk.sample_to_disk("no_such_mod_xyz:f", 4, 4, "/nonexistent/x"),
     ValueError, "no_such_mod_xyz"),
    ("bulk-denoiser-without-id", lambda: ts.bulk.sample_to_disk(den(), 4, 4, "/nonexistent/x"), ValueError, "model_id"),
    ("bulk-weights-missing", lambda: ts.bulk.load_weights("/nonexistent/w.safetensors"), ValueError, "weights"),
    ("distributed-shard_range", lambda: ts.distributed.shard_range(4, 2, 2), ValueError, "rank"),
]


def test_there_are_at_least_30_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.fixture
def no_kernel(monkeypatch):
    """Fail the test if a sampler-level bad input reached a backend kernel."""
    from thermosample import ops
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise AssertionError("a kernel ran before the bad input was rejected")
    monkeypatch.setattr(ops, "implementation", lambda name: boom)   # every backend goes through it
    return calls


# Cases whose bad value only shows after the model has run (its output), or that never reach a kernel
# because they fail in the model: the sampler draws the initial noise with the op first.
_AFTER_FIRST_KERNEL = {"model-wrong-shape", "model-int-dtype", "model-complex", "model-numpy", "model-none",
                       "model-dim-mismatch"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(case, request):
    name, fn, exc_type, needle = case
    if name not in _AFTER_FIRST_KERNEL:
        request.getfixturevalue("no_kernel")
    with pytest.raises(exc_type) as info:
        fn()
    assert needle in str(info.value), f"message does not name {needle!r}: {info.value}"


def test_model_output_checked_before_the_update_kernel(monkeypatch):
    """A model returning the wrong shape is caught before any solver update is launched."""
    from thermosample import sampler
    updates = []
    real = sampler.ops.fused_step

    def counting(inputs, coeffs, **kw):
        if kw.get("step") != sampler.INIT_NOISE_STEP:
            updates.append(1)
        return real(inputs, coeffs, **kw)
    monkeypatch.setattr(sampler.ops, "fused_step", counting)
    with pytest.raises(ValueError):
        S(den=model_den(lambda x, t: x[:, :1]))
    assert updates == []


def test_valid_edge_inputs_still_work():
    """The checks do not reject legal inputs: explicit grid ending at sigma_min, non-contiguous noise,
    a half-precision model output (computed in float32), numpy ints in the shape."""
    d = den()
    sch = d.schedule
    out = ts.sample(d, noise=torch.randn(2, 3).t() * sch.sigma_max, grid=[sch.sigma_max, 1.0, sch.sigma_min],
                    backend="torch")
    assert out.samples.shape == (3, 2) and torch.isfinite(out.samples).all()
    out = S(den=model_den(lambda x, t: (0.5 * x).half()), shape=(np.int64(2), 2))
    assert out.samples.dtype == torch.float32 and torch.isfinite(out.samples).all()
    # an explicit grid sets the step count: steps omitted, or equal to it (also a ThermoGrid), is fine
    grid = [1.0, 0.5, 0.2, 0.0]
    for kw in ({}, {"steps": 3}, {"steps": np.int64(3)}):
        assert S(grid=grid, **{"steps": None, **kw}).nfe == 3
    assert S(grid=ts.calibrate.ThermoGrid(np.array(grid)), steps=3).nfe == 3


def test_cli_sample_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    from thermosample.apps import cli
    rc = cli.main(["sample", "--model", "nope", "--n", "4", "--batch", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "MODULE:FACTORY" in err and "Traceback" not in err
