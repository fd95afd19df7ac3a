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
