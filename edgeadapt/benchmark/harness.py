"""Measure edgeadapt and the systems users would pick instead, on one base and the same adapters.

Every system runs in its own process (so imports, memory and threads are its own) behind one small
interface — ``load`` the base, ``add`` an adapter, ``use`` a set of adapters, ``generate`` greedy
tokens — and the driver alternates systems round by round so that drift on a shared machine hits
all alike, then reports medians. Figures (names end in their unit):

  cold_start_s      fresh process: import + load base + load adapter + activate + first token
  adapter_load_s    read one more adapter file into a running base (llama-cpp-python: a reload)
  swap_s            switch the active adapter (llama-cpp-python: a reload)
  prefill_tps_*     prompt tokens / time to the first token          (* = base | one | two stacked)
  decode_tps_*      new tokens / time after the first one, greedy, EOS ignored
  mixed_tps         4 rows with 3 different adapters (one row bare) in one batch
  rss_1_mb, rss_10_mb  peak resident memory with 1 and with 10 adapters loaded (fresh process)

A system that cannot do something says why (``Unsupported``) and the figure shows that reason.
Nothing here imports a heavy library at module level: each system imports its own when it loads.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeadapt.benchmark.systems import LlamaCpp, SYSTEMS, Spec, System, Unsupported

MARK = "@@bench "  # worker output lines the driver reads (libraries may print anything else)
MIXED_ROWS = ("a", "b", None, "a")


def _timed(f, *a) -> tuple[float, Any]:
    t = time.perf_counter()
    out = f(*a)
    return time.perf_counter() - t, out


def _attempt(f) -> Any:
    try:
        return f()
    except Unsupported as e:
        return f"n/a: {e}"
    except Exception as e:  # reported in the table, never dropped
        return f"failed: {type(e).__name__}: {str(e)[:200]}"


def measure_speed(sys_: System, spec: Spec, round_: int) -> dict[str, Any]:
    """One round of every speed figure (the base is loaded and adapters "a" and "b" added)."""
    r: dict[str, Any] = {}
    n = spec.new_tokens
    for label, keys in (("base", []), ("one", ["a"]), ("two", ["a", "b"])):
        def run(keys=keys):
            sys_.use(keys)
            sys_.generate(spec.prompt, 2)  # warm: first-call allocations are not prefill
            t1 = statistics.median(_timed(sys_.generate, spec.prompt, 1)[0] for _ in range(3))
            tn = statistics.median(_timed(sys_.generate, spec.prompt, n + 1)[0] for _ in range(2))
            return len(spec.prompt) / t1, n / max(tn - t1, 1e-3 * tn)
        got = _attempt(run)
        r[f"prefill_tps_{label}"], r[f"decode_tps_{label}"] = got if isinstance(got, tuple) else (got, got)

    def swap():
        k = 3 if isinstance(sys_, LlamaCpp) and not sys_.capi else 41
        ts = [_timed(sys_.use, [("a", "b")[i % 2]])[0] for i in range(k)]
        return statistics.median(ts[1:])
    r["swap_s"] = _attempt(swap)
    key = f"x{round_}"  # a fresh name each round: the same file as "a"
    spec.adapters[key] = spec.adapters["a"]
    sys_.use([])
    r["adapter_load_s"] = _attempt(lambda: _timed(sys_.add, key)[0])

    def mixed():
        rows = (spec.prompts * 4)[:len(MIXED_ROWS)]
        sys_.generate_batch(rows, 2, list(MIXED_ROWS))
        t1 = statistics.median(_timed(sys_.generate_batch, rows, 1, list(MIXED_ROWS))[0] for _ in range(3))
        tn, _ = _timed(sys_.generate_batch, rows, n + 1, list(MIXED_ROWS))
        return len(rows) * n / max(tn - t1, 1e-3 * tn)
    r["mixed_tps"] = _attempt(mixed)
    return r


def measure_tokens(sys_: System, spec: Spec) -> dict[str, Any]:
    """Greedy tokens (EOS ignored) of every prompt, bare and with adapter "a", for agreement tables."""
    out = {}
    for label, keys in (("base", []), ("a", ["a"])):
        sys_.use(keys)
        out[label] = [sys_.generate(p, spec.agree_tokens) for p in spec.prompts]
    return out


def _rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork + exec, so a child of a big driver would report the driver's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1 << 20)


def cold(system: str, spec: Spec, n_adapters: int) -> dict[str, Any]:
    """Fresh process: import, load, add ``n_adapters`` adapters, activate "a", first token; then a few more."""
    t0 = time.perf_counter()
    s = SYSTEMS[system](spec)
    s.load()
    keys = list(spec.adapters)[:n_adapters]
    if isinstance(s, LlamaCpp) and not s.capi and n_adapters > 1:
        raise Unsupported("one lora_path per model")
    for k in keys:
        s.add(k)
    s.use(["a"])
    s.generate(spec.prompt, 1)
    first = time.perf_counter() - t0
    s.generate(spec.prompt, 8)
    out: dict[str, Any] = {f"rss_{n_adapters}_mb": _rss_mb()}
    if n_adapters == 1:  # the cold-start figure is base + ONE adapter; the 10-adapter run is for memory only
        out["cold_start_s"] = first
    return out


def _emit(obj: Any) -> None:
    sys.__stdout__.write(MARK + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def worker(system: str, spec_path: str) -> None:
    """Serve commands from the driver, one JSON object per stdin line."""
    spec = Spec.load(spec_path)
    sys.stdout = sys.stderr  # libraries print; only _emit reaches the driver
    s = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "setup":
                s = SYSTEMS[system](spec)
                t, _ = _timed(s.load)
                for k in ("a", "b"):
                    s.add(k)
                _emit({"load_s": t, "name": s.name, "how": s.how})
            elif cmd["cmd"] == "speed":
                _emit(measure_speed(s, spec, cmd["round"]))
            elif cmd["cmd"] == "tokens":
                _emit(measure_tokens(s, spec))
            elif cmd["cmd"] == "quit":
                return
        except Unsupported as e:
            _emit({"error": f"n/a: {e}"})
        except Exception as e:  # a system that breaks is reported, never dropped
            _emit({"error": f"failed: {type(e).__name__}: {str(e)[:300]}"})


# ---- the driver
class Worker:
    def __init__(self, system: str, spec_path: Path, env: dict[str, str]):
        self.p = subprocess.Popen([sys.executable, "-m", "edgeadapt.benchmark.harness", "worker", system, str(spec_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=env)

    def ask(self, cmd: dict) -> dict:
        try:
            self.p.stdin.write(json.dumps(cmd) + "\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):  # it died before this command
            return {"error": f"failed: the worker exited ({_exit(self.p.wait())})"}
        for line in self.p.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        return {"error": f"failed: the worker exited ({_exit(self.p.wait())})"}

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        except (BrokenPipeError, OSError):
            pass
        self.p.wait(timeout=60)


def _exit(code: int) -> str:
    """A worker's exit status in words: a signal by name (llama.cpp's AMX kernels on a virtual machine that traps
    them stop it with SIGILL or SIGSEGV: EDGEADAPT_LLAMA_EXTRA_BUFTS=0 runs it without them)."""
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = "; for llama.cpp on a machine that reports AMX, try EDGEADAPT_LLAMA_EXTRA_BUFTS=0" if name in (
        "SIGILL", "SIGSEGV") else ""
    return f"killed by {name}{hint}"


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _fresh(system: str, spec_path: Path, n_adapters: int, env: dict[str, str]) -> dict:
    """cold_start_s (n_adapters 1) or rss_10_mb from a fresh process; a failure becomes the figure's text."""
    p = subprocess.run([sys.executable, "-m", "edgeadapt.benchmark.harness", "cold", system, str(spec_path), str(n_adapters)],
                       capture_output=True, text=True, env=env, timeout=1800)
    got = {"error": f"failed: {_exit(p.returncode)}: {' '.join(p.stderr.strip().splitlines()[-1:])[:200]}"}
    for line in p.stdout.splitlines():
        if line.startswith(MARK):
            got = json.loads(line[len(MARK):])
    if "error" in got:
        return {"cold_start_s" if n_adapters == 1 else f"rss_{n_adapters}_mb": got["error"]}
    return got


