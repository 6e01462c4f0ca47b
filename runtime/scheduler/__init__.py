"""Continuous batching: concurrent single-prompt requests on one Model share one decode batch per step.

Every ``generate()`` / ``generate_ids()`` of one prompt (from threads, or ``Model.agenerate`` from asyncio)
runs here when ``Model.batching`` is on (the default):

- the caller reads the request's state under the model's read lock (:meth:`Model._request`) and waits for a
  row: at most ``max_rows`` requests run at once, ``max_waiting`` more may wait, a further one is refused with
  :class:`QueueFullError`;
- everything else runs in this module's worker thread, one forward at a time: prefills and decode steps
  alternate. Prompts of up to ``prefill_chunk`` tokens waiting together are prefilled in one turn (at most
  ``prefill_tokens`` padded tokens): at batch 1 each where the engine takes right-padded rows (``pads_right``:
  onnxruntime's fused graphs), exactly as alone; elsewhere in one left-padded forward, each row with its own
  adapter set. A longer prompt (or one with a KV prefix) is prefilled alone, one chunk per turn. A prompt that
  starts with at least ``prefix_min`` tokens (0 by default: off) of the last prompt of its set reuses their kept
  keys / values;
- the rows then join the decode batch: one forward per step for every running row, each with its own adapter
  set (per-row factors, :mod:`runtime.row_lora`), sampler, seed and token limit; a row leaves at EOS, at its
  limit, or when its caller stops reading (a closed stream, a cancelled task). Each step's tokens go out once:
  through a thread's queue, or one ``call_soon_threadsafe`` per event loop for all its rows.

Weights: each request holds its read lock until its row has left the batch, so a merge waits for every running
row and never lands under one. While weights are merged only requests of the merged (active) set run, as one
shared plan; otherwise every row runs beside the pure base with its own set, as it runs alone: greedy tokens
the same, logits within ~1e-7 on numpy, bit for bit on onnxruntime's fused graphs (int4 included, where
MatMulNBits quantizes its inputs: docs/SERVING.md). Each set's one-row factors are made once
(:class:`runtime.row_lora.BatchPlans`); a joining row overwrites only the buffer rows whose set changed.

KV cache: one [rows, kv_heads, T, head_dim] per layer, updated in place (onnxruntime's fused graph: a KVCache
bound by IOBinding). Where the engine ``pads_right`` each row's keys are at [0, len) and GroupQueryAttention writes
its new one after them: its sums run over exactly its alone keys; elsewhere the cache is left-padded. A row that
finds the batch empty decodes on its prefill's own cache. On onnxruntime the batch then changes in place: a new
row's keys go into the slot of a row that left, or after the last row (the cache has room for ``max_rows``); a
slot left empty takes the last row; the mask narrows to the longest row (:meth:`Scheduler._in_place`). Elsewhere
(numpy; graphs exported before right padding) joins rebuild the cache as long as the longest row, and rows that
only leave stay, masked, while that costs less than a rebuild (``idle_row_steps``).

The package: :mod:`.core` (admission, the worker, the decode batch) and :mod:`.prefill` (prefill turns).
"""

from edgeadapt.runtime.scheduler.core import _END, QueueFullError, Scheduler, scheduler_of

__all__ = ["QueueFullError", "Scheduler", "scheduler_of", "_END"]
