"""The base folder: one frozen base, exported once, that every delta is pinned to.

Spec (mirrored in docs/FORMAT.md). A base folder MUST hold ``manifest.json``:

- ``format``: ``"edgeadapt.base"``; ``format_version``: 1 (an integer; readers refuse newer);
- ``arch``: the architecture card (:class:`edgeadapt.formats.arch.ArchConfig` fields, or, when it says
  ``"family": "encoder"``, :class:`edgeadapt.formats.encoder_arch.EncoderConfig` fields);
- ``fingerprint``: ``sha256:<hex>`` of the float32 base weights (:mod:`edgeadapt.formats.fingerprint`);
- ``files``: relative paths of ``onnx`` (the graph; its weights in ``model.onnx.data``),
  ``onnx_lora`` (the same graph and weights with LoRA slots, for live adapters; slots default to
  empty, as onnxruntime's ``LoraAdapter`` needs), ``onnx_live`` (the same with every slot required:
  the runtime's live graph, whose kv cache stays bound in place), ``onnx_kinds`` (scale / bias slots
  too: DoRA, IA3, lora_bias), ``onnx_bottleneck`` (``onnx_kinds`` plus bottleneck slots at every
  residual add: AdapterHub adapters), ``onnx_check``
  (the weight-checksum graph that verifies merges), ``genai`` (``genai_config.json``: the folder as an
  onnxruntime-genai model running ``onnx_lora``), ``gguf`` (the base llama.cpp loads) and
  ``tokenizer`` (a ``tokenizers`` JSON); each MAY be absent;
- ``tensors``: per canonical (GGUF) tensor name, where it lives in each export:
  ``{"onnx": {"onnx", "layout", "file", "offset", "length", "dtype", "shape"}, "hf": <source name>}``
  so a runtime without the onnx package can memory-map base weights;
- ``gguf_type``: the tensor type of ``model.gguf``; ``chat_template``, ``special_tokens``: MAY be set;
- ``source``: what it was exported from; ``merged_from`` MAY record the base fingerprint and the
  adapters (name, version, weight, integrity, signer) a merged base was made from.
  Readers MUST ignore keys they do not know.

Paths MUST stay inside the folder; the manifest is capped at 64 MiB. Readers refuse duplicate JSON
keys, NaN/Infinity, runaway nesting, fields of the wrong type, architecture cards with
non-positive or implausible sizes, and tensor entries whose name, shape, dtype or byte range
(offset + length inside its file, length = shape × dtype size) disagree with the card — naming
every problem at once.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeadapt.formats.arch import GGUF_ARCHES, ArchConfig, check_features
from edgeadapt.errors import FormatError, UnsupportedError, collect

MAGIC = "edgeadapt.base"
VERSION = 1
MAX_BYTES = 64 << 20
DTYPES = {"float32": 4, "float16": 2}
LAYOUTS = ("in_out", "as_is")
# architecture card: field -> (type, lowest, highest)
_CARD = {"n_layers": (int, 1, 4096), "dim": (int, 1, 1 << 17), "ffn_dim": (int, 1, 1 << 20), "n_heads": (int, 1, 4096),
         "n_kv_heads": (int, 1, 4096), "head_dim": (int, 2, 1 << 14), "vocab_size": (int, 1, 1 << 24),
         "context_length": (int, 1, 1 << 26), "rope_theta": (float, 1e-6, 1e12), "rms_eps": (float, 0.0, 1.0)}
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass
class BaseManifest:
    root: Path
    arch: ArchConfig  # or an EncoderConfig (family "encoder")
    fingerprint: str
    files: dict[str, str]
    tensors: dict[str, dict[str, Any]]
    gguf_type: str = ""
    chat_template: str | None = None
    special_tokens: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    merged_from: dict[str, Any] | None = None

    def path(self, kind: str) -> Path | None:
        rel = self.files.get(kind)
        return None if rel is None else self.root / rel

    def to_json(self) -> dict[str, Any]:
        return {"format": MAGIC, "format_version": VERSION, "arch": self.arch.to_dict(),
                "fingerprint": self.fingerprint, "files": self.files, "gguf_type": self.gguf_type,
                "chat_template": self.chat_template, "special_tokens": self.special_tokens,
                "source": self.source, **({"merged_from": self.merged_from} if self.merged_from else {}),
                "tensors": self.tensors}

    def save(self) -> None:
        tmp = self.root / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, self.root / "manifest.json")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(p: Path, cap: int) -> Any:
    """Strict JSON from a file of at most ``cap`` bytes: no duplicate keys, no NaN/Infinity, bounded nesting."""
    size = p.stat().st_size
    if size > cap:
        raise FormatError(f"{p}: {size} bytes is over the {cap}-byte limit")
    try:
        return json.loads(p.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except RecursionError:
        raise FormatError(f"{p}: JSON nested too deeply to be a manifest") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{p}: not valid JSON: {e}") from None


def _inside(root: Path, rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\0" in rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        return False
    target = root / rel
    return not target.exists() or target.resolve().is_relative_to(root.resolve())


def _inside_once(root: Path, rel: Any, seen: dict[str, bool]) -> bool:
    """:func:`_inside`, resolved once per file name (``seen``): a base's ~280 tensors name one or two files."""
    if not isinstance(rel, str):
        return False
    if rel not in seen:
        seen[rel] = _inside(root, rel)
    return seen[rel]


