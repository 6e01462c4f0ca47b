"""onnxruntime's ``.onnx_adapter`` files (FlatBuffer "TORT"), both ways, for the slotted graph.

Parameters are named after our graph's LoRA slot inputs: ``lora.<weight>.a`` [1, in, r] and
``lora.<weight>.b`` [1, r, out] with the scale folded into b, so a file works with onnxruntime's own
``LoraAdapter`` + ``RunOptions.add_active_adapter`` on ``model_lora.onnx`` and with our runtime.
The format has no room for our metadata beyond two integers: ``model_version`` carries the low 31
bits of the base fingerprint (a pin onnxruntime itself never checks; our loader does),
``adapter_version`` the adapter's version. Integrity and names are not carried: prefer the GGUF
delta file to ship, this one to interoperate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from edgeadapt.formats.delta import LoraDelta
from edgeadapt.errors import FormatError, MissingDependencyError, collect

_PARAM = re.compile(r"lora\.(.+)\.(a|b)")


def fingerprint_pin(fingerprint: str) -> int:
    """The 31 bits of a base fingerprint that fit ``model_version``."""
    return int(fingerprint.split(":", 1)[-1][:8], 16) & 0x7FFFFFFF


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(".onnx_adapter files need onnxruntime (pip install onnxruntime)") from e
    return ort


def write_onnx_adapter(delta: LoraDelta, path: str | os.PathLike) -> Path:
    ort = _ort()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(delta.version))
    fmt.set_model_version(fingerprint_pin(delta.fingerprint))
    params, keep = {}, []
    for w, (a, b) in delta.factors.items():
        at = np.ascontiguousarray(a.T[None], np.float32)  # [1, in, r]
        bt = np.ascontiguousarray(b.T[None], np.float32)  # [1, r, out]
        keep += [at, bt]
        params[f"lora.{w}.a"] = ort.OrtValue.ortvalue_from_numpy(at)
        params[f"lora.{w}.b"] = ort.OrtValue.ortvalue_from_numpy(bt)
    fmt.set_parameters(params)
    fmt.export_adapter(str(path))
    return Path(path)


def read_onnx_adapter(path: str | os.PathLike, *, arch: str, fingerprint: str, name: str | None = None) -> LoraDelta:
    """Read a ``.onnx_adapter`` written for our slotted graph; refuses one pinned to another base."""
    ort = _ort()
    path = Path(path)
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
        pin, version = int(fmt.get_model_version()), int(fmt.get_adapter_version())
    except Exception as e:
        raise FormatError(f"{path}: not a readable .onnx_adapter file: {e}") from e
    problems, pairs = [], {}
    for k, v in params.items():
        m = _PARAM.fullmatch(k)
        if not m or v.ndim != 3 or v.shape[0] != 1 or v.dtype != np.float32:
            problems.append(f"{k}: expected lora.<weight>.a|b float32 [1, …], found {v.dtype} {list(v.shape)}")
            continue
        if not np.isfinite(v).all():
            problems.append(f"{k}: holds NaN or Inf")
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = v[0]
    factors = {}
    for w, ab in pairs.items():
        if set(ab) != {"a", "b"} or ab["a"].shape[1] != ab["b"].shape[0]:
            problems.append(f"{w}: expected a [in, r] and b [r, out], found {sorted((k, list(v.shape)) for k, v in ab.items())}")
            continue
        factors[w] = (np.ascontiguousarray(ab["a"].T), np.ascontiguousarray(ab["b"].T))
    collect(problems, FormatError, f"{path}: bad parameters:")
    # a matching pin stands for the base; a file from elsewhere (pin 0) keeps a marker check_base refuses
    fp = fingerprint if pin == fingerprint_pin(fingerprint) else f"unknown (model_version {pin})"
    return LoraDelta(name=name or path.stem, version=version, arch=arch, fingerprint=fp, factors=factors,
                     source=f"onnx_adapter {path.name}", path=str(path))
