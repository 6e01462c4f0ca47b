"""The GGUF format's constants — metadata keys, value and tensor types, block sizes, llama.cpp's architecture and
tensor names — as the ``gguf`` package defines them in ``gguf/constants.py``, without the rest of the package.

``import gguf`` runs the package's ``__init__``, which also imports its writer, its vocabularies (sentencepiece)
and its metadata module (yaml): +4.4 MB resident on a device that only reads GGUF files (docs/PERFORMANCE.md,
"Memory"). ``constants.py`` imports the standard library only, so it is executed here on its own, as this
module's :data:`C`. Where ``gguf`` is imported already (the converters), its own module is used. Its enums are
IntEnums: members compare and hash by value, so types read through either go through ``gguf.quants`` alike.
Code that needs the package's functions (dequantize, the writer, the tensor name map) imports ``gguf`` where it
runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _constants() -> ModuleType:
    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    spec = importlib.util.find_spec("gguf")  # finds the package without running its __init__
    path = Path(spec.submodule_search_locations[0]) / "constants.py" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():  # another layout of the package: import it whole
        import gguf

        return gguf.constants
    own = importlib.util.spec_from_file_location("edgeadapt.formats._gguf_constants", path)
    mod = importlib.util.module_from_spec(own)
    own.loader.exec_module(mod)
    return mod


C = _constants()
