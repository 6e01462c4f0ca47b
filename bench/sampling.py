"""What choosing a token costs: the runtime's sampler against the same definition written the direct way.

    python bench/sampling.py                 # SmolLM2's vocabulary (49,152), one row, 9 alternated rounds
    python bench/sampling.py --vocab 151936  # Qwen's

The direct way (``tests/test_sampling.py``'s ``reference``, which the runtime's sampler draws the same tokens as):
a float64 copy, a full argsort for top_p, a cumulative sum over the whole vocabulary, a fresh array at each step.
The runtime works in a buffer its thread keeps and sorts only the tokens that can matter. Both run in this process
after ``return_large_buffers()`` (what ``edgeadapt.load`` does under memory="balanced", the default), on logits
shaped like a language model's (a few likely tokens, a long tail). Writes bench/results/sampling.md / .json.
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

    mach = f"{platform.processor() or platform.machine()}, numpy {np.__version__}, Python {platform.python_version()}"
    lines = ["# Choosing a token: the runtime's sampler against the direct definition", "",
             f"`python bench/sampling.py --vocab {args.vocab} --rounds {args.rounds}` on {mach}; µs per token, one row, "
             f"medians of {args.rounds} alternated rounds of {args.calls} calls.", "",
             "| temperature | top_k | top_p | direct | runtime | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['temperature']} | {r['top_k']} | {r['top_p']} | {r['direct_us']:.0f} | "
                     f"{r['runtime_us']:.0f} | {r['direct_us'] / r['runtime_us']:.1f}× |")
    out = HERE / "results" / "sampling"
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"vocab": args.vocab, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