def _check_card(d: Any, problems: list[str]) -> None:
    if not isinstance(d, dict):
        problems.append(f"arch: expected an object, found {type(d).__name__}")
        return
    if not isinstance(d.get("arch"), str) or d["arch"] not in GGUF_ARCHES:
        problems.append(f"arch.arch: expected one of {sorted(GGUF_ARCHES)}, found {d.get('arch')!r}")
    for key, (typ, lo, hi) in _CARD.items():
        v = d.get(key)
        if v is None and key in ("context_length", "rope_theta", "rms_eps"):
            continue
        ok = isinstance(v, (int, float) if typ is float else int) and not isinstance(v, bool)
        if not ok or not lo <= v <= hi or (typ is float and not math.isfinite(v)):
            problems.append(f"arch.{key}: expected {typ.__name__} in {lo}…{hi}, found {v!r}")
    if not problems and d["n_heads"] % d["n_kv_heads"]:
        problems.append(f"arch: n_heads {d['n_heads']} is not a multiple of n_kv_heads {d['n_kv_heads']}")
    check_features(d, problems)  # rope kind and the per-family fields, see edgeadapt.formats.arch
    for key in ("qkv_bias", "tied_embeddings"):
        if key in d and not isinstance(d[key], bool):
            problems.append(f"arch.{key}: expected true or false, found {d[key]!r}")
    for key in ("bos_token_id", "pad_token_id"):
        if d.get(key) is not None and (not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 0):
            problems.append(f"arch.{key}: expected a non-negative integer or null, found {d[key]!r}")
    eos = d.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in eos):
        problems.append(f"arch.eos_token_ids: expected a list of non-negative integers, found {eos!r}")


def _check_tensors(root: Path, arch: ArchConfig, tensors: dict[str, Any], problems: list[str]) -> None:
    expected = arch.tensor_shapes()
    sizes: dict[str, int | None] = {}
    inside: dict[str, bool] = {}  # file name -> _inside (see _inside_once)
    for name, e in tensors.items():
        if name not in expected:
            problems.append(f"tensors[{name!r}]: not a tensor of this {arch.arch} architecture card")
            continue
        if not isinstance(e, dict):
            problems.append(f"tensors[{name!r}]: expected an object, found {type(e).__name__}")
            continue
        o = e.get("onnx")
        if o is None:
            continue
        if not isinstance(o, dict):
            problems.append(f"tensors[{name!r}].onnx: expected an object, found {type(o).__name__}")
            continue
        bad = [k for k, ok in (("onnx", isinstance(o.get("onnx"), str)), ("layout", o.get("layout") in LAYOUTS),
                               ("dtype", isinstance(o.get("dtype"), str) and o["dtype"] in DTYPES),
                               ("file", _inside_once(root, o.get("file"), inside)),
                               ("offset", _uint(o.get("offset"))), ("length", _uint(o.get("length"))),
                               ("shape", isinstance(o.get("shape"), list) and 1 <= len(o["shape"]) <= 4
                                and all(_uint(x) and x > 0 for x in o["shape"]))) if not ok]
        if bad:
            problems.append(f"tensors[{name!r}].onnx: bad or missing {', '.join(bad)}")
            continue
        want = expected[name] if o["layout"] == "as_is" else tuple(reversed(expected[name]))
        if tuple(o["shape"]) != want or o["length"] != math.prod(o["shape"]) * DTYPES[o["dtype"]]:
            problems.append(f"tensors[{name!r}].onnx: expected shape {list(want)} of {math.prod(want) * DTYPES[o['dtype']]} "
                            f"bytes, found {o['shape']} and length {o['length']}")
            continue
        if o["file"] not in sizes:
            f = root / o["file"]
            sizes[o["file"]] = f.stat().st_size if f.is_file() else None
        size = sizes[o["file"]]
        if size is not None and o["offset"] + o["length"] > size:
            problems.append(f"tensors[{name!r}].onnx: bytes {o['offset']}…{o['offset'] + o['length']} lie outside "
                            f"{o['file']} ({size} bytes)")


