"""Trust: Ed25519 signatures over every byte of a delta file, trust stores, the runtime policy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeadapt.cli import main
from edgeadapt.formats.delta import delta_from_bytes, read_delta, with_signature, write_delta
from edgeadapt.errors import EdgeAdaptError, FormatError, IntegrityError
from edgeadapt.ship.signing import (PublicKey, SignatureError, TrustStore, check_trust, generate_keypair, sign_delta,
                               verify_base, verify_delta)

FIXTURES = Path(__file__).parent / "fixtures"
FP = "sha256:" + "cd" * 32


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    release = generate_keypair(d / "release", "release team")
    other = generate_keypair(d / "other", "someone else")
    return dict(dir=d, key=release[0], pub=release[1], other_key=other[0], other_pub=other[1],
                trust=TrustStore.load(release[1]))


def _delta(path: Path, dtype: str = "F32", version: int = 1) -> Path:
    rng = np.random.default_rng(0)
    f = {"blk.0.attn_q.weight": (rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(32, 2)).astype(np.float32))}
    write_delta(path, arch="llama", fingerprint=FP, name="billing", version=version, factors=f, dtype=dtype)
    return path


def test_sign_then_verify(keys, tmp_path):
    p = _delta(tmp_path / "d.gguf")
    before = read_delta(p)
    info = sign_delta(p, keys["key"])
    d = read_delta(p)
    assert d.signature.startswith(f"ed25519:{info.key_id}:") and len(d.signature) == 153
    assert p.stat().st_size == (tmp_path / "d.gguf").stat().st_size
    for w in d.factors:  # signing changes nothing but the two slots
        assert all(np.array_equal(x, y) for x, y in zip(d.factors[w], before.factors[w]))
    got = verify_delta(p, keys["trust"])
    assert (got.key_id, got.signer) == (PublicKey.parse(keys["pub"].read_text()).key_id, "release team")


@pytest.mark.parametrize("dtype", ["Q8_0", "int4"])
def test_flipping_any_byte_is_refused(keys, tmp_path, dtype):
    """Every byte of a signed file, padding and slots included: the reader (so the runtime) and verify
    (which reads first) both refuse."""
    p = sign_delta(_delta(tmp_path / "d.gguf", dtype), keys["key"]).path
    data = bytearray(Path(p).read_bytes())
    accepted = []
    for i in range(len(data)):
        data[i] ^= 0x20
        try:
            delta_from_bytes(bytes(data))  # what read_delta does once it has the bytes
            accepted.append(i)
        except EdgeAdaptError:
            pass
        data[i] ^= 0x20
    assert accepted == [] and len(data) > 1000
    data[-1] ^= 0x20
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(IntegrityError, match="integrity check failed"):
        verify_delta(tmp_path / "bad.gguf", keys["trust"])


def test_a_forger_who_fixes_the_integrity_still_fails_the_signature(keys, tmp_path):
    p = Path(sign_delta(_delta(tmp_path / "d.gguf"), keys["key"]).path)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01  # a factor value
    slot = read_delta(p).signature
    (tmp_path / "forged.gguf").write_bytes(with_signature(bytes(data), slot))
    read_delta(tmp_path / "forged.gguf")  # the integrity is consistent again...
    with pytest.raises(SignatureError, match="does not match the file's contents; the file was changed after it was signed"):
        verify_delta(tmp_path / "forged.gguf", keys["trust"])  # ...but the signature is not


def test_untrusted_and_unsigned(keys, tmp_path):
    p = Path(sign_delta(_delta(tmp_path / "d.gguf"), keys["other_key"]).path)
    kid = PublicKey.parse(keys["other_pub"].read_text()).key_id
    with pytest.raises(SignatureError, match=f"signed by key {kid}, which is not in the trust store"):
        verify_delta(p, keys["trust"])
    u = _delta(tmp_path / "u.gguf")
    with pytest.raises(SignatureError, match="expected a signed delta file, found an unsigned one"):
        verify_delta(u, keys["trust"])


def test_runtime_policy(keys, tmp_path):
    signed = Path(sign_delta(_delta(tmp_path / "s.gguf"), keys["key"]).path)
    foreign = Path(sign_delta(_delta(tmp_path / "f.gguf"), keys["other_key"]).path)
    unsigned = _delta(tmp_path / "u.gguf")
    t = keys["trust"]
    assert check_trust(unsigned, None, False) is None and check_trust(foreign, None, False) is None
    assert check_trust(unsigned, t, False) is None  # unsigned is fine unless required
    assert check_trust(signed, t, False).signer == "release team"
    assert check_trust(signed, t, True).signer == "release team"
    with pytest.raises(SignatureError, match="not in the trust store"):
        check_trust(foreign, t, False)  # a signature that cannot be checked is never ignored
    with pytest.raises(SignatureError, match="found an unsigned one"):
        check_trust(unsigned, t, True)
    with pytest.raises(SignatureError, match="signatures are required but no trust store was given"):
        check_trust(signed, None, True)
    assert issubclass(SignatureError, IntegrityError)

    class Made:  # an adapter object built in memory (e.g. another adapter kind): it carries no signature
        name = "made"
    assert check_trust(Made(), t, False) is None
    with pytest.raises(SignatureError, match="adapter 'made': expected a signed delta file, found an unsigned one"):
        check_trust(Made(), t, True)


def test_version_1_files_are_upgraded_when_signed(keys, tmp_path):
    p = tmp_path / "v1.gguf"
    p.write_bytes((FIXTURES / "delta_v1.gguf").read_bytes())
    sign_delta(p, keys["key"])
    d = read_delta(p)
    assert (d.format_version, d.name, d.version) == (2, "legacy", 7)
    assert np.array_equal(d.factors["blk.1.ffn_down.weight"][0], read_delta(FIXTURES / "delta_v1.gguf").factors["blk.1.ffn_down.weight"][0])
    verify_delta(p, keys["trust"])


def test_trust_store_from_folder_and_bad_lines(keys, tmp_path):
    t = TrustStore.load(keys["dir"])
    assert len(t) == 2
    (tmp_path / "bad.pub").write_text("edgeadapt-ed25519 AAAA short\nssh-ed25519 xyz\n")
    with pytest.raises(FormatError) as e:
        TrustStore.load(tmp_path / "bad.pub")
    assert "bad.pub:1: expected a base64 Ed25519 public key of 32 bytes, found 'AAAA'" in str(e.value)
    assert "bad.pub:2: expected 'edgeadapt-ed25519 <base64 key> [comment]', found 'ssh-ed25519 xyz'" in str(e.value)


def test_keys_are_never_overwritten(keys):
    with pytest.raises(FormatError, match="already exists"):
        generate_keypair(keys["dir"] / "release")
    assert oct(keys["key"].stat().st_mode & 0o777) == "0o600"


def test_cli_keygen_sign_verify(tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["keygen", str(tmp_path / "k"), "--comment", "ci"])
    assert res.exit_code == 0 and "key id" in res.output, res.output
    p = _delta(tmp_path / "d.gguf")
    assert r.invoke(main, ["sign", str(p), "--key", str(tmp_path / "k.key")]).exit_code == 0
    res = r.invoke(main, ["verify", str(p), "--trust", str(tmp_path / "k.pub")])
    assert res.exit_code == 0 and "adapter 'billing' version 1 (F32), integrity ok, signature ok" in res.output, res.output
    data = bytearray(p.read_bytes())
    data[40] ^= 1
    p.write_bytes(data)
    res = r.invoke(main, ["verify", str(p), "--trust", str(tmp_path / "k.pub")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "Traceback" not in res.output


def test_signing_without_cryptography_names_the_package(tmp_path):
    p = _delta(tmp_path / "d.gguf")
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "from edgeadapt.ship.signing import sign_delta\n"
            "from edgeadapt.errors import MissingDependencyError\n"
            f"try:\n    sign_delta({str(p)!r}, 'k.key')\nexcept MissingDependencyError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.startswith("signatures need the 'cryptography' package: pip install 'edgeadapt[sign]'"), out


def test_device_modules_import_nothing_heavy():
    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'peft', 'onnx', 'safetensors', 'cryptography'): sys.modules[m] = None\n"
            "import edgeadapt.ship.signing, edgeadapt.ship.store, edgeadapt.formats.delta, edgeadapt.formats.manifest, edgeadapt.cli.ship\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_base_fingerprint_is_tamper_evident(tiny, tmp_path):
    import shutil

    assert verify_base(tiny["base"]) == "model.onnx.data"
    shutil.copytree(tiny["base"], tmp_path / "base")
    data = tmp_path / "base" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[4 * 64 * 3 + 1] ^= 0x01  # one weight of token_embd
    data.write_bytes(raw)
    with pytest.raises(IntegrityError) as e:
        verify_base(tmp_path / "base")
    assert "the base folder was changed or damaged after export" in str(e.value)
    assert "the weights in model.onnx.data hash to sha256:" in str(e.value)
    res = CliRunner().invoke(main, ["verify", str(tiny["base"])])
    assert res.exit_code == 0 and res.output.endswith("base fingerprint ok (recomputed from model.onnx.data)\n")
