"""The folder list is the architecture (docs/ARCHITECTURE.md), and the imports keep to it.

Every module's imports are read from its source (ast; imports inside functions count too), resolved to the
project's modules, and checked against the rule of its room: which rooms it may import, which libraries a
device module may never import (torch, transformers, onnx, …) or only inside the function that needs them,
and what the command line imports at module level. No module reaches itself round a circle, no room holds
more than ~12 modules, and the one exception — a module found by name in a registry table — is used only by
the registries listed here. The checker also runs on made-up trees with wrong imports, to show it fails.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject's package-dir)
ROOTS = {"edgeadapt": "edgeadapt", "converters": "edgeadapt.converters", "runtime": "edgeadapt.runtime"}

# ---- the rules (docs/ARCHITECTURE.md says the same in words)
ROOMS = {"edgeadapt": "api", "edgeadapt.errors": "errors", "edgeadapt.formats": "formats", "edgeadapt.kinds": "kinds",
         "edgeadapt.ship": "ship", "edgeadapt.runtime": "runtime", "edgeadapt.converters": "converters",
         "edgeadapt.serve": "serve", "edgeadapt.cli": "cli", "edgeadapt.benchmark": "benchmark"}
DEVICE = {"api", "errors", "formats", "kinds", "ship", "runtime", "serve"}
MAY_IMPORT = {  # room -> the other rooms it may import (its own always)
    "errors": set(),
    "formats": {"errors"},
    "kinds": {"errors", "formats"},
    "ship": {"errors", "formats"},
    "runtime": {"errors", "formats", "kinds", "ship"},
    "api": {"errors", "formats", "runtime"},
    "serve": {"api", "errors", "formats", "kinds", "ship", "runtime"},
    "converters": {"api", "errors", "formats", "kinds", "ship", "runtime"},
    "benchmark": {"api", "errors", "formats", "kinds", "ship", "runtime", "serve", "converters"},
    "cli": {"api", "errors", "formats", "kinds", "ship", "runtime", "serve", "converters", "benchmark"},
}
HOST_ONLY = {"torch", "transformers", "peft", "onnx", "onnxscript", "safetensors", "accelerate", "matplotlib",
             "llama_cpp", "onnxruntime_genai", "pickle", "click"}  # never in a device module
MODULE_LEVEL_OK = {"numpy", "gguf"}  # the device's only libraries at module level; others inside functions
CLI_MODULE_LEVEL = {"click", "edgeadapt.cli", "edgeadapt.errors"}  # + the standard library
REGISTRIES = {"edgeadapt.formats.delta_kinds": "KIND_MODULES", "edgeadapt.runtime.engines": "ENGINE_CLASSES",
              "edgeadapt.cli.core": "_COMMAND_MODULES"}  # the only modules that import by name
MAX_ROOM = 12


# ---- the checker
def modules(top: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under the source folders of ``ROOTS``."""
    out = {}
    for folder, pkg in ROOTS.items():
        for path in sorted((top / folder).rglob("*.py")):
            rel = path.relative_to(top / folder).with_suffix("").parts
            rel = rel[:-1] if rel[-1] == "__init__" else rel
            out[".".join((pkg,) + rel)] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported name, at module level?, line) of every import in a module, relative ones made absolute."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.extend([(base, top, child.lineno)] + [(f"{base}.{a.name}", top, child.lineno) for a in child.names])
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def graph(mods: dict[str, Path]) -> tuple[dict[str, dict[str, tuple[bool, int]]], dict[str, dict[str, tuple[bool, int]]]]:
    """(project edges {module: {module: (module level?, line)}}, outside imports {module: {top name: …}})."""
    edges: dict[str, dict[str, tuple[bool, int]]] = {m: {} for m in mods}
    outside: dict[str, dict[str, tuple[bool, int]]] = {m: {} for m in mods}
    for name, path in mods.items():
        for target, top, line in imports(name, path):
            t = target
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t:
                if t != name and not t.startswith(name + "."):  # a package importing its own parts is no edge
                    old = edges[name].get(t)
                    edges[name][t] = (top or bool(old and old[0]), line if old is None or top else old[1])
            elif not target.startswith("edgeadapt"):
                root = target.split(".")[0]
                old = outside[name].get(root)
                outside[name][root] = (top or bool(old and old[0]), line if old is None or top else old[1])
    return edges, outside


