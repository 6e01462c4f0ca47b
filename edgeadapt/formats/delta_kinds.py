"""Adapter kinds in delta files: one protocol, one registry, one check against the base.

Spec (part of the delta file format). A delta file of any kind other than plain LoRA is the same
GGUF container as a LoRA file — the same required keys, integrity and signature slots, limits and
strict reader — with these differences:

- it MUST set ``edgeadapt.adapter.kind`` to the kind's registered name (``"dora"``, ``"ia3"``,
  ``"loha"``, ``"lokr"``, …) and ``adapter.type = "edgeadapt-<kind>"``, so llama.cpp refuses it
  by name instead of misreading it; ``adapter.lora.alpha`` is not set;
- it MUST set ``edgeadapt.quant`` to ``F32`` or ``F16``, the one GGUF type of all its tensors;
- it holds tensors named ``<target>.<param>``: ``<target>`` is the GGUF name of the base tensor
  the parameters change (a linear weight ``blk.0.attn_q.weight``, ``token_embd.weight``,
  ``output.weight``, a per-layer tensor ``blk.3.attn_norm.weight``) or a name the kind defines for
  something that is not a base tensor; ``<param>`` is one of the parameter names the kind declares
  (no dot), e.g. ``blk.0.attn_q.weight.dora_m``. Each target carries exactly one of the parameter
  sets its kind allows, of shapes consistent with each other and with the base tensor; values
  MUST be finite;
- a scalar per-target scale is folded into one of the target's tensors where that is exact, so
  no per-target scalar is stored;
- it MAY set ``edgeadapt.qk_heads`` (uint32 array ``[n_heads, n_kv_heads]``, 0 for a count no
  target uses): the parameters of
  ``attn_q`` / ``attn_k`` targets are then in the training library's row order and the change
  they make is row-permuted over these head counts, as the base's q/k rows are for llama.cpp's
  "norm" rope. A runtime MUST refuse such a file on a base with other head counts or rope;
- it MAY set more keys under ``edgeadapt.<kind>.``; readers ignore keys they do not know.

The Python protocol (:class:`KindAdapter`; plain LoRA, :class:`edgeadapt.formats.delta.LoraDelta`,
shares :meth:`AdapterBase.check_base`). A kind is a small class with

- ``kind`` (str), ``mergeable`` (its change can be folded into the base weights),
  ``needs_base`` (the change depends on the base weights), ``live`` (it can run beside the
  frozen weights), ``PARAMS`` (parameter name -> allowed numbers of dimensions); the other
  capabilities the model driver reads are declared on :class:`AdapterBase` with a plain LoRA's
  defaults (``low_rank``, ``biases``, ``embed_lora``, ``changes_embedding``, ``changes_head``,
  ``n_virtual``) and overridden by the kinds that differ;
- ``params`` (``{target: {param: float32 array}}``, exactly what the file stores) and
  ``heads`` (``{target: heads}`` for rows in the training library's q/k order);
- ``to_tensors()`` -> ``{"<target>.<param>": float32 array}`` and the class method
  ``from_tensors(meta, tensors, **fields)`` (``tensors`` grouped ``{target: {param: array}}``),
  which validates the parameter sets (``_param_problems``) and raises naming every problem;
- ``base_shape(target)``: the shape of the base tensor the parameters fit (``None`` for any
  size along an axis; ``None`` for a target that is not a base tensor, which the kind then
  checks in ``_extra_problems(cfg)``);
- ``delta(target, base=None)``: ΔW, float32 in the canonical layout, from the immutable base
  tensor when ``needs_base``; ``live_terms(target, base=None)``: the :class:`LiveTerms` of a live
  layer, or ``None`` when the kind cannot run live.

``register_kind(cls)`` adds a kind; ``kind_class(name)`` finds one, importing the module listed
for it in :data:`KIND_MODULES` on first use, so :func:`edgeadapt.formats.delta.read_delta` returns the
right object for any registered kind and :func:`edgeadapt.formats.delta.write_delta` writes any.
numpy, gguf and stdlib only.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, NamedTuple

import numpy as np

from edgeadapt.formats.arch import ArchConfig, permute_qk, qk_heads, unpermute_qk
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect

K_QK_HEADS = "edgeadapt.qk_heads"
KIND_QUANTS = ("F32", "F16")
_PARAM_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")

# kind name -> module that registers it when imported (read_delta imports it on first use)
KIND_MODULES: dict[str, str] = {"dora": "edgeadapt.kinds.lora_family", "ia3": "edgeadapt.kinds.lora_family", "loha": "edgeadapt.kinds.lora_family",
                                "lokr": "edgeadapt.kinds.lora_family", "bottleneck": "edgeadapt.kinds.bottleneck",
                                **{k: "edgeadapt.kinds.sequence" for k in ("embedding_lora", "trainable_tokens",
                                                                      "modules_to_save", "prompt_tuning", "prefix_tuning")}}
KINDS: dict[str, type["KindAdapter"]] = {}


class LiveTerms(NamedTuple):
    """What one adapter adds to one linear layer run live (canonical layout, x [N, in]):

    ``y = out_scale ⊙ ((x ⊙ in_scale) @ Wᵀ) + (x @ aᵀ) @ bᵀ + bias``; a missing term is the identity.
    Terms of several adapters on one layer add as their merged changes do: scales as
    ``1 + Σ wᵢ (sᵢ − 1)``, ``b`` and ``bias`` times their weight."""

    a: np.ndarray | None = None  # [r, in]
    b: np.ndarray | None = None  # [out, r]; every scale folded in
    in_scale: np.ndarray | None = None  # [in]
    out_scale: np.ndarray | None = None  # [out]; scales the base product only
    bias: np.ndarray | None = None  # [out]


class AdapterBase:
    """What every adapter in a delta file has; the base check shared by all kinds (LoRA included).

    Its capabilities are declared here, with the defaults of a plain LoRA; a kind overrides those that differ
    (as class attributes or properties), so the model driver asks them directly and never probes."""

    kind: ClassVar[str] = "?"
    mergeable: ClassVar[bool] = True  # its change can be folded into the base weights
    needs_base: ClassVar[bool] = False  # its change depends on the base weights (delta / live_terms take them)
    live: ClassVar[bool] = True  # it can run beside the frozen weights
    biases: Mapping[str, np.ndarray] = MappingProxyType({})  # target -> Δb [out], added live (PEFT lora_bias)
    embed_lora: tuple[np.ndarray, np.ndarray] | None = None  # (A [r, vocab], s·B [dim, r]): a LoRA of token_embd
    changes_embedding: ClassVar[bool] = False  # rows of the token embedding change (run live, after the lookup)
    changes_head: ClassVar[bool] = False  # rows of a tied output head change (run live, after the head)
    n_virtual: ClassVar[int] = 0  # virtual tokens put before the input (prompt / prefix tuning)
    name: str
    arch: str
    fingerprint: str
    path: str | None
    heads: dict[str, int]

    @property
    def targets(self) -> list[str]:
        raise NotImplementedError

    def base_shape(self, target: str) -> tuple[int | None, ...] | None:
        raise NotImplementedError

    @property
    def low_rank(self) -> bool:
        """Runs live — alone, stacked or per row — through :meth:`live_terms` (or slots of its own): by default
        when ``live``; a kind with a part that only merges (a replaced head) says False."""
        return self.live

    def delta(self, target: str, base: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def release(self) -> bool:
        """Drop arrays that are read again, verified, from the file when next asked for; True if it did (a delta
        file's memory-mapped F32 factors, once an engine holds a copy of its own). By default nothing to drop."""
        return False

    def live_terms(self, target: str, base: np.ndarray | None = None) -> "LiveTerms | None":
        """The terms of ``target`` run live, or None: nothing on that linear layer (no live form, or a target
        that is not a linear layer, such as a bottleneck adapter's block slot)."""
        raise NotImplementedError

    def _shape_problem(self, target: str, want: tuple[int, ...]) -> str:
        return (f"{target}: the base tensor is {list(want)}, the {self.kind} parameters fit "
                f"{[('any' if d is None else d) for d in self.base_shape(target) or ()]}")

    def _extra_problems(self, cfg: ArchConfig) -> list[str]:
        return []

    def check_base(self, cfg: ArchConfig, fingerprint: str) -> None:
        """Refuse, naming every mismatch at once, if this adapter was not made for that base."""
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"base fingerprint: the adapter was made for {self.fingerprint}, this base is {fingerprint}")
        if self.arch != cfg.arch:
            problems.append(f"architecture: expected {cfg.arch!r}, found {self.arch!r}")
        shapes = cfg.tensor_shapes()
        for t in self.targets:
            want = self.base_shape(t)
            if want is None:
                continue
            if t not in shapes:
                hint = " (the head is tied to token_embd)" if t == "output.weight" and cfg.tied_embeddings else ""
                problems.append(f"{t}: not a {'linear weight' if len(want) == 2 else 'tensor'} of this base{hint}")
            elif len(want) != len(shapes[t]) or any(w is not None and w != s for w, s in zip(want, shapes[t])):
                problems.append(self._shape_problem(t, shapes[t]))
        for t, h in (getattr(self, "heads", None) or {}).items():
            if h != qk_heads(cfg, t):
                problems.append(f"{t}: rows permuted over {h} heads, this base wants "
                                f"{qk_heads(cfg, t) or 'no permutation'} (rope {cfg.rope!r})")
        problems += self._extra_problems(cfg)
        collect(problems, AdapterMismatchError,
                f"{self.kind} adapter {self.name!r} ({self.path or 'in memory'}) does not fit this base:")


