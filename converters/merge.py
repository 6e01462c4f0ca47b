"""merge: a base folder + weighted adapters -> a new base folder with the adapters folded in.

W' = W + Σ wᵢ·Bᵢ@Aᵢ in float32 from the base's float32 weights (``model.onnx.data`` when present,
checked against the base fingerprint; else ``model.gguf`` dequantized), then written back at the
base's precision: each changed GGUF tensor is re-quantized to its own type in the base's
``model.gguf`` (types gguf cannot quantize fall back to Q8_0, or F16 when rows are not a multiple
of 32), unchanged tensors are copied byte for byte. The merged folder gets its own fingerprint
and records what it was merged from (``merged_from`` in the manifest, ``edgeadapt.merged_from``
in model.gguf).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import gguf
import numpy as np

from edgeadapt.formats.delta import LoraDelta, read_delta
from edgeadapt.errors import FormatError, IntegrityError
from edgeadapt.formats.fingerprint import fingerprint as weights_fingerprint
from edgeadapt.formats.manifest import BaseManifest, read_manifest

Progress = Callable[[str, int, int], None]
_T = gguf.GGMLQuantizationType
QUANTIZABLE = {_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1}
KEY_FINGERPRINT = "edgeadapt.base.fingerprint"
KEY_MERGED_FROM = "edgeadapt.merged_from"


# ---- the base's float32 weights
@dataclass
class BaseWeights:
    weights: dict[str, np.ndarray]  # canonical float32
    source: str  # where they were read from
    verified: bool  # True when their fingerprint was recomputed and matched the manifest


def base_weights(manifest: BaseManifest, *, verify: bool = True) -> BaseWeights:
    """Read a base folder's float32 weights; with ``verify``, recompute the fingerprint (tamper check)."""
    onnx_ok = manifest.tensors and all("onnx" in e for e in manifest.tensors.values())
    if onnx_ok:
        weights, source, exact = _from_onnx_data(manifest), "model.onnx.data (float32)", True
    else:
        weights, source, exact = _from_gguf(manifest)
    verified = False
    if verify and exact:
        got = weights_fingerprint(weights)
        if got != manifest.fingerprint:
            raise IntegrityError(f"{manifest.root}: the base weights ({source}) hash to {got}, but the manifest says "
                                 f"{manifest.fingerprint}; the base folder was changed or damaged — export it again")
        verified = True
    return BaseWeights(weights, source, verified)


def _from_onnx_data(manifest: BaseManifest) -> dict[str, np.ndarray]:
    out = {}
    for name, e in manifest.tensors.items():
        o = e["onnx"]
        raw = np.fromfile(manifest.root / o["file"], dtype=np.dtype(o["dtype"]).newbyteorder("<"),
                          count=o["length"] // np.dtype(o["dtype"]).itemsize, offset=o["offset"]).reshape(o["shape"])
        out[name] = np.ascontiguousarray(raw.T if o["layout"] == "in_out" else raw, dtype=np.float32)
    return out


def _from_gguf(manifest: BaseManifest) -> tuple[dict[str, np.ndarray], str, bool]:
    path = manifest.path("gguf")
    if path is None or not path.is_file():
        raise FormatError(f"{manifest.root}: has neither model.onnx.data nor model.gguf to read the base weights from")
    reader = gguf.GGUFReader(str(path))
    out, types = {}, set()
    for t in reader.tensors:
        if t.name.startswith("rope_"):
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape), np.float32)
        types.add(t.tensor_type.name)
    exact = types <= {"F32"}
    return out, f"model.gguf ({'/'.join(sorted(types))}{'' if exact else ', dequantized'})", exact


# ---- merge
def merged_weights(weights: dict[str, np.ndarray], adapters: Sequence[tuple[LoraDelta, float]]) -> dict[str, np.ndarray]:
    """W + Σ w·ΔW in float32, summed in the runtime's order (bit-identical to ``Model.use``)."""
    deltas: dict[str, np.ndarray] = {}
    for delta, w in adapters:
        for target in delta.targets:
            d = delta.delta(target) * np.float32(w)
            deltas[target] = deltas[target] + d if target in deltas else d
    out = dict(weights)
    for t, d in deltas.items():
        out[t] = weights[t] + d
    return out


