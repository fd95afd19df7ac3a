"""Files that are not files (issue 35, item 8): a FIFO, a device or a directory at a shard's or the manifest's
name never blocks resume or load_shards, and a header, manifest or grid file too large, too deep or holding
numbers no float can hold is refused with a named ValueError - in the CLI one line, never a traceback."""
import json
import os
import threading

import pytest

import thermosample.apps.cli as cli
from thermosample import bulk

SPEC = "thermosample.toy:toy_factory"
JOB = dict(n=6, batch=3, steps=2, solver="euler", seed=1, backend="torch")


def run(capsys, argv):
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def one_line(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def no_hang(fn, fifo):
    """fn() run in a thread: when it is still blocked after the deadline (a FIFO opened the blocking way), the
    FIFO gets a writer, which ends the wait, and the test fails; else fn's result or exception."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=60)
        pytest.fail(f"blocked on the FIFO {fifo}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_fifo_at_a_shard_name_is_not_a_shard(tmp_path):
    out = tmp_path / "o"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    (out / "manifest.json").unlink()
    os.unlink(out / bulk.shard_name(1))
    os.mkfifo(out / bulk.shard_name(1))
    res = no_hang(lambda: bulk.sample_to_disk(SPEC, out=str(out), **JOB), out / bulk.shard_name(1))
    assert res.written == [1] and res.skipped == [0]
    assert bulk.load_shards(str(out))["samples"].shape == (6, 8)     # the FIFO was replaced by the shard


def test_load_shards_refuses_a_fifo_listed_as_a_shard(tmp_path):
    out = tmp_path / "o"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    os.unlink(out / bulk.shard_name(0))
    os.mkfifo(out / bulk.shard_name(0))
    with pytest.raises(ValueError, match="not a regular file"):
        no_hang(lambda: bulk.load_shards(str(out)), out / bulk.shard_name(0))


@pytest.mark.parametrize("call", ["resume", "load_shards"])
def test_a_fifo_at_the_manifest_name_is_refused(tmp_path, call):
    out = tmp_path / "o"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    fn = (lambda: bulk.sample_to_disk(SPEC, out=str(out), **JOB)) if call == "resume" else \
        (lambda: bulk.load_shards(str(out)))
    with pytest.raises(ValueError, match="not a regular file"):
        no_hang(fn, out / "manifest.json")


@pytest.mark.parametrize("flag, name", [("--grid", "g.json"), ("--weights", "w.safetensors")])
def test_the_cli_refuses_a_fifo_as_grid_or_weights_file(tmp_path, capsys, flag, name):
    os.mkfifo(tmp_path / name)
    argv = ["sample", "--model", SPEC, "--n", "2", "--batch", "2", "--out", str(tmp_path / "o"),
            flag, str(tmp_path / name)]
    rc, err = no_hang(lambda: run(capsys, argv), tmp_path / name)
    one_line(rc, err)
    assert "not a regular file" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", [bulk.shard_name(0), "manifest.json"])
def test_a_directory_or_device_at_a_file_name(tmp_path, capsys, where):
    out = tmp_path / "o"
    out.mkdir()
    (out / where).mkdir()
    one_line(*run(capsys, ["sample", "--model", SPEC, "--n", "6", "--batch", "3", "--steps", "2", "--backend",
                           "torch", "--out", str(out)]))
    if where == "manifest.json":
        os.rmdir(out / where)
        os.symlink("/dev/zero", out / where)
        one_line(*run(capsys, ["sample", "--model", SPEC, "--n", "6", "--batch", "3", "--out", str(out)]))
        with pytest.raises(ValueError, match="not a regular file"):
            bulk.load_shards(str(out))


def deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("text", [deep(100_000), deep(40), json.dumps({"format": "thermosample.bulk", "x": 10 ** 400}),
                                  "\xff"], ids=["100k-deep", "40-deep", "401-digit-int", "not-utf8"])
def test_a_manifest_that_lies(tmp_path, capsys, text):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_bytes(text.encode("latin-1"))
    one_line(*run(capsys, ["sample", "--model", SPEC, "--n", "6", "--batch", "3", "--out", str(out)]))
    with pytest.raises(ValueError, match="manifest"):
        bulk.load_shards(str(out))


def test_a_manifest_over_its_size_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(bulk, "MAX_MANIFEST_BYTES", 100)
    bulk.sample_to_disk(SPEC, out=str(tmp_path), **JOB)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        bulk.load_shards(str(tmp_path))


@pytest.mark.parametrize("depth", [100_000, 40])
def test_a_shard_header_nested_deep_is_recomputed(tmp_path, depth):
    out = tmp_path / "o"
    bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    good = (out / bulk.shard_name(1)).read_bytes()
    (out / "manifest.json").unlink()
    text = ('{"__metadata__": {"x": ' + deep(depth) + "}}").encode()
    (out / bulk.shard_name(1)).write_bytes(len(text).to_bytes(8, "little") + text)
    res = bulk.sample_to_disk(SPEC, out=str(out), **JOB)
    assert res.written == [1] and (out / bulk.shard_name(1)).read_bytes() == good


GRIDS = {
    "401-digit-int": {"format": "thermosample.ThermoGrid/1", "sigmas": [10 ** 400, 1.0, 0.0]},
    "200k-deep": deep(200_000),
    "40-deep-meta": '{"sigmas": [1.0, 0.0], "meta": {"a": ' + deep(40) + "}}",
    "config-401-digit-int": {"format": "thermosample.SamplerConfig/1", "solver": "euler", "options": {},
                             "sigmas": [10 ** 400, 0.0]},
    "config-bad-corrections": {"format": "thermosample.SamplerConfig/1", "solver": "deis",
                               "options": {"corrections": [[]] * 5}, "sigmas": [80.0, 10.0, 1.0, 0.0]},
    "sigmas-strings": {"sigmas": ["a", "b"]},
    "meta-list": {"sigmas": [1.0, 0.0], "meta": [1]},
    "not-utf8": b"\xff\xfe",
    "empty": "",
}


@pytest.mark.parametrize("name", GRIDS)
def test_a_grid_file_that_lies_is_one_line_and_leaves_no_folder(tmp_path, capsys, name):
    blob = GRIDS[name]
    path = tmp_path / "g.json"
    path.write_bytes(blob if isinstance(blob, bytes) else (blob if isinstance(blob, str) else json.dumps(blob)).encode())
    out = tmp_path / "o"
    one_line(*run(capsys, ["sample", "--model", SPEC, "--n", "4", "--batch", "2", "--backend", "torch",
                           "--out", str(out), "--grid", str(path)]))
    assert not out.exists()


def test_a_factory_arg_nested_deep(tmp_path, capsys):
    for value in (deep(100_000), deep(40)):
        one_line(*run(capsys, ["sample", "--model", SPEC, "--n", "4", "--batch", "2", "--out", str(tmp_path / "o"),
                               "--factory-arg", f"x={value}"]))
    assert not (tmp_path / "o").exists()