@dataclass
class KindAdapter(AdapterBase):
    """A kind stored as named float32 parameters per target. Subclasses set ``kind``, ``PARAMS``,
    implement :meth:`_delta_hf` (ΔW in the training library's row order), :meth:`base_shape`,
    :meth:`_param_problems` and, when live, :meth:`_live_hf`."""

    name: str
    version: int
    arch: str
    fingerprint: str
    params: dict[str, dict[str, np.ndarray]]  # target -> {param: float32 array}, training-library row order
    heads: dict[str, int] = field(default_factory=dict)  # target -> heads its rows are permuted over
    source: str = ""
    description: str = ""
    path: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    quant: str = "F32"
    format_version: int = 2
    integrity: str = ""
    signature: str = ""
    signed_digest: bytes | None = None
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {}

    # ---- protocol
    @property
    def targets(self) -> list[str]:
        return list(self.params)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for p in self.params.values() for a in p.values())

    @property
    def n_params(self) -> int:
        return sum(a.size for p in self.params.values() for a in p.values())

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {f"{t}.{k}": np.ascontiguousarray(a, np.float32) for t, p in self.params.items() for k, a in p.items()}

    def to_metadata(self) -> list[tuple[str, str, Any]]:
        """Extra (key, GGUF value type, value) of this kind (``edgeadapt.qk_heads``, keys under
        ``edgeadapt.<kind>.``); a kind adding keys extends this list."""
        return qk_meta(self.heads)

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, dict[str, np.ndarray]], **fields: Any
                     ) -> "KindAdapter":
        problems = []
        for t in sorted(tensors):
            problems += [f"{t}: {p}" for p in cls._param_problems(tensors[t])]
        collect(problems, FormatError, f"{fields.get('path') or '<bytes>'}: bad {cls.kind} parameters:")
        heads = {}
        qk = meta.get(K_QK_HEADS)
        if qk is not None:
            if not (isinstance(qk, list) and len(qk) == 2 and all(isinstance(x, int) and 0 <= x < 1 << 16 for x in qk)):
                raise FormatError(f"{K_QK_HEADS}: expected two integers [n_heads, n_kv_heads], found {qk!r}")
            heads = {t: (qk[0] if ".attn_q." in t else qk[1]) for t in tensors if ".attn_q." in t or ".attn_k." in t}
            zero = sorted(t for t, h in heads.items() if h == 0)
            if zero:
                raise FormatError(f"{K_QK_HEADS} = {qk}: no head count for {', '.join(zero)}")
        return cls(params=tensors, heads=heads, **fields)

    def _base_hf(self, target: str, base: np.ndarray | None, h: int | None) -> np.ndarray | None:
        """The immutable base tensor in the training library's row order (q/k rows unpermuted), when needed."""
        if not self.needs_base:
            return None
        if base is None:
            raise AdapterMismatchError(f"{self.kind} adapter {self.name!r} needs the base weight of {target}")
        return unpermute_qk(base, h) if h else base

    def delta(self, target: str, base: np.ndarray | None = None) -> np.ndarray:
        """ΔW (float32, canonical layout) of one target, from the immutable base tensor when ``needs_base``."""
        h = self.heads.get(target)
        w_hf = self._base_hf(target, base, h)
        d = np.asarray(self._delta_hf(self.params[target], w_hf), dtype=np.float32)
        return permute_qk(d, h) if h else d

    def live_terms(self, target: str, base: np.ndarray | None = None) -> LiveTerms | None:
        """The terms of this target run live (canonical layout), or None when this kind does not run live."""
        if not self.live:
            return None
        h = self.heads.get(target)
        w_hf = self._base_hf(target, base, h)
        t = self._live_hf(self.params[target], w_hf)
        if h:  # rows (outputs) move; inputs do not
            t = t._replace(**{k: permute_qk(getattr(t, k), h) for k in ("b", "out_scale", "bias")
                              if getattr(t, k) is not None})
        return LiveTerms(*(None if x is None else np.ascontiguousarray(x, np.float32) for x in t))

    # ---- what a kind implements
    @classmethod
    def _param_problems(cls, p: dict[str, np.ndarray]) -> list[str]:
        return []

    def _delta_hf(self, p: dict[str, np.ndarray], w: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _live_hf(self, p: dict[str, np.ndarray], w: np.ndarray | None) -> LiveTerms:
        raise NotImplementedError


# ---- registry
def register_kind(cls: type[KindAdapter]) -> type[KindAdapter]:
    """Make a kind readable and writable in delta files (usable as a class decorator)."""
    k = getattr(cls, "kind", None)
    if not isinstance(k, str) or not _KIND_RE.fullmatch(k) or k == "lora":
        raise UnsupportedError(f"kind name {k!r}: expected lower-case letters, digits and _ (not 'lora')")
    bad = [p for p in cls.PARAMS if not _PARAM_RE.fullmatch(p)]
    if bad or not cls.PARAMS:
        raise UnsupportedError(f"kind {k!r}: parameter names must be lower-case identifiers without dots, found {bad or 'none'}")
    if k in KINDS and KINDS[k] is not cls:
        raise UnsupportedError(f"kind {k!r} is already registered by {KINDS[k].__module__}.{KINDS[k].__name__}")
    KINDS[k] = cls
    return cls


def kind_class(kind: str, where: str = "") -> type[KindAdapter]:
    if kind not in KINDS and kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])
    if kind not in KINDS:
        known = sorted({"lora", *KINDS, *KIND_MODULES})
        raise UnsupportedError(f"{where + ': ' if where else ''}adapter kind {kind!r} is not supported by this "
                               f"version of edgeadapt; it reads {', '.join(known)}")
    return KINDS[kind]


