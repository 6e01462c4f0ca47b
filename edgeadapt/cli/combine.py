"""``edgeadapt combine``: several adapters pinned to one base -> one delta file (exact or rank-truncated)."""

from __future__ import annotations

from pathlib import Path

import click

METHODS = ("cat", "linear", "svd", "ties", "dare", "dare_ties")  # converters.combine.METHODS (imported lazily)


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.7,0.3, found {text!r}") from None


@click.command("combine")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Delta file to write (.gguf).")
@click.option("--weights", default=None, metavar="W1,W2,…", help="One weight per input, in order (default: 1 each).")
@click.option("--method", default="linear", show_default=True, type=click.Choice(METHODS),
              help="cat / linear: exactly Σ wᵢ·ΔWᵢ; svd: that sum truncated to --rank; ties / dare / dare_ties: "
                   "task-vector merging of the ΔWᵢ, then SVD to --rank. See docs/COMBINE.md.")
@click.option("--rank", default=None, type=int, help="Rank R of svd / ties / dare (default: the largest input rank).")
@click.option("--density", default=None, type=float, help="ties / dare: share of each ΔWᵢ kept, in (0, 1].")
@click.option("--majority-sign", default="total", show_default=True, type=click.Choice(["total", "frequency"]),
              help="ties / dare_ties: elect each entry's sign by the sum of values (total) or of signs (frequency).")
@click.option("--seed", default=0, show_default=True, type=int, help="dare: seed of the random drop masks.")
@click.option("--base", "base", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Base folder: checks every input against it; needed for DoRA / IA3 inputs and PEFT folders.")
@click.option("--name", default=None, help="Adapter name (default: the output file's stem).")
@click.option("--version", "version", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Adapter version of the combined file.")
@click.option("--quant", default="F32", show_default=True, type=click.Choice(["F32", "F16", "Q8_0", "int8", "int4"]),
              help="Factor storage, as export-adapter (llama.cpp reads F32/F16/Q8_0).")
@click.option("--all-modules", is_flag=True, help="Print every target's rank and error (default: the worst 10).")
def combine_cmd(inputs: tuple[Path, ...], out: Path, weights: str | None, method: str, rank: int | None,
                density: float | None, majority_sign: str, seed: int, base: Path | None, name: str | None,
                version: int, quant: str, all_modules: bool) -> None:
    """Combine INPUTS (delta files; PEFT folders with --base) into one delta file pinned to the same base."""
    from edgeadapt.cli.common import _Progress, output_file
    from edgeadapt.converters.combine import combine_files

    output_file(out, suffixes=(".gguf",), what="-o")

    res = combine_files(list(inputs), _weights(weights), out, method=method, base=base, rank=rank, density=density,
                        majority_sign=majority_sign, seed=seed, name=name, version=version, dtype=quant,
                        progress=_Progress("combine"))
    ranks = sorted(set(res.ranks.values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}…{ranks[-1]}"
    click.echo(f"wrote {res.path} ({res.path.stat().st_size / 1e6:.3f} MB): {method}, {len(res.factors)} targets, "
               f"rank {rank_text}, quant {quant}")
    if res.dropped:
        click.echo(f"left out {len(res.dropped)} targets whose combined change is zero: {', '.join(res.dropped)}")
    if res.quant_error:
        q = res.quant_error
        click.echo(f"stored as {quant}: relative error of ΔW against the float32 factors per target "
                   f"(max {max(q.values()):.3e}, mean {sum(q.values()) / len(q):.3e})")
    errs = res.rel_error
    if method in ("cat", "linear"):
        click.echo(f"exact: largest relative difference from Σ wᵢ·ΔWᵢ (float rounding) {max(errs.values()):.1e}")
        return
    worst = sorted(errs, key=errs.get, reverse=True)
    shown = worst if all_modules else worst[:10]
    click.echo(f"truncation to rank {res.rank}: relative error ‖ΔW − BA‖/‖ΔW‖ per target "
               f"(max {max(errs.values()):.3e}, mean {sum(errs.values()) / len(errs):.3e})"
               + ("" if all_modules or len(worst) <= 10 else f"; the worst 10 of {len(worst)} (--all-modules: every one)"))
    width = max(len(t) for t in shown)
    for t in shown:
        click.echo(f"  {t:<{width}}  rank {res.ranks[t]:>4}  {errs[t]:.3e}")


COMMANDS = [combine_cmd]
