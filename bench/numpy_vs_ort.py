"""The numpy engine against the onnxruntime engine on SmolLM2-135M-Instruct.

    python bench/numpy_vs_ort.py                 # all configurations, 3 rounds, table -> bench/results/numpy_vs_ort.md
    python bench/numpy_vs_ort.py --rounds 1 --configs numpy-f32-auto,ort-f32
    python bench/numpy_vs_ort.py --profile numpy-q41-lazy   # cProfile top lines of 32 decode steps

Configurations: onnxruntime on the fp32 ONNX graph (merge mode) and on the graph with LoRA
slots (live mode); numpy on the same weights as an F32 GGUF ("auto" = zero-copy memmap views,
"load" = transposed + fused copies); numpy straight from the original Q4_1 file ("load" =
dequantized once to fp32, "lazy" = 4-bit blocks kept, used at every step); onnxruntime on
model_int4.onnx (the same Q4_1 blocks, adapters live beside them). Each run is its own process (so ``ru_maxrss`` is its own), configurations
alternate inside every round (so drift on a shared machine hits them alike), medians are
reported. One BLAS / intra-op thread by default (``--threads``): on a shared 2-core machine
spinning BLAS threads cost more than they give.

Per run: load, prefill of a 64-token prompt, 32 greedy decode steps with the KV cache — for
the base, then with the billing adapter live through ``forward(lora=)`` (numpy, and onnxruntime's
slotted graph), then merged (``use`` in merge mode). Peak RSS (``ru_maxrss``) is read after each
of the three; ``rss_import`` is the interpreter with numpy, gguf and edgeadapt imported, before
the model is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = ("Where is my invoice? I paid last month, the money left my account, but the portal still shows the "
          "order as unpaid and I got a reminder email this morning.")
PREFILL = 64
CONFIGS = {  # name: (engine, base folder, numpy dequantize mode)
    "ort-f32": ("ort", "base", None),
    "ort-f32-slots": ("ort", "base", "live"),  # model_lora.onnx: the graph with LoRA slot inputs
    "numpy-f32-auto": ("numpy", "base", "auto"),
    "numpy-f32-load": ("numpy", "base", "load"),
    "numpy-q41-load": ("numpy", "base_q41", "load"),
    "numpy-q41-lazy": ("numpy", "base_q41", "lazy"),
    "ort-int4": ("ort", "base_q41", "int4"),  # model_int4.onnx: the same Q4_1 blocks, adapters live
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- setup (host side, once)
def prepare(cache: Path) -> list[int]:
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.cli.demo import smollm2_gguf
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.runtime.tokenizer import Tokenizer

    for folder, kw in (("base", dict(gguf_type="F32")), ("base_q41", dict(gguf_type="source", onnx_weights=("int4",)))):
        if not (cache / folder / "manifest.json").is_file():
            export_base(smollm2_gguf(), cache / folder, **kw)
        man = read_manifest(cache / folder)
        out = cache / f"billing_{folder}.gguf"
        if not out.is_file():
            convert_peft(ROOT / "examples" / "adapters" / "billing", man, out, name="billing")
    man = read_manifest(cache / "base")
    tok = Tokenizer(man.path("tokenizer"), chat_template=man.chat_template, special=man.special_tokens)
    ids = tok._tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]), add_special_tokens=False).ids
    while len(ids) < PREFILL:
        ids = ids + ids
    return ids[-PREFILL:]


# ---------------------------------------------------------------- one run (device side)
def worker(config: str, cache: Path, ids: list[int], n_new: int, threads: int) -> dict:
    import numpy as np

    import edgeadapt  # noqa: F401  (counted in rss_import)
    from edgeadapt.formats.delta import read_delta
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.runtime.numpy_engine.engine import NumpyEngine
    from edgeadapt.runtime.model import Model, load

    engine, folder, mode = CONFIGS[config]
    r: dict = {"config": config, "rss_import": _rss_mb()}
    t = time.perf_counter()
    if engine == "ort":
        m = load(cache / folder, engine="ort", threads=threads, mode="merge" if mode is None else "live",
                 weights="int4" if mode == "int4" else "fp32")
    else:
        man = read_manifest(cache / folder)
        m = Model(man, NumpyEngine(man.path("gguf"), man.arch, dequantize=mode), mode="merge")
    r["load_s"] = time.perf_counter() - t
    eng = m._engine
    x0 = np.asarray([ids], np.int64)

    def run(lora=None) -> tuple[float, float]:
        kw = {} if lora is None else {"lora": lora}
        mask, pos = np.ones_like(x0), np.arange(x0.shape[1])[None]
        t0 = time.perf_counter()
        logits, past = eng.forward(x0, mask, pos, None, **kw)
        prefill = x0.shape[1] / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n_new):
            nxt = np.asarray([[int(logits[0, -1].argmax())]], np.int64)
            pos = pos[:, -1:] + 1
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            logits, past = eng.forward(nxt, mask, pos, past, **kw)
        return prefill, n_new / (time.perf_counter() - t0)

    run()  # warm-up: page in the weights, size the KV buffers
    r["prefill_base"], r["decode_base"] = run()
    r["rss_base"] = _rss_mb()
    billing = cache / f"billing_{folder}.gguf"
    if engine == "numpy" or mode is not None:
        d = read_delta(billing)
        lora = {n: (np.ascontiguousarray(a.T)[None], np.ascontiguousarray(b.T)[None]) for n, (a, b) in d.factors.items()}
        r["prefill_live"], r["decode_live"] = run(lora)
        r["rss_live"] = _rss_mb()
    if m.requested_mode == "merge":
        m.add_adapter(billing, name="billing")
        t = time.perf_counter()
        m.use("billing")
        r["swap_s"] = time.perf_counter() - t
        r["prefill_merged"], r["decode_merged"] = run()
        r["rss_end"] = _rss_mb()
    r["weights_mb"] = (cache / folder / "model.gguf").stat().st_size / 2**20
    return r


def profile(config: str, cache: Path, ids: list[int], n_new: int) -> None:
    import cProfile
    import pstats

    import numpy as np

    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.runtime.numpy_engine.engine import NumpyEngine

    engine, folder, mode = CONFIGS[config]
    man = read_manifest(cache / folder)
    eng = NumpyEngine(man.path("gguf"), man.arch, dequantize=mode)
    x = np.asarray([ids[:8]], np.int64)
    logits, past = eng.forward(x, np.ones_like(x), np.arange(8)[None])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(n_new):
        logits, past = eng.forward(np.asarray([[int(logits[0, -1].argmax())]]), np.ones((1, 9 + i), np.int64),
                                   np.asarray([[8 + i]]), past)
    prof.disable()
    print(f"{config}: {n_new / (time.perf_counter() - t0):.1f} tok/s under the profiler")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


# ---------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "numpy_vs_ort")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--ids", default=None)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.cache, json.loads(a.ids), a.new_tokens, a.threads)))
        return
    a.cache.mkdir(parents=True, exist_ok=True)
    if a.prepare:
        print(json.dumps(prepare(a.cache)))
        return
    # the exports (torch, transformers) run in a child too: on Linux ru_maxrss survives fork + exec,
    # so a big driver would set every worker's peak from the start
    out = subprocess.run([sys.executable, __file__, "--prepare", "--cache", str(a.cache)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"export failed:\n{out.stderr}")
    ids = json.loads(out.stdout.strip().splitlines()[-1])
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    if a.profile:
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import numpy_vs_ort as b; "
                        f"b.profile({a.profile!r}, b.Path({str(a.cache)!r}), {ids!r}, {a.new_tokens})"], env=env, check=True)
        return
    configs = a.configs.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for rnd in range(a.rounds):
        for c in configs:  # alternate, so drift hits every configuration alike
            out = subprocess.run([sys.executable, __file__, "--worker", c, "--cache", str(a.cache), "--ids", json.dumps(ids),
                                  "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{c} failed:\n{out.stderr}")
            runs[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {rnd + 1}/{a.rounds} {c}: decode {runs[c][-1]['decode_base']:.1f} tok/s", file=sys.stderr)
    keys = ["weights_mb", "load_s", "prefill_base", "decode_base", "prefill_live", "decode_live", "swap_s",
            "prefill_merged", "decode_merged", "rss_import", "rss_base", "rss_live", "rss_end"]
    label = {"weights_mb": "model.gguf (MiB)", "load_s": "load (s)", "prefill_base": f"prefill {PREFILL} tok, base (tok/s)",
             "decode_base": f"decode, base (tok/s)", "swap_s": "use('billing') merge (s)",
             "prefill_merged": "prefill, billing merged (tok/s)", "decode_merged": "decode, billing merged (tok/s)",
             "prefill_live": "prefill, billing live lora= (tok/s)", "decode_live": "decode, billing live lora= (tok/s)",
             "rss_import": "RSS after imports (MiB)", "rss_base": "peak RSS after the base runs (MiB)",
             "rss_live": "peak RSS after the live runs (MiB)", "rss_end": "peak RSS after the merge (MiB)"}
    med = {c: {k: statistics.median(r[k] for r in runs[c]) if k in runs[c][0] else None for k in keys} for c in configs}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "numpy_vs_ort.json").write_text(json.dumps(runs, indent=1))
    lines = [f"# numpy engine vs onnxruntime engine: SmolLM2-135M-Instruct, {a.rounds} rounds, medians",
             "", f"{a.threads} thread(s); prefill {PREFILL} tokens; decode {a.new_tokens} greedy steps with the KV cache; "
             "billing = rank-8 LoRA on q/k/v/o of all 30 layers. F32 = the Q4_1 file dequantized once at export "
             "(ONNX fp32 + GGUF F32, same numbers); Q4_1 = the original file's blocks.", "",
             "| | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for k in keys:
        lines.append(f"| {label[k]} | " + " | ".join("–" if med[c][k] is None else f"{med[c][k]:.3g}" for c in configs) + " |")
    def ratio(k: str, ref: str, c: str) -> str:  # median over rounds of the ratio within a round (drift cancels)
        if k not in runs[c][0] or k not in runs[ref][0]:
            return "–"
        return f"{statistics.median(x[k] / y[k] for x, y in zip(runs[c], runs[ref])):.2f}×"

    for k, ref in (("decode_base", "ort-f32"), ("decode_merged", "ort-f32"), ("decode_live", "ort-f32-slots"),
                   ("decode_base", "ort-int4"), ("decode_live", "ort-int4"), ("prefill_base", "ort-f32")):
        if ref in configs:
            lines.append(f"| {label[k].split(' (')[0]}, ÷ {ref} (per-round ratio) | "
                         + " | ".join(ratio(k, ref, c) for c in configs) + " |")
    text = "\n".join(lines)
    print(text)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "numpy_vs_ort.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
