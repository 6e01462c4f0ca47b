"""An ``.onnx_adapter`` from another tool -> our canonical LoRA factors.

onnxruntime's adapter file is a bag of named arrays that become graph inputs; the names are the
graph's, so a file is only meaningful for the graph it was made for. Two naming schemes are read:

- our slotted graph (``model_lora.onnx``): ``lora.<gguf weight>.a`` [1, in, r] / ``.b`` [1, r, out]
  (or without the leading 1), scale folded into b, rows of q/k in the base's (llama.cpp's) order —
  a file of ours whose ``model_version`` does not carry this base's fingerprint bits, or another
  tool's made for our graph;
- onnxruntime-genai's model builder and Olive: ``model.layers.<i>.attn.<m>.lora_A.MatMul.weight`` (the
  builder's initializers of a LoRA model, ``/model/layers.<i>/attn/q_proj/lora_A/MatMul``), and
  ``model.layers.<i>.self_attn.<m>.lora_A.weight`` (Olive ``convert-adapters`` / ``ExtractAdapters``):
  A [in, r] and B [r, out] (PEFT's factors transposed for MatMul), the scale alpha/r folded into B,
  rows in Hugging Face order (q/k permuted here for a "norm"-rope base), float32 or float16.

Olive's int4 adapters (``.quant.weight`` / ``.quant.scale``, ``--quantize_int4``) and DoRA / LoHa
parameters are refused by name. ``model_version`` is recorded (it matches this base's fingerprint pin
only for a file of ours).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgeadapt.errors import AdapterMismatchError, FormatError, MissingDependencyError, collect
from edgeadapt.formats.arch import ArchConfig, permute_qk, qk_heads

from edgeadapt.converters.importers.common import Imported, finite_problems, module_target, target_problems

_OURS = re.compile(r"lora\.(.+)\.(a|b)")
_BUILDER = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_(A|B)(\.MatMul)?\.weight")
_QUANT = re.compile(r".+\.lora_[AB]\.quant\.(weight|scale|zero_point)")
_OTHER_KINDS = ("dora_A", "dora_B", "dora_M", "lora_magnitude_vector", "hada_w")


def is_onnx_adapter(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return path.suffix == ".onnx_adapter" or head[4:8] == b"TORT"


def _hf_module(name: str) -> str:
    """The builder's ``model.layers.0.attn.q_proj`` -> Hugging Face's ``model.layers.0.self_attn.q_proj``."""
    return re.sub(r"(model\.layers\.\d+)\.attn\.", r"\1.self_attn.", name)


def read_onnx_adapter_file(path: str | Path, cfg: ArchConfig, pin: int | None = None) -> Imported:
    """Read and check an ``.onnx_adapter`` against the base card ``cfg`` (``pin``: this base's fingerprint
    pin, recorded when the file's ``model_version`` carries it)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("importing .onnx_adapter files needs onnxruntime (pip install onnxruntime)") from e
    path = Path(path)
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
        version = int(fmt.get_model_version())
    except Exception as e:  # onnxruntime raises its own types for a damaged flatbuffer
        raise FormatError(f"{path}: not a readable .onnx_adapter file: {str(e).strip()}") from None
    problems: list[str] = []
    pairs: dict[str, dict[str, np.ndarray]] = {}
    hf_order: set[str] = set()
    schemes: set[str] = set()
    for k, v in sorted(params.items()):
        if _QUANT.fullmatch(k):
            problems.append(f"{k}: an int4-quantized factor (Olive --quantize_int4); export the adapter in float32 "
                            "or float16 to import it")
            continue
        if any(s in k for s in _OTHER_KINDS):
            problems.append(f"{k}: a DoRA / LoHa parameter; this importer reads LoRA factors only")
            continue
        if v.dtype not in (np.float32, np.float16):
            problems.append(f"{k}: expected float32 or float16, found {v.dtype}")
            continue
        m = _OURS.fullmatch(k)
        if m:
            target, role = m.group(1), m.group(2)
            schemes.add("edgeadapt slotted graph")
            if v.ndim == 3 and v.shape[0] == 1:
                v = v[0]
        elif (m := _BUILDER.fullmatch(k)):
            module = _hf_module(m.group(1))
            target = module_target(cfg, module, problems)
            role = m.group(2).lower()
            schemes.add("onnxruntime-genai builder" if m.group(3) else "Olive")
            if target is None:
                continue
            hf_order.add(target)
        else:
            problems.append(f"{k}: not a LoRA parameter name of our graph (lora.<weight>.a|b) or of onnxruntime-genai "
                            "/ Olive (model.layers.<i>.<module>.lora_A|B[.MatMul].weight)")
            continue
        if v.ndim != 2:
            problems.append(f"{k}: expected a 2-D factor, found shape {list(v.shape)}")
            continue
        if role in pairs.get(target, {}):
            problems.append(f"{k}: a second {role} factor for {target}")
            continue
        pairs.setdefault(target, {})[role] = v.astype(np.float32)
    imp = Imported(fmt=" / ".join(sorted(schemes)) + " .onnx_adapter" if schemes else ".onnx_adapter")
    for w in sorted(pairs):
        ab = pairs[w]
        if set(ab) != {"a", "b"}:
            problems.append(f"{w}: has factor {''.join(ab)} without its pair")
            continue
        a, b = ab["a"].T, ab["b"].T  # MatMul layout: a [in, r], b [r, out] -> A [r, in], B [out, r]
        bad = target_problems(cfg, w, a.shape, b.shape) or finite_problems(w, a, b)
        if bad:
            problems += bad
            continue
        heads = qk_heads(cfg, w) if w in hf_order else None
        imp.factors[w] = (np.ascontiguousarray(a), np.ascontiguousarray(permute_qk(b, heads) if heads else b))
    if not params:
        problems.append("no parameters")
    if len(schemes) > 1:
        problems.append(f"names of two schemes in one file ({', '.join(sorted(schemes))})")
    collect(list(dict.fromkeys(problems)), AdapterMismatchError, f"{path}: this .onnx_adapter does not fit the base:")
    pinned = pin is not None and version == pin
    imp.notes.append(f"model_version {version}" + (" = this base's fingerprint pin" if pinned
                                                   else ", not this base's fingerprint pin"))
    return imp
