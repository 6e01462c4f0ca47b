"""The delta file: one adapter, pinned to one base, in llama.cpp's GGUF LoRA layout.

Spec (mirrored in docs/FORMAT.md). A delta file is a GGUF v3 file that

- MUST set ``general.type = "adapter"``, ``adapter.type = "lora"`` and ``general.architecture``
  to the base's GGUF architecture, so llama.cpp loads it as a LoRA adapter;
- MUST set ``adapter.lora.alpha = 0``: every per-module scale (alpha/r, alpha/√r for rsLoRA,
  rank_pattern / alpha_pattern) is folded into ``lora_b``, and llama.cpp applies a LoRA with
  alpha 0 at exactly the user's scale — so llama.cpp computes what the training library computed;
- MUST set ``edgeadapt.format = "edgeadapt.delta"`` and ``edgeadapt.format_version`` (uint32, 1);
- MUST set ``edgeadapt.base.fingerprint`` to the fingerprint of the base it was made for
  (:mod:`edgeadapt.fingerprint`); a runtime MUST refuse it on any other base;
- MUST set ``edgeadapt.adapter.name`` (string), ``edgeadapt.adapter.version`` (uint32) and
  ``edgeadapt.adapter.kind`` (``"lora"``);
- MUST set ``edgeadapt.integrity`` to ``sha256:<hex>`` of the canonical encoding of every other
  key/value (sorted by key; ``GGUF.*`` header fields and ``edgeadapt.integrity`` itself excluded)
  and every tensor's name, type, shape and bytes in file order; a reader MUST check it;
- holds, for each adapted linear weight ``W`` of the base (GGUF name ``<w>``), the tensors
  ``<w>.lora_a`` of shape [r, in] and ``<w>.lora_b`` of shape [out, r] (numpy order; ggml ``ne`` is
  reversed), F32 or F16, so that ``ΔW = lora_b @ lora_a`` (float32, [out, in]). The rows of
  ``lora_b`` for ``attn_q`` / ``attn_k`` of "norm"-rope architectures are permuted as the base's
  rows are. Each ``<w>`` appears once with both factors, of one rank r ≥ 1;
- MAY set ``edgeadapt.source`` (what it was converted from), ``edgeadapt.adapter.description``,
  ``general.name``. Readers MUST ignore keys they do not know.

Readers validate the whole file before anything is used: header counts against the file size,
required keys and their types, tensor pairs, ranks, dtypes, finiteness, and the integrity digest.
This module imports only numpy, gguf and the standard library: it is used on devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .arch import ArchConfig
from .errors import AdapterMismatchError, FormatError, IntegrityError, UnsupportedError, collect

MAGIC = "edgeadapt.delta"
VERSION = 1
FACTOR_SUFFIXES = (".lora_a", ".lora_b")

# ---- keys (gguf's own constants where gguf has them)
K_TYPE = "general.type"
K_ARCH = "general.architecture"
K_ADAPTER_TYPE = "adapter.type"
K_ALPHA = "adapter.lora.alpha"
K_FORMAT = "edgeadapt.format"
K_VERSION = "edgeadapt.format_version"
K_FINGERPRINT = "edgeadapt.base.fingerprint"
K_NAME = "edgeadapt.adapter.name"
K_ADAPTER_VERSION = "edgeadapt.adapter.version"
K_KIND = "edgeadapt.adapter.kind"
K_SOURCE = "edgeadapt.source"
K_DESCRIPTION = "edgeadapt.adapter.description"
K_INTEGRITY = "edgeadapt.integrity"
REQUIRED = {K_TYPE: str, K_ARCH: str, K_ADAPTER_TYPE: str, K_FORMAT: str, K_VERSION: int,
            K_FINGERPRINT: str, K_NAME: str, K_ADAPTER_VERSION: int, K_KIND: str, K_INTEGRITY: str}

MAX_TENSORS = 1 << 16  # a 100-layer model with every linear adapted needs ~1,400
MAX_KV = 1 << 12


@dataclass
class LoraDelta:
    """A loaded LoRA delta: ``factors[w] = (A [r, in], B [out, r])`` in float32, scale folded into B."""

    name: str
    version: int
    arch: str
    fingerprint: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str = ""
    description: str = ""
    path: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    kind = "lora"
    mergeable = True

    # ---- the adapter protocol
    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    def delta(self, target: str) -> np.ndarray:
        """ΔW for one target, float32 [out, in]."""
        a, b = self.factors[target]
        return b @ a  # [out, r] @ [r, in]

    def live_factors(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        return self.factors[target]

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _ in self.factors.values()}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())

    def check_base(self, cfg: ArchConfig, fingerprint: str) -> None:
        """Refuse, naming every mismatch at once, if this delta was not made for that base."""
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"base fingerprint: the adapter was made for {self.fingerprint}, this base is {fingerprint}")
        if self.arch != cfg.arch:
            problems.append(f"architecture: expected {cfg.arch!r}, found {self.arch!r}")
        shapes = cfg.linear_shapes()
        for w, (a, b) in self.factors.items():
            if w not in shapes:
                problems.append(f"{w}: not a linear weight of this base")
                continue
            out, inp = shapes[w]
            if a.shape[1] != inp or b.shape[0] != out:
                problems.append(f"{w}: expected lora_a [r, {inp}] and lora_b [{out}, r], "
                                f"found {list(a.shape)} and {list(b.shape)}")
        collect(problems, AdapterMismatchError,
                f"adapter {self.name!r} ({self.path or 'in memory'}) does not fit this base:")


# ---- integrity
def _digest(kv: Iterable[tuple[str, str, object]], tensors: Iterable[tuple[str, str, tuple, memoryview]]) -> str:
    h = hashlib.sha256(b"edgeadapt-delta-v1\0")
    for key, vtype, value in sorted(kv, key=lambda x: x[0]):
        if key.startswith("GGUF.") or key == K_INTEGRITY:
            continue
        h.update(json.dumps([key, vtype, value], sort_keys=True, default=_jsonable).encode() + b"\0")
    for name, ttype, shape, data in tensors:
        h.update(json.dumps([name, ttype, list(shape)]).encode() + b"\0")
        h.update(data)
    return "sha256:" + h.hexdigest()


def _jsonable(v: object) -> object:
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    raise TypeError(type(v))


# ---- writer
def write_delta(path: str | os.PathLike, *, arch: str, fingerprint: str, name: str, version: int,
                factors: dict[str, tuple[np.ndarray, np.ndarray]], source: str = "", description: str = "",
                dtype: str = "F32") -> None:
    """Write a LoRA delta file; ``factors[w] = (A [r, in], B [out, r])`` with the scale already in B."""
    import gguf

    if dtype not in ("F32", "F16"):
        raise UnsupportedError(f"delta dtype {dtype!r} is not supported; choose F32 or F16")
    problems = []
    for w, (a, b) in factors.items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{w}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank")
        elif not (np.isfinite(a).all() and np.isfinite(b).all()):
            problems.append(f"{w}: factors hold NaN or Inf")
    collect(problems, FormatError, f"cannot write delta {name!r}:")
    np_dtype = np.float32 if dtype == "F32" else np.float16
    tensors = []
    for w in factors:
        a, b = factors[w]
        tensors.append((w + ".lora_a", np.ascontiguousarray(a, dtype=np_dtype)))
        tensors.append((w + ".lora_b", np.ascontiguousarray(b, dtype=np_dtype)))
    kv: list[tuple[str, str, object]] = [
        (K_TYPE, "STRING", "adapter"), (K_ADAPTER_TYPE, "STRING", "lora"), (K_ALPHA, "FLOAT32", 0.0),
        (K_FORMAT, "STRING", MAGIC), (K_VERSION, "UINT32", VERSION), (K_FINGERPRINT, "STRING", fingerprint),
        (K_NAME, "STRING", name), (K_ADAPTER_VERSION, "UINT32", int(version)), (K_KIND, "STRING", "lora"),
        (K_SOURCE, "STRING", source), (K_DESCRIPTION, "STRING", description), (K_ARCH, "STRING", arch),
        ("general.name", "STRING", name),
    ]
    digest = _digest(kv, [(n, dtype, t.shape, memoryview(t).cast("B")) for n, t in tensors])
    tmp = Path(str(path) + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)  # writes general.architecture itself
    for key, vtype, value in kv:
        if key != K_ARCH:
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
    writer.add_string(K_INTEGRITY, digest)
    for n, t in tensors:
        writer.add_tensor(n, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)


# ---- reader
def _check_header(path: Path, size: int) -> None:
    """Refuse counts a file of this size cannot hold, before gguf's reader loops over them."""
    if size < 24:
        raise FormatError(f"{path}: expected a GGUF delta file, found {size} bytes (truncated)")
    with open(path, "rb") as f:
        head = f.read(24)
    magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", head)
    if magic != b"GGUF":
        raise FormatError(f"{path}: expected GGUF magic b'GGUF', found {magic!r}")
    if version != 3:
        raise FormatError(f"{path}: expected GGUF version 3, found {version}")
    if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
        raise FormatError(f"{path}: header claims {n_tensors} tensors; a {size}-byte file holds at most {min(MAX_TENSORS, size // 24)}")
    if n_kv > MAX_KV or n_kv * 12 > size:
        raise FormatError(f"{path}: header claims {n_kv} metadata keys; a {size}-byte file holds at most {min(MAX_KV, size // 12)}")


