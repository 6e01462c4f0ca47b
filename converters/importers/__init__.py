"""Adapter files other tools wrote -> delta files pinned to a base (``edgeadapt import-adapter``).

Three formats, one module each: a llama.cpp LoRA GGUF (:mod:`.llama_gguf`), an ``.onnx_adapter`` of
onnxruntime / onnxruntime-genai / Olive (:mod:`.onnx_adapter`), an mlx-lm adapter folder (:mod:`.mlx`).
Each reads its file into our canonical layout and checks it against the base card, naming every
mismatch at once; :func:`import_adapter` writes the delta, pinned to the base's fingerprint, with
``edgeadapt.base.asserted_by`` recording that the importer asserted the base (a foreign file carries no
fingerprint to prove it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeadapt.errors import FormatError, UsageError

from edgeadapt.converters.importers.common import K_ASSERTED, Imported, record

__all__ = ["import_adapter", "read_foreign", "ImportResult", "K_ASSERTED"]
FORMATS = ("llama.cpp LoRA GGUF", ".onnx_adapter (ours, onnxruntime-genai, Olive)", "mlx-lm adapter folder")


@dataclass
class ImportResult:
    path: Path
    adapter: Any  # what was written: a LoraDelta, a SeqAdapter (embedding LoRA) or a DoraAdapter
    imported: Imported
    asserted_by: str


def read_foreign(source: str | Path, manifest: Any) -> Imported:
    """Read a foreign adapter file or folder, checked against the base ``manifest``."""
    if not isinstance(source, (str, Path)) or not str(source):
        raise UsageError(f"expected an adapter file or folder path, found {type(source).__name__} {source!r}")
    src = Path(source)
    cfg = manifest.arch
    if src.is_dir():
        from edgeadapt.converters.importers.mlx import is_mlx_folder, read_mlx_adapter

        if is_mlx_folder(src):
            return read_mlx_adapter(src, cfg)
        peft = (src / "adapter_model.safetensors").is_file()
        raise FormatError(f"{src}: expected one of {', '.join(FORMATS)}; found a folder without adapters.safetensors"
                          + ("; it is a PEFT folder: convert it with edgeadapt export-adapter" if peft else ""))
    if not src.is_file():
        raise FormatError(f"{src}: {'not a regular file' if src.exists() else 'no such adapter file or folder'}")
    from edgeadapt.converters.importers.llama_gguf import is_gguf, read_llama_lora
    from edgeadapt.converters.importers.onnx_adapter import is_onnx_adapter, read_onnx_adapter_file

    if is_gguf(src):
        return read_llama_lora(src, cfg)
    if is_onnx_adapter(src):
        from edgeadapt.formats.onnx_adapter import fingerprint_pin

        return read_onnx_adapter_file(src, cfg, fingerprint_pin(manifest.fingerprint))
    raise FormatError(f"{src}: expected one of {', '.join(FORMATS)}; found neither GGUF magic nor an .onnx_adapter")


def import_adapter(source: str | Path, base: str | Path | Any, out: str | Path, *, name: str | None = None,
                   version: int = 1, dtype: str = "F32") -> ImportResult:
    """Import a llama.cpp LoRA GGUF, an ``.onnx_adapter`` or an mlx-lm folder as a delta file pinned to
    ``base`` (a base folder or its manifest); ``dtype``: F32 or F16 storage."""
    from edgeadapt.formats.delta import LoraDelta, write_delta
    from edgeadapt.formats.delta_kinds import heads_for
    from edgeadapt.formats.manifest import read_manifest

    if dtype not in ("F32", "F16"):
        raise UsageError(f"dtype: expected F32 or F16, found {dtype!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise UsageError(f"name: expected a non-empty string or None, found {type(name).__name__} {name!r}")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < 2 ** 32:
        raise UsageError(f"version: expected an integer in 0…2**32-1, found {type(version).__name__} {version!r}")
    if not isinstance(out, (str, Path)) or not str(out):
        raise UsageError(f"out: expected a delta file path, found {type(out).__name__} {out!r}")
    manifest = base if hasattr(base, "fingerprint") else read_manifest(base)
    src = Path(source) if isinstance(source, (str, Path)) else source
    imp = read_foreign(src, manifest)
    cfg, fp = manifest.arch, manifest.fingerprint
    common = dict(name=name or src.stem, version=version, arch=cfg.arch, fingerprint=fp,
                  source=f"import-adapter {imp.fmt} {src.name}")
    if imp.dora and (imp.factors or imp.embed is not None):
        raise FormatError(f"{src}: DoRA and plain LoRA targets in one adapter; import them as two files")
    if imp.dora:
        from edgeadapt.kinds.lora_family import DoraAdapter

        adapter: Any = DoraAdapter(params=imp.dora, heads=heads_for(cfg, imp.dora), **common)
    elif imp.embed is not None:
        from edgeadapt.kinds.sequence import SeqAdapter

        adapter = SeqAdapter.build("embedding_lora", factors=imp.factors, embed_lora=imp.embed, **common)
    else:
        adapter = LoraDelta(factors=imp.factors, **common)
    adapter.check_base(cfg, fp)
    asserted = record(imp, src, cfg)
    write_delta(out, adapter, dtype=dtype, metadata={K_ASSERTED: asserted})
    return ImportResult(path=Path(out), adapter=adapter, imported=imp, asserted_by=asserted)
