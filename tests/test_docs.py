"""docs/FORMAT.md mirrors the format modules' docstrings (the specs live in the code)."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_format_doc_mirrors_the_code():
    spec = importlib.util.spec_from_file_location("build_format", DOCS / "build_format.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (DOCS / "FORMAT.md").read_text() == mod.render(), "docs/FORMAT.md is stale: run python docs/build_format.py"


def test_readme_kinds_table_lists_the_kind_tests():
    """README's kinds × engines table is generated from the tests that exist (python docs/build_kinds.py)."""
    spec = importlib.util.spec_from_file_location("build_kinds", DOCS / "build_kinds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (DOCS.parent / "README.md").read_text()
    assert mod.current(readme) == mod.block(mod.render(mod.collect())), \
        "README.md's kinds table is stale: run python docs/build_kinds.py"
