"""``edgeadapt bench`` on a base folder exported without the int4 graph (as the demo exports it): a table with
ratios to the first edgeadapt system that ran, one line per system that could not run (not one per figure),
and a greedy-token agreement table that is not empty."""

from __future__ import annotations

import re

from click.testing import CliRunner

from edgeadapt.cli.core import main


def _run(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    return res.exit_code, res.output


def test_bench_table_on_a_base_without_int4(tiny, tmp_path):
    out = tmp_path / "bench.md"
    code, text = _run(["bench", str(tiny["base"]), "--adapter", str(tiny["a"]), "--adapter", str(tiny["b"]),
                       "--systems", "edgeadapt-ort-int4,edgeadapt-ort-fp32,edgeadapt-numpy",
                       "--rounds", "1", "--new-tokens", "4", "--out", str(out)])
    assert code == 0, text
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    figures = [r for r in rows if "[s]" in r or "tok/s" in r or "[MB]" in r]
    assert len(figures) == 13
    # the reference is the fp32 engine (the int4 one cannot load): the numpy column has a ratio in every row
    assert "(×k) = value / edgeadapt ort fp32's" in report
    for row in figures:
        numpy_cell = row.split("|")[4]
        assert re.search(r"\(\d+\.\d\d×\)", numpy_cell), row
    # the int4 system's reason is written once, its 13 cells point to it
    notes = [line for line in report.splitlines() if re.match(r"\[\d+\] edgeadapt ort int4: ", line)]
    assert len(notes) == 1 and "model_int4.onnx" in notes[0] and "--onnx-quant int4" in notes[0], report
    assert report.count("edgeadapt ort int4: ") == 1
    assert sum(row.split("|")[2].strip() == "failed [1]" for row in figures) == 13
    # greedy agreement between the engines that ran, bare and with adapter "a"
    agree = [r for r in rows if " vs " in r]
    assert len(agree) == 2 and all("edgeadapt ort fp32 vs edgeadapt numpy" in r for r in agree)


def test_bench_default_systems_follow_the_base_folder(tiny):
    from edgeadapt.cli.bench import _systems
    from edgeadapt.formats.manifest import read_manifest

    chosen, skipped = _systems(read_manifest(tiny["base"]), None)
    assert "edgeadapt-ort-int4" not in chosen and chosen[0] == "edgeadapt-ort-fp32"
    assert skipped == [("edgeadapt-ort-int4", "no model_int4.onnx (export-base … --onnx-quant int4)")]
    assert _systems(read_manifest(tiny["base"]), "edgeadapt-numpy")[0] == ["edgeadapt-numpy"]


def test_bench_refuses_an_unknown_system(tiny):
    code, text = _run(["bench", str(tiny["base"]), "--adapter", str(tiny["a"]), "--systems", "edgeadapt-numpy,vllm"])
    assert code == 2 and text.count("error:") == 1 and "vllm" in text and "edgeadapt-ort-int4" in text


def test_a_worker_that_dies_is_reported_with_its_signal(tmp_path):
    """A benchmarked system whose process dies (llama.cpp's AMX kernels on a VM that traps them) is reported as
    failed with the signal by name and what to try, whether it dies during a command or before the next one."""
    import os
    import signal

    from edgeadapt.benchmark.harness import Worker, _env, _exit

    assert _exit(3) == "exit status 3"
    assert "SIGSEGV" in _exit(-signal.SIGSEGV) and "EDGEADAPT_LLAMA_EXTRA_BUFTS=0" in _exit(-signal.SIGSEGV)
    assert _exit(-signal.SIGTERM) == "killed by SIGTERM"
    spec = tmp_path / "spec.json"
    spec.write_text('{"base": "b", "gguf": "g", "adapters": {}, "prompt": [1]}')  # the worker waits for commands
    w = Worker("edgeadapt-numpy", spec, _env(1))
    os.kill(w.p.pid, signal.SIGSEGV)
    w.p.wait(timeout=30)
    got = w.ask({"cmd": "setup"})
    assert got["error"].startswith("failed: the worker exited (killed by SIGSEGV"), got
