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

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = "@@bench "  # worker output lines the driver reads (libraries may print anything else)
MIXED_ROWS = ("a", "b", None, "a")


class Unsupported(Exception):
    """This system cannot do what was asked; the message says why."""


@dataclass
class Spec:
    """What every system runs: one base (in its formats), adapters (in theirs), prompts."""

    base: str  # edgeadapt base folder
    gguf: str  # the GGUF llama.cpp runs (e.g. the 4-bit source, or base/model.gguf)
    adapters: dict[str, dict[str, str]]  # key -> {"gguf", "onnx_adapter", "peft"}; keys "a", "b", then extras
    prompt: list[int]
    prompts: list[list[int]] = field(default_factory=list)  # for agreement and mixed batches
    hf: str | None = None  # Hugging Face folder of the same base (PEFT / transformers)
    new_tokens: int = 64
    agree_tokens: int = 32
    threads: int = 2
    ctx: int = 512

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Spec":
        return cls(**json.loads(Path(path).read_text()))


# ---- the systems
class System:
    name = ""
    how = ""  # one line: what exactly runs

    def __init__(self, spec: Spec):
        self.spec = spec

    def load(self) -> None:
        raise NotImplementedError

    def add(self, key: str) -> None:
        raise NotImplementedError

    def use(self, keys: list[str]) -> None:
        raise NotImplementedError

    def generate(self, prompt: list[int], n: int) -> list[int]:
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], n: int, keys: list[str | None]) -> list[list[int]]:
        raise Unsupported("one adapter set per batch: rows cannot have their own adapters")


class Edgeadapt(System):
    def __init__(self, spec: Spec, engine: str, weights: str = "fp32"):
        super().__init__(spec)
        self.engine, self.weights = engine, weights
        self.name = f"edgeadapt {engine}" + (f" {weights}" if engine == "ort" else "")
        self.how = (f"edgeadapt.load(engine={engine!r}" + (f", weights={weights!r}" if engine == "ort" else "")
                    + "), adapters live (mode auto)")

    def load(self) -> None:
        from dataclasses import replace

        import edgeadapt

        self.m = edgeadapt.load(self.spec.base, engine=self.engine, weights=self.weights, threads=self.spec.threads)
        self.m.config = replace(self.m.config, eos_token_ids=[])  # fixed-length decoding

    def add(self, key: str) -> None:
        self.m.add_adapter(self.spec.adapters[key]["gguf"], name=key)

    def use(self, keys: list[str]) -> None:
        self.m.use({k: 1.0 for k in keys} or None)

    def generate(self, prompt: list[int], n: int) -> list[int]:
        return self.m.generate_batch([prompt], n)[0]

    def generate_batch(self, prompts, n, keys):
        return self.m.generate_batch(prompts, n, adapters=list(keys))


class LlamaCpp(System):
    """llama-cpp-python. ``capi=False``: its Python API (one ``lora_path`` at construction, so loading or
    swapping an adapter is a reload). ``capi=True``: llama.cpp's own C API through its ctypes bindings
    (llama_adapter_lora_init / llama_set_adapters_lora): adapters stay loaded, swaps and stacks are live."""

    def __init__(self, spec: Spec, capi: bool = False):
        super().__init__(spec)
        self.capi = capi
        self.name = "llama.cpp C API" if capi else "llama-cpp-python"
        self.how = ("llama_adapter_lora_init + llama_set_adapters_lora (ctypes)" if capi
                    else "Llama(model_path, lora_path=...)")
        self.ptrs: dict[str, Any] = {}
        self.current: list[str] = []

    def _make(self, lora: str | None) -> Any:
        import llama_cpp

        t = self.spec.threads
        return llama_cpp.Llama(model_path=self.spec.gguf, n_ctx=self.spec.ctx, n_threads=t, n_threads_batch=t,
                               verbose=False, **({"lora_path": lora} if lora else {}))

    def load(self) -> None:
        self.llm = self._make(None)

    def add(self, key: str) -> None:
        path = self.spec.adapters[key]["gguf"]
        if self.capi:
            import llama_cpp

            ptr = llama_cpp.llama_adapter_lora_init(self.llm._model.model, path.encode())
            if not ptr:
                raise RuntimeError(f"llama.cpp refused {path}")
            self.ptrs[key] = ptr
        else:  # the only way to load an adapter with this API is to build the model again with it
            self.use([key])

    def use(self, keys: list[str]) -> None:
        if self.capi:
            import ctypes

            import llama_cpp

            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(keys))(*[self.ptrs[k] for k in keys])
            scales = (ctypes.c_float * len(keys))(*[1.0] * len(keys))
            if llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, arr, len(keys), scales):
                raise RuntimeError("llama_set_adapters_lora failed")
            return
        if keys == self.current:
            return
        if len(keys) > 1:
            raise Unsupported("takes one lora_path per model")
        self.llm.close()
        self.llm = None
        gc.collect()
        self.llm = self._make(self.spec.adapters[keys[0]]["gguf"] if keys else None)
        self.current = list(keys)

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()  # else llama-cpp-python reuses the cached prompt (and a cache made under other adapters)
        out: list[int] = []
        for tok in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == n:
                break
        return out


