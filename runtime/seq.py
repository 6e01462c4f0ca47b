"""What a request carries besides LoRA factors: per-token embedding changes and a KV prefix.

:class:`Plan` is the live-factor dict of :mod:`runtime.model` (weight -> (A, B)) with two more
fields, set only when an active adapter acts on the embeddings or the sequence
(:class:`edgeadapt.kinds.sequence.SeqAdapter`), so a request without them runs exactly as before:

- ``embed``: :class:`EmbedFn`, ids [B, S] -> the change of their embeddings [B, S, dim], fed to
  the engine (``embed.delta`` of the ONNX graph, an add in the numpy engine);
- ``head``: :class:`HeadFn`, batch size -> (ids [k], delta [B or 1, k, dim]): a live change of some rows
  of a tied output head (``head.ids`` / ``head.delta`` of the ONNX graph, an add after the head in numpy);
- ``prefix``: per row, the names of the prompt / prefix tuning adapters whose KV prefix the row
  starts with. :class:`Prefixes` turns them, at request time, into past keys/values
  [B, KV, P, hd] left-padded to the longest prefix, and the attention mask of that past
  (0 on pads). Real tokens then sit at positions P_row + (cumsum(mask) - 1), as in PEFT.

Prompt tuning's KV is computed once per adapter by the engine itself: placeholder ids (0) whose
embedding change turns them into the virtual embeddings, run through the bare base.
numpy only: used on devices.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.errors import FormatError, UnsupportedError


class Plan(dict):
    """Live factors (``{weight: (A, B)}``) plus ``embed`` / ``prefix`` (see the module docstring)."""

    embed: "EmbedFn | None" = None
    head: "HeadFn | None" = None
    prefix: list[str | None] | None = None  # per row (one entry = every row): a prefix adapter's name
    bn: "dict[str, np.ndarray] | None" = None  # bottleneck slot inputs (set by runtime.bn_slots.BnPlan)

    def __bool__(self) -> bool:
        return len(self) > 0 or self.embed is not None or self.head is not None or self.prefix is not None


class HeadFn:
    """Per row, Σ weight·(ids, Δrows) of that row's adapters -> (union of ids [k], delta [n, k, dim]),
    n = 1 when every row has the same set."""

    def __init__(self, rows: list[list[tuple[tuple[np.ndarray, np.ndarray], float]]], dim: int):
        ids = np.unique(np.concatenate([i for r in rows for (i, _), _ in r] or [np.zeros(0, np.int64)]))
        delta = np.zeros((len(rows), len(ids), dim), np.float32)
        for b, r in enumerate(rows):
            for (i, d), w in r:
                delta[b, np.searchsorted(ids, i)] += d if w == 1.0 else d * np.float32(w)
        self.ids, self.delta = ids.astype(np.int64), delta

    def __call__(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.delta.shape[0] not in (1, batch):
            raise FormatError(f"head change made for {self.delta.shape[0]} rows, the batch has {batch}")
        return self.ids, self.delta


class EmbedFn:
    """ids [B, S] -> float32 [B, S, dim]: per row, Σ weight·change of that row's adapters."""

    def __init__(self, rows: list[list[tuple[Any, float]]], dim: int):
        self.rows, self.dim = rows, dim

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        B, S = ids.shape
        out = np.zeros((B, S, self.dim), np.float32)
        for b in range(B):
            for change, w in self.rows[0 if len(self.rows) == 1 else b]:
                d = change(ids[b], self.dim)
                out[b] += d if w == 1.0 else d * np.float32(w)
        return out


