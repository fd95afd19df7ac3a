"""Bulk sampling under real use (issue 13): one run per output folder (lock), shards that carry and are checked
against their job (config hash, sample range, sha256), O(1) work per shard, safe temporary files, and
arguments validated before anything touches the disk."""
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import thermosample as ts
from thermosample import bulk
from thermosample.bulk import ConfigMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = "thermosample.toy:toy_factory"
JOB = dict(n=10, batch=4, steps=3, solver="euler_ancestral", seed=5, backend="torch")  # shards of 4, 4, 2
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def files(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


def cli(*args):
    return [sys.executable, "-m", "thermosample.apps.cli", "sample", "--model", SPEC, *args]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    return out


# --- item 1: one run per folder ---------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_run(tmp_path):
    fd = os.open(tmp_path / bulk.LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(bulk.OutputLockedError, match="in use"):
            bulk.sample_to_disk(SPEC, out=str(tmp_path), **JOB)
        assert sorted(os.listdir(tmp_path)) == [bulk.LOCK]  # nothing written
    finally:
        os.close(fd)
    assert bulk.sample_to_disk(SPEC, out=str(tmp_path), **JOB).written == [0, 1, 2]  # released: it runs


# A model that holds the first run inside its lock until the test lets it go: its first call made after the
# manifest exists (the run holds the lock from before it writes the manifest) claims `started` and waits for
# `release`. Every later call, and the second run's (which finds `started` taken), goes straight through, so
# the outcome does not depend on how long either process takes to start on a loaded machine.
GATED_MODEL = """
import os, time
from thermosample.toy import toy_factory

class Gated:
    def __init__(self, out, started, release):
        self.den, self.out, self.started, self.release = toy_factory(), out, started, release
        self.schedule, self.sample_shape = self.den.schedule, self.den.sample_shape

    def __call__(self, x, sigma, **kw):
        if os.path.exists(os.path.join(self.out, "manifest.json")):
            try:
                os.close(os.open(self.started, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                deadline = time.monotonic() + 900
                while not os.path.exists(self.release):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the test never released the first run")
                    time.sleep(0.01)
        return self.den(x, sigma, **kw)
"""


def test_two_concurrent_cli_runs_on_one_folder(reference, tmp_path):
    out, started, release = tmp_path / "job", tmp_path / "started", tmp_path / "release"
    (tmp_path / "gated_model.py").write_text(GATED_MODEL)
    args = [sys.executable, "-m", "thermosample.apps.cli", "sample", "--model", "gated_model:Gated",
            "--n", "10", "--batch", "4", "--steps", "3", "--solver", "euler_ancestral", "--backend", "torch",
            "--seed", "5", "--out", str(out)]
    for key, path in (("out", out), ("started", started), ("release", release)):
        args += ["--factory-arg", f"{key}={path}"]
    run = dict(env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(args, **run)
    try:
        deadline = time.monotonic() + 600
        while not started.exists():          # the first run holds the lock and waits for `release`
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run never reached its first shard"
            time.sleep(0.02)
        second = subprocess.run(args, **run, timeout=600)
        assert first.poll() is None          # still waiting: it cannot end before `release`
    finally:
        release.touch()
        first.wait(timeout=600)
    assert second.returncode == 2, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "in use" in second.stderr
    assert first.returncode == 0, first.stderr
    got = bulk.load_shards(str(out))
    assert torch.equal(got["samples"], bulk.load_shards(str(reference))["samples"])


# --- item 2: shards carry their job, checksums in the manifest ---------------------------------------
def test_deleted_manifest_and_another_seed_does_not_reuse_old_shards(reference, tmp_path):
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    (out / "manifest.json").unlink()
    before = files(out)
    with pytest.raises(ConfigMismatchError, match="shard_000000"):
        bulk.sample_to_disk(SPEC, out=str(out), **dict(JOB, seed=6))
    assert files(out) == before


def test_deleted_manifest_same_configuration_adopts_the_shards(reference, tmp_path):
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    (out / "manifest.json").unlink()
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [] and res.skipped == [0, 1, 2]
    assert files(out) == files(reference)


def test_a_valid_shard_of_another_job_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    bulk.sample_to_disk(SPEC, out=str(a), **JOB, max_shards=1)
    bulk.sample_to_disk(SPEC, out=str(b), **dict(JOB, seed=6))
    (a / bulk.shard_name(1)).write_bytes((b / bulk.shard_name(1)).read_bytes())
    with pytest.raises(ConfigMismatchError, match="shard_000001"):
        bulk.sample_to_disk(SPEC, out=str(a), **JOB)


def test_a_misplaced_or_wrong_shape_shard_is_recomputed(reference, tmp_path):
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    (out / bulk.shard_name(1)).write_bytes((out / bulk.shard_name(2)).read_bytes())  # 2 samples where 4 belong
    (out / "manifest.json").unlink()
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [1] and res.skipped == [0, 2]
    assert files(out) == files(reference)


def test_manifest_checksums_are_verified_by_load_shards_and_resume(reference, tmp_path):
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    manifest = json.loads((out / "manifest.json").read_text())
    for k in range(3):
        assert manifest["sha256"][str(k)] == hashlib.sha256((out / bulk.shard_name(k)).read_bytes()).hexdigest()
    path = out / bulk.shard_name(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the samples: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        bulk.load_shards(str(out))
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [1]
    assert files(out) == files(reference)


# --- item 5: arguments are checked before the folder is created ---------------------------------------
@pytest.mark.parametrize("bad", [dict(solver="eulr"), dict(steps=0), dict(seed=-1), dict(seed=2 ** 64),
                                 dict(grid="foo"), dict(grid=[5.0, 1.0, 2.0]), dict(grid=[1e9, 1.0]),
                                 dict(grid=[5.0, 1.0, 0.0], steps=3),
                                 dict(solver="ddim", solver_options={"eta": -1.0}),
                                 dict(solver="ddim", solver_options={"eta": math.nan}),
                                 dict(solver="euler", solver_options={"eta": 1.0}),
                                 dict(sample_shape=(3,)), dict(backend="nope"), dict(n=2 ** 32 + 1)])
def test_bad_arguments_touch_no_disk(tmp_path, bad):
    out = tmp_path / "never"
    with pytest.raises((ValueError, TypeError)):
        bulk.sample_to_disk(SPEC, out=str(out), **dict(JOB, **bad))
    assert not out.exists()


# --- item 8: O(1) work per shard, bounded by the shards written; a progress bar ---------------------
def test_no_rescan_of_the_shards_per_write(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_stat, real_listdir = os.stat, os.listdir

    def stat(*a, **k):
        calls["n"] += 1
        return real_stat(*a, **k)

    def listdir(*a, **k):
        calls["n"] += 1
        return real_listdir(*a, **k)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "listdir", listdir)
    bulk.sample_to_disk(SPEC, out=str(tmp_path), n=60, batch=1, steps=1, backend="torch", seed=1)
    assert calls["n"] < 4 * 60 + 20, f"{calls['n']} stat/listdir calls for 60 shards"


def test_a_huge_n_does_not_hang(tmp_path):
    code = ("import sys; from thermosample import bulk; "
            "r = bulk.sample_to_disk('thermosample.toy:toy_factory', n=2**32, batch=1, out=sys.argv[1], steps=1, "
            "backend='torch', max_shards=2); print(r.num_shards, r.written)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big")], env=ENV, capture_output=True,
                          text=True, timeout=600)   # a hang is hours; importing torch on a loaded machine, a minute
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(2 ** 32), "[0,", "1]"]
    with pytest.raises(ValueError, match="missing shard"):
        bulk.load_shards(str(tmp_path / "big"))
    assert bulk.load_shards(str(tmp_path / "big"), require_complete=False)["samples"].shape == (2, 8)


def test_progress_bar_counts_shards(tmp_path, capsys):
    bulk.sample_to_disk(SPEC, out=str(tmp_path), **JOB, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "shard" in err


# --- item 9: temporary files ----------------------------------------------------------------------
def test_user_files_and_planted_symlinks_are_left_alone(reference, tmp_path):
    out = tmp_path / "j"
    out.mkdir()
    (out / "thesis.tmp-backup").write_text("mine")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in [bulk.shard_name(k) for k in range(3)] + ["manifest.json"]:
        os.symlink(victim, out / f"{name}.tmp-{os.getpid()}")  # the old predictable temp names
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert victim.read_text() == "precious"
    assert (out / "thesis.tmp-backup").read_text() == "mine"
    for k in range(3):
        assert (out / bulk.shard_name(k)).read_bytes() == (reference / bulk.shard_name(k)).read_bytes()


def test_a_planted_lock_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "j"
    out.mkdir()
    os.symlink(victim, out / bulk.LOCK)
    with pytest.raises((ValueError, OSError)):
        bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert victim.read_text() == "precious"


def test_a_failed_write_removes_its_own_temporary_file(tmp_path, monkeypatch):
    real = os.replace

    def failing(src, dst):
        if "shard_000001" in str(dst):
            raise OSError(28, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        bulk.sample_to_disk(SPEC, out=str(tmp_path), **JOB)
    assert sorted(f for f in os.listdir(tmp_path) if f != bulk.LOCK) == ["manifest.json", bulk.shard_name(0)]


def test_numpy_integer_seed(tmp_path):
    """A NumPy integer seed (as ts.sample takes) is stored as a plain int and gives ts.sample's samples."""
    import numpy as np
    res = ts.bulk.sample_to_disk("thermosample.toy:toy_factory", 4, 2, str(tmp_path / "o"), steps=3, seed=np.int64(5))
    assert res.num_shards == 2
    data = ts.bulk.load_shards(str(tmp_path / "o"))
    assert torch.equal(data["samples"], ts.sample(ts.toy.toy_factory(), (4, 8), steps=3, seed=5).samples)
