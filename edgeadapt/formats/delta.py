"""The delta file: one adapter, pinned to one base, in llama.cpp's GGUF LoRA layout.

Spec (mirrored in docs/FORMAT.md). A delta file is a GGUF v3 file (tensor data aligned to
``general.alignment``, default 32) that

- MUST set ``general.type = "adapter"`` and ``general.architecture`` to the base's GGUF architecture;
- MUST set ``adapter.type = "lora"`` when every factor is F32, F16 or Q8_0 and there is no bias, so
  llama.cpp loads it as a LoRA adapter; ``"edgeadapt-int8-lora"`` / ``"edgeadapt-int4-lora"`` for
  grouped-integer factors and ``"edgeadapt-lora-bias"`` for a LoRA with bias changes (of any
  other storage), which llama.cpp refuses by name instead of misreading;
- MUST set ``adapter.lora.alpha = 0``: every per-module scale (alpha/r, alpha/√r for rsLoRA,
  rank_pattern / alpha_pattern) is folded into ``lora_b``, and llama.cpp applies a LoRA with
  alpha 0 at exactly the user's scale — so llama.cpp computes what the training library computed;
- MUST set ``edgeadapt.format = "edgeadapt.delta"`` and ``edgeadapt.format_version`` (uint32, 2);
- MUST set ``edgeadapt.base.fingerprint`` to the fingerprint of the base it was made for
  (:mod:`edgeadapt.formats.fingerprint`); a runtime MUST refuse it on any other base;
- MUST set ``edgeadapt.adapter.name`` (string), ``edgeadapt.adapter.version`` (uint32; it only goes
  up between releases of one adapter, and a store refuses an older one unless asked to roll back)
  and ``edgeadapt.adapter.kind`` (``"lora"`` here; other kinds: :mod:`edgeadapt.formats.delta_kinds`);
- MUST set ``edgeadapt.quant`` (string) to how the factors are stored: ``F32``, ``F16``, ``Q8_0``,
  ``int8`` or ``int4``; for int8 / int4 also ``edgeadapt.quant.group_size`` (uint32 G, even, 2…4096);
- holds, for each adapted linear weight ``W`` of the base (GGUF name ``<w>``), the factors of
  ``ΔW = B @ A`` (float32 [out, in]), each ``<w>`` once with both factors of one rank r ≥ 1:

  - F32 / F16 / Q8_0: ``<w>.lora_a`` = A [r, in] and ``<w>.lora_b`` = B [out, r] (numpy order; ggml
    ``ne`` is reversed) of that GGUF type; a Q8_0 file stores a factor whose last dimension is not a
    multiple of 32 as F16 (llama.cpp's rule);
  - int8 / int4, rank-major: ``<w>.lora_a`` holds A [r, in] and ``<w>.lora_b`` holds Bᵀ [r, out] as
    GGUF I8 tensors — int8: one code in -127…127 per value, shape [r, n]; int4: two codes per byte
    (low nibble first, each stored as code + 8 in 0…15), shape [r, n/2], n even. Each row is cut
    into groups of G values (the last group may be shorter); ``<w>.lora_a.scale`` /
    ``<w>.lora_b.scale`` [r, ⌈n/G⌉], F32 or F16, hold each group's scale: value = code × scale;

  the rows of B for ``attn_q`` / ``attn_k`` of "norm"-rope architectures are permuted as the base's
  rows are;
- MAY hold, for an adapted ``<w>``, ``<w>.lora_bias`` = Δb [out] (F32 whatever the factor storage;
  PEFT ``lora_bias``: the bias of lora_B times the module's scale), rows permuted as B's: the layer
  then computes ``x Wᵀ + b + (x Aᵀ) Bᵀ + Δb``;
- MUST set ``edgeadapt.integrity`` to a 71-byte string ``sha256:<hex>``: sha256 of the tag
  ``edgeadapt-delta-v2\\0`` and every byte of the file, with the 71 bytes of this value read as
  zero bytes. It covers header, metadata, tensor infos, padding and data; a reader MUST check it;
- MUST set ``edgeadapt.signature`` to a 153-byte string: ``unsigned`` padded with spaces, or
  ``ed25519:<key id>:<signature>`` (16 + 128 lowercase hex): an Ed25519 signature of the tag
  ``edgeadapt-delta-sig-v1\\0`` followed by the sha256 of the file with the integrity and the
  signature values both read as zero bytes, made by the key whose sha256 starts with the key id.
  Signing fills this slot in place and then recomputes the integrity, so no byte moves;
- MAY set ``edgeadapt.source`` (what it was converted from), ``edgeadapt.adapter.description``,
  ``general.name``, and ``edgeadapt.base.asserted_by`` (string: a file imported from another tool's
  format carried no fingerprint; the importer checked what it could and asserted the base). Readers
  MUST ignore keys they do not know.

Version 1 (edgeadapt 0.1) files are still read: F32 / F16 factors, no ``edgeadapt.quant`` or
signature, and ``edgeadapt.integrity`` is the sha256 of the canonical encoding of every other
key/value (sorted by key) and every tensor's name, type, shape and bytes in file order. They are
signed by re-writing them as version 2.

Readers validate the whole file before anything is used and never trust a size: every count,
string, array, dimension and tensor extent is checked against the bytes present before anything is
allocated (at most 65,536 tensors and 4,096 keys); tensor data MUST lie in the data section,
aligned and without overlap; duplicate names, unknown types, wrong dtypes or shapes, unpaired
factors and NaN/Inf values (after dequantization) are refused, naming every problem at once.
This module imports only numpy, gguf and the standard library: it is used on devices.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeadapt.formats.delta_container import (INTEGRITY_LEN, INTEGRITY_TAG, MAX_DEPTH, MAX_KEY, MAX_KV, MAX_TENSORS,  # noqa: F401
                              SIGNATURE_LEN, SIGNATURE_TAG, UNSIGNED, _Container, _T, _array, _slots, parse_gguf,
                              signature_message, with_signature)
from edgeadapt.formats.delta_kinds import KIND_QUANTS, AdapterBase, KindAdapter, LiveTerms, group_tensors, kind_class
from edgeadapt.errors import FormatError, IntegrityError, UnsupportedError, collect
from edgeadapt.formats.delta_storage import (BIAS_SUFFIX, BITS, FACTOR_SUFFIXES, K_ADAPTER_TYPE,  # noqa: F401
                                             K_ADAPTER_VERSION, K_ALIGNMENT, K_ALPHA, K_ARCH, K_DESCRIPTION,
                                             K_FINGERPRINT, K_FORMAT, K_GROUP, K_INTEGRITY, K_KIND, K_NAME, K_QUANT,
                                             K_SIGNATURE, K_SOURCE, K_TYPE, K_VERSION, MAGIC, QUANTS, READS, REQUIRED,
                                             REQUIRED_V2, ROLES, SCALE_TYPES, VERSION, _check_v1, _check_v2, _encode,
                                             _factors, _lora_type, _scale_dtype, dequantize_rows,
                                             quantize_rows)


@dataclass
class LoraDelta(AdapterBase):
    """A loaded LoRA delta: ``factors[w] = (A [r, in], B [out, r])`` in float32, scale folded into B;
    ``biases[w] = Δb [out]`` for PEFT ``lora_bias`` adapters."""

    name: str
    version: int
    arch: str
    fingerprint: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str = ""
    description: str = ""
    path: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    quant: str = "F32"  # how the factors were stored (they are float32 here)
    format_version: int = VERSION
    integrity: str = ""
    signature: str = ""  # "ed25519:<key id>:<hex>" or "" when unsigned
    signed_digest: bytes | None = None  # what a signature signs (version 2 files only)
    biases: dict[str, np.ndarray] = field(default_factory=dict)  # target -> Δb [out] (lora_bias)
    kind = "lora"
    mergeable = True
    needs_base = False
    live = True

    # ---- the adapter protocol
    @property
    def targets(self) -> list[str]:
        return list(self.factors)

    @property
    def heads(self) -> dict[str, int]:  # rows are stored permuted: nothing to permute
        return {}

    def delta(self, target: str, base: np.ndarray | None = None) -> np.ndarray:
        """ΔW for one target, float32 [out, in]."""
        a, b = self.factors[target]
        return b @ a  # [out, r] @ [r, in]

    def live_factors(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        return self.factors[target]

    def release(self) -> bool:
        f = self.factors
        return f.release() if isinstance(f, MappedFactors) else False

    def live_terms(self, target: str, base: np.ndarray | None = None) -> LiveTerms:
        a, b = self.factors[target]
        return LiveTerms(a=a, b=b, bias=self.biases.get(target))

    def base_shape(self, target: str) -> tuple[int, int]:
        a, b = self._shapes(target)
        return (b[0], a[1])

    def _shape_problem(self, target: str, want: tuple[int, ...]) -> str:
        a, b = self._shapes(target)
        return (f"{target}: expected lora_a [r, {want[1]}] and lora_b [{want[0]}, r], "
                f"found {list(a)} and {list(b)}")

    def _extra_problems(self, cfg) -> list[str]:
        linear, shapes = cfg.linear_shapes(), cfg.tensor_shapes()
        out = [f"{w}: not a linear weight of this base" for w in self.factors if w in shapes and w not in linear]
        for w, d in self.biases.items():
            if w not in self.factors:
                out.append(f"{w}: a bias change without factors")
            elif d.shape != (self._shapes(w)[1][0],):
                out.append(f"{w}: expected lora_bias [{self._shapes(w)[1][0]}], found {list(d.shape)}")
        return out

    @property
    def ranks(self) -> set[int]:
        return {self._shapes(t)[0][0] for t in self.factors}

    def _shapes(self, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(A's shape, B's shape), without reading a mapped file's factors."""
        f = self.factors
        if isinstance(f, MappedFactors):
            return f.shapes(target)
        return f[target][0].shape, f[target][1].shape

    @property
    def nbytes(self) -> int:
        return 4 * self.n_params  # float32

    @property
    def n_params(self) -> int:
        return (sum(int(np.prod(a)) + int(np.prod(b)) for a, b in map(self._shapes, self.factors))
                + sum(d.size for d in self.biases.values()))


