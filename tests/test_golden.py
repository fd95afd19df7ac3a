"""Every public entry point gives the same numbers as the recording in tests/data/golden.pt (made before
the restructuring of issue 11 with tests/golden_cases.py): bit for bit on the machine kind it was recorded
on (same CPU vector ISA and torch), within float32 rounding elsewhere."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_cases  # noqa: E402

GOLDEN = torch.load(golden_cases.GOLDEN, weights_only=True)
SAME_MACHINE = GOLDEN["machine"] == golden_cases.machine()


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("group", ["sample_cases", "k_diffusion_cases", "diffusers_cases", "calibrate_cases",
                                   "auto_cases"])
def test_outputs_match_the_recording(group, one_thread):
    if group == "k_diffusion_cases":
        pytest.importorskip("thermosample.integrations.k_diffusion")
    if group == "diffusers_cases":
        pytest.importorskip("diffusers")
    got = getattr(golden_cases, group)()
    prefix = got and next(iter(got)).split("/")[0]
    want = {k: v for k, v in GOLDEN["cases"].items() if k.split("/")[0] == prefix}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if SAME_MACHINE:
            assert torch.equal(got[key], value), f"{key} changed (max diff {(got[key] - value).abs().max()})"
        else:
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
