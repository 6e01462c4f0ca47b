"""``edgeadapt sync`` killed (SIGKILL) at random points, again and again, while new versions keep being
published and downloads trickle through the proxy: after every kill the store still has a working
version of the adapter, and a sync left alone brings it to the newest one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from update_common import release, site, tokens, web  # noqa: F401 (fixtures)

CLI = [sys.executable, "-c", "from edgeadapt.cli import main; main()"]


def _kill_loop(tiny, site, kills: int, seed: int) -> dict[str, int]:
    from edgeadapt.formats.delta import read_delta
    from edgeadapt.ship.repo import AdapterRepository
    from edgeadapt.ship.store import AdapterStore
    from edgeadapt.ship.sync import sync

    rng = random.Random(seed)
    r = AdapterRepository(site["repo"], site["keys"])
    r.add([release(tiny["a"], site["tmp"] / "a1.gguf", 1)])
    r.publish()
    sync(site["url"], root=site["root"], store=site["store"], base=tiny["base"])
    st = AdapterStore(site["store"])
    published = 1

    def publish_next() -> None:
        nonlocal published
        published += 1
        r.add([release(tiny["a"], site["tmp"] / f"a{published}.gguf", published, scale=1.0 + 0.01 * published)])
        r.publish()

    site["proxy"].add("slow", "/targets/", times=-1, rate=200_000.0)  # ~0.3 s per download: kills land mid-body
    cmd = CLI + ["sync", site["purl"], "--root", str(site["root"]), "--store", str(site["store"]),
                 "--base", str(tiny["base"]), "--json"]
    publish_next()
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    full = time.monotonic() - t0
    seen = {"kills": 0, "broken": 0, "completed": 0, "versions": 0}
    while seen["kills"] < kills and seen["kills"] + seen["completed"] < 3 * kills:  # runs that finish are not kills
        if st.info("a").version == published:
            publish_next()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, full) if rng.random() < 0.5 else rng.uniform(0.6 * full, 1.1 * full))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            seen["kills"] += 1
        else:
            seen["completed"] += 1
        p.wait(30)
        try:  # a working version: resolvable, intact, fits the base
            d = read_delta(st.resolve("a"))
            d.check_base(tiny["manifest"].arch, tiny["manifest"].fingerprint)
        except Exception:  # noqa: BLE001 — any failure is a broken store
            seen["broken"] += 1
    seen["versions"] = st.info("a").version
    site["proxy"].clear()
    sync(site["url"], root=site["root"], store=site["store"], base=tiny["base"])
    assert st.info("a").version == published
    assert len(tokens(tiny["base"], site["store"], "a")) == 6
    return seen


def test_sync_killed_at_random_points_never_leaves_a_store_without_a_working_version(tiny, site):
    seen = _kill_loop(tiny, site, kills=8, seed=1)
    assert seen["broken"] == 0 and seen["kills"] == 8, seen


@pytest.mark.slow
def test_sync_killed_100_times(tiny, site, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("100 kills of edgeadapt sync take ~3 minutes: run with -m slow")
    seen = _kill_loop(tiny, site, kills=100, seed=2)
    print(f"kill test: {seen}")
    assert seen["broken"] == 0 and seen["kills"] == 100, seen
