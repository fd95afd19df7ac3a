"""Long runs keep memory flat: 1000 steps of a 1 MB state must not grow the process by one state per step
(issue 13: small per-step tensors kept alive between the freed states pinned the glibc heap), and the
model runs without autograd."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import thermosample as ts

SCRIPT = textwrap.dedent("""
    import sys, torch, thermosample as ts
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
    solver, backend = sys.argv[1], sys.argv[2]
    den = ts.toy.toy_factory(dim=32768)
    ts.sample(den, (8, 32768), steps=20, solver=solver, backend=backend)      # warm up allocator and caches
    before = rss_mb()
    out = ts.sample(den, (8, 32768), steps=1000, solver=solver, backend=backend)
    print(rss_mb() - before, out.thermo.rate.shape[0])
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS is read from /proc (Linux)")
@pytest.mark.parametrize("solver,backend", [("heun", "cpp" if ts.ops.cpp_available() else "torch"),
                                            ("dpmpp_2m", "torch")])
def test_rss_stays_flat_over_1000_steps(solver, backend):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, solver, backend], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    growth, evaluations = proc.stdout.split()
    assert int(evaluations) == ts.solvers.evaluations(solver, 1000)
    # one state is 1 MB: growing by a state per step would be ~1000 MB; allow allocator slack
    assert float(growth) < 64, f"RSS grew by {float(growth):.0f} MB over 1000 steps"


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.grad_enabled = []

    def forward(self, x, t):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.w * x


def test_sampling_runs_the_model_without_autograd():
    model = Recorder()
    den = ts.Denoiser(model, ts.schedules.CondOT(), prediction="x0")
    out = ts.sample(den, (2, 3), steps=4, solver="heun")
    assert model.grad_enabled and not any(model.grad_enabled)
    assert not out.samples.requires_grad
    out.thermo.profile()                                  # numpy() works: nothing requires grad
    grid = ts.thermo_grid(den, 4, sample_shape=(3,), options=ts.CalibrationOptions(pilot_batch=4, pilot_steps=6))
    assert len(grid) == 5 and not any(model.grad_enabled)


def test_grad_can_be_asked_for():
    """Inside torch.enable_grad() the user asked for gradients: sampling keeps them (guidance, fine-tuning)."""
    model = Recorder()
    den = ts.Denoiser(model, ts.schedules.CondOT(), prediction="x0")
    with torch.enable_grad():
        out = ts.sample(den, (2, 3), steps=3, solver="euler", backend="torch", grad=True)
    assert out.samples.requires_grad and all(model.grad_enabled)
