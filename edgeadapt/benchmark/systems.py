"""The systems :mod:`edgeadapt.benchmark.harness` measures, behind one small interface: ``load`` the base, ``add``
an adapter, ``use`` a set of adapters, ``generate`` greedy tokens (and ``mixed`` batches where a system has
them). Each imports its own library when it loads, never at module level."""

from __future__ import annotations

import gc
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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


def import_llama_cpp() -> Any:
    """llama_cpp; with ``EDGEADAPT_LLAMA_EXTRA_BUFTS=0`` its models load without llama.cpp's extra CPU buffer types
    (repacked weights, AMX tiles): ``use_extra_bufts = False``, as llama-server's ``--no-repack``. For a virtual
    machine that reports AMX but traps its instructions (SIGILL when a model is loaded)."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if os.environ.get("EDGEADAPT_LLAMA_EXTRA_BUFTS") == "0" and not hasattr(lib.llama_model_default_params, "no_extra"):
        default = lib.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = False
            return p

        params.no_extra = True  # type: ignore[attr-defined]
        lib.llama_model_default_params = params  # what llama_cpp.Llama reads when it loads a model
    return llama_cpp


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
    def __init__(self, spec: Spec, engine: str, weights: str = "fp32", memory: str | None = None):
        super().__init__(spec)
        self.engine, self.weights, self.memory = engine, weights, memory
        self.name = (f"edgeadapt {engine}" + (f" {weights}" if engine == "ort" else "")
                     + (f" memory={memory}" if memory else ""))
        self.how = (f"edgeadapt.load(engine={engine!r}" + (f", weights={weights!r}" if engine == "ort" else "")
                    + (f", memory={memory!r}" if memory else "") + "), adapters live (mode auto)")

    def load(self) -> None:
        from dataclasses import replace

        import edgeadapt

        kw = {"memory": self.memory} if self.memory else {}  # else load's default policy
        self.m = edgeadapt.load(self.spec.base, engine=self.engine, weights=self.weights, threads=self.spec.threads, **kw)
        self.m.config = replace(self.m.config, eos_token_ids=[])  # fixed-length decoding
        self.m.auto_merge_tokens = None  # the rounds measure live adapters, never an automatic merge

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
        llama_cpp = import_llama_cpp()
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

        from edgeadapt.formats.manifest import read_manifest

        self.np, self.ort = np, ort
        man = read_manifest(self.spec.base)
        self.cfg = man.arch
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.spec.threads
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(_lora_graph(man)), so, providers=["CPUExecutionProvider"])
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

        from edgeadapt.converters.onnx_graphs.genai import genai_config
        from edgeadapt.formats.manifest import read_manifest

        man = read_manifest(self.spec.base)
        self.dir = Path(tempfile.mkdtemp(prefix="genai_"))
        for f in (_lora_graph(man), _lora_graph(man).parent / "model.onnx.data"):
            os.symlink(f.resolve(), self.dir / f.name)  # absolute: a relative target would resolve from self.dir
        cfg = genai_config(man.arch, man.path("onnx_lora").name, threads=self.spec.threads, max_length=self.spec.ctx)
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
        p.set_search_options(max_length=total, do_sample=False)  # min_length would mask EOS, changing the argmax
        g = self.og.Generator(self.model, p)
        if self.active:
            g.set_active_adapter(self.adapters, self.active)
        return g

    def generate(self, prompt: list[int], n: int) -> list[int]:
        g = self._generator(len(prompt) + n)
        g.append_tokens(prompt)
        out = []
        while len(out) < n and not g.is_done():  # genai stops at EOS (the others decode a fixed length)
            g.generate_next_token()
            out.append(int(g.get_next_tokens()[0]))
        return out


def _lora_graph(man: Any) -> Path:
    path = man.path("onnx_lora")
    if path is None or not path.is_file():
        raise Unsupported(f"{man.root} has no model_lora.onnx (written by export-base with the fp32 ONNX graphs)")
    return path


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
    "edgeadapt-ort-int4-fast": lambda s: Edgeadapt(s, "ort", "int4", memory="fast"),  # the memory= trades
    "edgeadapt-ort-int4-low": lambda s: Edgeadapt(s, "ort", "int4", memory="low"),
    "edgeadapt-numpy-low": lambda s: Edgeadapt(s, "numpy", memory="low"),
    "llama-cpp-python": lambda s: LlamaCpp(s),
    "llama.cpp-capi": lambda s: LlamaCpp(s, capi=True),
    "ort-lora-adapter": OrtMultiLora,
    "ort-genai": Genai,
    "peft": Peft,
}


# ---- measurements (inside a worker process)
