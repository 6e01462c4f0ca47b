"""One onnxruntime session of a base graph (:class:`_Session`: its LoRA slots and their grouped inputs) and the
running batch's keys and values bound to it in place (:class:`KVCache`). Used by
:class:`edgeadapt.runtime.ort_engine.engine.OrtEngine`."""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
from pathlib import Path
from typing import Any, Collection, Iterable

import numpy as np

from edgeadapt.errors import AdapterMismatchError, FormatError


class _Session:
    """A session and what forward derives from its inputs, replaced whole when the engine switches graphs."""

    def __init__(self, sess: Any, cfg: Any, linear: list[str], path: Path):
        meta = sess.get_modelmeta().custom_metadata_map
        self.sess, self.path = sess, path
        self.fused = meta.get("edgeadapt.attention") == "GroupQueryAttention"  # see OrtEngine.forward
        # GroupQueryAttention reads each row's key count from attention_mask (onnx_graphs.fast.RIGHT_PADDED): rows may
        # be right-padded; fused graphs exported before it count T keys for every row (left padding only)
        self.right_padded = self.fused and meta.get("edgeadapt.right_padded") == "1"
        inputs = {i.name for i in sess.get_inputs()}
        defaults = {i.name for i in sess.get_overridable_initializers()}
        # grouped slots (model_live.onnx, quantized graphs): one slot for q|k|v and one for gate|up, see onnx_graphs.fast._Linears
        self.groups: dict[str, list[str]] = json.loads(meta.get("edgeadapt.slot_groups", "{}"))
        grouped = {w for ws in self.groups.values() for w in ws}
        self.slots = [n for n in list(linear) + list(self.groups) if n not in grouped and f"lora.{n}.a" in inputs | defaults]
        shapes = dict(cfg.linear_shapes())
        for gname, ws in self.groups.items():
            shapes[gname] = (sum(shapes[w][0] for w in ws), shapes[ws[0]][1])
        self.shapes = shapes
        # a group slot's b: the weights' B in chunks of gcd(outputs) [n, 1, C, r, g] ("chunked"), side by side
        # [n, 1, r, Σout] ("side_by_side", graphs of issue #17's third pass), or block-diagonal [n, Σr, Σout] (graphs
        # exported before, which have no such property). A is [A_1 | … | A_k] in the first two, each at the group's rank
        layout = meta.get("edgeadapt.slot_groups.b") if self.groups else None
        self.side_by_side = layout in ("side_by_side", "chunked")
        self.chunks = {g: math.gcd(*(shapes[w][0] for w in ws)) for g, ws in self.groups.items()
                       } if layout == "chunked" else {}  # group -> chunk width g
        self.empty_slot = {n: (np.zeros((1, shapes[n][1], 0), np.float32), np.zeros(self._b_shape(n, 1, 0), np.float32))
                           for n in self.slots}  # what an idle slot is bound to (the graph's own defaults)
        self._last: tuple[Any, Any] = (None, None)  # (per-weight factors, their slot arrays): one request's plan
        self.required = [n for n in self.slots if f"lora.{n}.a" not in defaults]  # model_live / quantized: no defaults
        # the in-place kv cache (KVCache) needs IOBinding, which cannot bind slots that have defaults
        # (model_lora.onnx keeps them for onnxruntime's LoraAdapter): that graph feeds arrays every step
        self.inplace = self.fused and not any(f"lora.{n}.a" in defaults for n in self.slots)
        self.embed = "embed.delta" in inputs | defaults  # base folders exported before it have no such input
        self.head = "head.delta" in inputs | defaults  # only the graphs that serve adapters have it
        # graphs since issue #17 output head.logits (h @ deltaᵀ) for the engine to add; older ones add it in-graph
        # (a head.ids input and a scatter into logits)
        self.head_out = "head.logits" in {o.name for o in sess.get_outputs()}
        self.logits_from = "logits.from" in inputs  # the graph can compute the last position's logits only
        # the int4 / int8 graphs since issue #17's fourth pass take the tokens' embedding rows as an input, read here
        spec = meta.get("edgeadapt.embed_rows") if "embed.rows" in inputs else None
        self.rows = EmbedRows(path.parent, spec, cfg) if spec else None

    def id_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """What a step feeds for its token ids: ``input_ids``, and their embedding rows where the graph takes them."""
        return {"input_ids": ids} if self.rows is None else {"input_ids": ids, "embed.rows": self.rows(ids)}


    def slot_arrays(self, lora: dict[str, tuple[np.ndarray, np.ndarray]] | None, keep: bool = True
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per-weight factors {weight: (A [n, in, r], B [n, r, out])} -> this graph's slot inputs: a group slot
        gets A = [A_1 | A_2 | …] (ranks side by side) and B block-diagonal, so x·A·B = [x·A_1·B_1 | x·A_2·B_2 | …]
        is exactly the per-weight sum (zeros where a weight has no factors). Every slot array is contiguous: the
        driver hands out transposed views of the adapters' arrays (``copies_factors``), copied here once. Slot
        inputs already in this form are returned as they are. The last call is remembered: ``keep`` its input (a
        plan that runs step after step), or only its output (a conversion: the input's arrays can then be freed)."""
        if not lora:
            return {}
        last_in, last_out = self._last
        if last_in is lora:
            return last_out
        grouped = self._grouped_names()
        if not any(n in grouped for n in lora) and all(x.flags.c_contiguous for f in lora.values() for x in f):
            return lora
        out = {n: tuple(np.ascontiguousarray(x) for x in f) for n, f in lora.items() if n not in grouped}
        for gname, ws in self.groups.items():
            if any(w in lora for w in ws):
                out[gname] = self._group(gname, lora)
        self._last = (lora if keep else out, out)
        return out

    def slot_arrays_from(self, parts: Iterable[tuple[str, np.ndarray, np.ndarray]], targets: Collection[str]
                         ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:meth:`slot_arrays` of one set's factors arriving one weight at a time, (weight, A [1, in, r],
        B [1, r, out]) for each of ``targets``: each copied into its slot as it comes and dropped, a group's once
        all of its weights in ``targets`` are in. The same arrays as ``slot_arrays`` of them all at once, while
        holding the slots and one group's factors instead of every factor besides the slots. The result is
        returned only once ``parts`` ends (a verified stream raises there instead, and the slots are dropped)."""
        group_of = {w: g for g, ws in self.groups.items() for w in ws}
        waiting = {g: sum(w in targets for w in ws) for g, ws in self.groups.items()}
        pending: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for w, a, b in parts:
            g = group_of.get(w)
            if g is None:
                out[w] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
                continue
            ready = pending.setdefault(g, {})
            ready[w] = (a, b)
            if len(ready) == waiting[g]:
                out[g] = self._group(g, pending.pop(g))
        if pending:
            raise FormatError(f"factors of {sorted(w for p in pending.values() for w in p)} arrived without the rest "
                              "of their group")
        self._last = (out, out)
        return out

    def _group(self, gname: str, lora: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """One group slot's (A, B) from the per-weight factors of its weights present in ``lora``."""
        ws = self.groups[gname]
        n = max(lora[w][0].shape[0] for w in ws if w in lora)
        ranks = [lora[w][0].shape[2] if w in lora else 0 for w in ws]
        if self.side_by_side:
            return self._side_by_side(gname, ws, lora, n, ranks)
        a = np.zeros((n, self.shapes[gname][1], sum(ranks)), np.float32)
        b = np.zeros((n, sum(ranks), self.shapes[gname][0]), np.float32)
        r0 = o0 = 0
        for w, r in zip(ws, ranks):
            o1 = o0 + self.shapes[w][0]
            if r:
                a[:, :, r0:r0 + r] = lora[w][0]
                b[:, r0:r0 + r, o0:o1] = lora[w][1]
            r0, o0 = r0 + r, o1
        return a, b

    def _b_shape(self, slot: str, n: int, r: int) -> tuple[int, ...]:
        """A slot's B at rank r for n rows: [n, r, out], or a group's [n, 1, C, r, g] (chunked) | [n, 1, r, Σout]."""
        out = self.shapes[slot][0]
        if slot in self.chunks:
            return n, 1, out // self.chunks[slot], r, self.chunks[slot]
        return (n, 1, r, out) if self.side_by_side and slot in self.groups else (n, r, out)

    def _side_by_side(self, gname: str, ws: list[str], lora: dict[str, tuple[np.ndarray, np.ndarray]], n: int,
                      ranks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """A [n, in, k·r] = [A_1 | … | A_k], r = the largest rank; B = [B_1 | … | B_k] over r, [n, 1, r, Σout], or
        its columns in chunks of g, [n, 1, C, r, g] (chunk c: columns [c·g, (c + 1)·g) of that B)."""
        r = max(ranks)
        a = np.zeros((n, self.shapes[gname][1], len(ws) * r), np.float32)
        b = np.zeros(self._b_shape(gname, n, r), np.float32)
        cols = b.reshape(n, r, self.shapes[gname][0]) if gname not in self.chunks else b.transpose(0, 1, 3, 2, 4)
        o0 = 0
        for j, (w, rw) in enumerate(zip(ws, ranks)):
            o1 = o0 + self.shapes[w][0]
            if rw:
                a[:, :, j * r:j * r + rw] = lora[w][0]
                if gname in self.chunks:
                    g = self.chunks[gname]
                    cols[:, 0, :rw, o0 // g:o1 // g] = lora[w][1].reshape(-1, rw, (o1 - o0) // g, g)
                else:
                    cols[:, :rw, o0:o1] = lora[w][1]
            o0 = o1
        return a, b

    def _grouped_names(self) -> set[str]:
        return {w for ws in self.groups.values() for w in ws}


class EmbedRows:
    """The Q8_0 embedding rows of an int4 / int8 graph (``edgeadapt.embed_rows``: where in its data file), read
    with ``pread`` for the tokens of each step and dequantized as onnxruntime's GatherBlockQuantized does,
    (q − 128)·d in float32 — the same floats bit for bit. Read, not memory-mapped: the page cache holds the
    file in large folios, and a lookup through a mapping made every 2 MB region a token falls in resident (a
    69-token chat prompt: 18 MB; a long conversation: the whole 28 MB table). Reading costs two ``pread`` calls
    a distinct token."""

    def __init__(self, root: Path, spec: str, cfg: Any):
        try:
            s = json.loads(spec)
            self.path = Path(root) / s["file"]
            self.vocab, self.dim, self.block = int(s["vocab"]), int(s["dim"]), int(s["block"])
            self._data, self._scales = int(s["data"]["offset"]), int(s["scales"]["offset"])
            self._stype = np.dtype({"float32": "<f4", "float16": "<f2"}[s["scales"]["type"]])
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{root}: the graph's edgeadapt.embed_rows property is not the expected JSON "
                              f"{{file, data, scales, vocab, dim, block}} ({e!r}); export the base again") from None
        if (self.vocab, self.dim) != (cfg.vocab_size, cfg.dim) or self.block <= 0 or self.dim % self.block:
            raise FormatError(f"{self.path.name}: expected an embedding of [{cfg.vocab_size}, {cfg.dim}] in blocks "
                              f"dividing {cfg.dim}, found [{self.vocab}, {self.dim}] in blocks of {self.block}")
        self._srow = self.dim // self.block * self._stype.itemsize
        need = max(self._data + self.vocab * self.dim, self._scales + self.vocab * self._srow)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise FormatError(f"{self.path}: the embedding's data file cannot be opened ({e.strerror})") from None
        size = os.fstat(self._fd).st_size
        if size < need:
            os.close(self._fd)
            self._fd = None
            raise FormatError(f"{self.path}: expected at least {need} bytes (the embedding rows), found {size}; "
                              "the file is truncated: export or bundle the base again")
        self._lock = None if hasattr(os, "pread") else threading.Lock()  # seek + read where there is no pread

    def _read(self, offset: int, n: int) -> bytes:
        if self._lock is None:
            raw = os.pread(self._fd, n, offset)
        else:
            with self._lock:
                os.lseek(self._fd, offset, os.SEEK_SET)
                raw = os.read(self._fd, n)
        if len(raw) != n:
            raise FormatError(f"{self.path}: expected {n} bytes at offset {offset}, found {len(raw)}; the file "
                              "changed under the running model")
        return raw

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """int64 [B, S] -> float32 [B, S, dim]."""
        flat = np.asarray(ids).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab):
            raise FormatError(f"token ids must lie in [0, {self.vocab}); found {flat.min()}…{flat.max()}")
        if not flat.size:
            return np.zeros((*np.shape(ids), self.dim), np.float32)
        uniq, inv = np.unique(flat, return_inverse=True)
        q = np.frombuffer(b"".join(self._read(self._data + int(t) * self.dim, self.dim) for t in uniq), np.uint8)
        d = np.frombuffer(b"".join(self._read(self._scales + int(t) * self._srow, self._srow) for t in uniq), self._stype)
        rows = (q.astype(np.float32) - np.float32(128)).reshape(len(uniq), -1, self.block)
        rows *= d.astype(np.float32).reshape(len(uniq), -1, 1)
        return rows.reshape(len(uniq), self.dim)[inv].reshape(*np.shape(ids), self.dim)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


def mapped_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros in an anonymous mapping: the kernel maps each 4 KB page, zeroed, when it is first written, so
    rows and positions of a cache not yet written take no memory. (``np.zeros`` of this size asks for 2 MB pages
    where the kernel grants them on request, and then a few written rows of each layer hold all of its rows:
    SmolLM2's cache with room for 16 rows, 2 rows written: +141 MB instead of +9 MB.)"""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(4 * n, 1)), np.float32, count=n).reshape(shape)


class KVCache:
    """The keys and values of a running batch, for a fused graph: per layer two buffers
    [batch, n_kv_heads, capacity, head_dim] bound as both ``past.{i}.*`` and ``present.{i}.*`` of one
    IOBinding, so GroupQueryAttention writes each step's keys in place (nothing is copied per token): row b's new
    keys at index seqlens_k[b] − S + 1, seqlens_k[b] being the index of its last 1 in attention_mask — T − S for
    left-padded rows, the row's own length on a graph that takes right-padded rows (``_Session.right_padded``).
    ``length`` is the mask's width T, whatever each row holds. Grows by doubling. Bound LoRA inputs stay bound until
    the plan (the ``lora`` dict) changes.

    ``rows`` (≥ batch): room for rows that join later in place (:meth:`reserve`): the buffers are
    [rows, n_kv_heads, capacity, head_dim], the first ``batch`` rows bound; rows not yet written take no memory.

    :meth:`run` with ``last=True`` (a decode step) writes the logits [batch, 1, vocab] into one buffer the cache
    keeps and returns it: they are valid until the next such run. A fresh array each step cost a page fault per
    4 KB of it (glibc maps blocks over 64 KiB anew, see ``memory.return_large_buffers``): SmolLM2 int4 bare decode
    1.05× with the buffer kept (docs/PERFORMANCE.md)."""

    def __init__(self, engine: Any, batch: int, tokens: int, g: "_Session", rows: int | None = None):
        cfg = engine.cfg
        self._g = g  # this session and its slots, whatever the engine switches to later
        self._engine, self.sess, self.batch, self.length = engine, g.sess, batch, 0
        self.rows = max(batch, rows or batch)
        self._slots, self._empty_slot = g.slots, g.empty_slot
        self.io = self.sess.io_binding()
        self.io.bind_output("logits", "cpu")
        vocab = self.sess.get_outputs()[0].shape[-1]
        self._vocab = vocab if isinstance(vocab, int) else cfg.vocab_size
        self._arrays: list[np.ndarray] = []
        self.capacity = 0
        self._grow(tokens + 64)
        self._lora: Any = KVCache  # nothing bound yet
        self._inputs: tuple = ()
        self._logits: np.ndarray | None = None  # the bound logits buffer of decode steps (see the class docstring)

    def _grow(self, tokens: int) -> None:
        cap = max(tokens, 2 * self.capacity)
        cap = -(-cap // 64) * 64
        cfg = self._engine.cfg
        whole = mapped_zeros((2 * cfg.n_layers, self.rows, cfg.n_kv_heads, cap, cfg.head_dim))
        for a, old in zip(whole, self._arrays):
            a[: self.batch, :, : self.length] = old[: self.batch, :, : self.length]
        self._arrays, self.capacity = list(whole), cap
        self._bind()

    def _bind(self) -> None:
        """Bind the first ``batch`` rows of every buffer as that layer's past and present (views: no copy)."""
        ort = self._engine._ort
        for i, a in enumerate(self._arrays):
            v = ort.OrtValue.ortvalue_from_numpy(a[: self.batch])  # shares a's memory
            name = f"{i // 2}.{('key', 'value')[i % 2]}"
            self.io.bind_ortvalue_input(f"past.{name}", v)
            self.io.bind_ortvalue_output(f"present.{name}", v)

    def reserve(self, batch: int, length: int) -> bool:
        """Bind the first ``batch`` rows, the mask ``length`` keys wide, in place: rows kept where they are, the new
        ones' keys to be written at [0, len) of their row (right-padded, len ≤ length). False: more rows than the
        buffers hold (make a new cache)."""
        if batch > self.rows:
            return False
        if length + 1 > self.capacity:
            self._grow(length + 1)
        if batch != self.batch:
            self.batch = batch
            self._bind()
        self.length = length
        return True

    def _bind_lora(self, lora: Any) -> None:
        arrays = self._g.slot_arrays(lora)
        for name in self._slots:
            a, b = arrays.get(name) or self._empty_slot[name]
            self.io.bind_cpu_input(f"lora.{name}.a", a)
            self.io.bind_cpu_input(f"lora.{name}.b", b)
        self._lora, self._bound = lora, arrays  # keeps the bound arrays alive

    def run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, lora: Any, last: bool = False) -> np.ndarray:
        if lora and not self._slots:
            raise AdapterMismatchError("this request started on the plain graph (no LoRA slots); start a new "
                                       "request to run adapters live")
        if mask.shape[1] > self.capacity:
            self._grow(mask.shape[1])
        if self._slots and lora is not self._lora:
            self._bind_lora(lora)
        start = np.array([-1 if last else 0], np.int64)
        feeds = self._g.id_feeds(ids)
        self._inputs = (feeds, mask, pos, start)  # bound by pointer: alive until the next step rebinds them
        for name, a in feeds.items():
            self.io.bind_cpu_input(name, a)
        self.io.bind_cpu_input("attention_mask", mask)
        self.io.bind_cpu_input("position_ids", pos)
        if self._g.logits_from:
            self.io.bind_cpu_input("logits.from", start)
        # onnxruntime writes the logits straight into a fresh numpy array: no second copy of a prompt's
        # [batch, tokens, vocab] float32 (13.6 MB for 69 tokens of SmolLM2) at the peak of a prefill
        rows = 1 if last and self._g.logits_from else ids.shape[1]
        shape = (ids.shape[0], rows, self._vocab)
        keep = last and rows == 1  # a decode step's [batch, 1, vocab], not a prompt's every position
        logits = self._logits
        if logits is None or logits.shape != shape or not keep:
            logits = np.empty(shape, np.float32)
            self.io.bind_ortvalue_output("logits", self._engine._ort.OrtValue.ortvalue_from_numpy(logits))
            self._logits = logits if keep else None  # the binding holds no reference: keep the buffer alive
        self.sess.run_with_iobinding(self.io)
        self.length = mask.shape[1]
        return np.ascontiguousarray(logits[:, -1:]) if last and rows > 1 else logits