# ---- writer
def write_delta(path: str | os.PathLike, adapter: Any = None, *, arch: str | None = None,
                fingerprint: str | None = None, name: str | None = None, version: int | None = None,
                factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                biases: dict[str, np.ndarray] | None = None, source: str | None = None,
                description: str | None = None, dtype: str = "F32", group_size: int = 32,
                metadata: dict[str, str] | None = None) -> None:
    """Write a delta file of any kind: ``adapter`` (a :class:`LoraDelta` or a registered
    :class:`~edgeadapt.formats.delta_kinds.KindAdapter`; keywords given override its fields), or a LoRA from
    keywords: ``factors[w] = (A [r, in], B [out, r])`` with the scale already in B, ``biases[w] = Δb``.

    ``dtype``: how tensors are stored — LoRA: F32, F16, Q8_0 (llama.cpp reads these three), int8 or
    int4 (edgeadapt only; per-group scales, ``group_size`` values per group); other kinds: F32 or F16.
    ``metadata``: more string keys (``edgeadapt.base.asserted_by``), written as given."""
    def pick(given: Any, attr: str, default: Any = None) -> Any:
        return given if given is not None else getattr(adapter, attr, default)

    arch, fingerprint, name = pick(arch, "arch"), pick(fingerprint, "fingerprint"), pick(name, "name")
    version, source, description = pick(version, "version", 1), pick(source, "source", ""), pick(description, "description", "")
    missing = [k for k, x in (("arch", arch), ("fingerprint", fingerprint), ("name", name)) if x is None]
    if missing:
        raise FormatError(f"cannot write a delta without {', '.join(missing)}")
    problems = []
    if not 0 <= int(version) < 2 ** 32:
        problems.append(f"version must fit in uint32, found {version}")
    head: list[tuple[str, str, object]] = [(K_TYPE, "STRING", "adapter")]
    if isinstance(adapter, KindAdapter):
        kind_class(adapter.kind)  # registered
        if dtype not in KIND_QUANTS:
            raise UnsupportedError(f"{adapter.kind} delta dtype {dtype!r} is not supported; choose one of "
                                   f"{', '.join(KIND_QUANTS)}")
        arrays = adapter.to_tensors()
        for n, x in arrays.items():
            if not np.isfinite(x).all():
                problems.append(f"{n}: holds NaN or Inf")
        if not arrays:
            problems.append("no tensors")
        collect(problems, FormatError, f"cannot write {adapter.kind} delta {name!r}:")
        dt = np.float32 if dtype == "F32" else np.float16
        tensors = [(n, np.ascontiguousarray(x, dt), None) for n, x in arrays.items()]
        head += [(K_ADAPTER_TYPE, "STRING", f"edgeadapt-{adapter.kind}")]
        kind, extra = adapter.kind, adapter.to_metadata()
    else:
        factors = pick(factors, "factors")
        biases = pick(biases, "biases") or {}
        if factors is None:
            raise FormatError(f"cannot write delta {name!r}: give an adapter or factors")
        if dtype not in QUANTS:
            raise UnsupportedError(f"delta dtype {dtype!r} is not supported; choose one of {', '.join(QUANTS)}")
        if dtype in BITS and (group_size < 2 or group_size > 4096 or group_size % 2):
            problems.append(f"group size must be even and in 2…4096, found {group_size}")
        for w, (a, b) in factors.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
                problems.append(f"{w}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank")
            elif not (np.isfinite(a).all() and np.isfinite(b).all()):
                problems.append(f"{w}: factors hold NaN or Inf")
            elif dtype == "int4" and (a.shape[1] % 2 or b.shape[0] % 2):
                problems.append(f"{w}: int4 packs two values per byte and needs even in/out sizes, found "
                                f"[{b.shape[0]}, {a.shape[1]}]; use int8")
        for w, d in biases.items():
            if w not in factors or d.shape != (factors[w][1].shape[0],) or not np.isfinite(d).all():
                problems.append(f"{w}: a bias change must be finite [out] beside this target's factors, found "
                                f"{list(d.shape)}{'' if w in factors else ' without factors'}")
        if not factors:
            problems.append("no factors")
        collect(problems, FormatError, f"cannot write delta {name!r}:")
        tensors = [t for w in factors for t in _encode(w, *factors[w], dtype, group_size)]
        tensors += [(w + BIAS_SUFFIX, np.ascontiguousarray(d, np.float32), None) for w, d in biases.items()]
        head += [(K_ADAPTER_TYPE, "STRING", _lora_type(dtype, bool(biases))), (K_ALPHA, "FLOAT32", 0.0)]
        kind, extra = "lora", ([(K_GROUP, "UINT32", int(group_size))] if dtype in BITS else [])
    kv = head + [(K_FORMAT, "STRING", MAGIC), (K_VERSION, "UINT32", VERSION), (K_FINGERPRINT, "STRING", fingerprint),
                 (K_NAME, "STRING", name), (K_ADAPTER_VERSION, "UINT32", int(version)), (K_KIND, "STRING", kind),
                 (K_QUANT, "STRING", dtype)] + extra
    kv += [(K_SOURCE, "STRING", source), (K_DESCRIPTION, "STRING", description), ("general.name", "STRING", name),
           (K_SIGNATURE, "STRING", UNSIGNED), (K_INTEGRITY, "STRING", "sha256:" + "0" * 64)]
    taken = {k for k, _, _ in kv}
    kv[-2:-2] = [(k, "STRING", str(x)) for k, x in (metadata or {}).items() if k not in taken]
    _write_file(Path(path), arch, kv, tensors)


