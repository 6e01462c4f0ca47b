"""bundle: a base folder -> what a device running one engine on one weight type needs, and nothing else.

A bundle is a base folder (same ``manifest.json`` format, same fingerprint, same architecture card), so
``edgeadapt.load`` and every delta file pinned to the base work on it unchanged. What it keeps:

  ort, int4 / int8   model_int{4,8}.onnx (grouped LoRA slots) + model_int{4,8}_base.onnx (no slots) and
                     their data file, written again with the float32 block scales and Q4_1 offsets stored
                     as float16 where that is exact (a Cast in the graph, folded by onnxruntime when the
                     session is built: the session holds the same float32 values as the full folder's)
  ort, fp32          model.onnx + model.onnx.data, model_live.onnx (live adapters), model_kinds.onnx and
                     model_bottleneck.onnx (scale / bias and bottleneck slots), weight_sums.onnx (merges)
  numpy              model.gguf
  every bundle       tokenizer.json, manifest.json (``files`` and ``tensors`` narrowed to what is shipped)

Left out everywhere: model_lora.onnx and genai_config.json (onnxruntime's own LoraAdapter and
onnxruntime-genai, host tools) and every graph of another engine or weight type. What a bundle cannot do
is refused by name at load: ``weights="fp32"`` on an int4 bundle names the bundle and the full folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.errors import FormatError, UnsupportedError
from edgeadapt.formats.manifest import BaseManifest, read_manifest

ENGINE_FILES = {  # (engine, weights) -> manifest file kinds shipped besides the tokenizer
    ("ort", "int4"): ("onnx_int4", "onnx_int4_base"),
    ("ort", "int8"): ("onnx_int8", "onnx_int8_base"),
    ("ort", "fp32"): ("onnx", "onnx_live", "onnx_kinds", "onnx_bottleneck", "onnx_check"),
    ("numpy", "gguf"): ("gguf",),
}


def bundle(base: str | Path, out: str | Path, *, engine: str = "ort", weights: str = "int4") -> BaseManifest:
    """Write the device bundle of ``base`` for ``engine`` ("ort" | "numpy") and ``weights`` (ort: "int4" | "int8"
    | "fp32"; numpy runs model.gguf as it is: "gguf") into ``out``; returns its manifest."""
    if (engine, weights) not in ENGINE_FILES:
        raise UnsupportedError(f"bundle: expected engine/weights one of "
                               f"{', '.join(f'{e}/{w}' for e, w in ENGINE_FILES)}; found {engine}/{weights}")
    man = read_manifest(base)
    out = Path(out)
    if out.exists() and any(out.iterdir()):  # a bundle is exactly its files: nothing stale beside them
        raise UnsupportedError(f"bundle: expected a new or empty folder for {out}, found files in it "
                               f"(e.g. {next(out.iterdir()).name}); choose another folder or empty it")
    kinds = [k for k in ENGINE_FILES[(engine, weights)] if man.files.get(k) and man.path(k).is_file()]
    if ENGINE_FILES[(engine, weights)][0] not in kinds:
        first = ENGINE_FILES[(engine, weights)][0]
        raise FormatError(f"{man.root} has no {man.files.get(first, first)}, which a {engine}/{weights} bundle ships; export the "
                          "base with " + ("--onnx-quant " + weights if weights in ("int4", "int8") else "its ONNX graphs"
                                          if engine == "ort" else "a model.gguf"))
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if weights in ("int4", "int8"):
        files.update(_quant_graphs(man, out, kinds))
    else:
        for k in kinds:
            files[k] = man.files[k]
            _copy(man.path(k), out / man.files[k])
        data = {e["onnx"]["file"] for e in man.tensors.values() if isinstance(e, dict) and "onnx" in e}
        for f in sorted(data) if engine == "ort" else ():
            _copy(man.root / f, out / f)
    if man.path("tokenizer") is not None and man.path("tokenizer").is_file():
        files["tokenizer"] = man.files["tokenizer"]
        _copy(man.path("tokenizer"), out / files["tokenizer"])
    shipped = set(files.values()) | ({e["onnx"]["file"] for e in man.tensors.values()
                                      if isinstance(e, dict) and "onnx" in e} if weights == "fp32" else set())
    tensors = {n: {k: v for k, v in e.items() if not isinstance(v, dict) or v.get("file") in shipped}
               for n, e in man.tensors.items()}
    bundled = BaseManifest(root=out, arch=man.arch, fingerprint=man.fingerprint, files=files, tensors=tensors,
                           gguf_type=man.gguf_type, chat_template=man.chat_template,
                           special_tokens=man.special_tokens,
                           source={**man.source, "bundle": {"engine": engine, "weights": weights}},
                           merged_from=man.merged_from)
    bundled.save()
    return read_manifest(out)  # what a device will read, checked as a device reads it


def _copy(src: Path, dst: Path) -> None:
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)


# ---- quantized graphs: one data file, float32 scales / offsets as float16 where exact
def _quant_graphs(man: BaseManifest, out: Path, kinds: list[str]) -> dict[str, str]:
    """Rewrite the quantized graphs of ``kinds`` into ``out`` sharing one new data file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    data_name = Path(man.files[kinds[0]]).name + ".data"
    written: dict[tuple[str, int, int], tuple[str, Any]] = {}  # source bytes -> (how stored, where)
    files: dict[str, str] = {}
    with open(out / data_name, "wb") as data:
        def put(raw: bytes) -> tuple[int, int]:
            pad = -data.tell() % 64  # every tensor 64-byte aligned
            data.write(b"\0" * pad)
            at = data.tell()
            data.write(raw)
            return at, len(raw)

        for kind in kinds:
            src = man.path(kind)
            model = onnx.load(str(src), load_external_data=False)
            g = model.graph
            keep: list = []
            halves: list = []  # Cast(w16) -> w: first, so that what follows may read the float32 scales
            derived: list = []  # the scales transposed, and Q4_1 offsets rebuilt from m16 (need the scales)
            inits = {t.name: t for t in g.initializer}
            where: dict[str, tuple[str, int]] = {}  # initializer -> (how stored, offset in the new data file)
            for t in g.initializer:
                ext = {e.key: e.value for e in t.external_data}
                if not ext:
                    keep.append(t)
                    continue
                key = (ext["location"], int(ext.get("offset", 0)), int(ext["length"]))
                if key not in written and _within(key, written):  # a part of bytes already written (the head's parts)
                    written[key] = _within(key, written)
                if key not in written:
                    raw = _read(src.parent / key[0], key[1], key[2])
                    half = _as_half(t, raw, inits, src.parent) if t.data_type == TensorProto.FLOAT else None
                    written[key] = ("as_is", put(raw)) if half is None else (half[0], put(half[1]))
                how, (at, n) = written[key]
                where[t.name] = (how, at)
                if how == "as_is":
                    _point(t, data_name, at, n)
                    keep.append(t)
                    continue
                h = TensorProto(name=t.name + ".f16", data_type=TensorProto.FLOAT16, dims=list(t.dims))
                _point(h, data_name, at, n)
                keep.append(h)
                if how == "half":  # w = Cast(w16)
                    halves.append(helper.make_node("Cast", [h.name], [t.name], to=TensorProto.FLOAT, name=t.name + ".cast"))
                    continue
                # Q4_1 offsets [nb, N] = Cast(m16) + 8 · scalesᵀ, the float32 arithmetic the export did
                scales_t = how.split(":", 1)[1] + ".T"
                if not any(nd.output[0] == scales_t for nd in derived):
                    derived.append(helper.make_node("Transpose", [how.split(":", 1)[1]], [scales_t], perm=[1, 0],
                                                    name=scales_t))
                eight, m32, d8 = t.name + ".eight", t.name + ".m32", t.name + ".8d"
                keep.append(numpy_helper.from_array(np.array(8.0, np.float32), eight))
                derived += [helper.make_node("Cast", [h.name], [m32], to=TensorProto.FLOAT, name=m32),
                            helper.make_node("Mul", [scales_t, eight], [d8], name=d8),
                            helper.make_node("Add", [m32, d8], [t.name], name=t.name + ".add")]
            casts = halves + derived
            del g.initializer[:]
            g.initializer.extend(keep)
            nodes = list(casts) + list(g.node)
            del g.node[:]
            g.node.extend(nodes)
            _move_rows_spec(model, data_name, where)
            onnx.save(model, str(out / man.files[kind]))
            files[kind] = man.files[kind]
    return files


