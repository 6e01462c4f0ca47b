"""The fingerprint of a base model's weights.

``sha256`` over every canonical tensor (see :mod:`edgeadapt.formats.arch`), in sorted name order, of
``name``, ``shape`` and the float32 little-endian bytes, prefixed with a domain tag. It is computed
once, from the float32 weights the exports were made from, and travels in the base manifest,
in ``model.gguf`` and in every delta file pinned to that base.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import numpy as np

TAG = b"edgeadapt-base-v1\0"


def fingerprint(weights: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(TAG)
    for name in sorted(weights):
        a = np.ascontiguousarray(weights[name], dtype="<f4")
        h.update(name.encode() + b"\0" + repr(tuple(a.shape)).encode() + b"\0")
        h.update(memoryview(a).cast("B"))
    return "sha256:" + h.hexdigest()


def short(fp: str) -> str:
    return fp.split(":", 1)[-1][:12]
