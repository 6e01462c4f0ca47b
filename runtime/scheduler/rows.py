"""One request in the scheduler's batch (:class:`_Row`), and the item that ends its stream (``_END``)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

_END = object()


class _Row:
    """One request in the batch: its state, its output (a queue, or a LoopSink), and the lease (read lock)."""

    def __init__(self, ids: np.ndarray, max_new: int, sampler: Any, sink: Any) -> None:
        self.ids, self.max_new, self.sampler, self.sink = ids, max_new, sampler, sink
        self.lease = contextlib.ExitStack()
        self.key: Any = None  # ("rows",) or ("merged", plan id): rows of one key share a batch
        self.row_set: dict[str, float] | None = None  # rows: the adapter set ({name: weight}) this row runs
        self.plan: Any = None  # merged: the shared plan; rows: the plan it was admitted with (a KV prefix, alone)
        self.alone = False  # prefilled alone in chunks (a long prompt, a KV prefix)
        self.done = 0  # prompt tokens prefilled so far (alone)
        self.pos_all: np.ndarray | None = None  # the prompt's positions (alone)
        self.kv: Any = None  # (cache layers, row index) of its prefill until the row is copied into the batch
        self.cache: Any = None  # its batch-1 prefill's own cache (keys at [0, length)): a batch it starts decodes on it
        self.mask0: np.ndarray | None = None  # the prefill's mask [length]; every later token is real
        self.length = 0  # keys this row has in the cache
        self.pos = 0  # position of the next token
        self.last = 0  # the token fed at the next step
        self.count = 0  # tokens delivered
        self.cancelled = False
        self.ended = False  # its reader got (or gets) its last item
        self.dead = False  # left, its slot kept in the batch (masked) until the next rebuild (no in-place batch)
        self.left = threading.Event()
        self._released = False
        self._on_release: Any = None
        self._once = threading.Lock()
        self._state = threading.Lock()  # ended / cancelled: whoever sees both releases the row

    def release(self) -> None:
        """Drop the read lock and the row slot (idempotent; any thread)."""
        with self._once:
            if self._released:
                return
            self._released = True
        self.lease.close()
        if self._on_release is not None:
            self._on_release()
        self.left.set()
