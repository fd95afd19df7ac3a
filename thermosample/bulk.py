"""Bulk sampling to disk, resumable after a kill at any point.

    ts.bulk.sample_to_disk("mypkg.models:make_denoiser", n=50_000, batch=500, out="samples/", steps=20)
    thermosample sample --model mypkg.models:make_denoiser --n 50000 --batch 500 --out samples/ --steps 20

The job is cut into shards of `batch` consecutive global sample indices; shard k holds the samples
k*batch .. min((k+1)*batch, n) - 1, sampled with `sample_offset = k*batch`, so its content depends only on
the configuration, never on which run, process or rank produced it. Each shard is written to a fresh
temporary file (tempfile.mkstemp: unpredictable name, O_EXCL), fsynced and renamed with os.replace (atomic),
so a shard file that exists is complete. A shard's safetensors metadata names its job (the configuration
hash) and its sample range, and seals the file with its own sha256 (of the header without the seal, and the
data); the manifest (manifest.json, written the same way) records the configuration, its hash, the seed, the
shards done and the sha256 of each file.

One run at a time: the run holds an exclusive flock on `out/.thermosample.lock` (OutputLockedError for a
second one). Everything that needs no disk (arguments, model, solver options against the grid) is checked
before the folder is created, by a trial run of one sample through the whole grid. A rerun with the same
configuration verifies every shard it keeps, listed in the manifest or not (metadata, the manifest's sha256
where it lists the shard, else the shard's own seal; a shard with neither is recomputed), skips the good ones
and recomputes the others, producing exactly the files an uninterrupted run would have; a different
configuration, or a shard of another job, is refused (ConfigMismatchError). Only regular files are read (a
FIFO at a shard's name is not a shard), and headers and the manifest are bounded in size and nesting. See
docs/reliability.md for the exact promises.

Under torchrun (torch.distributed initialised) the shards are dealt round-robin to the ranks: rank r writes
shards r, r + world, ...; rank 0 holds the lock and owns the manifest.

The model factory `MODULE:FACTORY` is imported and called as `FACTORY(**factory_kwargs)` (plus
`weights=PATH` when given); it returns a `ts.Denoiser` or a `(model, schedule)` pair (wrapped with
prediction="eps"), or a dict of Denoiser keyword arguments. Weights are loaded with `load_weights`
(safetensors, or torch.load(weights_only=True)); nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import json
import os
import re
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

from .auto import runnable
from .denoiser import Denoiser
from .errors import ThermosampleDeprecationWarning
from .grids import make_grid
from .sampler import sample as _sample
from .solvers import SOLVERS
from .validate import (
    check_int,
    check_json_depth,
    check_sample_shape,
    check_seed,
    open_regular,
    parse_json,
    read_json_file,
)

__all__ = ["sample_to_disk", "load_shards", "load_weights", "build_denoiser", "BulkResult",
           "ConfigMismatchError", "OutputLockedError", "MANIFEST", "LOCK", "FORMAT_VERSION"]

MANIFEST = "manifest.json"
LOCK = ".thermosample.lock"
TMP_SUFFIX = ".thermosample-tmp"
FORMAT_VERSION = 1
MAX_SAMPLES = 2 ** 32  # a sample's global index keys the 32-bit Philox counter
MANIFEST_EVERY_S = 10.0  # single process: the manifest is refreshed at most this often (and at the end)
MAX_HEADER_BYTES = 1 << 24     # a shard's JSON header (a few hundred bytes when thermosample wrote it)
MAX_MANIFEST_BYTES = 1 << 30   # about 100 bytes per shard done: some 10 million shards
SEAL = "content_sha256"        # a shard's metadata key for its own checksum (see _seal)

# The temporary files this module creates: ".<target>.<random>.thermosample-tmp" (see _atomic_write).
_LEFTOVER = re.compile(r"\.(manifest\.json|shard_\d{6,}\.safetensors)\.[A-Za-z0-9_]+" + re.escape(TMP_SUFFIX))


class ConfigMismatchError(ValueError):
    """The output directory holds a manifest or a shard written for a different configuration."""


class OutputLockedError(ValueError):
    """Another run holds the output directory (its lock file is locked)."""


@dataclass
class BulkResult:
    """What `sample_to_disk` did: the directory, shards in the job, shards written now, shards skipped."""

    out: str
    num_shards: int
    written: list
    skipped: list


# ---------------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------------
def load_weights(path: str, map_location="cpu") -> dict:
    """A state dict from `path` without unpickling code: .safetensors via safetensors, anything else via
    torch.load(weights_only=True). Raises ValueError for a missing, unreadable or unsafe file."""
    path = os.fspath(path)
    if not os.path.isfile(path):   # also a FIFO, which the loaders would wait on forever
        raise ValueError(f"weights file {path!r} " + ("is not a regular file" if os.path.exists(path) else
                                                      "does not exist"))
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device=str(map_location))
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # garbage, truncated, or a pickle that carries code (refused, never run)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"cannot load the weights file {path!r} (safetensors, or torch.load with "
                         f"weights_only=True): {first}") from exc


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_denoiser(spec: str, weights: str | None = None, **factory_kwargs) -> Denoiser:
    """Import `MODULE:FACTORY` and call it; return the Denoiser it describes.

    Args:
        spec: "package.module:function".
        weights: optional path passed to the factory as `weights=`.
        **factory_kwargs: further keyword arguments for the factory.
    Raises:
        ValueError when the module or factory is missing or the factory fails (e.g. weights lacking a tensor);
        TypeError when it returns something else than a model.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"model must be 'MODULE:FACTORY' (e.g. 'thermosample.toy:toy_factory'), got {spec!r}")
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the model module {mod_name!r}: {exc}") from exc
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise ValueError(f"{mod_name!r} has no callable {fn_name!r}")
    if weights is not None:
        factory_kwargs["weights"] = weights
    try:
        made = factory(**factory_kwargs)
    except ValueError:
        raise
    except Exception as exc:  # e.g. KeyError for weights missing a tensor: a bad input, not a crash
        raise ValueError(f"the model factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(made, Denoiser) or (callable(made) and hasattr(made, "schedule")):
        return made
    if isinstance(made, dict):
        return Denoiser(**made)
    if isinstance(made, tuple) and len(made) == 2:
        return Denoiser(made[0], made[1], prediction="eps")
    raise TypeError(f"the factory {spec!r} must return a ts.Denoiser, a (model, schedule) pair or a dict of "
                    f"Denoiser arguments, got {type(made).__name__}")


# ---------------------------------------------------------------------------------------------------
# Files: lock, atomic writes, shard headers, manifest
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(out: str):
    """Hold an exclusive, non-blocking flock on out/LOCK for the duration (released when the fd closes,
    also when the process dies). The lock file is never removed: unlinking it would let two runs lock
    two different files of the same name."""
    path = os.path.join(out, LOCK)
    try:  # O_NOFOLLOW: a symlink planted at the lock's name is refused, not followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if os.path.islink(path):
            raise ValueError(f"{path} is a symlink; remove it (thermosample creates its lock file itself)") from exc
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(f"{out} is in use by another thermosample run (it holds {path}); wait for "
                                    "it to finish or use another directory") from None
        yield
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@functools.cache
def _umask() -> int:
    """The process umask (read once: reading it means setting it, briefly)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _discard(path: str) -> None:
    """Remove a temporary file this run created (quietly: it may already be gone)."""
    with contextlib.suppress(OSError):
        os.remove(path)


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or all of the new one.

    The temporary file is made by mkstemp in the target folder: an unpredictable name opened with O_EXCL,
    so neither an existing file nor a planted symlink is ever written through. Only it is removed on failure.
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; shards get the usual permissions
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(folder)


def _remove_leftovers(out: str, names) -> None:
    """Remove the temporary files of a killed run: only regular files named exactly as `_atomic_write`
    names them (called under the lock, so no live run owns them)."""
    for name in names:
        if _LEFTOVER.fullmatch(name):
            path = os.path.join(out, name)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.remove(path)


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


def _header_text(header: dict) -> bytes:
    """The canonical header bytes (sorted keys, no spaces), padded so the data section is 8-byte aligned."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def _seal(header: dict):
    """A hasher fed the canonical header without its seal; feeding it the data section gives the seal."""
    meta = {k: v for k, v in header["__metadata__"].items() if k != SEAL}
    return hashlib.sha256(_header_text({**header, "__metadata__": meta}))


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """Serialise to the safetensors format with a canonical header (sorted keys, tensors in name order), so
    that the same tensors always give the same bytes (safetensors' own writer orders metadata by hash). The
    metadata gets the file's seal (SEAL): the sha256 of the header without it followed by the data, which a
    resumed run checks on a shard the manifest does not list."""
    header, blobs, pos = {"__metadata__": dict(metadata)}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    data = b"".join(blobs)
    seal = _seal(header)
    seal.update(data)
    header["__metadata__"][SEAL] = seal.hexdigest()
    text = _header_text(header)
    return len(text).to_bytes(8, "little") + text + data


def _read_shard(path: str):
    """(header, sha256 of the file, sealed) for a complete safetensors file at `path`, read once; sealed is
    True/False when its metadata carries a seal that matches/does not, None when it carries none. None when
    the file is missing, not a regular file, truncated, not safetensors or its header is over
    MAX_HEADER_BYTES or nested deeper than a header is."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                return None
            raw = f.read(length)
            header = parse_json(raw, path, max_depth=3)
            meta = header.get("__metadata__", {})
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            if 8 + length + max(ends, default=0) != size or not isinstance(meta, dict):
                return None
            whole = hashlib.sha256(prefix + raw)
            sealed = _seal(header) if SEAL in meta else None
            for chunk in iter(lambda: f.read(1 << 20), b""):
                whole.update(chunk)
                if sealed is not None:
                    sealed.update(chunk)
        return header, whole.hexdigest(), None if sealed is None else sealed.hexdigest() == meta[SEAL]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def shard_name(k: int) -> str:
    """File name of shard k."""
    return f"shard_{k:06d}.safetensors"


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _read_manifest(out: str) -> dict | None:
    """The manifest of `out` (None when there is none); ValueError when it is not a thermosample manifest."""
    path = os.path.join(out, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        manifest = read_json_file(path, "the manifest", MAX_MANIFEST_BYTES)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable thermosample manifest: {exc}") from exc
    ok = (isinstance(manifest, dict) and manifest.get("format") == "thermosample.bulk"
          and isinstance(manifest.get("config"), dict) and isinstance(manifest.get("config_hash"), str)
          and isinstance(manifest.get("num_shards"), int) and isinstance(manifest.get("sha256", {}), dict))
    if not ok:
        raise ValueError(f"{path} is not a thermosample manifest (expected a JSON object written by "
                         "thermosample.bulk); move it away or use another directory")
    return manifest


def _write_manifest(out: str, config: dict, num_shards: int, sums: dict) -> None:
    """Write the manifest: `sums` maps each shard done to the sha256 of its file."""
    done = sorted(sums)
    manifest = {"format": "thermosample.bulk", "version": FORMAT_VERSION, "config": config,
                "config_hash": _config_hash(config), "seed": config["seed"], "n": config["n"],
                "batch": config["batch"], "num_shards": num_shards, "done": done,
                "sha256": {str(k): sums[k] for k in done}, "complete": len(done) == num_shards}
    _atomic_write(os.path.join(out, MANIFEST), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


_SHARD_NAME = re.compile(r"shard_(\d{6,})\.safetensors")


def _verify_shards(out: str, names, config: dict, known: dict, mine) -> dict:
    """{k: sha256} of the shards with `mine(k)` true whose file (among `names`, a listing of `out`) is a good
    shard of this job. Work is bounded by the files present, not by the number of shards in the job.

    Every shard kept is verified: against its sha256 in `known` (from the manifest) when listed there, else
    against its own seal. A file that is not regular or does not parse, holds another sample range or
    shape, fails its check or is unlisted without a seal (written before shards carried one) is left out,
    to be recomputed. A parseable shard of another job (another config hash) raises ConfigMismatchError: it
    may be someone's data, and it is never taken for this job's.
    Work: one read of each shard file present.
    """
    want_hash, n, batch = _config_hash(config), config["n"], config["batch"]
    num_shards = -(-n // batch)
    good = {}
    for name in sorted(names):
        match = _SHARD_NAME.fullmatch(name)
        k = int(match.group(1)) if match else -1
        if not (0 <= k < num_shards and mine(k)) or name != shard_name(k):
            continue
        path = os.path.join(out, name)
        read = _read_shard(path)
        if read is None:
            continue  # an incomplete or damaged file, or no file: recompute
        header, digest, sealed = read
        meta = header.get("__metadata__") or {}
        if meta.get("config_hash") != want_hash:
            raise ConfigMismatchError(f"{path} is a shard of a different configuration (or not a thermosample "
                                      "shard); move it away or use a new directory")
        start, count = k * batch, min(batch, n - k * batch)
        samples = header.get("samples") or {}
        if (meta.get("shard"), meta.get("start"), meta.get("count")) != (str(k), str(start), str(count)) \
                or samples.get("shape") != [count, *config["sample_shape"]] \
                or ("rate" in header) != config["track"]:
            continue  # this job's shard under the wrong name, or damaged: recompute
        if sealed is not False and (known[k] == digest if k in known else sealed):
            good[k] = digest
    return good


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------
def _check_out(out) -> str:
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path, got {type(out).__name__}")
    out = os.fspath(out)
    if not out:
        raise ValueError("out must be a directory path, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out={out!r} exists and is not a directory")
    return out


def _check_sampling(den, sample_shape, steps, solver, grid, seed, backend, track, solver_options) -> None:
    """Fail on a bad argument before anything touches the disk (a manifest written for a typo would pin
    the folder to it): the solver, then one sample through the run's whole grid, which runs the sampler's
    own checks (grid, options against the grid - deis's per-step corrections -, backend, every model output
    and NaN/Inf). It costs one sample of the job, at batch size 1."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    try:
        _sample(den, (1, *sample_shape), steps=steps, solver=solver, grid=grid, seed=seed, backend=backend,
                track=track, progress=False, **solver_options)
    except (ValueError, TypeError, ArithmeticError):  # bad argument, or NonFiniteError: as they are
        raise
    except Exception as exc:  # e.g. the model rejects the sample shape
        raise ValueError(f"a trial step on one sample of shape {tuple(sample_shape)} failed: "
                         f"{type(exc).__name__}: {exc}") from exc


def sample_to_disk(model, n: int, batch: int, out: str, *, sample_shape=None, steps: int | None = None,
                   solver: str | None = None, grid="karras", seed: int = 0, backend: str = "auto",
                   track: bool = True, model_id: str | None = None, weights: str | None = None,
                   factory_kwargs: dict | None = None, solver_options: dict | None = None,
                   progress: bool | None = None, max_shards: int | None = None) -> BulkResult:
    """Sample n samples into shard files under `out`, resuming whatever an earlier run left.

    Args:
        model: "MODULE:FACTORY" (see `build_denoiser`) or a `ts.Denoiser`. With a Denoiser object pass a
            `model_id` naming it (e.g. checkpoint hash): it enters the configuration hash, which is how a
            rerun knows it is the same job.
        n: total number of samples (global indices 0..n-1), at most 2**32.
        batch: samples per shard (and per model batch); shard k = indices [k*batch, (k+1)*batch) ∩ [0, n).
        out: output directory (created). Holds manifest.json, the lock file .thermosample.lock and
            shard_%06d.safetensors files with "samples" [b, *sample_shape] and, with track, "rate" [E, b]
            and "t" [E].
        sample_shape: shape of one sample, e.g. (3, 32, 32); default: the factory's `sample_shape`
            attribute on the Denoiser, else (dim,) of the toy factory — required otherwise.
        steps, solver, grid, seed, backend, track: as `ts.sample`; grid may be a name, a list of sigmas or a
            `ts.SamplerConfig` (whose solver and options run unless `solver` names another; steps: default 20
            on a named grid; an explicit grid sets it, and a `steps` that disagrees is a ValueError).
        weights: weights file passed to the factory; its sha256 enters the configuration hash.
        factory_kwargs: keyword arguments for the factory (JSON-serialisable).
        solver_options: e.g. {"eta": 1.0} for ddim.
        progress: a tqdm bar over the shards (None: shown when stderr is a terminal, on rank 0).
        max_shards: stop after writing this many shards (None: all), e.g. to spread a job over time.
    Returns:
        BulkResult(out, num_shards, written, skipped).
    Raises:
        ValueError/TypeError for bad arguments, before the folder is created; OutputLockedError when
        another run holds `out`; ConfigMismatchError when `out` holds a manifest or a shard of a different
        configuration; NonFiniteError when a shard produced NaN/Inf (nothing is written for it).
    """
    n, batch = check_int(n, "n"), check_int(batch, "batch")
    if n > MAX_SAMPLES:
        raise ValueError(f"n must be <= 2**32 (a sample's global index keys the 32-bit noise counter), got {n}")
    if steps is not None:
        steps = check_int(steps, "steps")
    seed = check_seed(seed)      # a NumPy integer seed is stored (JSON) and used as a plain int
    if max_shards is not None:
        max_shards = check_int(max_shards, "max_shards")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', got {backend!r}")
    if solver is not None and not isinstance(solver, str):
        raise TypeError(f"solver must be a solver name (a string) or None, got {solver!r}")
    out = _check_out(out)
    factory_kwargs = dict(factory_kwargs or {})
    solver_options = dict(solver_options or {})
    if isinstance(model, str):
        den = build_denoiser(model, weights=weights, **factory_kwargs)
        ident = {"factory": model, "factory_kwargs": factory_kwargs,
                 "weights_sha256": _file_sha256(weights) if weights else None}
        factory_kwargs = {}
    elif callable(model) and hasattr(model, "schedule"):
        den = model
        if model_id is None:
            raise ValueError("pass model_id=... (a name or checkpoint hash) with a Denoiser object, so that "
                             "a resumed run can tell whether it is the same model")
        ident = {"model_id": str(model_id)}
    else:
        raise TypeError(f"model must be 'MODULE:FACTORY' or a ts.Denoiser, got {type(model).__name__}")
    if sample_shape is None:
        sample_shape = getattr(den, "sample_shape", None)
        if sample_shape is None:
            raise ValueError("pass sample_shape=(C, H, W) (the shape of one sample)")
    sample_shape = check_sample_shape(sample_shape)
    solver, solver_options, grid = runnable(solver, grid, steps, solver_options, stacklevel=3)  # ts.sample's rule
    if not isinstance(grid, str):
        grid = [float(s) for s in (grid.tolist() if hasattr(grid, "tolist") else grid)]
    steps = len(make_grid(grid, steps, den.schedule)) - 1   # as ts.sample resolves it (grids.make_grid)
    config = {"model": ident, "n": n, "batch": batch, "sample_shape": list(sample_shape), "steps": steps,
              "solver": solver, "grid": grid, "seed": seed, "backend": backend, "track": bool(track),
              "solver_options": solver_options, "format_version": FORMAT_VERSION}
    try:
        check_json_depth(config, "the configuration (factory_kwargs, solver_options)")
        json.dumps(config)
    except TypeError as exc:
        raise TypeError(f"the configuration must be JSON-serialisable (factory_kwargs, solver_options): {exc}") from exc
    _check_sampling(den, sample_shape, steps, solver, grid, seed, backend, track, solver_options)

    rank, world = _rank_world()
    num_shards = -(-n // batch)
    mine = range(rank, num_shards, world)
    with contextlib.ExitStack() as stack:
        def prepare():
            """Lock (rank 0), check the manifest, verify this rank's shards: {k: sha256} of the good ones."""
            os.makedirs(out, exist_ok=True)
            if rank == 0:
                stack.enter_context(_locked(out))
            manifest = _read_manifest(out)
            if manifest is not None and manifest["config_hash"] != _config_hash(config):
                old = manifest["config"]
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise ConfigMismatchError(f"{out} holds samples of a different configuration (differs in {diff}); "
                                          "use a new directory or the original settings")
            names = os.listdir(out)  # the one directory listing: no per-shard scan afterwards
            if rank == 0:
                _remove_leftovers(out, names)
            known = {int(k): v for k, v in (manifest or {}).get("sha256", {}).items()}
            return _verify_shards(out, names, config, known, lambda k: k % world == rank)
        sums = _collective(prepare)
        skipped = sorted(sums)

        def work():
            """Sample and write this rank's missing shards; O(1) bookkeeping per shard."""
            from tqdm import tqdm
            written, last = [], time.monotonic()
            if rank == 0:
                _write_manifest(out, config, num_shards, sums)
            show = progress if progress is not None else (rank == 0 and sys.stderr.isatty())
            with tqdm(total=len(mine), initial=len(sums), unit="shard", desc=os.path.basename(out) or out,
                      disable=not show, dynamic_ncols=True) as bar:
                for k in mine:
                    if k in sums:
                        continue
                    if max_shards is not None and len(written) >= max_shards:
                        break
                    start = k * batch
                    size = min(batch, n - start)
                    res = _sample(den, (size, *sample_shape), steps=steps, solver=solver, grid=grid, seed=seed,
                                  sample_offset=start, backend=backend, track=track, progress=False,
                                  **solver_options)
                    tensors = {"samples": res.samples.detach().cpu().contiguous()}
                    if res.thermo is not None:
                        tensors["rate"] = res.thermo.rate.detach().cpu().contiguous()
                        tensors["t"] = res.thermo.t.detach().cpu().contiguous()
                    meta = {"shard": str(k), "start": str(start), "count": str(size), "seed": str(seed),
                            "config_hash": _config_hash(config)}
                    data = _safetensors_bytes(tensors, meta)
                    _atomic_write(os.path.join(out, shard_name(k)), data)
                    sums[k] = hashlib.sha256(data).hexdigest()
                    written.append(k)
                    bar.update(1)
                    if world == 1 and time.monotonic() - last > MANIFEST_EVERY_S:
                        _write_manifest(out, config, num_shards, sums)
                        last = time.monotonic()
            return written
        written = _collective(work)

        def finish():
            """Rank 0 writes the final manifest; with several ranks it first verifies and checksums the
            other ranks' shards from disk (once, at the end)."""
            if rank == 0:
                if world > 1:
                    sums.update(_verify_shards(out, os.listdir(out), config, {}, lambda k: k % world != 0))
                _write_manifest(out, config, num_shards, sums)
        _collective(finish)
    return BulkResult(out=out, num_shards=num_shards, written=written, skipped=skipped)


_MOVED = {"toy_factory": "thermosample.toy"}   # public names that moved out of this module: where they live now


def __getattr__(name):
    """An old name (e.g. `thermosample.bulk:toy_factory`, documented before it moved to thermosample.toy)
    still works for a release, with a ThermosampleDeprecationWarning naming its new home."""
    if name in _MOVED:
        warnings.warn(f"thermosample.bulk.{name} moved to {_MOVED[name]}.{name} (use {_MOVED[name]}:{name} with "
                      "--model); the old name will be removed in the next release",
                      ThermosampleDeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def _collective(fn):
    """Run `fn` on every rank; when it fails on any rank, raise on all of them (the failing rank its own
    error) instead of leaving the others waiting at the next collective. Single process: just `fn()`."""
    rank, world = _rank_world()
    if world == 1:
        return fn()
    import torch.distributed as dist

    from .distributed import _status_device
    error, result = None, None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    failed = torch.zeros(world, dtype=torch.int64, device=_status_device(None))
    failed[rank] = error is not None
    dist.all_reduce(failed)
    if error is not None:
        raise error
    bad = [r for r, f in enumerate(failed.tolist()) if f]
    if bad:
        raise RuntimeError(f"sample_to_disk failed on rank(s) {bad}; see their error")
    return result


def load_shards(out: str, *, require_complete: bool = True) -> dict:
    """Read a bulk output directory back: {"samples": [n, ...], "rate": [E, n] (if tracked), "t": [E]}.

    Only the shards the manifest lists as done are read, each checked against the manifest's sha256.
    Raises ValueError for a manifest or shard that is missing, not a regular file (a FIFO is never waited
    on) or differs from its checksum, and when shards are missing and `require_complete` (the default).
    """
    manifest = _read_manifest(out)
    if manifest is None:
        raise ValueError(f"{out} has no {MANIFEST}")
    from safetensors.torch import load as load_bytes
    sums = {int(k): v for k, v in manifest.get("sha256", {}).items()}
    num_shards = manifest["num_shards"]
    if require_complete and len(sums) < num_shards:
        missing = []
        for k in range(num_shards):  # the first few, not all of them
            if k not in sums:
                missing.append(k)
                if len(missing) > 10:
                    break
        raise ValueError(f"{out} is missing shard(s) {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                         "rerun the same command to resume")
    parts = []
    for k in sorted(sums):
        path = os.path.join(out, shard_name(k))
        try:
            with open_regular(path) as f:
                data = f.read()
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is listed as done in {MANIFEST} but cannot be read ({exc}); rerun the "
                             "same command to recompute it") from exc
        if hashlib.sha256(data).hexdigest() != sums[k]:
            raise ValueError(f"{path} is corrupt: its sha256 differs from the one in {MANIFEST}; rerun the same "
                             "command to recompute it")
        parts.append(load_bytes(data))
    result = {"samples": torch.cat([p["samples"] for p in parts]) if parts else None}
    if parts and "rate" in parts[0]:
        result["rate"] = torch.cat([p["rate"] for p in parts], dim=1)
        result["t"] = parts[0]["t"]
    return result
