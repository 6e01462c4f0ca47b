"""A llama-family forward pass in plain numpy, straight from a GGUF base.

Device-side: numpy, gguf, the standard library, edgeadapt's formats and errors, and this package's kernels
(:mod:`.weights`, :mod:`.ops`, :mod:`.rows`); nothing is computed at import time. The I/O contract is the ONNX
engine's (``input_ids``/``attention_mask``/``position_ids``/``past`` in, logits and present
key/values out), so one generation loop drives both.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.errors import AdapterMismatchError, EdgeAdaptError, FormatError, UnsupportedError, collect
from edgeadapt.formats.gguf_file import open_gguf
from edgeadapt.formats.names import ROPE_FREQS

from edgeadapt.runtime.numpy_engine.weights import _FAST_DEQ, _Lazy, _Src
from edgeadapt.runtime.numpy_engine.ops import _attend, _rmsnorm, _ro, _rope, add_head_delta, set_blas_threads
from edgeadapt.runtime.numpy_engine.rows import _add_rows, _has_terms, _lin, _low_rank, _mm, check_rows
from edgeadapt.runtime.engines import Engine

_F32 = np.float32
_LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# the fp32 size under which "auto" dequantizes quantized / F16 weights once at load
_AUTO_LOAD_LIMIT = 2 << 30


# ---------------------------------------------------------------- engine
class NumpyEngine(Engine):
    """Llama / Qwen2 / Qwen3 forward pass in numpy from a GGUF base (Gemma 3 and GPT-2 through the blocks of
    :mod:`.layers`), with merged or live adapters.

    Weights stay memory-mapped from the file. How linear weights are held (``dequantize=``):

    - ``"load"``: every linear weight (F32 included) is dequantized / upcast once into fp32
      ``[in, out]`` (W transposed), with q|k|v and gate|up concatenated so each is one
      matmul. Done slab by slab straight into the target, and each tensor's file pages are
      then released (madvise), so resident memory ≈ the fp32 size, not fp32 + file.
      Fastest decode.
    - ``"lazy"``: the stored blocks stay mmapped and are used slab by slab (≤ 4 MiB of fp32
      scratch) at every matmul: for decode (≤ 8 rows of x) Q4_0 / Q4_1 / Q8_0 are multiplied
      straight from the blocks (``_FAST_MV``, ~2× faster than dequantize-then-matmul), else
      dequantized first (Q8_0, Q4_0, Q4_1, F16 bit-identical to gguf's; other types through
      ``gguf.quants.dequantize``). Memory ≈ stored size + KV cache, but every token widens
      the whole model to fp32 again. F32 tensors are used zero-copy.
    - ``"auto"`` (default): F32 tensors are used zero-copy from the memmap (``x @ W.T`` on a
      view). Quantized and F16 tensors follow ``"load"`` when their fp32 total is at most
      ``auto_load_limit`` (default min(2 GiB, physical RAM / 4)), else ``"lazy"``. F16 is
      upcast once rather than per use: numpy's float16→float32 cast took 1.9 ms for a
      1536×576 tensor, against 0.03 ms for the decode matmul it would feed.

    Measured on SmolLM2-135M against onnxruntime (``bench/numpy_vs_ort.py``, the figures and
    the profile that explains them are in docs/NUMPY_ENGINE.md): "load" decodes at onnxruntime's
    speed, "auto" on F32 at ~0.75× (the zero-copy ``x @ W.T`` kernel is slower than ``x @ Wt``),
    "lazy" on Q4_1 at ~0.3× in a third of the memory. Set ``OPENBLAS_NUM_THREADS`` to the cores
    the app can really use, or pass ``threads=`` (process-wide, through OpenBLAS's own setter):
    on an oversubscribed CPU OpenBLAS's spinning threads made decode 2–25× slower (SmolLM2 on a shared
    2-core VM: 1.5 tok/s with 2 threads, 15.8 with 1). The file is read with :func:`edgeadapt.formats.gguf_file.open_gguf`,
    which steps over the tokenizer arrays: 0.02 s on SmolLM2, where gguf.GGUFReader took 4.2 s and 160 MB.

    Adapters: :meth:`set_weights` replaces whole linear weights (merge mode; the caller adds
    the delta to :meth:`base_weight`). :meth:`set_live` adds ``scale·(x Aᵀ) Bᵀ`` beside the
    frozen weight (unmerged mode, the only exact way to put a small delta on a 4-bit base).
    ``forward(..., lora=)`` adds per-call factors, one adapter per batch row if wanted (the
    contract the onnxruntime engine's slotted graph shares). All validate everything before
    changing anything. Arrays passed in are used without a copy when they are already float32
    C-contiguous, so do not mutate them afterwards.

    KV cache: ``present`` arrays are read-only views of an internal buffer. When ``past`` is exactly the
    ``present`` this engine returned last, new keys/values are written in place after it, with no
    O(context) copy per token. Any other ``past`` is copied into a new buffer: forking from an older one is safe.
    """

    name = "numpy"
    live = kind_slots = bn_slots = head_slots = row_lora = can_merge = True  # every live form, and merges (Engine)
    auto_load_limit: int | None = None  # bytes; None = min(2 GiB, physical RAM / 4)
    auto_reason: str | None = None  # set by load(engine="auto"): why onnxruntime was not used
    blas_threads_set: bool | None = None  # threads= given: whether OpenBLAS took it

    def __init__(self, gguf_path: str | os.PathLike[str], cfg: ArchConfig | None = None, *,
                 dequantize: str = "auto", threads: int | None = None):
        if dequantize not in ("auto", "load", "lazy"):
            raise UnsupportedError(f"dequantize={dequantize!r} is not an option; choose 'auto', 'load' or 'lazy'")
        if threads is not None:  # process-wide: numpy has one BLAS
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise UnsupportedError(f"threads={threads!r}: expected a positive int (or None to leave BLAS as it is)")
            self.blas_threads_set = set_blas_threads(threads)
        self.path = Path(gguf_path)
        try:
            reader = open_gguf(self.path)
        except EdgeAdaptError:
            raise
        except Exception as e:  # numpy / the OS on an unreadable file
            raise FormatError(f"{self.path} is not a readable GGUF file: {type(e).__name__}: {e}") from e
        self._reader = reader  # keeps the memmap alive
        if cfg is None:
            try:
                cfg = ArchConfig.from_gguf(reader)
            except EdgeAdaptError:
                raise
            except Exception as e:  # a malformed metadata value
                raise FormatError(f"{self.path}: unreadable architecture metadata: {type(e).__name__}: {e}") from e
        if cfg.rope not in ("norm", "neox", "none"):
            raise UnsupportedError(f"rope kind {cfg.rope!r} is not supported; supported: 'norm', 'neox', 'none'")
        arch = cfg.arch
        scaling = reader.fields.get(f"{arch}.rope.scaling.type")
        if scaling is not None and scaling.contents() not in ("none", "", "linear"):
            raise UnsupportedError(f"{self.path}: rope scaling {scaling.contents()!r} is not supported yet "
                                   "(plain or linear rope only)")
        self.cfg = cfg
        self.dequantize = dequantize

        srcs: dict[str, _Src] = {}
        bad_types: list[str] = []
        file_freqs = None
        for t in reader.tensors:
            if t.name == ROPE_FREQS:  # Llama 3.x rope divisors: the card carries them (checked below)
                file_freqs = np.asarray(reader.view(t), _F32).reshape(-1).tolist()
                continue
            try:
                srcs[t.name] = _Src(t, reader.view(t))
            except Exception as e:  # pragma: no cover - exotic types gguf cannot view
                bad_types.append(f"{t.name}: {e}")
        expected = cfg.tensor_shapes()
        problems = bad_types + [
            f"{n}: expected shape {s}, found {'nothing' if n not in srcs else srcs[n].shape}"
            for n, s in expected.items() if n not in srcs or srcs[n].shape != tuple(s)]
        for n in expected:  # one row through the dequantizer proves gguf knows the type
            if n in srcs and srcs[n].deq is not None and srcs[n].qtype not in _FAST_DEQ:
                try:
                    srcs[n].deq(srcs[n].data.reshape(srcs[n].data.shape[0] if srcs[n].data.ndim > 1 else 1, -1)[:1])
                except Exception as e:
                    problems.append(f"{n}: tensor type {srcs[n].qtype.name} cannot be dequantized by gguf: {e}")
        card_freqs = None if cfg.rope_freqs is None else np.asarray(cfg.rope_freqs, _F32).tolist()
        if file_freqs != card_freqs:
            problems.append(f"{ROPE_FREQS}: expected {card_freqs or 'none'} (the card's rope_freqs), found {file_freqs or 'none'}")
        collect(problems, FormatError, f"{self.path} does not hold the tensors of its {arch} architecture card:")
        self._src = srcs

        # ---- small tensors: always fp32 in memory
        self._norm = {n: np.ascontiguousarray(srcs[n].full(), _F32) for n in expected
                      if len(expected[n]) == 1}
        # ---- linear weights
        linear_names = list(cfg.linear_shapes())
        head_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
        if cfg.tied_embeddings:
            linear_names.append(head_name)
        if dequantize == "auto":
            limit = self.auto_load_limit if self.auto_load_limit is not None else _default_auto_limit()
            total = sum(srcs[n].fp32_bytes for n in linear_names if srcs[n].deq is not None)
            mode = "load" if total <= limit else "lazy"
        else:
            mode = dequantize
        self._mode = mode
        self._base: dict[str, Any] = {}  # name -> fp32 [in, out] array (maybe a view) or _Lazy
        self._fused: dict[tuple[int, str], np.ndarray] = {}  # (layer, "qkv"|"gu") -> [in, Σout] fp32
        in_memory = {n: dequantize == "load" or (srcs[n].deq is not None and mode == "load") for n in linear_names}
        for i in range(cfg.n_layers):
            # weights the engine holds anyway are fused per input: q|k|v and gate|up are one matmul each
            for group, kinds in (("qkv", ("attn_q", "attn_k", "attn_v")), ("gu", ("ffn_gate", "ffn_up"))):
                names = [f"blk.{i}.{k}.weight" for k in kinds]
                if not all(in_memory.get(n, False) for n in names):  # (GPT-2 has attn_qkv, no gate)
                    continue
                fused = np.empty((cfg.dim, sum(srcs[n].shape[0] for n in names)), _F32)
                c = 0
                for n in names:
                    o = srcs[n].shape[0]
                    self._base[n] = fused[:, c:c + o]
                    srcs[n].fill_t(self._base[n])
                    self._drop_pages(srcs[n])
                    c += o
                self._fused[(i, group)] = fused
        for n in linear_names:
            if n in self._base:
                continue
            s = srcs[n]
            if in_memory[n]:
                self._base[n] = np.empty(s.shape[::-1], _F32)
                s.fill_t(self._base[n])
                self._drop_pages(s)
            elif s.deq is None:
                self._base[n] = s.data.T  # zero-copy view of the memmap
            else:
                self._base[n] = _Lazy(s)
        self._head_name = head_name
        # token embedding lookups: from the loaded head when tied & loaded, else rows of the file
        self._embd_t = self._base[head_name] if cfg.tied_embeddings and type(self._base[head_name]) is not _Lazy else None

        # ---- rotary
        hd = cfg.head_dim
        self._inv_freq = cfg.rope_inv_freq()  # [hd/2]: base, linear factor, Llama 3.x divisors
        # Gemma 3 / GPT-2 run the blocks of runtime/numpy_engine/layers.py; llama / qwen2 / qwen3 / smollm3 the forward below
        self._blocks = cfg.arch not in ("llama", "qwen2", "qwen3", "smollm3")
        self._scale = np.float32(hd ** -0.5)

        self._shapes = cfg.linear_shapes()
        self._names = [tuple(f"blk.{i}.{k}.weight" for k in _LINEAR_KINDS) for i in range(cfg.n_layers)]
        self._overrides: dict[str, np.ndarray] = {}
        self._live: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # the in-place KV buffers of the sequence this thread is decoding: per thread, so concurrent
        # generations (each in its own thread) never write into each other's cache
        self._tls = threading.local()
        self._rebuild()

    def _drop_pages(self, src: _Src) -> None:
        """Tell the kernel the file pages of a tensor now copied to memory are not needed, so
        "load" costs the fp32 size in resident memory, not fp32 + file. Best effort."""
        mm = getattr(self._reader.data, "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if mm is None or advice is None:
            return
        page = mmap.PAGESIZE
        a = -(-src.offset // page) * page
        b = (src.offset + src.nbytes) // page * page
        if b > a:
            try:
                mm.madvise(advice, a, b - a)
            except (OSError, ValueError):  # pragma: no cover
                pass

    # ------------------------------------------------------------ weights
    def _rebuild(self) -> None:
        eff = dict(self._base)
        for n, a in self._overrides.items():
            eff[n] = a.T
        live = self._live
        layers = []
        if self._blocks:  # per layer {kind: (weight, live factors)}
            kinds = self.cfg.block_linears()
            self._layers = [{k: (eff[f"blk.{i}.{k}.weight"], live.get(f"blk.{i}.{k}.weight")) for k in kinds}
                            for i in range(self.cfg.n_layers)]
            self._head = (eff[self._head_name], live.get(self._head_name))
            return
        for i in range(self.cfg.n_layers):
            lin = [(eff[f"blk.{i}.{k}.weight"], live.get(f"blk.{i}.{k}.weight")) for k in _LINEAR_KINDS]
            qkv = self._fused.get((i, "qkv"))
            if qkv is not None and any(f"blk.{i}.{k}.weight" in self._overrides for k in _LINEAR_KINDS[:3]):
                qkv = None
            gu = self._fused.get((i, "gu"))
            if gu is not None and any(f"blk.{i}.{k}.weight" in self._overrides for k in _LINEAR_KINDS[4:6]):
                gu = None
            layers.append((qkv, gu, *lin))
        self._layers = layers
        self._head = (eff[self._head_name], live.get(self._head_name))

    def base_weight(self, name: str) -> np.ndarray:
        """The dequantized base tensor, float32 canonical layout ([out, in] for linears).

        A read-only view when the tensor is already fp32 in memory (F32 file, "load"), else a
        fresh array."""
        if name not in self._src or name not in self.cfg.tensor_shapes():
            raise AdapterMismatchError(f"{name!r} is not a tensor of this {self.cfg.arch} base; expected a name "
                                       f"like 'blk.0.attn_q.weight' or 'output_norm.weight'")
        if name in self._norm:
            return _ro(self._norm[name])
        b = self._base.get(name)
        if isinstance(b, np.ndarray):
            return _ro(b.T)
        return _ro(self._src[name].full())

    def _check_tensor(self, label: str, a: Any, shape: tuple[int, ...], problems: list[str]) -> np.ndarray | None:
        if not isinstance(a, np.ndarray):
            problems.append(f"{label}: expected a float32 numpy array of shape {shape}, found {type(a).__name__}")
            return None
        if a.dtype != _F32 or tuple(a.shape) != tuple(shape):
            problems.append(f"{label}: expected float32 {tuple(shape)}, found {a.dtype} {tuple(a.shape)}")
            return None
        if not np.isfinite(a).all():
            problems.append(f"{label}: expected finite values, found {int(a.size - np.isfinite(a).sum())} NaN/inf")
            return None
        return a

    def _unknown(self, name: Any, problems: list[str]) -> None:
        hint = " (the head is tied to token_embd and is not adaptable)" if name == "output.weight" else ""
        problems.append(f"{name!r}: not a linear weight of this {self.cfg.arch} base{hint}; "
                        f"expected names like 'blk.0.attn_q.weight' … 'blk.{self.cfg.n_layers - 1}.ffn_down.weight'")

    def set_weights(self, overrides: dict[str, np.ndarray]) -> None:
        """Merge mode: ``overrides`` (GGUF name -> float32 [out, in]) replace the base weights.

        Replaces every previous override; ``{}`` restores the pure base. All-or-nothing."""
        shapes = self.cfg.linear_shapes()
        problems: list[str] = []
        new: dict[str, np.ndarray] = {}
        for n, a in overrides.items():
            if n == "token_embd.weight" and not self.cfg.tied_embeddings:  # a merged embedding change (untied head)
                ok = self._check_tensor(n, a, (self.cfg.vocab_size, self.cfg.dim), problems)
                if ok is not None:
                    new[n] = np.ascontiguousarray(ok)
                continue
            if n not in shapes:
                self._unknown(n, problems)
                continue
            ok = self._check_tensor(n, a, shapes[n], problems)
            if ok is not None:
                new[n] = np.ascontiguousarray(ok)
        collect(problems, AdapterMismatchError, "weight overrides do not fit this base (nothing was changed):")
        old = self._overrides
        self._overrides = new
        try:
            self._rebuild()
        except BaseException:
            self._overrides = old
            self._rebuild()
            raise

    def set_live(self, factors: dict[str, list[tuple[np.ndarray, np.ndarray, float]]]) -> None:
        """Unmerged mode: for each GGUF linear name a list of (A [r, in], B [out, r], scale); the
        layer computes ``x Wᵀ + Σ scale·(x Aᵀ) Bᵀ``. Replaces previous factors; ``{}`` clears.
        Works on top of :meth:`set_weights` overrides. All-or-nothing."""
        shapes = self.cfg.linear_shapes()
        problems: list[str] = []
        new: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for n, lst in factors.items():
            if n not in shapes:
                self._unknown(n, problems)
                continue
            out, inn = shapes[n]
            if isinstance(lst, tuple) and len(lst) == 3 and isinstance(lst[0], np.ndarray):
                lst = [lst]  # a single (A, B, scale) is accepted too
            if not isinstance(lst, (list, tuple)) or not lst:
                problems.append(f"{n}: expected a non-empty list of (A, B, scale), found {type(lst).__name__}")
                continue
            As, Bs, ok_all = [], [], True
            for j, item in enumerate(lst):
                if not isinstance(item, (list, tuple)) or len(item) != 3:
                    problems.append(f"{n}[{j}]: expected (A [r, {inn}], B [{out}, r], scale), found {type(item).__name__}")
                    ok_all = False
                    continue
                A, B, scale = item
                r = A.shape[0] if isinstance(A, np.ndarray) and A.ndim == 2 else -1
                if r < 1:
                    problems.append(f"{n}[{j}].A: expected float32 (r, {inn}) with r ≥ 1, found "
                                    f"{getattr(A, 'dtype', type(A).__name__)} {getattr(A, 'shape', '')}")
                    ok_all = False
                    continue
                a_ok = self._check_tensor(f"{n}[{j}].A", A, (r, inn), problems)
                b_ok = self._check_tensor(f"{n}[{j}].B", B, (out, r), problems)
                try:
                    s = float(scale)
                    s_ok = bool(np.isfinite(s)) and not isinstance(scale, (bool, np.bool_))
                except (TypeError, ValueError):
                    s_ok = False
                if not s_ok:
                    problems.append(f"{n}[{j}].scale: expected a finite real number, found {scale!r}")
                if a_ok is None or b_ok is None or not s_ok:
                    ok_all = False
                    continue
                As.append(a_ok)
                Bs.append(b_ok * np.float32(s))
            if ok_all:
                # all factors of one layer fused: x @ [A1;A2]ᵀ @ [s1 B1, s2 B2]ᵀ, both contiguous for matmul
                new[n] = (np.ascontiguousarray(np.concatenate(As, axis=0).T),
                          np.ascontiguousarray(np.concatenate(Bs, axis=1).T))
        collect(problems, AdapterMismatchError, "live adapter factors do not fit this base (nothing was changed):")
        old = self._live
        self._live = new
        try:
            self._rebuild()
        except BaseException:
            self._live = old
            self._rebuild()
            raise


    # ------------------------------------------------------------ forward
    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        """The base's rows of token_embd for ``ids`` [n] (as this engine dequantizes them; never a merged
        override): float32 [n, dim]."""
        return self._embed_base(np.asarray(ids, np.int64).reshape(-1))

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        o = self._overrides.get("token_embd.weight")  # merged embedding change (untied bases)
        return self._embed_base(ids) if o is None else np.ascontiguousarray(o[ids])

    def _embed_base(self, ids: np.ndarray) -> np.ndarray:
        if self._embd_t is not None:
            return np.ascontiguousarray(self._embd_t[:, ids].T)  # gathered rows [n, dim]
        src = self._src["token_embd.weight"]
        return np.ascontiguousarray(src.rows(ids), dtype=_F32)

    def _kv_buffers(self, past: Any, B: int, past_len: int, T: int) -> list[tuple[np.ndarray, np.ndarray]]:
        cfg = self.cfg
        st = getattr(self._tls, "kv", None)
        L = cfg.n_layers
        if (past is not None and st is not None and st["B"] == B and st["len"] == past_len and len(past) == L
                and all(past[i][0] is st["present"][i][0] and past[i][1] is st["present"][i][1] for i in range(L))):
            if T <= st["cap"]:
                return st["bufs"]
            cap = _round_cap(max(T, 2 * st["cap"]))
            bufs = []
            for kb, vb in st["bufs"]:
                nk = np.empty((B, cfg.n_kv_heads, cap, cfg.head_dim), _F32)
                nv = np.empty_like(nk)
                nk[:, :, :past_len] = kb[:, :, :past_len]
                nv[:, :, :past_len] = vb[:, :, :past_len]
                bufs.append((nk, nv))
            st["bufs"], st["cap"] = bufs, cap
            return bufs
        cap = _round_cap(T)
        shape = (B, cfg.n_kv_heads, cap, cfg.head_dim)
        bufs = [(np.empty(shape, _F32), np.empty(shape, _F32)) for _ in range(L)]
        if past is not None:
            want = (B, cfg.n_kv_heads, past_len, cfg.head_dim)
            bad = [f"layer {i}: expected key/value {want}, found "
                   f"{getattr(k, 'shape', type(k).__name__)}/{getattr(v, 'shape', type(v).__name__)}"
                   for i, (k, v) in enumerate(past) if getattr(k, "shape", None) != want or getattr(v, "shape", None) != want]
            if bad:
                raise ValueError("past key/values do not fit:\n  " + "\n  ".join(bad[:8]))
            for (kb, vb), (k, v) in zip(bufs, past):
                kb[:, :, :past_len] = k
                vb[:, :, :past_len] = v
        self._tls.kv = {"B": B, "cap": cap, "len": past_len, "bufs": bufs, "present": None}
        return bufs

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
                lora: dict[str, tuple[np.ndarray, np.ndarray]] | None = None, embed: np.ndarray | None = None,
                bn: dict[str, np.ndarray] | None = None, head: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """input_ids int [batch, seq]; attention_mask int [batch, past+seq] (1 real, 0 pad);
        position_ids int [batch, seq]; past None or per layer (key, value) float32
        [batch, n_kv_heads, past_len, head_dim]. Returns logits float32 [batch, seq, vocab]
        and present per layer [batch, n_kv_heads, past_len+seq, head_dim].

        A query at absolute position past_len+s attends key j iff j ≤ past_len+s and
        attention_mask[b, j] == 1. A query that sees no key (a pad row) gets a zero attention
        output, so its logits are finite and do not depend on the cache length.

        ``lora`` (this call only; the live contract shared with the onnxruntime engine, whose
        graph takes the same tensors as inputs ``lora.{name}.a`` / ``lora.{name}.b``):
        ``{gguf linear name: (A, B)}``, A float32 [n, in, r], B float32 [n, r, out], scales
        already folded into B, n = 1 (one adapter for every row) or n = batch (row b uses
        A[b], B[b]; a row without an adapter has zero slices; ranks of different adapters are
        zero-padded to one r), or a :class:`~edgeadapt.runtime.numpy_engine.rows.RowLoRA` (each row at its
        own rank; a row's output is then bit-identical to that row run alone with its 2-D factors,
        as the per-row requests of :mod:`.model` do). Each named linear computes ``x Wᵀ
        (+ set_weights / set_live state) + (x A) B`` per row. Checked in full, raising :class:`AdapterMismatchError`
        naming every bad tensor, before anything is computed or the KV cache is touched.
        The arrays are used as given (no copies).

        ``embed``: float32 [batch or 1, seq or 1, dim] added to the looked-up embeddings (embedding LoRA,
        trainable tokens, virtual tokens; the same contract as the ONNX graph's ``embed.delta``).

        ``head``: (ids int64 [k], delta float32 [batch or 1, k, dim]): logits[b, s, ids] += h[b, s] @ delta[b]ᵀ
        after the output head (the graph inputs ``head.ids`` / ``head.delta``).

        ``bn``: bottleneck slot inputs ``{bn.<i>.<p>.<part>: [1 or batch, …]}`` at the blocks' residual adds
        (:mod:`edgeadapt.runtime.bn_slots`; the inputs of ``model_bottleneck.onnx``)."""
        cfg = self.cfg
        ids = np.asarray(input_ids)
        am = np.asarray(attention_mask)
        pos = np.asarray(position_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids: expected int64 [batch, seq], found shape {ids.shape}")
        B, S = ids.shape
        L = cfg.n_layers
        if past is not None and len(past) != L:
            raise ValueError(f"past: expected {L} layers of (key, value), found {len(past)}")
        past_len = 0 if past is None else int(past[0][0].shape[2])
        T = past_len + S
        if am.shape != (B, T):
            raise ValueError(f"attention_mask: expected [batch, past+seq] = {(B, T)}, found {am.shape}")
        if pos.shape != (B, S):
            raise ValueError(f"position_ids: expected {(B, S)}, found {pos.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(f"input_ids: expected token ids in [0, {cfg.vocab_size}), found {ids.min()}..{ids.max()}")

        H, KV, hd, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim
        qd, kvd, F = cfg.q_dim, cfg.kv_dim, cfg.ffn_dim
        half = hd // 2
        eps = np.float32(cfg.rms_eps)
        N = B * S
        norm = self._norm
        neox = cfg.rope == "neox"

        rows = check_rows(lora, B, self._shapes, self._unknown) if lora else {}
        if bn:
            from edgeadapt.runtime.bn_slots import check, residual_add
            bn = check(cfg, bn, B)
        if self._blocks:
            from edgeadapt.runtime.numpy_engine.layers import forward_blocks

            return forward_blocks(self, ids, am, pos, past, past_len, rows, embed, head)
        no_rows = (None,) * len(_LINEAR_KINDS)

        x = self._embed(ids.reshape(-1))  # [N, D] float32
        if embed is not None:
            e = np.asarray(embed, _F32)
            if e.ndim != 3 or e.shape[0] not in (1, B) or e.shape[1] not in (1, S) or e.shape[2] != D:
                raise ValueError(f"embed: expected float32 [{B} or 1, {S} or 1, {D}], found {list(e.shape)}")
            x = (x.reshape(B, S, D) + e).reshape(N, D)
        # rotary tables, float32 exactly as transformers: angle = pos * inv_freq
        ang = pos.astype(_F32)[:, :, None] * self._inv_freq  # [B, S, half]
        cos = np.cos(ang)[:, :, None, :]  # [B, S, 1, half], broadcast over heads
        sin = np.sin(ang)[:, :, None, :]
        # additive mask [B, 1, 1, S, T]: key j visible to query s iff j <= past_len+s and mask[b, j] == 1
        allowed = (np.arange(T)[None, :] <= (past_len + np.arange(S))[:, None])[None] & (am[:, None, :] == 1)
        if cfg.sliding_window is not None:  # Mistral: every layer sees keys at distance < window only
            allowed &= ((past_len + np.arange(S))[:, None] - np.arange(T)[None, :] < cfg.sliding_window)[None]
        bias = np.where(allowed, _F32(0), np.finfo(_F32).min).astype(_F32)[:, None, None]
        # a query that sees no key at all (a pad row) gets a zero attention output, not NaN
        seen = allowed.any(axis=-1)  # [B, S]
        keep = None if seen.all() else seen.astype(_F32)[:, None, None, :, None]
        bufs = self._kv_buffers(past, B, past_len, T)
        qkv_bias, qk_norm = cfg.qkv_bias, cfg.qk_norm
        scale = self._scale
        # layer products row by row (see numpy_engine.rows._mm) when rows may differ from each other — per-row adapters —
        # or in decode (seq 1: matrix-vector products, no slower); a batch of prompts sharing one adapter set
        # runs each product as one call, which is faster and within ~1e-7 relative of the rows alone
        mb = B if rows or S == 1 else 1

        with np.errstate(over="ignore"):
            for i in range(L):
                qkv, gu, (wq, lq), (wk, lk), (wv, lv), (wo, lo), (wg, lg), (wu, lu), (wd, ld) = self._layers[i]
                rq, rk, rv, ro, rg, ru, rd = [rows.get(n) for n in self._names[i]] if rows else no_rows
                h = _rmsnorm(x, norm[f"blk.{i}.attn_norm.weight"], eps)
                if qkv is not None and not (rows and any(_has_terms(r) for r in (rq, rk, rv))):
                    y = _mm(h, qkv, mb)
                    q, k, v = y[:, :qd], y[:, qd:qd + kvd], y[:, qd + kvd:]
                    for t, lv_, rw in ((q, lq, rq), (k, lk, rk), (v, lv, rv)):
                        if lv_ is not None:
                            t += _low_rank(h, *lv_, mb)
                        if rw is not None:
                            _add_rows(t, h, rw, mb)
                else:
                    q = _lin(h, wq, lq, rq, mb)
                    k = _lin(h, wk, lk, rk, mb)
                    v = _lin(h, wv, lv, rv, mb)
                if qkv_bias:
                    q += norm[f"blk.{i}.attn_q.bias"]
                    k += norm[f"blk.{i}.attn_k.bias"]
                    v += norm[f"blk.{i}.attn_v.bias"]
                if qk_norm:  # Qwen3: RMS norm over each head of q and k, before rope
                    q = _rmsnorm(q.reshape(B, S, H, hd), norm[f"blk.{i}.attn_q_norm.weight"], eps)
                    k = _rmsnorm(k.reshape(B, S, KV, hd), norm[f"blk.{i}.attn_k_norm.weight"], eps)
                kb, vb = bufs[i]
                qr = np.empty((B, H, S, hd), _F32)
                c, s = (cos, sin) if cfg.uses_rope(i) else (1, 0)  # a NoPE layer (SmolLM3): x·1 - y·0 is x exactly
                _rope(q.reshape(B, S, H, hd), qr.transpose(0, 2, 1, 3), c, s, half, neox)
                _rope(k.reshape(B, S, KV, hd), kb[:, :, past_len:T].transpose(0, 2, 1, 3), c, s, half, neox)
                vb[:, :, past_len:T] = v.reshape(B, S, KV, hd).transpose(0, 2, 1, 3)
                o = _attend(qr, kb[:, :, :T], vb[:, :, :T], scale, bias, keep)  # [N, H*hd]
                a = _lin(o, wo, lo, ro, mb)
                x = residual_add(bn, i, "attn", a, x, B) if bn else x + a
                h = _rmsnorm(x, norm[f"blk.{i}.ffn_norm.weight"], eps)
                if gu is not None and not (rows and any(_has_terms(r) for r in (rg, ru))):
                    z = _mm(h, gu, mb)
                    g, u = z[:, :F], z[:, F:]
                    if lg is not None:
                        g += _low_rank(h, *lg, mb)
                    if lu is not None:
                        u += _low_rank(h, *lu, mb)
                    if rg is not None:
                        _add_rows(g, h, rg, mb)
                    if ru is not None:
                        _add_rows(u, h, ru, mb)
                else:
                    g = _lin(h, wg, lg, rg, mb)
                    u = _lin(h, wu, lu, ru, mb)
                # SiLU(g) * u = g * u / (1 + exp(-g))
                e = np.negative(g)
                np.exp(e, out=e)
                e += _F32(1)
                g *= u
                g /= e
                m = _lin(g, wd, ld, rd, mb)
                if bn:
                    x = residual_add(bn, i, "ffn", m, x, B)
                else:
                    x += m
            h = _rmsnorm(x, norm["output_norm.weight"], eps)
            logits = _lin(h, *self._head, rows.get(self._head_name), B, head=not rows).reshape(B, S, -1)
            if head is not None:
                add_head_delta(logits, h, head)

        present = [(_ro(kb[:, :, :T]), _ro(vb[:, :, :T])) for kb, vb in bufs]
        st = getattr(self._tls, "kv", None)
        st["len"], st["present"] = T, present
        return logits, present

    __call__ = forward


def _round_cap(n: int) -> int:
    return max(256, -(-n // 256) * 256)


def _default_auto_limit() -> int:
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _AUTO_LOAD_LIMIT
    return min(_AUTO_LOAD_LIMIT, phys // 4) if phys > 0 else _AUTO_LOAD_LIMIT