class OrtMultiLora(System):
    name = "onnxruntime LoraAdapter"
    how = "InferenceSession(model_lora.onnx) + LoraAdapter.Load(.onnx_adapter) + RunOptions.add_active_adapter"

    def load(self) -> None:
        import numpy as np
        import onnxruntime as ort

        from edgeadapt.manifest import read_manifest

        self.np, self.ort = np, ort
        man = read_manifest(self.spec.base)
        self.cfg = man.arch
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.spec.threads
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(man.path("onnx_lora")), so, providers=["CPUExecutionProvider"])
        self.names = ["logits"] + [f"present.{i}.{kv}" for i in range(self.cfg.n_layers) for kv in ("key", "value")]
        self.ads: dict[str, Any] = {}
        self.ro = ort.RunOptions()

    def add(self, key: str) -> None:
        a = self.ort.LoraAdapter()
        a.Load(self.spec.adapters[key]["onnx_adapter"])
        self.ads[key] = a

    def use(self, keys: list[str]) -> None:
        if len(keys) > 1:
            raise Unsupported("two adapters set the same parameters: onnxruntime keeps one, silently")
        self.ro = self.ort.RunOptions()
        for k in keys:
            self.ro.add_active_adapter(self.ads[k])

    def generate(self, prompt: list[int], n: int) -> list[int]:
        np, cfg = self.np, self.cfg
        ids = np.asarray([prompt], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(prompt))[None]}
        for i in range(cfg.n_layers):
            for kv in ("key", "value"):
                feeds[f"past.{i}.{kv}"] = np.zeros((1, cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
        out: list[int] = []
        while True:
            outs = self.sess.run(self.names, feeds, self.ro)
            out.append(int(outs[0][0, -1].argmax()))
            if len(out) == n:
                return out
            p = len(prompt) + len(out)
            feeds = {"input_ids": np.asarray([[out[-1]]], np.int64), "attention_mask": np.ones((1, p), np.int64),
                     "position_ids": np.asarray([[p - 1]], np.int64)}
            for i in range(cfg.n_layers):
                feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = outs[1 + 2 * i], outs[2 + 2 * i]


class Genai(System):
    name = "onnxruntime-genai"
    how = "og.Model on our model_lora.onnx (a genai_config.json written for it) + og.Adapters(.onnx_adapter)"

    def load(self) -> None:
        import onnxruntime_genai as og

        from edgeadapt.manifest import read_manifest

        man = read_manifest(self.spec.base)
        a = man.arch
        self.dir = Path(tempfile.mkdtemp(prefix="genai_"))
        for f in (man.path("onnx_lora"), man.path("onnx_lora").parent / "model.onnx.data"):
            os.symlink(f, self.dir / f.name)
        cfg = {"model": {"type": "llama", "context_length": self.spec.ctx, "vocab_size": a.vocab_size,
                         "bos_token_id": a.bos_token_id or 0, "eos_token_id": a.eos_token_ids or [0], "pad_token_id": 0,
                         "decoder": {"session_options": {"log_id": "genai", "intra_op_num_threads": self.spec.threads,
                                                         "provider_options": []},
                                     "filename": man.path("onnx_lora").name, "head_size": a.head_dim,
                                     "hidden_size": a.dim, "num_attention_heads": a.n_heads,
                                     "num_hidden_layers": a.n_layers, "num_key_value_heads": a.n_kv_heads,
                                     "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                                "position_ids": "position_ids", "past_key_names": "past.%d.key",
                                                "past_value_names": "past.%d.value"},
                                     "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                                 "present_value_names": "present.%d.value"}}},
               "search": {"do_sample": False, "max_length": self.spec.ctx, "num_beams": 1,
                          "past_present_share_buffer": False}}
        (self.dir / "genai_config.json").write_text(json.dumps(cfg))
        self.og = og
        self.model = og.Model(str(self.dir))
        self.adapters = og.Adapters(self.model)
        self.active: str | None = None

    def add(self, key: str) -> None:
        self.adapters.load(self.spec.adapters[key]["onnx_adapter"], key)

    def use(self, keys: list[str]) -> None:
        if len(keys) > 1:
            raise Unsupported("one active adapter per generator")
        self.active = keys[0] if keys else None

    def _generator(self, total: int) -> Any:
        p = self.og.GeneratorParams(self.model)
        p.set_search_options(max_length=total, min_length=total, do_sample=False)
        g = self.og.Generator(self.model, p)
        if self.active:
            g.set_active_adapter(self.adapters, self.active)
        return g

    def generate(self, prompt: list[int], n: int) -> list[int]:
        g = self._generator(len(prompt) + n)
        g.append_tokens(prompt)
        out = []
        while len(out) < n:
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
        return out


class Peft(System):
    name = "PEFT (transformers, CPU)"
    how = "AutoModelForCausalLM + PeftModel.load_adapter / set_adapter, model.generate"

    def load(self) -> None:
        if not self.spec.hf:
            raise Unsupported("needs the base as a Hugging Face folder and the adapters as PEFT folders")
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.spec.threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(self.spec.hf, dtype=torch.float32).eval()
        self.peft, self.keys = None, []

    def add(self, key: str) -> None:
        path = self.spec.adapters[key].get("peft")
        if not path:
            raise Unsupported("no PEFT folder for this adapter")
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=key).eval()
        else:
            self.peft.load_adapter(path, adapter_name=key)

    def use(self, keys: list[str]) -> None:
        self.keys = list(keys)
        if keys:
            self.peft.base_model.set_adapter(keys if len(keys) > 1 else keys[0])

    def _gen(self, ids: Any, mask: Any, n: int, **kw) -> Any:
        from contextlib import nullcontext

        model = self.peft if self.peft is not None else self.model
        off = self.peft.disable_adapter() if self.peft is not None and not self.keys and "adapter_names" not in kw \
            else nullcontext()
        with self.torch.no_grad(), off:
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **kw)

    def generate(self, prompt: list[int], n: int) -> list[int]:
        ids = self.torch.tensor([prompt])
        return self._gen(ids, self.torch.ones_like(ids), n)[0, len(prompt):].tolist()

    def generate_batch(self, prompts, n, keys):
        w = max(len(p) for p in prompts)
        ids = self.torch.tensor([[0] * (w - len(p)) + p for p in prompts])
        mask = self.torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in prompts])
        out = self._gen(ids, mask, n, adapter_names=[k or "__base__" for k in keys])
        return out[:, w:].tolist()