def _write_file(path: Path, arch: str, kv: list[tuple[str, str, object]], tensors: list[tuple[str, np.ndarray, Any]]) -> None:
    import gguf  # the package's writer (writing only)

    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)  # writes general.architecture itself
    for key, vtype, value in kv:
        if vtype.startswith("ARRAY_"):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType[vtype[6:]])
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[vtype])
    for n, t, raw in tensors:
        writer.add_tensor(n, t, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = with_signature(tmp.read_bytes(), UNSIGNED, str(tmp))  # fills in the integrity
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- reader
def read_delta(path: str | os.PathLike) -> LoraDelta | KindAdapter:
    """Read and fully validate a delta file of any registered kind. Raises a :class:`FormatError`
    subclass on any defect."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        from edgeadapt.errors import UsageError
        raise UsageError(f"expected a delta file path (str or os.PathLike), found {type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such delta file")
    # memory-mapped and verified in one read; F32 factors are then read again, privately, only when first used
    # (MappedFactors): a loaded adapter that does not run holds no memory
    pages = _map(path)
    out = delta_from_bytes(pages, path)
    if isinstance(out, LoraDelta) and out.quant == "F32":  # else decoded into arrays of their own
        head = parse_gguf(pages, str(path)).data_start if out.format_version >= 2 else None
        out.factors = MappedFactors(pages, path, out.integrity, out.factors, head)
    _release(pages)
    return out


def _map(path: Path) -> Any:
    """The file's bytes, memory-mapped read-only (b"" when empty)."""
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(fh.fileno()).st_size else b""


def _release(pages: Any) -> None:
    """Drop a mapping's pages from this process's resident memory (they stay in the page cache)."""
    if isinstance(pages, mmap.mmap) and not pages.closed and hasattr(mmap, "MADV_DONTNEED"):
        pages.madvise(mmap.MADV_DONTNEED)


class MappedFactors(Mapping):
    """The F32 factors of a delta file read by :func:`read_delta`: names and shapes from the verified mapping, the
    arrays from one private copy of the file made when a factor is first read — parsed and verified again, and
    refused unless its integrity is the one verified at load. So an adapter that is loaded but never runs holds
    no memory (its pages leave resident memory once verified), and what runs is what was verified even if the
    file is rewritten in place after loading. :meth:`release` drops the copy once an engine holds its own (the
    model driver does, see ``Engine.copies_factors``); a later read makes and verifies another."""

    def __init__(self, pages: Any, path: Path, integrity: str, views: dict[str, tuple[np.ndarray, np.ndarray]],
                 head: int | None = None):
        self._pages, self._path, self._integrity = pages, path, integrity
        self._head = head  # where a version-2 file's tensor data starts: stream() reads such files
        self._shape = {w: (a.shape, b.shape) for w, (a, b) in views.items()}  # no view of the mapping is kept
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._lock = threading.Lock()

    def shapes(self, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self._shape[target]

    def __iter__(self) -> Iterator[str]:
        return iter(self._shape)

    def __len__(self) -> int:
        return len(self._shape)

    def __contains__(self, key: object) -> bool:
        return key in self._shape

    def __getitem__(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return self._read()[key]

    def __repr__(self) -> str:
        return f"MappedFactors({self._path}, {len(self)} targets{', read' if self._arrays is not None else ''})"

    def release(self) -> bool:
        """Drop the private copy (arrays already handed out stay valid); the next read makes and verifies a new
        one, refused by name if the file no longer holds the bytes verified at load."""
        with self._lock:
            self._arrays = None
        return True

    def _read(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            if self._arrays is None:
                data = bytes(self._pages)  # one private copy: the factors below are views of it
                _release(self._pages)
                try:
                    again = delta_from_bytes(data, self._path)
                except FormatError as e:  # IntegrityError included
                    raise self._changed(str(e)) from None
                if not isinstance(again, LoraDelta) or again.integrity != self._integrity:
                    raise self._changed(f"it now holds {getattr(again, 'integrity', 'another kind')}")
                self._arrays = dict(again.factors)
            return self._arrays

    @property
    def streams(self) -> bool:
        """Whether :meth:`stream` reads this file (version 2) without a private copy of the whole of it."""
        return self._head is not None

    def stream(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(target, A [r, in], B [out, r]) one target at a time, in file order: each factor a private copy of its
        bytes, hashed as read with everything around it (the header parsed from its own private copy), the pages
        read released as it goes. The file's integrity is checked after the last target, before the iterator
        ends: a consumer may copy the factors as they come but must use nothing until the loop is over — a file
        changed since loading raises there, named, and what was copied is to be dropped. A stream holds one
        target's factors (and any whose other half comes later in the file), where :meth:`_read` holds a copy
        of the whole file."""
        if self._head is None:
            raise UnsupportedError(f"{self._path}: a version-1 delta file is read whole, not streamed")
        pages, where = self._pages, str(self._path)
        head = bytes(pages[: self._head])
        try:
            c = parse_gguf(head, where, size=len(pages))
            integ, _ = _slots(c, where)
        except FormatError as e:
            raise self._changed(f"its header now reads: {e}") from None
        if c.data_start != self._head:
            raise self._changed(f"its tensor data now starts at byte {c.data_start}, not {self._head}")
        h = hashlib.sha256(INTEGRITY_TAG)
        h.update(head[: integ[0]])
        h.update(bytes(integ[1] - integ[0]))
        h.update(head[integ[1]:])
        del head
        halves: dict[str, dict[str, np.ndarray]] = {}
        pos, done = self._head, 0
        left = set(self._shape)
        step = 1 << 20  # read pages leave resident memory every MiB
        for t in sorted(c.tensors, key=lambda t: t.start):
            if t.start > pos:
                h.update(bytes(pages[pos:t.start]))
            w, role = _factor_role(t.name)
            if w in left and t.ttype == _T.F32:
                x = np.empty(t.shape, np.float32)
                x.reshape(-1).view(np.uint8)[:] = np.frombuffer(pages, np.uint8, t.nbytes, t.start)
                h.update(x)
                want = self._shape[w][0 if role == "a" else 1]
                if x.shape != want:
                    raise self._changed(f"{t.name} is now {list(x.shape)}, loaded as {list(want)}")
                if not np.isfinite(x).all():
                    raise self._changed(f"{t.name} now holds NaN or Inf")
                half = halves.setdefault(w, {})
                half[role] = x
                if len(half) == 2:
                    del halves[w]
                    left.discard(w)
                    yield w, half["a"], half["b"]
            else:  # biases, or anything else: hashed only
                h.update(bytes(pages[t.start:t.start + t.nbytes]))
            pos = t.start + t.nbytes
            if pos - done >= step and hasattr(mmap, "MADV_DONTNEED"):
                cut = pos // mmap.PAGESIZE * mmap.PAGESIZE
                pages.madvise(mmap.MADV_DONTNEED, done, cut - done)
                done = cut
        h.update(bytes(pages[pos:]))
        _release(pages)
        got = "sha256:" + h.hexdigest()
        if got != self._integrity:
            raise self._changed(f"it now hashes to {got}")
        if left:  # the verified file had them: unreachable unless the hash were broken
            raise self._changed(f"{sorted(left)[0]} is missing")

    def _changed(self, found: str) -> IntegrityError:
        return IntegrityError(f"{self._path}: the file changed after it was loaded (verified as {self._integrity}; "
                              f"{found}); nothing of it runs: add the adapter again to load the new file")


def _factor_role(name: str) -> tuple[str, str]:
    """(target, "a" | "b") of a factor tensor's name, ("", "") for any other tensor."""
    for suffix in FACTOR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[-1]
    return "", ""


def delta_from_bytes(data: bytes, path: str | os.PathLike | None = None) -> LoraDelta | KindAdapter:
    """:func:`read_delta` of a file's bytes already in memory (``path``, if any, names it in messages). F32
    factors are read-only views of ``data``; other storage types are decoded into arrays of their own."""
    where = Path(path) if path is not None else Path("<bytes>")
    buf = memoryview(data)
    c = parse_gguf(buf, str(where))
    f = c.fields
    problems = [f"missing key {k!r}" if k not in f else f"key {k!r}: expected {t}, found {f[k].vtype}"
                for k, t in REQUIRED.items() if k not in f or f[k].vtype != t]
    if K_ALPHA in f and f[K_ALPHA].vtype != "FLOAT32":
        problems.append(f"key {K_ALPHA!r}: expected FLOAT32, found {f[K_ALPHA].vtype}")
    if K_FORMAT not in f and K_TYPE in f and f[K_TYPE].value == "adapter":  # llama.cpp's convert_lora_to_gguf.py
        kind = f[K_ADAPTER_TYPE].value if K_ADAPTER_TYPE in f else None
        raise FormatError(f"{where}: a GGUF adapter ({K_ADAPTER_TYPE}={kind!r}) from another tool, not an edgeadapt "
                          f"delta file: it carries no base fingerprint; import it once: edgeadapt import-adapter "
                          f"{where} --base BASE -o NEW.gguf")
    collect(problems, FormatError, f"{where}: not an edgeadapt delta file:")
    v = {k: x.value for k, x in f.items()}
    if v[K_FORMAT] != MAGIC or v[K_TYPE] != "adapter":
        raise FormatError(f"{where}: expected {K_FORMAT}={MAGIC!r} and general.type='adapter'; "
                          f"found {v[K_FORMAT]!r}, {v[K_TYPE]!r}")
    if v[K_VERSION] not in READS:
        raise UnsupportedError(f"{where}: delta format version {v[K_VERSION]}; this edgeadapt reads versions "
                               f"{list(READS)} — upgrade edgeadapt")
    common = dict(name=v[K_NAME], version=int(v[K_ADAPTER_VERSION]), arch=v[K_ARCH], fingerprint=v[K_FINGERPRINT],
                  source=str(v.get(K_SOURCE, "")), description=str(v.get(K_DESCRIPTION, "")),
                  path=None if path is None else str(path), metadata=v, format_version=int(v[K_VERSION]),
                  integrity=v[K_INTEGRITY])
    if v[K_KIND] != "lora":
        cls = kind_class(v[K_KIND], str(where))
        if v[K_VERSION] == 1:
            raise FormatError(f"{where}: a {v[K_KIND]} delta must be format version 2, found 1")
        quant, _, signature, signed = _check_v2(where, buf, c, v[K_KIND])
        return _kind_from(where, buf, c, cls, quant, v, dict(common, quant=quant, signature=signature,
                                                               signed_digest=signed))
    if float(v.get(K_ALPHA, 0.0)) != 0.0:
        raise FormatError(f"{where}: expected {K_ALPHA} = 0 (scales folded into lora_b), found {v[K_ALPHA]}")
    if v[K_VERSION] == 1:
        quant, group, signature, signed = _check_v1(where, buf, c), 0, "", None
        allowed: tuple[Any, ...] = (_T.F32, _T.F16)
    else:
        quant, group, signature, signed = _check_v2(where, buf, c, "lora")
        allowed = QUANTS[quant][1]
    factors, biases = _factors(where, buf, c, allowed, quant, group)
    return LoraDelta(factors=factors, biases=biases, quant=quant, signature=signature, signed_digest=signed, **common)


def _kind_from(where: Path, buf: memoryview, c: _Container, cls: type[KindAdapter], quant: str, v: dict[str, Any],
               fields: dict[str, Any]) -> KindAdapter:
    want = _T.F32 if quant == "F32" else _T.F16
    names, problems = group_tensors([t.name for t in c.tensors], cls)
    by_name = {t.name: t for t in c.tensors}
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for target, params in names.items():
        for param, n in params.items():
            t = by_name[n]
            if t.ttype != want:
                problems.append(f"{n}: expected type {want.name} ({K_QUANT} = {quant}), found {t.ttype.name}")
                continue
            if len(t.shape) not in cls.PARAMS[param]:
                problems.append(f"{n}: expected {' or '.join(map(str, cls.PARAMS[param]))} dimensions, found shape "
                                f"{list(t.shape)}")
                continue
            x = _array(buf, t).astype(np.float32)
            if not np.isfinite(x).all():
                problems.append(f"{n}: holds NaN or Inf")
                continue
            tensors.setdefault(target, {})[param] = x
    if not c.tensors:
        problems.append(f"no {cls.kind} tensors")
    collect(problems, FormatError, f"{where}: bad tensors:")
    return cls.from_tensors(v, tensors, **fields)
