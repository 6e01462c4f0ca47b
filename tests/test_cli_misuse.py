"""The command line as a newcomer meets it: every command given missing or unwritable output paths, files of
the wrong kind and bad values ends in one message naming the problem and exit code 2 — never a traceback.
Our refusals print one ``error: …`` line; click's own (a path that must exist, a value out of range) print its
usage and one ``Error: …`` line."""

from __future__ import annotations

import os
import shutil

import click
import pytest
from click.testing import CliRunner

from edgeadapt.cli import main


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("misuse")
    (d / "notes.txt").write_text("not a model\n")
    ro = d / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    shutil.copy(tiny["a"], d / "a.gguf")
    return dict(d=d, base=str(tiny["base"]), a=str(d / "a.gguf"), b=str(tiny["b"]), peft=str(tiny["root"] / "peft_a"),
                txt=str(d / "notes.txt"), ro=str(ro), missing=str(d / "no" / "such" / "dir"))


def _cases(f):
    base, a, peft, txt = f["base"], f["a"], f["peft"], f["txt"]
    unwritable = [] if os.geteuid() == 0 else [  # root writes anywhere
        (["export-adapter", peft, "--base", base, "-o", f["ro"] + "/x.gguf"], "not writable"),
        (["export-base", peft, f["ro"] + "/base"], "not writable")]
    return unwritable + [
        # export-adapter: output paths and kinds
        (["export-adapter", peft, "--base", base, "-o", f["missing"] + "/x.gguf"], "does not exist"),
        (["export-adapter", peft, "--base", base, "-o", str(f["d"])], "found a folder"),
        (["export-adapter", peft, "--base", base, "--format", "onnx_adapter", "-o", str(f["d"] / "x.gguf")],
         ".onnx_adapter"),
        (["export-adapter", peft, "--base", base, "-o", str(f["d"] / "x.onnx")], ".gguf"),
        (["export-adapter", txt, "--base", base, "-o", str(f["d"] / "x.gguf")], "error:"),
        (["export-adapter", peft, "--base", txt, "-o", str(f["d"] / "x.gguf")], "error:"),
        (["export-adapter", peft, "--base", base, "-o", str(f["d"] / "x.gguf"), "--version", "-1"], "--version"),
        # export-base
        (["export-base", txt, str(f["d"] / "out")], "error:"),
        (["export-base", peft, txt], "found a file"),
        (["export-base", peft, str(f["d"] / "out2"), "--onnx-quant", "int3"], "int3"),
        # inspect
        (["inspect", txt], "error:"),
        (["inspect", f["ro"]], "error:"),
        # generate: weights, folders, duplicates, values
        (["generate", base, "hi", "--adapter", a + ":abc"], "'abc'"),
        (["generate", base, "hi", "--adapter", a + ":"], "WEIGHT"),
        (["generate", base, "hi", "--adapter", a + ":0.5:2"], "'0.5:2'"),
        (["generate", base, "hi", "--adapter", a + "=0.5"], "'='"),
        (["generate", base, "hi", "--adapter", a + ":nan"], "finite"),
        (["generate", base, "hi", "--adapter", peft], "export-adapter"),
        (["generate", base, "hi", "--adapter", a, "--adapter", a + ":0.5"], "twice"),
        (["generate", base, "hi", "--adapter", str(f["d"] / "nope.gguf")], "nope.gguf"),
        (["generate", base, "hi", "--adapter", txt], "error:"),
        (["generate", base, "hi", "--top-p", "0"], "--top-p"),
        (["generate", base, "hi", "--max-new-tokens", "-3"], "--max-new-tokens"),
        (["generate", txt, "hi"], "Error"),
        # signing, store, shipping
        (["keygen", f["missing"] + "/k"], "error:"),
        (["sign", a, "--key", txt], "error:"),
        (["sign", a, "--key", a, "-o", f["missing"] + "/s.gguf"], "does not exist"),
        (["verify", txt], "error:"),
        (["install", txt, "--store", str(f["d"] / "store")], "error:"),
        (["install", a, "--store", txt], "error:"),
        (["rollback", "nobody", "--store", str(f["d"] / "store")], "error:"),
        (["remove", "nobody", "--store", str(f["d"] / "store")], "error:"),
        (["extract", txt, "--base", base, "-o", str(f["d"] / "e.gguf")], "error:"),
        (["extract", peft, "--base", base, "-o", f["missing"] + "/e.gguf"], "does not exist"),
        (["merge", base, a + ":abc", "-o", str(f["d"] / "merged")], "'abc'"),
        (["merge", base, a, "-o", txt], "is a file"),
        (["combine", a, f["b"], "-o", f["missing"] + "/c.gguf"], "does not exist"),
        (["combine", a, txt, "-o", str(f["d"] / "c.gguf")], "error:"),
        (["combine", a, f["b"], "--weights", "1,x", "-o", str(f["d"] / "c.gguf")], "error:"),
        (["export-adapter", a, "--base", base, "-o", str(f["d"] / "x.gguf")], "already a delta file"),
        # import-adapter
        (["import-adapter", txt, "--base", base, "-o", str(f["d"] / "i.gguf")], "error:"),
        (["import-adapter", a, "--base", base, "-o", str(f["d"] / "i.gguf")], "nothing to import"),
        (["import-adapter", peft, "--base", base, "-o", f["missing"] + "/i.gguf"], "does not exist"),
        (["import-adapter", str(f["d"]), "--base", base, "-o", str(f["d"] / "i.gguf")], "error:"),
        # the update channel: publisher and device (port 9 on loopback: nothing listens)
        (["repo", "init", str(f["d"] / "repo"), "--keys", str(f["d"] / "repo" / "keys")], "outside"),
        (["repo", "add", str(f["d"] / "no-repo"), a, "--keys", str(f["d"] / "keys")], "error:"),
        (["repo", "publish", txt, "--keys", str(f["d"] / "keys")], "error:"),
        (["repo", "remove", str(f["d"] / "no-repo"), "billing", "--keys", str(f["d"] / "keys")], "repo init"),
        (["repo", "rotate", str(f["d"] / "no-repo"), "targets", "--keys", str(f["d"] / "keys")], "repo init"),
        (["repo", "rotate", str(f["d"] / "no-repo"), "everything", "--keys", str(f["d"] / "keys")], "Error"),
        (["repo", "resign", str(f["d"] / "no-repo"), "root", "--keys", str(f["d"] / "keys")], "repo init"),
        (["repo", "list", str(f["d"] / "no-repo")], "repo init"),
        (["sync", "http://127.0.0.1:9/", "--root", a, "--store", str(f["d"] / "st"), "--base", base], "root"),
        (["sync", "http://127.0.0.1:9/", "--root", txt, "--store", txt, "--base", base], "error"),
        (["sync", "ftp://127.0.0.1:9/", "--root", txt, "--store", str(f["d"] / "st"), "--base", base], "error"),
        # serve refuses before it listens
        (["serve", base, "--adapter", "x=" + str(f["d"] / "nope.gguf"), "--port", "0"], "nope.gguf"),
        (["serve", base, "--adapter", a + ":0.5", "--port", "0"], "NAME=FILE"),
        (["serve", base, "--port", "70000"], "--port"),
        # bundle, bench, list, demo
        (["bundle", base, str(f["d"] / "bundle"), "--for", "ort/int4"], "error:"),  # the tiny base has no int4 graph
        (["bundle", base, txt], "error:"),
        (["bundle", txt, str(f["d"] / "bundle2")], "Error"),
        (["bench", base, "--adapter", str(f["d"] / "nope.gguf")], "Error"),
        (["bench", base, "--adapter", a, "--systems", "nosuch"], "nosuch"),
        (["bench", base, "--adapter", a, "--rounds", "0"], "--rounds"),
        (["list", "--store", txt], "Error"),
        (["demo", "--out", txt], "found a file"),
        (["demo", "--engine", "gpu"], "Error"),
    ]


