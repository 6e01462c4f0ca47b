"""The onnxruntime engine: runs a base folder's ``model.onnx``.

Merge mode: the adapted linear weights W' = W + ΔW (float32, from the immutable base) replace
the graph's initializers through ``SessionOptions.add_initializer`` in a new session, which takes
over only once it is built and verified — a failed swap leaves the running session untouched.

onnxruntime silently ignores an override of a weight it constant-folded, and silently accepts an
override under a name the graph does not have. So every swap is verified twice: the base folder's
``weight_sums.onnx`` (same initializer names, nothing to fold) is run with the same overrides and
must report the sum of every weight it was given; and the new decoder session must answer a
one-token probe differently from the old one whenever the weights changed.

Quantized weights (``weights="int4"`` / ``"int8"``): the base folder's ``model_int4.onnx`` /
``model_int8.onnx`` (llama.cpp Q4_1 / Q8_0 blocks in onnxruntime's MatMulNBits, fused operators;
see ``edgeadapt.converters.onnx_graphs.fast``). Adapters run live only, in float32 beside the quantized
weights: merging would mean re-quantizing, which loses most of a small delta.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Collection, Iterable

import numpy as np

from edgeadapt.errors import (AdapterMismatchError, EdgeAdaptError, FormatError, MissingDependencyError,
                              UnsupportedError, collect)
from edgeadapt.formats.manifest import BaseManifest

from edgeadapt.runtime.engines import Engine
from edgeadapt.runtime.ort_engine.memory import MEMORY, drop_mapped_pages, return_large_buffers
from edgeadapt.runtime.ort_engine.session import KVCache, _Session

PastKV = list[tuple[np.ndarray, np.ndarray]]
WEIGHTS = {"fp32": None, "int4": "onnx_int4", "int8": "onnx_int8"}  # weights= -> manifest file kind (None: onnx)


class OverrideNotAppliedError(EdgeAdaptError, RuntimeError):
    """onnxruntime built a session that does not use the weights it was given."""


def import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("engine 'ort' needs onnxruntime (pip install onnxruntime); "
                                     "engine='numpy' runs without it") from e
    return ort


class OrtEngine(Engine):
    """``live=False``: the plain graph, adapters merged into its weights (a swap builds a session).
    ``live=True``: the slotted graph (``model_live.onnx``, else ``model_lora.onnx``); adapters are run
    inputs (``lora=`` of :meth:`forward`), a swap binds other arrays, and empty slots run the bare base.
    ``live="lazy"``: the plain graph until the first adapter runs live (:meth:`ensure_slots`), so a bare
    base pays nothing for the slots it does not use."""

    name = "ort"
    last_logits = True  # forward(last=True): the graphs since issue #17 compute the last position's logits only
    copies_factors = True  # the slot arrays (session.slot_arrays) are made from the driver's views

    def __init__(self, manifest: BaseManifest, *, threads: int | None = None, live: bool | str = False,
                 weights: str = "fp32", defer: bool = False, memory: str = "balanced"):
        self._ort = import_ort()
        if memory not in MEMORY:
            raise UnsupportedError(f"memory {memory!r} is not one of {tuple(MEMORY)}")
        self.memory = memory
        if memory != "fast":
            return_large_buffers()
        if weights not in WEIGHTS:
            raise UnsupportedError(f"weights {weights!r} is not one of {tuple(WEIGHTS)}")
        self.weights = weights
        quant_plain = None
        if weights != "fp32":  # the quantized graph carries its own LoRA slots: live only
            path = manifest.path(WEIGHTS[weights])
            if path is None or not path.is_file():
                raise FormatError(f"{manifest.root} has no {weights} ONNX graph (model_{weights}.onnx); export the "
                                  f"base with `edgeadapt export-base … --onnx-quant {weights}`, or use weights='fp32'")
            quant_plain = manifest.path(WEIGHTS[weights] + "_base")  # the same without slots, when exported
            if quant_plain is not None and not quant_plain.is_file():
                quant_plain = None
            live = "lazy" if live == "lazy" and quant_plain is not None else True
        else:
            path = manifest.path("onnx")
        if path is None or not path.is_file():
            raise FormatError(f"{manifest.root}: the manifest names no ONNX model, or {path} is missing; "
                              "export the base again or use engine='numpy'")
        self.cfg = manifest.arch
        self._path, self._root, self._threads = path, manifest.root, threads
        self._table = {n: e["onnx"] for n, e in manifest.tensors.items() if isinstance(e, dict) and "onnx" in e}
        self._linear = list(self.cfg.linear_shapes())
        self._sums_path = manifest.path("onnx_check") or path.parent / "weight_sums.onnx"
        self._kinds_file, self._kinds = manifest.path("onnx_kinds"), None  # scale / bias slots, built on first use
        self._bn_file, self._bn = manifest.path("onnx_bottleneck"), None  # + bottleneck slots, built on first use
        self.live = bool(live)
        self._lazy = live == "lazy"  # plain graph until the first adapter runs live
        self._slotted_path: Path | None = None
        if quant_plain is not None and self._lazy:
            self._slotted_path, self._path = path, quant_plain
        elif live and weights == "fp32":
            self._slotted_path = _slotted_graph(manifest)
            if not self._lazy:
                self._path = self._slotted_path
        self._plain_path = path if weights == "fp32" else None  # model.onnx: where merged weights run
        self._folded: set[Path] = set()  # graphs whose weights are fused in-graph: not overridable (model_live.onnx)
        self._out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.cfg.n_layers) for kv in ("key", "value")]
        self._switch = threading.Lock()
        self._g: _Session | None = None
        self._keep: Any = ()
        # ``defer`` (a lazy engine): build the plain session when it first runs, not here — a cold start whose
        # first request uses an adapter then builds only the slotted graph (one session build, not two)
        self._deferred = bool(defer and self._lazy)
        if not self._deferred:
            self._adopt(self._build({}), path=self._path)
        self._probe: np.ndarray | None = None  # made at the first set_weights: a cold start does not pay for it
        self._mm: dict[str, np.memmap] = {}

    def _adopt(self, sess: Any, keep: Any = (), *, path: Path) -> None:
        """Make ``sess`` (built from ``path``; or its _Session) the running session: one assignment, so a
        concurrent request sees the old session with everything derived from it, or the new one with its own
        (a request reads ``self._g`` once)."""
        g = sess if isinstance(sess, _Session) else _Session(sess, self.cfg, self._linear, path)
        if g.groups and self.weights == "fp32":  # q|k|v, gate|up concatenated in the graph (onnx_graphs.fast._F32Linears)
            self._folded.add(path)
        self._g, self._keep = g, keep

    # what forward reads, always from one _Session
    _session = property(lambda self: self._current().sess)
    _slots = property(lambda self: self._current().slots)
    _inplace = property(lambda self: self._current().inplace)

    @property
    def graph(self) -> str:
        """The file of the running session: model.onnx until a lazy engine first runs an adapter, and while
        merged weights run (the live graph's weights are fused in-graph, so merges run on model.onnx)."""
        return self._current().path.name

    def ensure_slots(self) -> None:
        """A lazy live engine (``live="lazy"``: the bare base runs on the plain graph, at its full speed) moves
        to the slotted graph, once, when an adapter first runs live. Requests already running keep their
        session; the plain session is released when they end."""
        if not self._lazy or self._path == self._slotted_path:
            return
        if self._keep and self._keep[0]:
            raise UnsupportedError("merged weights are active on the plain graph; restore the base before running "
                                   "adapters live")
        with self._switch:
            if self._path == self._slotted_path:
                return
            self._deferred = False  # a deferred engine goes straight to the slotted graph
            # release the plain session first (requests running on it keep it alive until they end): the
            # two sessions, each with its prepacked copy of the weights, are not resident together
            self._g = None  # forward waits on self._switch meanwhile
            try:
                sess = self._build({}, self._slotted_path)
            except BaseException:
                self._adopt(self._build({}), path=self._path)  # the plain graph again: nothing changed
                raise
            self._path, self._probe = self._slotted_path, None
            self._adopt(sess, self._pending_keep, path=self._path)

    def _current(self) -> "_Session":
        """The running session; while a switch builds the next one, wait for it."""
        g = self._g
        if g is None:
            with self._switch:
                g = self._g
                if g is None and self._deferred:  # first use of a deferred engine: the plain graph
                    self._adopt(self._build({}), path=self._path)
                    self._deferred, g = False, self._g
        return g

    # ---- sessions
    def _options(self) -> Any:
        so = self._ort.SessionOptions()
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            so.intra_op_num_threads = self._threads
        so.log_severity_level = 3
        arena, pattern = MEMORY[self.memory]
        so.enable_cpu_mem_arena, so.enable_mem_pattern = arena, pattern
        if self.memory == "fast":
            # prepack the weights on the intra-op threads (onnxruntime ≥ 1.32; older ones ignore the key): the same
            # packed bytes, but every weight's mapped pages stay resident until the last is packed. SmolLM2 int4, one
            # adapter, 2 threads: use() 0.289 -> 0.233 s, peak RSS 262 -> 311 MB (bench/cold_start.py); "low" and
            # "balanced" pack one weight at a time
            so.add_session_config_entry("session.prepack.enable_parallel", "1")
        return so

    def _build(self, overrides: dict[str, np.ndarray], path: Path | None = None) -> Any:
        so = self._options()
        arrays, values = {}, []
        for name, w in overrides.items():
            e = self._table[name]
            arrays[name] = np.ascontiguousarray(w.T if e["layout"] == "in_out" else w, dtype=np.float32)
            values.append(self._ort.OrtValue.ortvalue_from_numpy(arrays[name]))
            so.add_initializer(e["onnx"], values[-1])
        sess = self._ort.InferenceSession(str(path or self._path), so, providers=["CPUExecutionProvider"])
        self._pending_keep = (arrays, values, so)  # must outlive the session: onnxruntime uses the buffers as they are
        if self.memory != "fast":
            drop_mapped_pages(self._root)
        return sess

    def _probe_logits(self, g: "_Session") -> np.ndarray:
        """Logits of a fixed two-token input: a fingerprint of the weights a session really uses."""
        feeds = {**g.id_feeds(np.array([[1, 2]], np.int64) % self.cfg.vocab_size),
                 "attention_mask": np.ones((1, 2), np.int64), "position_ids": np.array([[0, 1]], np.int64)}
        for i in range(self.cfg.n_layers):
            for kv in ("key", "value"):
                feeds[f"past.{i}.{kv}"] = np.zeros((1, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
        for n in g.required:  # a graph whose slots have no default: idle (rank 0)
            feeds[f"lora.{n}.a"], feeds[f"lora.{n}.b"] = g.empty_slot[n]
        if g.logits_from:
            feeds["logits.from"] = np.zeros(1, np.int64)
        return g.sess.run(["logits"], feeds)[0]

    # ---- weights
    def base_weight(self, name: str) -> np.ndarray:
        """The base tensor, float32, canonical [out, in] (a fresh array)."""
        e = self._table.get(name)
        if e is None:
            raise AdapterMismatchError(f"{name}: not a weight of this base's ONNX export")
        mm = self._mm.get(e["file"])
        if mm is None:
            mm = self._mm[e["file"]] = np.memmap(self._root / e["file"], dtype=np.uint8, mode="r")
        raw = mm[e["offset"]: e["offset"] + e["length"]].view(np.dtype(e["dtype"])).reshape(e["shape"])
        return np.array(raw.T if e["layout"] == "in_out" else raw, dtype=np.float32)

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the base's float32 token_embd [n, dim] for ``ids`` [n] (read from the data file, not copied
        whole). The int4 / int8 graphs look up Q8_0 rows of the same table, within its quantization error."""
        e = self._table.get("token_embd.weight")
        if e is None or e["layout"] != "as_is":
            raise FormatError(f"{self._root}: adapters that read the base's embedding rows (trainable tokens, a tied "
                              "head's changed rows) need token_embd.weight in float32 (model.onnx.data), which the "
                              "manifest does not locate (an int4 / int8 device bundle ships none); load the full "
                              "base folder for such adapters")
        mm = self._mm.get(e["file"])
        if mm is None:
            mm = self._mm[e["file"]] = np.memmap(self._root / e["file"], dtype=np.uint8, mode="r")
        table = mm[e["offset"]: e["offset"] + e["length"]].view(np.dtype(e["dtype"])).reshape(e["shape"])
        return np.array(table[np.asarray(ids, np.int64).reshape(-1)], dtype=np.float32)

    def set_weights(self, overrides: dict[str, np.ndarray]) -> None:
        """Replace these linear weights (float32 [out, in]) from the base; ``{}`` restores the base."""
        if self.weights != "fp32":
            raise UnsupportedError(f"cannot merge into {self.weights} weights (it would re-quantize them and lose most "
                                   "of a small delta); run adapters live (mode='live' or 'auto'), or load "
                                   "weights='fp32' to merge")
        if self._probe is None:
            self._probe = self._probe_logits(self._current())
        problems = []
        for n, w in overrides.items():
            shape = self.cfg.linear_shapes().get(n)
            if n == "token_embd.weight" and not self.cfg.tied_embeddings:  # a merged embedding change (untied head)
                shape = (self.cfg.vocab_size, self.cfg.dim)
            if shape is None or n not in self._table:
                problems.append(f"{n}: not an adaptable weight of this base")
            elif tuple(w.shape) != shape or w.dtype != np.float32:
                problems.append(f"{n}: expected float32 {list(shape)}, found {w.dtype} {list(w.shape)}")
            elif not np.isfinite(w).all():
                problems.append(f"{n}: holds NaN or Inf")
        collect(problems, AdapterMismatchError, "cannot apply these weights:")
        # a graph with weights fused in-graph ignores overrides (they feed a Concat onnxruntime folded at load):
        # merged weights run on the plain graph, and the live graph comes back with the base weights ({})
        path = self._plain_path if overrides and self._path in self._folded else self._path
        sess = _Session(self._build(overrides, path), self.cfg, self._linear, path)
        keep = self._pending_keep
        probe = self._probe_logits(sess)
        if overrides:
            self._verify_sums(overrides)
        changed = self._changed(overrides)
        if changed and np.array_equal(probe, self._probe):
            raise OverrideNotAppliedError(
                f"onnxruntime built a session whose output did not change although {len(changed)} weights did "
                f"(e.g. {changed[0]}); the model was left as it was")
        self._adopt(sess, keep, path=path)
        self._probe = probe

    def _changed(self, overrides: dict[str, np.ndarray]) -> list[str]:
        """Names whose weight differs from what the running session uses."""
        cur = self._keep[0] if self._keep else {}  # name -> array in the graph's layout
        out = []
        for n in sorted(set(cur) | set(overrides)):
            a = cur[n].T if n in cur and self._table[n]["layout"] == "in_out" else cur.get(n)
            a = self.base_weight(n) if a is None else a
            b = overrides[n] if n in overrides else self.base_weight(n)
            if not np.array_equal(a, b):
                out.append(n)
        return out

    def _verify_sums(self, overrides: dict[str, np.ndarray]) -> None:
        if not self._sums_path.is_file():
            raise FormatError(f"{self._sums_path} is missing: the base folder is incomplete; export it again")
        lin = {n: w for n, w in overrides.items() if n in self._linear}  # weight_sums.onnx sums the linears
        got = self._build(lin, self._sums_path).run(["weight_sums"], {})[0].astype(np.float64)
        bad = []
        for i, n in enumerate(self._linear):
            if n in overrides:
                want = float(overrides[n].sum(dtype=np.float64))
                tol = 1e-5 * float(np.abs(overrides[n]).sum(dtype=np.float64)) + 1e-6
                if abs(got[i] - want) > tol:
                    bad.append(f"{n}: expected sum {want:.7g}, onnxruntime sees {got[i]:.7g}")
        if bad:
            raise OverrideNotAppliedError("onnxruntime did not take these weight overrides; the model was left "
                                          "as it was:\n  " + "\n  ".join(bad))

    # ---- forward
    def cache_layers(self, past: Any) -> list[tuple[np.ndarray, np.ndarray, int]]:
        if isinstance(past, KVCache):  # per layer key, value buffers [B, KV, capacity, hd]
            return [(past._arrays[2 * i], past._arrays[2 * i + 1], past.length) for i in range(len(past._arrays) // 2)]
        return super().cache_layers(past)

    def slot_form(self, lora: dict[str, Any]) -> dict[str, Any]:
        """The running graph's slot inputs: q|k|v and gate|up grouped (session.slot_arrays: the weights' B side by
        side, or block-diagonal on graphs exported before), which the graph's slot_arrays passes through as they are."""
        return self._current().slot_arrays(lora, keep=False)

    def slot_form_from(self, parts: Iterable[tuple[str, np.ndarray, np.ndarray]], targets: Collection[str]
                       ) -> dict[str, Any]:
        return self._current().slot_arrays_from(parts, targets)

    def cache_from(self, layers: list[tuple[np.ndarray, np.ndarray]], plan: Any = None) -> Any:
        """A KVCache bound in place (IOBinding) when ``plan`` runs on the in-place fused path: no embedding, head,
        bottleneck or scale / bias terms; otherwise the list, for the general path."""
        B, _, T, _ = layers[0][0].shape
        made = self.blank_cache(B, T, plan)
        if made is None:
            return layers
        for (K, V), (k, v) in zip(made[1], layers):
            K[:, :, :T] = k
            V[:, :, :T] = v
        return made[0]

    def blank_cache(self, batch: int, tokens: int, plan: Any, rows: int | None = None
                    ) -> tuple[Any, list[tuple[np.ndarray, np.ndarray]]] | None:
        g = self._current()
        if not self._inplace(plan, g):
            return None
        cache = KVCache(self, batch, tokens, g, rows)
        cache.length = tokens
        return cache, [(cache._arrays[2 * i], cache._arrays[2 * i + 1]) for i in range(self.cfg.n_layers)]

    def reserve_rows(self, past: Any, batch: int, length: int, plan: Any) -> bool:
        return (isinstance(past, KVCache) and past._g is self._current() and self._inplace(plan, past._g)
                and past.reserve(batch, length))

    def adopt_cache(self, past: Any, plan: Any, length: int) -> Any:
        """The prefill's KVCache itself, when it runs on the current session and ``plan`` runs in place on it:
        what cache_from would copy its keys into (a transient second cache: SmolLM2, 69 tokens, +6 MB)."""
        if not isinstance(past, KVCache) or past.batch != 1 or past.length != length:
            return None
        g = self._current()
        return past if past._g is g and self._inplace(plan, g) else None

    def _inplace(self, plan: Any, g: "_Session") -> bool:
        """Whether ``plan`` runs on the in-place fused path of ``g``: no embedding, head, bottleneck or scale /
        bias terms, and slots for its factors."""
        from edgeadapt.runtime.seq import Plan

        extras = isinstance(plan, Plan) and (plan.embed is not None or plan.head is not None or bool(plan.bn))
        kinds = bool(plan) and any(type(v) is tuple and len(v) > 2 for v in plan.values())
        return not (extras or kinds or not g.inplace or plan and not g.slots)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: Any = None, lora: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                embed: np.ndarray | None = None, bn: dict[str, np.ndarray] | None = None,
                head: tuple[np.ndarray, np.ndarray] | None = None, last: bool = False) -> tuple[np.ndarray, Any]:
        """Logits [B, S, vocab] float32 and the cache to pass back as ``past`` for the next tokens; ``last``:
        [B, 1, vocab], the last position's only (what sampling reads; graphs with a ``logits.from`` input do not
        compute the others).

        ``embed``: float32 [B or 1, S or 1, dim], added to the looked-up embeddings (graph input ``embed.delta``).
        ``past`` may also be a list of (key, value) [B, KV, P, hd] made by the caller (a KV prefix); such a
        request, and one with ``embed``, runs on arrays fed each step rather than the in-place cache.
        ``head``: (ids int64 [k], delta float32 [B or 1, k, dim]), a live change of some head rows (graph inputs
        ``head.ids`` / ``head.delta``, on the graphs that serve adapters); it too runs on fed arrays.

        ``lora`` (live engines only): {weight: (A [n, in, r], B [n, r, out])}, n = 1 or batch, scale in B.
        On a fused graph (GroupQueryAttention) the cache is a :class:`KVCache` updated in place: pass each
        one back once. On an older plain graph it is the list of (key, value) arrays of model.onnx.
        ``attention_mask`` rows may be right-padded where :attr:`pads_right` (each row's keys and new tokens end at
        its last 1), else left-padded (every row's at the last column).

        ``bn``: bottleneck slot inputs {``bn.<i>.<p>.<part>``: array} (:mod:`edgeadapt.runtime.bn_slots`), run on
        model_bottleneck.onnx beside ``lora``."""
        if (lora or bn) and not self.live:
            raise AdapterMismatchError("live LoRA factors need the slotted graph: load with mode='live' or 'auto'")
        if bn or lora and any(len(v) > 2 for v in lora.values()):  # scale / bias / bottleneck: their own graphs
            lg, past = self._forward_kinds(input_ids, attention_mask, position_ids, past, lora or {}, embed, bn, head)
            return _last(lg, last), past
        if (lora or head is not None) and self._lazy:
            self.ensure_slots()
        ids, mask, pos = (np.ascontiguousarray(a, dtype=np.int64) for a in (input_ids, attention_mask, position_ids))
        g = self._current()
        if embed is not None and not g.embed:
            raise FormatError(f"{g.path.name} has no embed.delta input (embedding changes, virtual tokens); "
                              "export the base again with this edgeadapt")
        if head is not None and not g.head:
            raise UnsupportedError(f"{g.path.name} has no head.delta input: a change of the output head (trainable "
                                   "tokens or modules_to_save on a tied head) runs live on the graphs that serve "
                                   "adapters (mode='live' or 'auto'); export the base again with this edgeadapt")
        if isinstance(past, KVCache) or g.inplace and embed is None and head is None and not past:
            return self._forward_inplace(ids, mask, pos, past, lora, g, last)
        b = ids.shape[0]
        feeds = {**g.id_feeds(ids), "attention_mask": mask, "position_ids": pos}
        empty = np.zeros((b, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
        for i in range(self.cfg.n_layers):
            k, v = past[i] if past else (empty, empty)
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = k, v
        for name in g.required:
            feeds[f"lora.{name}.a"], feeds[f"lora.{name}.b"] = g.empty_slot[name]
        for name, (a, bb) in g.slot_arrays(lora).items():
            feeds[f"lora.{name}.a"], feeds[f"lora.{name}.b"] = a, bb
        if embed is not None:
            feeds["embed.delta"] = np.ascontiguousarray(embed, np.float32)
        names = self._head_feeds(g, feeds, head)
        if g.logits_from:
            feeds["logits.from"] = np.array([-1 if last else 0], np.int64)
        s = ids.shape[1]
        if g.fused and past and b > 1 and s > 1 and past[0][0].shape[2] > 0:
            # GroupQueryAttention takes several new tokens after a past only at batch 1: one at a time
            out = []
            for k in range(s):
                e = embed if embed is None or embed.shape[1] == 1 else embed[:, k:k + 1]
                lg, past = self.forward(ids[:, k:k + 1], _upto(mask, s, k), pos[:, k:k + 1], past, lora, e,
                                        head=head)
                out.append(lg)
            return (out[-1] if last else np.concatenate(out, axis=1)), past
        outs = g.sess.run(names, feeds)
        return _last(_add_head(outs, head, g), last), [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.cfg.n_layers)]

    def _head_feeds(self, g: "_Session", feeds: dict[str, Any], head: Any) -> list[str]:
        """Feed a live change of head rows; the outputs to fetch (+ head.logits on graphs that output it)."""
        if head is None:
            return self._out_names
        feeds["head.delta"] = np.ascontiguousarray(head[1], np.float32)
        if g.head_out:
            return self._out_names + ["head.logits"]
        feeds["head.ids"] = np.ascontiguousarray(head[0], np.int64)  # an older graph scatters it in-graph
        return self._out_names

    # ---- scale / bias slots (model_kinds.onnx: DoRA, IA3, lora_bias)
    @property
    def kind_slots(self) -> bool:
        """Can this engine run scale / bias terms live (the fp32 base folder has model_kinds.onnx)?"""
        return self.live and self.weights == "fp32" and self._kinds_file is not None and self._kinds_file.is_file()

    @property
    def pads_right(self) -> bool:
        """The running graph takes right-padded rows (GroupQueryAttention gets each row's key count from its
        attention_mask): the fused graphs exported with that property; older ones, and the plain-operator graphs,
        take left-padded rows only. Every graph of one base folder (plain, slotted, kinds, bottleneck) comes from one
        export, so the running session speaks for them all."""
        return self._current().right_padded

    @property
    def can_merge(self) -> bool:
        """Can adapters be folded into the weights (float32 overrides of model.onnx; int4 / int8 blocks cannot)?"""
        return self.weights == "fp32"

    @property
    def head_slots(self) -> bool:
        """Can this engine change head rows live (``head.delta``: the slotted graphs, so live or auto mode)?"""
        return self.live

    @property
    def bn_slots(self) -> bool:
        """Can this engine run bottleneck adapters (the fp32 base folder has model_bottleneck.onnx)?"""
        return self.live and self.weights == "fp32" and self._bn_file is not None and self._bn_file.is_file()

    def _forward_kinds(self, ids: Any, mask: Any, pos: Any, past: Any, lora: dict[str, tuple], embed: Any,
                       bn: dict[str, np.ndarray] | None = None, head: Any = None) -> tuple[np.ndarray, Any]:
        """``lora`` entries (A, B, in [n, in], out [n, out], bias [n, out]), any of them None, on model_kinds.onnx
        — or, with ``bn`` slot inputs, on model_bottleneck.onnx, which has the same inputs and the bottleneck
        slots (each built once, on first use; arrays fed every step)."""
        if bn and not self.bn_slots:
            raise UnsupportedError("bottleneck adapters run live on onnxruntime through model_bottleneck.onnx, on the "
                                   f"fp32 graph in live or auto mode; this base folder ({self._root}) has none or the "
                                   "engine is not live: export the base again, or use engine='numpy'")
        if not bn and not self.kind_slots:
            raise UnsupportedError("adapters that scale or shift a layer (dora, ia3, lora_bias) run live on onnxruntime "
                                   "through model_kinds.onnx, on the fp32 graph in live or auto mode; this base folder "
                                   f"({self._root}) has none or the engine is not live: export the base again, or use "
                                   "engine='numpy'")
        attr, file = ("_bn", self._bn_file) if bn else ("_kinds", self._kinds_file)
        if getattr(self, attr) is None:
            with self._switch:
                if getattr(self, attr) is None:
                    sess = self._build({}, file)
                    setattr(self, attr, (_Session(sess, self.cfg, self._linear, file), self._pending_keep))
        if self._keep and self._keep[0]:
            raise UnsupportedError("merged weights are active; restore the base before running scale / bias terms "
                                   "or bottleneck adapters live")
        g = getattr(self, attr)[0]
        if isinstance(past, KVCache):
            raise FormatError("past: this request started on another graph; start a new request")
        ids, mask, pos = (np.ascontiguousarray(a, dtype=np.int64) for a in (ids, mask, pos))
        b, s = ids.shape
        if g.fused and past and b > 1 and s > 1 and past[0][0].shape[2] > 0:  # GroupQueryAttention: one at a time
            out = []
            for k in range(s):
                e = embed if embed is None or embed.shape[1] == 1 else embed[:, k:k + 1]
                lg, past = self._forward_kinds(ids[:, k:k + 1], _upto(mask, s, k), pos[:, k:k + 1],
                                               past, lora, e, bn, head)
                out.append(lg)
            return np.concatenate(out, axis=1), past
        feeds = {**g.id_feeds(ids), "attention_mask": mask, "position_ids": pos}
        empty = np.zeros((b, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
        for i in range(self.cfg.n_layers):
            k, v = past[i] if past else (empty, empty)
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = k, v
        for name, terms in lora.items():
            a, bb = terms[0], terms[1]
            if a is not None and a.shape[-1]:
                feeds[f"lora.{name}.a"], feeds[f"lora.{name}.b"] = a, bb
            for key, x in zip(("in", "out", "bias"), terms[2:]):
                if x is not None:
                    feeds[f"lora.{name}.{key}"] = np.ascontiguousarray(x[:, None, :], np.float32)
        if embed is not None:
            feeds["embed.delta"] = np.ascontiguousarray(embed, np.float32)
        if bn:
            feeds.update(bn)
        if head is not None and not g.head:
            raise UnsupportedError(f"{file.name} has no head.delta input; export the base again with this edgeadapt")
        outs = g.sess.run(self._head_feeds(g, feeds, head), feeds)
        return _add_head(outs, head, g), [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.cfg.n_layers)]

    def _forward_inplace(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: Any, lora: Any,
                         g: "_Session", last: bool = False) -> tuple[np.ndarray, "KVCache"]:
        b, s = ids.shape
        t = mask.shape[1]
        if past is None:
            past = KVCache(self, b, t, g)
        elif not isinstance(past, KVCache) or past.batch != b or past.length != t - s:
            found = (f"a KVCache of {past.length} tokens for batch {past.batch}" if isinstance(past, KVCache)
                     else type(past).__name__)
            raise FormatError(f"past: expected the KVCache this engine returned, holding {t - s} tokens for batch {b} "
                              f"(attention_mask covers past + new tokens), found {found}; a KVCache is updated in "
                              "place, so pass each one back once")
        if s > 1 and b > 1 and past.length:  # GroupQueryAttention takes several new tokens after a past only at batch 1
            out = [self._forward_inplace(ids[:, k:k + 1], _upto(mask, s, k), pos[:, k:k + 1], past, lora, g)[0]
                   for k in range(s)]
            return (out[-1] if last else np.concatenate(out, axis=1)), past
        return past.run(ids, mask, pos, lora, last), past


def _upto(mask: np.ndarray, s: int, k: int) -> np.ndarray:
    """The mask of new token k of s fed alone: the columns up to it, its own marked real. A left pad after a row's
    real keys (a KV prefix, then a shorter prompt) then has its key written in its own column — GroupQueryAttention
    writes a row's new key after the row's last 1 — where every later step masks it, never over a real key; the
    pad's own output is meaningless either way, every real token's is unchanged."""
    m = mask[:, :mask.shape[1] - s + k + 1].copy()
    m[:, -1] = 1
    return m


def _last(logits: np.ndarray, last: bool) -> np.ndarray:
    """[B, 1, vocab] when only the last position is asked for (a graph without ``logits.from`` made them all)."""
    return np.ascontiguousarray(logits[:, -1:]) if last and logits.shape[1] > 1 else logits


def _add_head(outs: list[np.ndarray], head: Any, g: "_Session") -> np.ndarray:
    """The logits, with a live change of head rows added at its columns: logits[b, s, ids] += head.logits[b, s]
    (ids distinct; the same float32 adds the older graphs' in-graph scatter made)."""
    logits = outs[0]
    if head is not None and g.head_out and len(head[0]):
        logits[:, :, np.asarray(head[0], np.int64)] += outs[-1]
    return logits


def _slotted_graph(manifest: BaseManifest) -> Path:
    """The runtime's live graph: model_live.onnx (slots required, kv cache bound in place), or model_lora.onnx
    (slots with defaults) for base folders exported before model_live.onnx existed."""
    for kind, file in (("onnx_live", "model_live.onnx"), ("onnx_lora", "model_lora.onnx")):
        p = manifest.path(kind)
        if p is not None and p.is_file():
            return p
    raise FormatError(f"{manifest.root} has no model_live.onnx or model_lora.onnx (the graphs with LoRA slots); "
                      "export the base again with this edgeadapt, or use mode='merge'")


def default_threads() -> int | None:
    env = os.environ.get("EDGEADAPT_THREADS")
    return int(env) if env else None
