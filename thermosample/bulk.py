"""Bulk sampling to disk, resumable after a kill at any point.

    ts.bulk.sample_to_disk("mypkg.models:make_denoiser", n=50_000, batch=500, out="samples/", steps=20)
    thermosample sample --model mypkg.models:make_denoiser --n 50000 --batch 500 --out samples/ --steps 20

The job is cut into shards of `batch` consecutive global sample indices; shard k holds the samples
k*batch .. min((k+1)*batch, n) - 1, sampled with `sample_offset = k*batch`, so its content depends only on
the configuration, never on which run, process or rank produced it. Each shard is written to a temporary
file, fsynced and renamed with os.replace (atomic), so a shard file that exists is complete. The manifest
(manifest.json, written the same way) records the configuration, its hash, the seed and the shards done.
A rerun with the same configuration skips the shards on disk and produces exactly the files an
uninterrupted run would have; a rerun with a different configuration is refused (ConfigMismatchError).

Under torchrun (torch.distributed initialised) the shards are dealt round-robin to the ranks: rank r writes
shards r, r + world, ...; rank 0 owns the manifest.

The model factory `MODULE:FACTORY` is imported and called as `FACTORY(**factory_kwargs)` (plus
`weights=PATH` when given); it returns a `ts.Denoiser` or a `(model, schedule)` pair (wrapped with
prediction="eps"), or a dict of Denoiser keyword arguments. Weights are loaded with `load_weights`
(safetensors, or torch.load(weights_only=True)); nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .denoiser import Denoiser
from .sampler import sample as _sample

__all__ = ["sample_to_disk", "load_shards", "load_weights", "build_denoiser", "BulkResult",
           "ConfigMismatchError", "MANIFEST", "FORMAT_VERSION"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ConfigMismatchError(ValueError):
    """The output directory holds a manifest written for a different configuration."""


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
    torch.load(weights_only=True)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device=str(map_location))
    return torch.load(path, map_location=map_location, weights_only=True)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_denoiser(spec: str, weights: str | None = None, **factory_kwargs) -> Denoiser:
    """Import `MODULE:FACTORY` and call it; return the Denoiser it describes.

    Args:
        spec: "package.module:function".
        weights: optional path passed to the factory as `weights=`.
        **factory_kwargs: further keyword arguments for the factory.
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
    made = factory(**factory_kwargs)
    if isinstance(made, Denoiser) or (callable(made) and hasattr(made, "schedule")):
        return made
    if isinstance(made, dict):
        return Denoiser(**made)
    if isinstance(made, tuple) and len(made) == 2:
        return Denoiser(made[0], made[1], prediction="eps")
    raise TypeError(f"the factory {spec!r} must return a ts.Denoiser, a (model, schedule) pair or a dict of "
                    f"Denoiser arguments, got {type(made).__name__}")


# ---------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------
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


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or all of the new one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16"}


def _safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """Serialise to the safetensors format with a canonical header (sorted keys, tensors in name order), so
    that the same tensors always give the same bytes (safetensors' own writer orders metadata by hash)."""
    header, blobs, pos = {"__metadata__": metadata}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def shard_name(k: int) -> str:
    """File name of shard k."""
    return f"shard_{k:06d}.safetensors"


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _read_manifest(out: str) -> dict | None:
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable thermosample manifest: {exc}") from exc


def _shard_ok(path: str) -> bool:
    """True when `path` is a complete shard (it was renamed into place, so it parses)."""
    if not os.path.isfile(path):
        return False
    try:
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return "samples" in f.keys()
    except Exception:
        return False