def group_tensors(names: list[str], cls: type[KindAdapter]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``<target>.<param>`` names -> {target: {param: name}}, and the problems found (unknown params)."""
    out: dict[str, dict[str, str]] = {}
    problems = []
    for n in names:
        target, _, param = n.rpartition(".")
        if not target or param not in cls.PARAMS:
            problems.append(f"{n}: expected <target>.<param> with param one of {', '.join(cls.PARAMS)} ({cls.kind})")
            continue
        out.setdefault(target, {})[param] = n
    return out, problems


def heads_for(cfg: ArchConfig, targets) -> dict[str, int]:
    """Targets whose rows are in the training library's q/k order on this base, and their head counts."""
    return {t: h for t in targets if (h := qk_heads(cfg, t))}


def qk_meta(heads: dict[str, int]) -> list[tuple[str, str, Any]]:
    """The ``edgeadapt.qk_heads`` entry for these permuted targets (none when nothing is permuted)."""
    if not heads:
        return []
    q = {h for t, h in heads.items() if ".attn_q." in t}
    k = {h for t, h in heads.items() if ".attn_k." in t}
    if len(q) > 1 or len(k) > 1:
        raise FormatError(f"inconsistent q/k head counts {sorted(q)} / {sorted(k)}")
    return [(K_QK_HEADS, "ARRAY_UINT32", [q.pop() if q else 0, k.pop() if k else 0])]