class SeqParts:
    """The per-adapter pieces a :class:`Plan` is made of, computed once per adapter and cached."""

    def __init__(self, model: Any):
        self.m = model
        self._embed: dict[str, Any] = {}
        self._head: dict[str, Any] = {}
        self._kv: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._lock = threading.Lock()

    def forget(self, name: str) -> None:
        self._embed.pop(name, None)
        self._embed.pop((name, "rows"), None)
        self._head.pop(name, None)
        self._kv.pop(name, None)

    # ---- plans
    def plan(self, live: Mapping[str, Any], rows: Sequence[Mapping[str, float]], merged_embed: Any = ()) -> Any:
        """``live`` unchanged when no row has embedding / sequence parts, else a :class:`Plan` over it.
        ``merged_embed``: adapters whose embedding LoRA is merged into token_embd.weight (left out here)."""
        embeds: list[list[tuple[Any, float]]] = []
        heads: list[list[tuple[Any, float]]] = []
        prefixes: list[str | None] = []
        for want in rows:
            seq = {n: w for n, w in want.items() if self.m.adapters[n].n_virtual}
            if seq and (len(want) > 1 or any(w != 1.0 for w in seq.values())):
                n = next(iter(seq))
                raise UnsupportedError(f"{self.m.adapters[n].kind} adapter {n!r} prepends virtual tokens and runs alone, "
                                       f"at weight 1; found the set {dict(want)}")
            prefixes.append(next(iter(seq), None))
            embeds.append([(c, w) for n, w in want.items() if self.m.adapters[n].changes_embedding
                           for c in [self._change(n, n not in merged_embed)] if c is not None])
            heads.append([(self._head_change(n), w) for n, w in want.items()
                          if self.m.adapters[n].changes_head])
        if not any(embeds) and not any(prefixes) and not any(heads):
            return live
        plan = Plan(live)
        if any(embeds):
            plan.embed = EmbedFn(embeds, self.m.config.dim)
        if any(heads):
            plan.head = HeadFn(heads, self.m.config.dim)
        if any(prefixes):
            plan.prefix = prefixes
        return plan

    def _change(self, name: str, lora: bool = True) -> Any:
        key = name if lora else (name, "rows")
        if key not in self._embed:
            self._embed[key] = self.m.adapters[name].embedding_change(self.base_rows, lora)
        return self._embed[key]

    def _head_change(self, name: str) -> Any:
        c = self._head.get(name)
        if c is None:
            c = self._head[name] = self.m.adapters[name].head_change(self.base_rows)
        return c

    def base_rows(self, ids: np.ndarray) -> np.ndarray:
        """The engine's own embedding rows [n, dim] float32."""
        return np.asarray(self.m._engine.embedding_rows(np.asarray(ids, np.int64)), np.float32)

    # ---- the KV prefix of a request
    def past(self, plan: Any, mask: np.ndarray, pos: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
        """(past, mask, pos) for the first forward of a request: unchanged without a prefix."""
        names = plan.prefix if isinstance(plan, Plan) else None
        if not names:
            return None, mask, pos
        B = mask.shape[0]
        names = names * B if len(names) == 1 else names
        kvs = [None if n is None else self.kv(n) for n in names]
        P = max(kv[0][0].shape[1] for kv in kvs if kv is not None)
        cfg = self.m.config
        if P + mask.shape[1] > cfg.context_length:
            raise FormatError(f"{P} virtual tokens + {mask.shape[1]} prompt tokens exceed the context of "
                              f"{cfg.context_length}")
        shape = (B, cfg.n_kv_heads, P, cfg.head_dim)
        past = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.n_layers)]
        pmask = np.zeros((B, P), np.int64)
        for b, kv in enumerate(kvs):
            if kv is None:
                continue
            n = kv[0][0].shape[1]
            pmask[b, P - n:] = 1
            for (K, V), (k, v) in zip(past, kv):
                K[b, :, P - n:], V[b, :, P - n:] = k, v
        full = np.concatenate([pmask, mask], axis=1)
        pos = np.clip(np.cumsum(full, -1) - 1, 0, None)[:, P:]
        return past, full, pos

    def kv(self, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (key, value) [KV, n, hd] of a prompt / prefix tuning adapter, made once."""
        kv = self._kv.get(name)
        if kv is None:
            with self._lock:
                kv = self._kv.get(name) or self._make_kv(name)
                self._kv[name] = kv
        return kv

    def _make_kv(self, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
        a = self.m.adapters[name]
        if a.prefix is not None:
            return a.prefix_kv(self.m.config)
        n = a.prompt.shape[0]  # prompt tuning: the virtual embeddings through the bare base, once
        ids = np.zeros((1, n), np.int64)
        delta = (a.prompt - self.base_rows(ids[0, :1]))[None]  # [1, n, dim]: placeholder row 0 -> virtual rows
        _, past = self.m._engine.forward(ids, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None],
                                         None, embed=np.ascontiguousarray(delta, np.float32))
        return [(np.array(k[0], np.float32), np.array(v[0], np.float32)) for k, v in past]

