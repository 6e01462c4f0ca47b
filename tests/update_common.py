"""Shared by the update tests: nginx serving repositories on loopback, the fault proxy, adapter releases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netfaults import FaultProxy, Nginx

pytest.importorskip("tuf")

OTHER_FP = "sha256:" + "ab" * 32


@pytest.fixture(scope="session")
def web(tmp_path_factory):
    """nginx serving a folder of repositories (one per test) and a fault proxy in front of it."""
    root = tmp_path_factory.mktemp("www")
    ng = Nginx(root)
    if ng.url is None:
        print(f"update tests skipped: {ng.why_not}")
        pytest.skip(ng.why_not)
    proxy = FaultProxy(ng.port)
    yield dict(root=root, nginx=ng, proxy=proxy)
    proxy.close()
    ng.stop()


_count = [0]


@pytest.fixture
def site(web, tmp_path):
    """A fresh repository served by nginx: ``repo`` (folder), ``keys``, ``url`` (direct), ``purl`` (through
    the proxy, faults cleared), ``root`` (1.root.json copied to the device), ``store``."""
    from edgeadapt.ship.repo import AdapterRepository

    _count[0] += 1
    name = f"r{_count[0]}"
    repo = web["root"] / name
    AdapterRepository.init(repo, tmp_path / "keys")
    web["proxy"].clear()
    dev = tmp_path / "device"
    dev.mkdir()
    (dev / "root.json").write_bytes((repo / "metadata" / "1.root.json").read_bytes())
    return dict(repo=repo, keys=tmp_path / "keys", url=f"{web['nginx'].url}/{name}", purl=f"{web['proxy'].url}/{name}",
                proxy=web["proxy"], nginx=web["nginx"], root=dev / "root.json", store=dev / "store", tmp=tmp_path)


def release(src: Path, out: Path, version: int, *, scale: float = 1.0, name: str | None = None,
            fingerprint: str | None = None, dtype: str = "F32") -> Path:
    """A release of the adapter in ``src``: another version (B scaled, so it computes something else),
    name or base fingerprint."""
    from edgeadapt.formats.delta import read_delta, write_delta

    d = read_delta(src)
    f = {k: (a, (b * np.float32(scale)).astype(np.float32)) for k, (a, b) in d.factors.items()}
    write_delta(out, d, factors=f, version=version, name=name, fingerprint=fingerprint, dtype=dtype)
    return out


def tokens(base: Path, store: Path, name: str, n: int = 6) -> list[int]:
    """What the installed ``name`` generates greedily (numpy engine), loaded by name from the store."""
    import edgeadapt

    m = edgeadapt.load(base, engine="numpy", store=store)
    m.add_adapter(name)
    m.use(name)
    return [int(t) for t in m.generate_ids([5, 17, 42, 9], n)]
