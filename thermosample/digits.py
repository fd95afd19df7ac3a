"""Moved to thermosample.apps.digits (the digits model); this old name works for one more release."""
import sys

from .apps import digits as _digits
from .errors import warn_moved

warn_moved("thermosample.digits", "thermosample.apps.digits")
sys.modules[__name__] = _digits      # the old name is the module itself: its attributes and their identity
