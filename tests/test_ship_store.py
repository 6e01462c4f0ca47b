"""The adapter store on a device: atomic installs that survive being killed, versions that only
go up, rollback, remove, signatures, the CLI."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgeadapt.ship.store as store_mod
from edgeadapt.cli import main
from edgeadapt.formats.delta import read_delta, write_delta
from edgeadapt.errors import AdapterNotFoundError, FormatError
from edgeadapt.ship.signing import SignatureError, TrustStore, generate_keypair, sign_delta
from edgeadapt.ship.store import AdapterStore, DowngradeError

FP = "sha256:" + "ef" * 32


def _delta(path: Path, version: int, name: str = "billing", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed + version)
    f = {"blk.0.attn_q.weight": (rng.normal(size=(2, 64)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32))}
    write_delta(path, arch="llama", fingerprint=FP, name=name, version=version, factors=f)
    return path


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_install_keeps_the_previous_version(tmp_path):
    s = AdapterStore(tmp_path / "store")
    for v in (1, 2, 3):
        got = s.install(_delta(tmp_path / f"v{v}.gguf", v))
    assert (got.name, got.version, got.previous) == ("billing", 3, 2)
    assert read_delta(s.resolve("billing")).version == 3
    names = [f for f in _files(tmp_path / "store") if f.startswith("billing/")]
    assert len(names) == 3 and "billing/state.json" in names  # current + previous, v1 swept


def test_versions_only_go_up_unless_asked(tmp_path):
    s = AdapterStore(tmp_path / "store")
    s.install(_delta(tmp_path / "v5.gguf", 5))
    with pytest.raises(DowngradeError, match="billing: version 4 is older than the installed version 5; refusing to "
                                             "downgrade — use `edgeadapt rollback billing`"):
        s.install(_delta(tmp_path / "v4.gguf", 4))
    with pytest.raises(DowngradeError, match="version 5 is already installed with different contents"):
        s.install(_delta(tmp_path / "v5b.gguf", 5, seed=9))
    assert s.install(tmp_path / "v5.gguf").version == 5  # the same file again: nothing to do
    assert s.install(tmp_path / "v4.gguf", allow_downgrade=True).version == 4
    assert read_delta(s.resolve("billing")).version == 4


def test_rollback_swaps_current_and_previous(tmp_path):
    s = AdapterStore(tmp_path / "store")
    s.install(_delta(tmp_path / "v1.gguf", 1))
    with pytest.raises(AdapterNotFoundError, match="billing: no previous version is kept"):
        s.rollback("billing")
    s.install(_delta(tmp_path / "v2.gguf", 2))
    got = s.rollback("billing")
    assert (got.version, got.previous) == (1, 2)
    assert s.rollback("billing").version == 2  # and forward again


def test_remove_and_unknown_names(tmp_path):
    s = AdapterStore(tmp_path / "store")
    s.install(_delta(tmp_path / "a.gguf", 1, name="a"))
    s.install(_delta(tmp_path / "b.gguf", 1, name="b"))
    s.remove("a")
    assert s.names() == ["b"] and _files(tmp_path / "store")[0] == ".lock"
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'a' in the store .*; installed: \['b'\]"):
        s.resolve("a")
    with pytest.raises(AdapterNotFoundError):
        s.resolve("../b")


def test_bad_files_never_enter_the_store(tmp_path):
    s = AdapterStore(tmp_path / "store")
    bad = bytearray(_delta(tmp_path / "v1.gguf", 1).read_bytes())
    bad[-5] ^= 1
    (tmp_path / "bad.gguf").write_bytes(bad)
    with pytest.raises(FormatError, match="integrity check failed"):
        s.install(tmp_path / "bad.gguf")
    assert s.names() == []
    weird = _delta(tmp_path / "w.gguf", 1, name="../../etc")
    with pytest.raises(FormatError, match=r"adapter name '\.\./\.\./etc' cannot name a store entry"):
        s.install(weird)
    assert _files(tmp_path / "store") == [".lock"]


def test_signatures_required(tmp_path):
    key, pub = generate_keypair(tmp_path / "k")
    s = AdapterStore(tmp_path / "store")
    trust = TrustStore.load(pub)
    with pytest.raises(SignatureError, match="found an unsigned one"):
        s.install(_delta(tmp_path / "u.gguf", 1), trust=trust, require_signature=True)
    signed = _delta(tmp_path / "s.gguf", 1)
    sign_delta(signed, key)
    got = s.install(signed, trust=trust, require_signature=True)
    assert got.signature == trust.keys[got.signature].key_id


def test_the_runtime_loads_by_name(tiny, tmp_path, ids):
    import edgeadapt

    s = AdapterStore(tmp_path / "store")
    s.install(tiny["a"])
    m = edgeadapt.load(tiny["base"], engine="numpy")
    assert m.add_adapter(s.open("a")) == "a"
    m.use("a")
    ref = edgeadapt.load(tiny["base"], engine="numpy")
    ref.add_adapter(tiny["a"])
    ref.use("a")
    assert np.array_equal(m.logits(ids), ref.logits(ids))
    with pytest.raises(SignatureError, match="signatures are required but no trust store was given"):
        s.open("a", require_signature=True)


# ---- crash safety: the install process is killed (SIGKILL) at every kind of point
def _install_killed_at(root: Path, src: Path, n: int) -> int:
    """Fork; the child installs ``src`` and kills itself at the ``n``-th crash point. Returns its exit status."""
    pid = os.fork()
    if pid == 0:  # child
        steps = [0]

        def hook(label: str) -> None:
            steps[0] += 1
            if steps[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)

        store_mod._crash_hook, store_mod._CHUNK = hook, 256  # many copy steps
        try:
            AdapterStore(root).install(src)
        except BaseException:
            os._exit(3)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_killing_installs_100_times_never_breaks_the_store(tmp_path, monkeypatch):
    root = tmp_path / "store"
    s = AdapterStore(root)
    s.install(_delta(tmp_path / "v1.gguf", 1))
    srcs = [_delta(tmp_path / f"v{v}.gguf", v) for v in range(2, 102)]
    seen: list[str] = []  # the crash points of one install: copy chunks, copied, folder, blob, state-written, state
    monkeypatch.setattr(store_mod, "_crash_hook", seen.append)
    monkeypatch.setattr(store_mod, "_CHUNK", 256)
    AdapterStore(tmp_path / "scratch").install(srcs[0])
    monkeypatch.setattr(store_mod, "_crash_hook", None)
    assert seen[-5:] == ["copied", "folder", "blob", "state-written", "state"] and set(seen[:-5]) == {"copy"}
    rng = random.Random(1234)
    current, killed, draws = 1, 0, []
    for src in srcs:
        new = read_delta(src).version
        draws.append(rng.randint(1, len(seen) + 1))  # len(seen) + 1: the install completes
        status = _install_killed_at(root, src, draws[-1])
        killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0
        got = read_delta(AdapterStore(root).resolve("billing")).version  # a working version, always
        assert got in (current, new)
        if not os.WIFSIGNALED(status):
            assert got == new
        current = got
    assert killed == sum(d <= len(seen) for d in draws) >= 90  # each planned kill happened
    s.install(_delta(tmp_path / "v999.gguf", 999))  # the next change sweeps what the kills left
    assert [f for f in _files(root) if "tmp" in f] == [] and len(_files(root)) == 4


# ---- the CLI, as on a device
def test_cli_install_list_rollback_remove(tmp_path):
    r, store = CliRunner(), str(tmp_path / "store")
    for v in (1, 2):
        res = r.invoke(main, ["install", str(_delta(tmp_path / f"v{v}.gguf", v)), "--store", store])
        assert res.exit_code == 0, res.output
    assert res.output == "installed billing version 2, previous version 1 kept (unsigned)\n"
    res = r.invoke(main, ["install", str(tmp_path / "v1.gguf"), "--store", store])
    assert res.exit_code == 2 and "error: billing: version 1 is older than the installed version 2" in res.output
    res = r.invoke(main, ["list"], env={"EDGEADAPT_STORE": store})
    assert res.exit_code == 0 and res.output.startswith("billing                  version 2      previous 1 "), res.output
    res = r.invoke(main, ["rollback", "billing", "--store", store])
    assert res.output == "billing: version 1 is current again (version 2 kept)\n"
    res = r.invoke(main, ["remove", "billing", "--store", store])
    assert res.output == "removed billing\n"
    assert r.invoke(main, ["list", "--store", store]).output == f"no adapters in {store}\n"
