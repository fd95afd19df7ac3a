"""Exceptions and warnings raised by thermosample."""


class NonFiniteError(FloatingPointError):
    """The model output or the sampler state became NaN or Inf.

    Attributes:
        step: index of the first solver step at which a non-finite value appeared.
        sample: index (within the batch, plus sample_offset) of the first affected sample.
    """

    def __init__(self, message: str, step: int | None = None, sample: int | None = None):
        super().__init__(message)
        self.step = step
        self.sample = sample


class BackendUnavailableWarning(RuntimeWarning):
    """A requested kernel backend is missing; the pure-PyTorch reference runs instead."""


class ThermosampleDeprecationWarning(DeprecationWarning):
    """A public name that moved or changed still works for one more release; the message names the new one.
    The CLI shows it (Python hides a DeprecationWarning raised outside __main__ by default)."""


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    """Say that the public name `old` moved to `new` and goes in the next release."""
    import warnings
    warnings.warn(f"{old} moved to {new}; the old name will be removed in the next release",
                  ThermosampleDeprecationWarning, stacklevel=stacklevel)
