"""The model's reader-writer lock (generations read, a weight change writes) and the scheduler's turn lock."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator


class RWLock:
    """Many generations at once, or one weight change: a merge never lands mid-generation. A waiting merge
    goes first (new requests wait for it, so a stream of requests cannot starve it), except for a thread that
    already holds a read: it may read again (a request inside a running stream never deadlocks)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}  # thread id -> reads held
        self._writer, self._waiting = False, 0

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if not self._readers.get(me):
                while self._writer or self._waiting:
                    self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class TurnLock:
    """A first-come, first-served mutex around every forward (runtime.scheduler: tests hold it to
    pause the worker)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next, self._serving = 0, 0

    def __enter__(self) -> None:
        with self._cond:
            me, self._next = self._next, self._next + 1
            while self._serving != me:
                self._cond.wait()

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()
