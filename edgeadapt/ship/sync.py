"""The device's side of adapter updates: sync a store from a TUF repository (:mod:`edgeadapt.ship.repo`).

``sync(url, root=..., store=..., base=...)``:

1. refresh metadata with tuf's ngclient ``Updater`` from a root the device already trusts (the
   repository's ``1.root.json``; later roots are fetched and verified one by one, each by the one
   before). ngclient refuses rollback, freeze (expired metadata), mix-and-match, metadata signed
   below threshold and metadata longer than allowed. Trusted metadata is kept in
   ``STORE/.tuf/<sha256 of the first root, 16 hex>/`` so the next sync, from any mirror, refuses
   anything older than what it saw;
2. read the listing (every target) and refuse the whole listing if any target's path or custom
   metadata is malformed: a path that is not ``<fp16>/<name>/<name>-v<version>.gguf`` (``../``,
   absolute paths, NUL, …) or custom fields that disagree with it;
3. keep the targets of this device's base (its manifest's fingerprint), newest version per name
   (``only`` narrows the names); refuse a listed version older than the installed one;
4. download each into ``STORE/.tuf/<repo id>/partial/<sha256>.part`` (resumed across interruptions,
   :mod:`edgeadapt.ship.fetch`), verify it with tuf's ``TargetFile.verify_length_and_hashes``, then
   read it as a delta file (its own integrity), check that it says what the signed metadata says
   and that it fits this base (fingerprint, architecture, shapes);
5. only when every download passed, install each atomically with
   :meth:`edgeadapt.ship.store.AdapterStore.install_bytes` of the verified bytes (versions only go up, the previous one is
   kept); ``prune`` then removes store adapters of this base the repository no longer lists.

Any refusal raises :class:`edgeadapt.errors.UpdateError` (or the store's or reader's own error)
before step 5: nothing installed changes. Device-safe: tuf, urllib3, numpy, gguf; no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from edgeadapt.errors import EdgeAdaptError, MissingDependencyError, UpdateError
from edgeadapt.ship.targets import CUSTOM_KEY, TARGET_RE

REFUSED = "nothing installed was changed"


@dataclass
class SyncResult:
    """What one sync changed."""

    updated: list[dict[str, Any]] = field(default_factory=list)  # {name, version, previous, bytes}
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    not_listed: list[str] = field(default_factory=list)  # names given in ``only`` the repository does not list here
    other_bases: int = 0  # targets listed for other bases (never downloaded)
    bytes: int = 0  # body bytes received, metadata and targets
    metadata_bytes: int = 0
    requests: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        up = ", ".join(f"{u['name']} {u['previous'] if u['previous'] is not None else '-'}→{u['version']}"
                       for u in self.updated)
        gone = f", removed {len(self.removed)} ({', '.join(self.removed)})" if self.removed else ""
        gone += f", not listed for this base: {', '.join(self.not_listed)}" if self.not_listed else ""
        return (f"updated {len(self.updated)}{f' ({up})' if up else ''}, unchanged {len(self.unchanged)}{gone}, "
                f"{self.bytes:,} bytes ({self.metadata_bytes:,} metadata), {self.seconds:.2f}s")


@dataclass(frozen=True)
class _Wanted:
    name: str
    version: int
    target: Any  # tuf.api.metadata.TargetFile, verified by ngclient


def _explain(e: Exception, url: str) -> UpdateError:
    """A tuf refusal as one sentence: what was expected, what was found, what to do."""
    from tuf.api import exceptions as x

    said = str(e) or type(e).__name__
    if isinstance(e, x.ExpiredMetadataError):
        what = (f"repository metadata has expired ({said}): the publisher must run `edgeadapt repo publish` "
                "more often than the timestamp expires (a mirror replaying old metadata — a freeze — looks the "
                "same)")
    elif isinstance(e, x.BadVersionNumberError):
        what = f"the repository offers older metadata than this device already trusts — a rollback ({said})"
    elif isinstance(e, x.UnsignedMetadataError):
        what = f"metadata is not signed by a threshold of the keys the trusted root names ({said})"
    elif isinstance(e, x.LengthOrHashMismatchError):
        what = (f"a file does not match the length and hashes the signed metadata gives — wrong or mixed "
                f"metadata versions, or changed bytes under a valid name ({said})")
    elif isinstance(e, x.DownloadLengthMismatchError):
        what = f"the server sent more data than the signed metadata allows — endless data ({said})"
    elif isinstance(e, x.SlowRetrievalError):
        what = f"the server is too slow — slow retrieval ({said}); the partial download is kept and resumed next time"
    elif isinstance(e, x.DownloadHTTPError):
        what = f"HTTP {e.status_code} from the repository ({said}); check URL (it serves REPO's folder)"
    elif isinstance(e, x.DownloadError):
        cause = e.__cause__ or e.__context__
        what = f"the repository could not be read ({said}{f': {cause}' if cause else ''}); check URL and the network"
    else:
        what = f"{type(e).__name__}: {said}"
    return UpdateError(f"sync from {url} refused: {what}; {REFUSED}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if os.name == "posix":
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def _listing(meta_dir: Path, updater, url: str) -> list[tuple[str, Any]]:
    """Every target of the verified top-level targets metadata, each path and custom field checked."""
    from tuf.api.metadata import Metadata

    md = Metadata.from_bytes((meta_dir / "targets.json").read_bytes())  # written by ngclient after verification
    out, problems = [], []
    for path in sorted(md.signed.targets):
        tf = updater.get_targetinfo(path)  # the trusted object, from ngclient
        m = TARGET_RE.fullmatch(path)
        if tf is None:
            problems.append(f"{path!r}: listed but not found through the updater")
            continue
        if m is None:
            problems.append(f"{path!r}: expected <fp16>/<name>/<name>-v<version>.gguf (letters, digits, '.', '_', '-'; "
                            "no '..', no absolute path, no NUL)")
            continue
        c = tf.custom.get(CUSTOM_KEY) if isinstance(tf.custom, dict) else None
        want = {"name": m.group(2), "version": int(m.group(3))}
        if not isinstance(c, dict) or any(c.get(k) != v for k, v in want.items()) or \
                not isinstance(c.get("base"), str) or c["base"].split(":")[-1][:16] != m.group(1):
            problems.append(f"{path!r}: custom metadata {c!r} does not match the path (name, version, base)")
            continue
        out.append((path, tf))
    if problems:
        raise UpdateError(f"sync from {url} refused: the signed listing holds targets this device will not use:\n  "
                          + "\n  ".join(problems[:20]) + f"\n{REFUSED}")
    return out


def sync(url: str, *, root: str | os.PathLike, store: str | os.PathLike, base: str | os.PathLike,
         only: Iterable[str] | None = None, prune: bool = False, trust: Any = None, require_signature: bool = False,
         progress: Callable[[str, int, int], None] | None = None, timeout: float = 20.0, min_rate: float = 2048.0,
         grace: float = 10.0, retries: int = 3) -> SyncResult:
    """Bring ``store`` up to date with the repository at ``url`` for the base folder ``base``.

    ``root``: the repository's first root metadata (``1.root.json``), which the device trusts.
    ``only``: adapter names to consider (default: all for this base). ``prune``: remove store adapters
    of this base that the repository no longer lists. ``trust`` / ``require_signature``: the store's
    signature policy for the delta files themselves. ``progress(name, done, total)`` per download.
    ``timeout``: seconds without a byte before a connection is dropped; a body slower than ``min_rate``
    bytes/s on average after ``grace`` seconds is dropped too (slow retrieval); ``retries``: reconnections
    (resuming) after resets, truncated bodies and 5xx answers.
    Returns a :class:`SyncResult`; raises :class:`UpdateError` (nothing changed) when refused."""
    try:
        from tuf.api import exceptions as tuf_errors
        from tuf.ngclient import Updater
    except ImportError as e:
        raise MissingDependencyError(f"edgeadapt sync needs tuf: pip install 'edgeadapt[update]' ({e})") from None
    from edgeadapt.formats.manifest import read_manifest
    from edgeadapt.ship.fetch import Fetcher
    from edgeadapt.ship.store import AdapterStore

    t0 = time.perf_counter()
    url = url.rstrip("/")
    root_bytes = Path(root).read_bytes()
    manifest = read_manifest(base)
    fp = manifest.fingerprint
    st = AdapterStore(store)
    # a repository is its first root: mirrors of it share what the device has seen (rollback protection)
    cache = Path(store) / ".tuf" / hashlib.sha256(root_bytes).hexdigest()[:16]
    meta_dir, part_dir = cache / "metadata", cache / "partial"
    only = set(only) if only else None
    result = SyncResult()
    fetcher = Fetcher(timeout=timeout, min_rate=min_rate, grace=grace, retries=retries)
    with _locked(cache / ".lock"):
        meta_dir.mkdir(parents=True, exist_ok=True)
        part_dir.mkdir(exist_ok=True)
        try:
            updater = Updater(str(meta_dir), f"{url}/metadata/", None, f"{url}/targets/", fetcher=fetcher,
                              bootstrap=root_bytes)
        except (tuf_errors.RepositoryError, ValueError) as e:
            raise UpdateError(f"sync from {url} refused: {root}: expected the repository's signed root metadata "
                              f"(metadata/1.root.json), found something else ({e}); {REFUSED}") from None
        try:
            updater.refresh()
            listing = _listing(meta_dir, updater, url)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError) as e:
            raise _explain(e, url) from None
        result.metadata_bytes = fetcher.bytes

        # ---- select: this base, newest version per name
        wanted: dict[str, _Wanted] = {}
        for path, tf in listing:
            c = tf.custom[CUSTOM_KEY]
            if c["base"] != fp:
                result.other_bases += 1
                continue
            if only is not None and c["name"] not in only:
                continue
            if c["name"] not in wanted or c["version"] > wanted[c["name"]].version:
                wanted[c["name"]] = _Wanted(c["name"], c["version"], tf)
        listed_here = {tf.custom[CUSTOM_KEY]["name"] for _, tf in listing if tf.custom[CUSTOM_KEY]["base"] == fp}
        result.not_listed = sorted((only or set()) - listed_here)

        # ---- plan against the store (refuse older versions before any byte is downloaded)
        todo, installed = [], _installed(st)
        for w in wanted.values():
            have = installed.get(w.name)
            sha = w.target.hashes.get("sha256", "")
            if have is not None and have.version == w.version and have.sha256 == sha[:12]:
                result.unchanged.append(w.name)
            elif have is not None and have.version >= w.version:
                why = "is older than" if w.version < have.version else "has other contents than"
                raise UpdateError(f"sync from {url} refused: {w.name} version {w.version} in the repository {why} "
                                  f"the installed version {have.version} — a target rollback; a new release needs "
                                  f"a higher version; {REFUSED}")
            else:
                todo.append(w)

        # ---- download and verify everything before installing anything
        ready: list[tuple[_Wanted, Path, bytes]] = []
        for w in todo:
            tf = w.target
            sha = tf.hashes["sha256"]
            part = part_dir / f"{sha}.part"
            dirname, _, basename = tf.path.rpartition("/")
            target_url = f"{url}/targets/{dirname}/{sha}.{basename}"
            cb = (lambda d, n, _name=w.name: progress(_name, d, n)) if progress else None
            got, data = _download_verified(fetcher, target_url, part, tf, cb, url)
            _check_delta(data, part, w, fp, manifest, url, trust, require_signature)
            ready.append((w, part, data))
            result.updated.append({"name": w.name, "version": w.version,
                                   "previous": installed[w.name].version if w.name in installed else None,
                                   "bytes": got})

        # ---- install (each atomic; the store refuses downgrades itself too)
        for w, part, data in ready:
            st.install_bytes(data, w.target.path, trust=trust, require_signature=require_signature)
            part.unlink(missing_ok=True)
        if prune:
            for name, info in installed.items():
                if name not in listed_here and (only is None or name in only) and _pinned_to(info.path, fp):
                    st.remove(name)
                    result.removed.append(name)
        keep = {f"{w.target.hashes['sha256']}.part" for w in todo}
        for p in part_dir.iterdir():
            if p.name not in keep:
                p.unlink(missing_ok=True)
    result.bytes, result.requests = fetcher.bytes, fetcher.requests
    result.seconds = time.perf_counter() - t0
    return result


def _download_verified(fetcher, target_url: str, part: Path, tf, progress, url: str) -> tuple[int, bytes]:
    """Download (resuming) and verify against the signed length and hashes; returns the bytes on the wire and
    the file's bytes, read once: what was verified is what is parsed and installed. A partial file that fails
    is dropped and fetched once more from zero (it may hold bytes of an earlier, bad answer)."""
    from tuf.api import exceptions as x

    got = 0
    for attempt in (0, 1):
        resumed = part.is_file() and part.stat().st_size > 0
        try:
            got += fetcher.download_to(target_url, part, tf.length, progress)
            data = part.read_bytes()
            tf.verify_length_and_hashes(data)
            return got, data
        except x.LengthOrHashMismatchError as e:
            part.unlink(missing_ok=True)
            if attempt or not resumed:
                raise _explain(x.LengthOrHashMismatchError(f"{tf.path}: {e}"), url) from None
        except x.DownloadLengthMismatchError as e:
            part.unlink(missing_ok=True)  # bytes beyond the signed length: nothing of this answer is kept
            raise _explain(x.DownloadLengthMismatchError(f"{tf.path}: {e}"), url) from None
        except x.DownloadError as e:
            raise _explain(e, url) from None
    raise AssertionError("unreachable")


def _check_delta(data: bytes, path: Path, w: _Wanted, fp: str, manifest, url: str, trust: Any,
                 require_signature: bool) -> None:
    """The delta file's own integrity, that it is what the signed metadata says, that it fits this base,
    and the store's signature policy — on the bytes TUF verified, before anything is installed."""
    from edgeadapt.formats.delta import delta_from_bytes
    from edgeadapt.ship.signing import check_trust

    try:
        d = delta_from_bytes(data, path)
        c = w.target.custom[CUSTOM_KEY]
        said = {k: c.get(k) for k in ("name", "version", "kind", "quant", "base")}
        found = {"name": d.name, "version": d.version, "kind": d.kind, "quant": d.quant, "base": d.fingerprint}
        if said != found:
            raise UpdateError(f"{w.target.path}: the signed metadata says {said}, the file says {found}")
        d.check_base(manifest.arch, fp)
        if trust is not None or require_signature:
            check_trust(d, trust, require_signature)
    except EdgeAdaptError as e:
        path.unlink(missing_ok=True)
        said = str(e).replace(str(path), w.target.path)  # name the target, not the download's temp file
        raise UpdateError(f"sync from {url} refused: {said}; {REFUSED}") from None


@dataclass(frozen=True)
class _Have:
    version: int
    sha256: str  # first 12 hex digits, from the blob's name
    path: Path


def _installed(st) -> dict[str, _Have]:
    """What the store holds, from its blob names (``v<version>-<sha12>.gguf``): no file is read."""
    from edgeadapt.ship.store import BLOB_RE

    out = {}
    for name in st.names():
        path = st.resolve(name)
        m = BLOB_RE.fullmatch(path.name)
        if m is not None:
            out[name] = _Have(int(m.group(1)), m.group(2), path)
    return out


def _pinned_to(path: Path, fp: str) -> bool:
    from edgeadapt.formats.delta import read_delta

    try:
        return read_delta(path).fingerprint == fp
    except EdgeAdaptError:
        return False
