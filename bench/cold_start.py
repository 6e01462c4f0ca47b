"""Cold start, step by step: fresh processes from an empty interpreter to the first token, variants of the
onnxruntime session options alternated round by round, medians per step.

    python bench/cold_start.py                                  # SmolLM2-135M int4 (bench/compare.py's cache), 5 rounds
    python bench/cold_start.py --llamacpp                       # with llama.cpp's C API alternated, for the gap
    python bench/cold_start.py --variant par=session.prepack.enable_parallel=1 --variant basic=level=basic
    python bench/cold_start.py --memory fast --rounds 9

A variant is NAME=SPEC, SPEC a comma-separated list of onnxruntime session config entries (key=value, added to
the engine's own options in the measured process) and of ``level=basic|extended|all|none`` (the graph
optimization level), ``threads=N`` (intra-op threads); the engine's options as they are run as "default" in every
round. The order of the systems rotates each round. Run it alone on the machine (``flock -x`` in this project):
the figures are wall times of a shared VM.

Steps: ``import numpy``; ``import edgeadapt.runtime.model`` (what ``edgeadapt.load`` imports: the formats, gguf);
``import onnxruntime`` (and the engine's module); ``load`` (manifest, engine; the int4 session is built later, by the first adapter);
``add_adapter`` (read + verify); ``use`` (the slotted session: graph optimization, prepacking; the slot arrays);
``first token`` (a 69-token chat prompt of ids, prefill). llama.cpp: ``import llama_cpp``, ``Llama(model)``,
``llama_adapter_lora_init``, ``llama_set_adapters_lora``, ``first token``.

Bytecode: an installed edgeadapt has its modules compiled to .pyc at install (pip does), so a second launch
reads them. An editable checkout run with PYTHONDONTWRITEBYTECODE=1 compiles edgeadapt's ~30 modules again in
every fresh process (~45 ms here). This script compiles the checkout's modules first (``--no-compile``: leave the
checkout as it is), like an installed package; bench/memory.py does the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "compare_smollm2"


def compile_edgeadapt() -> int:
    """Compile the checkout's edgeadapt modules to __pycache__ (what pip does at install); returns the folders
    compiled. The runtime imports edgeadapt.* from the package folders its import finder names."""
    import compileall
    import importlib.util

    roots = set()
    for name in ("edgeadapt", "edgeadapt.runtime", "edgeadapt.converters"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.update(spec.submodule_search_locations)
    for root in sorted(roots):
        compileall.compile_dir(root, quiet=1)
    return len(roots)


def _hwm() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Steps:
    def __init__(self) -> None:
        self.rows: dict[str, float] = {}
        self.t = time.perf_counter()

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.rows[step] = now - self.t
        self.t = time.perf_counter()  # the bookkeeping itself is not timed


def _wrap_options(spec: str) -> None:
    """The engine's own session options, plus this variant's (in this measuring process only)."""
    if not spec:
        return
    from edgeadapt.runtime.ort_engine import engine as ort_engine

    own = ort_engine.OrtEngine._options

    def options(self):
        so = own(self)
        levels = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                  "all": "ORT_ENABLE_ALL"}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            if key == "level":
                so.graph_optimization_level = getattr(self._ort.GraphOptimizationLevel, levels[value])
            elif key == "threads":
                so.intra_op_num_threads = int(value)
            else:
                so.add_session_config_entry(key, value)
        return so

    ort_engine.OrtEngine._options = options


def run_edgeadapt(base: str, adapter: str, memory: str, spec: str, prompt: list[int]) -> dict:
    st = Steps()
    import numpy  # noqa: F401

    st.mark("import numpy")
    import edgeadapt.runtime.model  # noqa: F401

    st.mark("import edgeadapt.runtime.model")
    import onnxruntime  # noqa: F401

    import edgeadapt.runtime.ort_engine.engine  # noqa: F401

    st.mark("import onnxruntime (+ the ort engine)")
    _wrap_options(spec)
    import edgeadapt

    st.t = time.perf_counter()
    m = edgeadapt.load(base, engine="ort", weights="int4", memory=memory)
    m.auto_merge_tokens = None
    st.mark("load")
    m.add_adapter(adapter, name="a")
    st.mark("add_adapter")
    m.use("a")
    st.mark("use")
    out = m.generate_batch([prompt], 1)
    st.mark("first token")
    return {"steps": st.rows, "peak": _hwm(), "token": out[0][-1]}


def run_llamacpp(gguf: str, adapter: str, prompt: list[int]) -> dict:
    st = Steps()
    import ctypes

    from edgeadapt.benchmark.systems import import_llama_cpp

    llama_cpp = import_llama_cpp()  # EDGEADAPT_LLAMA_EXTRA_BUFTS=0: without extra buffer types (AMX), see there
    st.mark("import llama_cpp")
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    st.mark("Llama(model)")
    ptr = llama_cpp.llama_adapter_lora_init(llm._model.model, adapter.encode())
    st.mark("llama_adapter_lora_init")
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ptr)
    llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
    st.mark("llama_set_adapters_lora")
    token = next(iter(llm.generate(prompt, top_k=1, temp=0.0, reset=True)))
    st.mark("first token")
    return {"steps": st.rows, "peak": _hwm(), "token": int(token)}


def table(name: str, runs: list[dict]) -> str:
    steps = list(runs[0]["steps"])
    lines = [f"**{name}** ({len(runs)} runs; tokens {sorted({r['token'] for r in runs})})", "",
             "| step | median [s] | min | max |", "|---|---|---|---|"]
    for s in steps:
        xs = [r["steps"][s] for r in runs]
        lines.append(f"| {s} | {statistics.median(xs):.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    totals = [sum(r["steps"].values()) for r in runs]
    lines.append(f"| **to the first token** | **{statistics.median(totals):.3f}** | {min(totals):.3f} | "
                 f"{max(totals):.3f} |")
    lines += ["", f"peak RSS (VmHWM) at the first token: {statistics.median(r['peak'] for r in runs):.0f} MB"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=str(CACHE / "base"))
    ap.add_argument("--adapter", default=str(CACHE / "a.gguf"))
    ap.add_argument("--memory", default="balanced")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variant", action="append", default=[], help="NAME=SPEC (see the module's docstring)")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp's C API on --gguf")
    ap.add_argument("--gguf", default=None, help="the GGUF llama.cpp runs (default: BASE/model.gguf)")
    ap.add_argument("--no-compile", action="store_true", help="leave the checkout's bytecode as it is")
    ap.add_argument("--json", default=None, help="also write every run here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        cfg = json.loads(a.child)
        got = (run_llamacpp(cfg["gguf"], cfg["adapter"], cfg["prompt"]) if cfg["system"] == "llamacpp"
               else run_edgeadapt(cfg["base"], cfg["adapter"], cfg["memory"], cfg["spec"], cfg["prompt"]))
        print("@@run " + json.dumps(got))
        return
    if not a.no_compile:
        compile_edgeadapt()
    sys.path.insert(0, str(HERE))
    from memory import compare_prompt

    prompt = compare_prompt(a.base)
    systems: dict[str, dict] = {"default": {"system": "edgeadapt", "spec": ""}}
    for v in a.variant:
        name, _, spec = v.partition("=")
        if not name or not spec or name in systems:
            raise SystemExit(f"--variant {v!r}: expected NAME=SPEC with a new NAME, e.g. par=session.prepack.enable_parallel=1")
        systems[name] = {"system": "edgeadapt", "spec": spec}
    if a.llamacpp:
        gguf = a.gguf or str(Path(a.base) / "model.gguf")
        systems["llama.cpp C API"] = {"system": "llamacpp", "gguf": gguf}
    names = list(systems)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            cfg = {**systems[name], "base": a.base, "adapter": a.adapter, "memory": a.memory, "prompt": prompt}
            p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("@@run ")), None)
            if line is None:
                raise SystemExit(f"{name}: failed\n{p.stderr[-2000:]}")
            runs[name].append(json.loads(line[len("@@run "):]))
    print(f"{a.rounds} rounds, systems alternated (order rotated each round), memory={a.memory!r}, "
          f"bytecode {'as found' if a.no_compile else 'compiled first'}\n")
    for name in names:
        spec = systems[name].get("spec")
        print(table(name + (f" ({spec})" if spec else ""), runs[name]), "\n", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"systems": systems, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
