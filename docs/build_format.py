"""Regenerate docs/FORMAT.md from the format modules' docstrings (the specs live in the code).

    python docs/build_format.py
"""

from pathlib import Path

import edgeadapt.arch
import edgeadapt.bottleneck
import edgeadapt.delta
import edgeadapt.delta_kinds
import edgeadapt.fingerprint
import edgeadapt.gguf_file
import edgeadapt.kinds
import edgeadapt.manifest

SECTIONS = [("The delta file (`edgeadapt/delta.py`)", edgeadapt.delta),
            ("Adapter kinds in delta files (`edgeadapt/delta_kinds.py`)", edgeadapt.delta_kinds),
            ("The built-in kinds (`edgeadapt/kinds.py`)", edgeadapt.kinds),
            ("Bottleneck adapters (`edgeadapt/bottleneck.py`)", edgeadapt.bottleneck),
            ("The base folder (`edgeadapt/manifest.py`)", edgeadapt.manifest),
            ("The canonical layout (`edgeadapt/arch.py`)", edgeadapt.arch),
            ("The base fingerprint (`edgeadapt/fingerprint.py`)", edgeadapt.fingerprint),
            ("The GGUF container, as read (`edgeadapt/gguf_file.py`)", edgeadapt.gguf_file)]


def render() -> str:
    doc = ["# edgeadapt file formats", "",
           "This page mirrors the docstrings of the modules that read and write each format; "
           "`tests/test_docs.py` checks that they stay the same (regenerate: `python docs/build_format.py`).", ""]
    for title, mod in SECTIONS:
        doc += [f"## {title}", "", mod.__doc__.strip(), ""]
    return "\n".join(doc)


if __name__ == "__main__":
    (Path(__file__).parent / "FORMAT.md").write_text(render())
