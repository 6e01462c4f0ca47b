"""``edgeadapt bench``: the comparison figures of bench/compare.py for your own base and adapters."""

from __future__ import annotations

from pathlib import Path

import click

DEFAULT_SYSTEMS = ("edgeadapt-ort-int4,edgeadapt-ort-fp32,edgeadapt-numpy,llama-cpp-python,llama.cpp-capi,"
                   "ort-lora-adapter,ort-genai")


@click.command("bench")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--adapter", "adapters", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
              help="Delta file (.gguf). Give two to measure two different adapters stacked (one is stacked on itself).")
@click.option("--systems", default=None, show_default=DEFAULT_SYSTEMS + " (those the base folder can run)",
              help="Comma-separated; also: peft (needs --hf and --peft).")
@click.option("--gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The GGUF llama.cpp runs (default: BASE/model.gguf).")
@click.option("--hf", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The base as a Hugging Face folder, for the peft system.")
@click.option("--peft", "pefts", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="PEFT folders of the adapters, in --adapter order, for the peft system.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Alternated rounds per system.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1), help="Threads every system may use.")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1), help="Tokens decoded per round.")
@click.option("--prompt", default="Where is my invoice? I paid last week but my account still shows it as due.",
              show_default=True, help="The prompt every system answers.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write the Markdown report here.")
def bench_cmd(base: Path, adapters: tuple[Path, ...], systems: str | None, gguf: Path | None, hf: Path | None,
              pefts: tuple[Path, ...], rounds: int, threads: int, new_tokens: int, prompt: str, out: Path | None) -> None:
    """Measure BASE with your adapters on edgeadapt's engines and on the systems you would use instead:
    cold start, adapter load and swap, prefill / decode tok/s (no adapter, one, two stacked), mixed
    batches, peak memory with 1 and 10 adapters. Systems alternate round by round; medians."""
    import tempfile

    from edgeadapt.benchmark.harness import Spec, agreement, reference, run, table
    from edgeadapt.formats.delta import read_delta
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.formats.onnx_adapter import write_onnx_adapter

    base = base.resolve()  # the workers and onnxruntime-genai's folder of links resolve paths from elsewhere
    man = read_manifest(base)
    chosen, skipped = _systems(man, systems)
    tmp = Path(tempfile.mkdtemp(prefix="edgeadapt_bench_"))
    files = {}
    for i, path in enumerate(adapters[:2]):
        delta = read_delta(path)
        delta.check_base(man.arch, man.fingerprint)
        files[path] = {"gguf": str(Path(path).resolve()),
                       "onnx_adapter": str(write_onnx_adapter(delta, tmp / f"{i}.onnx_adapter"))}
        if i < len(pefts):
            files[path]["peft"] = str(pefts[i])
    order = list(adapters[:2]) * 10  # "a", "b", then copies for the 10-adapter memory figure
    spec_adapters = {k: files[order[i] if i < 2 else order[0]] for i, k in enumerate("abcdefghij")}
    ids = _prompt_ids(man, prompt)
    spec = Spec(base=str(base), gguf=str(Path(gguf or man.path("gguf")).resolve()), adapters=spec_adapters,
                prompt=ids, prompts=[ids, ids[: max(4, len(ids) // 2)], ids[: max(3, len(ids) // 3)]],
                hf=str(Path(hf).resolve()) if hf else None, new_tokens=new_tokens, threads=threads)
    for s, why in skipped:
        click.echo(f"skipped {s}: {why}", err=True)
    res = run(spec, chosen, rounds=rounds, log=lambda s: click.echo(s, err=True))
    names = list(res["systems"])
    ref = reference(res, ["edgeadapt-ort-int4", "edgeadapt-ort-fp32", "edgeadapt-numpy"])
    ratio = (f"(×k) = value / {res['systems'][ref]['name']}'s." if ref else "no system gave figures, so no ratios.")
    text = "\n".join([f"# edgeadapt bench {base}", "",
                      f"{rounds} rounds, medians, {threads} threads, {new_tokens} new tokens after {len(ids)} prompt "
                      f"tokens; {ratio}", "", table(res, ref), "",
                      agreement(res, [(ref, s) for s in names if ref and s != ref])]
                     + ([""] + [f"Not run: {s} ({why})." for s, why in skipped] if skipped else []))
    click.echo(text)
    if out:
        Path(out).write_text(text + "\n")


def _systems(man, systems: str | None) -> tuple[list[str], list[tuple[str, str]]]:
    """The systems to run and, when none were named, the default ones this base folder cannot run, with why."""
    from edgeadapt.benchmark.systems import SYSTEMS
    from edgeadapt.errors import UsageError

    if systems is not None:
        chosen = [s.strip() for s in systems.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in SYSTEMS]
        if unknown or not chosen:
            raise UsageError(f"--systems: expected a comma-separated list of {', '.join(SYSTEMS)}; found {systems!r}")
        return chosen, []

    def missing(kind: str) -> bool:
        p = man.path(kind)
        return p is None or not p.is_file()
    needs = {"edgeadapt-ort-int4": ("onnx_int4", "no model_int4.onnx (export-base … --onnx-quant int4)"),
             "edgeadapt-ort-fp32": ("onnx", "no model.onnx (exported with --no-onnx)"),
             "ort-lora-adapter": ("onnx_lora", "no model_lora.onnx"), "ort-genai": ("onnx_lora", "no model_lora.onnx")}
    chosen, skipped = [], []
    for s in DEFAULT_SYSTEMS.split(","):
        if s in needs and missing(needs[s][0]):
            skipped.append((s, needs[s][1]))
        else:
            chosen.append(s)
    return chosen, skipped


def _prompt_ids(man, prompt: str) -> list[int]:
    path = man.path("tokenizer")
    if path is None or not path.is_file():
        return [(7 * j) % max(man.arch.vocab_size - 3, 1) + 3 for j in range(32)]
    from edgeadapt.runtime.tokenizer import Tokenizer

    tok = Tokenizer(path, chat_template=man.chat_template, special=man.special_tokens)
    if tok.chat_template:
        return tok.encode_raw(tok.render_chat([{"role": "user", "content": prompt}]))
    return tok.encode(prompt)


COMMANDS = [bench_cmd]
