"""The attacks TUF's specification lists, each played against a device that has a working adapter: each is
refused with one UpdateError, nothing installed changes, and the installed version generates the same tokens."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from update_common import OTHER_FP, release, site, tokens, web  # noqa: F401 (fixtures)


def _state(store) -> dict[str, str]:
    """Every installed file (not the update cache) and its sha256."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and ".tuf" not in p.parts and p.name != ".lock"}


def _sync(site, base, repo_url=None, root=None, **kw):
    from edgeadapt.ship.sync import sync

    return sync(repo_url or site["url"], root=root or site["root"], store=site["store"], base=base, **kw)


@pytest.fixture
def device(tiny, site):
    """A repository listing a v1, synced to the device; then a v2 published (not yet synced)."""
    from edgeadapt.ship.repo import AdapterRepository

    r = AdapterRepository(site["repo"], site["keys"])
    r.add([release(tiny["a"], site["tmp"] / "a1.gguf", 1)])
    r.publish()
    _sync(site, tiny["base"])
    before = _state(site["store"])
    toks = tokens(tiny["base"], site["store"], "a")
    r.add([release(tiny["a"], site["tmp"] / "a2.gguf", 2, scale=0.5)])
    r.publish()
    return dict(site, r=r, before=before, tokens=toks, base=tiny["base"])


def _refused(d, match: str, **kw) -> str:
    from edgeadapt.errors import UpdateError

    with pytest.raises(UpdateError, match=match) as e:
        _sync(d, d["base"], **kw)
    assert _state(d["store"]) == d["before"]  # nothing installed changed …
    assert tokens(d["base"], d["store"], "a") == d["tokens"]  # … and it still runs the same
    assert str(e.value).endswith("nothing installed was changed") and "\n" not in str(e.value).split(":")[0]
    return str(e.value)


def _forge(r, path: str, src, custom: dict, signers=None) -> None:
    """A targets version listing ``path`` for ``src`` with ``custom``, signed with the publisher's keys
    (or only ``signers``), then snapshot and timestamp as a publisher would."""
    from tuf.api.metadata import TargetFile
    from tuf.api.serialization.json import JSONSerializer

    md = r._open("targets")
    tf = TargetFile.from_file(path, str(src), ["sha256"])
    tf.unrecognized_fields["custom"] = {"edgeadapt": custom}
    md.signed.targets[path] = tf
    if "/" in path and ".." not in path and not path.startswith("/") and "\0" not in path:
        dest = r.dir / "targets" / path.rpartition("/")[0] / f"{tf.hashes['sha256']}.{path.rpartition('/')[2]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    if signers is None:
        r._close("targets", md)
    else:
        md.signed.version += 1
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)
        (r.meta / f"{md.signed.version}.targets.json").write_bytes(md.to_bytes(JSONSerializer(compact=True)))
    r.publish()


def test_rollback_of_metadata(device):
    old = (device["repo"] / "metadata" / "timestamp.json").read_bytes()
    device["r"].publish()
    _sync(device, device["base"], only=["nothing"])  # the device sees the newer timestamp …
    device["before"] = _state(device["store"])
    (device["repo"] / "metadata" / "timestamp.json").write_bytes(old)  # … a mirror then replays the older one
    _refused(device, r"older metadata than this device already trusts — a rollback \(New timestamp version 3 must be >= 4\)")


def test_rollback_of_a_target_version(device):
    _sync(device, device["base"])  # the device runs v2
    device["before"], device["tokens"] = _state(device["store"]), tokens(device["base"], device["store"], "a")
    r = device["r"]
    r.remove("a@2")
    r.add([device["tmp"] / "a1.gguf"])
    r.publish()
    _refused(device, r"a version 1 in the repository is older than the installed version 2 — a target rollback")


def test_freeze_expired_timestamp(device):
    from edgeadapt.ship.repo import AdapterRepository

    AdapterRepository(device["repo"], device["keys"], {"timestamp": -1}).publish()
    _refused(device, r"repository metadata has expired \(timestamp.json is expired\)")


@pytest.mark.parametrize("role", ["targets", "snapshot"])
def test_mix_and_match(device, role):
    meta = device["repo"] / "metadata"
    versions = sorted(int(p.name.split(".")[0]) for p in meta.glob(f"*.{role}.json"))
    (meta / f"{versions[-1]}.{role}.json").write_bytes((meta / f"{versions[-2]}.{role}.json").read_bytes())
    _refused(device, r"does not match the length and hashes the signed metadata gives")


def test_arbitrary_target_changed_bytes_under_a_valid_name(device):
    served = next(p for p in (device["repo"] / "targets").rglob("*.a-v2.gguf"))
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01
    served.write_bytes(bytes(data))
    _refused(device, r"does not match the length and hashes the signed metadata gives")
    assert not list(device["store"].glob(".tuf/*/partial/*"))  # the bad bytes are not kept


