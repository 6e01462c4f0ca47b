"""The public model object: a frozen base, adapters loaded beside it, one engine underneath.

The driver is generic: adapters say what they change (``targets``, ``delta(target)``), engines
say how to run weights (``base_weight``, ``set_weights``, ``forward``). Merge mode recomputes
every adapted weight from the immutable base in float32 — a swap never subtracts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from edgeadapt.arch import ArchConfig
from edgeadapt.delta import LoraDelta, read_delta
from edgeadapt.errors import AdapterMismatchError, AdapterNotFoundError, EdgeAdaptError, FormatError, UnsupportedError
from edgeadapt.manifest import BaseManifest, read_manifest

from .sampling import Sampler
from .tokenizer import StreamDecoder, Tokenizer

ENGINES = ("auto", "ort", "numpy")
UseSpec = str | Mapping[str, float] | Sequence[str] | None


def _make_engine(manifest: BaseManifest, engine: str, threads: int | None) -> Any:
    if engine not in ENGINES:
        raise UnsupportedError(f"engine {engine!r} is not one of {ENGINES}")
    if engine in ("ort", "auto") and manifest.path("onnx") is not None:
        try:
            from .engine_ort import OrtEngine
            return OrtEngine(manifest, threads=threads)
        except EdgeAdaptError:
            if engine == "ort":
                raise
    gguf_path = manifest.path("gguf")
    if gguf_path is None or not gguf_path.is_file():
        raise FormatError(f"{manifest.root}: engine {engine!r} needs model.gguf (numpy) or model.onnx with "
                          "onnxruntime installed (ort); neither is available")
    from .engine_numpy import NumpyEngine
    return NumpyEngine(gguf_path, manifest.arch)


def load(base: str | os.PathLike, engine: str = "auto", *, threads: int | None = None) -> "Model":
    """Load a base folder made by ``edgeadapt export-base``.

    ``engine``: "ort" (onnxruntime), "numpy" (pure numpy, from model.gguf) or "auto"
    (onnxruntime when it imports and the folder has model.onnx, else numpy); ``m.engine`` says which.
    """
    manifest = read_manifest(base)
    return Model(manifest, _make_engine(manifest, engine, threads))


class Model:
    def __init__(self, manifest: BaseManifest, engine: Any):
        self.manifest, self._engine = manifest, engine
        self.config: ArchConfig = manifest.arch
        self.fingerprint: str = manifest.fingerprint
        self.adapters: dict[str, LoraDelta] = {}
        self.active: dict[str, float] = {}
        self._tokenizer: Tokenizer | None = None
        self.last_swap_seconds = 0.0

    @property
    def engine(self) -> str:
        return self._engine.name

    # ---- adapters
    def add_adapter(self, source: str | os.PathLike | LoraDelta, name: str | None = None) -> str:
        """Read, verify against this base, and keep an adapter (not yet active). Returns its name."""
        delta = source if isinstance(source, LoraDelta) else read_delta(source)
        delta.check_base(self.config, self.fingerprint)
        name = name or delta.name
        if name in self.active:
            raise AdapterMismatchError(f"adapter {name!r} is active; call use() without it before replacing it")
        self.adapters[name] = delta
        return name

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        if name in self.active:
            self.use({k: w for k, w in self.active.items() if k != name} or None)
        del self.adapters[name]

    def use(self, spec: UseSpec) -> None:
        """Activate adapters: a name, a list of names (weight 1 each), ``{name: weight}``, or None for the base."""
        want = self._normalise(spec)
        if want == self.active:
            return
        t0 = time.perf_counter()
        deltas: dict[str, np.ndarray] = {}
        for name, weight in want.items():
            for target in self.adapters[name].targets:
                d = self.adapters[name].delta(target) * np.float32(weight)
                deltas[target] = deltas[target] + d if target in deltas else d
        merged = {t: self._engine.base_weight(t) + d for t, d in deltas.items()}
        self._engine.set_weights(merged)  # atomic: raises and keeps the old weights on failure
        self.active = want
        self.last_swap_seconds = time.perf_counter() - t0

    def _normalise(self, spec: UseSpec) -> dict[str, float]:
        if spec is None:
            return {}
        if isinstance(spec, str):
            spec = {spec: 1.0}
        elif not isinstance(spec, Mapping):
            spec = {s: 1.0 for s in spec}
        missing = [n for n in spec if n not in self.adapters]
        if missing:
            raise AdapterNotFoundError(f"no adapter named {missing}; loaded: {sorted(self.adapters)}")
        bad = [f"{n}={w!r}" for n, w in spec.items() if not isinstance(w, (int, float)) or not np.isfinite(w)]
        if bad:
            raise AdapterMismatchError(f"adapter weights must be finite numbers, found {bad}")
        return {n: float(w) for n, w in spec.items() if w != 0}

    # ---- inference
    def logits(self, ids: Sequence[Sequence[int]] | np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits [batch, seq, vocab] (float32) for a batch of equal-length rows (left-pad + mask otherwise)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise FormatError(f"expected token ids [batch, seq], found shape {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise FormatError(f"token ids must lie in [0, {self.config.vocab_size}); found {ids.min()}…{ids.max()}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
        return self._engine.forward(ids, mask, pos, None)[0]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            path = self.manifest.path("tokenizer")
            if path is None or not path.is_file():
                raise FormatError(f"{self.manifest.root}: this base has no tokenizer; pass token ids instead of text")
            self._tokenizer = Tokenizer(path, chat_template=self.manifest.chat_template,
                                        special=self.manifest.special_tokens)
        return self._tokenizer

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stream: bool = False,
                 chat: bool | None = None, system: str | None = None) -> str | Iterator[str]:
        """Generate text (or continue token ids). ``chat`` (default: when the base has a template) wraps
        the prompt in the model's chat template. ``stream=True`` yields text pieces as they come."""
        sampler = Sampler(temperature, top_k, top_p, seed)
        if isinstance(prompt, str):
            tok = self.tokenizer
            use_chat = bool(tok.chat_template) if chat is None else chat
            if use_chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                prompt_text = tok.render_chat(msgs)
                ids = tok._tok.encode(prompt_text, add_special_tokens=False).ids
            else:
                ids = tok.encode(prompt)
        else:
            ids = list(prompt)
        pieces = self._stream(ids, max_new_tokens, sampler)
        return pieces if stream else "".join(pieces)

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int = 64, sampler: Sampler | None = None) -> list[int]:
        """Token ids in, generated token ids out (stops at EOS, which is not included)."""
        return list(self._tokens(list(ids), max_new_tokens, sampler or Sampler()))

    def _stream(self, ids: list[int], max_new_tokens: int, sampler: Sampler) -> Iterator[str]:
        dec = StreamDecoder(self.tokenizer)
        for t in self._tokens(ids, max_new_tokens, sampler):
            piece = dec.push(t)
            if piece:
                yield piece

    def _tokens(self, ids: list[int], max_new_tokens: int, sampler: Sampler) -> Iterator[int]:
        if not ids:
            raise FormatError("cannot generate from an empty prompt")
        eos = set(self.config.eos_token_ids)
        x = np.asarray([ids], np.int64)
        mask = np.ones_like(x)
        pos = np.arange(len(ids), dtype=np.int64)[None]
        past = None
        for _ in range(max_new_tokens):
            logits, past = self._engine.forward(x, mask, pos, past)
            t = int(sampler(logits[:, -1])[0])
            if t in eos:
                return
            yield t
            x = np.asarray([[t]], np.int64)
            pos = pos[:, -1:] + 1
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
