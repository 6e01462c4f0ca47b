"""What the onnxruntime engine may hold beyond the weights (the ``memory=`` policies of ``edgeadapt.load``) and the
process-wide means it uses to give memory back: glibc's mmap threshold, the data file's mapped pages. Measured in
docs/PERFORMANCE.md, "Memory"."""

from __future__ import annotations

import os
from pathlib import Path

# memory= -> (enable_cpu_mem_arena, enable_mem_pattern); "low" and "balanced" also fix glibc's mmap threshold
# (return_large_buffers). Without the arena every run's buffers go back to the system and are faulted in again
# next run (SmolLM2 int4: −8 MB, but a first token 0.7 -> 1.4 s): only "low" pays that. A memory pattern is
# planned and kept for every new set of input shapes, and each decode step's mask is one column wider: with it
# resident memory grows with the conversation (SmolLM2 int4: +20 MB over 700 decode steps), for no measurable
# speed: only "fast" keeps it. Measured: docs/PERFORMANCE.md, "Memory".
MEMORY = {"low": (False, False), "balanced": (True, False), "fast": (True, True)}


def return_large_buffers() -> None:
    """glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which the
    prompt's logits, onnxruntime's per-run buffers and numpy's temporaries come from the heap and stay
    resident once freed. A fixed threshold of 64 KiB sends blocks that large back to the system when freed
    (process-wide; measured in docs/PERFORMANCE.md, "Memory"). Elsewhere than glibc: nothing to do."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD (fixing it also turns off the dynamic raise)
    mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD: give back free heap above 1 MiB


def drop_mapped_pages(root: Path) -> None:
    """onnxruntime memory-maps a graph's external data file (``*.onnx.data``), and prepacking reads every weight
    through that mapping: once a session is built, those pages stay resident beside the packed copies (SmolLM2
    int4: 18 MB) though the session reads only a few of them again (embedding rows, norms). Drop them from this
    process's resident memory (MADV_DONTNEED: they stay in the page cache and come back when read). Linux only;
    elsewhere nothing to do. Measured in docs/PERFORMANCE.md, "Memory"."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    prefix = str(Path(root).resolve()) + os.sep
    for line in maps:
        parts = line.split(None, 5)  # address perms offset dev inode path
        if len(parts) == 6 and parts[5].startswith(prefix) and parts[5].endswith(".data"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            madvise(lo, hi - lo, 4)  # MADV_DONTNEED
