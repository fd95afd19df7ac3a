"""A whole 20-step sampling run gives the same samples and ThermoReport on every backend.

The triton backend runs under TRITON_INTERPRET=1 on CPU tensors here (conftest), so dispatch is pointed
at it explicitly; on a CUDA machine the same test runs the compiled kernels on the GPU.
"""
import dataclasses

import pytest
import torch

import thermosample as ts
from thermosample import ops

MIX = ts.toy.GaussianMixture(torch.tensor([[1.0, -2.0, 0.5, 0.0, 1.5, -1.0, 0.3],
                                           [-1.5, 1.0, -0.5, 2.0, 0.0, 0.7, -0.2]]), [0.3, 0.5])
SOLVERS = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("euler_ancestral", {}), ("heun", {"churn": 5.0})]


def run(backend, solver, options, device="cpu"):
    return ts.sample(MIX.denoiser("vp"), (6, 7), steps=20, solver=solver, grid="karras", seed=11,
                     sample_offset=3, backend=backend, device=device, **options)


@pytest.fixture
def triton_on_this_device(monkeypatch):
    """Let backend='triton' dispatch to the (interpreted, on CPU) Triton launcher."""
    if torch.cuda.is_available():
        return "cuda"
    pytest.importorskip("triton", reason="triton is not installed")
    # The backend table row says where Triton runs; under TRITON_INTERPRET=1 it runs on CPU tensors too.
    row = dataclasses.replace(ops.BACKENDS["triton"], devices=None, available=lambda: True)
    monkeypatch.setitem(ops.BACKENDS, "triton", row)
    return "cpu"


def assert_same_run(a, b):
    torch.testing.assert_close(a.samples.cpu(), b.samples.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.thermo.rate.cpu(), b.thermo.rate.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.thermo.kinetic.cpu(), b.thermo.kinetic.cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(a.thermo.t, b.thermo.t)


@pytest.mark.parametrize("solver,options", SOLVERS)
def test_cpp_matches_torch(solver, options):
    assert ops.cpp_available(), "thermosample._C is not built (pip install -e . builds it)"
    assert_same_run(run("cpp", solver, options), run("torch", solver, options))


@pytest.mark.parametrize("solver,options", SOLVERS)
def test_triton_matches_torch(solver, options, triton_on_this_device):
    device = triton_on_this_device
    assert_same_run(run("triton", solver, options, device), run("torch", solver, options))
