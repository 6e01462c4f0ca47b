"""Arguments of the public API, checked where they enter: a wrong type or value is refused with a
:class:`~edgeadapt.errors.UsageError` naming what was expected and what was found, before anything changes.
numpy only."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeadapt.errors import AdapterMismatchError, AdapterNotFoundError, FormatError, UsageError


def _found(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:60] + '…' if len(text) > 60 else text}"


def adapter_source(source: Any) -> None:
    """``add_adapter``'s source: a path, a store name, or an adapter object (a loaded delta)."""
    if isinstance(source, (str, os.PathLike)):
        if not str(source):
            raise UsageError("add_adapter: expected a delta file, an .onnx_adapter or an installed name; found ''")
        return
    if not (hasattr(source, "check_base") and hasattr(source, "targets")):
        raise UsageError("add_adapter: expected a delta file path (str or os.PathLike), the name of an adapter in the "
                         f"store, or an adapter object from read_delta(); found {_found(source)}")


def adapter_name(name: Any, what: str = "name", optional: bool = True) -> None:
    if (name is not None or not optional) and (not isinstance(name, str) or not name):
        raise UsageError(f"{what}: expected a non-empty string, found {_found(name)}")


def use_spec(spec: Any) -> None:
    """``use()`` / a row of ``adapters=``: None, a name, names, or ``{name: weight}`` (weights checked later)."""
    if spec is None or isinstance(spec, str):
        return
    if isinstance(spec, Mapping):
        bad = [k for k in spec if not isinstance(k, str)]
    elif isinstance(spec, (list, tuple, set, frozenset)):
        bad = [k for k in spec if not isinstance(k, str)]
    else:
        raise UsageError(f"expected an adapter name, a list of names, {{name: weight}} or None; found {_found(spec)}")
    if bad:
        raise UsageError(f"adapter names must be strings; found {', '.join(_found(b) for b in bad)}")


def token_rows(ids: Any, vocab_size: int) -> np.ndarray:
    """Token ids ``[batch, seq]`` as int64: integers (no silent truncation of floats), in ``[0, vocab)``;
    a :class:`FormatError` (as before this module existed) names what is wrong."""
    try:
        arr = np.asarray(ids)
    except ValueError as e:  # ragged rows
        raise FormatError(f"expected token ids [batch, seq] of equal-length rows, found ragged rows ({e})") from None
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise FormatError(f"expected integer token ids, found dtype {arr.dtype}"
                         + (f" (e.g. {arr.flat[0]!r})" if arr.size and arr.dtype != object else ""))
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise FormatError(f"expected token ids [batch, seq], found shape {list(arr.shape)}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise FormatError(f"token ids must lie in [0, {vocab_size}); found {arr.min()}…{arr.max()}")
    return arr


def token_list(ids: Any, vocab_size: int) -> list[int]:
    """One prompt's token ids (a sequence of ints)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise UsageError(f"expected a list of token ids, found {_found(ids)}")
    return token_rows([list(ids)], vocab_size)[0].tolist()


def count(value: Any, what: str, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise UsageError(f"{what}: expected an integer ≥ {lo}, found {_found(value)}")
    return int(value)


def number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UsageError(f"{what}: expected a finite number, found {_found(value)}")
    return float(value)


def prompt(p: Any) -> None:
    """``generate``'s prompt: a string, token ids, or a non-empty list of strings."""
    if isinstance(p, str):
        return
    if isinstance(p, (list, tuple)) and p and all(isinstance(x, str) for x in p):
        return
    if isinstance(p, (list, tuple, np.ndarray)) and len(p) and all(isinstance(x, (numbers.Integral, np.integer))
                                                                  and not isinstance(x, bool) for x in p):
        return
    raise UsageError(f"prompt: expected a string, a list of strings or a list of token ids, found {_found(p)}")


def path(value: Any, what: str) -> None:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise UsageError(f"{what}: expected a path (str or os.PathLike), found {_found(value)}")


def choice(value: Any, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise UsageError(f"{what}: expected one of {', '.join(map(repr, allowed))}, found {_found(value)}")


UseSpec = str | Mapping[str, float] | Sequence[str] | None


def normalise_spec(spec: UseSpec, adapters: Mapping[str, Any]) -> dict[str, float]:
    """A ``use()`` spec (a name, names, ``{name: weight}`` or None) as {name: weight}, zero weights dropped;
    every name must be loaded and every weight a finite number (the decoder's and the encoder's rule)."""
    use_spec(spec)
    if spec is None:
        return {}
    if isinstance(spec, str):
        spec = {spec: 1.0}
    elif not isinstance(spec, Mapping):
        spec = {s: 1.0 for s in spec}
    missing = [n for n in spec if n not in adapters]
    if missing:
        raise AdapterNotFoundError(f"no adapter named {missing}; loaded: {sorted(adapters)}")
    bad = [f"{n}={w!r}" for n, w in spec.items()
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w)]
    if bad:
        raise AdapterMismatchError(f"adapter weights must be finite numbers, found {bad}")
    return {n: float(w) for n, w in spec.items() if w != 0}
