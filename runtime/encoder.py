"""Encoder bases (BERT family): embeddings and sequence classification, adapters live in slots.

``edgeadapt.load(base)`` returns an :class:`EncoderModel` when the manifest's card says
``family: "encoder"``. Two engines compute the same thing: "ort" runs ``model.onnx`` (slots as
optional inputs, :mod:`edgeadapt.converters.onnx_graphs.encoder`), "numpy" runs ``model.gguf`` with numpy.
Every adapter kind runs live — LoRA factors, IA3 output scales and bottleneck adapters
(:mod:`edgeadapt.kinds.slots`) — so ``use()`` only binds arrays and each row of a batch may have
its own adapter. Imports: numpy, gguf, tokenizers (text), onnxruntime (lazily, engine "ort").
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from edgeadapt.kinds.slots import (NORMS, POSITIONS, bn_feeds, bn_name, bottleneck, defaults, gelu, gelu_tanh,
                                     ia3_name, layer_norm, lora_names)
from edgeadapt.errors import (AdapterMismatchError, AdapterNotFoundError, FormatError, MissingDependencyError,
                              UnsupportedError, UsageError, collect)
from edgeadapt.formats.manifest import BaseManifest

from edgeadapt.runtime import args
from edgeadapt.runtime.args import UseSpec, normalise_spec

Feeds = dict[str, np.ndarray]


# ---- engines: forward(ids, mask, types, feeds) -> (hidden [B,S,d], logits [B,n_labels] | None)
class NumpyEncoder:
    name = "numpy"

    def __init__(self, manifest: BaseManifest):
        import gguf

        from edgeadapt.formats.gguf_file import open_gguf

        path = manifest.path("gguf")
        if path is None or not path.is_file():
            raise FormatError(f"{manifest.root}: engine 'numpy' needs model.gguf, the folder has none")
        cfg = self.cfg = manifest.arch
        reader = open_gguf(path)
        w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            w[t.name] = np.ascontiguousarray(gguf.quants.dequantize(reader.view(t), t.ttype).reshape(t.shape), np.float32)
        expected = cfg.tensor_shapes()
        problems = [f"{n}: expected {list(s)}, found {list(w[n].shape) if n in w else 'nothing'}"
                    for n, s in expected.items() if n not in w or w[n].shape != s]
        collect(problems, FormatError, f"{path}: not the encoder its manifest describes:")
        linear = cfg.linear_shapes()
        self.w = {n: (np.ascontiguousarray(a.T) if n in linear else a) for n, a in w.items()}  # linear: [in, out]

    def _linear(self, x: np.ndarray, w: str, feeds: Feeds) -> np.ndarray:
        y = x @ self.w[w] + self.w[w[: -len("weight")] + "bias"]
        a, b = lora_names(w)
        if a in feeds:
            y = y + (x @ feeds[a]) @ feeds[b]
        s = feeds.get(ia3_name(w))
        return y if s is None else y * s

    def forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, feeds: Feeds) -> tuple[np.ndarray, Any]:
        cfg, W = self.cfg, self.w
        B, S = ids.shape
        H, hd, eps = cfg.n_heads, cfg.head_dim, cfg.ln_eps
        x = W["token_embd.weight"][ids] + W["position_embd.weight"][:S][None] + W["token_types.weight"][types]
        x = layer_norm(x, W["token_embd_norm.weight"], W["token_embd_norm.bias"], eps)
        bias = np.where(mask[:, None, None, :] != 0, np.float32(0), np.finfo(np.float32).min).astype(np.float32)
        act = {"gelu": gelu, "relu": lambda z: np.maximum(z, 0)}.get(cfg.act, gelu_tanh)
        dflt = None
        for i in range(cfg.n_layers):
            q, k, v = (self._linear(x, f"blk.{i}.{n}.weight", feeds).reshape(B, S, H, hd).transpose(0, 2, 1, 3)
                       for n in ("attn_q", "attn_k", "attn_v"))
            sc = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1 / np.sqrt(hd)) + bias
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            ctx = ((sc / sc.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, S, cfg.dim)
            for p in POSITIONS:
                if p == "attn":
                    h = self._linear(ctx, f"blk.{i}.attn_output.weight", feeds)
                else:
                    h = self._linear(act(self._linear(x, f"blk.{i}.ffn_up.weight", feeds)),
                                     f"blk.{i}.ffn_down.weight", feeds)
                norm = f"blk.{i}.{NORMS[p]}"
                if bn_name(i, p, "ctrl") in feeds:
                    dflt = dflt or defaults(cfg)
                    parts = {part.split(".", 3)[3]: feeds.get(part, dflt[part]) for part in dflt
                             if part.startswith(bn_name(i, p, ""))}
                    x = bottleneck(h, x, W[f"{norm}.weight"], W[f"{norm}.bias"], eps, parts)
                else:
                    x = layer_norm(h + x, W[f"{norm}.weight"], W[f"{norm}.bias"], eps)
        logits = None
        if cfg.n_labels:
            pooled = np.tanh(x[:, 0] @ W["cls.weight"].T + W["cls.bias"])
            logits = pooled @ W["cls.output.weight"].T + W["cls.output.bias"]
        return x.astype(np.float32), logits


class OrtEncoder:
    name = "ort"

    def __init__(self, manifest: BaseManifest, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise MissingDependencyError("engine 'ort' needs onnxruntime: pip install onnxruntime") from e
        path = manifest.path("onnx")
        if path is None or not path.is_file():
            raise FormatError(f"{manifest.root}: engine 'ort' needs model.onnx; export the base without --no-onnx "
                              "or use engine='numpy'")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3  # slot defaults are initializers that are also inputs: by design
        # onnxruntime's FastGeluFusion rewires the tanh-GELU of the bottleneck slot into an invalid graph
        # ("Node input … is not a graph input") — seen with onnxruntime 1.31; every other fusion runs
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                         disabled_optimizers=["FastGeluFusion"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, feeds: Feeds) -> tuple[np.ndarray, Any]:
        res = self.sess.run(self.outputs, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, **feeds})
        return res[0], (res[1] if len(res) > 1 else None)


# ---- the model
def check_adapter(cfg: Any, fingerprint: str, a: Any) -> None:
    """Refuse, naming every mismatch, an adapter object that does not fit this encoder base."""
    problems = []
    if a.fingerprint != fingerprint:
        problems.append(f"base fingerprint: the adapter was made for {a.fingerprint}, "
                        f"this base is {fingerprint}")
    if a.arch != cfg.arch:
        problems.append(f"architecture: expected {cfg.arch!r}, found {a.arch!r}")
    kind = a.kind
    shapes = cfg.linear_shapes()
    if kind == "bottleneck":
        collect(problems, AdapterMismatchError, f"adapter {a.name!r} does not fit this base:")
        a.check_base(cfg, fingerprint)
        return
    if kind == "lora":
        for t, (fa, fb) in a.factors.items():
            if t not in shapes or (fb.shape[0], fa.shape[1]) != shapes[t]:
                problems.append(f"{t}: expected a change of shape {list(shapes.get(t, ()))}, found "
                                f"lora_a {list(fa.shape)} and lora_b {list(fb.shape)}")
        if a.biases:
            problems.append("LoRA bias terms are not supported on encoder bases yet")
    elif kind == "ia3":
        for t, p in a.params.items():
            if "ia3_out" not in p or t not in shapes or p["ia3_out"].shape != (shapes[t][0],):
                problems.append(f"{t}: expected an output scaling ia3_out [{shapes.get(t, ('?',))[0]}], found "
                                f"{ {k: list(v.shape) for k, v in p.items()} }")
    else:
        problems.append(f"adapter kind {kind!r} does not run on encoder bases; supported: lora, ia3, bottleneck")
    collect(problems, AdapterMismatchError, f"{kind} adapter {a.name!r} does not fit this base:")


class EncoderModel:
    """An encoder base with adapters beside it. ``embed`` / ``classify`` / ``hidden_states`` take texts
    or token ids and, per call, ``adapters=[...]`` (one entry per row: a name, ``{name: weight}`` or None);
    otherwise the set chosen with :meth:`use` applies."""

    mode = "live"

    def __init__(self, manifest: BaseManifest, engine: Any):
        self.manifest, self._engine = manifest, engine
        self.config = manifest.arch
        self.fingerprint = manifest.fingerprint
        self.adapters: dict[str, Any] = {}
        self.active: dict[str, float] = {}
        self._feeds: Feeds = {}
        self._lock = threading.Lock()
        self._tok = None
        self.trust: Any = None
        self.require_signature = False
        self.store: Any = None

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    # ---- adapters
    def add_adapter(self, source: Any, name: str | None = None) -> str:
        """Verify (base fingerprint, architecture, shapes) and keep an adapter object (from
        :func:`edgeadapt.converters.adapterhub.convert_adapterhub`, a LoRA delta file or any kind
        object), not yet active. Returns its name."""
        args.adapter_source(source)
        args.adapter_name(name)
        if isinstance(source, (str, os.PathLike)):
            from edgeadapt.formats.delta import read_delta
            source = read_delta(source)
        if self.trust is not None or self.require_signature:
            from edgeadapt.ship.signing import check_trust
            check_trust(source, self.trust, self.require_signature)  # the signature covers the file's bytes
        self._check(source)
        name = name or source.name
        with self._lock:
            if name in self.active:
                raise AdapterMismatchError(f"adapter {name!r} is active; call use() without it before replacing it")
            self.adapters[name] = source
        return name

    def _check(self, a: Any) -> None:
        check_adapter(self.config, self.fingerprint, a)

    def remove_adapter(self, name: str) -> None:
        args.adapter_name(name, optional=False)
        if name not in self.adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        with self._lock:
            if name in self.active:
                self.active = {k: w for k, w in self.active.items() if k != name}
                self._feeds = self._build([self.active]) if self.active else {}
            del self.adapters[name]

    def use(self, spec: UseSpec) -> None:
        """Activate adapters: a name, a list of names (weight 1 each), ``{name: weight}``, or None."""
        want = self._normalise(spec)
        feeds = self._build([want]) if want else {}  # built before anything changes
        with self._lock:
            self.active, self._feeds = want, feeds

    def _normalise(self, spec: UseSpec) -> dict[str, float]:
        return normalise_spec(spec, self.adapters)

    def _build(self, rows: Sequence[Mapping[str, float]]) -> Feeds:
        """Slot inputs for one set per row (one entry = every row alike): LoRA ranks concatenated and
        zero-padded, IA3 scales as 1 + Σ wᵢ(lᵢ − 1), one bottleneck adapter per block position."""
        cfg, n = self.config, len(rows)
        shapes = cfg.linear_shapes()
        lora: dict[str, list[list[tuple[np.ndarray, np.ndarray]]]] = {}
        ia3: dict[str, np.ndarray] = {}
        bns: dict[tuple[int, str], list[dict[str, np.ndarray] | None]] = {}
        for r, want in enumerate(rows):
            for name, w in want.items():
                a = self.adapters[name]
                if a.kind == "lora":
                    for t, (fa, fb) in a.factors.items():
                        lora.setdefault(t, [[] for _ in rows])[r].append((fa.T, fb.T * np.float32(w)))
                elif a.kind == "ia3":
                    for t, p in a.params.items():
                        s = ia3.setdefault(t, np.ones((n, 1, shapes[t][0]), np.float32))
                        s[r, 0] += np.float32(w) * (p["ia3_out"] - 1)
                else:
                    for i, pos in a.positions():
                        slot = bns.setdefault((i, pos), [None] * n)
                        if slot[r] is not None:
                            raise UnsupportedError(f"two bottleneck adapters at blk.{i}.{pos} in one row "
                                                   f"({sorted(want)}): stacking bottleneck adapters is not supported")
                        slot[r] = a.slot(i, pos, w)
        feeds: Feeds = {}
        for t, per_row in lora.items():
            n_out, n_in = shapes[t]
            ranks = [sum(x[0].shape[1] for x in row) for row in per_row]
            A = np.zeros((n, n_in, max(ranks)), np.float32)
            B = np.zeros((n, max(ranks), n_out), np.float32)
            for r, row in enumerate(per_row):
                if row:
                    A[r, :, : ranks[r]] = np.concatenate([x[0] for x in row], axis=1)
                    B[r, : ranks[r]] = np.concatenate([x[1] for x in row], axis=0)
            feeds[lora_names(t)[0]], feeds[lora_names(t)[1]] = A, B
        for t, s in ia3.items():
            feeds[ia3_name(t)] = s
        feeds.update(bn_feeds(cfg.dim, bns))
        return feeds

    # ---- inference
    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            path = self.manifest.path("tokenizer")
            if path is None or not path.is_file():
                raise FormatError(f"{self.manifest.root}: this base has no tokenizer; pass token ids instead of text")
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise MissingDependencyError("text needs the 'tokenizers' package: pip install tokenizers") from e
            tok = Tokenizer.from_file(str(path))
            tok.no_padding()
            tok.enable_truncation(min(self.config.max_seq_length, self.config.context_length))
            self._tok = tok
        return self._tok

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Texts -> (ids, attention_mask, token_type_ids), right-padded with the pad id."""
        encs = self.tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encs)
        pad = self.config.pad_token_id or 0
        ids = np.full((len(encs), width), pad, np.int64)
        mask = np.zeros((len(encs), width), np.int64)
        types = np.zeros((len(encs), width), np.int64)
        for r, e in enumerate(encs):
            ids[r, : len(e.ids)], mask[r, : len(e.ids)], types[r, : len(e.ids)] = e.ids, 1, e.type_ids
        return ids, mask, types

    def _inputs(self, x: Any, attention_mask: Any, token_type_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if isinstance(x, str):
            x = [x]
        if isinstance(x, (list, tuple)) and x and all(isinstance(s, str) for s in x):
            return self.encode(x)
        ids = args.token_rows(x, self.config.vocab_size)
        if ids.shape[1] > self.config.context_length:
            raise FormatError(f"{ids.shape[1]} tokens is over the base's {self.config.context_length} positions")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        if mask.shape != ids.shape or types.shape != ids.shape:
            raise FormatError(f"attention_mask and token_type_ids must have the shape of ids {list(ids.shape)}, "
                              f"found {list(mask.shape)} and {list(types.shape)}")
        return ids, mask, types

    def _run(self, x: Any, attention_mask: Any, token_type_ids: Any, adapters: Sequence[UseSpec] | None):
        ids, mask, types = self._inputs(x, attention_mask, token_type_ids)
        if adapters is None:
            feeds = self._feeds
        else:
            if isinstance(adapters, (str, Mapping)) or not isinstance(adapters, Sequence):
                raise UsageError(f"adapters=: expected a list with one entry per row, found {adapters!r}")
            if len(adapters) != ids.shape[0]:
                raise FormatError(f"adapters= names one entry per row: expected {ids.shape[0]}, found {len(adapters)}")
            feeds = self._build([self._normalise(a) for a in adapters])
        hidden, logits = self._engine.forward(ids, mask, types, feeds)
        return hidden, logits, mask

    def hidden_states(self, x: Any, attention_mask: Any = None, token_type_ids: Any = None, *,
                      adapters: Sequence[UseSpec] | None = None) -> np.ndarray:
        """The last layer's token states, float32 [batch, seq, dim]."""
        return self._run(x, attention_mask, token_type_ids, adapters)[0]

    def embed(self, x: Any, attention_mask: Any = None, token_type_ids: Any = None, *,
              adapters: Sequence[UseSpec] | None = None) -> np.ndarray:
        """Sentence embeddings [batch, dim]: the card's pooling (masked mean, or the first token) and,
        when the card says so, L2-normalised — as sentence-transformers computes them."""
        hidden, _, mask = self._run(x, attention_mask, token_type_ids, adapters)
        if self.config.pooling == "cls":
            e = hidden[:, 0]
        else:
            m = mask[..., None].astype(np.float32)
            e = (hidden * m).sum(1) / np.maximum(m.sum(1), np.float32(1e-9))
        if self.config.normalize:
            e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), np.float32(1e-12))
        return e.astype(np.float32)

    def classify(self, x: Any, attention_mask: Any = None, token_type_ids: Any = None, *,
                 adapters: Sequence[UseSpec] | None = None) -> np.ndarray:
        """Classifier logits [batch, n_labels] (``labels`` names the columns)."""
        if not self.config.n_labels:
            raise UnsupportedError(f"{self.manifest.root}: this encoder has no classification head (exported from a "
                                   "plain encoder); export a *ForSequenceClassification folder to classify")
        return self._run(x, attention_mask, token_type_ids, adapters)[1]


def load_encoder(manifest: BaseManifest, engine: str = "auto", *, threads: int | None = None) -> EncoderModel:
    if engine not in ("auto", "ort", "numpy"):
        raise UnsupportedError(f"engine {engine!r} is not one of ('auto', 'ort', 'numpy')")
    if engine != "numpy":
        try:
            return EncoderModel(manifest, OrtEncoder(manifest, threads))
        except (ImportError, FormatError):
            if engine == "ort":
                raise
    return EncoderModel(manifest, NumpyEncoder(manifest))
