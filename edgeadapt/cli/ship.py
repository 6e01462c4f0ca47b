"""Commands for shipping adapters: keys and signatures, the device store, extract and merge.

Only click is imported here; each command imports its work when it runs.
"""

from __future__ import annotations

from pathlib import Path

import click

_STORE = click.option("--store", "store", required=True, envvar="EDGEADAPT_STORE", show_envvar=True,
                      type=click.Path(file_okay=False, path_type=Path), help="The adapter store folder.")
_TRUST = click.option("--trust", "trust", multiple=True, type=click.Path(exists=True, path_type=Path),
                      help="Trusted public keys: a .pub file, a file of key lines, or a folder of .pub files. Repeatable.")


def _trust_store(paths: tuple[Path, ...]):
    if not paths:
        return None
    from edgeadapt.ship.signing import TrustStore

    return TrustStore.load(*paths)


def _echo_report(report, as_json: bool = False) -> None:
    if as_json:
        import json

        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo("\n".join(report.lines()))


# ---- keys and signatures
@click.command("keygen")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--comment", default="", help="Who the key belongs to (default: OUT's name).")
def keygen_cmd(out: Path, comment: str) -> None:
    """Make an Ed25519 key pair: OUT.key (private, keep it off devices) and OUT.pub (ship it)."""
    from edgeadapt.ship.signing import PublicKey, generate_keypair

    priv, pub = generate_keypair(out, comment)
    kid = PublicKey.parse(pub.read_text(), str(pub)).key_id
    click.echo(f"wrote {priv} (private, mode 0600) and {pub} (public), key id {kid}")


@click.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="OUT.key from keygen.")
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of in place.")
def sign_cmd(file: Path, key: Path, out: Path | None) -> None:
    """Sign a delta file (checked first; a version-1 file is re-written as version 2)."""
    from edgeadapt.cli.common import output_file
    from edgeadapt.ship.signing import sign_delta

    if out is not None:
        output_file(out, suffixes=(".gguf",), what="-o")

    info = sign_delta(file, key, out)
    click.echo(f"signed {info.path} with key {info.key_id}")


@click.command("verify")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@_TRUST
def verify_cmd(file: Path, trust: tuple[Path, ...]) -> None:
    """Check a delta file (integrity always, the signature against --trust when given), or a base
    folder (its fingerprint recomputed from the float32 weights)."""
    from edgeadapt.formats.delta import read_delta
    from edgeadapt.ship.signing import verify_base, verify_delta

    if file.is_dir():
        source = verify_base(file)
        click.echo(f"{file}: base fingerprint ok (recomputed from {source})")
        return
    d = read_delta(file)
    head = f"{file}: adapter {d.name!r} version {d.version} ({d.quant}), integrity ok"
    if not trust:
        signed = f"signed by key {d.signature.split(':')[1]} (not checked: no --trust)" if d.signature else "unsigned"
        click.echo(f"{head}, {signed}")
        return
    info = verify_delta(d, _trust_store(trust))
    click.echo(f"{head}, signature ok: key {info.key_id} ({info.signer or 'no comment'})")


# ---- the device store
@click.command("install")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_STORE
@_TRUST
@click.option("--require-signature", is_flag=True, help="Refuse files without a signature from a trusted key.")
@click.option("--allow-downgrade", is_flag=True, help="Install even if it is older than the installed version.")
def install_cmd(file: Path, store: Path, trust: tuple[Path, ...], require_signature: bool, allow_downgrade: bool) -> None:
    """Verify FILE and install it atomically under its adapter name; the replaced version is kept."""
    from edgeadapt.ship.store import AdapterStore

    got = AdapterStore(store).install(file, trust=_trust_store(trust), require_signature=require_signature,
                                      allow_downgrade=allow_downgrade)
    prev = f", previous version {got.previous} kept" if got.previous is not None else ""
    signed = f"signed by {got.signature}" if got.signature else "unsigned"
    click.echo(f"installed {got.name} version {got.version}{prev} ({signed})")


@click.command("list")
@_STORE
def list_cmd(store: Path) -> None:
    """List installed adapters."""
    from edgeadapt.ship.store import AdapterStore

    items = AdapterStore(store).list()
    if not items:
        click.echo(f"no adapters in {store}")
    for it in items:
        click.echo(f"{it.name:24s} version {it.version:<6d} previous {it.previous if it.previous is not None else '-':<6} "
                   f"{'signed ' + it.signature if it.signature else 'unsigned':24s} {it.path.stat().st_size:>12,} bytes")


