"""The runtime's trust policy and adapter store, through the public API (edgeadapt.load)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import edgeadapt
from edgeadapt.errors import IntegrityError

pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def signed(tiny, tmp_path_factory):
    from edgeadapt.ship.signing import generate_keypair, sign_delta

    d = tmp_path_factory.mktemp("trust")
    key, pub = generate_keypair(d / "team")
    shutil.copy(tiny["a"], d / "a.gguf")
    sign_delta(d / "a.gguf", key)
    return dict(dir=d, pub=pub, file=d / "a.gguf")


def test_required_signature_accepts_signed_and_refuses_unsigned(tiny, signed, ids):
    m = edgeadapt.load(tiny["base"], engine="numpy", trust=signed["pub"], require_signature=True)
    m.add_adapter(signed["file"], name="a")
    m.use("a")
    base_model = edgeadapt.load(tiny["base"], engine="numpy")
    base_model.add_adapter(tiny["a"], name="a")
    base_model.use("a")
    np.testing.assert_array_equal(m.logits(ids), base_model.logits(ids))
    with pytest.raises(IntegrityError):
        m.add_adapter(tiny["b"], name="b")  # not signed
    assert sorted(m.adapters) == ["a"]


def test_every_flipped_byte_is_refused_by_the_runtime(tiny, signed, tmp_path):
    data = signed["file"].read_bytes()
    m = edgeadapt.load(tiny["base"], engine="numpy", trust=signed["pub"], require_signature=True)
    rng = np.random.default_rng(0)
    for pos in sorted(set(rng.integers(0, len(data), 40).tolist()) | {0, len(data) // 2, len(data) - 1}):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        (tmp_path / "x.gguf").write_bytes(bytes(bad))
        with pytest.raises(edgeadapt.EdgeAdaptError):
            m.add_adapter(tmp_path / "x.gguf", name="x")
    assert m.adapters == {}


def test_load_by_name_from_the_store(tiny, signed, tmp_path, ids):
    from edgeadapt.ship.store import AdapterStore

    AdapterStore(tmp_path / "store").install(signed["file"])
    m = edgeadapt.load(tiny["base"], engine="numpy", store=tmp_path / "store", trust=signed["pub"],
                       require_signature=True)
    name = m.add_adapter("a")
    assert name == "a" and m.adapters["a"].version == 1
