"""What one more row costs in a batched int4 decode step: the kernel, and the step with and without adapters.

    python bench/batch_step.py                 # SmolLM2-135M int4 (bench/compare.py's cache), 2 threads
    python bench/batch_step.py --rounds 12 --rows 1,2,4,8,16
    python bench/batch_step.py --layouts chunked,side_by_side --weights int4,fp32   # group slot layouts, alternated

The server's throughput at 8 clients (docs/PERFORMANCE.md, "Serving") is what a decode step of 8 rows costs.
Two measures, each alternated round by round so a slow spell of a shared host falls on every variant:

- ``kernel``: one [576 -> 1536] linear (SmolLM2's gate / up) at M rows: ``MatMulNBits`` as the exported int4
  graphs run it (4-bit blocks of 32, int8 activations: ``accuracy_level`` 4) and a float32 ``MatMul`` of the same
  shape. Per row, a kernel that reuses its unpacked weights across rows gets cheaper as M grows;
- ``step``: one decode step of the base's int4 live graph through the engine, a 40-token cache per row, at n rows:
  ``bare`` (idle slots), ``per-row`` (4 rank-16 LoRAs, row i on adapter i mod 4, each row its own factors: what
  the scheduler binds) and ``shared`` (the four adapters' factors bound once for every row: what a layout that
  reads each distinct adapter once per step could cost at best. Its rows run the SUM of the four, so its numbers
  are for timing only).

``--layouts``: the step measure on SmolLM2-135M exported with each named layout of the group slots (q|k|v, gate|up:
``chunked``, what export-base writes now; ``side_by_side``, what it wrote before; see
``edgeadapt.converters.onnx_graphs.fast._Linears``), each cached as ``base_<layout>`` beside the base, alternated
with each other round by round; ``--weights``: the int4 graph and / or the fp32 live graph.

Writes bench/results/batch_step.md / .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "compare_smollm2"
K, N, BLOCK = 576, 1536, 32


def _kernels(threads: int) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def session(node, inits):
        g = helper.make_graph([node], "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", N])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    q = rng.integers(0, 256, (N, K // BLOCK, BLOCK // 2), dtype=np.uint8)
    d = (rng.random(N * K // BLOCK) * 0.01).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    return {
        "MatMulNBits int4": session(helper.make_node("MatMulNBits", ["x", "q", "d"], ["y"], domain="com.microsoft", K=K,
                                                     N=N, bits=4, block_size=BLOCK, accuracy_level=4),
                                    [numpy_helper.from_array(q, "q"), numpy_helper.from_array(d, "d")]),
        "MatMul fp32": session(helper.make_node("MatMul", ["x", "w"], ["y"]), [numpy_helper.from_array(w, "w")]),
    }


def _kernel_rounds(sessions: dict, ms: list[int], rounds: int, reps: int) -> dict:
    rng = np.random.default_rng(1)
    xs = {m: rng.standard_normal((m, K)).astype(np.float32) for m in ms}
    cells = [(name, m) for name in sessions for m in ms]
    for name, m in cells:
        for _ in range(10):
            sessions[name].run(None, {"x": xs[m]})
    per: dict[tuple, list[float]] = {c: [] for c in cells}
    for r in range(rounds):
        for name, m in cells[r % len(cells):] + cells[:r % len(cells)]:
            s, x = sessions[name], {"x": xs[m]}
            t = time.perf_counter()
            for _ in range(reps):
                s.run(None, x)
            per[(name, m)].append((time.perf_counter() - t) / reps * 1e6)
    return per


def _layout_base(layout: str) -> Path:
    """SmolLM2-135M exported with that group slot layout (cached beside bench/compare.py's base)."""
    from edgeadapt.cli.demo import smollm2_gguf
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.onnx_graphs import fast

    out = CACHE / f"base_{layout}"
    if not (out / "manifest.json").is_file():
        old = fast._Linears.group_b
        fast._Linears.group_b = {"chunked": fast.CHUNKED, "side_by_side": fast.SIDE_BY_SIDE, "block_diagonal": None}[layout]
        try:
            export_base(smollm2_gguf(), out, gguf_type="source", onnx_weights=("fp32", "int4"))
        finally:
            fast._Linears.group_b = old
    return out


def _steps(rows: list[int], rounds: int, steps: int, threads: int, bases: dict[str, Path] | None = None,
           weights: tuple[str, ...] = ("int4",), variants: tuple[str, ...] = ("bare", "per-row", "shared")) -> dict:
    """{(base, weights, variant, rows): [ms per step, one per round]}."""
    import edgeadapt

    state = {}
    for label, base in (bases or {"": CACHE / "base"}).items():
        for w in weights:
            m = edgeadapt.load(base, engine="ort", mode="live", weights=w, threads=threads)
            names = [m.add_adapter(CACHE / f"{n}.gguf", name=n) for n in "abcd"]
            m.generate("hi", max_new_tokens=2, adapters=["a"])  # the live graph, as a server runs it
            eng = m._engine
            one = {n: eng.slot_form(m._live_plan([{n: 1.0}])) for n in names}
            shared = eng.slot_form(m._live_plan([{n: 1.0 for n in names}]))

            def per_row(n: int, one=one) -> dict:
                return {t: tuple(np.concatenate([one[names[i % 4]][t][j] for i in range(n)]) for j in (0, 1))
                        for t in one["a"]}

            plans = {"bare": lambda n: None, "per-row": per_row, "shared": lambda n, s=shared: s}
            for n in rows:
                for v in variants:
                    plan, past = plans[v](n), 40
                    ids = np.full((n, past), 7, np.int64)
                    mask = np.ones((n, past), np.int64)
                    _, cache = eng.forward(ids, mask, np.tile(np.arange(past), (n, 1)), None, plan, last=True)
                    state[(label, w, v, n)] = [eng, plan, cache, past]

    def run(key) -> float:
        eng, plan, cache, past = state[key]
        n = key[-1]
        t = time.perf_counter()
        for _ in range(steps):
            _, cache = eng.forward(np.full((n, 1), 7, np.int64), np.ones((n, past + 1), np.int64),
                                   np.full((n, 1), past, np.int64), cache, plan, last=True)
            past += 1
        state[key][2:] = [cache, past]
        return (time.perf_counter() - t) / steps * 1e3

    cells = list(state)
    per: dict[tuple, list[float]] = {c: [] for c in cells}
    for r in range(rounds):
        for key in cells[r % len(cells):] + cells[:r % len(cells)]:
            per[key].append(run(key))
    return per


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16", help="batch sizes of the step measure")
    ap.add_argument("--m", default="1,2,4,8,16,64", help="rows of the kernel measure")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per round and cell")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layouts", default=None, help="group slot layouts to compare (chunked, side_by_side, "
                    "block_diagonal); then only the step measure runs, bare and per-row")
    ap.add_argument("--weights", default="int4", help="with --layouts: int4 and / or fp32")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if not (CACHE / "base" / "model_int4.onnx").is_file():
        sys.exit(f"{CACHE}: no int4 base; run `python bench/compare.py` once (it exports SmolLM2-135M int4 and the "
                 "four adapters there)")
    rows, ms = [int(x) for x in a.rows.split(",")], [int(x) for x in a.m.split(",")]
    if a.layouts:
        return _layouts(a, rows)
    a.out = a.out or HERE / "results" / "batch_step"
    kern = _kernel_rounds(_kernels(a.threads), ms, a.rounds, 200)
    step = {k[2:]: v for k, v in _steps(rows, a.rounds, a.steps, a.threads).items()}
    kmed = {k: statistics.median(v) for k, v in kern.items()}
    smed = {k: statistics.median(v) for k, v in step.items()}
    kern_rows = [f"| {name} | " + " | ".join(f"{kmed[(name, m)]:.0f} ({kmed[(name, m)] / m:.1f})" for m in ms) + " |"
                 for name in dict.fromkeys(n for n, _ in kmed)]
    step_rows = [f"| {v} | " + " | ".join(f"{smed[(v, n)]:.1f} ({n / smed[(v, n)] * 1e3:.0f})" for n in rows) + " |"
                 for v in dict.fromkeys(v for v, _ in smed)]
    md = "\n".join([
        "# What one more row costs in a batched int4 decode step (bench/batch_step.py)", "",
        f"{platform.processor() or platform.machine()}, {a.threads} threads, onnxruntime "
        f"{__import__('onnxruntime').__version__}; {a.rounds} alternated rounds, medians.", "",
        f"Kernel: one [{K} -> {N}] linear, µs per call (per row):", "",
        "| kernel | " + " | ".join(f"M = {m}" for m in ms) + " |", "|---|" + "---|" * len(ms), *kern_rows, "",
        "Step: SmolLM2-135M int4 live graph, one decode step after 40 cached positions, ms (tokens/s):", "",
        "| adapters | " + " | ".join(f"{n} rows" for n in rows) + " |", "|---|" + "---|" * len(rows), *step_rows, "",
        "`shared` binds the four adapters' factors once for every row, so its rows run their sum: a timing bound for "
        "a layout that reads each distinct adapter once per step, not an answer anyone gets.", ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text(md)
    a.out.with_suffix(".json").write_text(json.dumps({
        "kernel_us": {f"{k[0]} M={k[1]}": v for k, v in kern.items()},
        "step_ms": {f"{k[0]} n={k[1]}": v for k, v in step.items()},
        "rounds": a.rounds, "steps": a.steps, "threads": a.threads}, indent=1))
    print(md)
    return 0


def _layouts(a: argparse.Namespace, rows: list[int]) -> int:
    layouts, weights = a.layouts.split(","), tuple(a.weights.split(","))
    bases = {lay: _layout_base(lay) for lay in layouts}
    step = _steps(rows, a.rounds, a.steps, a.threads, bases, weights, ("bare", "per-row"))
    med = {k: statistics.median(v) for k, v in step.items()}
    first = layouts[0]
    lines = ["# Group slot layouts in a batched decode step (bench/batch_step.py --layouts)", "",
             f"{platform.processor() or platform.machine()}, {a.threads} threads, onnxruntime "
             f"{__import__('onnxruntime').__version__}; SmolLM2-135M live graph, one decode step after 40 cached "
             f"positions, 4 rank-16 LoRAs on every linear layer (row i on adapter i mod 4), {a.rounds} rounds "
             f"alternated over every cell, {a.steps} steps each, medians. ms per step ({first} / other: ×).", "",
             "| weights | adapters | layout | " + " | ".join(f"{n} rows" for n in rows) + " |",
             "|---|---|---|" + "---|" * len(rows)]
    for w in weights:
        for v in ("bare", "per-row"):
            for lay in layouts:
                cells = []
                for n in rows:
                    t = med[(lay, w, v, n)]
                    ratio = med[(lay, w, v, n)] / med[(first, w, v, n)]
                    cells.append(f"{t:.2f}" + ("" if lay == first else f" ({ratio:.3f}×)"))
                lines.append(f"| {w} | {v} | {lay} | " + " | ".join(cells) + " |")
    md = "\n".join(lines + [""])
    out = a.out or HERE / "results" / "slot_layouts"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps({"step_ms": {" ".join(map(str, k)): v for k, v in step.items()},
                                                    "rounds": a.rounds, "steps": a.steps, "threads": a.threads},
                                                   indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
