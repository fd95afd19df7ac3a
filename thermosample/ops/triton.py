"""Loads the Triton launcher (kernels/fused_step.py, installed as thermosample.kernels) once, lazily.

Only a missing `triton` package counts as "not available" (the backend then falls back to torch with one
warning). Any other failure while importing the kernel module is a bug in it and is raised with its real
message instead of being hidden behind a quiet fall-back on a GPU.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def installed() -> bool:
    """True when the `triton` package imports; a broken kernel module raises (not swallowed)."""
    try:
        import triton  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "triton" and not (exc.name or "").startswith("triton."):
            raise
        return False
    launcher()  # import the kernel module the way dispatch does: its own errors surface here
    return True


def available() -> bool:
    """True when Triton is installed and a CUDA device is present."""
    return torch.cuda.is_available() and installed()


def launcher():
    """The Triton `launch(StepArgs)` of kernels/fused_step.py."""
    from ..kernels import fused_step as triton_fused_step
    return triton_fused_step.launch
