"""``edgeadapt import-adapter``: an adapter another tool wrote -> a delta file pinned to a base."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("import-adapter")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base folder the adapter was trained on (its architecture, names and shapes are checked).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Delta file to write (.gguf).")
@click.option("--name", default=None, help="Adapter name (default: SOURCE's name without suffix).")
@click.option("--version", "version", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Adapter version (a device store keeps versions monotonic).")
@click.option("--dtype", default="F32", show_default=True, type=click.Choice(["F32", "F16"]), help="Storage type.")
def import_adapter_cmd(source: Path, base: Path, out: Path, name: str | None, version: int, dtype: str) -> None:
    """Import SOURCE — a llama.cpp LoRA GGUF (convert_lora_to_gguf.py), an .onnx_adapter (onnxruntime-genai /
    Olive names, or our graph's) or an mlx-lm adapter folder (LoRA / DoRA) — as a delta file pinned to BASE.
    The file carries no base fingerprint: what can be checked is, and the delta records the base as asserted."""
    from edgeadapt.cli.common import output_file
    from edgeadapt.converters.importers import import_adapter

    output_file(out, suffixes=(".gguf",), what="-o")
    res = import_adapter(source, base, out, name=name, version=version, dtype=dtype)
    a, imp = res.adapter, res.imported
    ranks = sorted({x.shape[0] for x, _ in imp.factors.values()} | {p["lora_a"].shape[0] for p in imp.dora.values()}
                   | ({imp.embed[0].shape[0]} if imp.embed is not None else set()))
    click.echo(f"imported {imp.fmt} {source} -> {res.path} ({res.path.stat().st_size / 1e6:.3f} MB): "
               f"kind {a.kind}, {len(imp.targets)} targets, rank {ranks[0] if len(ranks) == 1 else ranks}")
    click.echo(f"base          asserted, not proven: {res.asserted_by}")


COMMANDS = [import_adapter_cmd]
