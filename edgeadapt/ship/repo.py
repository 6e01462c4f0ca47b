"""The publisher's side of adapter updates: a TUF repository of delta files, as plain static files.

Layout (any static web server, object store or CDN serves it as it is; nothing runs there)::

    REPO/metadata/1.root.json             the first root: copy it to devices (``sync --root``)
    REPO/metadata/<N>.root.json           every later root, each signed by the old and the new root keys
    REPO/metadata/<N>.targets.json        one file per version (consistent snapshots: never overwritten)
    REPO/metadata/<N>.snapshot.json
    REPO/metadata/timestamp.json          the only file that changes in place: written last
    REPO/targets/<fp16>/<name>/<sha256>.<name>-v<version>.gguf   delta files, named by their content

    KEYDIR/<role>-<keyid16>.key           Ed25519 private keys (PKCS#8 PEM, mode 0600), outside REPO
    KEYDIR/retired/                       keys rotated out (kept: an old root key signs the next root)

A target's path is ``<fp16>/<name>/<name>-v<version>.gguf`` (fp16: the first 16 hex digits of the base
fingerprint) and its ``custom`` field is ``{"edgeadapt": {"name", "version", "kind", "quant", "base",
"signed_by"}}``, every value read from the delta file itself (:func:`edgeadapt.formats.delta.read_delta`,
which checks the file's integrity first). The file is copied byte for byte, so its own edgeadapt
signature stays valid. ``add`` and ``remove`` write a new targets version; devices see it only after
``publish`` writes the snapshot and then the timestamp, so several changes reach devices as one release.

Host side: imports ``tuf`` (``tuf.api.metadata``, ``tuf.repository``) and ``securesystemslib``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from edgeadapt.errors import FormatError, MissingDependencyError, UpdateError
from edgeadapt.ship.targets import CUSTOM_KEY, TARGET_RE, target_path  # noqa: F401 (re-exported)

try:  # the publisher is a tuf.repository.Repository; without tuf, _tuf() names the install on first use
    from tuf.repository import Repository
except ImportError:  # pragma: no cover
    Repository = object  # type: ignore[assignment,misc]

ROLES = ("root", "targets", "snapshot", "timestamp")
EXPIRY_DAYS = {"root": 365.0, "targets": 365.0, "snapshot": 30.0, "timestamp": 7.0}
_KEY_RE = re.compile(r"(root|targets|snapshot|timestamp)-([0-9a-f]{16})\.key")


def _tuf():
    try:
        import securesystemslib.signer  # noqa: F401  (imported to fail early and name the extra)
        import tuf.api.metadata  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"publishing adapter updates needs tuf: pip install 'edgeadapt[update]' "
                                     f"({e})") from None


def _write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644 if mode is None else mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def parse_expiry(spec: str) -> dict[str, float]:
    """``7d`` / ``12h`` (the timestamp's lifetime) or ``snapshot=30d,timestamp=1d`` -> {role: days}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        role, _, val = part.rpartition("=")
        role = role or "timestamp"
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([dhm]?)", val)
        if role not in ROLES or m is None:
            raise UpdateError(f"--expires {spec!r}: expected DURATION or ROLE=DURATION (ROLE one of {', '.join(ROLES)}, "
                              f"DURATION like 7d, 12h or 30m), found {part!r}")
        out[role] = float(m.group(1)) / {"d": 1, "": 1, "h": 24, "m": 1440}[m.group(2)]
    return out


# ---- keys
def _key_files(keydir: Path) -> dict[str, Any]:
    """Every private key in KEYDIR (not retired/), by key id."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    out = {}
    for p in sorted(keydir.glob("*.key")) + sorted((keydir / "retired").glob("*.key")):
        if _KEY_RE.fullmatch(p.name):
            s = CryptoSigner(load_pem_private_key(p.read_bytes(), None))
            out[s.public_key.keyid] = s
    return out


def _new_key(keydir: Path, role: str):
    from securesystemslib.signer import CryptoSigner

    s = CryptoSigner.generate_ed25519()
    keydir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(keydir / f"{role}-{s.public_key.keyid[:16]}.key", s.private_bytes, mode=0o600)
    return s


@dataclass(frozen=True)
class Listed:
    """One adapter a repository lists."""

    path: str
    name: str
    version: int
    kind: str
    quant: str
    base: str
    length: int


class AdapterRepository(Repository):
    """A TUF repository of delta files in a folder; keys in KEYDIR. Every change signs what it writes.

    A ``tuf.repository.Repository``: :meth:`open` / :meth:`close` read and write role metadata
    (consistent snapshots), so tuf's own ``edit``, ``do_snapshot`` and ``do_timestamp`` drive publishing."""

    def __init__(self, root: str | os.PathLike, keydir: str | os.PathLike | None = None,
                 expiry_days: dict[str, float] | None = None):
        _tuf()
        self.dir = Path(root)
        self.meta = self.dir / "metadata"
        self.keydir = Path(keydir) if keydir is not None else None
        self.expiry = {**EXPIRY_DAYS, **(expiry_days or {})}
        if not (self.meta / "1.root.json").is_file():
            raise UpdateError(f"{self.dir}: not an adapter repository (no metadata/1.root.json); "
                              f"create one with `edgeadapt repo init {self.dir} --keys KEYDIR`")

    # ---- create
    @classmethod
    def init(cls, root: str | os.PathLike, keydir: str | os.PathLike, *, thresholds: dict[str, int] | None = None,
             expiry_days: dict[str, float] | None = None) -> "AdapterRepository":
        """A new repository: one key per threshold unit for each role, root version 1, empty targets."""
        _tuf()
        from tuf.api.metadata import Metadata, Role, Root

        root, keydir = Path(root), Path(keydir)
        if (root / "metadata").exists():
            raise UpdateError(f"{root}: a repository is already there (metadata/ exists); use it, or choose a "
                              "new folder")
        if keydir.resolve().is_relative_to(root.resolve()):
            raise UpdateError(f"keys must not live inside the repository a server publishes: {keydir} is under {root}; "
                              "choose a KEYDIR outside it")
        th = {r: 1 for r in ROLES} | (thresholds or {})
        md = Metadata(Root(expires=_now()))
        for role in ROLES:
            md.signed.roles[role] = Role([], th[role])
            for _ in range(th[role]):
                md.signed.add_key(_new_key(keydir, role).public_key, role)
        (root / "metadata").mkdir(parents=True)
        (root / "targets").mkdir(exist_ok=True)
        repo = cls.__new__(cls)
        repo.dir, repo.meta, repo.keydir = root, root / "metadata", keydir
        repo.expiry = {**EXPIRY_DAYS, **(expiry_days or {})}
        md.signed.version = 0
        repo._close("root", md)
        repo._close("targets", repo._open("targets"))
        repo.publish(force=True)
        return repo

    # ---- reading
    def _latest(self, role: str) -> Path | None:
        if role == "timestamp":
            p = self.meta / "timestamp.json"
            return p if p.is_file() else None
        found = [(int(p.name.split(".")[0]), p) for p in self.meta.glob(f"*.{role}.json")
                 if p.name.split(".")[0].isdigit()]
        return max(found)[1] if found else None

    def _open(self, role: str):
        from tuf.api.metadata import Metadata, Snapshot, Targets, Timestamp

        p = self._latest(role)
        if p is not None:
            return Metadata.from_bytes(p.read_bytes())
        md = Metadata({"targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp}[role]())
        md.signed.version = 0
        return md

    # ---- tuf.repository.Repository
    def open(self, role: str):
        return self._open(role)

    def close(self, role: str, md) -> None:
        self._close(role, md)

    @property
    def targets_infos(self):
        return {"targets.json": self._meta_file("targets")}

    @property
    def snapshot_info(self):
        return self._meta_file("snapshot")

    def listed(self) -> list[Listed]:
        out = []
        for path, tf in sorted(self.targets().targets.items()):
            c = tf.custom.get(CUSTOM_KEY, {}) if isinstance(tf.custom, dict) else {}
            out.append(Listed(path, c.get("name", "?"), int(c.get("version", -1)), c.get("kind", "?"),
                              c.get("quant", "?"), c.get("base", "?"), tf.length))
        return out

    # ---- writing (sign with every key of the role KEYDIR holds; refuse below threshold)
    def _signers(self, role: str, root) -> list[Any]:
        if self.keydir is None:
            raise UpdateError(f"signing {role} metadata needs its private key: pass --keys KEYDIR")
        keys = _key_files(self.keydir)
        r = root.roles[role]
        have = [keys[k] for k in r.keyids if k in keys]
        if len(have) < r.threshold:
            raise UpdateError(f"{role}: {len(have)} of its keys are in {self.keydir}, its threshold is {r.threshold} "
                              f"(key ids {', '.join(k[:16] for k in r.keyids)}); put the missing "
                              f"{role}-<keyid16>.key files there")
        return have

    def _close(self, role: str, md, *, sign_with: Iterable[Any] = ()) -> None:
        from tuf.api.serialization.json import JSONSerializer

        root = md.signed if role == "root" else self.root()
        md.signed.version += 1
        md.signed.expires = _now() + timedelta(days=self.expiry[role])
        md.signatures.clear()
        seen = set()
        for s in [*self._signers(role, root), *sign_with]:
            if s.public_key.keyid not in seen:
                seen.add(s.public_key.keyid)
                md.sign(s, append=True)
        data = md.to_bytes(JSONSerializer(compact=True))
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        _write_atomic(self.meta / name, data)

    def _meta_file(self, role: str):
        from tuf.api.metadata import MetaFile

        p = self._latest(role)
        data = p.read_bytes()
        return MetaFile(version=int(p.name.split(".")[0]), length=len(data),
                        hashes={"sha256": hashlib.sha256(data).hexdigest()})

    def add(self, files: Iterable[str | os.PathLike], *, keep_older: bool = False) -> list[Listed]:
        """Make delta files targets (read and checked first); older versions of the same adapter for the
        same base leave the listing unless ``keep_older``. Devices see them after :meth:`publish`."""
        from tuf.api.metadata import TargetFile

        from edgeadapt.formats.delta import delta_from_bytes

        md = self._open("targets")
        added = []
        for f in map(Path, files):
            if not f.is_file():
                raise FormatError(f"{f}: no such delta file")
            data = f.read_bytes()  # read once: the bytes checked are the bytes hashed and published
            d = delta_from_bytes(data, f)  # integrity (and the file's shape) checked before anything is published
            sig = d.signature.split(":")[1] if d.signature else ""
            path = target_path(d.fingerprint, d.name, d.version)
            if not TARGET_RE.fullmatch(path):
                raise UpdateError(f"{f}: adapter name {d.name!r} cannot name a target; expected letters, digits, '.', "
                                  "'_' or '-' (up to 64, starting with a letter or digit)")
            tf = TargetFile.from_data(path, data, ["sha256"])
            old = md.signed.targets.get(path)
            if old is not None and old.hashes != tf.hashes:
                raise UpdateError(f"{f}: {d.name} version {d.version} for this base is already published with other "
                                  "contents; a new release needs a higher version (export with --version)")
            tf.unrecognized_fields["custom"] = {CUSTOM_KEY: {
                "name": d.name, "version": d.version, "kind": d.kind, "quant": d.quant, "base": d.fingerprint,
                "signed_by": sig}}
            dest = self.dir / "targets" / path.rpartition("/")[0] / f"{tf.hashes['sha256']}.{path.rpartition('/')[2]}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.is_file():
                _write_atomic(dest, data)
            if not keep_older:
                for p in [p for p in md.signed.targets if p != path and p.rpartition("/")[0] == path.rpartition("/")[0]]:
                    if int(TARGET_RE.fullmatch(p).group(3)) < d.version:  # type: ignore[union-attr]
                        del md.signed.targets[p]
            md.signed.targets[path] = tf
            added.append(Listed(path, d.name, d.version, d.kind, d.quant, d.fingerprint, tf.length))
        self._close("targets", md)
        return added

    def remove(self, spec: str, *, base: str | None = None) -> list[str]:
        """Drop ``NAME`` (every version) or ``NAME@VERSION`` from the listing (of one base when given)."""
        name, _, ver = spec.partition("@")
        md = self._open("targets")
        gone = []
        for p in list(md.signed.targets):
            m = TARGET_RE.fullmatch(p)
            if m and m.group(2) == name and (not ver or m.group(3) == ver) and \
                    (base is None or m.group(1) == base.split(":")[-1][:16]):
                del md.signed.targets[p]
                gone.append(p)
        if not gone:
            raise UpdateError(f"{spec}: no such adapter in {self.dir}; listed: "
                              f"{sorted({f'{x.name}@{x.version}' for x in self.listed()})}")
        self._close("targets", md)
        return gone

    def publish(self, *, force: bool = False) -> tuple[int, int]:
        """Snapshot the current targets, then timestamp it (written last). Returns (snapshot, timestamp) versions.
        Run it at least as often as the timestamp expires (a device refuses expired metadata); the snapshot
        is re-signed when the targets changed or when less than half of its lifetime is left."""
        snap = self._open("snapshot").signed
        stale = snap.version > 0 and snap.expires - _now() < timedelta(days=self.expiry["snapshot"] / 2)
        try:
            self.do_snapshot(force=force or stale)  # a new snapshot when targets changed (or keys, or stale)
        except ValueError as e:
            raise UpdateError(f"{self.dir}: {e}: the targets metadata is older than the published one") from None
        self.do_timestamp(force=True)
        return self.snapshot_info.version, self._open("timestamp").signed.version

    def expiring(self, days: float = 30.0) -> list[str]:
        """Roles signed offline (root, targets) that expire within ``days``: re-sign them with :meth:`resign`."""
        soon = _now() + timedelta(days=days)
        return [f"{role} expires {md.signed.expires:%Y-%m-%d}" for role in ("root", "targets")
                if (md := self._open(role)).signed.expires < soon]

    def resign(self, role: str) -> int:
        """A new version of ``role`` with the same contents and keys and a fresh expiry (root: a new
        N.root.json, signed by its keys; targets: published with a new snapshot). Returns the version."""
        if role not in ("root", "targets"):
            raise UpdateError(f"resign: expected root or targets (publish re-signs snapshot and timestamp), "
                              f"found {role!r}")
        md = self._open(role)
        self._close(role, md)
        if role == "targets":
            self.publish()
        return md.signed.version

    def rotate(self, role: str) -> str:
        """Replace every key of ``role`` by a new one (as many as its threshold) in a new root version,
        signed by the old root keys and the new ones; the role's metadata is re-signed and published.
        The old private keys move to KEYDIR/retired/. Returns the new root file's name."""
        if role not in ROLES:
            raise UpdateError(f"rotate: expected a role ({', '.join(ROLES)}), found {role!r}")
        assert self.keydir is not None
        md = self._open("root")
        old_root = deepcopy(md.signed)
        old_signers = self._signers("root", old_root)
        r = md.signed.roles[role]
        old_ids = list(r.keyids)
        for k in old_ids:
            md.signed.revoke_key(k, role)
        for _ in range(r.threshold):
            md.signed.add_key(_new_key(self.keydir, role).public_key, role)
        self._close("root", md, sign_with=old_signers)
        retired = self.keydir / "retired"
        retired.mkdir(exist_ok=True, mode=0o700)
        still = {k for ro in md.signed.roles.values() for k in ro.keyids}
        for k in old_ids:
            for p in self.keydir.glob(f"{role}-{k[:16]}.key"):
                if k not in still:
                    os.replace(p, retired / p.name)
        if role == "targets":
            self._close("targets", self._open("targets"))
        if role in ("targets", "snapshot"):
            self.publish(force=True)
        elif role == "timestamp":
            self.publish()
        return f"{md.signed.version}.root.json"


def describe(repo: AdapterRepository) -> dict[str, Any]:
    """What a repository holds: versions, expiry, key ids and thresholds, listed adapters (for ``repo list``)."""
    root = repo.root()
    out: dict[str, Any] = {"roles": {}, "adapters": [x.__dict__ for x in repo.listed()]}
    for role in ROLES:
        p = repo._latest(role)
        signed = json.loads(p.read_bytes()).get("signed", {}) if p else {}
        out["roles"][role] = {"version": signed.get("version"), "expires": signed.get("expires"),
                              "threshold": root.roles[role].threshold,
                              "keys": [k[:16] for k in root.roles[role].keyids]}
    return out

