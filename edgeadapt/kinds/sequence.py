"""Adapters that act on the embeddings and on the sequence, not (only) on linear weights.

One class, :class:`SeqAdapter`, holds what a PEFT folder of these kinds carries. Every part is
optional; a converter fills the parts its kind has (float32, canonical layout):

| part | shape | what it does at run time |
|---|---|---|
| ``factors`` | {w: (A [r,in], s·B [out,r])} | plain LoRA on linear weights (PEFT saves them beside the others) |
| ``embed_lora`` | (A [r,vocab], s·B [dim,r]) | embedding LoRA: E'[t] = E[t] + s·(B@A)[:, t] |
| ``token_rows`` | (ids int64 [n], rows [n,dim]) | trainable tokens / a saved embedding: E'[ids] = rows (replacement) |
| ``head`` | [vocab, dim] | ``modules_to_save`` of an untied output head: W_out' = head (replacement, merged) |
| ``head_rows`` | (ids int64 [k], rows [k,dim]) | a tied head's changed rows: W_out'[ids] = rows, embedding untouched (live) |
| ``prompt`` | [n_virtual, dim] | prompt tuning: virtual token embeddings before the input |
| ``prefix`` | [n_virtual, layers·2·kv_dim] | prefix tuning: raw keys / values before every layer's cache |

The embedding parts never touch the embedding table: the runtime adds, after the lookup, the
change of just the ids in the batch (``embed.delta`` of the ONNX graph, an add in the numpy
engine), so a tied output head keeps reading the base table — as PEFT's embedding LoRA does.
Prompt tuning's virtual tokens are run through the base once (placeholder ids whose embedding
change makes them the virtual embeddings) and, like prefix tuning, become a KV prefix the
runtime puts before the cache; real tokens then start at position ``n_virtual``, as in PEFT.
A tied head (one table for embedding and head) is changed the same way, after the head: the runtime
adds h @ (rows - E[ids])ᵀ to the logits of ``ids`` (``head.delta`` / ``head.ids`` of the ONNX graph),
so trainable tokens (PEFT ties the head rows to the embedding rows) and ``modules_to_save`` of
``lm_head`` (PEFT trains a copy of the head, the embedding stays the base's) both run live.
Prefix keys are stored in the base's key layout: for a "norm"-rope base, each head's dimensions
are permuted as the k rows of the base are (:func:`edgeadapt.formats.arch.permute_qk`).
Files: the delta-file kind registry (:mod:`edgeadapt.formats.delta_kinds`) reads and writes these kinds, one
registered name per kind. This module imports only numpy: it is used on devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from edgeadapt.formats.arch import ArchConfig, permute_qk
from edgeadapt.formats.delta_kinds import KindAdapter, LiveTerms, register_kind
from edgeadapt.errors import AdapterMismatchError, FormatError, UnsupportedError, collect

EMBED, HEAD, VIRTUAL = "token_embd.weight", "output.weight", "virtual"  # targets that are not linear slots
K_TOKEN_IDS = "edgeadapt.seq.token_ids"  # uint32 array: the ids whose rows ``token_embd.weight.rows`` replace
K_HEAD_IDS = "edgeadapt.seq.head_ids"  # uint32 array: the ids whose head rows ``output.weight.rows`` replace
SEQ_KINDS = ("embedding_lora", "trainable_tokens", "modules_to_save", "prompt_tuning", "prefix_tuning")


@dataclass
class SeqAdapter(KindAdapter):
    """An adapter with embedding / head / sequence parts (see the module docstring). Stored as
    ``params`` ({target: {param: float32 array}}) so the delta file registry reads and writes it:

    - ``blk.N.<w>.weight``: ``lora_a`` [r, in], ``lora_b`` [out, r] (scale folded in, rows of q/k permuted);
    - ``token_embd.weight``: ``emb_a`` [r, vocab], ``emb_b`` [dim, r] (scale folded in) and/or ``rows`` [n, dim]
      (the ids, in the same order, in the metadata key ``edgeadapt.seq.token_ids``);
    - ``output.weight``: ``head`` [vocab, dim];
    - ``virtual``: ``prompt`` [n, dim] or ``prefix`` [n, layers·2·kv_dim] (keys in the base's layout).
    """

    token_ids: np.ndarray | None = None  # int64 [n], the rows of params["token_embd.weight"]["rows"]
    head_ids: np.ndarray | None = None  # int64 [k], the rows of params["output.weight"]["rows"]
    kind: ClassVar[str] = "seq"
    needs_base: ClassVar[bool] = True  # the head replacement is W' = head, i.e. ΔW = head - W
    PARAMS: ClassVar[dict[str, tuple[int, ...]]] = {"lora_a": (2,), "lora_b": (2,), "emb_a": (2,), "emb_b": (2,),
                                                    "rows": (2,), "head": (2,), "prompt": (2,), "prefix": (2,)}

    @classmethod
    def build(cls, kind: str, *, factors: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
              embed_lora: tuple[np.ndarray, np.ndarray] | None = None,
              token_rows: tuple[np.ndarray, np.ndarray] | None = None, head: np.ndarray | None = None,
              head_rows: tuple[np.ndarray, np.ndarray] | None = None,
              prompt: np.ndarray | None = None, prefix: np.ndarray | None = None, **fields: Any) -> "SeqAdapter":
        """The adapter of registered ``kind`` from its parts (all float32, canonical layout)."""
        f32 = lambda x: np.ascontiguousarray(x, np.float32)  # noqa: E731
        params: dict[str, dict[str, np.ndarray]] = {t: {"lora_a": f32(a), "lora_b": f32(b)}
                                                    for t, (a, b) in (factors or {}).items()}
        e: dict[str, np.ndarray] = {}
        if embed_lora is not None:
            e["emb_a"], e["emb_b"] = f32(embed_lora[0]), f32(embed_lora[1])
        ids = None
        if token_rows is not None:
            ids, e["rows"] = np.asarray(token_rows[0], np.int64), f32(token_rows[1])
        if e:
            params[EMBED] = e
        if head is not None:
            params[HEAD] = {"head": f32(head)}
        hids = None
        if head_rows is not None:
            hids = np.asarray(head_rows[0], np.int64)
            params.setdefault(HEAD, {})["rows"] = f32(head_rows[1])
        if prompt is not None:
            params[VIRTUAL] = {"prompt": f32(prompt)}
        if prefix is not None:
            params[VIRTUAL] = {"prefix": f32(prefix)}
        return SEQ_CLASSES[kind](params=params, token_ids=ids, head_ids=hids, **fields)

    # ---- the parts
    @property
    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {t: (p["lora_a"], p["lora_b"]) for t, p in self.params.items() if "lora_a" in p}

    @property
    def embed_lora(self) -> tuple[np.ndarray, np.ndarray] | None:
        e = self.params.get(EMBED, {})
        return (e["emb_a"], e["emb_b"]) if "emb_a" in e else None

    @property
    def token_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        e = self.params.get(EMBED, {})
        return (self.token_ids, e["rows"]) if "rows" in e else None

    @property
    def head(self) -> np.ndarray | None:
        return self.params.get(HEAD, {}).get("head")

    @property
    def head_rows(self) -> tuple[np.ndarray, np.ndarray] | None:
        h = self.params.get(HEAD, {})
        return (self.head_ids, h["rows"]) if "rows" in h else None

    @property
    def prompt(self) -> np.ndarray | None:
        return self.params.get(VIRTUAL, {}).get("prompt")

    @property
    def prefix(self) -> np.ndarray | None:
        return self.params.get(VIRTUAL, {}).get("prefix")

    # ---- what the model driver asks
    @property
    def targets(self) -> list[str]:
        return list(self.factors) + ([HEAD] if self.head is not None else [])

    @property
    def low_rank(self) -> bool:
        """Runs live (and per row): everything but a head replacement, which is merged."""
        return self.head is None

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.prompt is None and self.prefix is None

    @property
    def n_virtual(self) -> int:
        p = self.prompt if self.prompt is not None else self.prefix
        return 0 if p is None else int(p.shape[0])

    @property
    def changes_embedding(self) -> bool:
        return self.embed_lora is not None or self.token_rows is not None

    @property
    def changes_head(self) -> bool:
        return self.head_rows is not None

    def live_factors(self, target: str) -> tuple[np.ndarray, np.ndarray]:
        return self.factors[target]

    def live_terms(self, target: str, base: np.ndarray | None = None) -> LiveTerms | None:
        f = self.factors.get(target)
        return None if f is None else LiveTerms(a=f[0], b=f[1])

    def delta(self, target: str, base: np.ndarray | None = None) -> np.ndarray:
        """ΔW, float32 [out, in]: B@A of a LoRA factor pair, or head - W for the replaced head."""
        if target == EMBED and self.embed_lora is not None:  # merged embedding LoRA (untied bases): s·(B@A)ᵀ
            a, b = self.embed_lora
            return np.ascontiguousarray((b @ a).T, np.float32)
        if target == HEAD and self.head is not None:
            if base is None:
                raise AdapterMismatchError(f"adapter {self.name!r} replaces output.weight and needs the base weight")
            return self.head - base
        a, b = self.factors[target]
        return b @ a

    def base_shape(self, target: str) -> tuple[int | None, ...] | None:
        return None  # checked in _extra_problems

    # ---- files
    def to_metadata(self) -> list[tuple[str, str, Any]]:
        return [(k, "ARRAY_UINT32", [int(i) for i in ids]) for k, ids in ((K_TOKEN_IDS, self.token_ids),
                                                                           (K_HEAD_IDS, self.head_ids)) if ids is not None]

    @classmethod
    def from_tensors(cls, meta: dict[str, Any], tensors: dict[str, dict[str, np.ndarray]], **fields: Any
                     ) -> "SeqAdapter":
        where = fields.get("path") or "<bytes>"
        problems = []
        for t, p in tensors.items():
            allowed = ({"emb_a", "emb_b", "rows"} if t == EMBED else {"head", "rows"} if t == HEAD
                       else {"prompt", "prefix"} if t == VIRTUAL else {"lora_a", "lora_b"})
            if not set(p) <= allowed or set(p) & {"lora_a", "lora_b", "emb_a", "emb_b"} and not (
                    {"lora_a", "lora_b"} <= set(p) or {"emb_a", "emb_b"} <= set(p)):
                problems.append(f"{t}: expected parameters among {sorted(allowed)} (pairs complete), found {sorted(p)}")
        got = {}
        for key, t in ((K_TOKEN_IDS, EMBED), (K_HEAD_IDS, HEAD)):
            ids = meta.get(key)
            rows = tensors.get(t, {}).get("rows")
            if (ids is None) != (rows is None):
                problems.append(f"{key} and {t}.rows come together")
            elif ids is not None and (not isinstance(ids, list) or len(ids) != rows.shape[0]):
                problems.append(f"{key}: expected {rows.shape[0]} ids (one per row), found "
                                f"{len(ids) if isinstance(ids, list) else type(ids).__name__}")
            got[key] = None if ids is None else np.asarray(ids, np.int64)
        collect(problems, FormatError, f"{where}: bad {cls.kind} parameters:")
        return cls(params=tensors, token_ids=got[K_TOKEN_IDS], head_ids=got[K_HEAD_IDS], **fields)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for p in self.params.values() for a in p.values())

    # ---- checks
    def _extra_problems(self, cfg: ArchConfig) -> list[str]:
        """What :meth:`AdapterBase.check_base` adds for this kind: factor pairs, embedding parts, the
        replaced head, virtual tokens."""
        problems = []
        shapes = cfg.linear_shapes()
        for t, p in self.params.items():
            if t in (EMBED, HEAD, VIRTUAL):
                continue
            a, b = p.get("lora_a"), p.get("lora_b")
            if t not in shapes:
                problems.append(f"{t}: not a linear weight of this base")
            elif a is None or b is None or a.shape[1] != shapes[t][1] or b.shape[0] != shapes[t][0] or a.shape[0] != b.shape[1]:
                problems.append(f"{t}: expected lora_a [r, {shapes[t][1]}] and lora_b [{shapes[t][0]}, r], found "
                                f"{None if a is None else list(a.shape)} and {None if b is None else list(b.shape)}")
        V, D = cfg.vocab_size, cfg.dim
        if self.embed_lora is not None:
            a, b = self.embed_lora
            if a.shape[1] != V or b.shape[0] != D or a.shape[0] != b.shape[1]:
                problems.append(f"embedding LoRA: expected A [r, {V}] and B [{D}, r] (vocab {V}, dim {D}), "
                                f"found {list(a.shape)} and {list(b.shape)}")
        if self.token_rows is not None:
            _check_rows("token rows", *self.token_rows, D, V, problems)
        if self.head_rows is not None:
            if not cfg.tied_embeddings:
                problems.append("head rows: this base has its own output.weight (untied); a head change is a full "
                                "replacement there")
            _check_rows("head rows", *self.head_rows, D, V, problems)
        if self.head is not None:
            if cfg.tied_embeddings:
                problems.append("modules_to_save lm_head: this base ties its output head to token_embd (no "
                                "separate output.weight to replace); convert it again for this base, which keeps "
                                "the changed head rows (run live)")
            elif self.head.shape != (V, D):
                problems.append(f"output head: expected [{V}, {D}], found {list(self.head.shape)}")
        if self.prompt is not None and self.prompt.shape[1:] != (D,):
            problems.append(f"prompt embeddings: expected [n_virtual, {D}], found {list(self.prompt.shape)}")
        if self.prefix is not None and self.prefix.shape[1:] != (cfg.n_layers * 2 * cfg.kv_dim,):
            problems.append(f"prefix: expected [n_virtual, {cfg.n_layers * 2 * cfg.kv_dim}] (layers {cfg.n_layers} × 2 "
                            f"× kv heads {cfg.n_kv_heads} × head_dim {cfg.head_dim}), found {list(self.prefix.shape)}")
        if self.n_virtual >= cfg.context_length:
            problems.append(f"{self.n_virtual} virtual tokens leave no room in a context of {cfg.context_length}")
        bad = sorted(f"{t}.{k}" for t, p in self.params.items() for k, x in p.items() if not np.isfinite(x).all())
        if bad:
            problems.append(f"{', '.join(bad)}: hold NaN or Inf")
        return problems

    # ---- run-time pieces
    def embedding_change(self, base_rows: Callable[[np.ndarray], np.ndarray], lora: bool = True
                         ) -> "EmbedChange | None":
        """The per-token change of this adapter's embedding parts; ``base_rows(ids)`` gives the base's own
        rows [n, dim] (those a replacement is measured against). ``lora=False``: without the embedding LoRA
        (merged into token_embd.weight)."""
        if not self.changes_embedding or not lora and self.token_rows is None:
            return None
        ids = rows = None
        if self.token_rows is not None:
            order = np.argsort(self.token_rows[0])
            ids = np.ascontiguousarray(self.token_rows[0][order], np.int64)
            rows = (self.token_rows[1][order] - base_rows(ids)).astype(np.float32)  # replacement -> change
        a, b = self.embed_lora if self.embed_lora is not None and lora else (None, None)
        return EmbedChange(a, None if b is None else np.ascontiguousarray(b.T), ids, rows)

    def head_change(self, base_rows: Callable[[np.ndarray], np.ndarray]) -> "tuple[np.ndarray, np.ndarray] | None":
        """(ids sorted int64 [k], rows - E[ids] float32 [k, dim]): the change of a tied head's rows, or None."""
        if self.head_rows is None:
            return None
        order = np.argsort(self.head_rows[0])
        ids = np.ascontiguousarray(self.head_rows[0][order], np.int64)
        return ids, (self.head_rows[1][order] - base_rows(ids)).astype(np.float32)

    def prefix_kv(self, cfg: ArchConfig) -> list[tuple[np.ndarray, np.ndarray]]:
        """Prefix tuning's cache prefix: per layer (key, value) float32 [n_kv_heads, n_virtual, head_dim]."""
        if self.prefix is None:
            raise UnsupportedError(f"adapter {self.name!r} ({self.kind}) has no prefix")
        n, kv, hd = self.prefix.shape[0], cfg.n_kv_heads, cfg.head_dim
        p = self.prefix.reshape(n, cfg.n_layers * 2, kv, hd).transpose(1, 2, 0, 3)  # [2L, KV, n, hd]
        return [(np.ascontiguousarray(p[2 * i]), np.ascontiguousarray(p[2 * i + 1])) for i in range(cfg.n_layers)]


# one registered class per kind name (same behaviour; the name says what the file holds)
SEQ_CLASSES: dict[str, type[SeqAdapter]] = {
    k: register_kind(type(f"Seq_{k}", (SeqAdapter,), {"kind": k, "__module__": __name__}))  # type: ignore[misc]
    for k in SEQ_KINDS}


def hf_prefix_to_base(prefix: np.ndarray, cfg: ArchConfig) -> np.ndarray:
    """PEFT's prefix [n, layers·2·kv_dim] (HF key layout) -> the base's key layout (q/k rows permuted)."""
    if cfg.rope != "norm":
        return np.ascontiguousarray(prefix, np.float32)
    n = prefix.shape[0]
    p = prefix.reshape(n, cfg.n_layers, 2, cfg.kv_dim).copy()
    for i in range(cfg.n_layers):  # keys only: values are not rotated
        p[:, i, 0] = permute_qk(p[:, i, 0].T, cfg.n_kv_heads).T
    return np.ascontiguousarray(p.reshape(n, -1), np.float32)


@dataclass
class EmbedChange:
    """ΔE for a batch of ids: s·(B@A)[:, t] (embedding LoRA) + (rows - E[t]) for replaced ids."""

    a: np.ndarray | None  # [r, vocab]
    bt: np.ndarray | None  # s·Bᵀ [r, dim]
    ids: np.ndarray | None  # sorted int64 [n]
    rows: np.ndarray | None  # [n, dim]: replacement minus the base row

    def __call__(self, ids: np.ndarray, dim: int) -> np.ndarray:
        """ids int [n] -> float32 [n, dim]."""
        out = (self.a[:, ids].T @ self.bt).astype(np.float32) if self.a is not None else np.zeros((len(ids), dim), np.float32)
        if self.ids is not None and len(self.ids):
            k = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
            hit = self.ids[k] == ids
            out[hit] += self.rows[k[hit]]
        return out


def _check_rows(label: str, ids: np.ndarray, rows: np.ndarray, D: int, V: int, problems: list[str]) -> None:
    """Rows [len(ids), D] for distinct token ids in [0, V): what token rows and head rows both hold."""
    if rows.shape != (len(ids), D):
        problems.append(f"{label}: expected [{len(ids)}, {D}] (one row of dim {D} per token id), found {list(rows.shape)}")
    if len(ids) and (ids.min() < 0 or ids.max() >= V):
        problems.append(f"{label}: ids must lie in [0, {V}), found {int(ids.min())}…{int(ids.max())}")
    if len(np.unique(ids)) != len(ids):
        problems.append(f"{label}: an id appears twice")
