"""Argument checks shared by the entry points (ts.sample, the fused op, the integrations), each written
once: a bad argument gets a ValueError/TypeError naming it, before any model call or kernel runs."""
from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import torch

UINT32 = 2 ** 32
UINT64 = 2 ** 64


def is_int(value) -> bool:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, name: str, low: int = 1, high: int | None = None) -> int:
    """An int (a Python int or a NumPy integer, not a bool) in [low, high), returned as a Python int:
    TypeError for another kind (a string, a float, None), ValueError for a value out of range."""
    if isinstance(value, np.integer):
        value = int(value)
    rule = f"an int >= {low}" if high is None else f"an int in [{low}, {_power(high)})"
    if not is_int(value):
        raise TypeError(f"{name} must be {rule}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


def check_sample_shape(value) -> tuple[int, ...]:
    """The shape of one sample (without the batch) as a tuple of ints >= 1; an int n means (n,)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"sample_shape must be a tuple of ints like (C, H, W), got {value!r}")
    return tuple(check_int(s, "sample_shape entries") for s in value)


def _power(n: int) -> str:
    """2**k for a power of two, else the number."""
    k = n.bit_length() - 1
    return f"2**{k}" if k > 8 and n == 1 << k else str(n)


def check_seed(seed, name: str = "seed") -> int:
    """The Philox seed: an int in [0, 2**64) (a Python int or a NumPy integer such as np.int64 /
    np.uint64), returned as a Python int."""
    return check_int(seed, name, 0, UINT64)


def seed_from_generator(generator) -> int:
    """The Philox seed drawn from a torch.Generator: one uniform 64-bit draw,
    ``torch.empty((), dtype=torch.int64, device=generator.device).random_(-2**63, None, generator=generator)``
    read as an unsigned int. Reproducible (the same generator state gives the same seed) and it advances
    the generator by one draw, so successive calls with one generator give different samples, as with
    torch's own sampling functions. A CUDA generator costs one host sync, before any model call."""
    if not isinstance(generator, torch.Generator):
        kind = "a list of generators" if isinstance(generator, (list, tuple)) else type(generator).__name__
        raise TypeError(f"generator must be one torch.Generator, got {kind}; thermosample keys the noise of "
                        "sample i by (seed, i), so one generator (one seed) serves the whole batch")
    draw = torch.empty((), dtype=torch.int64, device=generator.device).random_(-2 ** 63, None, generator=generator)
    return int(draw) % UINT64


def resolve_seed(seed, generator, default: int = 0) -> int:
    """The run's Philox seed from `seed=` and `generator=` (the rule of ts.sample):

    - `seed` given: that seed (an int or NumPy integer in [0, 2**64));
    - `generator` given: one 64-bit draw from it (`seed_from_generator`);
    - neither: `default` (0);
    - both: ValueError, since they would disagree.
    """
    if generator is not None:
        if seed is not None:
            raise ValueError("pass seed= or generator=, not both (with a generator the seed is one draw from it)")
        return seed_from_generator(generator)
    return check_seed(default if seed is None else seed)


def import_optional(module: str, extra: str, feature: str):
    """Import an optional dependency (e.g. "matplotlib.figure"); when its package is not installed, raise a
    ModuleNotFoundError that names the feature and the install command (pip install 'thermosample[extra]')
    instead of a bare one from deep inside the call."""
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name not in (None, top, module) and not str(exc.name).startswith(top + "."):
            raise                                  # the package is there; something it needs is not
        raise ModuleNotFoundError(f"{feature} needs the optional package {top!r}: pip install "
                                  f"'thermosample[{extra}]' (or pip install {PIP_NAMES.get(top, top)})",
                                  name=top) from exc


PIP_NAMES = {"sklearn": "scikit-learn", "k_diffusion": "k-diffusion"}


def check_sample_offset(sample_offset, batch: int = 1) -> int:
    """The global index of the first sample: an int >= 0 with sample_offset + batch <= 2**32 (the Philox
    sample counter is 32 bits wide)."""
    sample_offset = check_int(sample_offset, "sample_offset", 0)
    if sample_offset + batch > UINT32:
        raise ValueError(f"sample_offset + batch size must be <= 2**32 (the Philox sample counter), got "
                         f"{sample_offset} + {batch}")
    return sample_offset


def real_number(value, name: str) -> float:
    """A finite real number as a Python float (ValueError for NaN, Inf or an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an int of {len(str(value))} digits") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def check_noise(noise) -> torch.Tensor:
    """An initial state x_T: a floating-point tensor [B, ...] with B >= 1."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if noise.dim() < 1 or noise.shape[0] < 1 or noise.numel() == 0:
        raise ValueError(f"noise must have shape [B, ...] with B >= 1, got {tuple(noise.shape)}")
    return noise


def check_shape(shape) -> tuple[int, ...]:
    """A sample shape (B, ...) of positive ints: TypeError for something else than a tuple/list of ints,
    ValueError for an empty one or an entry < 1."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple of positive ints like (B, C, H, W), got {shape!r}")
    if len(shape) < 1:
        raise ValueError(f"shape must be a non-empty tuple of positive ints like (B, C, H, W), got {shape!r}")
    return tuple(check_int(n, f"shape entries (shape={tuple(shape)!r})") for n in shape)


def check_callable(value, name: str) -> None:
    """None or a callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable (or None), got {type(value).__name__}")


def check_extra_args(extra_args) -> dict:
    """Keyword arguments for every model call: None or a dict."""
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the model, got "
                        f"{type(extra_args).__name__}")
    return extra_args or {}