def read_delta(path: str | os.PathLike) -> LoraDelta:
    """Read and fully validate a delta file. Raises a :class:`FormatError` subclass on any defect."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such delta file")
    size = path.stat().st_size
    _check_header(path, size)
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {k: (f.types[0].name, f.contents()) for k, f in reader.fields.items()}
        tensors = list(reader.tensors)
    except Exception as e:  # the gguf reader raises IndexError, ValueError, struct.error, …
        raise FormatError(f"{path}: not a readable GGUF file (truncated or corrupt): {type(e).__name__}: {e}") from e

    problems = []
    for key, typ in REQUIRED.items():
        if key not in fields:
            problems.append(f"missing key {key!r}")
        elif not isinstance(fields[key][1], typ):
            problems.append(f"key {key!r}: expected {typ.__name__}, found {type(fields[key][1]).__name__}")
    collect(problems, FormatError, f"{path}: not an edgeadapt delta file:")
    v = {k: val for k, (_, val) in fields.items()}
    if v[K_FORMAT] != MAGIC or v[K_TYPE] != "adapter" or v[K_ADAPTER_TYPE] != "lora":
        raise FormatError(f"{path}: expected {K_FORMAT}={MAGIC!r}, general.type='adapter', adapter.type='lora'; "
                          f"found {v[K_FORMAT]!r}, {v[K_TYPE]!r}, {v[K_ADAPTER_TYPE]!r}")
    if v[K_VERSION] > VERSION:
        raise UnsupportedError(f"{path}: delta format version {v[K_VERSION]} is newer than this edgeadapt reads "
                               f"({VERSION}); upgrade edgeadapt")
    if v[K_KIND] != "lora":
        raise UnsupportedError(f"{path}: adapter kind {v[K_KIND]!r} is not supported by this version")
    if float(v.get(K_ALPHA, 0.0)) != 0.0:
        raise FormatError(f"{path}: expected {K_ALPHA} = 0 (scales folded into lora_b), found {v[K_ALPHA]}")

    allowed = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    raw: dict[str, np.ndarray] = {}
    records = []
    for t in tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        if t.name in raw:
            problems.append(f"{t.name}: duplicate tensor name")
            continue
        if t.tensor_type not in allowed:
            problems.append(f"{t.name}: expected type F32 or F16, found {t.tensor_type.name}")
            continue
        if not t.name.endswith(FACTOR_SUFFIXES):
            problems.append(f"{t.name}: expected a name ending in .lora_a or .lora_b")
            continue
        data = np.asarray(t.data)
        if data.dtype != allowed[t.tensor_type] or data.size != int(np.prod(shape)) or len(shape) != 2:
            problems.append(f"{t.name}: expected a 2-D {t.tensor_type.name} tensor of {shape}, found {data.size} values")
            continue
        raw[t.name] = data.reshape(shape)
        records.append((t.name, t.tensor_type.name, shape, memoryview(np.ascontiguousarray(data)).cast("B")))
    collect(problems, FormatError, f"{path}: bad tensors:")

    digest = _digest([(k, t, val) for k, (t, val) in fields.items()], records)
    if digest != v[K_INTEGRITY]:
        raise IntegrityError(f"{path}: integrity check failed: the file says {v[K_INTEGRITY]}, its contents hash to "
                             f"{digest}; the file was changed or damaged after it was written — download it again")

    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    targets = sorted({n[: -len(".lora_a")] for n in raw})
    for w in targets:
        a, b = raw.get(w + ".lora_a"), raw.get(w + ".lora_b")
        if a is None or b is None:
            problems.append(f"{w}: has {'lora_a' if a is not None else 'lora_b'} without its pair")
            continue
        if a.shape[0] != b.shape[1] or a.shape[0] < 1:
            problems.append(f"{w}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank")
            continue
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        if not (np.isfinite(a32).all() and np.isfinite(b32).all()):
            problems.append(f"{w}: factors hold NaN or Inf")
            continue
        factors[w] = (a32, b32)
    if not targets:
        problems.append("no lora_a / lora_b tensors")
    collect(problems, FormatError, f"{path}: bad tensors:")
    meta = {k: val for k, val in v.items() if not k.startswith("GGUF.")}
    return LoraDelta(name=v[K_NAME], version=int(v[K_ADAPTER_VERSION]), arch=v[K_ARCH], fingerprint=v[K_FINGERPRINT],
                     factors=factors, source=str(v.get(K_SOURCE, "")), description=str(v.get(K_DESCRIPTION, "")),
                     path=str(path), metadata=meta)
