"""Adapter updates over a TUF repository served by nginx: publish, sync, no-op sync, new versions, prune,
key rotation, resume after an interruption, network faults, the CLI."""

from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner

from update_common import OTHER_FP, release, site, web  # noqa: F401 (fixtures)


def _repo(site):
    from edgeadapt.ship.repo import AdapterRepository

    return AdapterRepository(site["repo"], site["keys"])


def _sync(site, base, url=None, **kw):
    from edgeadapt.ship.sync import sync

    return sync(url or site["url"], root=site["root"], store=site["store"], base=base, **kw)


def _target_gets(site, since: int = 0) -> list[tuple[str, int, int, str]]:
    name = site["repo"].name
    return [x for x in site["nginx"].log()[since:] if x[0].startswith(f"/{name}/targets/")]


def test_publish_then_sync_installs_this_base_only_and_a_running_model_sees_it(tiny, site):
    import edgeadapt

    r = _repo(site)
    a1 = release(tiny["a"], site["tmp"] / "a1.gguf", 1)
    r.add([a1, tiny["b"], release(tiny["a"], site["tmp"] / "x.gguf", 1, name="x", fingerprint=OTHER_FP)])
    r.publish()
    assert sorted((x.name, x.base[7:11]) for x in r.listed()) == [("a", tiny["manifest"].fingerprint[7:11]),
                                                                   ("b", tiny["manifest"].fingerprint[7:11]), ("x", "abab")]
    m = edgeadapt.load(tiny["base"], engine="numpy", store=site["store"])  # running before the sync
    n0 = len(site["nginx"].log())
    got = _sync(site, tiny["base"])
    assert sorted(u["name"] for u in got.updated) == ["a", "b"] and got.other_bases == 1 and got.unchanged == []
    assert not any("/x/" in g[0] for g in _target_gets(site, n0))  # never downloads what cannot run here
    assert m.add_adapter("a") == "a"  # no restart: resolved through the store
    m.use("a")
    direct = edgeadapt.load(tiny["base"], engine="numpy")
    direct.add_adapter(str(a1), name="a")
    direct.use("a")
    assert m.generate_ids([5, 17, 42, 9], 6) == direct.generate_ids([5, 17, 42, 9], 6)

    # nothing new: a look for the next root (404) and timestamp.json are all that cross the wire
    n1 = len(site["nginx"].log())
    again = _sync(site, tiny["base"])
    assert again.updated == [] and sorted(again.unchanged) == ["a", "b"]
    assert [(x[0].rsplit("/", 1)[1], x[1]) for x in site["nginx"].log()[n1:]] == [("2.root.json", 404),
                                                                                  ("timestamp.json", 200)]
    assert again.bytes == (site["repo"] / "metadata" / "timestamp.json").stat().st_size  # body bytes


def test_new_version_keeps_the_previous_and_prune_removes_what_is_no_longer_listed(tiny, site):
    from edgeadapt.ship.store import AdapterStore

    r = _repo(site)
    r.add([release(tiny["a"], site["tmp"] / "a1.gguf", 1), tiny["b"]])
    r.publish()
    _sync(site, tiny["base"])
    r.add([release(tiny["a"], site["tmp"] / "a2.gguf", 2, scale=0.5)])
    r.remove("b")
    r.publish()
    assert [(x.name, x.version) for x in r.listed()] == [("a", 2)]  # v2 replaced v1 in the listing
    got = _sync(site, tiny["base"], only=["a", "nope"], prune=True)  # --only narrows prune too: b stays
    assert got.updated == [{"name": "a", "version": 2, "previous": 1, "bytes": got.updated[0]["bytes"]}]
    assert got.not_listed == ["nope"] and got.summary().endswith(f"{got.seconds:.2f}s")
    assert "a 1→2" in got.summary() and "not listed for this base: nope" in got.summary()
    assert got.removed == [] and AdapterStore(site["store"]).names() == ["a", "b"]
    assert AdapterStore(site["store"]).info("a").previous == 1
    got = _sync(site, tiny["base"], prune=True)
    assert got.removed == ["b"] and got.unchanged == ["a"] and AdapterStore(site["store"]).names() == ["a"]


