"""One root for every refusal edgeadapt makes.

Each subclass also derives from the builtin a caller would naturally catch, so
``except ValueError`` keeps working for code that does not know edgeadapt.
A message says what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class EdgeAdaptError(Exception):
    """Root of every error edgeadapt raises on purpose."""


class FormatError(EdgeAdaptError, ValueError):
    """A file is not what its format says it must be (truncated, corrupt, lying header)."""


class IntegrityError(FormatError):
    """A file's checksum or signature does not match its contents."""


class AdapterMismatchError(EdgeAdaptError, ValueError):
    """An adapter does not fit this base: other fingerprint, architecture, names or shapes."""


class UsageError(EdgeAdaptError, TypeError, ValueError):
    """A call or command was given an argument of the wrong type or value (None for a path, a float token id,
    a NaN weight, an output folder that does not exist)."""


class UnsupportedError(EdgeAdaptError, NotImplementedError):
    """A model, adapter kind or option edgeadapt does not handle (yet)."""


class MissingDependencyError(EdgeAdaptError, ImportError):
    """An optional dependency is needed for this call and is not installed."""


class AdapterNotFoundError(EdgeAdaptError, KeyError):
    """A name was asked for that is not a loaded adapter."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""


class UpdateError(EdgeAdaptError, ValueError):
    """An update was refused: repository metadata or a downloaded adapter failed TUF or edgeadapt checks,
    or the repository could not be reached; nothing installed was changed."""


def collect(problems: list[str], exc: type[EdgeAdaptError], head: str) -> None:
    """Raise ``exc`` once, naming every problem found, if there are any."""
    if problems:
        shown = problems[:20]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise exc(head + "\n  " + "\n  ".join(shown) + more)
