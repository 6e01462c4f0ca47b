"""The base folder: one frozen base, exported once, that every delta is pinned to.

Spec (mirrored in docs/FORMAT.md). A base folder MUST hold ``manifest.json``:

- ``format``: ``"edgeadapt.base"``; ``format_version``: 1 (an integer; readers refuse newer);
- ``arch``: the architecture card (:class:`edgeadapt.arch.ArchConfig` fields);
- ``fingerprint``: ``sha256:<hex>`` of the float32 base weights (:mod:`edgeadapt.fingerprint`);
- ``files``: relative paths of ``onnx`` (the graph; its weights in ``model.onnx.data``),
  ``onnx_lora`` (the same graph and weights with LoRA slots, for live adapters), ``onnx_check``
  (the weight-checksum graph that verifies merges), ``gguf`` (the base llama.cpp loads) and
  ``tokenizer`` (a ``tokenizers`` JSON); each MAY be absent;
- ``tensors``: per canonical (GGUF) tensor name, where it lives in each export:
  ``{"onnx": {"onnx", "layout", "file", "offset", "length", "dtype", "shape"}, "hf": <source name>}``
  so a runtime without the onnx package can memory-map base weights;
- ``gguf_type``: the tensor type of ``model.gguf``; ``chat_template``, ``special_tokens``: MAY be set;
- ``source``: what it was exported from. Readers MUST ignore keys they do not know.

Paths MUST stay inside the folder; the manifest is capped at 64 MiB.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arch import ArchConfig
from .errors import FormatError, UnsupportedError

MAGIC = "edgeadapt.base"
VERSION = 1
MAX_BYTES = 64 << 20


@dataclass
class BaseManifest:
    root: Path
    arch: ArchConfig
    fingerprint: str
    files: dict[str, str]
    tensors: dict[str, dict[str, Any]]
    gguf_type: str = ""
    chat_template: str | None = None
    special_tokens: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def path(self, kind: str) -> Path | None:
        rel = self.files.get(kind)
        return None if rel is None else self.root / rel

    def to_json(self) -> dict[str, Any]:
        return {"format": MAGIC, "format_version": VERSION, "arch": self.arch.to_dict(),
                "fingerprint": self.fingerprint, "files": self.files, "gguf_type": self.gguf_type,
                "chat_template": self.chat_template, "special_tokens": self.special_tokens,
                "source": self.source, "tensors": self.tensors}

    def save(self) -> None:
        tmp = self.root / "manifest.json.tmp"
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, self.root / "manifest.json")


def read_manifest(folder: str | os.PathLike) -> BaseManifest:
    root = Path(folder)
    if root.is_file() and root.name == "manifest.json":
        root = root.parent
    p = root / "manifest.json"
    if not p.is_file():
        found = sorted(x.name for x in root.iterdir())[:10] if root.is_dir() else "no such folder"
        raise FormatError(f"{root} is not an edgeadapt base folder: expected manifest.json, found {found}; "
                          "make one with `edgeadapt export-base`")
    if p.stat().st_size > MAX_BYTES:
        raise FormatError(f"{p}: {p.stat().st_size} bytes is over the {MAX_BYTES}-byte manifest limit")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(d, dict) or d.get("format") != MAGIC:
        raise FormatError(f"{p}: expected format {MAGIC!r}, found {d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
    if not isinstance(d.get("format_version"), int) or d["format_version"] > VERSION:
        raise UnsupportedError(f"{p}: base format version {d.get('format_version')!r}; this edgeadapt reads up to {VERSION}")
    for key, typ in (("arch", dict), ("fingerprint", str), ("files", dict), ("tensors", dict)):
        if not isinstance(d.get(key), typ):
            raise FormatError(f"{p}: key {key!r} must be a {typ.__name__}, found {type(d.get(key)).__name__}")
    for kind, rel in d["files"].items():
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise FormatError(f"{p}: files[{kind!r}] = {rel!r} must be a relative path inside the folder")
    try:
        arch = ArchConfig.from_dict(d["arch"])
    except TypeError as e:
        raise FormatError(f"{p}: bad architecture card: {e}") from e
    return BaseManifest(root=root, arch=arch, fingerprint=d["fingerprint"], files=d["files"], tensors=d["tensors"],
                        gguf_type=d.get("gguf_type", ""), chat_template=d.get("chat_template"),
                        special_tokens=d.get("special_tokens") or {}, source=d.get("source") or {})
