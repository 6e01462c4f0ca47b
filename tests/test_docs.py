"""docs/FORMAT.md mirrors the format modules' docstrings (the specs live in the code)."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_format_doc_mirrors_the_code():
    spec = importlib.util.spec_from_file_location("build_format", DOCS / "build_format.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (DOCS / "FORMAT.md").read_text() == mod.render(), "docs/FORMAT.md is stale: run python docs/build_format.py"
