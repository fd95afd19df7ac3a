"""A fixed set of runs through every public entry point, recorded before the restructuring of issue 11
and compared by tests/test_golden.py, so that moving code around cannot change what users get.

    python tests/golden_cases.py --write      # re-record tests/data/golden.pt (only for an intended change)

Each case returns a flat dict of tensors (samples, per-evaluation rates, kinetic, entropy, displacement).
Sizes are small: the whole set runs in a few seconds on CPU.
"""
from __future__ import annotations

import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "data", "golden.pt")

SOLVER_CASES = [("euler", "karras", {}), ("euler", "logsnr", {"churn": 3.0}), ("heun", "karras", {}),
                ("heun", "uniform", {"churn": 5.0, "s_tmin": 0.05, "s_tmax": 10.0}), ("dpmpp_2m", "logsnr", {}),
                ("dpmpp_2m", "kl_optimal", {}), ("ddim", "uniform", {"eta": 0.5}),
                ("euler_ancestral", "karras", {}), ("euler_maruyama", "logsnr", {})]


def _report(prefix, rep, out):
    if rep is None:
        return
    out[f"{prefix}/t"] = rep.t.clone()
    out[f"{prefix}/rate"] = rep.rate.clone()
    out[f"{prefix}/kinetic"] = rep.kinetic.clone()
    out[f"{prefix}/entropy"] = rep.entropy.clone()
    if rep.displacement is not None:
        out[f"{prefix}/displacement"] = rep.displacement.clone()


def mixture():
    import thermosample as ts
    return ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.5, -1.0, 0.3],
                                                [-1.5, 1.0, -0.5, 2.0, 0.0, 0.7, -0.2]]), [0.3, 0.5])


def sample_cases(backends=("torch", "cpp")) -> dict:
    import thermosample as ts
    mix = mixture()
    out = {}
    for backend in backends:
        for solver, grid, options in SOLVER_CASES:
            key = f"sample/{backend}/{solver}/{grid}/{'-'.join(f'{k}{v}' for k, v in options.items())}"
            res = ts.sample(mix.denoiser("vp"), (5, 7), steps=9, solver=solver, grid=grid, seed=7, sample_offset=2,
                            backend=backend, **options)
            out[f"{key}/samples"] = res.samples.clone()
            out[f"{key}/nfe"] = torch.tensor(res.nfe)
            _report(key, res.thermo, out)
        noise = torch.randn(3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80.0
        res = ts.sample(mix.denoiser("edm"), noise=noise, grid=[80.0, 20.0, 5.0, 1.0, 0.2, 0.0], solver="dpmpp_2m",
                        backend=backend)
        out[f"sample/{backend}/noise_f64/samples"] = res.samples.clone()
        _report(f"sample/{backend}/noise_f64", res.thermo, out)
    return out


def k_diffusion_cases() -> dict:
    from thermosample.integrations import k_diffusion as K
    mu = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))

    def model(x, sigma, shift=0.0):
        s = sigma.view(-1, 1, 1)
        return (x + 0.5 * s ** 2 * (mu + shift)) / (1 + 0.5 * s ** 2) + 0.1 * torch.tanh(x)

    sigmas = K.get_sigmas_karras(8, 0.03, 20.0)
    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)) * 20.0
    out = {}
    runs = {"euler": (K.sample_euler, {}), "euler_churn": (K.sample_euler, {"s_churn": 2.0}),
            "euler_ancestral": (K.sample_euler_ancestral, {}), "heun": (K.sample_heun, {}),
            "dpm_2": (K.sample_dpm_2, {}), "dpm_2_churn": (K.sample_dpm_2, {"s_churn": 2.0}),
            "lms": (K.sample_lms, {}), "dpmpp_2m": (K.sample_dpmpp_2m, {}),
            "dpmpp_2m_sde": (K.sample_dpmpp_2m_sde, {}), "dpmpp_2m_sde_heun": (K.sample_dpmpp_2m_sde,
                                                                               {"solver_type": "heun"})}
    for name, (fn, kw) in runs.items():
        for backend in ("torch", "cpp"):
            thermo = {}
            x = fn(model, x0.clone(), sigmas, extra_args={"shift": 0.1}, disable=True, thermo=thermo, seed=5,
                   backend=backend, **kw)
            out[f"kdiff/{backend}/{name}/samples"] = x.clone()
            _report(f"kdiff/{backend}/{name}", thermo["report"], out)
    gen = torch.Generator().manual_seed(9)
    sampler = lambda a, b: torch.randn(2, 3, 4, generator=gen)  # noqa: E731
    x = K.sample_euler_ancestral(model, x0.clone(), sigmas, disable=True, noise_sampler=sampler, seed=5,
                                 backend="torch")
    out["kdiff/torch/euler_ancestral_sampler/samples"] = x.clone()
    return out


