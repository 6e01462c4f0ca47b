"""Requests arriving while a batch runs: the batch changed in place against a new cache per arrival.

    python bench/arrivals.py                   # SmolLM2-135M int4 (bench/compare.py's cache), 8 clients, 8 runs
    python bench/arrivals.py --clients 16 --runs 12 --weights fp32

C threads in this process, each sending R requests one after another through ``generate_ids`` (64 new tokens at
most, greedy), client i on adapter i mod 4 (bench/compare.py's rank-16 LoRAs on every linear layer) — what a
server's clients do, without HTTP. Two ways of changing the batch when rows join or leave, alternated run by run:

- ``in place``: what the scheduler does on onnxruntime — a new row's keys go into the slot of a row that left
  (or after the last), a slot left empty takes the last row (docs/SERVING.md, "KV cache");
- ``rebuild``: the batch made again for every change, every running row's keys copied into a new cache (how
  every change went before, and how it still goes on the numpy engine).

Both give every request the same tokens (checked). Per run: aggregate tokens/s, and the seconds spent changing
the batch (``Scheduler._update``). Writes bench/results/arrivals.md / .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "compare_smollm2"
PROMPTS = ["Where is my invoice? I paid last week but the account page still shows it as due.",
           "My app keeps crashing when I open the settings page.", "How do I reset my password?",
           "Explain photosynthesis briefly.", "Write a haiku about the sea.", "What is the capital of France?"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    ap.add_argument("--runs", type=int, default=8, help="runs per way, alternated")
    ap.add_argument("--weights", default="int4", choices=["int4", "fp32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "arrivals")
    a = ap.parse_args(argv)
    if not (CACHE / "base" / "manifest.json").is_file():
        sys.exit(f"{CACHE}: no base; run `python bench/compare.py` once (it exports SmolLM2-135M and the adapters)")
    import edgeadapt
    from edgeadapt.runtime.scheduler import Scheduler, scheduler_of

    m = edgeadapt.load(CACHE / "base", engine="ort", mode="live", weights=a.weights, threads=a.threads)
    names = [m.add_adapter(CACHE / f"{n}.gguf", name=n) for n in "abcd"]
    prompts = [m.tokenizer.encode(p) for p in PROMPTS]
    m.generate_ids(prompts[0], 4, adapter="a")
    sched = scheduler_of(m)
    in_place, update = Scheduler._in_place, Scheduler._update
    spent = [0.0]

    def timed_update(self, joins):
        t = time.perf_counter()
        try:
            return update(self, joins)
        finally:
            spent[0] += time.perf_counter() - t
    Scheduler._update = timed_update
    ways = {"in place": in_place, "rebuild": lambda self, keep, new: False}

    def run(way: str) -> tuple[float, float, dict]:
        Scheduler._in_place = ways[way]
        out: dict = {}

        def client(i: int) -> None:
            for j in range(a.requests):
                out[i, j] = m.generate_ids(prompts[(i + j) % len(prompts)], 64, adapter=names[i % 4])
        spent[0] = 0.0
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        return sum(len(v) for v in out.values()) / wall, spent[0], out

    per: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    answers: dict[str, dict] = {}
    joined0, rebuilds0 = sched.joined, sched.rebuilds
    for r in range(a.runs):
        for way in list(ways)[r % 2:] + list(ways)[:r % 2]:
            tps, upd, out = run(way)
            per[way].append((tps, upd))
            if answers.setdefault(way, out) != out:
                sys.exit(f"{way}: run {r} gave other tokens than its first run")
    Scheduler._in_place, Scheduler._update = in_place, update
    same = answers["in place"] == answers["rebuild"]
    med = {w: (statistics.median(t for t, _ in v), statistics.median(u for _, u in v)) for w, v in per.items()}
    rows = [f"| {w} | {med[w][0]:.1f} | {min(t for t, _ in per[w]):.1f}–{max(t for t, _ in per[w]):.1f} | "
            f"{med[w][1]:.3f} |" for w in ways]
    md = "\n".join([
        "# Requests arriving while a batch runs (bench/arrivals.py)", "",
        f"SmolLM2-135M {a.weights} on onnxruntime {__import__('onnxruntime').__version__}, {a.threads} threads, "
        f"{platform.processor() or platform.machine()}; {a.clients} clients × {a.requests} requests of up to 64 "
        f"tokens over 4 adapters, in process; {a.runs} runs per way, alternated, medians.", "",
        "| batch changes | tokens/s | range | s changing the batch per run |", "|---|---|---|---|", *rows, "",
        f"- in place vs rebuild: {med['in place'][0] / med['rebuild'][0]:.2f}× tokens/s; every request's tokens "
        f"the same both ways: {'yes' if same else 'NO'}.",
        f"- over all runs: {sched.joined - joined0} rows joined in place, {sched.rebuilds - rebuilds0} caches made "
        "(the rebuild runs', and the in-place runs' where a second row found one alone on its prefill's cache).", ""])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".md").write_text(md)
    a.out.with_suffix(".json").write_text(json.dumps({"runs": per, "same_tokens": same, "clients": a.clients,
                                                      "requests": a.requests, "weights": a.weights}, indent=1))
    print(md)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
