"""Every shard a resumed bulk run keeps is verified (issue 35, item 2): against the manifest's sha256 when the
manifest lists it, else against the seal in its own header. The manifest is refreshed every 10 s, so after a
kill the newest shards are unlisted; one damaged there, or with manifest.json deleted, must be recomputed and
never handed to load_shards."""
import hashlib
import json
import os

import pytest
import torch

from thermosample import bulk

SPEC = "thermosample.toy:toy_factory"
JOB = dict(n=10, batch=4, steps=3, solver="euler_ancestral", seed=5, backend="torch")  # shards of 4, 4, 2


def files(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    return out


def flip(path, offset=-3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10                  # one bit: the file still parses as a shard of this job
    path.write_bytes(bytes(data))


def unlist(out, *shards):
    """The manifest as a kill leaves it: written before these shards were done."""
    manifest = json.loads((out / "manifest.json").read_text())
    for k in shards:
        manifest["done"].remove(k)
        del manifest["sha256"][str(k)]
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("offset", [-3, -40, 12], ids=["samples", "rate", "header"])
def test_an_unlisted_damaged_shard_is_recomputed(reference, tmp_path, offset):
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    unlist(out, 1, 2)
    header_length = int.from_bytes((out / bulk.shard_name(1)).read_bytes()[:8], "little")
    flip(out / bulk.shard_name(1), offset if offset < 0 else 8 + header_length - offset)
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [1] and res.skipped == [0, 2]
    assert files(out) == files(reference)
    assert torch.equal(bulk.load_shards(str(out))["samples"], bulk.load_shards(str(reference))["samples"])


def test_deleted_manifest_and_a_damaged_shard(reference, tmp_path):
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    (out / "manifest.json").unlink()
    flip(out / bulk.shard_name(0))
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [0] and res.skipped == [1, 2]
    assert files(out) == files(reference)


def split(data):
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def test_an_unlisted_shard_without_a_seal_is_recomputed(reference, tmp_path):
    """A shard that carries no seal (as written before shards had one) cannot be verified unless the manifest
    lists it: recomputed, not adopted; listed with its sha256, it is kept."""
    out = tmp_path / "j"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    header, data = split((out / bulk.shard_name(2)).read_bytes())
    del header["__metadata__"][bulk.SEAL]
    text = bulk._header_text(header)
    unsealed = len(text).to_bytes(8, "little") + text + data
    (out / bulk.shard_name(2)).write_bytes(unsealed)
    unlist(out, 2)
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [2] and res.skipped == [0, 1]
    assert files(out) == files(reference)
    (out / bulk.shard_name(2)).write_bytes(unsealed)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sha256"]["2"] = hashlib.sha256(unsealed).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert bulk.sample_to_disk(SPEC, out=str(out), **JOB).skipped == [0, 1, 2]


def test_a_shard_carries_its_seal(reference):
    for k in range(3):
        header, data = split((reference / bulk.shard_name(k)).read_bytes())
        seal = bulk._seal(header)
        seal.update(data)
        assert header["__metadata__"][bulk.SEAL] == seal.hexdigest()
