"""Spine benchmark on SmolLM2-135M-Instruct: export, load, add_adapter, swap, decode, memory.

    python bench/spine.py                # both engines, results printed and written to bench/results/
    python bench/spine.py --engines ort

Each engine runs in its own process (so peak memory is its own); the engines alternate over
``--rounds`` rounds and medians are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "Where is my invoice? Please explain where I can find it in my account."


def prepare(cache: Path) -> dict:
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.cli.demo import smollm2_gguf
    from edgeadapt.formats.manifest import read_manifest

    base = cache / "base"
    info_path = cache / "export.json"
    current = (base / "manifest.json").is_file() and {"onnx_live", "onnx_int4_base"} <= set(
        json.loads((base / "manifest.json").read_text()).get("files", {}))
    if current and info_path.is_file():
        info = json.loads(info_path.read_text())
    else:  # (re-)export: a cache from an older edgeadapt lacks graphs the benchmarks use
        t = time.perf_counter()
        export_base(smollm2_gguf(), base, gguf_type="F32", onnx_weights=("fp32", "int4"))
        info = {"export_s": time.perf_counter() - t}
        info_path.write_text(json.dumps(info))
    man = read_manifest(base)
    for n in ("billing", "tech"):
        convert_peft(ROOT / "examples" / "adapters" / n, man, cache / f"{n}.gguf", name=n)
    return info


def worker(engine: str, cache: Path, n_new: int, threads: int | None) -> dict:
    import numpy as np

    import edgeadapt

    r: dict = {"engine": engine}
    t = time.perf_counter()
    m = edgeadapt.load(cache / "base", engine=engine, mode="merge", threads=threads)
    r["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    m.add_adapter(cache / "billing.gguf", name="billing")
    r["add_adapter_s"] = time.perf_counter() - t
    m.add_adapter(cache / "tech.gguf", name="tech")
    tok = m.tokenizer
    ids = tok._tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]), add_special_tokens=False).ids

    def decode_tps() -> tuple[float, float]:
        x = np.asarray([ids], np.int64)
        mask, pos = np.ones_like(x), np.arange(len(ids))[None]
        t0 = time.perf_counter()
        logits, past = m._engine.forward(x, mask, pos, None)
        prefill = len(ids) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n_new):
            nxt = np.asarray([[int(logits[0, -1].argmax())]], np.int64)
            pos = pos[:, -1:] + 1
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = m._engine.forward(nxt, mask, pos, past)
        return prefill, n_new / (time.perf_counter() - t0)

    r["prefill_tps_base"], r["decode_tps_base"] = decode_tps()
    swaps = []
    for spec in ("billing", "tech", "billing", None, "tech"):
        t = time.perf_counter()
        m.use(spec)
        swaps.append(time.perf_counter() - t)
    r["swap_merge_s"] = statistics.median(swaps)
    m.use("billing")
    r["prefill_tps_adapter"], r["decode_tps_adapter"] = decode_tps()
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    live = edgeadapt.load(cache / "base", engine=engine, mode="live", threads=threads)
    for n in ("billing", "tech"):
        live.add_adapter(cache / f"{n}.gguf", name=n)
    swaps = []
    for i in range(200):
        t = time.perf_counter()
        live.use(("billing", "tech", None)[i % 3])
        swaps.append(time.perf_counter() - t)
    r["swap_live_s"] = statistics.median(swaps)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="ort,numpy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "smollm2")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--threads", type=int, default=None, help="threads per engine (default: the engine's own)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.cache, a.new_tokens, a.threads)))
        return
    a.cache.mkdir(parents=True, exist_ok=True)
    info = prepare(a.cache)
    engines = a.engines.split(",")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(a.rounds):
        for e in engines:  # alternate, so drift hits every engine alike
            cmd = [sys.executable, __file__, "--worker", e, "--cache", str(a.cache), "--new-tokens", str(a.new_tokens)]
            out = subprocess.run(cmd + (["--threads", str(a.threads)] if a.threads else []),
                                 capture_output=True, text=True, check=True)
            runs[e].append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ["load_s", "add_adapter_s", "swap_merge_s", "swap_live_s", "prefill_tps_base", "decode_tps_base", "prefill_tps_adapter",
            "decode_tps_adapter", "peak_rss_mb"]
    med = {e: {k: statistics.median(r[k] for r in runs[e]) for k in keys} for e in engines}
    import os

    lines = [f"# Spine benchmark: SmolLM2-135M-Instruct (F32 base), rank-8 LoRA on q/k/v/o, {a.rounds} rounds, medians", "",
             f"machine: {os.cpu_count()} cores, threads per engine: {a.threads or 'engine default'}; "
             "decode/prefill with the adapter merged (mode='merge'); swap_live_s: mode='live' use()", "",
             f"export-base (GGUF Q4_1 -> ONNX fp32 + GGUF F32 + manifest): {info['export_s']:.1f} s", "",
             "| figure | " + " | ".join(engines) + (" | numpy / ort |" if set(engines) == {"ort", "numpy"} else " |"),
             "|---|" + "---|" * (len(engines) + (1 if set(engines) == {"ort", "numpy"} else 0))]
    for k in keys:
        row = f"| {k} | " + " | ".join(f"{med[e][k]:.3g}" for e in engines)
        if set(engines) == {"ort", "numpy"}:
            row += f" | {med['numpy'][k] / med['ort'][k]:.2f}×"
        lines.append(row + " |")
    text = "\n".join(lines)
    print(text)
    (HERE / "results" / "spine.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