def _uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def read_manifest(folder: str | os.PathLike) -> BaseManifest:
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        from edgeadapt.errors import UsageError
        raise UsageError(f"expected a base folder path (str or os.PathLike), found {type(folder).__name__} {folder!r}")
    root = Path(folder)
    if root.is_file() and root.name == "manifest.json":
        root = root.parent
    p = root / "manifest.json"
    if not p.is_file():
        found = sorted(x.name for x in root.iterdir())[:10] if root.is_dir() else "no such folder"
        raise FormatError(f"{root} is not an edgeadapt base folder: expected manifest.json, found {found}; "
                          "make one with `edgeadapt export-base`")
    d = load_json(p, MAX_BYTES)
    if not isinstance(d, dict) or d.get("format") != MAGIC:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise FormatError(f"{p}: expected format {MAGIC!r}, found {found!r}")
    v = d.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v > VERSION:
        raise UnsupportedError(f"{p}: base format version {v!r}; this edgeadapt reads up to {VERSION}")
    problems: list[str] = []
    for key, typ in (("arch", dict), ("fingerprint", str), ("files", dict), ("tensors", dict)):
        if not isinstance(d.get(key), typ):
            problems.append(f"{key}: expected a {typ.__name__}, found {type(d.get(key)).__name__}")
    collect(problems, FormatError, f"{p}: not a valid base manifest:")
    if not _FINGERPRINT_RE.fullmatch(d["fingerprint"]):
        problems.append(f"fingerprint: expected 'sha256:' and 64 lowercase hex digits, found {d['fingerprint'][:80]!r}")
    for kind, rel in d["files"].items():
        if not _inside(root, rel):
            problems.append(f"files[{kind!r}] = {rel!r} must be a relative path inside the folder")
    for key, ok in (("gguf_type", isinstance(d.get("gguf_type", ""), str)),
                    ("chat_template", d.get("chat_template") is None or isinstance(d["chat_template"], str)),
                    ("special_tokens", d.get("special_tokens") is None or isinstance(d["special_tokens"], dict)),
                    ("source", d.get("source") is None or isinstance(d["source"], dict)),
                    ("merged_from", d.get("merged_from") is None or isinstance(d["merged_from"], dict))):
        if not ok:
            problems.append(f"{key}: wrong type {type(d.get(key)).__name__}")
    from edgeadapt.formats.encoder_arch import EncoderConfig, check_encoder_card, is_encoder_card
    encoder = is_encoder_card(d["arch"])  # the card says family "encoder": a BERT-family base
    (check_encoder_card if encoder else _check_card)(d["arch"], problems)
    collect(problems, FormatError, f"{p}: not a valid base manifest:")
    arch = EncoderConfig.from_dict(d["arch"]) if encoder else ArchConfig.from_dict(d["arch"])
    _check_tensors(root, arch, d["tensors"], problems)
    collect(problems, FormatError, f"{p}: not a valid base manifest:")
    return BaseManifest(root=root, arch=arch, fingerprint=d["fingerprint"], files=d["files"], tensors=d["tensors"],
                        gguf_type=d.get("gguf_type", ""), chat_template=d.get("chat_template"),
                        special_tokens=d.get("special_tokens") or {}, source=d.get("source") or {},
                        merged_from=d.get("merged_from"))
