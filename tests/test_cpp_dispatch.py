"""Run-time CPU dispatch of the in-kernel noise (issue 15, item 2): every path against the reference.

The C++ extension picks the Philox + Box-Muller path once per process from the CPU's features (avx512,
avx2, generic) unless THERMOSAMPLE_CPU forces one, so each path is tested in its own subprocess with the
override set. Each checks, on the path it forced:
- the raw Philox4x32-10 words, bit for bit against reference.philox4x32 (counter wrap at 2^32 included);
- the normals against reference.philox_normal with today's tolerances (rtol = atol = 2e-6), from element
  0 and from unaligned offsets (partial first and last quads, groups shorter than 8 quads);
- the in-kernel stream of fused_step (blocks, inner passes) equal to philox_normal, and whole fused steps
  (float32, bfloat16, tracked) against the reference with tests/test_cpp_backend.py's tolerances.
Paths this CPU cannot run are skipped (an AVX-512 machine runs all three).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from thermosample.ops import cpp as _cpp

if not _cpp.available():
    raise RuntimeError(f"thermosample._C is not built (run `pip install --no-build-isolation -e .`): "
                       f"{_cpp._LOAD_ERROR!r}")

PATHS = ["avx512", "avx2", "generic"]
TESTS_DIR = pathlib.Path(__file__).resolve().parent

CHILD = r'''
import json, sys
import torch
sys.path.insert(0, sys.argv[2])
from thermosample import _C
from thermosample.ops import cpp, reference as ref
from test_cpp_backend import COEFFS, assert_matches_reference, make_inputs, step_kwargs

want = {"scalar": "generic"}.get(sys.argv[1], sys.argv[1])
assert _C.cpu_path() == want == cpp.cpu_path(), (_C.cpu_path(), want)
M = 0xFFFFFFFF
SEED, STEP = 2**64 - 12345, 2**32 - 2


def ref_words(q0, n, sample, step, seed):
    c0 = (torch.arange(n, dtype=torch.int64) + q0) & M
    return torch.stack(ref.philox4x32(c0, torch.full_like(c0, sample), torch.full_like(c0, step),
                                      torch.zeros_like(c0), seed), -1)


def ref_normals(first, count, sample, step, seed):
    """reference.philox_normal's formula for elements [first, first + count) from the reference words."""
    e = torch.arange(first, first + count, dtype=torch.int64)
    q = e >> 2
    w = ref_words(int(q[0]), int(q[-1] - q[0]) + 1, sample, step, seed)[q - q[0]]
    hi = (e & 3) >= 2
    a = torch.where(hi, w[:, 2], w[:, 0])
    c = torch.where(hi, w[:, 3], w[:, 1])
    u1 = ((a >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)
    u2 = (c >> 9).to(torch.float32) * (2.0 ** -23)
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * 6.283185307179586
    return torch.where((e & 1) == 0, radius * torch.cos(theta), radius * torch.sin(theta))


# 1. the Philox integers, bit for bit
for q0 in (0, 5, 2**32 - 37, 2**40 + 3):
    for n in (1, 7, 8, 9, 1003):
        for sample, step, seed in ((0, 0, 0), (9, STEP, SEED), (2**32 - 1, 17, 0x1234_5678_9ABC)):
            r = torch.zeros(n, 4, dtype=torch.int32)
            _C.philox_words(r.data_ptr(), q0, n, sample, step, seed)
            assert torch.equal(r.long() & M, ref_words(q0, n, sample, step, seed)), (q0, n, sample, step, seed)

# 2. the normals, tolerances as tests/test_cpp_backend.py
for numel in (1, 3, 4, 5, 31, 33, 4099, 40001):
    kw = dict(seed=SEED, step=STEP, sample_offset=5)
    torch.testing.assert_close(cpp.philox_normal(3, numel, **kw), ref.philox_normal(3, numel, **kw),
                               rtol=2e-6, atol=2e-6)
for first in (1, 2, 3, 6, 4 * (2**32 - 5) + 3):
    for count in (1, 2, 5, 29, 100, 2051):
        z = torch.empty(count)
        _C.philox_normal(z.data_ptr(), first, count, 7, STEP, SEED)
        torch.testing.assert_close(z, ref_normals(first, count, 7, STEP, SEED), rtol=2e-6, atol=2e-6)

# 3. the in-kernel stream is the same stream; whole steps match the reference
kw = dict(seed=SEED, step=STEP, sample_offset=5)
z_step, _ = cpp.fused_step([torch.zeros(3, 40001)], [0.0], noise=1.0, **kw)
z = cpp.philox_normal(3, 40001, **kw)
assert torch.equal(z_step, z)
for dtype, shape, n, track in ((torch.float32, (7, 4099), 2, True), (torch.float32, (3, 40001), 1, False),
                               (torch.bfloat16, (7, 1023), 3, True), (torch.float64, (2, 3, 5, 7), 2, True)):
    inputs = make_inputs(shape, dtype, n)
    skw = step_kwargs(track, 0.6, n - 1, 0)
    out, rate = cpp.fused_step(inputs, COEFFS[:n], **skw)
    assert_matches_reference(inputs, COEFFS[:n], skw, out, rate)

torch.save(z, sys.argv[3])
print(json.dumps({"path": _C.cpu_path(), "requested": _C.cpu_path_requested()}))
'''


def run_child(path, tmp_path):
    """Run CHILD with THERMOSAMPLE_CPU=path; returns (its JSON line, the normals it saved)."""
    env = dict(os.environ, THERMOSAMPLE_CPU=path)
    out = tmp_path / f"z_{path}.pt"
    proc = subprocess.run([sys.executable, "-c", CHILD, path, str(TESTS_DIR), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"THERMOSAMPLE_CPU={path}:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), torch.load(out)


def _need(path):
    if path not in _cpp.cpu_paths():
        pytest.skip(f"this CPU/build cannot run the {path} path (paths: {_cpp.cpu_paths()})")


def test_paths_listed_best_first():
    paths = _cpp.cpu_paths()
    assert paths and paths[-1] == "generic" and set(paths) <= set(PATHS)
    assert paths == [p for p in PATHS if p in paths]


@pytest.mark.parametrize("path", PATHS)
def test_forced_path_matches_reference(path, tmp_path):
    _need(path)
    info, _ = run_child(path, tmp_path)
    assert info == {"path": path, "requested": path}


def test_scalar_is_an_alias_of_generic(tmp_path):
    info, _ = run_child("scalar", tmp_path)
    assert info == {"path": "generic", "requested": "scalar"}


def test_paths_agree_with_each_other(tmp_path):
    """Same integers, so the normals differ by float32 rounding in log/sqrt/sincos only (at most a few ulp;
    0 where every path contracts the same multiply-adds, as on an FMA build with GCC)."""
    zs = {p: run_child(p, tmp_path)[1] for p in _cpp.cpu_paths()}
    base = zs["generic"]
    for p, z in zs.items():
        torch.testing.assert_close(z, base, rtol=2e-6, atol=2e-6, msg=lambda m, p=p: f"{p} vs generic: {m}")
        ulp = (z.view(torch.int32).long() - base.view(torch.int32).long()).abs().max().item()
        assert ulp <= 16, f"{p} vs generic: {ulp} ulp"


def _default_path(env_value):
    env = dict(os.environ)
    env.pop("THERMOSAMPLE_CPU", None)
    if env_value is not None:
        env["THERMOSAMPLE_CPU"] = env_value
    code = ("import warnings, json; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    from thermosample.ops import cpp\n"
            "print(json.dumps([cpp.cpu_path(), [str(x.message) for x in w]]))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("value", [None, "", "auto"])
def test_default_is_the_best_path(value):
    path, warned = _default_path(value)
    assert path == _cpp.cpu_paths()[0] and not warned


def test_unknown_override_falls_back_with_a_warning():
    path, warned = _default_path("avx1024")
    assert path == _cpp.cpu_paths()[0]
    assert len(warned) == 1 and "THERMOSAMPLE_CPU" in warned[0]
