"""Which engine runs a base: onnxruntime on the folder's ONNX graph, or numpy on its GGUF."""

from __future__ import annotations

from typing import Any

from edgeadapt.errors import FormatError, UnsupportedError
from edgeadapt.formats.manifest import BaseManifest

ENGINES = ("auto", "ort", "numpy")
WEIGHTS = ("fp32", "int4", "int8")


def make_engine(manifest: BaseManifest, engine: str, threads: int | None, *, dequantize: str = "auto",
                 live: bool = False, weights: str = "fp32") -> Any:
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
                from edgeadapt.runtime.engine_ort import OrtEngine
                # "ort" asked for by name: a lazy engine builds its first session when it first runs; "auto"
                # builds it here, because a failed build is what sends auto to numpy
                return OrtEngine(manifest, threads=threads, live=live, weights=weights, defer=engine == "ort")
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
    from edgeadapt.runtime.numpy_engine.engine import NumpyEngine
    eng = NumpyEngine(gguf_path, manifest.arch, dequantize=dequantize, threads=threads)
    eng.auto_reason = why
    return eng
