"""Where edgeadapt's memory goes and where its cold start goes: one fresh process per configuration, step by
step, from an empty interpreter to the first token and on to ten adapters.

    python bench/memory.py                          # SmolLM2-135M int4 (bench/compare.py's cache), every policy
    python bench/memory.py --base OUT --adapter A.gguf --weights fp32 --memory balanced
    python bench/memory.py --llamacpp               # llama.cpp's C API the same way, for the ratio

Each step prints resident memory as Linux counts it (/proc/self/status: VmRSS, its anonymous and
file-backed parts, and the peak VmHWM, which is what bench/compare.py reports) and the wall time the
step took. The prompt is bench/compare.py's first one (69 token ids of a chat, encoded here, so the measured
processes load no tokenizer): which embedding rows a prompt gathers decides how much of the weights file is
mapped (docs/PERFORMANCE.md, "Memory"). Numbers in docs/PERFORMANCE.md ("Memory", "Cold start") come from this
script. edgeadapt's modules are compiled to bytecode first, as an installed package's are (``--no-compile``: the
checkout as it is; see bench/cold_start.py, which also alternates variants of the session options).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "compare_smollm2"


def status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


class Steps:
    """Records (step, seconds, memory) as a fresh process goes."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.t = time.perf_counter()
        self.mark("interpreter")

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.rows.append({"step": step, "s": now - self.t, **status()})
        self.t = time.perf_counter()  # the bookkeeping itself is not timed


def run_edgeadapt(base: str, adapters: list[str], weights: str, memory: str, engine: str, prompt: list[int]) -> list:
    st = Steps()
    import numpy as np  # noqa: F401  (the interpreter's floor before edgeadapt)

    st.mark("import numpy")
    import edgeadapt

    st.mark("import edgeadapt")
    kw = {"memory": memory} if memory else {}
    if engine != "numpy":
        kw["weights"] = weights
    m = edgeadapt.load(base, engine=engine, **kw)
    m.auto_merge_tokens = None
    st.mark(f"load (engine={engine}{', weights=' + weights if engine != 'numpy' else ''}"
            f"{', memory=' + memory if memory else ''})")
    m.add_adapter(adapters[0], name="a")
    st.mark("add_adapter (1: read + verify)")
    m.use("a")
    st.mark("use (live plan; onnxruntime: the slotted session)")
    m.generate_batch([prompt], 1)
    st.mark(f"first token ({len(prompt)}-token prompt)")
    m.generate_batch([prompt], 32)
    st.mark("32 tokens")
    for i, path in enumerate(adapters[1:10]):
        m.add_adapter(path, name=f"x{i}")
    st.mark(f"add_adapter x{len(adapters[1:10])} (10 loaded)")
    m.use({"a": 1.0, "x0": 1.0})
    m.generate_batch([prompt], 8)
    st.mark("two stacked, 8 tokens")
    return st.rows


def run_llamacpp(gguf: str, adapters: list[str], prompt: list[int]) -> list:
    st = Steps()
    import ctypes

    from edgeadapt.benchmark.systems import import_llama_cpp

    llama_cpp = import_llama_cpp()  # EDGEADAPT_LLAMA_EXTRA_BUFTS=0: without extra buffer types (AMX), see there
    st.mark("import llama_cpp")
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    st.mark("Llama(model)")
    ptrs = [llama_cpp.llama_adapter_lora_init(llm._model.model, adapters[0].encode())]
    st.mark("llama_adapter_lora_init (1)")
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(*ptrs)
    llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, (ctypes.c_float * 1)(1.0))
    st.mark("llama_set_adapters_lora")

    def gen(n: int) -> None:
        llm.reset()
        for k, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
            if k + 1 == n:
                break
    gen(1)
    st.mark(f"first token ({len(prompt)}-token prompt)")
    gen(32)
    st.mark("32 tokens")
    for path in adapters[1:10]:
        ptrs.append(llama_cpp.llama_adapter_lora_init(llm._model.model, path.encode()))
    st.mark(f"llama_adapter_lora_init x{len(adapters[1:10])} (10 loaded)")
    return st.rows


def table(title: str, rows: list[dict]) -> str:
    lines = [f"**{title}**", "", "| step | time [s] | RSS [MB] | anon | file | peak (VmHWM) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['s']:.3f} | {r['VmRSS']:.0f} | {r['RssAnon']:.0f} | {r['RssFile']:.0f} | "
                     f"{r['VmHWM']:.0f} |")
    first = next(i for i, r in enumerate(rows) if r["step"].startswith("first token"))
    cold = sum(r["s"] for r in rows[: first + 1])
    lines += ["", f"cold start to the first token: {cold:.2f} s"]
    return "\n".join(lines)


def compare_prompt(base: str) -> list[int]:
    """bench/compare.py's first prompt as the base's chat template encodes it; 69 ids spread over the vocabulary
    when the base has no tokenizer."""
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.runtime.tokenizer import Tokenizer

    sys.path.insert(0, str(HERE))
    from compare import PROMPTS

    man = read_manifest(base)
    path = man.path("tokenizer")
    if path is None or not path.is_file():
        return [(7919 * j) % (man.arch.vocab_size - 100) + 100 for j in range(69)]
    tok = Tokenizer(path, chat_template=man.chat_template, special=man.special_tokens)
    return tok.encode_raw(tok.render_chat([{"role": "user", "content": PROMPTS[0]}]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=str(CACHE / "base"))
    ap.add_argument("--adapter", action="append", help="delta files (default: the ten of bench/compare.py)")
    ap.add_argument("--engine", default="ort")
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--memory", action="append", help="policies to measure (default: low, balanced, fast)")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp's C API on --gguf")
    ap.add_argument("--gguf", default=None, help="the GGUF llama.cpp runs (default: BASE/model.gguf)")
    ap.add_argument("--no-compile", action="store_true", help="leave the checkout's bytecode as it is")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    adapters = a.adapter or [str(CACHE / f"{k}.gguf") for k in "abcdefghij"]
    if a.child:
        cfg = json.loads(a.child)
        prompt = cfg["prompt"]
        rows = (run_llamacpp(cfg["gguf"], adapters, prompt) if cfg["system"] == "llamacpp"
                else run_edgeadapt(a.base, adapters, cfg["weights"], cfg["memory"], cfg["engine"], prompt))
        print("@@rows " + json.dumps(rows))
        return
    if not a.no_compile:
        sys.path.insert(0, str(HERE))
        from cold_start import compile_edgeadapt

        compile_edgeadapt()  # a second launch of an installed package reads its .pyc (see bench/cold_start.py)
    prompt = compare_prompt(a.base)
    configs = [{"system": "edgeadapt", "engine": a.engine, "weights": a.weights, "memory": p, "prompt": prompt}
               for p in (a.memory or ["low", "balanced", "fast"])]
    if a.llamacpp:
        configs.append({"system": "llamacpp", "gguf": a.gguf or str(Path(a.base) / "model.gguf"), "prompt": prompt})
    for cfg in configs:
        argv = [sys.executable, __file__, "--base", a.base, "--child", json.dumps(cfg)]
        for p in adapters:
            argv += ["--adapter", p]
        p = subprocess.run(argv, capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("@@rows ")), None)
        if line is None:
            print(f"{cfg}: failed\n{p.stderr[-2000:]}")
            continue
        title = ("llama.cpp C API" if cfg["system"] == "llamacpp"
                 else f"edgeadapt {cfg['engine']} {cfg['weights']}, memory={cfg['memory']!r}")
        print(table(title, json.loads(line[len("@@rows "):])), "\n", flush=True)


if __name__ == "__main__":
    main()
