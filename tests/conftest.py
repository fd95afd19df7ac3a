"""Shared test set-up: Triton runs interpreted on machines without a GPU; outputs start as NaN."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton.jit decorates any kernel (kernels are imported lazily, after this).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer poisoned with NaN, so an unwritten element cannot pass a comparison."""
    return torch.full_like(t, float("nan"))


@pytest.fixture
def poisoned():
    return nan_like


@pytest.fixture
def rig_pilot_errors(monkeypatch):
    """rig(factor) replaces calibrate.pilot_errors by the real one with each run's error times
    factor(solver, options) (its per-sample squared errors times the square), for the rest of the test, and
    returns the list of (solver, samples) of every run so far, in order. Each rig wraps the real function."""
    from thermosample import calibrate
    real, runs = calibrate.pilot_errors, []

    def rig(factor):
        def scaled(den, sigmas, solver, ref, backend="auto", solver_options=None):
            err, sq = real(den, sigmas, solver, ref, backend, solver_options)
            runs.append((solver, len(sq)))
            f = factor(solver, dict(solver_options or {}))
            return f * err, f * f * sq

        monkeypatch.setattr(calibrate, "pilot_errors", scaled)
        return runs
    return rig


@pytest.fixture(scope="module")
def unet():
    """A tiny randomly initialised diffusers UNet2DModel (offline), seeded the same in every module."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
