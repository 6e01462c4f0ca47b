"""Adapter updates over TUF on SmolLM2-135M-Instruct: bytes on the wire, sync seconds, resume.

    python bench/update.py          # results printed and written to bench/results/update.md

A repository is served by nginx on loopback (Debian's nginx-light; tests/netfaults.py starts it);
bytes on the wire are nginx's ``$bytes_sent`` (headers and bodies) from its access log. Figures:
one demo adapter (examples/adapters/billing) updated as int8 and as F16 against PEFT's
adapter_model.safetensors; the metadata of each sync; a 10-adapter first sync; a sync with nothing
new; the bytes sent again after a download is cut at 50 % (through tests/netfaults.py's proxy).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))


def prepare(cache: Path) -> dict[str, Path]:
    from edgeadapt.cli.demo import smollm2_gguf
    from edgeadapt.converters.export_base import export_base
    from edgeadapt.converters.peft.lora import convert_peft
    from edgeadapt.formats.manifest import read_manifest

    base = cache / "base"
    if not (base / "manifest.json").is_file():
        export_base(smollm2_gguf(), base, gguf_type="source", onnx=False)
    man = read_manifest(base)
    out = {"base": base}
    for quant in ("int8", "F16"):
        for v in (1, 2):
            p = cache / f"billing-{quant}-v{v}.gguf"
            if not p.is_file():
                convert_peft(ROOT / "examples" / "adapters" / "billing", man, p, name=f"billing-{quant}", version=v,
                             dtype=quant, description=f"release {v}")
            out[f"{quant}-v{v}"] = p
    for i in range(10):
        src = ["billing", "tech", "account"][i % 3]
        p = cache / f"fleet-{i}.gguf"
        if not p.is_file():
            convert_peft(ROOT / "examples" / "adapters" / src, man, p, name=f"fleet-{i}", version=1, dtype="int8")
        out[f"fleet-{i}"] = p
    return out


def wire(ng, since: int) -> tuple[int, int, int]:
    """(metadata bytes, target bytes, requests) nginx sent since log line ``since``."""
    meta = tgt = 0
    rows = ng.log()[since:]
    for uri, _status, sent, _rng in rows:
        if "/metadata/" in uri:
            meta += sent
        else:
            tgt += sent
    return meta, tgt, len(rows)


def main() -> None:
    from netfaults import FaultProxy, Nginx

    from edgeadapt.ship.repo import AdapterRepository
    from edgeadapt.ship.sync import sync

    files = prepare(HERE / ".cache" / "update")
    base = files["base"]
    peft = (ROOT / "examples" / "adapters" / "billing" / "adapter_model.safetensors").stat().st_size
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        www = tmp / "www"
        www.mkdir()
        ng = Nginx(www)
        if ng.url is None:
            raise SystemExit(f"nginx: {ng.why_not}")
        proxy = FaultProxy(ng.port)
        try:
            # ---- one adapter updated: int8 and F16
            for quant in ("int8", "F16"):
                repo = www / f"one-{quant}"
                r = AdapterRepository.init(repo, tmp / f"keys-{quant}")
                r.add([files[f"{quant}-v1"]])
                r.publish()
                store, rootf = tmp / f"store-{quant}", repo / "metadata" / "1.root.json"
                sync(f"{ng.url}/{repo.name}", root=rootf, store=store, base=base)
                r.add([files[f"{quant}-v2"]])
                r.publish()
                n = len(ng.log())
                res = sync(f"{ng.url}/{repo.name}", root=rootf, store=store, base=base)
                meta, tgt, reqs = wire(ng, n)
                size = files[f"{quant}-v2"].stat().st_size
                rows.append(f"| update billing {quant} v1→v2 | {size:,} | {tgt:,} | {meta:,} | {meta + tgt:,} | "
                            f"{(meta + tgt) / peft:.2f}× | {reqs} | {res.seconds:.3f} |")
            one_rows = list(rows)

            # ---- ten adapters, first sync; then nothing new
            repo = www / "fleet"
            r = AdapterRepository.init(repo, tmp / "keys-fleet")
            r.add([files[f"fleet-{i}"] for i in range(10)])
            r.publish()
            rootf = repo / "metadata" / "1.root.json"
            first, noop, first_meta, first_tgt = [], [], 0, 0
            for k in range(3):
                store = tmp / f"store-fleet-{k}"
                n = len(ng.log())
                first.append(sync(f"{ng.url}/fleet", root=rootf, store=store, base=base).seconds)
                first_meta, first_tgt, _ = wire(ng, n)
                for _ in range(3):
                    n = len(ng.log())
                    res = sync(f"{ng.url}/fleet", root=rootf, store=store, base=base)
                    assert not res.updated
                    noop.append((res.seconds, sum(wire(ng, n)[:2]), wire(ng, n)[2]))
            targets_json = max((repo / "metadata").glob("*.targets.json"),
                               key=lambda p: int(p.name.split(".")[0])).stat().st_size

            # ---- resume after a cut at 50 %
            repo = www / "one-F16"
            store, rootf = tmp / "store-resume", repo / "metadata" / "1.root.json"
            proxy.add("reset", "/targets/", at=0.5)
            try:
                sync(f"{proxy.url}/one-F16", root=rootf, store=store, base=base, retries=0)
                raise SystemExit("the cut download did not fail")
            except Exception as e:  # noqa: BLE001
                if "could not be read" not in str(e):
                    raise
            size = files["F16-v2"].stat().st_size
            n = len(ng.log())
            sync(f"{proxy.url}/one-F16", root=rootf, store=store, base=base)
            _, again, _ = wire(ng, n)
        finally:
            proxy.close()
            ng.stop()

    lines = [
        "# Adapter updates over TUF: bytes on the wire and sync time (SmolLM2-135M-Instruct, nginx on loopback)",
        "",
        "`python bench/update.py`. Bytes are nginx's `$bytes_sent` (headers + bodies) from its access log; "
        "one sync = the look for a next root (404), timestamp, snapshot, targets, then the files. "
        f"PEFT's `examples/adapters/billing/adapter_model.safetensors`: {peft:,} bytes. Machine: "
        f"{os.cpu_count()} cores shared with other jobs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| update | delta file bytes | file on the wire | metadata on the wire | total | vs PEFT safetensors | requests | seconds |",
        "|---|---|---|---|---|---|---|---|",
        *one_rows,
        "",
        f"10 adapters (int8, billing/tech/account converted under 10 names), first sync into an empty store: "
        f"median {statistics.median(first):.3f} s over 3 stores ({first_tgt:,} bytes of files, {first_meta:,} bytes "
        f"of metadata; targets.json listing 10 adapters: {targets_json:,} bytes).",
        "",
        f"Sync with nothing new (9 runs): median {statistics.median(x[0] for x in noop):.4f} s, "
        f"{statistics.median(x[1] for x in noop):,.0f} bytes on the wire in {noop[0][2]} requests "
        "(the 404 for the next root and timestamp.json).",
        "",
        f"Resume: the F16 file ({size:,} bytes) cut at 50 % by the proxy (connection reset); the next sync asked "
        f"`Range: bytes=N-` and nginx sent {again:,} bytes for it ({again / size:.1%} of the file, headers included).",
    ]
    out = HERE / "results" / "update.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
