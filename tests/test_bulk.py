"""Bulk sampling to disk: a run killed with SIGKILL mid-shard and resumed equals the uninterrupted run byte
for byte; crashes at any write are recovered; a different configuration is refused; weights load safely."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import thermosample as ts
from thermosample import bulk
from thermosample.bulk import ConfigMismatchError
from thermosample.toy import toy_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "thermosample.toy:toy_factory"
JOB = dict(n=37, batch=8, steps=6, solver="euler_ancestral", seed=11, backend="torch")  # 5 shards, last one 5


def files(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (with the same factory arguments as the killed one)."""
    out = tmp_path_factory.mktemp("ref")
    res = bulk.sample_to_disk(SPEC, out=str(out), factory_kwargs={"delay": 0.05}, **JOB)
    assert res.written == [0, 1, 2, 3, 4] and res.skipped == []
    return out


def test_reference_equals_one_big_sample_call(reference):
    got = bulk.load_shards(str(reference))
    single = ts.sample(toy_factory(), (JOB["n"], 8), steps=6, solver="euler_ancestral", seed=11, backend="torch")
    assert torch.equal(got["samples"], single.samples)
    assert torch.equal(got["rate"], single.thermo.rate)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["done"] == [0, 1, 2, 3, 4] and manifest["complete"] and manifest["seed"] == 11


def test_sigkill_mid_shard_then_resume_is_byte_identical(reference, tmp_path):
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "thermosample.apps.cli", "sample", "--model", SPEC, "--factory-arg", "delay=0.05",
           "--n", str(JOB["n"]), "--batch", str(JOB["batch"]), "--out", str(out), "--steps", "6",
           "--solver", "euler_ancestral", "--seed", "11", "--backend", "torch"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / bulk.shard_name(0)
    deadline = time.monotonic() + 120
    try:
        while not first.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first shard never appeared"
            time.sleep(0.01)
        time.sleep(0.12)  # a shard takes 6 x 0.05 s: we are inside shard 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(f for f in os.listdir(out) if f.startswith("shard_") and ".tmp-" not in f)
    assert bulk.shard_name(0) in done and len(done) < 5, f"the kill did not land mid-job: {done}"
    # resume (from Python, same configuration): only the missing shards are sampled
    res = bulk.sample_to_disk(SPEC, out=str(out), factory_kwargs={"delay": 0.05}, **JOB)
    assert 0 in res.skipped and sorted(res.skipped + res.written) == [0, 1, 2, 3, 4]
    assert files(out) == files(reference)


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4, 7])
def test_crash_at_any_atomic_write_is_recovered(reference, tmp_path, monkeypatch, crash_at):
    """Simulate a kill at the n-th os.replace (shard or manifest): the temp file stays (a killed process does
    not clean up, so the run's own cleanup is switched off here), nothing else; the rerun removes it."""
    real = os.replace
    count = {"n": 0}

    class Killed(BaseException):
        pass

    def flaky(src, dst):
        count["n"] += 1
        if count["n"] == crash_at:
            raise Killed()
        return real(src, dst)
    monkeypatch.setattr(bulk.os, "replace", flaky)
    monkeypatch.setattr(bulk, "_discard", lambda path: None)
    with pytest.raises(Killed):
        bulk.sample_to_disk(SPEC, out=str(tmp_path), factory_kwargs={"delay": 0.05}, **JOB)
    monkeypatch.setattr(bulk.os, "replace", real)
    assert any(f.endswith(bulk.TMP_SUFFIX) for f in os.listdir(tmp_path)), "the simulated kill left no temporary file"
    if crash_at == 1:  # killed before even the manifest existed
        assert not (tmp_path / "manifest.json").exists()
    bulk.sample_to_disk(SPEC, out=str(tmp_path), factory_kwargs={"delay": 0.05}, **JOB)
    assert files(tmp_path) == files(reference)


def test_corrupt_shard_is_resampled(reference, tmp_path):
    out = tmp_path / "c"
    bulk.sample_to_disk(SPEC, out=str(out), factory_kwargs={"delay": 0.05}, **JOB, max_shards=2)
    assert json.loads((out / "manifest.json").read_text())["done"] == [0, 1]
    path = out / bulk.shard_name(1)
    path.write_bytes(path.read_bytes()[:50])  # e.g. a copy tool truncated it
    res = bulk.sample_to_disk(SPEC, out=str(out), factory_kwargs={"delay": 0.05}, **JOB)
    assert res.skipped == [0] and res.written == [1, 2, 3, 4]
    assert files(out) == files(reference)


