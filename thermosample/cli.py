"""Moved to thermosample.apps.cli (the console script's target); this old name works for one more release."""
from .apps.cli import main  # noqa: F401
from .errors import warn_moved

warn_moved("thermosample.cli", "thermosample.apps.cli")
