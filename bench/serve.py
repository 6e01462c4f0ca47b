"""Serving many adapters: edgeadapt serve against llama.cpp's llama-server, the same adapters per request.

    python bench/serve.py                      # SmolLM2-135M-Instruct, 1/4/8/16 clients, 64 tokens, 1 round
    python bench/serve.py --clients 1,8 --rounds 2 --llama-server /path/to/llama-server

Base and adapters: bench/compare.py's cache (SmolLM2-135M-Instruct Q4_1, exported with fp32 and int4 ONNX;
rank-16 LoRAs on every linear layer; our delta files are llama.cpp GGUF LoRAs, which llama-server loads).
Clients: C threads, each sending ``--requests`` streamed /v1/completions one after another, client i on adapter
i mod 4 (edgeadapt: ``model`` = the adapter; llama-server: ``"lora": [{"id": i, "scale": 1}]``, the others at 0).
Systems alternate within each client count (every server is up, idle ones take no CPU). Measured per request:
time to first token (first streamed text), per-token latency ((end - first) / (tokens - 1)); per cell: aggregate
completion tokens / wall time. The one-client target is measured in pairs, after each round's cells: a request to
the server, then the same request to ``m.generate`` alone in this process (``--pairs`` per round). Writes
bench/results/serve.{json,md,png} (``--name``: another name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ADAPTERS = "abcd"
PROMPTS = ["Where is my invoice? I paid last week but the account page still shows it as due.",
           "My app keeps crashing when I open the settings page.", "How do I reset my password?",
           "Explain photosynthesis briefly.", "Write a haiku about the sea.", "What is the capital of France?"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, path: str = "/health", timeout: float = 300) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}: not up after {timeout}s")


class System:
    def __init__(self, name: str, cmd: list[str], body: callable):
        self.name, self.cmd, self.body = name, cmd, body
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # the server's log goes to a file: a pipe nobody reads fills after ~64 KB of log lines, and the server then
        # blocks on its next write (llama-server logs every request: it stalled in the third round of a first run)
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        try:
            _wait(self.url, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; its log ends: {self.log_tail()}") from None

    def log_tail(self, size: int = 2000) -> str:
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - size))
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc:
            self.log.close()


def edgeadapt_system(base: Path, adapters: dict[str, str], weights: str, threads: int, prefix: bool = False) -> System:
    """``prefix``: the scheduler reuses prompt starts (Scheduler.prefix_min = 16), off by default (it moves answers:
    float32 rounding of a prompt prefilled in two pieces, which int4's int8 inputs magnify)."""
    port = _port()
    code = ("from edgeadapt.runtime.scheduler import Scheduler; Scheduler.prefix_min = 16; " if prefix else "") + \
        "from edgeadapt.cli import main; main()"
    cmd = [sys.executable, "-c", code, "serve", str(base), "--engine", "ort",
           "--weights", weights, "--port", str(port), "--threads", str(threads), "--max-rows", "16"]
    for k in ADAPTERS:
        cmd += ["--adapter", f"{k}={adapters[k]}"]
    return System(f"edgeadapt-{weights}" + ("-prefix" if prefix else ""), cmd, lambda prompt, i, n: {
        "model": ADAPTERS[i % 4], "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}})


def llama_server_system(binary: str, gguf: str, adapters: dict[str, str], threads: int, slots: int,
                        extra: Sequence[str] = ()) -> System:
    port = _port()
    cmd = [binary, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-t", str(threads), "-tb", str(threads),
           "-np", str(slots), "-c", str(slots * 512), "--lora-init-without-apply", "--no-webui", *extra]
    for k in ADAPTERS:
        cmd += ["--lora", adapters[k]]
    return System("llama-server", cmd, lambda prompt, i, n: {
        "model": "base", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "lora": [{"id": j, "scale": 1.0 if j == i % 4 else 0.0} for j in range(4)]})


def one_request(client, system: System, prompt: str, i: int, n: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, text, used = None, 0, "", None
    # a new connection per request: llama-server closes idle keep-alive connections, which a reused one met as
    # "Server disconnected" (counted as an error against it in a first run)
    with client.stream("POST", system.url + "/v1/completions", json=system.body(prompt, i, n),
                       headers={"connection": "close"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{system.name}: HTTP {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            used = (c.get("usage") or {}).get("completion_tokens", used)
            piece = (c.get("choices") or [{}])[0].get("text") or ""
            if piece:
                tokens += 1  # one streamed chunk per token on both servers (text held back for UTF-8 aside)
                text += piece
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "total": end - t0, "chunks": used or tokens, "text": text, "prompt": PROMPTS.index(prompt),
            "adapter": i % 4}


def cell(system: System, clients: int, requests: int, n: int) -> dict:
    import httpx

    out: list[dict] = []
    errors: list[str] = []

    def client_loop(c: int) -> None:
        with httpx.Client(timeout=180) as cl:
            for r in range(requests):
                try:
                    out.append(one_request(cl, system, PROMPTS[(c + r) % len(PROMPTS)], c, n))
                except Exception as e:  # reported in the table
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    usage = _completion_tokens(system, out)
    ttft = [o["ttft"] for o in out]
    per_tok = [(o["total"] - o["ttft"]) / max(o["chunks"] - 1, 1) for o in out]
    return {"system": system.name, "clients": clients, "requests": len(out), "errors": errors[:3],
            "texts": [(o["prompt"], o["adapter"], o["text"]) for o in out],
            "tokens": usage, "wall_s": wall, "tok_s": usage / wall if wall else 0.0,
            "ttft_p50": float(np.percentile(ttft, 50)) if ttft else None,
            "ttft_p95": float(np.percentile(ttft, 95)) if ttft else None,
            "tpot_p50": float(np.percentile(per_tok, 50)) if per_tok else None,
            "tpot_p95": float(np.percentile(per_tok, 95)) if per_tok else None}


def _completion_tokens(system: System, out: list[dict]) -> int:
    return sum(o["chunks"] for o in out)


class Alone:
    """``m.generate`` alone in this process (batching off: the plain decode loop): the one-client target's reference.
    Like for like: the requests the one-client cell sends (adapter a, prompts 0, 1, ... one after another, the same
    text tokenized the same way), wall time from the call to the last token, prefill included."""

    def __init__(self, base: Path, adapters: dict[str, str], weights: str, threads: int):
        import edgeadapt

        self.weights = weights
        self.m = edgeadapt.load(base, engine="ort", weights=weights, mode="live", threads=threads)
        for k in ADAPTERS:
            self.m.add_adapter(adapters[k], name=k)
        self.m.batching = False
        self.m.generate(PROMPTS[0], 8, chat=False, adapters=["a"])  # warm-up, as the servers had

    def request(self, prompt: str, n: int) -> tuple[int, float]:
        """(tokens, seconds) of one request."""
        t0 = time.perf_counter()
        got = self.m.generate_ids(self.m.encode_prompt(prompt, chat=False), n, adapter="a")
        return len(got), time.perf_counter() - t0

    def texts(self, texts: set[tuple[int, int]], n: int) -> dict[str, str]:
        """``m.generate`` with temperature 0 for every (prompt, adapter) a server answered, to count the served
        answers that equal it."""
        return {f"{p},{a}": self.m.generate(PROMPTS[p], n, chat=False, adapters=[ADAPTERS[a]]) for p, a in sorted(texts)}


def pairs(system: System, ref: Alone, count: int, n: int) -> dict:
    """The one-client target: ``count`` requests, each sent to the server and then run by ``m.generate`` alone, one
    after the other (a host whose speed drifts over minutes, as this benchmark's VM does, moves both sides of each
    pair together). tok/s of each side = its tokens / its summed wall time."""
    import httpx

    served, alone = [0, 0.0], [0, 0.0]
    with httpx.Client(timeout=600) as cl:
        for r in range(count):
            prompt = PROMPTS[r % len(PROMPTS)]
            o = one_request(cl, system, prompt, 0, n)
            served[0] += o["chunks"]
            served[1] += o["total"]
            got, wall = ref.request(prompt, n)
            alone[0] += got
            alone[1] += wall
    return {"system": system.name, "requests": count, "served_tok_s": served[0] / served[1],
            "alone_tok_s": alone[0] / alone[1], "ratio": served[0] / served[1] / (alone[0] / alone[1])}


def agreement(res: dict) -> dict[str, str]:
    """Per edgeadapt system and client count: served answers equal to m.generate alone (greedy), of all."""
    out = {}
    for c in res["cells"]:
        w = c["system"].removeprefix("edgeadapt-").split("-")[0]
        ref = res["alone"].get(w, {}).get("texts")
        if not ref:
            continue
        same = sum(ref.get(f"{p},{a}") == t for p, a, t in c["texts"])
        key = f"{c['system']}, {c['clients']} clients"
        got = out.get(key, (0, 0))
        out[key] = (got[0] + same, got[1] + len(c["texts"]))
    return {k: f"{s} of {n}" for k, (s, n) in out.items()}


def medians(cells: list[dict]) -> list[dict]:
    """One cell per (system, clients): the median of each figure over the rounds."""
    out = []
    for key in sorted({(c["system"], c["clients"]) for c in cells}, key=lambda k: (k[1], k[0])):
        cs = [c for c in cells if (c["system"], c["clients"]) == key]
        m = {k: float(np.median([c[k] for c in cs if c[k] is not None])) for k in
             ("tok_s", "ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95")}
        out.append({"system": key[0], "clients": key[1], "rounds": len(cs), "requests": sum(c["requests"] for c in cs),
                    "errors": [e for c in cs for e in c["errors"]], **m})
    return out


def chart(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in sorted({c["system"] for c in cells}):
        cs = sorted((c for c in cells if c["system"] == name), key=lambda c: c["clients"])
        x = [c["clients"] for c in cs]
        axes[0].plot(x, [c["tok_s"] for c in cs], "o-", label=name)
        axes[1].plot(x, [c["ttft_p95"] * 1000 for c in cs], "o-", label=name)
        axes[2].plot(x, [c["tpot_p50"] * 1000 for c in cs], "o-", label=name)
    for ax, t in zip(axes, ("aggregate tokens/s", "p95 time to first token (ms)", "p50 per-token latency (ms)")):
        ax.set_title(t)
        ax.set_xlabel("concurrent clients (4 adapters)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(res: dict) -> str:
    lines = ["| system | clients | requests | tok/s | TTFT p50 / p95 (ms) | per-token p50 / p95 (ms) | errors |",
             "|---|---|---|---|---|---|---|"]
    for c in medians(res["cells"]):
        lines.append(f"| {c['system']} | {c['clients']} | {c['requests']} | {c['tok_s']:.1f} | "
                     f"{c['ttft_p50'] * 1000:.0f} / {c['ttft_p95'] * 1000:.0f} | "
                     f"{c['tpot_p50'] * 1000:.1f} / {c['tpot_p95'] * 1000:.1f} | {len(c['errors'])} |")
    lines.append("")
    for w in sorted({p["system"] for p in res.get("pairs", [])}):
        ps = [p for p in res["pairs"] if p["system"] == w]
        med = {k: float(np.median([p[k] for p in ps])) for k in ("served_tok_s", "alone_tok_s", "ratio")}
        ratios = ", ".join(f"{p['ratio']:.2f}" for p in ps)
        lines.append(f"- one client against `m.generate` alone ({w}; {len(ps)} rounds of {ps[0]['requests']} requests, "
                     f"each sent to the server and then run alone): {med['served_tok_s']:.1f} / {med['alone_tok_s']:.1f} "
                     f"tok/s, {med['ratio']:.2f}x (median of the rounds' ratios: {ratios})")
    runs: dict[tuple[str, int], list[float]] = {}  # (system, clients) -> tok/s of each round, in order
    for c in res["cells"]:
        runs.setdefault((c["system"], c["clients"]), []).append(c["tok_s"])
    for name in sorted({c["system"] for c in res["cells"] if c["system"].startswith("edgeadapt-")}):
        per = [f"{n} clients {', '.join(f'{x / y:.2f}' for x, y in zip(runs[(name, n)], runs[('llama-server', n)]))}"
               for n in sorted({n for _, n in runs}) if (name, n) in runs and ("llama-server", n) in runs]
        if per:
            lines.append(f"- {name} / llama-server tok/s, round by round: {'; '.join(per)}")
    for k, v in res.get("agree", {}).items():
        lines.append(f"- greedy answers equal to `m.generate` alone: {k}: {v}")
    lines.append(f"- machine: {res['machine']}; load average {res.get('load', '?')}")
    lines.append(f"- medians over {res.get('rounds', 1)} rounds; {res['tokens']} new tokens per request")
    if res.get("llama_server_args"):
        lines.append(f"- llama-server run with `{res['llama_server_args']}` besides the flags in bench/serve.py")
    for k, v in res["missing"].items():
        lines.append(f"- not run: {k}: {v}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--name", default="serve", help="results file name: bench/results/NAME.{json,md,png}")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client per cell")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=8, help="one-client target: requests per round sent to each edgeadapt "
                    "server and then run by m.generate alone (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default="edgeadapt-int4,edgeadapt-fp32,llama-server",
                    help="also: edgeadapt-int4-prefix (int4 with prompt starts reused, off by default)")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
                    or "/tmp/edgeadapt_llsrv/bin/llama-server")
    ap.add_argument("--llama-server-args", default="",
                    help="more llama-server flags, e.g. '-nr' (no weight repacking: no extra buffer types such as AMX, "
                         "for a virtual machine that reports AMX but traps its instructions)")
    a = ap.parse_args()
    cache = HERE / ".cache" / "compare_smollm2"
    if not (cache / "base" / "manifest.json").is_file() or not all((cache / f"{k}.gguf").is_file() for k in ADAPTERS):
        sys.path.insert(0, str(HERE))
        from compare import prepare_smollm2
        prepare_smollm2(cache)
    base = cache / "base"
    adapters = {k: str(cache / f"{k}.gguf") for k in ADAPTERS}
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.runtime.tokenizer import Tokenizer

    man = read_manifest(base)
    tok = Tokenizer(man.path("tokenizer"), chat_template=man.chat_template, special=man.special_tokens)
    global PROMPTS
    PROMPTS = [tok.render_chat([{"role": "user", "content": p}]) for p in PROMPTS]  # raw text, templated once
    clients = [int(c) for c in a.clients.split(",")]
    want = a.systems.split(",")
    systems, missing = [], {}
    for w in ("int4", "fp32", "int4-prefix"):
        if f"edgeadapt-{w}" in want:
            systems.append(edgeadapt_system(base, adapters, w.split("-")[0], a.threads, w.endswith("-prefix")))
    if "llama-server" in want:
        if a.llama_server and Path(a.llama_server).is_file():
            systems.append(llama_server_system(a.llama_server, str(man.path("gguf")), adapters, a.threads,
                                               max(clients), a.llama_server_args.split()))
        else:
            missing["llama-server"] = f"no binary at {a.llama_server!r} (pass --llama-server)"
    res = {"cells": [], "alone": {}, "missing": missing, "tokens": a.tokens, "rounds": a.rounds,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.threads} threads each",
           "llama_server_args": a.llama_server_args}
    before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    alone = {w: Alone(base, adapters, w, a.threads) for w in ("int4", "fp32") if f"edgeadapt-{w}" in want}
    res["pairs"] = []
    try:
        for s in systems:
            s.start()
            print(f"{s.name} up on {s.url}", file=sys.stderr)
        for s in systems:  # warm-up: sessions, caches, first requests
            cell(s, 2, 1, 8)
        for rnd in range(a.rounds):
            for c in clients:
                for s in systems[rnd % len(systems):] + systems[:rnd % len(systems)]:  # order rotated per round
                    r = cell(s, c, a.requests, a.tokens)
                    print(f"{s.name:16s} {c:3d} clients  {r['tok_s']:7.1f} tok/s  TTFT p95 {r['ttft_p95'] * 1000:6.0f} ms  "
                          f"per-token p50 {r['tpot_p50'] * 1000:5.1f} ms  errors {len(r['errors'])}", file=sys.stderr)
                    res["cells"].append(r)
            for s in systems:
                ref = alone.get(s.name.removeprefix("edgeadapt-"))
                if ref is not None and a.pairs:
                    p = pairs(s, ref, a.pairs, a.tokens)
                    print(f"{s.name:16s} one client {p['served_tok_s']:5.1f} tok/s, m.generate alone "
                          f"{p['alone_tok_s']:5.1f}: {p['ratio']:.2f}x", file=sys.stderr)
                    res["pairs"].append(p)
    finally:
        for s in systems:
            s.stop()
    res["load"] = f"{before} before, {' / '.join(f'{x:.1f}' for x in os.getloadavg())} after"
    for w, ref in alone.items():
        texts = {(p, ad) for c in res["cells"] if c["system"].startswith(f"edgeadapt-{w}") for p, ad, _ in c["texts"]}
        res["alone"][w] = {"texts": ref.texts(texts, a.tokens)}
    res["agree"] = agreement(res)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{a.name}.md").write_text(report(res))
    try:
        chart(medians(res["cells"]), out / f"{a.name}.png")
    except ImportError:
        print("matplotlib missing: no chart", file=sys.stderr)
    print(report(res))


if __name__ == "__main__":
    main()
