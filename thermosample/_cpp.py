"""Loads the compiled CPU extension thermosample._C once; a flag and one warning when it is missing."""
from __future__ import annotations

try:
    from . import _C  # type: ignore[attr-defined]
    _LOAD_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the build
    _C = None
    _LOAD_ERROR = exc


def available() -> bool:
    """True when thermosample._C imported and provides the fused step."""
    return _C is not None and hasattr(_C, "fused_step")


def version() -> str | None:
    return getattr(_C, "version", lambda: None)() if _C is not None else None
