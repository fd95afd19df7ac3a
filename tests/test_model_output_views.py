"""Issue 35, item 3: a model that returns views of a buffer it keeps (`buf[:B]`, `buf.view(...)`, halves
of one buffer in turn) must give the samples of a model that returns new tensors. The run detects such a
model by storage and memory overlap (ops.contract.shares_memory), not by object identity.

The detection lives in Run._own (thermosample/run.py)."""
import os
import sys

import pytest
import torch

import thermosample as ts
from thermosample.ops.contract import shares_memory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_cases  # noqa: E402


class BufferModel:
    """den's D, written into a buffer the model keeps and returned as a view of it (`mode`)."""

    def __init__(self, den, mode):
        self.den, self.schedule, self.mode, self.calls = den, den.schedule, mode, 0
        self.buf = torch.empty(16, 7)

    def __call__(self, x, sigma, **kwargs):
        d, b = self.den(x, sigma, **kwargs), x.shape[0]
        self.calls += 1
        if self.mode == "slice":
            return self.buf[:b].copy_(d)
        if self.mode == "view":
            flat = self.buf.view(-1)[:d.numel()]
            return flat.copy_(d.reshape(-1)).view(d.shape)
        if self.mode == "numpy":           # the same memory through a new storage object each call
            return torch.from_numpy(self.buf.numpy()[:b]).copy_(d)
        half = 8 * (self.calls % 2)        # "halves": two buffers in turn, one storage
        return self.buf[half:half + b].copy_(d)


MULTISTEP = ["dpmpp_2m", "dpmpp_3m", "unipc", "deis", "ipndm"]


@pytest.mark.parametrize("solver,mode", [(s, m) for s in MULTISTEP for m in ("slice", "view", "numpy", "halves")
                                         if (s, m) != ("dpmpp_2m", "halves")])   # 2m holds one D: halves suffice
def test_a_model_returning_views_of_its_buffer_gives_the_same_samples(solver, mode):
    den = golden_cases.mixture().denoiser("vp")
    want = ts.sample(den, (5, 7), steps=10, solver=solver, seed=1, backend="torch").samples
    got = ts.sample(BufferModel(den, mode), (5, 7), steps=10, solver=solver, seed=1, backend="torch").samples
    assert torch.equal(got, want)


def test_shares_memory_is_storage_and_address_overlap():
    buf = torch.zeros(16, 7)
    assert shares_memory(buf[:5], buf[:5]) and shares_memory(buf[:5], buf.view(-1)[:35].view(5, 7))
    assert shares_memory(buf[:5], buf[8:13])                     # one storage, elements apart: halves in turn
    assert shares_memory(buf[:5], torch.from_numpy(buf.numpy()[2:7]))   # another storage object, same memory
    assert not shares_memory(buf[:5], buf[:5].clone())
    assert not shares_memory(torch.zeros(3), torch.zeros(3))
