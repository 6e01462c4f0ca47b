"""Where an int4 decode step goes on onnxruntime: the exported graph against variants of it, alternated.

    python bench/decode_ops.py                 # SmolLM2-135M int4 (bench/compare.py's cache), 40 rounds
    python bench/decode_ops.py --rounds 80 --threads 1

The variants are the same graph file edited in memory, run on onnxruntime with the engine's session options
(``balanced``), one decode step (one token, a cache of ``--past`` positions) timed many times per round:

- ``exported``: the int4 graph the runtime runs for the bare base (``model_int4_base.onnx``);
- ``no Q4_1 minimum``: every linear without its ``blocksum(x) @ offsets`` term (Reshape, ReduceSum, MatMul, Add).
  Its numbers are WRONG — it is there to time what exact Q4_1 costs with onnxruntime's operators, because
  ``MatMulNBits`` takes a per-block minimum only as a float zero point, which it runs ~70x slower;
- ``rotary in attention``: q|k|v passed packed to GroupQueryAttention with ``do_rotary=1`` instead of a Split and
  two RotaryEmbedding nodes (its logits are compared with the exported graph's and the difference printed).

Then, on the exported session alone, its logits written into one kept buffer (what the engine does) against a
fresh array bound each step (what it did before): under ``memory="balanced"``'s mmap threshold, which this script
sets as ``edgeadapt.load`` does, each new 196 KB array is mapped and faulted in page by page.

Writes bench/results/decode_ops.md / .json. The figures are ratios within one run: the variants alternate
round by round on the same machine, so a slow or noisy host moves all of them together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BASE = HERE / ".cache" / "compare_smollm2" / "base"


def _without_minimum(model) -> int:
    """Drop every ``Add(MatMulNBits, MatMul(blocksum, *.offsets))`` second term; returns how many."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    n_cut = 0
    for n in g.node:
        if n.op_type == "Add" and len(n.input) == 2:
            b = prod.get(n.input[1])
            if b is not None and b.op_type == "MatMul" and b.input[1].endswith(".offsets"):
                n.op_type = "Identity"
                del n.input[1]
                n_cut += 1
    _drop_dead(g)
    return n_cut


def _rotary_in_attention(model) -> int:
    """Split -> RotaryEmbedding(q), RotaryEmbedding(k) -> GroupQueryAttention becomes GroupQueryAttention on
    the packed q|k|v with do_rotary=1 and the same cos / sin tables; returns how many layers matched."""
    from onnx import helper

    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    n_done = 0
    for n in g.node:
        if n.op_type != "GroupQueryAttention":
            continue
        q, k, v = (prod.get(i) for i in n.input[:3])
        if not (q is not None and k is not None and v is not None and q.op_type == k.op_type == "RotaryEmbedding"
                and v.op_type == "Split" and prod.get(q.input[0]) is v and prod.get(k.input[0]) is v):
            continue
        ins = list(n.input) + [""] * max(0, 9 - len(n.input))
        ins[0], ins[1], ins[2], ins[7], ins[8] = v.input[0], "", "", q.input[2], q.input[3]
        del n.input[:]
        n.input.extend(ins)
        interleaved = next((a.i for a in q.attribute if a.name == "interleaved"), 0)
        for a in n.attribute:
            if a.name == "do_rotary":
                a.i = 1
        n.attribute.append(helper.make_attribute("rotary_interleaved", interleaved))
        n_done += 1
    _drop_dead(g)
    return n_done


def _drop_dead(g) -> None:
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            return
        del g.node[:]
        g.node.extend(keep)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.enable_cpu_mem_arena, so.enable_mem_pattern = True, False  # the engine's "balanced"
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess, cfg: dict, past: int, seq: int, rng) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    f = {"input_ids": rng.integers(0, cfg["vocab"], (1, seq)).astype(np.int64),
         "attention_mask": np.ones((1, past + seq), np.int64),
         "position_ids": np.arange(past, past + seq, dtype=np.int64)[None],
         "logits.from": np.array([0], np.int64),
         "embed.rows": (rng.standard_normal((1, seq, cfg["dim"])) * 0.05).astype(np.float32)}
    for i in sess.get_inputs():
        if i.name.startswith("past."):
            f[i.name] = (rng.standard_normal((1, cfg["kv_heads"], past, cfg["head_dim"])) * 0.5).astype(np.float32)
    return {k: v for k, v in f.items() if k in names}


