"""The backend table (ops.BACKENDS) is what dispatch, the CLI and the benchmarks read, and a broken
Triton kernel module surfaces with its own error instead of a quiet fall-back to torch."""
import dataclasses
import sys
import warnings

import pytest
import torch

from thermosample import ops
from thermosample.errors import BackendUnavailableWarning
from thermosample.ops import triton as triton_loader


def test_auto_and_choices_come_from_the_table():
    assert ops.BACKEND_CHOICES == ("auto",) + tuple(ops.BACKENDS)
    assert set(ops.BACKENDS) >= {"torch", "cpp", "triton"}
    for device_type, name in ops.AUTO.items():
        assert name in ops.BACKENDS and device_type in ops.BACKENDS[name].devices
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        ops.resolve_backend("triton", torch.device("cpu"))


def test_a_new_backend_is_one_table_row(monkeypatch):
    """Adding a backend touches the table and its implementation only: dispatch picks it up."""
    calls = []

    def doubled_reference(args):
        calls.append(len(args.inputs))
        return ops.reference.launch(args)

    monkeypatch.setitem(ops.BACKENDS, "mine", ops.Backend("mine", ("cpu",), lambda: True, lambda: doubled_reference))
    monkeypatch.setattr(ops, "BACKEND_CHOICES", ops.BACKEND_CHOICES + ("mine",))
    ops.implementation.cache_clear()
    x, d = torch.randn(3, 5), torch.randn(3, 5)
    out, rate = ops.fused_step([x, d], [0.5, 0.5], backend="mine", track=True, alpha=1.0, beta=-1.0)
    ref, ref_rate = ops.reference.fused_step_reference([x, d], [0.5, 0.5], track=True, alpha=1.0, beta=-1.0)
    assert calls == [2] and torch.equal(out, ref) and torch.equal(rate, ref_rate)
    ops.implementation.cache_clear()


def test_unavailable_backend_falls_back_with_one_warning(monkeypatch):
    row = dataclasses.replace(ops.BACKENDS["cpp"], available=lambda: False, missing="cpp test: not built")
    monkeypatch.setitem(ops.BACKENDS, "cpp", row)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert ops.resolve_backend("cpp", torch.device("cpu")) == "torch"
    assert [str(w.message) for w in seen if w.category is BackendUnavailableWarning] == ["cpp test: not built"]


def test_missing_triton_package_means_unavailable(monkeypatch):
    triton_loader.installed.cache_clear()
    monkeypatch.setitem(sys.modules, "triton", None)        # `import triton` -> ModuleNotFoundError
    try:
        assert triton_loader.installed() is False
    finally:
        triton_loader.installed.cache_clear()


def test_broken_kernel_module_raises_its_own_error(monkeypatch):
    """Anything but a missing triton package is a bug in the kernel module: surfaced, not swallowed."""
    pytest.importorskip("triton", reason="triton is not installed")
    triton_loader.installed.cache_clear()

    def broken():
        raise NameError("name 'tl_typo' is not defined")

    monkeypatch.setattr(triton_loader, "launcher", broken)
    try:
        with pytest.raises(NameError, match="tl_typo"):
            triton_loader.installed()
    finally:
        triton_loader.installed.cache_clear()


def test_the_loader_imports_the_packaged_kernel():
    pytest.importorskip("triton", reason="triton is not installed")
    from thermosample.kernels import fused_step as kernel_module
    assert triton_loader.launcher() is kernel_module.launch
