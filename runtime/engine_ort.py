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
see ``edgeadapt.converters.onnx_fast``). Adapters run live only, in float32 beside the quantized
weights: merging would mean re-quantizing, which loses most of a small delta.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import (AdapterMismatchError, EdgeAdaptError, FormatError, MissingDependencyError,
                              UnsupportedError, collect)
from edgeadapt.manifest import BaseManifest

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


class OrtEngine:
    """``live=False``: the plain graph, adapters merged into its weights (a swap builds a session).
    ``live=True``: the slotted graph ``model_lora.onnx``; adapters are run inputs (``lora=`` of
    :meth:`forward`), a swap binds other arrays, and empty slots run the bare base."""

    name = "ort"

    def __init__(self, manifest: BaseManifest, *, threads: int | None = None, live: bool = False,
                 weights: str = "fp32"):
        self._ort = import_ort()
        if weights not in WEIGHTS:
            raise UnsupportedError(f"weights {weights!r} is not one of {tuple(WEIGHTS)}")
        self.weights = weights
        if weights != "fp32":  # the quantized graph carries its own LoRA slots: live only
            path = manifest.path(WEIGHTS[weights])
            if path is None or not path.is_file():
                raise FormatError(f"{manifest.root} has no {weights} ONNX graph (model_{weights}.onnx); export the "
                                  f"base with `edgeadapt export-base … --onnx-quant {weights}`, or use weights='fp32'")
            live = True
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
        lora_path = manifest.path("onnx_lora") or path.parent / "model_lora.onnx"
        self.live = live
        if live and weights == "fp32":
            if not lora_path.is_file():
                raise FormatError(f"{manifest.root} has no model_lora.onnx (the graph with LoRA slots); "
                                  "export the base again with this edgeadapt, or use mode='merge'")
            self._path = lora_path
        self._session, self._keep = self._build({}), ()
        self._out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.cfg.n_layers) for kv in ("key", "value")]
        meta = self._session.get_modelmeta().custom_metadata_map
        self._one_step_past = meta.get("edgeadapt.attention") == "GroupQueryAttention"  # see forward
        self._probe: np.ndarray | None = None  # made at the first set_weights: a cold start does not pay for it
        self._mm: dict[str, np.memmap] = {}

    # ---- sessions
    def _options(self) -> Any:
        so = self._ort.SessionOptions()
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._threads:
            so.intra_op_num_threads = self._threads
        so.log_severity_level = 3
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
        return sess

    def _probe_logits(self, sess: Any) -> np.ndarray:
        """Logits of a fixed two-token input: a fingerprint of the weights a session really uses."""
        feeds = {"input_ids": np.array([[1, 2]], np.int64) % self.cfg.vocab_size,
                 "attention_mask": np.ones((1, 2), np.int64), "position_ids": np.array([[0, 1]], np.int64)}
        for i in range(self.cfg.n_layers):
            for kv in ("key", "value"):
                feeds[f"past.{i}.{kv}"] = np.zeros((1, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
        return sess.run(["logits"], feeds)[0]

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

    def set_weights(self, overrides: dict[str, np.ndarray]) -> None:
        """Replace these linear weights (float32 [out, in]) from the base; ``{}`` restores the base."""
        if self.weights != "fp32":
            raise UnsupportedError(f"cannot merge into {self.weights} weights (it would re-quantize them and lose most "
                                   "of a small delta); run adapters live (mode='live' or 'auto'), or load "
                                   "weights='fp32' to merge")
        if self._probe is None:
            self._probe = self._probe_logits(self._session)
        problems = []
        for n, w in overrides.items():
            shape = self.cfg.linear_shapes().get(n)
            if shape is None or n not in self._table:
                problems.append(f"{n}: not an adaptable weight of this base")
            elif tuple(w.shape) != shape or w.dtype != np.float32:
                problems.append(f"{n}: expected float32 {list(shape)}, found {w.dtype} {list(w.shape)}")
            elif not np.isfinite(w).all():
                problems.append(f"{n}: holds NaN or Inf")
        collect(problems, AdapterMismatchError, "cannot apply these weights:")
        sess = self._build(overrides)
        keep = self._pending_keep
        probe = self._probe_logits(sess)
        if overrides:
            self._verify_sums(overrides)
        changed = self._changed(overrides)
        if changed and np.array_equal(probe, self._probe):
            raise OverrideNotAppliedError(
                f"onnxruntime built a session whose output did not change although {len(changed)} weights did "
                f"(e.g. {changed[0]}); the model was left as it was")
        self._session, self._keep, self._probe = sess, keep, probe

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
        got = self._build(overrides, self._sums_path).run(["weight_sums"], {})[0].astype(np.float64)
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
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: PastKV | None = None, lora: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
                ) -> tuple[np.ndarray, PastKV]:
        """``lora`` (live engines only): {weight: (A [n, in, r], B [n, r, out])}, n = 1 or batch, scale in B."""
        b = input_ids.shape[0]
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "attention_mask": attention_mask.astype(np.int64, copy=False),
                 "position_ids": position_ids.astype(np.int64, copy=False)}
        empty = np.zeros((b, self.cfg.n_kv_heads, 0, self.cfg.head_dim), np.float32)
        for i in range(self.cfg.n_layers):
            k, v = past[i] if past else (empty, empty)
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = k, v
        if lora:
            if not self.live:
                raise AdapterMismatchError("live LoRA factors need the slotted graph: load with mode='live' or 'auto'")
            for name, (a, bb) in lora.items():
                feeds[f"lora.{name}.a"], feeds[f"lora.{name}.b"] = a, bb
        s = input_ids.shape[1]
        if self._one_step_past and past and b > 1 and s > 1 and past[0][0].shape[2] > 0:
            # GroupQueryAttention takes several new tokens after a past only for batch 1: one at a time
            logits = []
            for t in range(s):
                lg, past = self.forward(input_ids[:, t:t + 1], attention_mask[:, :attention_mask.shape[1] - s + t + 1],
                                        position_ids[:, t:t + 1], past, lora)
                logits.append(lg)
            return np.concatenate(logits, axis=1), past
        outs = self._session.run(self._out_names, feeds)
        return outs[0], [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.cfg.n_layers)]


def default_threads() -> int | None:
    env = os.environ.get("EDGEADAPT_THREADS")
    return int(env) if env else None
