"""``edgeadapt bundle``: a base folder -> the files a device running one engine on one weight type needs."""

from __future__ import annotations

from pathlib import Path

import click

CHOICES = ("ort/int4", "ort/int8", "ort/fp32", "numpy/gguf")  # converters.bundle.ENGINE_FILES (imported lazily)


@click.command("bundle")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--for", "target", default="ort/int4", show_default=True, type=click.Choice(CHOICES),
              help="ENGINE/WEIGHTS the device runs: edgeadapt.load(OUT, engine=ENGINE, weights=WEIGHTS); numpy/gguf "
                   "ships model.gguf for the numpy engine.")
def bundle_cmd(base: Path, out: Path, target: str) -> None:
    """Write OUT, the device bundle of BASE: only the graphs, weights and tokenizer that engine and weight type
    load, with BASE's fingerprint (delta files pinned to BASE work on it). int4 / int8 graphs store their
    block scales in float16 where exact (the session computes with the same float32 values)."""
    from edgeadapt.cli.common import output_folder
    from edgeadapt.converters.bundle import bundle, folder_size
    from edgeadapt.formats.manifest import read_manifest

    output_folder(out, what="bundle folder")
    engine, weights = target.split("/")
    m = bundle(base, out, engine=engine, weights=weights)
    full, size = folder_size(read_manifest(base).root), folder_size(out)
    click.echo(f"bundle {target} -> {out} ({', '.join(m.files.values())}): {size / 1e6:.1f} MB "
               f"(base folder {full / 1e6:.1f} MB), fingerprint {m.fingerprint[:19]}…")


COMMANDS = [bundle_cmd]
