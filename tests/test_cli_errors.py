"""CLI errors (issue 13, items 5 and 12): bad input gives one line on stderr and exit status 2, never a
traceback, and `sample` checks every argument before it creates the output folder."""
import errno
import os

import pytest
import torch

import thermosample.apps.cli as cli
from thermosample import bulk

SPEC = "thermosample.toy:toy_factory"
MARKER = "/tmp/thermosample-test-pwned"


def run(capsys, argv):
    """(exit status, stderr) of the CLI run in this process."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse exits itself
        rc = exc.code
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], err


def sample_args(out, *extra):
    return ["sample", "--model", SPEC, "--n", "6", "--batch", "3", "--steps", "2", "--backend", "torch",
            "--out", str(out), *extra]


# --- item 5: validation before the folder exists -----------------------------------------------------
@pytest.mark.parametrize("bad", [["--solver", "eulr"], ["--steps", "0"], ["--seed", "-1"],
                                 ["--seed", str(2 ** 64)], ["--grid", "karass"], ["--solver", "ddim", "--eta", "-1"],
                                 ["--solver", "ddim", "--eta", "nan"], ["--shape", "0"], ["--shape", "3"],
                                 ["--n", "0"], ["--batch", "0"], ["--n", "100000000000"]])
def test_bad_sample_arguments_leave_no_folder(tmp_path, capsys, bad):
    out = tmp_path / "out"
    assert_one_line_error(*run(capsys, sample_args(out, *bad)))
    assert not out.exists()
    assert run(capsys, sample_args(out))[0] == 0  # the corrected command is not refused
    assert bulk.load_shards(str(out))["samples"].shape == (6, 8)


# --- item 12: one line, exit 2 ---------------------------------------------------------------------
def test_shape_that_is_not_ints(tmp_path, capsys):
    assert_one_line_error(*run(capsys, sample_args(tmp_path / "o", "--shape", "3,a")))
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert_one_line_error(*run(capsys, sample_args(tmp_path / "f")))
    assert (tmp_path / "f").read_text() == "x"


def test_out_is_empty(capsys):
    assert_one_line_error(*run(capsys, sample_args("")))


def test_manifest_that_is_a_json_list(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("[]")
    assert_one_line_error(*run(capsys, sample_args(tmp_path)))
    with pytest.raises(ValueError, match="manifest"):
        bulk.load_shards(str(tmp_path))


def test_factory_arg_without_equals(tmp_path, capsys):
    assert_one_line_error(*run(capsys, sample_args(tmp_path / "o", "--factory-arg", "delay")))


@pytest.mark.parametrize("kind", ["garbage.safetensors", "garbage.pt", "evil.pt", "missing.safetensors"])
def test_bad_weights_files(tmp_path, capsys, kind):
    from safetensors.torch import save_file
    path = tmp_path / kind
    if kind.startswith("garbage"):
        path.write_bytes(os.urandom(300))
    elif kind == "evil.pt":
        torch.save({"mean": torch.zeros(2), "evil": Exploit()}, str(path))
    else:
        save_file({"mean": torch.zeros(2)}, str(path))  # no "std"
    assert_one_line_error(*run(capsys, sample_args(tmp_path / "o", "--weights", str(path))))
    assert not os.path.exists(MARKER)
    assert not (tmp_path / "o").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_read_only_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse creating files in `out` the way a read-only mount would
        real_open, real_os_open = open, os.open

        def refuse(path):
            if os.path.dirname(os.path.abspath(os.fspath(path))) == str(out):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))

        def os_open(path, *a, **k):
            refuse(path)
            return real_os_open(path, *a, **k)

        def builtin_open(path, mode="r", *a, **k):
            if any(c in mode for c in "wax+"):
                refuse(path)
            return real_open(path, mode, *a, **k)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr("builtins.open", builtin_open)
    else:
        out.chmod(0o500)
    try:
        assert_one_line_error(*run(capsys, sample_args(out)))
    finally:
        out.chmod(0o700)


def test_full_disk(tmp_path, capsys, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    assert_one_line_error(*run(capsys, sample_args(tmp_path / "o")))


@pytest.mark.parametrize("argv", [["demo", "--batch", "0"], ["schedule", "--steps", "0"],
                                  ["schedule", "--solver", "foo"], ["schedule", "--pilot-batch", "0"],
                                  ["schedule", "--pilot-rows", "0"], ["schedule", "--boundary-pool", "-1"]])
def test_other_verbs(capsys, argv):
    assert_one_line_error(*run(capsys, argv))