def diffusers_cases() -> dict:
    import diffusers
    from diffusers import DDPMScheduler

    from thermosample.integrations import diffusers as TD
    base = dict(DDPMScheduler(num_train_timesteps=1000).config)

    def model(x, t):
        return 0.3 * torch.tanh(x) + 0.01 * float(t) / 1000.0 * x

    out = {}
    cases = {"euler": ("ThermoEulerDiscreteScheduler", {}),
             "euler_v": ("ThermoEulerDiscreteScheduler", {"prediction_type": "v_prediction", "use_karras_sigmas": True}),
             "euler_a": ("ThermoEulerAncestralDiscreteScheduler", {}),
             "heun": ("ThermoHeunDiscreteScheduler", {}),
             "heun_v": ("ThermoHeunDiscreteScheduler", {"timestep_spacing": "trailing",
                                                        "prediction_type": "v_prediction"}),
             "dpmpp_2m": ("ThermoDPMSolverMultistepScheduler", {}),
             "dpmpp_2m_sde": ("ThermoDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
             "dpmpp_2m_v": ("ThermoDPMSolverMultistepScheduler", {"prediction_type": "v_prediction",
                                                                  "use_karras_sigmas": True,
                                                                  "final_sigmas_type": "sigma_min"})}
    for name, (cls, extra) in cases.items():
        for use_generator in (True, False):
            sch = getattr(TD, cls).from_config(dict(base, **extra))
            sch.backend = "torch"
            torch.manual_seed(4)
            g = torch.Generator().manual_seed(0)
            sch.set_timesteps(7)
            x = torch.randn(2, 3, 4, 4, generator=g) * sch.init_noise_sigma
            kw = {} if isinstance(sch, diffusers.HeunDiscreteScheduler) or not use_generator else {"generator": g}
            for t in sch.timesteps:
                x = sch.step(model(sch.scale_model_input(x, t), t), t, x, **kw).prev_sample
            key = f"diffusers/{name}/{'gen' if use_generator else 'philox'}"
            out[f"{key}/samples"] = x.clone()
            _report(key, sch.thermo, out)
    flow = TD.ThermoFlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.backend = "torch"
    flow.set_timesteps(6)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for t in flow.timesteps:
        x = flow.step(model(x, t), t, x).prev_sample
    out["diffusers/flow/samples"] = x.clone()
    _report("diffusers/flow", flow.thermo, out)
    return out


def calibrate_cases() -> dict:
    import thermosample as ts
    mix = mixture()
    out = {}
    for solver, steps in (("dpmpp_2m", 8), ("euler", 10), ("heun", 6)):
        grid = ts.thermo_grid(mix.denoiser("condot"), steps, solver=solver, sample_shape=(7,), backend="torch",
                              method="error", options=ts.CalibrationOptions(pilot_batch=16))
        out[f"calibrate/{solver}/{steps}"] = torch.as_tensor(grid.copy())
    grid = ts.thermo_grid(mix.denoiser("vp"), 8, solver="dpmpp_2m", sample_shape=(7,), backend="torch",
                          options=ts.CalibrationOptions(pilot_batch=16, ref_steps=32))
    out["calibrate/select/dpmpp_2m/8"] = torch.as_tensor(grid.copy())
    return out


def _auto_config(den, steps):
    """(sigmas, solver, options, meta) of thermo_grid(solver="auto") on a small pilot."""
    import thermosample as ts
    config = ts.thermo_grid(den, steps, solver="auto", sample_shape=(den_dim(den),), backend="torch",
                            options=ts.CalibrationOptions(pilot_batch=32, ref_steps=32))
    return [float(s) for s in config.sigmas], config.solver, config.options, config.meta


def den_dim(den) -> int:
    return int(den.mixture.dim) if hasattr(den, "mixture") else 7


def auto_cases() -> dict:
    """solver="auto" on every band of its plan: the chosen configuration (solver and options), the sigmas,
    the measured errors and the cost, and the samples it then draws."""
    import json

    import thermosample as ts
    out = {}
    sharp = ts.toy.GaussianMixture(torch.tensor([[2.0, -1.0, 0.0, 0.5, -2.0], [-2.0, 1.5, 0.3, -0.5, 1.0],
                                                 [0.0, 0.0, 2.5, 0.0, 0.0]]), 0.05, [0.2, 0.5, 0.3])
    for name, mix, schedule in (("vp", mixture(), "vp"), ("edm", sharp, "edm")):
        den = mix.denoiser(schedule)
        den.mixture = mix
        for steps in (6, 10, 13, 16, 24):
            sigmas, solver, options, meta = _auto_config(den, steps)
            key = f"auto/{name}/{steps}"
            label = json.dumps([solver, sorted(options)])     # the values as numbers: floats may round per machine
            out[f"{key}/choice"] = torch.tensor(list(label.encode()), dtype=torch.uint8)
            values = [options[k] for k in sorted(options)]
            values = [float(v) for o in values for v in ([x for row in o for x in row] if isinstance(o, list) else [o])]
            out[f"{key}/options"] = torch.tensor(values, dtype=torch.float64)
            out[f"{key}/sigmas"] = torch.tensor(sigmas, dtype=torch.float64)
            errs = {f"{part}/{k}": v for part in ("candidate_errors", "compared_errors", "check_errors",
                                                  "default_errors", "noise_below_errors", "fit_errors")
                    for k, v in sorted((meta.get(part) or {}).items())}
            out[f"{key}/errors"] = torch.tensor([float(v) for v in errs.values()], dtype=torch.float64)
            out[f"{key}/error_labels"] = torch.tensor(list(json.dumps(list(errs)).encode()), dtype=torch.uint8)
            out[f"{key}/cost"] = torch.tensor([int(meta["calibration_nfe"]), int(meta["shared_outliers"])])
            res = ts.sample(den, (6, den_dim(den)), solver=solver, grid=sigmas, seed=3, backend="torch", **options)
            out[f"{key}/samples"] = res.samples.clone()
    return out


def all_cases() -> dict:
    out = {}
    for fn in (sample_cases, k_diffusion_cases, diffusers_cases, calibrate_cases, auto_cases):
        out.update(fn())
    return out


def machine() -> str:
    """Where bit-identity is expected: the same CPU vector ISA and torch version as the recording."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    isa = "avx512f" if " avx512f" in flags else ("avx2" if " avx2" in flags else "other")
    return f"{platform.machine()}-{isa}-torch{torch.__version__}"


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/golden_cases.py --write")
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    torch.set_num_threads(1)
    cases = all_cases()
    torch.save({"machine": machine(), "cases": cases}, GOLDEN)
    print(f"wrote {len(cases)} tensors to {GOLDEN} ({machine()})")
