"""Commands for adapter updates over TUF: ``edgeadapt repo …`` on the host, ``edgeadapt sync`` on a device.

Only click is imported here; each command imports its work when it runs.
"""

from __future__ import annotations

from pathlib import Path

import click

_REPO = click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
_KEYS = click.option("--keys", "keys", required=True, envvar="EDGEADAPT_REPO_KEYS", show_envvar=True,
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Folder of the repository's private keys (keep it off the server).")
_EXPIRES = click.option("--expires", default="", metavar="7d | ROLE=DURATION,…",
                        help="Lifetimes: a duration sets the timestamp's, ROLE=DURATION any role's (d, h or m).")


def _expiry(spec: str) -> dict[str, float]:
    from edgeadapt.ship.repo import parse_expiry

    return parse_expiry(spec) if spec else {}


@click.group("repo")
def repo_cmd() -> None:
    """Publish adapters as a TUF repository: a folder of static files any web server or CDN can host."""


@repo_cmd.command("init")
@_REPO
@_KEYS
@click.option("--threshold", "thresholds", multiple=True, metavar="ROLE=N",
              help="Signatures a role needs (one key is made per unit), e.g. root=2 targets=2. Default 1 each.")
@_EXPIRES
def repo_init_cmd(repo: Path, keys: Path, thresholds: tuple[str, ...], expires: str) -> None:
    """Create REPO with new Ed25519 keys for root, targets, snapshot and timestamp (written to KEYS, 0600)."""
    from edgeadapt.errors import UpdateError
    from edgeadapt.ship.repo import ROLES, AdapterRepository

    th = {}
    for t in thresholds:
        role, _, n = t.partition("=")
        if role not in ROLES or not n.isdigit() or int(n) < 1:
            raise UpdateError(f"--threshold {t!r}: expected ROLE=N with ROLE one of {', '.join(ROLES)} and N >= 1")
        th[role] = int(n)
    r = AdapterRepository.init(repo, keys, thresholds=th, expiry_days=_expiry(expires))
    root = r.root()
    roles = ", ".join(f"{k} {v.threshold}-of-{len(v.keyids)}" for k, v in root.roles.items())
    click.echo(f"created {repo} (root {roles}); keys in {keys}; devices trust {repo / 'metadata' / '1.root.json'}")


@repo_cmd.command("add")
@_REPO
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_KEYS
@click.option("--keep-older", is_flag=True, help="Keep older versions of the same adapter listed.")
def repo_add_cmd(repo: Path, files: tuple[Path, ...], keys: Path, keep_older: bool) -> None:
    """Make delta FILES targets of REPO (name, version, kind, quant, base read from each file); run `publish` next."""
    from edgeadapt.ship.repo import AdapterRepository

    for x in AdapterRepository(repo, keys).add(files, keep_older=keep_older):
        click.echo(f"added {x.name} version {x.version} ({x.kind}, {x.quant}, {x.length:,} bytes) for base "
                   f"{x.base[7:19]}… as {x.path}")
    click.echo(f"devices see it after: edgeadapt repo publish {repo} --keys {keys}")


@repo_cmd.command("remove")
@_REPO
@click.argument("spec", metavar="NAME[@VERSION]")
@_KEYS
@click.option("--base", default=None,
              help="Only the adapter for this base fingerprint (sha256:… or its first 16 hex digits).")
def repo_remove_cmd(repo: Path, spec: str, keys: Path, base: str | None) -> None:
    """Drop an adapter (every version, or one) from REPO's listing; run `publish` next."""
    from edgeadapt.ship.repo import AdapterRepository

    for p in AdapterRepository(repo, keys).remove(spec, base=base):
        click.echo(f"removed {p}")


@repo_cmd.command("publish")
@_REPO
@_KEYS
@_EXPIRES
def repo_publish_cmd(repo: Path, keys: Path, expires: str) -> None:
    """Sign a new snapshot and timestamp: devices see the current listing. Run it before the timestamp expires."""
    from edgeadapt.ship.repo import AdapterRepository

    r = AdapterRepository(repo, keys, _expiry(expires))
    snap, ts = r.publish()
    click.echo(f"published {repo}: snapshot {snap}, timestamp {ts}, {len(r.listed())} adapters listed")
    for role in r.expiring():
        click.echo(f"warning: {role}; devices refuse it after that: edgeadapt repo resign {repo} "
                   f"{role.split()[0]} --keys KEYDIR", err=True)


@repo_cmd.command("resign")
@_REPO
@click.argument("role", type=click.Choice(["root", "targets"]))
@_KEYS
@_EXPIRES
def repo_resign_cmd(repo: Path, role: str, keys: Path, expires: str) -> None:
    """A new version of ROLE's metadata, same keys, fresh expiry (publish warns 30 days before one expires)."""
    from edgeadapt.ship.repo import AdapterRepository

    v = AdapterRepository(repo, keys, _expiry(expires)).resign(role)
    click.echo(f"re-signed {role}: version {v}")


@repo_cmd.command("rotate")
@_REPO
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp"]))
@_KEYS
def repo_rotate_cmd(repo: Path, role: str, keys: Path) -> None:
    """Replace ROLE's keys: a new root version signed by the old and the new root keys (old keys to KEYS/retired)."""
    from edgeadapt.ship.repo import AdapterRepository

    name = AdapterRepository(repo, keys).rotate(role)
    click.echo(f"rotated {role} keys: {repo / 'metadata' / name} (devices follow the chain from 1.root.json)")


@repo_cmd.command("list")
@_REPO
@click.option("--json", "as_json", is_flag=True, help="Print roles and adapters as one JSON object.")
def repo_list_cmd(repo: Path, as_json: bool) -> None:
    """Roles (version, expiry, keys) and the adapters REPO lists."""
    import json

    from edgeadapt.ship.repo import AdapterRepository, describe

    d = describe(AdapterRepository(repo))
    if as_json:
        click.echo(json.dumps(d))
        return
    for role, r in d["roles"].items():
        click.echo(f"{role:10s} version {r['version']:<4} expires {r['expires']}  {r['threshold']}-of-{len(r['keys'])}")
    for a in d["adapters"]:
        click.echo(f"  {a['name']:24s} v{a['version']:<5} {a['kind']:8s} {a['quant']:5s} base {a['base'][7:19]}… "
                   f"{a['length']:>12,} bytes")


class _Bar:
    """A download progress bar on stderr: ``billing  ████████░░░░  1.2/2.4 MB``."""

    def __init__(self) -> None:
        self.name = None

    def __call__(self, name: str, done: int, total: int) -> None:
        if name != self.name and self.name is not None:
            click.echo("", err=True)
        self.name = name
        n = int(24 * done / max(total, 1))
        bar = "█" * n + "░" * (24 - n)
        click.echo(f"\r{name[:24]:24s} {bar} {done / 1e6:.2f}/{total / 1e6:.2f} MB", err=True, nl=False)
        if done >= total:
            click.echo("", err=True)
            self.name = None


@click.command("sync")
@click.argument("url")
@click.option("--root", "root", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The repository's first root metadata (1.root.json), which this device trusts.")
@click.option("--store", "store", required=True, envvar="EDGEADAPT_STORE", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path), help="The adapter store folder.")
@click.option("--base", "base", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="This device's base folder: only adapters pinned to its fingerprint are fetched.")
@click.option("--only", "only", multiple=True, metavar="NAME[,NAME…]",
              help="Only these adapters (repeatable, or comma-separated).")
@click.option("--prune", is_flag=True, help="Remove installed adapters of this base the repository no longer lists.")
@click.option("--trust", "trust", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Also require delta files signed by these keys (see `edgeadapt keygen`). Repeatable.")
@click.option("--timeout", default=20.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds without a byte before a connection is dropped.")
@click.option("--serve", "serve_url", default=None, metavar="URL",
              help="Then bring a running `edgeadapt serve --store STORE --admin-key KEY` at URL in line: load what "
                   "it does not run at the store's version, unload what was pruned.")
@click.option("--admin-key", default=None, envvar="EDGEADAPT_ADMIN_KEY", show_envvar=True,
              help="The server's --admin-key (for --serve).")
@click.option("--serve-wait", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for running requests to finish with a version before it is replaced.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def sync_cmd(url: str, root: Path, store: Path, base: Path, only: tuple[str, ...], prune: bool,
             trust: tuple[Path, ...], timeout: float, serve_url: str | None, admin_key: str | None,
             serve_wait: float, as_json: bool) -> None:
    """Update STORE from the TUF repository at URL: verified, resumable, atomic; refused updates change nothing.
    With --serve, a running server then serves what the store holds (exit status 1 while some of it could not
    be swapped in yet: in use past --serve-wait, or refused)."""
    if serve_url and not admin_key:
        raise click.UsageError("--serve needs the server's --admin-key (or EDGEADAPT_ADMIN_KEY)")
    from edgeadapt.ship.sync import sync

    ts = None
    if trust:
        from edgeadapt.ship.signing import TrustStore
        ts = TrustStore.load(*trust)
    names = [n.strip() for spec in only for n in spec.split(",") if n.strip()]
    r = sync(url, root=root, store=store, base=base, only=names or None, prune=prune, trust=ts,
             require_signature=bool(trust), progress=None if as_json else _Bar(), timeout=timeout)
    fed = None
    if serve_url:
        from edgeadapt.serve.feed import feed
        from edgeadapt.ship.store import AdapterStore

        st = AdapterStore(store)
        want = {u["name"]: u["version"] for u in r.updated} | {n: st.version(n) for n in r.unchanged}
        fed = feed(serve_url, admin_key, want, r.removed, wait=serve_wait)
    if as_json:
        import json

        click.echo(json.dumps({**r.to_dict(), **({"served": fed.to_dict()} if fed else {})}))
    else:
        click.echo(f"synced {store}: {r.summary()}")
        if fed:
            click.echo(f"server {serve_url}: {fed.summary()}")
    if fed and (fed.kept or fed.failed):
        raise SystemExit(1)


COMMANDS = [repo_cmd, sync_cmd]
