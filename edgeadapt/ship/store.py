"""The adapter store on a device: install, list, roll back, remove — atomically.

Layout (one folder per adapter name)::

    STORE/.lock                       advisory lock (POSIX flock) held by every change
    STORE/<name>/state.json           {"current": blob, "previous": blob | null} — the only pointer
    STORE/<name>/v<version>-<sha12>.gguf   immutable, verified delta files ("blobs")

An install copies the file into a temp file beside its destination, fsyncs it, verifies the copy
(integrity, signature policy, version), renames it to its blob name, fsyncs the folder, and only
then replaces ``state.json`` (temp file, fsync, rename, fsync). A process killed at any point
leaves ``state.json`` naming complete, verified blobs: the old version or the new one. Leftover
temp files and unreferenced blobs are swept by the next change. The previous version is kept for
:meth:`AdapterStore.rollback`; versions only go up unless a downgrade is asked for.

Device-safe: standard library, numpy and gguf (through :mod:`edgeadapt.formats.delta`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from edgeadapt.formats.delta import LoraDelta, delta_from_bytes, read_delta
from edgeadapt.errors import AdapterNotFoundError, EdgeAdaptError, FormatError, IntegrityError

STATE = "state.json"
STATE_FORMAT = "edgeadapt.ship.store"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BLOB_RE = re.compile(r"v(\d{1,10})-([0-9a-f]{12})\.gguf")
MAX_STATE_BYTES = 1 << 16
_CHUNK = 1 << 20
# test hook: called with a step label at every point where a crash must be survivable
_crash_hook: Callable[[str], None] | None = None


class DowngradeError(EdgeAdaptError, ValueError):
    """An install would replace an adapter by an older (or different same-numbered) version."""


def _step(label: str) -> None:
    if _crash_hook is not None:
        _crash_hook(label)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Installed:
    name: str
    version: int
    path: Path
    sha256: str
    signature: str  # key id, or "" when unsigned
    previous: int | None  # version kept for rollback


class AdapterStore:
    """A folder of installed adapters; every change is atomic and keeps the previous version."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- reading
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.fullmatch(p.name) and (p / STATE).is_file())

    def _state(self, name: str) -> dict[str, Any] | None:
        p = self.root / name / STATE
        if not p.is_file():
            return None
        if p.stat().st_size > MAX_STATE_BYTES:
            raise FormatError(f"{p}: {p.stat().st_size} bytes is over the {MAX_STATE_BYTES}-byte limit")
        try:
            st = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"{p}: not valid JSON ({e}); remove the adapter with `edgeadapt remove {name}`") from None
        problems = []
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
            problems.append(f"expected format {STATE_FORMAT!r}")
        else:
            for slot in ("current", "previous"):
                blob = st.get(slot)
                if not (blob is None and slot == "previous") and not (isinstance(blob, str) and BLOB_RE.fullmatch(blob)):
                    problems.append(f"{slot}: expected a blob name like v3-0123456789ab.gguf, found {blob!r}")
        if problems:
            raise FormatError(f"{p}: not a store state file: {'; '.join(problems)}; "
                              f"remove the adapter with `edgeadapt remove {name}`")
        return st

    def resolve(self, name: str) -> Path:
        """Path of the installed (current) version of ``name``: pass it to ``Model.add_adapter``."""
        st = self._state(name) if NAME_RE.fullmatch(name) else None
        if st is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} in the store {self.root}; installed: {self.names()}")
        return self.root / name / st["current"]

    def load(self, name: str) -> LoraDelta:
        """The current version of ``name``, read once: its bytes must hash to the content hash in the blob's name
        (a blob changed in place is refused), then they are parsed and verified — what is used is what was checked."""
        path = self.resolve(name)
        data = path.read_bytes()
        want = BLOB_RE.fullmatch(path.name).group(2)  # type: ignore[union-attr]
        if hashlib.sha256(data).hexdigest()[:12] != want:
            raise IntegrityError(f"{path}: expected contents with sha256 {want}…, found "
                                 f"{hashlib.sha256(data).hexdigest()[:12]}…; the installed file was changed — "
                                 f"reinstall it or `edgeadapt rollback {name}`")
        return delta_from_bytes(data, path)

    def open(self, name: str, *, trust: Any = None, require_signature: bool = False) -> LoraDelta:
        """The current version of ``name``, read once (:meth:`load`) and checked against the signature policy
        (:func:`edgeadapt.ship.signing.check_trust`): ``Model.add_adapter(store.open("billing"))``."""
        from edgeadapt.ship.signing import check_trust

        delta = self.load(name)
        check_trust(delta, trust, require_signature)
        return delta

    def version(self, name: str) -> int:
        """The installed version of ``name``, from its blob's name (the file is not read)."""
        return int(BLOB_RE.fullmatch(self.resolve(name).name).group(1))  # type: ignore[union-attr]

    def info(self, name: str) -> Installed:
        path = self.resolve(name)
        st = self._state(name)
        assert st is not None
        d = read_delta(path)
        prev = BLOB_RE.fullmatch(st["previous"]) if st.get("previous") else None
        return Installed(name, d.version, path, BLOB_RE.fullmatch(path.name).group(2),  # type: ignore[union-attr]
                         d.signature.split(":")[1] if d.signature else "", int(prev.group(1)) if prev else None)

    def list(self) -> list[Installed]:
        return [self.info(n) for n in self.names()]

    # ---- changing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as f:
            if os.name == "posix":
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                self._sweep()
                yield
            finally:
                if os.name == "posix":
                    import fcntl

                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove what an interrupted change left behind: temp files, trash, unreferenced blobs."""
        for p in self.root.iterdir():
            if p.name.startswith((".trash-", ".tmp-")):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and NAME_RE.fullmatch(p.name):
                try:
                    st = self._state(p.name)
                except FormatError:
                    continue  # leave a damaged adapter for the user to see and remove
                keep = {STATE} | ({st["current"], st.get("previous")} if st else set())
                for f in p.iterdir():
                    if f.name not in keep and (f.name.startswith(".tmp-") or BLOB_RE.fullmatch(f.name)):
                        f.unlink()
                if st is None and not any(p.iterdir()):
                    p.rmdir()

    def install(self, source: str | os.PathLike, *, trust: Any = None, require_signature: bool = False,
                allow_downgrade: bool = False) -> Installed:
        """Verify and install a delta file under its adapter name; the replaced version is kept."""
        from edgeadapt.ship.signing import check_trust

        source = Path(source)
        if not source.is_file():
            raise FormatError(f"{source}: no such delta file")
        data = source.read_bytes()  # read once: these bytes are verified, hashed and written, nothing else
        delta = delta_from_bytes(data, source)  # refuse bad files before touching the store
        check_trust(delta, trust, require_signature)
        with self._locked():
            return self._install(source, data, delta, allow_downgrade)

    def install_bytes(self, data: bytes, where: str | os.PathLike = "<bytes>", *, trust: Any = None,
                      require_signature: bool = False, allow_downgrade: bool = False) -> Installed:
        """:meth:`install` of a delta file's bytes already in memory: a caller that checked more of them (an update's
        signed metadata, the base pin) parses ``delta_from_bytes(data)`` itself and installs exactly the bytes it
        checked, with no second read of a file. ``where`` names them in messages."""
        from edgeadapt.ship.signing import check_trust

        delta = delta_from_bytes(data, where)
        check_trust(delta, trust, require_signature)
        with self._locked():
            return self._install(Path(where), data, delta, allow_downgrade)

    def _install(self, source: Path, data: bytes, delta: LoraDelta, allow_downgrade: bool) -> Installed:
        tmp_dir = self.root / f".tmp-{os.getpid()}"
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / "incoming.gguf"
        h = hashlib.sha256(data)
        with open(tmp, "wb") as dst:
            for i in range(0, max(len(data), 1), _CHUNK):
                dst.write(data[i:i + _CHUNK])
                _step("copy")
            dst.flush()
            os.fsync(dst.fileno())
        _step("copied")
        try:
            name = delta.name
            if not NAME_RE.fullmatch(name):
                raise FormatError(f"{source}: adapter name {name!r} cannot name a store entry; expected letters, "
                                  "digits, '.', '_' or '-' (up to 64, starting with a letter or digit)")
            st = self._state(name)
            blob = f"v{delta.version}-{h.hexdigest()[:12]}.gguf"
            if st is not None:
                self._check_version(name, st, delta, blob, allow_downgrade)
                if st["current"] == blob:
                    return self.info(name)
            folder = self.root / name
            folder.mkdir(exist_ok=True)
            _step("folder")
            os.replace(tmp, folder / blob)
            _fsync_dir(folder)
            _step("blob")
            self._write_state(name, {"format": STATE_FORMAT, "current": blob,
                                     "previous": st["current"] if st else None})
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        self._sweep()
        return self.info(name)

    @staticmethod
    def _check_version(name: str, st: dict[str, Any], delta: LoraDelta, blob: str, allow_downgrade: bool) -> None:
        cur = BLOB_RE.fullmatch(st["current"])
        assert cur is not None
        have = int(cur.group(1))
        if delta.version < have and not allow_downgrade:
            raise DowngradeError(f"{name}: version {delta.version} is older than the installed version {have}; "
                                 f"refusing to downgrade — use `edgeadapt rollback {name}` to go back to the kept "
                                 "version, or install with --allow-downgrade")
        if delta.version == have and st["current"] != blob:
            raise DowngradeError(f"{name}: version {have} is already installed with different contents; "
                                 "a new release needs a higher version (export with --version)")

    def _write_state(self, name: str, st: dict[str, Any]) -> None:
        folder = self.root / name
        tmp = folder / f".tmp-state-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(st, indent=1))
            f.flush()
            os.fsync(f.fileno())
        _step("state-written")
        os.replace(tmp, folder / STATE)
        _fsync_dir(folder)
        _step("state")

    def rollback(self, name: str) -> Installed:
        """Make the kept previous version current (and keep the one it replaces, to roll forward)."""
        with self._locked():
            st = self._state(name) if NAME_RE.fullmatch(name) else None
            if st is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} in the store {self.root}; installed: {self.names()}")
            if not st.get("previous"):
                raise AdapterNotFoundError(f"{name}: no previous version is kept; nothing to roll back to")
            read_delta(self.root / name / st["previous"])
            self._write_state(name, {"format": STATE_FORMAT, "current": st["previous"], "previous": st["current"]})
        return self.info(name)

    def remove(self, name: str) -> None:
        """Remove an adapter and every version of it."""
        with self._locked():
            if not NAME_RE.fullmatch(name) or self._state(name) is None:
                raise AdapterNotFoundError(f"no adapter named {name!r} in the store {self.root}; installed: {self.names()}")
            trash = self.root / f".trash-{name}-{os.getpid()}"
            os.replace(self.root / name, trash)  # one atomic step: gone, then cleaned up
            _fsync_dir(self.root)
            _step("removed")
            shutil.rmtree(trash, ignore_errors=True)
