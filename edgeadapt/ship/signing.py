"""Ed25519 signatures for delta files, and the trust store a device checks them against.

A signature fills the fixed-length ``edgeadapt.signature`` slot of a version-2 delta file (see
:mod:`edgeadapt.formats.delta`): it signs every byte of the file except the integrity and signature values,
so flipping any byte makes verification fail — and, because signing recomputes the integrity over
the signature too, makes every reader refuse the file even without a trust store.

Keys: ``keygen`` writes ``NAME.key`` (PKCS#8 PEM, mode 0600) and ``NAME.pub``, one line
``edgeadapt-ed25519 <base64 of the 32-byte public key> <comment>``. A trust store is such a file,
a file of such lines, or a folder of ``*.pub`` files. A key id is the first 8 bytes (16 hex) of
sha256 of the raw public key.

Base pinning: every delta carries its base's fingerprint under the integrity and the signature;
:func:`verify_base` makes the other end tamper-evident by recomputing a base folder's fingerprint
from its float32 weights and comparing it with ``manifest.json`` and ``model.gguf``.

Device-safe: standard library and numpy/gguf (through :mod:`edgeadapt.formats.delta`) only; the
``cryptography`` package is imported when a signature is made or checked.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from edgeadapt.formats.delta import (SIGNATURE_TAG, delta_from_bytes, read_delta, signature_message, with_signature,
                                     write_delta)
from edgeadapt.errors import FormatError, IntegrityError, MissingDependencyError, UnsupportedError, collect

KEY_PREFIX = "edgeadapt-ed25519"
MAX_TRUST_BYTES = 1 << 20


class SignatureError(IntegrityError):
    """A signature is missing, malformed, made by an untrusted key, or does not match the file."""


def _crypto() -> Any:
    """What we use of ``cryptography``, imported on first use."""
    try:
        from types import SimpleNamespace

        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise MissingDependencyError("signatures need the 'cryptography' package: pip install 'edgeadapt[sign]' "
                                     f"(or pip install cryptography); import failed: {e}") from None
    return SimpleNamespace(ed25519=ed25519, ser=serialization, InvalidSignature=InvalidSignature)


def key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


# ---- keys
@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # 32 bytes
    comment: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def line(self) -> str:
        return f"{KEY_PREFIX} {base64.b64encode(self.raw).decode()} {self.comment}".rstrip() + "\n"

    @classmethod
    def parse(cls, line: str, where: str = "public key") -> "PublicKey":
        parts = line.strip().split(None, 2)
        if len(parts) < 2 or parts[0] != KEY_PREFIX:
            raise FormatError(f"{where}: expected '{KEY_PREFIX} <base64 key> [comment]', found {line.strip()[:60]!r}")
        try:
            raw = base64.b64decode(parts[1], validate=True)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise FormatError(f"{where}: expected a base64 Ed25519 public key of 32 bytes, found {parts[1][:60]!r}")
        return cls(raw, parts[2] if len(parts) > 2 else "")


def generate_keypair(out: str | os.PathLike, comment: str = "") -> tuple[Path, Path]:
    """Write ``OUT.key`` (private, 0600, refuses to overwrite) and ``OUT.pub``; returns both paths."""
    c = _crypto()
    ed, ser = c.ed25519, c.ser
    out = Path(out)
    priv_path, pub_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise FormatError(f"{p} already exists; choose another name or delete it first (keys are never overwritten)")
    key = ed.Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    raw = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    pub_path.write_text(PublicKey(raw, comment or out.name).line())
    return priv_path, pub_path


def _load_private(path: str | os.PathLike) -> Any:
    c = _crypto()
    try:
        key = c.ser.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as e:
        raise FormatError(f"{path}: expected an unencrypted PEM Ed25519 private key (from `edgeadapt keygen`): {e}") from None
    if not isinstance(key, c.ed25519.Ed25519PrivateKey):
        raise FormatError(f"{path}: expected an Ed25519 private key, found {type(key).__name__}")
    return key


# ---- trust store
class TrustStore:
    """Public keys a device accepts signatures from, by key id."""

    def __init__(self, keys: Iterable[PublicKey] = ()):
        self.keys: dict[str, PublicKey] = {k.key_id: k for k in keys}

    @classmethod
    def load(cls, *paths: str | os.PathLike) -> "TrustStore":
        """From ``.pub`` files, files of key lines, or folders of ``*.pub`` files."""
        keys, problems = [], []
        for p in map(Path, paths):
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            if p.is_dir() and not files:
                problems.append(f"{p}: a trust folder with no *.pub files")
            for f in files:
                if not f.is_file() or f.stat().st_size > MAX_TRUST_BYTES:
                    problems.append(f"{f}: expected a public key file of at most {MAX_TRUST_BYTES} bytes")
                    continue
                for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines()):
                    if line.strip() and not line.lstrip().startswith("#"):
                        try:
                            keys.append(PublicKey.parse(line, f"{f}:{i + 1}"))
                        except FormatError as e:
                            problems.append(str(e))
        collect(problems, FormatError, "cannot read the trust store:")
        return cls(keys)

    def __contains__(self, kid: str) -> bool:
        return kid in self.keys

    def __len__(self) -> int:
        return len(self.keys)


# ---- sign and verify
@dataclass(frozen=True)
class SignatureInfo:
    key_id: str
    signer: str  # the trusted key's comment ("" when signing)
    path: str


def sign_delta(path: str | os.PathLike, key: str | os.PathLike, out: str | os.PathLike | None = None) -> SignatureInfo:
    """Sign a delta file in place (or into ``out``). A version-1 file is re-written as version 2 first."""
    ser = _crypto().ser
    path = Path(path)
    out = Path(out) if out is not None else path
    priv = _load_private(key)
    if not path.is_file():
        raise FormatError(f"{path}: no such delta file")
    data = path.read_bytes()  # read once: the bytes checked are the bytes signed
    delta = delta_from_bytes(data, path)  # every check a device makes, before we vouch for it
    if delta.format_version == 1:
        tmp = out.with_name(out.name + ".v2.tmp")
        write_delta(tmp, arch=delta.arch, fingerprint=delta.fingerprint, name=delta.name, version=delta.version,
                    factors=delta.factors, source=delta.source, description=delta.description, dtype=delta.quant)
        data = tmp.read_bytes()
        tmp.unlink()
    _, digest = signature_message(data, str(path))
    raw = priv.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    slot = f"ed25519:{key_id(raw)}:{priv.sign(SIGNATURE_TAG + digest).hex()}"
    _write_atomic(out, with_signature(data, slot, str(path)))
    return SignatureInfo(key_id(raw), "", str(out))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_delta(source: str | os.PathLike | Any, trust: TrustStore) -> SignatureInfo:
    """Check a delta's signature against ``trust``; raises :class:`SignatureError` unless it verifies.
    ``source``: a path, or an adapter object (a :class:`LoraDelta` read from a file; other adapter
    objects carry no signature)."""
    delta = read_delta(source) if isinstance(source, (str, os.PathLike)) else source
    where = getattr(delta, "path", None) or f"adapter {getattr(delta, 'name', type(delta).__name__)!r}"
    signature, digest = getattr(delta, "signature", ""), getattr(delta, "signed_digest", None)
    if not signature or digest is None:
        raise SignatureError(f"{where}: expected a signed delta file, found an unsigned one (format version "
                             f"{getattr(delta, 'format_version', '-')}); sign it with `edgeadapt sign FILE --key KEY`")
    _, kid, sig = signature.split(":")
    if kid not in trust:
        raise SignatureError(f"{where}: signed by key {kid}, which is not in the trust store ({len(trust)} keys: "
                             f"{', '.join(sorted(trust.keys)) or 'none'}); add its .pub file to the trust store")
    c = _crypto()
    pub = c.ed25519.Ed25519PublicKey.from_public_bytes(trust.keys[kid].raw)
    try:
        pub.verify(bytes.fromhex(sig), SIGNATURE_TAG + digest)
    except c.InvalidSignature:
        raise SignatureError(f"{where}: the signature by key {kid} ({trust.keys[kid].comment or 'no comment'}) does "
                             "not match the file's contents; the file was changed after it was signed") from None
    return SignatureInfo(kid, trust.keys[kid].comment, str(where))


def check_trust(source: str | os.PathLike | Any, trust: TrustStore | None, require: bool) -> SignatureInfo | None:
    """The runtime's policy, in one call before an adapter is used (``source``: a path or an adapter object).

    - ``require``: the file MUST carry a signature that verifies against ``trust``;
    - a ``trust`` store without ``require``: a signed file MUST verify (a signature that cannot be
      checked is never ignored); an unsigned one is accepted;
    - neither: nothing is checked beyond the reader's integrity check.
    """
    if require and trust is None:
        raise SignatureError("signatures are required but no trust store was given; pass trust=TrustStore.load(...)")
    if trust is None:
        return None
    delta = read_delta(source) if isinstance(source, (str, os.PathLike)) else source
    if not getattr(delta, "signature", "") and not require:
        return None
    return verify_delta(delta, trust)


# ---- base folders
class _LazyWeights(dict):
    """name -> float32 canonical array, read when the fingerprint asks for it (one tensor at a time)."""

    def __init__(self, names: list[str], load: Any):
        super().__init__((n, None) for n in names)
        self._load = load

    def __getitem__(self, name: str) -> Any:
        return self._load(name)


def verify_base(folder: str | os.PathLike) -> str:
    """Recompute a base folder's fingerprint from its float32 weights (``model.onnx.data``, or an F32
    ``model.gguf``); raise :class:`IntegrityError` unless it equals the manifest's — and model.gguf's.
    Returns where the weights were read from."""
    import gguf
    import numpy as np

    from edgeadapt.formats.fingerprint import fingerprint
    from edgeadapt.formats.gguf_file import open_gguf
    from edgeadapt.formats.manifest import read_manifest

    man = read_manifest(folder)
    gguf_path = man.path("gguf")
    reader = open_gguf(gguf_path) if gguf_path is not None and gguf_path.is_file() else None
    problems = []
    if reader is not None:
        f = reader.fields.get("edgeadapt.base.fingerprint")
        claimed = f.contents() if f is not None else None
        if claimed != man.fingerprint:
            problems.append(f"model.gguf says fingerprint {claimed}, manifest.json says {man.fingerprint}")
    names = list(man.arch.tensor_shapes())
    if names and all("onnx" in man.tensors.get(n, {}) for n in names):
        source = "model.onnx.data"

        def load(n: str) -> Any:
            o = man.tensors[n]["onnx"]
            a = np.memmap(man.root / o["file"], dtype="<" + {"float32": "f4", "float16": "f2"}[o["dtype"]], mode="r",
                          offset=o["offset"], shape=tuple(o["shape"]))
            return a.T if o["layout"] == "in_out" else a
    elif reader is not None and all(t.ttype == gguf.GGMLQuantizationType.F32 for t in reader.tensors):
        source = "model.gguf"
        by_name = {t.name: t for t in reader.tensors}

        def load(n: str) -> Any:
            return reader.view(by_name[n])
    else:
        raise UnsupportedError(f"{man.root}: no float32 copy of the weights (model.onnx.data or an F32 model.gguf) "
                               "to recompute the fingerprint from; a quantized-only base can only be pinned by signing it")
    try:
        got = fingerprint(_LazyWeights(names, load))
    except (KeyError, ValueError, OSError) as e:
        raise FormatError(f"{man.root}: cannot read the weights from {source}: {type(e).__name__}: {e}") from None
    if got != man.fingerprint:
        problems.append(f"the weights in {source} hash to {got}, manifest.json says {man.fingerprint}")
    collect(problems, IntegrityError, f"{man.root}: the base folder was changed or damaged after export "
                                      "(export it again):")
    return source