def run(spec: Spec, systems: list[str], rounds: int = 3, log=lambda s: None) -> dict[str, Any]:
    """All figures for ``systems``; returns {"systems": {key: {"name", "how", figure: median | "n/a: why"}},
    "raw": per-round values, "tokens": greedy tokens per system}."""
    tmp = Path(tempfile.mkdtemp(prefix="edgeadapt_bench_"))
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec.__dict__))
    env = _env(spec.threads)
    raw: dict[str, dict[str, list]] = {s: {} for s in systems}
    info: dict[str, dict[str, Any]] = {s: {} for s in systems}
    tokens: dict[str, Any] = {}

    def put(s: str, d: dict) -> None:
        for k, v in d.items():
            if k in ("name", "how", "error"):
                info[s][k] = v
            else:
                raw[s].setdefault(k, []).append(v)

    workers = {}
    for s in systems:
        log(f"start {s}")
        workers[s] = Worker(s, spec_path, env)
        put(s, workers[s].ask({"cmd": "setup"}))
    try:
        for r in range(rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]  # rotate: no system always first
            for s in order:
                if "error" in info[s]:
                    continue
                log(f"round {r + 1}/{rounds}: {s}")
                put(s, workers[s].ask({"cmd": "speed", "round": r}))
                put(s, _fresh(s, spec_path, 1, env))
        for s in systems:
            if "error" not in info[s]:
                log(f"tokens: {s}")
                tokens[s] = workers[s].ask({"cmd": "tokens"})
    finally:
        for w in workers.values():
            w.close()
    for s in systems:
        if "error" not in info[s] and len(spec.adapters) >= 10:
            log(f"memory with 10 adapters: {s}")
            put(s, _fresh(s, spec_path, 10, env))
    med = {}
    for s in systems:
        made = SYSTEMS[s](spec) if s in SYSTEMS else None  # names only: a system imports its library when it loads
        med[s] = {"name": info[s].get("name", made.name if made else s), "how": info[s].get("how", made.how if made else "")}
        if "error" in info[s]:
            med[s]["error"] = info[s]["error"]
        for k, vals in raw[s].items():
            nums = [v for v in vals if isinstance(v, (int, float))]
            med[s][k] = statistics.median(nums) if nums else (vals[0] if vals else None)
    return {"systems": med, "raw": raw, "tokens": tokens}