def test_repo_layout_keys_and_the_files_own_signature(tiny, site, tmp_path):
    from edgeadapt.ship.signing import TrustStore, generate_keypair, sign_delta, verify_delta
    from edgeadapt.formats.delta import read_delta

    priv, pub = generate_keypair(tmp_path / "team")
    signed = release(tiny["a"], tmp_path / "a.gguf", 3)
    sign_delta(signed, priv)
    x = _repo(site).add([signed])[0]
    latest = max((site["repo"] / "metadata").glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    meta = json.loads(latest.read_bytes())
    tf = meta["signed"]["targets"][x.path]
    d = read_delta(signed)
    assert tf["custom"]["edgeadapt"] == {"name": "a", "version": 3, "kind": "lora", "quant": "F32",
                                         "base": tiny["manifest"].fingerprint, "signed_by": d.signature.split(":")[1]}
    served = site["repo"] / "targets" / x.path.rpartition("/")[0] / f"{tf['hashes']['sha256']}.a-v3.gguf"
    assert served.read_bytes() == signed.read_bytes()  # byte for byte: the edgeadapt signature still holds
    verify_delta(read_delta(served), TrustStore.load(pub))
    keys = sorted(p.name.split("-")[0] for p in site["keys"].glob("*.key"))
    assert keys == ["root", "snapshot", "targets", "timestamp"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in site["keys"].glob("*.key"))
    from edgeadapt.ship.repo import AdapterRepository
    from edgeadapt.errors import UpdateError

    with pytest.raises(UpdateError, match="keys must not live inside the repository"):
        AdapterRepository.init(tmp_path / "r2", tmp_path / "r2" / "keys")
    with pytest.raises(UpdateError, match="a3 version 3 for this base is already published with other contents"):
        _repo(site).add([release(tiny["a"], tmp_path / "a3.gguf", 3, scale=2.0, name="a3")])
        _repo(site).add([release(tiny["a"], tmp_path / "a3b.gguf", 3, scale=3.0, name="a3")])


def test_sync_can_require_the_files_own_signature(tiny, site, tmp_path):
    from edgeadapt.errors import UpdateError
    from edgeadapt.ship.signing import TrustStore, generate_keypair, sign_delta
    from edgeadapt.ship.store import AdapterStore

    priv, pub = generate_keypair(tmp_path / "team")
    r = _repo(site)
    r.add([tiny["b"]])
    r.publish()
    with pytest.raises(UpdateError, match=r"refused: .*b-v1\.gguf.*: expected a signed delta file, found an unsigned one"):
        _sync(site, tiny["base"], trust=TrustStore.load(pub), require_signature=True)
    assert AdapterStore(site["store"]).names() == []
    signed = release(tiny["b"], tmp_path / "b2.gguf", 2)
    sign_delta(signed, priv)
    r.add([signed])
    r.publish()
    got = _sync(site, tiny["base"], trust=TrustStore.load(pub), require_signature=True)
    assert [(u["name"], u["version"]) for u in got.updated] == [("b", 2)]


def test_key_rotation_root_and_targets_devices_follow(tiny, site):
    from tuf.api.metadata import Metadata

    r = _repo(site)
    r.add([release(tiny["a"], site["tmp"] / "a1.gguf", 1)])
    r.publish()
    _sync(site, tiny["base"])
    assert r.rotate("root") == "2.root.json"
    assert r.rotate("targets") == "3.root.json"
    one, two = (Metadata.from_bytes((site["repo"] / "metadata" / f"{v}.root.json").read_bytes()) for v in (1, 2))
    one.signed.verify_delegate("root", two.signed_bytes, two.signatures)  # signed by the old root keys …
    two.signed.verify_delegate("root", two.signed_bytes, two.signatures)  # … and by the new ones
    assert set(one.signed.roles["root"].keyids).isdisjoint(two.signed.roles["root"].keyids)
    assert len(list((site["keys"] / "retired").glob("*.key"))) == 2
    r.add([release(tiny["a"], site["tmp"] / "a2.gguf", 2, scale=0.5)])
    r.publish()
    got = _sync(site, tiny["base"])  # the device still holds only 1.root.json as its anchor
    assert [(u["name"], u["version"]) for u in got.updated] == [("a", 2)]


def test_resume_after_an_interruption_at_half(tiny, site):
    from edgeadapt.errors import UpdateError

    r = _repo(site)
    a = release(tiny["a"], site["tmp"] / "a1.gguf", 1)
    size = a.stat().st_size
    r.add([a])
    r.publish()
    site["proxy"].add("reset", "/targets/", at=0.5)
    with pytest.raises(UpdateError, match="could not be read"):
        _sync(site, tiny["base"], url=site["purl"], retries=0)
    parts = list(site["store"].glob(".tuf/*/partial/*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size <= size // 2
    have = parts[0].stat().st_size
    n0 = len(site["nginx"].log())
    got = _sync(site, tiny["base"], url=site["purl"])
    (uri, status, sent, rng), = _target_gets(site, n0)
    assert status == 206 and rng == f"bytes={have}-"
    assert got.updated[0]["bytes"] == size - have  # only the missing half crossed the wire again
    assert sent < size - have + 400  # + the response head
    assert not list(site["store"].glob(".tuf/*/partial/*"))


def test_a_server_without_range_sends_the_whole_file_again(tiny, site):
    from edgeadapt.errors import UpdateError
    from edgeadapt.ship.store import AdapterStore

    r = _repo(site)
    a = release(tiny["a"], site["tmp"] / "a1.gguf", 1)
    r.add([a])
    r.publish()
    site["proxy"].add("reset", "/targets/", at=0.5)
    with pytest.raises(UpdateError):
        _sync(site, tiny["base"], url=site["purl"], retries=0)
    assert list(site["store"].glob(".tuf/*/partial/*.part"))[0].stat().st_size > 0
    site["proxy"].add("norange", "/targets/")
    n0 = len(site["nginx"].log())
    got = _sync(site, tiny["base"], url=site["purl"])
    (uri, status, sent, rng), = _target_gets(site, n0)
    assert (status, rng) == (200, "") and got.updated[0]["bytes"] == a.stat().st_size  # 200: the start is skipped
    assert AdapterStore(site["store"]).resolve("a").read_bytes() == a.read_bytes()


@pytest.mark.parametrize("kind,match,times", [("reset", "/targets/", 2), ("truncate", "/targets/", 1),
                                              ("500", "timestamp.json", 2), ("500", "/targets/", 1),
                                              ("truncate", ".snapshot.json", 1), ("longer", ".targets.json", 1)])
def test_network_faults_are_retried_and_the_result_verified(tiny, site, kind, match, times):
    r = _repo(site)
    r.add([release(tiny["a"], site["tmp"] / "a1.gguf", 1)])
    r.publish()
    fault = site["proxy"].add(kind, match, times=times)
    got = _sync(site, tiny["base"], url=site["purl"])
    assert fault.times == 0 and [u["name"] for u in got.updated] == ["a"]  # every planned fault was served
    assert got.requests == 5 + (0 if kind == "longer" else times)  # next root, timestamp, snapshot, targets, file


def test_cli_repo_and_sync(tiny, site, tmp_path):
    from edgeadapt.cli import main

    run = CliRunner().invoke
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    res = run(main, ["repo", "init", str(repo), "--keys", str(keys), "--threshold", "targets=2"])
    assert res.exit_code == 0 and "targets 2-of-2" in res.output, res.output
    res = run(main, ["repo", "add", str(repo), str(tiny["a"]), str(tiny["b"]), "--keys", str(keys)])
    assert res.exit_code == 0 and "added a version 1 (lora, F32," in res.output, res.output
    res = run(main, ["repo", "publish", str(repo), "--keys", str(keys), "--expires", "1d"])
    assert res.exit_code == 0 and "2 adapters listed" in res.output, res.output
    res = run(main, ["repo", "resign", str(repo), "targets", "--keys", str(keys)])
    assert res.exit_code == 0 and res.output == "re-signed targets: version 3\n", res.output
    res = run(main, ["repo", "list", str(repo), "--json"])
    assert [a["name"] for a in json.loads(res.output)["adapters"]] == ["a", "b"]
    (site["repo"].parent / f"{site['repo'].name}-cli").symlink_to(repo)
    url = site["url"] + "-cli"
    store = tmp_path / "store"
    args = ["sync", url, "--root", str(repo / "metadata" / "1.root.json"), "--store", str(store),
            "--base", str(tiny["base"])]
    res = run(main, args)
    assert res.exit_code == 0 and res.stdout.startswith(f"synced {store}: updated 2 (a -→1, b -→1), unchanged 0, ")
    assert "a " in res.stderr and "█" * 24 in res.stderr and " MB" in res.stderr  # a bar per download, on stderr
    res = run(main, args + ["--json", "--only", "a,zz", "--only", "b"])
    assert res.exit_code == 0 and res.stderr == "", res.output
    assert json.loads(res.stdout)["not_listed"] == ["zz"]
    got = json.loads(res.stdout)
    assert (got["updated"], sorted(got["unchanged"])) == ([], ["a", "b"])
    res = run(main, args[:1] + [url + "/nowhere"] + args[2:])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert res.output.startswith(f"error: sync from {url}/nowhere refused: HTTP 404 from the repository")
    res = run(main, ["repo", "remove", str(repo), "nope", "--keys", str(keys)])
    assert res.exit_code == 2 and "error: nope: no such adapter" in res.output


def test_docs_name_tests_that_exist():
    import re
    from pathlib import Path

    here = Path(__file__).parent
    names = set(re.findall(r"`(test_[a-z0-9_]+)", (here.parent / "docs" / "UPDATES.md").read_text()))
    source = "".join(p.read_text() for p in here.glob("test_update_*.py"))
    assert len(names) >= 12 and sorted(n for n in names if f"def {n}(" not in source) == []


def test_the_device_side_imports_no_torch_and_tuf_only_on_sync(tiny, site):
    import subprocess
    import sys

    r = _repo(site)
    r.add([tiny["a"]])
    r.publish()
    code = ("import sys, edgeadapt, edgeadapt.cli\n"
            "before = 'tuf' in sys.modules\n"
            f"got = edgeadapt.sync({site['url']!r}, root={str(site['root'])!r}, store={str(site['store'])!r}, "
            f"base={str(tiny['base'])!r})\n"
            "print(before, [u['name'] for u in got.updated], sorted(m for m in ('torch', 'transformers', 'onnx') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False ['a'] []", out.stderr


def test_offline_roles_are_re_signed_and_a_stale_snapshot_is_refreshed(tiny, site):
    from edgeadapt.ship.repo import AdapterRepository

    r = AdapterRepository(site["repo"], site["keys"], {"targets": 10})
    r.add([tiny["a"]])
    r.publish()
    _sync(site, tiny["base"])
    assert r.expiring() == [f"targets expires {r.targets().expires:%Y-%m-%d}"]  # publish warns with this
    r = AdapterRepository(site["repo"], site["keys"])
    assert r.resign("targets") == 3 and r.expiring() == []
    assert r.resign("root") == 2
    snap = r.publish()[0]
    assert r.publish()[0] == snap  # nothing changed: the same snapshot
    assert AdapterRepository(site["repo"], site["keys"], {"snapshot": 10}).publish(force=True)[0] == snap + 1
    assert r.publish()[0] == snap + 2  # 10 days left of a 30-day lifetime: re-signed
    assert r.publish()[0] == snap + 2
    got = _sync(site, tiny["base"])  # follows 2.root.json, takes the new targets and snapshot
    assert got.unchanged == ["a"] and got.requests == 5


def test_every_path_the_device_accepts_stays_inside_its_folder():
    import posixpath

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgeadapt.ship.repo import TARGET_RE

    @settings(max_examples=400, deadline=None)
    @given(st.text(alphabet="ab./-_\0\\v1g:0", max_size=40))
    def check(tail):
        for path in (tail, f"0123456789abcdef/{tail}", f"0123456789abcdef/{tail}/{tail}-v1.gguf"):
            if TARGET_RE.fullmatch(path):
                parts = path.split("/")
                assert posixpath.normpath(path) == path and not path.startswith("/") and "\0" not in path
                assert ".." not in parts and "." not in parts and "\\" not in path and len(parts) == 3

    check()


def _serve(base, store, admin):
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", "from edgeadapt.cli import main; main()", "serve", str(base),
                             "--store", str(store), "--admin-key", admin, "--engine", "numpy", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)  # a file: an unread pipe fills and blocks
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited: {log.read()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not come up")


def _served(url, admin):
    import urllib.request

    req = urllib.request.Request(url + "/admin/adapters", headers={"authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {a["id"]: a["version"] for a in json.loads(r.read())["data"]}


def _complete(url, model):
    import urllib.request

    body = json.dumps({"model": model, "prompt": "hello there", "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["choices"][0]["text"]


@pytest.fixture(scope="module")
def texty(tmp_path_factory):
    """A tiny llama with a byte-level tokenizer (a server answers in text), and two adapters for it."""
    from arch_common import text_base

    return text_base(tmp_path_factory.mktemp("texty"), {"a": (1, {}), "b": (2, {})})


def test_sync_feeds_a_running_server(texty, site, tmp_path):
    """`edgeadapt sync --serve`: a running `edgeadapt serve --store` then serves what the store holds — new
    adapters loaded, a new version swapped in (its answers change to the new version's), pruned ones unloaded;
    a server left behind is caught up by a sync that downloads nothing."""
    import signal
    import time

    import edgeadapt
    from edgeadapt.cli import main

    admin = "feed-admin"
    site["store"].mkdir()
    r = _repo(site)
    r.add([release(texty["a"], site["tmp"] / "a1.gguf", 1), texty["b"]])
    r.publish()
    proc, url = _serve(texty["base"], site["store"], admin)
    try:
        args = ["sync", site["url"], "--root", str(site["root"]), "--store", str(site["store"]),
                "--base", str(texty["base"]), "--serve", url, "--admin-key", admin, "--prune", "--json"]
        run = CliRunner().invoke
        res = run(main, args)
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["served"] == {"loaded": ["a", "b"], "reloaded": [], "unloaded": [], "kept": [],
                                                    "failed": []}
        assert _served(url, admin) == {"a": 1, "b": 1}

        def alone(path, name):
            m = edgeadapt.load(texty["base"], engine="numpy")
            m.add_adapter(str(path), name=name)
            m.use(name)
            return m.generate("hello there", max_new_tokens=8, temperature=0.0, chat=False)
        assert _complete(url, "a") == alone(site["tmp"] / "a1.gguf", "a")

        a2 = release(texty["a"], site["tmp"] / "a2.gguf", 2, scale=-3.0)
        r.add([a2])
        r.remove("b")
        r.publish()
        # clients keep asking for "a" while the sync swaps its version: never a moment without it, every answer
        # one version's whole answer (a request runs on the version it started with)
        import threading
        import urllib.error
        v1, v2 = alone(site["tmp"] / "a1.gguf", "a"), alone(a2, "a")
        answers, stop = [], threading.Event()

        def ask():
            while not stop.is_set():
                try:
                    answers.append(_complete(url, "a"))
                except urllib.error.HTTPError as e:
                    answers.append(e.code)
                time.sleep(0.01)
        clients = [threading.Thread(target=ask) for _ in range(2)]
        for c in clients:
            c.start()
        time.sleep(0.3)
        try:
            res = run(main, args[:-1])  # the text output
        finally:
            time.sleep(0.3)
            stop.set()
            for c in clients:
                c.join(30)
        assert res.exit_code == 0 and f"server {url}: reloaded 1 (a), unloaded 1 (b)" in res.stdout, res.output
        assert set(answers) <= {v1, v2} and answers[0] == v1 and answers[-1] == v2, set(answers) - {v1, v2}
        assert _served(url, admin) == {"a": 2}
        assert _complete(url, "a") == v2 != v1

        # a server that fell behind (here: its adapter unloaded by hand) is caught up by a sync with nothing new
        req = __import__("urllib.request").request.Request(url + "/admin/adapters/a", method="DELETE",
                                                            headers={"authorization": f"Bearer {admin}"})
        __import__("urllib.request").request.urlopen(req, timeout=10)
        res = run(main, args)
        assert res.exit_code == 0 and json.loads(res.stdout)["updated"] == [], res.output
        assert json.loads(res.stdout)["served"]["loaded"] == ["a"] and _served(url, admin) == {"a": 2}
        res = run(main, [("wrong" if x == admin else x) for x in args])
        assert res.exit_code == 2 and "expected the admin listing" in res.output and "HTTP 401" in res.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    res = CliRunner().invoke(main, args)  # the server is gone: the store syncs, the error says so
    assert res.exit_code == 2 and "expected a running `edgeadapt serve`" in res.output, res.output


def test_a_version_in_use_is_not_swapped_under_running_requests(tmp_path):
    """The feed's retry and report when the server answers 409 (running requests use the name) for longer
    than --serve-wait; a stand-in admin API on loopback counts the calls."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edgeadapt.serve.feed import feed

    calls = []

    class Admin(BaseHTTPRequestHandler):
        def _send(self, status, body):
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):
            self._send(200, {"data": [{"id": "a", "version": 1, "in_use": 1}, {"id": "b", "version": 1}]})

        def do_DELETE(self):
            calls.append(("DELETE", self.path))
            self._send(409, {"error": {"message": "in use"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            calls.append(("POST", body["name"], body["replace"]))
            self._send(409 if body["name"] == "a" else 400, {"error": {"message": "in use or refused"}})

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Admin)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        got = feed(f"http://127.0.0.1:{srv.server_port}", "k", {"a": 2, "b": 2, "c": 1}, ["b"], wait=0.3, poll=0.1)
    finally:
        srv.shutdown()
    # a: swapped (replace) but in use → retried every 0.1 s for 0.3 s, then kept; b: removed but in use → kept;
    # c: new, refused by the server → failed, not retried
    assert sorted(got.kept) == ["a", "b"] and got.reloaded == got.loaded == got.unloaded == []
    assert got.failed == ["c: load HTTP 400: in use or refused"]
    assert 3 <= calls.count(("POST", "a", True)) <= 5 and 3 <= calls.count(("DELETE", "/admin/adapters/b")) <= 5
    assert calls.count(("POST", "c", False)) == 1 and not any(c[:2] == ("POST", "b") for c in calls)