def room(module: str) -> str:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in ROOMS:
            return ROOMS[".".join(parts[:k])]
    return "?"


def circles(edges: dict[str, dict[str, tuple[bool, int]]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def problems(top: Path) -> list[str]:
    """Every way the tree under ``top`` breaks the rules, one line each ([] when it keeps them)."""
    mods = modules(top)
    edges, outside = graph(mods)
    stdlib = set(sys.stdlib_module_names)
    found = []
    for m in sorted(mods):
        r = room(m)
        where = f"{mods[m].relative_to(top)}"
        for t, (at_top, line) in sorted(edges[m].items()):
            if room(t) != r and room(t) not in MAY_IMPORT.get(r, set()):
                found.append(f"{where}:{line}: {r} imports {room(t)} ({t}); {r} may import {sorted(MAY_IMPORT.get(r, ()))}")
            if r == "cli" and at_top and not any(t == p or t.startswith(p + ".") for p in CLI_MODULE_LEVEL):
                found.append(f"{where}:{line}: the command line imports {t} at module level; import it in the command")
        for lib, (at_top, line) in sorted(outside[m].items()):
            if r in DEVICE and lib in HOST_ONLY:
                found.append(f"{where}:{line}: a device module ({r}) imports {lib}")
            elif r in DEVICE and at_top and lib not in stdlib and lib not in MODULE_LEVEL_OK:
                heavy_users = [u for u in mods if edges[u].get(m, (False,))[0]]
                if heavy_users:  # a module that needs an optional library is itself imported only when needed
                    found.append(f"{where}:{line}: imports {lib} at module level and is imported at module level by "
                                 f"{', '.join(sorted(heavy_users))}; import one of them inside the function that needs it")
            if r == "cli" and at_top and lib not in stdlib and lib != "click":
                found.append(f"{where}:{line}: the command line imports {lib} at module level; import it in the command")
        text = mods[m].read_text(encoding="utf-8")
        if ("import_module(" in text or "__import__(" in text) and m not in REGISTRIES:
            found.append(f"{where}: imports by name, which only the registries {sorted(REGISTRIES)} do")
    for group in circles(edges):
        found.append(f"import circle: {' <-> '.join(group)}")
    folders: dict[Path, int] = {}
    for path in mods.values():
        if path.name != "__init__.py":
            folders[path.parent] = folders.get(path.parent, 0) + 1
    found += [f"{p.relative_to(top)}/ holds {n} modules (at most {MAX_ROOM}): split it into rooms"
              for p, n in sorted(folders.items()) if n > MAX_ROOM]
    return found


# ---- the project
def test_the_project_keeps_its_import_rules():
    assert problems(REPO) == []


def test_registries_name_modules_that_exist():
    """The exception: a registry table names modules (``module`` or ``module:Class``) imported on first use."""
    mods = modules(REPO)
    for reg, table in REGISTRIES.items():
        tree = ast.parse(mods[reg].read_text(encoding="utf-8"))
        values = [n.value for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                  and any(isinstance(t, ast.Name) and t.id == table for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets))]
        assert len(values) == 1, f"{reg}: no table {table}"
        names = [c.value for c in ast.walk(values[0]) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                 and c.value.startswith("edgeadapt.")]
        assert names, f"{reg}.{table} names no module"
        missing = [n for n in names if n.partition(":")[0] not in mods]
        assert not missing, f"{reg}.{table} names modules that do not exist: {missing}"


def test_the_device_import_stays_light():
    """Importing the runtime's entry points pulls in no converter, no onnx / torch, and not onnxruntime until a
    session is built (a fresh interpreter, so nothing else imported them first)."""
    import subprocess

    code = ("import sys, edgeadapt, edgeadapt.runtime.model, edgeadapt.formats.delta; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'onnx', 'peft', "
            "'onnxruntime', 'tokenizers', 'cryptography'} or m.startswith(('edgeadapt.converters', 'edgeadapt.cli', "
            "'edgeadapt.benchmark'))); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the checker fails where it should
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    base = {"edgeadapt/__init__.py": "", "edgeadapt/errors.py": "", "edgeadapt/formats/__init__.py": "",
            "edgeadapt/kinds/__init__.py": "", "edgeadapt/cli/__init__.py": "", "runtime/__init__.py": "",
            "converters/__init__.py": ""}
    for rel, text in {**base, **files}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_a_clean_made_up_tree_passes(tmp_path):
    top = _tree(tmp_path, {
        "edgeadapt/formats/delta.py": "import numpy\nfrom edgeadapt.errors import *\n",
        "runtime/model.py": "from edgeadapt.formats import delta\n\ndef load():\n    import onnxruntime\n",
        "converters/merge.py": "import torch\nfrom edgeadapt.runtime.model import load\n",
        "edgeadapt/cli/core.py": "import click\n\ndef cmd():\n    from edgeadapt.converters import merge\n"})
    assert problems(top) == []


@pytest.mark.parametrize("files, expected", [
    ({"edgeadapt/formats/delta.py": "def f():\n    from edgeadapt.runtime import model\n",  # lazily, still wrong
      "runtime/model.py": ""}, ["formats imports runtime (edgeadapt.runtime.model)"]),
    ({"runtime/model.py": "from ..converters import merge\n", "converters/merge.py": ""},
     ["runtime imports converters (edgeadapt.converters.merge)"]),
    ({"runtime/model.py": "def f():\n    import torch.nn\n"}, ["a device module (runtime) imports torch"]),
    ({"edgeadapt/formats/a.py": "from edgeadapt.formats import b\n",
      "edgeadapt/formats/b.py": "def f():\n    from . import a\n"},
     ["import circle: edgeadapt.formats.a <-> edgeadapt.formats.b"]),
    ({"runtime/ort_engine/engine.py": "import onnxruntime\n", "runtime/model.py": "from edgeadapt.runtime.ort_engine import engine\n"},
     ["imports onnxruntime at module level and is imported at module level by edgeadapt.runtime.model"]),
    ({"edgeadapt/cli/core.py": "import click\nfrom edgeadapt.converters import merge\n", "converters/merge.py": ""},
     ["the command line imports edgeadapt.converters.merge at module level"]),
    ({"runtime/model.py": "import importlib\nimportlib.import_module('edgeadapt.converters.merge')\n"},
     ["imports by name, which only the registries"]),
    ({f"runtime/m{i}.py": "" for i in range(MAX_ROOM + 1)}, [f"runtime/ holds {MAX_ROOM + 1} modules"]),
])
def test_the_checker_flags_a_wrong_tree(tmp_path, files, expected):
    found = problems(_tree(tmp_path, files))
    for e in expected:
        assert any(e in p for p in found), (e, found)


def test_an_injected_wrong_edge_in_the_real_graph_is_flagged():
    """The real graph plus the edge back from the device to the host (the model importing the graph builders,
    which import the runtime's model in this made-up case too): a boundary crossed the wrong way, and a circle."""
    edges, _ = graph(modules(REPO))
    model, builder = "edgeadapt.runtime.model", "edgeadapt.converters.onnx_graphs.graph"
    assert circles(edges) == [] and model in edges and builder in edges
    edges[builder][model] = (False, 1)  # converters may import the runtime: alone, no problem
    edges[model][builder] = (False, 1)  # the runtime may not import converters
    assert room(builder) not in MAY_IMPORT[room(model)]
    assert any(model in g and builder in g for g in circles(edges))


def test_the_rooms_table_lists_every_module():
    """docs/ARCHITECTURE.md's table of rooms names each folder's modules: every module there, no other."""
    import re

    rows = re.findall(r"^\| `([a-z_/]+/)` \| ([^|]+) \|", (REPO / "docs" / "ARCHITECTURE.md").read_text(), re.M)
    assert len(rows) >= 10
    for folder, listed in rows:
        have = {p.stem for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        assert set(re.findall(r"[a-z_][a-z0-9_]*", listed)) == have, folder

