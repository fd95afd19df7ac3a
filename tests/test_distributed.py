"""ts.distributed.sample under torchrun (2 gloo processes on CPU) equals the single-process run bit for bit;
a NaN on one rank raises NonFiniteError on every rank (no hang); bulk shards written by 2 ranks equal the
single-process files byte for byte.

The worker is this file itself, run as `python -m torch.distributed.run --nproc_per_node=2 THIS OUT`."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import thermosample as ts
from thermosample.toy import toy_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 13  # uneven over 2 ranks: 7 + 6
CASES = {  # name -> (n, sample kwargs)
    "euler": (N, dict(steps=6, solver="euler", seed=7)),
    "ancestral": (N, dict(steps=6, solver="euler_ancestral", seed=8, sample_offset=1000)),
    "heun-fewer-than-ranks": (1, dict(steps=4, solver="heun", seed=9)),
    # the idle rank must not sample one index past the end of the 32-bit counter range (issue 13, item 13)
    "idle-rank-at-the-last-index": (1, dict(steps=3, solver="euler", seed=10, sample_offset=2 ** 32 - 1)),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    den = toy_factory(dim=8)
    for name, (n, kw) in CASES.items():
        out = ts.distributed.sample(den, (n, 8), **kw)
        save_file({"samples": out.samples.contiguous(), "rate": out.thermo.rate.contiguous()},
                  os.path.join(out_dir, f"{name}.rank{rank}.safetensors"))
    # NaN on rank 1 only (its samples are global indices 7..12): every rank must raise, naming sample 9.
    class Poisoned:
        schedule = den.schedule

        def __call__(self, x, sigma, **kw):
            d = den(x, sigma, **kw)
            if sigma < 1.0 and x.shape[0] == 6:  # rank 1 holds global samples 7..12
                d = d.clone()
                d[9 - 7, 0] = float("nan")
            return d
    try:
        ts.distributed.sample(Poisoned(), (N, 8), steps=6, seed=7)
        result = "no error"
    except ts.NonFiniteError as exc:
        result = f"NonFiniteError step={exc.step} sample={exc.sample}"
    with open(os.path.join(out_dir, f"nan.rank{rank}.txt"), "w") as f:
        f.write(result)
    # bulk under torchrun: shards dealt round-robin to the ranks
    ts.bulk.sample_to_disk("thermosample.toy:toy_factory", n=N, batch=4, out=os.path.join(out_dir, "bulk"),
                           steps=5, solver="euler_ancestral", seed=3)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def torchrun_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", os.path.abspath(__file__), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_two_gloo_ranks_equal_single_process(torchrun_dir, name):
    from safetensors.torch import load_file
    n, kw = CASES[name]
    kw = dict(kw)
    single = ts.sample(toy_factory(dim=8), (n, 8), **kw)
    for rank in (0, 1):
        got = load_file(str(torchrun_dir / f"{name}.rank{rank}.safetensors"))
        assert torch.equal(got["samples"], single.samples), f"rank {rank} samples differ ({name})"
        assert torch.equal(got["rate"], single.thermo.rate), f"rank {rank} rates differ ({name})"


def test_nan_on_one_rank_raises_on_every_rank(torchrun_dir):
    for rank in (0, 1):
        text = (torchrun_dir / f"nan.rank{rank}.txt").read_text()
        assert text.startswith("NonFiniteError") and "sample=9" in text, f"rank {rank}: {text}"


def test_bulk_under_torchrun_equals_single_process_files(torchrun_dir, tmp_path):
    ts.bulk.sample_to_disk("thermosample.toy:toy_factory", n=N, batch=4, out=str(tmp_path), steps=5,
                           solver="euler_ancestral", seed=3)
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith("shard_"))
    assert len(names) == 4
    for f in names + ["manifest.json"]:
        assert (torchrun_dir / "bulk" / f).read_bytes() == (tmp_path / f).read_bytes(), f


def test_shard_ranges_cover_the_indices_once():
    for n in (1, 2, 5, 13, 64):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in range(*ts.distributed.shard_range(n, r, world))]
            assert got == list(range(n))


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ts.distributed.sample(toy_factory(dim=2), (2, 2))


def test_import_thermosample_does_not_import_distributed_module():
    code = ("import sys, thermosample; assert 'thermosample.distributed' not in sys.modules; "
            "assert 'thermosample.bulk' not in sys.modules; import thermosample as ts; ts.distributed.sample")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


if __name__ == "__main__":
    _worker(sys.argv[1])
