"""Which engine runs a base (onnxruntime on the folder's ONNX graph, or numpy on its GGUF), and what every
engine declares to the model driver (:class:`Engine`).

The engine classes are found by name in :data:`ENGINE_CLASSES` and imported on first use: the one
import that is a table entry rather than an import statement (so this module imports neither
engine, and each engine imports this module for its interface), and the reason a device without
onnxruntime never loads the onnxruntime engine.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Collection, Iterable

import numpy as np

from edgeadapt.errors import FormatError, UnsupportedError
from edgeadapt.formats.manifest import BaseManifest

ENGINES = ("auto", "ort", "numpy")
WEIGHTS = ("fp32", "int4", "int8")
# engine name -> "module:class", imported when that engine is made (the registry exception to the import rules)
ENGINE_CLASSES: dict[str, str] = {"ort": "edgeadapt.runtime.ort_engine.engine:OrtEngine",
                                  "numpy": "edgeadapt.runtime.numpy_engine.engine:NumpyEngine"}


class Engine:
    """What the model driver (:mod:`edgeadapt.runtime.model`) asks an engine: capabilities declared as
    attributes (a class attribute, or a property where they depend on the base folder and the mode), and
    the verbs below. The defaults declare nothing beyond running the bare base; an engine says what it can.
    A new engine is one class implementing this, and one entry in :data:`ENGINE_CLASSES`."""

    name: ClassVar[str] = "?"
    live: bool = False  # runs adapters beside the frozen weights: forward(lora=...), per row too
    kind_slots: bool = False  # runs scale / bias terms live (DoRA, IA3, lora_bias: LiveTerms in / out / bias)
    bn_slots: bool = False  # runs bottleneck adapters in their block slots (forward(bn=...))
    head_slots: bool = False  # runs a live change of some rows of the output head (forward(head=...))
    row_lora: bool = False  # takes runtime.row_lora.PerRow (each row at its own rank) for mixed batches
    can_merge: bool = False  # folds adapters into its weights (set_weights) without re-quantizing them
    copies_factors: bool = False  # copies live factors into a layout of its own: takes Aᵀ / Bᵀ as strided views
    last_logits: bool = False  # forward(..., last=True) returns the last position's logits only, [B, 1, vocab]
    # takes RIGHT-padded batches: each row's keys at [0, len) of the cache, its key count read from its attention_mask
    # (the index of its last 1), pads after it never read — a row then computes exactly what it computes alone. The
    # scheduler keeps its decode batch so where this holds, and left-padded (rows right-aligned) elsewhere
    pads_right: bool = False

    def ensure_slots(self) -> None:
        """Get ready to run adapters live (a lazy engine builds its slotted graph here); by default nothing."""

    def base_weight(self, name: str) -> np.ndarray:
        """The immutable base tensor ``name``, float32, canonical layout (a fresh array)."""
        raise NotImplementedError

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the base's token embedding [n, dim] float32 for ``ids`` [n]."""
        raise NotImplementedError

    def set_weights(self, overrides: dict[str, np.ndarray]) -> None:
        """Replace these weights (float32, canonical) from the base; ``{}`` restores the base."""
        raise NotImplementedError

    def cache_layers(self, past: Any) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Per layer (keys, values, length) of a cache :meth:`forward` returned; keys / values [B, KV, T, hd]
        with the first ``length`` positions in use. By default the cache is a list of (keys, values)."""
        return [(k, v, k.shape[2]) for k, v in past]

    def cache_from(self, layers: list[tuple[np.ndarray, np.ndarray]], plan: Any = None) -> Any:
        """A cache to pass back as ``past``, holding ``layers`` ((keys, values) [B, KV, T, hd] per layer), for
        forwards that run ``plan`` (the live inputs of a batch); by default the list itself."""
        return layers

    def slot_form(self, lora: dict[str, Any]) -> dict[str, Any]:
        """Live factors ``{weight: (A [n, in, r], B [n, r, out])}`` in the form :meth:`forward` runs them, which
        forward then takes as they are (the scheduler keeps each adapter set's one-row plan in this form and stacks
        rows of it); by default the factors themselves."""
        return lora

    def adopt_cache(self, past: Any, plan: Any, length: int) -> Any:
        """A batch-1 prefill's own cache (its keys at [0, ``length``)) to decode ``plan`` on as it is, where it is
        what :meth:`cache_from` would make of its layers; None: make one with cache_from."""
        return None

    def blank_cache(self, batch: int, tokens: int, plan: Any, rows: int | None = None
                    ) -> tuple[Any, list[tuple[np.ndarray, np.ndarray]]] | None:
        """(a cache of ``batch`` rows and ``tokens`` keys, all zero, to decode ``plan`` on; its per-layer (key, value)
        arrays [≥ batch, n_kv_heads, ≥ tokens, head_dim] to write rows' keys into), where that is what
        :meth:`cache_from` would make: no second copy of every key. ``rows``: room for that many rows, for rows
        that join later (:meth:`reserve_rows`). None: fill arrays for cache_from."""
        return None

    def reserve_rows(self, past: Any, batch: int, length: int, plan: Any) -> bool:
        """Make a cache from :meth:`blank_cache` decode its first ``batch`` rows in place, running ``plan``, under a
        mask ``length`` keys wide: kept rows where they are, new rows' keys written by the caller into
        :meth:`cache_layers` at [0, len), len ≤ length. False: it cannot (make a new cache)."""
        return False

    def slot_form_from(self, parts: Iterable[tuple[str, np.ndarray, np.ndarray]], targets: Collection[str]
                       ) -> dict[str, Any]:
        """:meth:`slot_form` of one set's factors arriving one weight at a time, (weight, A [1, in, r],
        B [1, r, out]): an engine that ``copies_factors`` copies each as it comes. The result only once ``parts``
        ends (a verified stream raises there instead)."""
        return self.slot_form({w: (a, b) for w, a, b in parts})

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any = None,
                **live: Any) -> tuple[np.ndarray, Any]:
        """Logits [batch, seq, vocab] float32 and the cache to pass back as ``past``; ``live``: ``lora``, ``embed``,
        ``bn``, ``head`` as the engine declares it can run them."""
        raise NotImplementedError


def engine_class(name: str) -> type[Engine]:
    """The class of engine ``name``, imported on first use (ImportError when its module cannot load)."""
    module, _, cls = ENGINE_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(manifest: BaseManifest, engine: str, threads: int | None, *, dequantize: str = "auto",
                 live: bool = False, weights: str = "fp32", memory: str = "balanced") -> Engine:
    """"ort": onnxruntime on model.onnx (``weights`` "int4" | "int8": on model_int4.onnx | model_int8.onnx),
    or an error saying why not. "numpy": model.gguf in numpy (``dequantize`` = its "auto" | "load" | "lazy").
    "auto": onnxruntime when it imports and builds a session on that graph, else numpy; the numpy engine
    then says why in ``auto_reason``."""
    if engine not in ENGINES:
        raise UnsupportedError(f"engine {engine!r} is not one of {ENGINES}")
    if weights not in WEIGHTS:
        raise UnsupportedError(f"weights {weights!r} is not one of {WEIGHTS}")
    if weights != "fp32" and engine == "numpy":
        raise UnsupportedError(f"weights={weights!r} picks an ONNX graph for onnxruntime; the numpy engine runs "
                               f"model.gguf as it is ({manifest.gguf_type or 'its own types'}): use engine='ort'")
    why = None
    if engine != "numpy":
        onnx_path = manifest.path("onnx" if weights == "fp32" else f"onnx_{weights}")
        if onnx_path is None or not onnx_path.is_file():
            want = "model.onnx" if weights == "fp32" else f"model_{weights}.onnx"
            if engine == "ort":
                found = f"no {want} in manifest.json" if onnx_path is None else f"{onnx_path.name} is missing"
                fix = ("without --no-onnx" if weights == "fp32" else f"with --onnx-quant {weights}")
                raise FormatError(f"{manifest.root}: engine 'ort' needs {want}, found {found}; export the base "
                                  f"{fix}, or use engine='numpy' (runs model.gguf)")
            why = f"the base folder has no {want}"
        else:
            try:
                # "ort" asked for by name: a lazy engine builds its first session when it first runs; "auto"
                # builds it here, because a failed build is what sends auto to numpy
                return engine_class("ort")(manifest, threads=threads, live=live, weights=weights, defer=engine == "ort",
                                           memory=memory)
            except ImportError as e:  # MissingDependencyError included: the expected case on a device
                if engine == "ort":
                    raise
                why = f"onnxruntime does not import ({e})"
            except Exception as e:  # installed but broken (bad wheel, session build failure): say so
                if engine == "ort":
                    raise
                why = f"onnxruntime failed on {onnx_path.name}: {type(e).__name__}: {e}"
                import warnings
                warnings.warn(f"engine='auto' falls back to numpy: {why}", RuntimeWarning, stacklevel=3)
    gguf_path = manifest.path("gguf")
    if gguf_path is None or not gguf_path.is_file():
        raise FormatError(f"{manifest.root}: engine {engine!r} needs model.gguf (numpy)"
                          + (f" because {why}" if why else "") + ", and the folder has none; export the base again")
    eng = engine_class("numpy")(gguf_path, manifest.arch, dequantize=dequantize, threads=threads)
    eng.auto_reason = why
    return eng