@click.command("rollback")
@click.argument("name")
@_STORE
def rollback_cmd(name: str, store: Path) -> None:
    """Make the kept previous version of NAME current again."""
    from edgeadapt.ship.store import AdapterStore

    got = AdapterStore(store).rollback(name)
    click.echo(f"{name}: version {got.version} is current again (version {got.previous} kept)")


@click.command("remove")
@click.argument("name")
@_STORE
def remove_cmd(name: str, store: Path) -> None:
    """Remove NAME and every kept version of it."""
    from edgeadapt.ship.store import AdapterStore

    AdapterStore(store).remove(name)
    click.echo(f"removed {name}")


# ---- extract and merge
@click.command("extract")
@click.argument("finetuned", type=click.Path(exists=True, path_type=Path))
@click.option("--base", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Base folder.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Delta file to write.")
@click.option("--rank", type=click.IntRange(1), default=None, help="Keep this rank for every weight.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Keep the smallest rank holding this share of each ΔW's energy (Σσ²), e.g. 0.99.")
@click.option("--max-rank", type=click.IntRange(1), default=None, help="Cap for --energy.")
@click.option("--name", default=None, help="Adapter name (default: the output file's stem).")
@click.option("--version", "version", default=1, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Adapter version (a device store keeps versions monotonic).")
@click.option("--quant", default="F32", show_default=True, type=click.Choice(["F32", "F16", "Q8_0", "int8", "int4"]),
              help="Factor storage of the delta file.")
@click.option("--report/--no-report", default=True, show_default=True, help="Measure the output error (runs the model).")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "ort", "numpy"]),
              help="Engine the error report runs on.")
def extract_cmd(finetuned: Path, base: Path, out: Path, rank: int | None, energy: float | None, max_rank: int | None,
                name: str | None, version: int, quant: str, report: bool, engine: str) -> None:
    """Turn a fully fine-tuned model (HF folder, .gguf or base folder) into a low-rank delta by SVD of W_ft − W_base."""
    from edgeadapt.cli.common import output_file
    from edgeadapt.converters.extract import extract_delta, extract_report

    output_file(out, suffixes=(".gguf",), what="-o")

    r = extract_delta(finetuned, base, out, rank=rank, energy=energy, max_rank=max_rank, name=name, version=version,
                      dtype=quant)
    ks, es = sorted(r.ranks.values()), sorted(r.energy.values())
    click.echo(f"wrote {out} ({out.stat().st_size:,} bytes): {len(ks)} weights, rank {ks[0]}…{ks[-1]} "
               f"(median {ks[len(ks) // 2]}), energy kept {es[0]:.4f}…{es[-1]:.4f}")
    if r.untouched:
        click.echo(f"unchanged linear weights left out: {len(r.untouched)}")
    for t, d in r.not_carried:
        click.echo(f"warning: {t} changed (max |Δ| {d:.3g}) but a LoRA delta cannot carry it")
    if report:
        _echo_report(extract_report(r, base, engine=engine))


@click.command("merge")
@click.argument("base", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Merged base folder.")
@click.option("--no-onnx", is_flag=True, help="Write only model.gguf.")
@click.option("--report/--no-report", default=True, show_default=True, help="Measure the output error (runs the model).")
def merge_cmd(base: Path, adapters: tuple[str, ...], out: Path, no_onnx: bool, report: bool) -> None:
    """Fold ADAPTERS (FILE[:WEIGHT] …) into BASE and write a new base folder OUT (fp32 merge, re-quantized)."""
    from edgeadapt.cli.common import _file_weight, output_folder
    from edgeadapt.converters.merge import merge_adapters, merge_report

    output_folder(out, what="-o")

    specs = [_file_weight(a) for a in adapters]
    m = merge_adapters(base, specs, out, onnx=not no_onnx)
    click.echo(f"wrote merged base {out} ({', '.join(m.files.values())}), fingerprint {m.fingerprint[:19]}…, "
               f"from {m.merged_from['base']['fingerprint'][:19]}… + "
               + ", ".join(f"{a['name']} v{a['version']}×{a['weight']:g}" for a in m.merged_from["adapters"]))
    if report:
        _echo_report(merge_report(base, specs, out))


COMMANDS = [keygen_cmd, sign_cmd, verify_cmd, install_cmd, list_cmd, rollback_cmd, remove_cmd, extract_cmd, merge_cmd]
