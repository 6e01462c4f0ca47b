"""What the command modules share: the progress line and the FILE[:WEIGHT] syntax."""

from __future__ import annotations

import time

import click


class _Progress:
    """One status line per step on stderr: ``export  quantize to F16  120/272``."""

    def __init__(self, label: str):
        self.label, self.step, self.t0 = label, None, time.perf_counter()

    def __call__(self, step: str, done: int, total: int) -> None:
        if step != self.step and self.step is not None:
            click.echo("", err=True)
        self.step = step
        end = "\n" if done >= total else ""
        click.echo(f"\r{self.label}  {step}  {done}/{total}  ({time.perf_counter() - self.t0:.1f}s)", err=True, nl=False)
        if end:
            click.echo("", err=True)
            self.step = None


def _file_weight(spec: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (file, weight). A spec that names an existing path is that path (a colon in a file
    name stays part of it); a number after the last colon is the weight. Anything else after a file that exists
    is a wrong weight, and :class:`UsageError` names it; a missing file is left for the loader to name."""
    import math
    import os

    from edgeadapt.errors import UsageError

    if os.path.exists(spec):
        return spec, 1.0
    path, sep, w = spec.rpartition(":")
    if sep:
        for i in range(len(path) - 1, 0, -1):  # billing.gguf:0.5:2 — the file exists, the weight is wrong
            if spec[i] == ":" and os.path.exists(spec[:i]):
                raise UsageError(f"--adapter {spec!r}: expected one number after {spec[:i + 1]!r}, found {spec[i + 1:]!r}")
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if weight is not None and math.isfinite(weight):
            return path, weight
        if weight is not None or os.path.exists(path):
            raise UsageError(f"--adapter {spec!r}: expected a finite number as WEIGHT after {path + ':'!r}, found {w!r}")
    for s in ("=", ","):  # billing.gguf=0.5: a near miss of the syntax, not a missing file
        head, sep2, _ = spec.rpartition(s)
        if sep2 and os.path.exists(head):
            raise UsageError(f"--adapter {spec!r}: expected FILE[:WEIGHT], found {s!r} after {head!r}; write {head}:WEIGHT")
    return spec, 1.0


def output_file(path, *, suffixes: tuple[str, ...] = (), what: str = "output file"):
    """Check an output path before any work is done: its folder exists and is writable, it is not a folder, and
    its name ends in one of ``suffixes`` (when given). Raises :class:`UsageError` naming what is wrong."""
    import os
    from pathlib import Path

    from edgeadapt.errors import UsageError

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"{what} {path}: expected a file name, found a folder")
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: its folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {path}: its folder {parent} is not writable")
    if suffixes and not path.name.endswith(suffixes):
        raise UsageError(f"{what} {path}: expected a name ending in {' or '.join(suffixes)}, found {path.suffix or 'none'}")
    return path


def output_folder(path, *, what: str = "output folder"):
    """An output folder (created by the command that writes it): refused if it is a file, or if the nearest
    folder that exists on its way cannot be written."""
    import os
    from pathlib import Path

    from edgeadapt.errors import UsageError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path}: expected a folder, found a file")
    near = path
    while not near.exists():
        near = near.parent
    if not near.is_dir():
        raise UsageError(f"{what} {path}: {near} is a file, not a folder")
    if not os.access(near, os.W_OK):
        raise UsageError(f"{what} {path}: {near} is not writable")
    return path
