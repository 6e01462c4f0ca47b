"""edgeadapt: one frozen base model, many small adapters, on CPU- and mobile-class devices.

    import edgeadapt
    m = edgeadapt.load("out/base", engine="auto")
    m.add_adapter("billing.gguf", name="billing")
    m.use("billing")
    print(m.generate("Where is my invoice?"))
"""

from edgeadapt.errors import (AdapterMismatchError, AdapterNotFoundError, EdgeAdaptError, FormatError, IntegrityError,
                     MissingDependencyError, UnsupportedError, UsageError)

__all__ = ["load", "read_delta", "sync", "EdgeAdaptError", "AdapterMismatchError", "AdapterNotFoundError", "FormatError",
           "IntegrityError", "MissingDependencyError", "UnsupportedError", "UsageError"]
__version__ = "0.1.0"


def __getattr__(name: str):  # nothing heavy at import time
    if name == "load":
        from edgeadapt.runtime.model import load
        return load
    if name == "sync":
        from edgeadapt.ship.sync import sync
        return sync
    if name == "read_delta":
        from edgeadapt.formats.delta import read_delta
        return read_delta
    raise AttributeError(f"module 'edgeadapt' has no attribute {name!r}")