FIGURES = [  # (key, label, higher is better)
    ("cold_start_s", "cold start to first token, base + adapter [s]", False),
    ("load_s", "load base (running process) [s]", False),
    ("adapter_load_s", "adapter load [s]", False),
    ("swap_s", "adapter swap [s]", False),
    ("prefill_tps_base", "prefill tok/s, no adapter", True),
    ("prefill_tps_one", "prefill tok/s, one adapter", True),
    ("prefill_tps_two", "prefill tok/s, two stacked", True),
    ("decode_tps_base", "decode tok/s, no adapter", True),
    ("decode_tps_one", "decode tok/s, one adapter", True),
    ("decode_tps_two", "decode tok/s, two stacked", True),
    ("mixed_tps", "mixed batch tok/s (4 rows, 3 adapters)", True),
    ("rss_1_mb", "peak RSS, 1 adapter [MB]", False),
    ("rss_10_mb", "peak RSS, 10 adapters [MB]", False),
]


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if v is None:
        return "–"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def reference(res: dict[str, Any], preferred: list[str]) -> str | None:
    """The column the others are divided by: the first of ``preferred`` that ran (then any system that ran);
    None when none did."""
    ran = [s for s, d in res["systems"].items() if "error" not in d
           and any(isinstance(d.get(k), (int, float)) for k, _, _ in FIGURES)]
    return next((s for s in preferred if s in ran), ran[0] if ran else None)


def table(res: dict[str, Any], ref: str | None) -> str:
    """Markdown: one row per figure, one column per system, "value (×ref)" where ×ref = value / ref's. A reason a
    system could not give figures ("n/a: …", "failed: …") is written once, under the table, and its cells point
    to it: a system that failed to load shows one line, not one per figure."""
    systems = list(res["systems"])
    head = "| figure | " + " | ".join(res["systems"][s]["name"] for s in systems) + " |"
    lines = [head, "|---|" + "---|" * len(systems)]
    notes: dict[tuple[str, str], int] = {}  # (system, reason) -> footnote number

    def note(s: str, text: str) -> str:
        k = notes.setdefault((s, text), len(notes) + 1)
        return f"{text.split(':', 1)[0]} [{k}]"

    for key, label, _ in FIGURES:
        r = res["systems"][ref].get(key) if ref else None
        cells = []
        for s in systems:
            d = res["systems"][s]
            v = d["error"] if "error" in d else d.get(key)
            cell = note(s, v) if isinstance(v, str) else _fmt(v)
            if isinstance(v, (int, float)) and isinstance(r, (int, float)) and r and s != ref:
                cell += f" ({v / r:.2f}×)"
            cells.append(cell.replace("|", "/"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"[{k}] {res['systems'][s]['name']}: {text.replace(chr(10), ' ')}" for (s, text), k in notes.items()]
    return "\n".join(lines)


def agreement(res: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """Greedy-token agreement between pairs of systems: identical sequences and first divergence (pairs where
    either system has no tokens are left out, and said so when none is left). A system that stops at EOS
    (onnxruntime-genai) is compared over the tokens it produced."""
    lines = ["| systems | adapter | identical prompts | tokens before the first difference, per prompt |",
             "|---|---|---|---|"]
    for x, y in pairs:
        tx, ty = res["tokens"].get(x), res["tokens"].get(y)
        if not tx or not ty or "error" in tx or "error" in ty:
            continue
        for label in ("base", "a"):
            same = [p[:min(len(p), len(q))] == q[:min(len(p), len(q))] for p, q in zip(tx[label], ty[label])]
            first = []
            for p, q in zip(tx[label], ty[label]):
                k = 0
                while k < min(len(p), len(q)) and p[k] == q[k]:
                    k += 1
                first.append(k)
            lines.append(f"| {res['systems'][x]['name']} vs {res['systems'][y]['name']} | "
                         f"{'none' if label == 'base' else 'a'} | {sum(same)}/{len(same)} | {first} |")
    if len(lines) == 2:
        return "Greedy-token agreement: no pair of systems produced tokens to compare."
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[0] == "worker":
        worker(argv[1], argv[2])
    elif argv[0] == "cold":
        sys.stdout = sys.stderr
        try:
            _emit(cold(argv[1], Spec.load(argv[2]), int(argv[3])))
        except Unsupported as e:
            _emit({f"rss_{argv[3]}_mb": f"n/a: {e}"} if argv[3] != "1" else {"cold_start_s": f"n/a: {e}"})
        except Exception as e:
            _emit({"error": f"failed: {type(e).__name__}: {str(e)[:300]}"})
        # the driver turns an error here into the figure's text (see _fresh)


if __name__ == "__main__":
    main(sys.argv[1:])