_NONNEGATIVE_OPTIONS = ("churn", "eta", "s_noise", "s_tmin", "s_tmax")
_SEQUENCE_OPTIONS = ("corrections",)


def check_solver_options(options: dict, defaults: dict | None = None) -> None:
    """Numeric solver knobs are real numbers; churn, eta, s_noise and the churn window are >= 0 (s_tmax may
    be inf). An option whose default is a string (e.g. solver_type) takes a string; its solver checks it.
    One whose default is None (e.g. unipc's max_h: off) also takes None. A sequence option (deis's
    corrections) is checked by its solver."""
    for name, value in options.items():
        if defaults is not None and defaults.get(name, 0) is None and value is None:
            continue
        if name in _SEQUENCE_OPTIONS:
            continue
        if defaults is not None and isinstance(defaults.get(name), str):
            if not isinstance(value, str):
                raise TypeError(f"solver option {name} must be a string, got {value!r}")
            continue
        if name == "s_tmax" and isinstance(value, float) and value == math.inf:
            continue
        if name == "order" and not is_int(value):    # lms: the solver names the valid range
            raise TypeError(f"solver option order must be an int, got {value!r}")
        value = real_number(value, f"solver option {name}")
        if name in _NONNEGATIVE_OPTIONS and value < 0:
            raise ValueError(f"solver option {name} must be >= 0, got {value!r}")


def model_device(den) -> torch.device | None:
    """The device of the wrapped model's first parameter (None when it has none)."""
    params = getattr(getattr(den, "model", None), "parameters", None)
    if callable(params):
        p = next(iter(params()), None)
        if p is not None:
            return p.device
    return None


def sample_device(den, noise, device) -> torch.device:
    """Where the samples live: noise's device, else `device`, else the model's, else CPU; refuses the meta
    device, a `device` that contradicts `noise`, and a model on another device type than the samples."""
    want = None
    if device is not None:
        try:
            want = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string like 'cuda:0', got {device!r}") from exc
    param_device = model_device(den)
    dev = noise.device if noise is not None else (want or param_device or torch.device("cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} was asked for but CUDA is not available (torch {torch.__version__}); "
                         "sample on device='cpu' or install a CUDA build of torch")
    if dev.type == "meta":
        raise ValueError("sampling needs a device with data; got the meta device (noise= or device=)")
    if noise is not None and want is not None and (
            want.type != noise.device.type or want.index not in (None, noise.device.index)):
        raise ValueError(f"device={device!r} but noise is on {noise.device}; pass one or make them agree")
    if param_device is not None and param_device.type != dev.type:
        raise ValueError(f"the model's parameters are on {param_device} but the samples would be on {dev}; "
                         "move the model or pass noise/device on the same device")
    return dev


def open_regular(path: str):
    """A binary file object reading the regular file at `path` (symlinks followed). Anything else there - a
    FIFO, a device, a socket, a directory - is a ValueError, found before and after opening: opening or
    reading a FIFO with no writer would wait forever, so the open never blocks (O_NONBLOCK)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):   # replaced between the two looks
            raise ValueError(f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


MAX_JSON_DEPTH = 32     # nesting a thermosample JSON file may have (a manifest or grid needs 4)


def parse_json(text, what: str, max_depth: int = MAX_JSON_DEPTH):
    """`text` (str or bytes) parsed as JSON, nested at most `max_depth` deep; ValueError naming `what` for
    anything else, including input so deep that the parser or a later comparison would recurse past
    Python's limit (RecursionError) and integers too long to read."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:      # UnicodeDecodeError is a ValueError
        raise ValueError(f"{what} is not valid JSON: {str(exc)[:200] or type(exc).__name__}") from None
    check_json_depth(value, what, max_depth)
    return value


def check_json_depth(value, what: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """ValueError when lists/dicts in `value` nest deeper than `max_depth` (walked without recursion)."""
    level = [value]
    for _ in range(max_depth):           # after i rounds `level` holds the containers i + 1 deep
        level = [c for v in level if isinstance(v, (list, dict))
                 for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (list, dict))]
        if not level:
            return
    raise ValueError(f"{what} nests deeper than {max_depth} levels")


def read_json_file(path: str, what: str, max_bytes: int):
    """The JSON value of the regular file at `path`, at most `max_bytes` long (see `open_regular` and
    `parse_json`); ValueError for a file that is not regular, too large or not such JSON."""
    with open_regular(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{what} {path} is larger than {max_bytes} bytes")
    return parse_json(data, f"{what} {path}")