@pytest.mark.parametrize("match", ["/targets/", "timestamp.json"])
def test_endless_data(device, match):
    device["proxy"].add("endless", match)
    msg = _refused(device, r"more data than the signed metadata allows — endless data", repo_url=device["purl"])
    assert "bytes" in msg


@pytest.mark.parametrize("kind,match", [("slow", r"too slow — slow retrieval \(.*below the 4,000 bytes/s"),
                                        ("stall", r"too slow — slow retrieval \(.*no byte for 1s")])
def test_slow_retrieval(device, kind, match):
    device["proxy"].add(kind, "/targets/", rate=400.0, at=0.3)
    _refused(device, match, repo_url=device["purl"], timeout=1.0, min_rate=4000.0, grace=1.0)


def test_targets_signed_below_threshold(tiny, site, tmp_path):
    from edgeadapt.errors import UpdateError
    from edgeadapt.ship.repo import AdapterRepository, _key_files, target_path

    repo, keys = site["repo"].parent / f"{site['repo'].name}-t2", tmp_path / "k2"
    r = AdapterRepository.init(repo, keys, thresholds={"targets": 2})
    root = tmp_path / "root-t2.json"
    root.write_bytes((repo / "metadata" / "1.root.json").read_bytes())
    r.add([release(tiny["a"], tmp_path / "a1.gguf", 1)])
    r.publish()
    url = site["url"] + "-t2"
    _sync(site, tiny["base"], repo_url=url, root=root)
    d = dict(site, before=_state(site["store"]), tokens=tokens(tiny["base"], site["store"], "a"), base=tiny["base"],
             url=url, root=root)
    stolen = next(p for p in keys.glob("targets-*.key"))  # an attacker holds one of the two targets keys
    shutil.move(stolen, tmp_path / stolen.name)
    with pytest.raises(UpdateError, match=r"targets: 1 of its keys are in .*, its threshold is 2"):
        r.add([release(tiny["a"], tmp_path / "a2.gguf", 2, scale=0.5)])  # a publisher refuses to do it …
    one = [s for s in _key_files(keys).values() if s.public_key.keyid in r.root().roles["targets"].keyids]
    a2 = release(tiny["a"], tmp_path / "a2.gguf", 2, scale=0.5)
    fp = tiny["manifest"].fingerprint
    _forge(r, target_path(fp, "a", 2), a2, {"name": "a", "version": 2, "kind": "lora", "quant": "F32", "base": fp},
           signers=one)  # … the attacker signs with the one key it has
    _refused(d, r"not signed by a threshold of the keys the trusted root names \(.*targets was signed by 1/2 keys")


def test_adapter_for_another_base_under_this_base_name(device):
    from edgeadapt.ship.repo import target_path

    base_fp = next(iter(device["r"].listed())).base
    other = release(device["tmp"] / "a1.gguf", device["tmp"] / "o.gguf", 3, fingerprint=OTHER_FP)
    _forge(device["r"], target_path(base_fp, "a", 3), other,
           {"name": "a", "version": 3, "kind": "lora", "quant": "F32", "base": base_fp})
    _refused(device, r"the signed metadata says \{.*'base': 'sha256:[0-9a-f]+'\}, the file says \{.*'base': 'sha256:abab")


@pytest.mark.parametrize("path", ["../../../../tmp/evil-v9.gguf", "/etc/evil-v9.gguf", "0123456789abcdef/a\0b/a\0b-v9.gguf",
                                  "0123456789abcdef/../../a-v9.gguf"])
def test_target_names_that_escape_the_store(device, path):
    _forge(device["r"], path, device["tmp"] / "a1.gguf",
           {"name": "a", "version": 9, "kind": "lora", "quant": "F32", "base": "sha256:0123456789abcdef" + "0" * 48})
    msg = _refused(device, r"the signed listing holds targets this device will not use")
    assert msg.startswith(f"sync from {device['url']} refused: the signed listing holds") and repr(path) in msg


def test_a_root_of_another_repository_or_not_a_root(device, tmp_path):
    from edgeadapt.ship.repo import AdapterRepository

    AdapterRepository.init(tmp_path / "elsewhere", tmp_path / "k3")
    _refused(device, r"refused: metadata is not signed by a threshold of the keys the trusted root names",
             root=tmp_path / "elsewhere" / "metadata" / "1.root.json")
    (tmp_path / "junk.json").write_text('{"signed": 1}')
    _refused(device, r"junk.json: expected the repository's signed root metadata \(metadata/1.root.json\), found "
                     r"something else", root=tmp_path / "junk.json")