@pytest.mark.parametrize("change", [dict(seed=12), dict(n=38), dict(batch=4), dict(steps=7),
                                    dict(solver="euler_maruyama"), dict(factory_kwargs={"delay": 0.0})])
def test_refuses_to_resume_a_different_configuration(reference, tmp_path, change):
    out = tmp_path / "d"
    out.mkdir()
    (out / "manifest.json").write_bytes((reference / "manifest.json").read_bytes())
    job = dict(JOB, factory_kwargs={"delay": 0.05})
    job.update(change)
    with pytest.raises(ConfigMismatchError) as info:
        bulk.sample_to_disk(SPEC, out=str(out), **job)
    assert "different configuration" in str(info.value)
    assert sorted(os.listdir(out)) == [bulk.LOCK, "manifest.json"]


def test_denoiser_object_needs_model_id_and_it_is_hashed(tmp_path):
    den = toy_factory(dim=3)
    bulk.sample_to_disk(den, 5, 5, str(tmp_path), model_id="toy-v1", steps=3, backend="torch")
    with pytest.raises(ConfigMismatchError):
        bulk.sample_to_disk(den, 5, 5, str(tmp_path), model_id="toy-v2", steps=3, backend="torch")


def test_nonfinite_shard_writes_nothing(tmp_path):
    with pytest.raises(ts.NonFiniteError):  # NaN at once: the trial step raises before the folder exists
        bulk.sample_to_disk(NaNModel(), 6, 3, str(tmp_path / "never"), model_id="bad", sample_shape=(2,),
                            steps=3, backend="torch")
    assert not (tmp_path / "never").exists()

    class Bad:
        schedule = toy_factory().schedule

        def __call__(self, x, sigma, **kw):  # NaN for the shards (batch 3), not for the trial step (batch 1)
            return torch.full_like(x, float("nan")) if x.shape[0] == 3 else torch.zeros_like(x)
    with pytest.raises(ts.NonFiniteError):
        bulk.sample_to_disk(Bad(), 6, 3, str(tmp_path), model_id="bad", sample_shape=(2,), steps=3, backend="torch")
    assert not any(f.startswith("shard_") for f in os.listdir(tmp_path))
    assert json.loads((tmp_path / "manifest.json").read_text())["done"] == []


def test_weights_load_with_safetensors_and_weights_only(tmp_path):
    from safetensors.torch import save_file
    mean, std = torch.tensor([3.0, -3.0]), torch.tensor([1e-3, 1e-3])
    save_file({"mean": mean, "std": std}, str(tmp_path / "w.safetensors"))
    torch.save({"mean": mean, "std": std}, str(tmp_path / "w.pt"))
    for name in ("w.safetensors", "w.pt"):
        res = bulk.sample_to_disk(SPEC, 4, 4, str(tmp_path / name.replace(".", "_")), weights=str(tmp_path / name),
                                  steps=10, backend="torch")
        got = bulk.load_shards(res.out)["samples"]
        assert got.shape == (4, 2) and torch.allclose(got, mean.expand(4, 2), atol=0.05)
        manifest = json.loads((tmp_path / name.replace(".", "_") / "manifest.json").read_text())
        assert len(manifest["config"]["model"]["weights_sha256"]) == 64
    # a pickle carrying code is refused, not executed
    torch.save({"mean": mean, "evil": Exploit()}, str(tmp_path / "evil.pt"))
    with pytest.raises(Exception) as info:
        bulk.load_weights(str(tmp_path / "evil.pt"))
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value)


class NaNModel:
    schedule = toy_factory().schedule

    def __call__(self, x, sigma, **kw):
        return torch.full_like(x, float("nan"))


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_load_shards_reports_missing(tmp_path):
    bulk.sample_to_disk(SPEC, 10, 4, str(tmp_path), steps=2, backend="torch", max_shards=1)
    with pytest.raises(ValueError, match="missing shard"):
        bulk.load_shards(str(tmp_path))
    assert bulk.load_shards(str(tmp_path), require_complete=False)["samples"].shape == (4, 8)