def _within(key: tuple[str, int, int], written: dict) -> tuple[str, tuple[int, int]] | None:
    """Where the bytes ``key`` (location, offset, length) went, when they lie inside a tensor already written as
    it was or as float16 (every value halved in size: offsets and lengths too)."""
    loc, off, n = key
    for (wloc, woff, wn), (how, (at, _)) in written.items():
        if wloc == loc and woff <= off and off + n <= woff + wn and how in ("as_is", "half"):
            k = 2 if how == "half" else 1
            if (off - woff) % k == 0 and n % k == 0:
                return how, (at + (off - woff) // k, n // k)
    return None


def _move_rows_spec(model: Any, data_name: str, where: dict[str, tuple[str, int]]) -> None:
    """The graph's ``edgeadapt.embed_rows`` property (where the runtime reads the embedding rows: see
    onnx_graphs.fast.EMBED_ROWS_PROP), pointed at the rewritten data file, the scales' type as stored there."""
    import json

    for prop in model.metadata_props:
        if prop.key != "edgeadapt.embed_rows":
            continue
        spec = json.loads(prop.value)
        spec["file"] = data_name
        for part in ("data", "scales"):
            name = spec[part]["name"]
            if name not in where:
                raise FormatError(f"{name}: the embedding the graph's edgeadapt.embed_rows names is not in its data "
                                  "file; export the base again")
            how, spec[part]["offset"] = where[name]
            if part == "scales":
                spec[part]["type"] = "float16" if how == "half" else "float32"
            elif how != "as_is":
                raise FormatError(f"{name}: expected the embedding's bytes as they are, found them stored as {how}")
        prop.value = json.dumps(spec)


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise FormatError(f"{path}: expected {length} bytes at offset {offset}, found {len(raw)}; export the base again")
    return raw


def _point(t: Any, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _as_half(t: Any, raw: bytes, inits: dict[str, Any], root: Path) -> tuple[str, bytes] | None:
    """How a float32 initializer can be stored in float16 with the graph computing exactly the same float32:
    ("half", bytes) when every value is a float16 (block scales d), ("offsets:<scales>", m16 bytes) for Q4_1
    offsets m + 8d when m recovered in float16 gives back every float32 bit; else None (kept as it is)."""
    w = np.frombuffer(raw, np.float32)
    if t.name.endswith(".scales") or t.name.endswith(".f32scales"):
        h = w.astype(np.float16)
        return ("half", h.tobytes()) if np.array_equal(h.astype(np.float32), w, equal_nan=True) else None
    if t.name.endswith(".offsets"):
        s = inits.get(t.name[: -len(".offsets")] + ".scales")
        ext = {e.key: e.value for e in s.external_data} if s is not None else {}
        if not ext:
            return None
        d = np.frombuffer(_read(root / ext["location"], int(ext.get("offset", 0)), int(ext["length"])), np.float32)
        d = d.reshape(list(s.dims))  # [N, nb] (MatMulNBits' scales); the offsets are [nb, N]
        if d.ndim != 2 or tuple(t.dims) != (d.shape[1], d.shape[0]):
            return None
        d_t = np.ascontiguousarray(d.T).ravel()
        m = (w - np.float32(8) * d_t).astype(np.float16)
        if np.array_equal(m.astype(np.float32) + np.float32(8) * d_t, w):
            return ("offsets:" + s.name, m.tobytes())
    return None


def folder_size(root: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(root).iterdir() if p.is_file())
