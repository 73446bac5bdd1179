"""The errors a user can fix: a bad argument, an input that is missing or unreadable, a missing extra.

Each subclasses `PeJaxError` and the builtin it was before (`UsageError` is a `ValueError`, `NotFound` a
`FileNotFoundError`), so `except ValueError` callers keep working. The command line prints a `PeJaxError` in one
line and exits 2; any other exception is a bug and keeps its traceback (`pe-jax --debug` shows a
`PeJaxError`'s too).

Example:
    >>> from pe_jax.errors import PeJaxError, UsageError
    >>> try:
    ...     raise UsageError("--batch-size must be >= 1, got 0")
    ... except ValueError as e:
    ...     isinstance(e, PeJaxError)
    True
"""

from __future__ import annotations


class PeJaxError(Exception):
    """An error the user can fix from its message alone (the command line shows it in one line).

    Args:
        message: what is wrong and what to do, in one line.

    Example:
        >>> issubclass(UsageError, PeJaxError)
        True
    """


class UsageError(PeJaxError, ValueError):
    """An argument, flag or configuration value that cannot work (out of range, unknown name, a clash)."""


class InputError(PeJaxError, ValueError):
    """An input the user named that exists but cannot be used (empty, not UTF-8, a bad row, not a tar)."""


class NotFound(PeJaxError, FileNotFoundError):
    """An input, checkpoint or folder the user named that does not exist."""


class AlreadyExists(PeJaxError, FileExistsError):
    """An output the user named exists and pe-jax will not replace it (without --force, or not its own)."""


class NoPermission(PeJaxError, PermissionError):
    """A folder or file the user named that pe-jax may not write (or a lock file it will not use)."""


class InUse(PeJaxError, BlockingIOError):
    """An output another pe-jax process is writing now (it holds the output's lock)."""


class WrongType(PeJaxError, TypeError):
    """A value of the wrong type passed by the user (a recipe's get_config() result, a text that is no string)."""


class MissingDependency(PeJaxError, ImportError):
    """An optional extra a command needs is not installed (names the pip install line)."""


def install_hint(extra: str, packages: str) -> str:
    """How to install an optional extra: pe-jax installs from its checkout (it is on no package index), so
    `pip install 'pe-jax[cloud]'` cannot work; the extra from the checkout, or its packages by name, can.

    Args:
        extra: the extra's name in pyproject.toml (cloud, index, onnx, video, ray, hf).
        packages: the packages it installs, space-separated, for `pip install` by name.

    Example:
        >>> install_hint("cloud", "fsspec s3fs gcsfs")
        "pip install -e '.[cloud]' from the pe-jax checkout (or: pip install fsspec s3fs gcsfs)"
    """
    return f"pip install -e '.[{extra}]' from the pe-jax checkout (or: pip install {packages})"


def check_positive(**values: int | None):
    """Each of `values` (batch_size=0, ...) must be >= 1 where given: the one check of sizes, for the library
    and the command line alike ('--batch-size must be >= 1, got 0').

    Args:
        values: flag names (underscores for dashes) and their values; None is skipped (not given).

    Example:
        >>> check_positive(batch_size=32, workers=4)
        >>> check_positive(part_size=0)
        Traceback (most recent call last):
        ...
        pe_jax.errors.UsageError: --part-size must be >= 1, got 0
    """
    for name, value in values.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
