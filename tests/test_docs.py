"""docs/FORMAT.md mirrors the format modules' docstrings (the specs live in the code)."""

from pathlib import Path

import edgeadapt.arch
import edgeadapt.delta
import edgeadapt.fingerprint
import edgeadapt.manifest

DOC = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()


def test_format_doc_mirrors_the_code():
    for mod in (edgeadapt.delta, edgeadapt.manifest, edgeadapt.arch, edgeadapt.fingerprint):
        assert mod.__doc__.strip() in DOC, f"docs/FORMAT.md is out of date with {mod.__name__}"
