"""The ``edgeadapt`` command line (``main``): one module per group of commands, imported lazily."""

from edgeadapt.cli.core import main

__all__ = ["main"]
