"""Read once, verify what you parse: a delta file replaced between two reads of the loader is refused.

Each test makes the file "change" after its first read (Path.read_bytes returns the unsigned file first,
the trusted signed file on every later read). A loader that parses one read and checks the signature on
another would load the unsigned file on the strength of the signed one's signature."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import edgeadapt
from edgeadapt.errors import IntegrityError

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    from edgeadapt.ship.signing import generate_keypair, sign_delta

    d = tmp_path_factory.mktemp("read_once")
    key, pub = generate_keypair(d / "team")
    for n in ("a", "b"):
        shutil.copy(tiny[n], d / f"{n}_signed.gguf")
        sign_delta(d / f"{n}_signed.gguf", key)
    return dict(pub=pub, signed=d / "a_signed.gguf", other_signed=d / "b_signed.gguf", unsigned=tiny["b"])


def _swapped_after_first_read(monkeypatch, path: Path, first: bytes, later: bytes) -> list[int]:
    """``path`` reads as ``first`` once, then as ``later`` (through Path.read_bytes, and the delta reader's
    memory map)."""
    import edgeadapt.formats.delta as delta_mod

    reads = []
    real_read_bytes, real_map = Path.read_bytes, delta_mod._map

    def read_bytes(self):
        if Path(self).resolve() == path.resolve():
            reads.append(1)
            return first if len(reads) == 1 else later
        return real_read_bytes(self)

    def map_file(p):
        return read_bytes(Path(p)) if Path(p).resolve() == path.resolve() else real_map(p)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(delta_mod, "_map", map_file)
    return reads


def test_add_adapter_checks_the_bytes_it_loads(tiny, files, tmp_path, monkeypatch):
    target = tmp_path / "x.gguf"
    shutil.copy(files["signed"], target)
    m = edgeadapt.load(tiny["base"], engine="numpy", trust=files["pub"], require_signature=True)
    _swapped_after_first_read(monkeypatch, target, files["unsigned"].read_bytes(), files["signed"].read_bytes())
    with pytest.raises(IntegrityError, match="unsigned"):
        m.add_adapter(target, name="x")
    assert m.adapters == {}


def test_add_adapter_loads_what_it_verified(tiny, files, tmp_path, monkeypatch):
    """The other way round: the signed file is read, then the file changes: the loaded adapter is the signed one."""
    target = tmp_path / "x.gguf"
    shutil.copy(files["signed"], target)
    m = edgeadapt.load(tiny["base"], engine="numpy", trust=files["pub"], require_signature=True)
    reads = _swapped_after_first_read(monkeypatch, target, files["signed"].read_bytes(),
                                      files["unsigned"].read_bytes())
    m.add_adapter(target, name="x")
    assert len(reads) == 1 and m.adapters["x"].signature and m.adapters["x"].name == "a"


def test_store_install_checks_the_bytes_it_keeps(files, tmp_path, monkeypatch):
    from edgeadapt.ship.signing import TrustStore
    from edgeadapt.ship.store import AdapterStore

    target = tmp_path / "x.gguf"
    shutil.copy(files["signed"], target)
    store = AdapterStore(tmp_path / "store")
    _swapped_after_first_read(monkeypatch, target, files["unsigned"].read_bytes(), files["signed"].read_bytes())
    with pytest.raises(IntegrityError, match="unsigned"):
        store.install(target, trust=TrustStore.load(files["pub"]), require_signature=True)
    assert store.names() == []


def test_store_keeps_the_bytes_it_verified(files, tmp_path, monkeypatch):
    from edgeadapt.ship.signing import TrustStore
    from edgeadapt.ship.store import AdapterStore

    target = tmp_path / "x.gguf"
    shutil.copy(files["signed"], target)
    store = AdapterStore(tmp_path / "store")
    _swapped_after_first_read(monkeypatch, target, files["signed"].read_bytes(), files["unsigned"].read_bytes())
    info = store.install(target, trust=TrustStore.load(files["pub"]), require_signature=True)
    monkeypatch.undo()
    assert info.path.read_bytes() == files["signed"].read_bytes() and info.signature


def test_load_by_name_refuses_a_blob_that_is_not_the_installed_one(tiny, files, tmp_path, monkeypatch):
    """A store blob read back as another signed file (same key, valid signature) is refused: the bytes
    loaded must hash to the content hash the store installed them under."""
    from edgeadapt.ship.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    blob = store.install(files["signed"]).path
    m = edgeadapt.load(tiny["base"], engine="numpy", store=tmp_path / "store", trust=files["pub"],
                       require_signature=True)
    other = files["other_signed"].read_bytes()
    _swapped_after_first_read(monkeypatch, blob, other, other)
    with pytest.raises(IntegrityError, match="the installed file was changed"):
        m.add_adapter("a")
    monkeypatch.undo()
    assert m.adapters == {} and m.add_adapter("a") == "a"


def test_sign_signs_the_bytes_it_checked(files, tmp_path, monkeypatch):
    """A file that changes between the check and the signing is not signed unchecked: the signed file is the
    one that was read and checked."""
    from edgeadapt.ship.signing import TrustStore, generate_keypair, sign_delta, verify_delta

    key, pub = generate_keypair(tmp_path / "k")
    target = tmp_path / "x.gguf"
    shutil.copy(files["unsigned"], target)
    reads = _swapped_after_first_read(monkeypatch, target, files["unsigned"].read_bytes(), b"not a delta file")
    sign_delta(target, key, out=tmp_path / "signed.gguf")
    monkeypatch.undo()
    assert len(reads) == 1
    assert verify_delta(tmp_path / "signed.gguf", TrustStore.load(pub)).key_id


def test_install_bytes_installs_exactly_those_bytes(files, tmp_path):
    """What an update client uses: the bytes it checked are the bytes installed (no file read at all)."""
    from edgeadapt.ship.signing import TrustStore
    from edgeadapt.ship.store import AdapterStore

    store = AdapterStore(tmp_path / "store")
    trust = TrustStore.load(files["pub"])
    with pytest.raises(IntegrityError, match="unsigned"):
        store.install_bytes(files["unsigned"].read_bytes(), "download.part", trust=trust, require_signature=True)
    info = store.install_bytes(files["signed"].read_bytes(), "download.part", trust=trust, require_signature=True)
    assert info.path.read_bytes() == files["signed"].read_bytes() and store.names() == ["a"]
