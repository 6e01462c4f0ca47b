"""One onnxruntime session of a base graph (:class:`_Session`: its LoRA slots and their grouped inputs) and the
running batch's keys and values bound to it in place (:class:`KVCache`). Used by
:class:`edgeadapt.runtime.ort_engine.engine.OrtEngine`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import AdapterMismatchError


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
        # a group slot's b: the weights' B side by side [n, 1, r, Σout] (graphs since issue #17's third pass), or
        # block-diagonal [n, Σr, Σout] (graphs exported before, which have no such property)
        self.side_by_side = bool(self.groups) and meta.get("edgeadapt.slot_groups.b") == "side_by_side"
        self.empty_slot = {n: (np.zeros((1, shapes[n][1], 0), np.float32),
                               np.zeros((1, 1, 0, shapes[n][0]) if self.side_by_side and n in self.groups
                                        else (1, 0, shapes[n][0]), np.float32))
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
            present = [w for w in ws if w in lora]
            if not present:
                continue
            n = max(lora[w][0].shape[0] for w in present)
            ranks = [lora[w][0].shape[2] if w in lora else 0 for w in ws]
            if self.side_by_side:
                out[gname] = self._side_by_side(gname, ws, lora, n, ranks)
                continue
            a = np.zeros((n, self.shapes[gname][1], sum(ranks)), np.float32)
            b = np.zeros((n, sum(ranks), self.shapes[gname][0]), np.float32)
            r0 = o0 = 0
            for w, r in zip(ws, ranks):
                o1 = o0 + self.shapes[w][0]
                if r:
                    a[:, :, r0:r0 + r] = lora[w][0]
                    b[:, r0:r0 + r, o0:o1] = lora[w][1]
                r0, o0 = r0 + r, o1
            out[gname] = (a, b)
        self._last = (lora if keep else out, out)
        return out

    def _side_by_side(self, gname: str, ws: list[str], lora: dict[str, tuple[np.ndarray, np.ndarray]], n: int,
                      ranks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """A [n, in, k·r] = [A_1 | … | A_k], B [n, 1, r, Σout] = [B_1 | … | B_k], r = the largest rank."""
        r = max(ranks)
        a = np.zeros((n, self.shapes[gname][1], len(ws) * r), np.float32)
        b = np.zeros((n, 1, r, self.shapes[gname][0]), np.float32)
        o0 = 0
        for j, (w, rw) in enumerate(zip(ws, ranks)):
            o1 = o0 + self.shapes[w][0]
            if rw:
                a[:, :, j * r:j * r + rw] = lora[w][0]
                b[:, 0, :rw, o0:o1] = lora[w][1]
            o0 = o1
        return a, b

    def _grouped_names(self) -> set[str]:
        return {w for ws in self.groups.values() for w in ws}


class KVCache:
    """The keys and values of a running batch, for a fused graph: per layer two buffers
    [batch, n_kv_heads, capacity, head_dim] bound as both ``past.{i}.*`` and ``present.{i}.*`` of one
    IOBinding, so GroupQueryAttention writes each step's keys in place (nothing is copied per token): row b's new
    keys at index seqlens_k[b] − S + 1, seqlens_k[b] being the index of its last 1 in attention_mask — T − S for
    left-padded rows, the row's own length on a graph that takes right-padded rows (``_Session.right_padded``).
    ``length`` is the mask's width T, whatever each row holds. Grows by doubling. Bound LoRA inputs stay bound until
    the plan (the ``lora`` dict) changes."""

    def __init__(self, engine: Any, batch: int, tokens: int, g: "_Session"):
        cfg = engine.cfg
        self._g = g  # this session and its slots, whatever the engine switches to later
        self._engine, self.sess, self.batch, self.length = engine, g.sess, batch, 0
        self._slots, self._empty_slot = g.slots, g.empty_slot
        self.io = self.sess.io_binding()
        self.io.bind_output("logits", "cpu")
        vocab = self.sess.get_outputs()[0].shape[-1]
        self._vocab = vocab if isinstance(vocab, int) else cfg.vocab_size
        self._shape = (batch, cfg.n_kv_heads, 0, cfg.head_dim)
        self._arrays: list[np.ndarray] = []
        self.capacity = 0
        self._grow(tokens + 64)
        self._lora: Any = KVCache  # nothing bound yet
        self._inputs: tuple = ()

    def _grow(self, tokens: int) -> None:
        cap = max(tokens, 2 * self.capacity)
        cap = -(-cap // 64) * 64
        ort = self._engine._ort
        arrays = []
        for i, old in enumerate(self._arrays or [None] * (2 * self._engine.cfg.n_layers)):
            a = np.zeros(self._shape[:2] + (cap,) + self._shape[3:], np.float32)  # pages stay untouched until written
            if old is not None:
                a[:, :, : self.length] = old[:, :, : self.length]
            arrays.append(a)
            v = ort.OrtValue.ortvalue_from_numpy(a)  # shares a's memory
            name = f"{i // 2}.{('key', 'value')[i % 2]}"
            self.io.bind_ortvalue_input(f"past.{name}", v)
            self.io.bind_ortvalue_output(f"present.{name}", v)
        self._arrays, self.capacity = arrays, cap

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
        self._inputs = (ids, mask, pos, start)  # bound by pointer: alive until the next step rebinds them
        self.io.bind_cpu_input("input_ids", ids)
        self.io.bind_cpu_input("attention_mask", mask)
        self.io.bind_cpu_input("position_ids", pos)
        if self._g.logits_from:
            self.io.bind_cpu_input("logits.from", start)
        # onnxruntime writes the logits straight into a fresh numpy array: no second copy of a prompt's
        # [batch, tokens, vocab] float32 (13.6 MB for 69 tokens of SmolLM2) at the peak of a prefill
        rows = 1 if last and self._g.logits_from else ids.shape[1]
        logits = np.empty((ids.shape[0], rows, self._vocab), np.float32)
        self.io.bind_ortvalue_output("logits", self._engine._ort.OrtValue.ortvalue_from_numpy(logits))
        self.sess.run_with_iobinding(self.io)
        self.length = mask.shape[1]
        return np.ascontiguousarray(logits[:, -1:]) if last and rows > 1 else logits
