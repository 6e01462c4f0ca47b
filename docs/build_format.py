"""Regenerate docs/FORMAT.md from the format modules' docstrings (the specs live in the code).

    python docs/build_format.py
"""

from pathlib import Path

import edgeadapt.formats.arch
import edgeadapt.kinds.bottleneck
import edgeadapt.formats.delta
import edgeadapt.formats.delta_kinds
import edgeadapt.formats.fingerprint
import edgeadapt.formats.gguf_file
import edgeadapt.kinds.lora_family
import edgeadapt.formats.manifest

SECTIONS = [("The delta file (`edgeadapt/formats/delta.py`)", edgeadapt.formats.delta),
            ("Adapter kinds in delta files (`edgeadapt/formats/delta_kinds.py`)", edgeadapt.formats.delta_kinds),
            ("The built-in kinds (`edgeadapt/kinds/lora_family.py`)", edgeadapt.kinds.lora_family),
            ("Bottleneck adapters (`edgeadapt/kinds/bottleneck.py`)", edgeadapt.kinds.bottleneck),
            ("The base folder (`edgeadapt/formats/manifest.py`)", edgeadapt.formats.manifest),
            ("The canonical layout (`edgeadapt/formats/arch.py`)", edgeadapt.formats.arch),
            ("The base fingerprint (`edgeadapt/formats/fingerprint.py`)", edgeadapt.formats.fingerprint),
            ("The GGUF container, as read (`edgeadapt/formats/gguf_file.py`)", edgeadapt.formats.gguf_file)]


def render() -> str:
    doc = ["# edgeadapt file formats", "",
           "This page mirrors the docstrings of the modules that read and write each format; "
           "`tests/test_docs.py` checks that they stay the same (regenerate: `python docs/build_format.py`).", ""]
    for title, mod in SECTIONS:
        doc += [f"## {title}", "", mod.__doc__.strip(), ""]
    return "\n".join(doc)


if __name__ == "__main__":
    (Path(__file__).parent / "FORMAT.md").write_text(render())
