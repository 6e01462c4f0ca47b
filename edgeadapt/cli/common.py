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
    """``FILE[:WEIGHT]`` -> (file, weight); a colon that is not followed by a number is part of the path."""
    path, sep, w = spec.rpartition(":")
    try:
        return (path, float(w)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0