def _bound(sess, feeds: dict[str, np.ndarray], past: int, fresh: bool = False):
    """One decode step as the engine runs it: the cache bound as both past and present (GroupQueryAttention
    writes the new position in place), the logits into a preallocated array (``fresh``: a new array bound each
    step, as the engine did before its decode steps kept one)."""
    import onnxruntime as ort

    io = sess.io_binding()
    keep = []
    for name, arr in feeds.items():
        if name.startswith("past."):
            b, h, _, d = arr.shape
            buf = np.zeros((b, h, past + 64, d), np.float32)
            buf[:, :, :past] = arr
            v = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(name, v)
            io.bind_ortvalue_output(name.replace("past.", "present.", 1), v)
            keep += [buf, v]
        else:
            io.bind_cpu_input(name, arr)
    out = sess.get_outputs()[0]
    logits = np.empty((1, 1, out.shape[-1] if isinstance(out.shape[-1], int) else 49152), np.float32)
    io.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(logits))

    def run() -> None:
        if fresh:
            run.keep = (keep, np.empty_like(logits))  # type: ignore[attr-defined]
            io.bind_ortvalue_output(out.name, ort.OrtValue.ortvalue_from_numpy(run.keep[1]))  # type: ignore
        sess.run_with_iobinding(io)  # the same position rewritten each time: the cost of one step
    run.keep = (keep, logits)  # type: ignore[attr-defined]
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, default=BASE, help="an exported base folder with int4 graphs")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per round and variant: short rounds, so a slow spell of a shared host falls on every variant")
    ap.add_argument("--past", type=int, default=64, help="cached positions before the timed step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "decode_ops")
    a = ap.parse_args(argv)
    import onnx

    from edgeadapt.runtime.ort_engine.memory import return_large_buffers

    return_large_buffers()  # glibc's mmap threshold as edgeadapt.load sets it (memory="balanced", the default)

    graph = a.base / "model_int4_base.onnx"
    if not graph.is_file():
        sys.exit(f"{graph}: not found; run `python bench/compare.py` once (it exports SmolLM2-135M int4 there) "
                 "or pass --base FOLDER (an `edgeadapt export-base ... --onnx-weights int4` folder)")
    manifest = json.loads((a.base / "manifest.json").read_text())
    arch = manifest.get("config") or manifest.get("arch") or {}
    cfg = {"vocab": arch.get("vocab_size", 49152), "dim": arch.get("dim", 576),
           "kv_heads": arch.get("n_kv_heads", 3), "head_dim": arch.get("head_dim", 64)}

    variants, counts = {}, {}
    with tempfile.TemporaryDirectory(dir=a.base.parent) as tmp:  # beside the base: data files hard-linked
        tmp = Path(tmp)
        for f in a.base.glob("*.onnx.data"):  # onnxruntime follows no link out of the graph's folder
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copyfile(f, tmp / f.name)
        for name, edit in (("exported", None), ("no Q4_1 minimum", _without_minimum),
                           ("rotary in attention", _rotary_in_attention)):
            m = onnx.load(str(graph), load_external_data=False)
            counts[name] = edit(m) if edit else 0
            if edit and not counts[name]:
                continue  # nothing of that shape in this graph
            path = tmp / f"{len(variants)}.onnx"
            onnx.save(m, str(path))
            variants[name] = _session(path, a.threads)

        rng = np.random.default_rng(0)
        ref = variants["exported"]
        prefill = _feeds(ref, cfg, 0, 12, rng)
        want = ref.run(["logits"], prefill)[0]
        diffs = {n: float(np.abs(s.run(["logits"], prefill)[0] - want).max()) for n, s in variants.items()}
        step = _feeds(ref, cfg, a.past, 1, rng)
        runs = {n: _bound(s, step, a.past) for n, s in variants.items()}
        for run in runs.values():
            for _ in range(10):
                run()
        per: dict[str, list[float]] = {n: [] for n in variants}
        order = list(variants)
        for r in range(a.rounds):
            for n in order[r % len(order):] + order[:r % len(order)]:  # who goes first rotates
                run = runs[n]
                t = time.perf_counter()
                for _ in range(a.steps):
                    run()
                per[n].append(a.steps / (time.perf_counter() - t))
        # the logits buffer: the exported session both ways, alternated (a second session would differ by where its
        # packed weights landed, which moves a step more than this does on a shared host)
        pair = {"kept": runs["exported"], "fresh": _bound(ref, step, a.past, fresh=True)}
        logits_buf: dict[str, list[float]] = {n: [] for n in pair}
        for r in range(a.rounds):
            for n in (("kept", "fresh") if r % 2 else ("fresh", "kept")):
                t = time.perf_counter()
                for _ in range(a.steps):
                    pair[n]()
                logits_buf[n].append(a.steps / (time.perf_counter() - t))

    med = {n: statistics.median(v) for n, v in per.items()}
    kb, fb = statistics.median(logits_buf["kept"]), statistics.median(logits_buf["fresh"])
    rows = [f"| {n} | {counts[n] or '—'} | {med[n]:.0f} | {min(per[n]):.0f}–{max(per[n]):.0f} | "
            f"{med[n] / med['exported']:.2f}× | {diffs[n]:.3g} |" for n in variants]
    md = "\n".join([
        "# Where an int4 decode step goes (bench/decode_ops.py)", "",
        f"{a.base.name}: `{graph.name}`, one token after {a.past} cached positions, {a.threads} threads, "
        f"{a.rounds} alternated rounds of {a.steps} steps, medians. {platform.processor() or platform.machine()}, "
        f"onnxruntime {__import__('onnxruntime').__version__}.", "",
        "| variant | nodes edited | steps/s | range | vs exported | max logit difference (12-token prefill) |",
        "|---|---|---|---|---|---|", *rows, "",
        "`no Q4_1 minimum` computes wrong logits on purpose (the difference column): it times the exact Q4_1 "
        "term, not a graph anyone runs.", "",
        "The logits of a step, on the exported session, alternated: into one kept buffer (the engine now) "
        f"{kb:.0f} steps/s ({min(logits_buf['kept']):.0f}–{max(logits_buf['kept']):.0f}), into a fresh array bound "
        f"each step (before) {fb:.0f} ({min(logits_buf['fresh']):.0f}–{max(logits_buf['fresh']):.0f}): "
        f"{kb / fb:.2f}×, with glibc's mmap threshold as `edgeadapt.load` sets it.", ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text(md)
    a.out.with_suffix(".json").write_text(json.dumps({"rounds": per, "median": med, "edited": counts,
                                                      "max_logit_diff": diffs, "past": a.past,
                                                      "logits_buffer": logits_buf,
                                                      "threads": a.threads, "steps": a.steps}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