def _write_gguf(base_gguf: Path, merged: dict[str, np.ndarray], changed: set[str], out: Path, fp: str,
                merged_from: dict[str, Any], progress: Progress | None) -> dict[str, str]:
    """model.gguf of the merged base: the base's metadata and tensor types; returns {tensor: type} requantized."""
    reader = gguf.GGUFReader(str(base_gguf))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT,
                                               KEY_FINGERPRINT, KEY_MERGED_FROM):
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    writer.add_string(KEY_FINGERPRINT, fp)
    writer.add_string(KEY_MERGED_FROM, json.dumps(merged_from, sort_keys=True))
    requant = {}
    for i, t in enumerate(reader.tensors):
        if t.name not in changed:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            writer.add_tensor(t.name, t.data, raw_shape=shape if t.tensor_type in (_T.F32, _T.F16) else t.data.shape,
                              raw_dtype=t.tensor_type)
            continue
        a = merged[t.name]
        qt = t.tensor_type
        if qt not in QUANTIZABLE:
            qt = _T.Q8_0 if a.shape[-1] % 32 == 0 else _T.F16
        requant[t.name] = qt.name
        if qt == _T.F32:
            writer.add_tensor(t.name, np.ascontiguousarray(a, np.float32))
        elif qt == _T.F16:
            writer.add_tensor(t.name, a.astype(np.float16))
        else:
            writer.add_tensor(t.name, gguf.quants.quantize(np.ascontiguousarray(a, np.float32), qt), raw_dtype=qt)
        if progress:
            progress("re-quantize", i + 1, len(reader.tensors))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return requant


def merge_adapters(base: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike | LoraDelta, float]],
                   out: str | os.PathLike, *, onnx: bool = True, progress: Progress | None = None) -> BaseManifest:
    """Write ``out``: the base folder ``base`` with ``adapters`` ([(delta file or LoraDelta, weight)]) folded in."""
    man = read_manifest(base)
    out = Path(out)
    if out.resolve() == man.root.resolve():
        raise FormatError(f"{out}: the merged folder must not be the base folder itself (the base is immutable)")
    loaded = [(a if isinstance(a, LoraDelta) else read_delta(a), float(w)) for a, w in adapters]
    if not loaded:
        raise FormatError("merge needs at least one adapter")
    for d, w in loaded:
        d.check_base(man.arch, man.fingerprint)
        if not np.isfinite(w):
            raise FormatError(f"adapter {d.name!r}: weight must be a finite number, found {w}")
    bw = base_weights(man)
    merged = merged_weights(bw.weights, loaded)
    changed = {t for d, _ in loaded for t in d.targets}
    fp = weights_fingerprint(merged)
    merged_from = {"base": {"fingerprint": man.fingerprint, "folder": man.root.name, "weights": bw.source},
                   "adapters": [{"name": d.name, "version": d.version, "weight": w, "quant": d.quant,
                                 "integrity": d.integrity, "signed_by": d.signature.split(":")[1] if d.signature else None,
                                 "file": Path(d.path).name if d.path else None} for d, w in loaded]}
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    tensors: dict[str, dict[str, Any]] = {n: {} for n in merged}
    base_gguf = man.path("gguf")
    if base_gguf is not None and base_gguf.is_file():
        requant = _write_gguf(base_gguf, merged, changed, out / "model.gguf", fp, merged_from, progress)
        merged_from["requantized"] = sorted(set(requant.values()))
        files["gguf"] = "model.gguf"
    if onnx and man.path("onnx") is not None:
        from edgeadapt.converters.onnx_graphs.graph import build_onnx

        for n, e in build_onnx(man.arch, merged, out, progress=progress).items():
            tensors.setdefault(n, {})["onnx"] = e
        files["onnx"] = "model.onnx"
        for kind, file in (("onnx_lora", "model_lora.onnx"), ("onnx_live", "model_live.onnx"), ("onnx_check", "weight_sums.onnx")):
            if (out / file).is_file():
                files[kind] = file
        if "onnx_lora" in files:
            from edgeadapt.converters.onnx_graphs.genai import write_genai_config

            files["genai"] = write_genai_config(out, man.arch)
    tok = man.path("tokenizer")
    if tok is not None and tok.is_file():
        shutil.copy(tok, out / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    if not files:
        raise FormatError(f"{man.root}: nothing to write — the base has neither model.gguf nor model.onnx")
    result = BaseManifest(root=out, arch=man.arch, fingerprint=fp, files=files, tensors=tensors,
                          gguf_type=man.gguf_type, chat_template=man.chat_template, special_tokens=man.special_tokens,
                          source={"kind": "merge", "name": man.root.name}, merged_from=merged_from)
    result.save()
    return result


def merge_report(base: str | os.PathLike, adapters: Sequence[tuple[str | os.PathLike | LoraDelta, float]],
                 merged: str | os.PathLike, *, engine: str = "numpy", prompts: Any = None, n_new: int = 24) -> Any:
    """The merged folder vs the base with the same adapters applied at run time (fp32 merge)."""
    import edgeadapt

    from edgeadapt.converters.quant_report import compare_models, default_prompts

    ref = edgeadapt.load(base, engine=engine, mode="merge")
    weights = {}
    for i, (a, w) in enumerate(adapters):
        weights[ref.add_adapter(a, name=f"a{i}")] = float(w)
    ref.use(weights)
    cand = edgeadapt.load(merged, engine=engine, mode="merge")
    prompts = prompts if prompts is not None else default_prompts(ref, 8)
    return compare_models(ref, cand, prompts, label=f"merged base ({cand.manifest.gguf_type or 'gguf'})",
                          against="the base with the adapters applied at run time", n_new=n_new)