def test_every_command_refuses_bad_input_in_one_line(files):
    runner = CliRunner()
    failures = []
    for args, want in _cases(files):
        res = runner.invoke(main, args)
        out = res.output
        if not isinstance(res.exception, SystemExit) or res.exit_code != 2:
            failures.append(f"{args}: exit {res.exit_code}, exception {res.exception!r}\n{out}")
        elif "Traceback" in out or want.lower() not in out.lower():
            failures.append(f"{args}: expected {want!r} in the message, found:\n{out}")
        elif "error:" in out and len([ln for ln in out.splitlines() if ln.startswith("error:")]) != 1:
            failures.append(f"{args}: expected one error: line, found:\n{out}")
    assert not failures, "\n\n".join(failures)


def test_a_file_whose_name_has_a_colon_is_still_a_file(files, tmp_path):
    from edgeadapt.cli.common import _file_weight

    odd = tmp_path / "billing:v2.gguf"
    shutil.copy(files["a"], odd)
    assert _file_weight(str(odd)) == (str(odd), 1.0)
    assert _file_weight(f"{odd}:0.25") == (str(odd), 0.25)
    assert _file_weight(files["a"] + ":-0.5") == (files["a"], -0.5)
    assert _file_weight("missing.gguf") == ("missing.gguf", 1.0)  # the loader names a missing file


def test_every_option_of_every_command_has_help():
    missing = []

    def walk(group: click.Group, prefix: str) -> None:
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")
            for p in cmd.params:
                if isinstance(p, click.Option) and not p.help and "--help" not in p.opts:
                    missing.append(f"{prefix}{name} {'/'.join(p.opts)}")
            if not (cmd.help or "").strip():
                missing.append(f"{prefix}{name}: no description")

    walk(main, "")
    assert not missing, f"options without help text: {missing}"