def _write_manifest(out: str, config: dict, num_shards: int) -> list:
    done = [k for k in range(num_shards) if _shard_ok(os.path.join(out, shard_name(k)))]
    manifest = {"format": "thermosample.bulk", "version": FORMAT_VERSION, "config": config,
                "config_hash": _config_hash(config), "seed": config["seed"], "n": config["n"],
                "batch": config["batch"], "num_shards": num_shards, "done": done,
                "complete": len(done) == num_shards}
    _atomic_write(os.path.join(out, MANIFEST), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return done


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------
def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return int(v)


def sample_to_disk(model, n: int, batch: int, out: str, *, sample_shape=None, steps: int = 20,
                   solver: str = "euler", grid="karras", seed: int = 0, backend: str = "auto",
                   track: bool = True, model_id: str | None = None, weights: str | None = None,
                   factory_kwargs: dict | None = None, solver_options: dict | None = None,
                   progress: bool = False, max_shards: int | None = None) -> BulkResult:
    """Sample n samples into shard files under `out`, resuming whatever an earlier run left.

    Args:
        model: "MODULE:FACTORY" (see `build_denoiser`) or a `ts.Denoiser`. With a Denoiser object pass a
            `model_id` naming it (e.g. checkpoint hash): it enters the configuration hash, which is how a
            rerun knows it is the same job.
        n: total number of samples (global indices 0..n-1).
        batch: samples per shard (and per model batch); shard k = indices [k*batch, (k+1)*batch) ∩ [0, n).
        out: output directory (created). Holds manifest.json and shard_%06d.safetensors files with
            "samples" [b, *sample_shape] and, with track, "rate" [E, b] and "t" [E].
        sample_shape: shape of one sample, e.g. (3, 32, 32); default: the factory's `sample_shape`
            attribute on the Denoiser, else (dim,) of the toy factory — required otherwise.
        steps, solver, grid, seed, backend, track: as `ts.sample`; grid may be a name or a list of sigmas.
        weights: weights file passed to the factory; its sha256 enters the configuration hash.
        factory_kwargs: keyword arguments for the factory (JSON-serialisable).
        solver_options: e.g. {"eta": 1.0} for ddim.
        max_shards: stop after writing this many shards (None: all), e.g. to spread a job over time.
    Returns:
        BulkResult(out, num_shards, written, skipped).
    Raises:
        ConfigMismatchError when `out` holds a manifest for a different configuration; ValueError/TypeError
        for bad arguments; NonFiniteError when a shard produced NaN/Inf (nothing is written for it).
    """
    n, batch = _positive_int("n", n), _positive_int("batch", batch)
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path, got {type(out).__name__}")
    out = os.fspath(out)
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
    if isinstance(sample_shape, int):
        sample_shape = (sample_shape,)
    sample_shape = tuple(_positive_int("sample_shape entries", s) for s in sample_shape)
    if not isinstance(grid, str):
        grid = [float(s) for s in (grid.tolist() if hasattr(grid, "tolist") else grid)]
    if max_shards is not None:
        max_shards = _positive_int("max_shards", max_shards)
    config = {"model": ident, "n": n, "batch": batch, "sample_shape": list(sample_shape), "steps": steps,
              "solver": solver, "grid": grid, "seed": seed, "backend": backend, "track": bool(track),
              "solver_options": solver_options, "format_version": FORMAT_VERSION}
    try:
        json.dumps(config)
    except TypeError as exc:
        raise TypeError(f"the configuration must be JSON-serialisable (factory_kwargs, solver_options): {exc}") from exc

    rank, world = _rank_world()
    num_shards = -(-n // batch)
    os.makedirs(out, exist_ok=True)
    manifest = _read_manifest(out)
    if manifest is not None and manifest.get("config_hash") != _config_hash(config):
        old = manifest.get("config", {})
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ConfigMismatchError(f"{out} holds samples of a different configuration (differs in {diff}); "
                                  "use a new directory or the original settings")
    if rank == 0:
        _clean_temporaries(out)
        if manifest is None:
            _write_manifest(out, config, num_shards)
    _barrier()

    written, skipped = [], []
    for k in range(rank, num_shards, world):
        path = os.path.join(out, shard_name(k))
        if _shard_ok(path):
            skipped.append(k)
            continue
        if max_shards is not None and len(written) >= max_shards:
            break
        start = k * batch
        size = min(batch, n - start)
        res = _sample(den, (size, *sample_shape), steps=steps, solver=solver, grid=grid, seed=seed,
                      sample_offset=start, backend=backend, track=track, progress=progress, **solver_options)
        tensors = {"samples": res.samples.detach().cpu().contiguous()}
        if res.thermo is not None:
            tensors["rate"] = res.thermo.rate.detach().cpu().contiguous()
            tensors["t"] = res.thermo.t.detach().cpu().contiguous()
        meta = {"shard": str(k), "start": str(start), "count": str(size), "seed": str(seed),
                "config_hash": _config_hash(config)}
        _atomic_write(path, _safetensors_bytes(tensors, meta))
        written.append(k)
        if world == 1:
            _write_manifest(out, config, num_shards)
    _barrier()
    if rank == 0:
        _write_manifest(out, config, num_shards)
    return BulkResult(out=out, num_shards=num_shards, written=written, skipped=skipped)


def _clean_temporaries(out: str) -> None:
    """Remove temporary files a killed run left behind (never a completed shard)."""
    for name in os.listdir(out):
        if ".tmp-" in name:
            try:
                os.remove(os.path.join(out, name))
            except OSError:  # pragma: no cover - raced with another process
                pass


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def load_shards(out: str, *, require_complete: bool = True) -> dict:
    """Read a bulk output directory back: {"samples": [n, ...], "rate": [E, n] (if tracked), "t": [E]}.

    Raises ValueError when shards are missing and `require_complete` (the default).
    """
    manifest = _read_manifest(out)
    if manifest is None:
        raise ValueError(f"{out} has no {MANIFEST}")
    from safetensors.torch import load_file
    parts, missing = [], []
    for k in range(manifest["num_shards"]):
        path = os.path.join(out, shard_name(k))
        if _shard_ok(path):
            parts.append(load_file(path))
        else:
            missing.append(k)
    if missing and require_complete:
        raise ValueError(f"{out} is missing shard(s) {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                         "rerun the same command to resume")
    result = {"samples": torch.cat([p["samples"] for p in parts]) if parts else None}
    if parts and "rate" in parts[0]:
        result["rate"] = torch.cat([p["rate"] for p in parts], dim=1)
        result["t"] = parts[0]["t"]
    return result
