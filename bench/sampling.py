"""What choosing a token costs: the runtime's sampler against the same definition written the direct way.

    python bench/sampling.py                 # SmolLM2's vocabulary (49,152), one row, 9 alternated rounds
    python bench/sampling.py --vocab 151936  # Qwen's
    python bench/sampling.py --requests 8    # + 8 concurrent sampled requests through the scheduler (SmolLM2 int4)

The direct way (``tests/test_sampling.py``'s ``reference``, which the runtime's sampler draws the same tokens as):
a float64 copy, a full argsort for top_p, a cumulative sum over the whole vocabulary, a fresh array at each step.
The runtime works in a buffer its thread keeps and sorts only the tokens that can matter. Both run in this process
after ``return_large_buffers()`` (what ``edgeadapt.load`` does under memory="balanced", the default), on logits
shaped like a language model's (a few likely tokens, a long tail). With ``--requests N``: N threads each
generate 64 tokens at temperature 0.7, top_p 0.9 (their own seeds) on SmolLM2-135M int4 (bench/compare.py's
cache), so the scheduler decodes them in one batch and samples each row; the sampler's ``__call__`` is swapped for
the direct definition round by round, and the tokens of both are compared. Writes bench/results/sampling.md / .json.
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
sys.path.insert(0, str(HERE.parent / "tests"))

SETTINGS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 0.9), (0.7, 40, 1.0), (0.8, 50, 0.95)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=200, help="calls timed per round")
    ap.add_argument("--requests", type=int, default=0, help="concurrent sampled requests through the scheduler")
    ap.add_argument("--base", type=Path, default=HERE / ".cache" / "compare_smollm2" / "base")
    args = ap.parse_args()

    from test_sampling import _logits, reference

    from edgeadapt.runtime.ort_engine.memory import return_large_buffers
    from edgeadapt.runtime.sampling import Sampler

    return_large_buffers()
    x = _logits(np.random.default_rng(0), 1, args.vocab, "peaked")
    rows = []
    for temperature, top_k, top_p in SETTINGS:
        s, rng = Sampler(temperature, top_k, top_p, seed=0), np.random.default_rng(0)
        direct = ((lambda: x.argmax(-1)) if temperature == 0
                  else (lambda: reference(x, temperature, top_k, top_p, rng)))
        times: dict[str, list[float]] = {"direct": [], "runtime": []}
        for _ in range(args.rounds):
            for name, f in (("direct", direct), ("runtime", lambda: s(x))):
                f()
                t = time.perf_counter()
                for _ in range(args.calls):
                    f()
                times[name].append((time.perf_counter() - t) / args.calls * 1e6)
        d, r = statistics.median(times["direct"]), statistics.median(times["runtime"])
        rows.append({"temperature": temperature, "top_k": top_k, "top_p": top_p, "direct_us": d, "runtime_us": r})
        print(f"T={temperature} top_k={top_k} top_p={top_p}: direct {d:.0f} us, runtime {r:.0f} us ({d / r:.1f}x)")

    served = _requests(args.base, args.requests, reference) if args.requests else None

    mach = f"{platform.processor() or platform.machine()}, numpy {np.__version__}, Python {platform.python_version()}"
    lines = ["# Choosing a token: the runtime's sampler against the direct definition", "",
             f"`python bench/sampling.py --vocab {args.vocab} --rounds {args.rounds}"
             f"{f' --requests {args.requests}' if args.requests else ''}` on {mach}; µs per token, one row, "
             f"medians of {args.rounds} alternated rounds of {args.calls} calls.", "",
             "| temperature | top_k | top_p | direct | runtime | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['temperature']} | {r['top_k']} | {r['top_p']} | {r['direct_us']:.0f} | "
                     f"{r['runtime_us']:.0f} | {r['direct_us'] / r['runtime_us']:.1f}× |")
    if served:
        d, r = statistics.median(served["direct"]), statistics.median(served["runtime"])
        lines += ["", f"{args.requests} concurrent requests through the scheduler, 64 tokens each at temperature 0.7, "
                  f"top_p 0.9, SmolLM2-135M int4, 2 threads, {len(served['direct'])} alternated rounds: direct "
                  f"{d:.1f} tok/s, runtime {r:.1f} tok/s ({r / d:.2f}×); the same tokens: {served['same_tokens']}."]
    out = HERE / "results" / "sampling"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"vocab": args.vocab, "rows": rows, "requests": served},
                                                   indent=1) + "\n")
    print("\n".join(lines))


def _requests(base: Path, n: int, reference, rounds: int = 4) -> dict:
    """tok/s of n concurrent sampled requests, the sampler swapped for the direct definition on alternate turns."""
    import threading
    from dataclasses import replace

    import edgeadapt
    from edgeadapt.runtime.sampling import Sampler

    if not (base / "model_int4.onnx").is_file():
        sys.exit(f"{base}: no int4 base; run `python bench/compare.py` once (it exports SmolLM2-135M there)")
    runtime = Sampler.__call__

    def direct(self, logits):
        if self.temperature == 0:
            return logits.argmax(-1)
        return reference(logits, self.temperature, self.top_k, self.top_p, self.rng)

    m = edgeadapt.load(base, engine="ort", weights="int4", threads=2)
    m.config = replace(m.config, eos_token_ids=[])  # 64 tokens each, whatever they are
    prompts = [list(range(100 + 7 * k, 160 + 7 * k)) for k in range(n)]

    def turn() -> tuple[float, list]:
        outs: list = [None] * n

        def one(k: int) -> None:
            outs[k] = m.generate_ids(prompts[k], 64, Sampler(0.7, 0, 0.9, seed=k))
        threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return n * 64 / (time.perf_counter() - t), outs

    turn()  # warm: sessions, plans
    got: dict = {"direct": [], "runtime": []}
    tokens = {}
    try:
        for r in range(rounds):
            for name, call in (("direct", direct), ("runtime", runtime))[:: 1 if r % 2 == 0 else -1]:
                Sampler.__call__ = call
                tps, tokens[name] = turn()
                got[name].append(tps)
    finally:
        Sampler.__call__ = runtime
    got["same_tokens"] = tokens["direct"] == tokens["runtime"]
    return got


if __name__ == "__main__":
    main()