SYSTEMS = {
    "edgeadapt-ort-int4": lambda s: Edgeadapt(s, "ort", "int4"),
    "edgeadapt-ort-fp32": lambda s: Edgeadapt(s, "ort", "fp32"),
    "edgeadapt-numpy": lambda s: Edgeadapt(s, "numpy"),
    "llama-cpp-python": lambda s: LlamaCpp(s),
    "llama.cpp-capi": lambda s: LlamaCpp(s, capi=True),
    "ort-lora-adapter": OrtMultiLora,
    "ort-genai": Genai,
    "peft": Peft,
}


# ---- measurements (inside a worker process)
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
    return {"cold_start_s": first, f"rss_{n_adapters}_mb": _rss_mb()}


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
        self.p = subprocess.Popen([sys.executable, "-m", "edgeadapt.benchmark", "worker", system, str(spec_path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=env)

    def ask(self, cmd: dict) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        for line in self.p.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        return {"error": "failed: the worker exited"}

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
        except (BrokenPipeError, OSError):
            pass
        self.p.wait(timeout=60)


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


def _fresh(system: str, spec_path: Path, n_adapters: int, env: dict[str, str]) -> dict:
    """cold_start_s (n_adapters 1) or rss_10_mb from a fresh process; a failure becomes the figure's text."""
    p = subprocess.run([sys.executable, "-m", "edgeadapt.benchmark", "cold", system, str(spec_path), str(n_adapters)],
                       capture_output=True, text=True, env=env, timeout=1800)
    got = {"error": f"failed: exit {p.returncode}: {' '.join(p.stderr.strip().splitlines()[-1:])[:200]}"}
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
        med[s] = {"name": info[s].get("name", s), "how": info[s].get("how", "")}
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


def table(res: dict[str, Any], ref: str) -> str:
    """Markdown: one row per figure, one column per system, "value (×ref)" where ×ref = value / edgeadapt's."""
    systems = list(res["systems"])
    head = "| figure | " + " | ".join(res["systems"][s]["name"] for s in systems) + " |"
    lines = [head, "|---|" + "---|" * len(systems)]
    for key, label, _ in FIGURES:
        r = res["systems"][ref].get(key)
        cells = []
        for s in systems:
            d = res["systems"][s]
            v = d.get(key, d.get("error"))
            cell = _fmt(v)
            if isinstance(v, (int, float)) and isinstance(r, (int, float)) and r and s != ref:
                cell += f" ({v / r:.2f}×)"
            cells.append(cell.replace("|", "/"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement(res: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """Greedy-token agreement between pairs of systems: identical sequences and first divergence."""
    lines = ["| systems | adapter | identical prompts | tokens before the first difference, per prompt |",
             "|---|---|---|---|"]
    for x, y in pairs:
        tx, ty = res["tokens"].get(x), res["tokens"].get(y)
        if not tx or not ty or "error" in tx or "error" in ty:
            continue
        for label in ("base", "a"):
            same = [p == q for p, q in zip(tx[label], ty[label])]
            first = []
            for p, q in zip(tx[label], ty[label]):
                k = 0
                while k < min(len(p), len(q)) and p[k] == q[k]:
                    k += 1
                first.append(k)
            lines.append(f"| {res['systems'][x]['name']} vs {res['systems'][y]['name']} | "
                         f"{'none' if label == 'base' else 'a'} | {sum(same)}/{len(same)} | {first} |")
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
