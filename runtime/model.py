"""The public model object: a frozen base, adapters loaded beside it, one engine underneath.

The driver is generic: adapters say what they change (``targets``, ``delta(target)``), engines
say how to run weights (``base_weight``, ``set_weights``, ``forward``); both declare what they can do
(:class:`edgeadapt.formats.delta_kinds.AdapterBase`, :class:`edgeadapt.runtime.engines.Engine`), so the
driver never asks which engine it runs on. Merge mode recomputes
every adapted weight from the immutable base in float32 — a swap never subtracts.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from edgeadapt.formats.arch import ArchConfig
from edgeadapt.formats.delta import LoraDelta, read_delta
from edgeadapt.formats.encoder_arch import EncoderConfig
from edgeadapt.errors import AdapterMismatchError, AdapterNotFoundError, FormatError, UnsupportedError, UsageError
from edgeadapt.formats.manifest import BaseManifest, read_manifest

from edgeadapt.runtime import args
from edgeadapt.runtime.args import UseSpec, normalise_spec
from edgeadapt.runtime.engines import make_engine
from edgeadapt.runtime.generation import Generation, Live
from edgeadapt.runtime.row_lora import add_terms, slot_inputs
from edgeadapt.runtime.rwlock import RWLock
from edgeadapt.runtime.seq import Plan, SeqParts
from edgeadapt.runtime.tokenizer import Tokenizer

MODES = ("auto", "merge", "live")


def load(base: str | os.PathLike, engine: str = "auto", *, mode: str = "auto", threads: int | None = None,
         weights: str = "fp32", dequantize: str = "auto", memory: str = "balanced", trust: Any = None,
         require_signature: bool = False, store: str | os.PathLike | None = None) -> "Model":
    """Load a base folder made by ``edgeadapt export-base``.

    ``engine``: "ort" (onnxruntime), "numpy" (pure numpy, from model.gguf) or "auto"
    (onnxruntime when it imports and builds a session on model.onnx, else numpy); ``m.engine`` says
    which. With "ort" in mode "auto", the first onnxruntime session is built when the model first runs
    (the plain graph), or when an adapter is first used (the slotted graph only): a cold start that
    begins with an adapter pays one session build, not two.
    ``mode``: how adapters are applied — see :class:`Model`.
    ``weights`` (onnxruntime): "fp32" (model.onnx), or "int4" / "int8" (model_int4.onnx / model_int8.onnx,
    written by ``export-base --onnx-quant``): the quantized base with adapters live beside it, in float32.
    ``dequantize`` (numpy engine): "auto" | "load" (fp32 once: fastest) | "lazy" (quantized blocks stay
    mapped: least memory) — see docs/NUMPY_ENGINE.md.
    ``memory``: "low" | "balanced" (default) | "fast" — what the engine may hold beyond the weights for speed
    (onnxruntime: "low" and "balanced" give large freed buffers back to the system, "low" also runs without
    onnxruntime's arena; numpy, when ``dequantize`` is "auto": "lazy" | "auto" | "load"). The same outputs;
    the costs in MB and tok/s are in docs/PERFORMANCE.md, "Memory".
    ``trust``: an :class:`edgeadapt.ship.signing.TrustStore` (or a path / list of paths of public keys);
    ``require_signature``: refuse adapters not signed by a trusted key; ``store``: an adapter store
    folder (``edgeadapt install``), so ``add_adapter("billing")`` loads the installed version.
    """
    args.path(base, "load: base")
    args.choice(engine, ("auto", "ort", "numpy"), "engine")
    args.choice(weights, ("fp32", "int4", "int8"), "weights")
    args.choice(dequantize, ("auto", "load", "lazy"), "dequantize")
    args.choice(memory, ("low", "balanced", "fast"), "memory")
    if dequantize == "auto":
        dequantize = {"low": "lazy", "balanced": "auto", "fast": "load"}[memory]
    if threads is not None:
        args.count(threads, "threads", 1)
    if mode not in MODES:
        raise UnsupportedError(f"mode {mode!r} is not one of {MODES}")
    if weights != "fp32" and mode == "merge":
        raise UnsupportedError(f"mode='merge' folds adapters into float32 weights; a {weights} base would have to be "
                               "re-quantized, losing most of a small delta. Use mode='live' or 'auto' (adapters run in "
                               "float32 beside the quantized weights), or weights='fp32' to merge")
    manifest = read_manifest(base)
    if isinstance(manifest.arch, EncoderConfig):  # BERT family: embeddings / classification
        from edgeadapt.runtime.encoder import load_encoder
        return load_encoder(manifest, engine, threads=threads)
    slotted = any(p is not None and p.is_file() for p in (manifest.path("onnx_live"), manifest.path("onnx_lora")))
    live: bool | str = weights != "fp32" or mode in ("live", "auto") and slotted
    if live and mode == "auto":
        live = "lazy"  # onnxruntime: the plain graph while no adapter is active, the slotted one from the first
    if mode == "live" and engine == "ort" and not live:
        raise FormatError(f"{manifest.root} has no model_live.onnx / model_lora.onnx (the graphs with LoRA slots); "
                          "export the base again with this edgeadapt, or use mode='merge'")
    if trust is not None and not hasattr(trust, "keys"):
        from edgeadapt.ship.signing import TrustStore
        trust = TrustStore.load(*([trust] if isinstance(trust, (str, os.PathLike)) else trust))
    model = Model(manifest, make_engine(manifest, engine, threads, live=live, weights=weights, dequantize=dequantize,
                                       memory=memory), mode=mode)
    model.trust, model.require_signature, model.store = trust, require_signature, store
    return model


class Model(Generation):
    """A base with adapters. Modes (``load(..., mode=)``):

    - ``"merge"``: ``use()`` folds the adapters into the weights (W + Σ wᵢ·ΔWᵢ, float32, from the
      immutable base): full speed afterwards, but every swap rebuilds weights (on onnxruntime, a new
      session: about a second on SmolLM2-135M).
    - ``"live"``: adapters run beside the frozen weights, ``(x·A)·B`` in every adapted layer.
      ``use()`` only binds arrays (microseconds), strengths change without touching files,
      several adapters stack (ranks concatenated), and each row of a batch may have its own
      adapter (``adapters=[...]`` of :meth:`logits` / :meth:`generate`). Idle slots cost nothing.
    - ``"auto"`` (default): live — swaps are instant and mixed batches work — and, once one adapter
      set has generated ``auto_merge_tokens`` tokens without a change or a mixed batch, it is merged
      at the start of the next request, which then runs at the bare base's speed. A numpy merge takes a
      fraction of a second; on onnxruntime it builds a session on ``model.onnx`` (about a second on
      SmolLM2-135M), and the next swap builds the live one again (about half a second) — so the default
      threshold, 1024 tokens, is past the point where the live products (8–13 % of a decode step at
      rank 16) have cost more than the two builds. Quantized weights (``weights="int4"``/``"int8"``)
      stay live: merging would re-quantize them. ``auto_merge_tokens = None`` never merges.
      On onnxruntime the bare base runs on the plain graph until the first adapter is used, then moves
      once to the slotted graph. A set with no exact live form (an input and an output scale on one
      layer) is merged.
    """

    auto_merge_tokens: int | None = 1024
    batching = True  # concurrent one-prompt requests share one decode batch per step (runtime.scheduler)
    trust: Any = None  # edgeadapt.ship.signing.TrustStore
    require_signature = False
    store: str | os.PathLike | None = None

    def __init__(self, manifest: BaseManifest, engine: Any, mode: str = "auto"):
        self.manifest, self._engine = manifest, engine
        self.config: ArchConfig = manifest.arch
        self.fingerprint: str = manifest.fingerprint
        self.adapters: dict[str, LoraDelta] = {}
        self.active: dict[str, float] = {}
        self.requested_mode = mode
        self._live_ok = engine.live
        self._tokenizer: Tokenizer | None = None
        self._lock, self._use_lock = RWLock(), threading.Lock()
        self._live: Live = {}  # factors of the active set (live mode), replaced whole, never mutated
        self._merged: dict[str, float] = {}  # the set folded into the engine's weights
        self._stable_tokens = 0
        self._factor_cache: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self._live_kind: dict[str, bool] = {}  # per loaded adapter: has a live form on this engine
        self._set_plans: dict[tuple, Any] = {}  # recent adapter sets -> their live plan: use() is then a lookup
        self._generation = 0  # + 1 each time an adapter is added or removed
        self._seq = SeqParts(self)  # embedding changes and KV prefixes (edgeadapt.kinds.sequence), per adapter
        self.last_swap_seconds = 0.0

    @property
    def engine(self) -> str:
        return self._engine.name

    @property
    def mode(self) -> str:
        """What is applied right now: "merge" (weights folded) or "live" (factors beside them)."""
        if self.requested_mode == "merge" or not self._live_ok or (self._merged and self._merged == self.active):
            return "merge"
        return "live"

    # ---- adapters
    def add_adapter(self, source: Any, name: str | None = None) -> str:
        """Read, verify (integrity, signature when required or trusted, base fingerprint, shapes) and keep an
        adapter, not yet active. ``source``: a delta file, a ``.onnx_adapter``, an adapter object, or the
        name of an adapter installed in ``store``. Returns its name. A name already loaded (and not active) is
        replaced in one step: no moment without it."""
        delta, name = self.read_adapter(source, name)
        return self._keep(delta, name)

    def read_adapter(self, source: Any, name: str | None = None) -> tuple[Any, str]:
        """What :meth:`add_adapter` reads and verifies, without keeping it: ``(adapter, name)``. Pass the adapter
        to ``add_adapter`` later (a server reads a new version off its event loop, then swaps it in at once)."""
        args.adapter_source(source)
        args.adapter_name(name)
        if self.store is not None and isinstance(source, str) and not os.path.exists(source):
            from edgeadapt.ship.store import AdapterStore
            delta = AdapterStore(self.store).load(source)  # one read, checked against its blob's content hash
        elif not isinstance(source, (str, os.PathLike)):  # an adapter object (LoraDelta, edgeadapt.kinds.lora_family.*)
            delta = source
        elif str(source).endswith(".onnx_adapter"):
            from edgeadapt.formats.onnx_adapter import read_onnx_adapter
            delta = read_onnx_adapter(source, arch=self.config.arch, fingerprint=self.fingerprint, name=name)
            if delta.fingerprint != self.fingerprint:  # not written by export-adapter for this base
                raise AdapterMismatchError(f"{source}: an .onnx_adapter not pinned to this base ({delta.fingerprint}); "
                                           f"one another tool wrote is imported, checked against the base, with: "
                                           f"edgeadapt import-adapter {source} --base {self.manifest.root} -o NEW.gguf")
        else:
            delta = read_delta(source)
        if self.trust is not None or self.require_signature:
            from edgeadapt.ship.signing import check_trust
            check_trust(delta, self.trust, self.require_signature)  # the bytes parsed: what is loaded is what is checked
        delta.check_base(self.config, self.fingerprint)
        return delta, name or delta.name

    def _keep(self, delta: Any, name: str) -> str:
        with self._use_lock:
            if name in self.active:
                raise AdapterMismatchError(f"adapter {name!r} is active; call use() without it before replacing it")
            self.adapters[name] = delta
            self._factor_cache.pop(name, None)
            self._live_kind.pop(name, None)
            self._set_plans.clear()
            self._generation += 1
            self._seq.forget(name)
        return name

    def remove_adapter(self, name: str) -> None:
        args.adapter_name(name, optional=False)
        if name not in self.adapters:
            raise AdapterNotFoundError(f"no adapter named {name!r}; loaded: {sorted(self.adapters)}")
        if name in self.active:
            self.use({k: w for k, w in self.active.items() if k != name} or None)
        with self._use_lock:
            del self.adapters[name]
            self._factor_cache.pop(name, None)
            self._live_kind.pop(name, None)
            self._set_plans.clear()
            self._generation += 1
            self._seq.forget(name)

    def use(self, spec: UseSpec) -> None:
        """Activate adapters: a name, a list of names (weight 1 each), ``{name: weight}``, or None for the base."""
        with self._use_lock:
            want = self._normalise(spec)
            if want == self.active:
                return
            t0 = time.perf_counter()
            live = None
            live_ok = self.requested_mode != "merge" and self._live_ok
            if want and live_ok and self._engine.copies_factors and not self._merged:
                # the slotted session first: its build's transient peak (prepacking) then does not come on top of
                # the factors read below, which the engine copies and the driver releases (see _live_plan)
                self._slots_ready()
            if live_ok and self._low_rank(want):
                try:
                    live = self._live_plan([want])  # built before anything changes
                except UnsupportedError:  # a set with no exact live form (an input and an output scale on one
                    if self.requested_mode == "live":  # layer): auto merges it, live says why not
                        raise
            if live is None:
                self._merge(want)
            else:
                if self._merged:  # leave a merge: back to the pure base weights first
                    self._merge({})
                    live = self._live_plan([want])  # now in the live graph's own form (see _live_plan)
                if live:
                    self._slots_ready()
                self._live = live
            self.active, self._stable_tokens = want, 0
            self.last_swap_seconds = time.perf_counter() - t0

    def _slots_ready(self) -> None:
        """onnxruntime in auto mode runs the bare base on the plain graph; the first live adapter moves it to
        the slotted one (a one-time session build, paid here rather than by the first request)."""
        self._engine.ensure_slots()  # no write lock: running requests keep the session they started on

    def _low_rank(self, want: Mapping[str, float]) -> bool:
        """Can this set run live? The LoRA family, and kinds with a live form (edgeadapt.formats.delta_kinds.LiveTerms:
        LoHa / LoKr as exact factors; DoRA, IA3, lora_bias with scale / bias slots, which the numpy engine has
        and onnxruntime has in model_kinds.onnx). The others merge."""
        return all(self._runs_live(n) for n in want)

    def _runs_live(self, name: str) -> bool:
        known = self._live_kind.get(name)
        if known is None:
            known = self._live_kind[name] = self._has_live_form(name)
        return known

    def _has_live_form(self, name: str) -> bool:
        ad = self.adapters[name]
        if not ad.low_rank:  # declared by the adapter (edgeadapt.formats.delta_kinds.AdapterBase)
            return False
        if isinstance(ad, LoraDelta):  # A·B, plus a bias term for lora_bias: known without reading the factors
            return not ad.biases or self._engine.kind_slots
        try:
            terms = self._adapter_factors(name)
        except (AdapterMismatchError, FormatError):  # e.g. no unquantized base weight to compute DoRA's norm from
            return False
        if any(len(t) == 5 for t in terms.values()):  # scale / bias terms
            return self._engine.kind_slots
        return True

    def _merge(self, want: dict[str, float]) -> None:
        # embedding / sequence parts and lora_bias changes (no bias to merge into on most bases) ride beside
        # the merged weights, live
        biases = self._bias_terms(want)
        if biases and not self._engine.kind_slots:
            raise UnsupportedError(f"adapters {sorted(n for n in want if self.adapters[n].biases)} "
                                   "change biases (lora_bias), which onnxruntime runs live only: load with mode='live' "
                                   "or 'auto' from a base folder with model_kinds.onnx, or use engine='numpy'")
        # an embedding LoRA on an untied base merges exactly into token_embd.weight (on a tied base that table is
        # the head too, which PEFT's embedding LoRA leaves alone: there it rides live, after the lookup)
        embed = set() if self.config.tied_embeddings else {
            n for n in want if self.adapters[n].embed_lora is not None}
        seq = self._seq.plan(biases, [want], embed) if want else {}
        if isinstance(seq, Plan) and seq.head is not None and not self._engine.head_slots:
            raise UnsupportedError(f"adapters {sorted(n for n in want if self.adapters[n].changes_head)} "
                                   "change rows of a tied output head, which onnxruntime runs live only (head.delta of "
                                   "the graphs that serve adapters): load with mode='live' or 'auto', or use "
                                   "engine='numpy'")
        deltas: dict[str, np.ndarray] = {}
        bases: dict[str, np.ndarray] = {}
        for name, weight in want.items():
            a = self.adapters[name]
            for target in list(a.targets) + (["token_embd.weight"] if name in embed else []):
                if a.needs_base:  # DoRA, IA3: the change depends on the immutable base
                    base = bases.get(target)
                    if base is None:
                        base = bases[target] = self._engine.base_weight(target)
                    d = a.delta(target, base) * np.float32(weight)
                else:
                    d = a.delta(target) * np.float32(weight)
                deltas[target] = deltas[target] + d if target in deltas else d
        merged = {t: (bases[t] if t in bases else self._engine.base_weight(t)) + d for t, d in deltas.items()}
        with self._lock.write():  # waits for running generations; atomic in the engine
            self._engine.set_weights(merged)
            self._merged = dict(want)
            self._live = seq
        self._release(want)  # the engine holds the merged weights; a live plan reads the factors again

    def _normalise(self, spec: UseSpec) -> dict[str, float]:
        return normalise_spec(spec, self.adapters)

    # ---- live factors
    def _live_plan(self, rows: Sequence[Mapping[str, float]]) -> Live:
        """Everything a live request carries for one set per row: factors, sequence parts, bottleneck slots.

        The plan of one set (every row alike) is built once and kept while its adapters stay loaded (plans are
        never mutated): use() and the scheduler's one-row plans share it, and swapping back to a recent set binds
        arrays that already exist. On an engine that ``copies_factors`` a plan of plain factors is handed over in
        the engine's own form (onnxruntime: the slot arrays, copied once), and the adapters' own arrays are then
        released: an active adapter is held once, by the engine; a later plan that needs them (a stack, a batch
        row, a merge) reads them again, verified against the file checked at load."""
        # the adapters' generation in the key: a plan built while add_adapter replaces one is never found again
        key = (self._generation, tuple(sorted(rows[0].items()))) if len(rows) == 1 else None
        plan = self._set_plans.get(key) if key is not None else None
        if plan is not None:
            return plan
        from edgeadapt.runtime import bn_slots

        bn = bn_slots.feeds(self.adapters, rows, self.config.dim)
        if bn and not self._engine.bn_slots:
            raise UnsupportedError("bottleneck adapters run live on onnxruntime through model_bottleneck.onnx, in live "
                                   f"or auto mode on the fp32 graph; this base folder ({self.manifest.root}) has none: "
                                   "export the base again, or use engine='numpy'")
        plan = None if bn else self._streamed(rows)
        if plan is None:
            plan = bn_slots.attach(self._seq.plan(self._factors(rows), rows), bn)
        if self._engine.copies_factors and plan and type(plan) is dict and all(len(v) == 2 for v in plan.values()):
            if self._merged:  # merged weights run on a graph without slots: not kept, use() asks again after unmerging
                return plan
            self._slots_ready()
            plan = self._engine.slot_form(plan)  # a streamed plan is in that form already: returned as it is
            self._release({n for r in rows for n in r})
        if key is not None:
            for old in list(self._set_plans)[: max(0, len(self._set_plans) - 15)]:  # the oldest, 16 kept
                self._set_plans.pop(old, None)
            self._set_plans[key] = plan
        return plan

    def _streamed(self, rows: Sequence[Mapping[str, float]]) -> Live | None:
        """The plan of one adapter of plain LoRA factors in a version-2 delta file, on an engine that
        ``copies_factors``, made while the file is read: each weight's factors read privately, copied into the
        engine's slots and dropped, the file verified as a whole before the plan is returned (a file changed
        since loading is refused by name, nothing of it kept). What :meth:`_factors` then ``slot_form`` make,
        holding the slots and a group's factors rather than a private copy of the whole file beside the slots.
        None where another path applies (a stack, several rows, merged weights, a kind or terms beyond A·B)."""
        if len(rows) != 1 or len(rows[0]) != 1 or self._merged or not self._engine.copies_factors:
            return None
        (name, weight), = rows[0].items()
        ad = self.adapters.get(name)
        factors = getattr(ad, "factors", None)
        if (not isinstance(ad, LoraDelta) or ad.biases or ad.embed_lora is not None or ad.changes_embedding
                or ad.changes_head or ad.n_virtual
                or name in self._factor_cache or not getattr(factors, "streams", False)):
            return None
        w = np.float32(weight)
        parts = ((t, a.T[None], (b.T if weight == 1.0 else b.T * w)[None]) for t, a, b in factors.stream())
        self._slots_ready()
        return self._engine.slot_form_from(parts, set(factors))

    def _release(self, names: Iterable[str]) -> None:
        """Drop the driver's and the adapters' copies of these adapters' factors where the file can give them
        again (memory-mapped delta files): what runs holds its own."""
        for n in names:
            ad = self.adapters.get(n)
            if ad is not None and ad.release():
                self._factor_cache.pop(n, None)

    def _bias_terms(self, want: Mapping[str, float]) -> Live:
        """Σ weight·Δb per target of the lora_bias adapters in ``want``, as live entries without factors."""
        acc: dict[str, np.ndarray] = {}
        for name, w in want.items():
            for t, d in self.adapters[name].biases.items():
                acc[t] = acc[t] + np.float32(w) * d if t in acc else np.float32(w) * d
        return {t: (None, None, None, None, d[None].astype(np.float32)) for t, d in acc.items()}

    def _adapter_factors(self, name: str) -> dict[str, tuple]:
        """Per target (Aᵀ [in, r], Bᵀ [r, out]), made once per adapter (at add time for kinds that need the base);
        kinds with scale / bias terms: (Aᵀ | None, Bᵀ | None, in [in], out [out], bias [out]). Contiguous copies,
        or, for an engine that ``copies_factors`` into its own layout (onnxruntime's slots), transposed views of
        the adapter's arrays, so that its factors are held once."""
        f = self._factor_cache.get(name)
        if f is None:
            ad, f = self.adapters[name], {}
            for t in ad.targets:
                lt = ad.live_terms(t, self._engine.base_weight(t) if ad.needs_base else None)
                if lt is None:  # nothing on a linear layer: a bottleneck adapter's block slot (runtime.bn_slots)
                    continue
                extra = (lt.in_scale, lt.out_scale, lt.bias)
                plain = all(x is None for x in extra)  # scale / bias terms run on graphs fed as they are
                own = np.asarray if plain and self._engine.copies_factors else np.ascontiguousarray
                at = None if lt.a is None else own(lt.a.T)
                bt = None if lt.b is None else own(lt.b.T)
                f[t] = (at, bt) if plain else (at, bt, *extra)
            if not self._engine.copies_factors:  # contiguous copies: the adapter's own arrays are read again if needed
                ad.release()
            self._factor_cache[name] = f
        return f

    def _factors(self, rows: Sequence[Mapping[str, float]]) -> Live:
        """Slot inputs for one set per row (one entry = every row alike): ranks of a row's adapters are
        concatenated, rows are zero-padded to the widest rank, weights folded into B."""
        per_row: list[dict[str, tuple[list[np.ndarray], list[np.ndarray]]]] = []
        extras: dict[str, list[list]] = {}  # target -> per row [in, out, bias] (scale / bias terms), None = identity
        for i, want in enumerate(rows):
            row: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
            for name, w in want.items():
                for t, terms in self._adapter_factors(name).items():
                    at, bt = terms[0], terms[1]
                    a_list, b_list = row.setdefault(t, ([], []))
                    if at is not None:
                        a_list.append(at)
                        b_list.append(bt if w == 1.0 else bt * np.float32(w))
                    if len(terms) == 5:
                        add_terms(extras.setdefault(t, [[None] * 3 for _ in rows])[i], terms[2:], w, t, name)
            per_row.append(row)
        return slot_inputs(per_row, extras, self.config.linear_shapes(), self._engine.row_lora)

    def _plan(self, adapters: Sequence[UseSpec] | None, batch: int) -> Live | None:
        """A request's own per-row plan ({} for rows that all run the bare base), or None: the active set, which
        :meth:`_request` reads when the request starts. Either way later swaps do not touch a running request."""
        if adapters is None:
            return None
        if isinstance(adapters, (str, Mapping)) or not isinstance(adapters, Sequence):
            raise UsageError(f"adapters=: expected a list with one entry per row, found {type(adapters).__name__} "
                                  f"{adapters!r}; for one adapter on every row use use() or adapters=[spec] * rows")
        if len(adapters) != batch:
            raise FormatError(f"adapters= names one entry per row: expected {batch}, found {len(adapters)}")
        if not self._live_ok or self.requested_mode == "merge":
            raise UnsupportedError("per-row adapters need live mode: load with mode='live' or 'auto' "
                                   "(and, on onnxruntime, a base folder with model_lora.onnx)")
        rows = [self._normalise(a) for a in adapters]
        odd = sorted({n for r in rows for n in r if not self._low_rank({n: 1.0})})
        if odd:
            raise UnsupportedError(f"per-row adapters must be low rank (LoRA family); {odd} merge into the weights "
                                   "instead: serve them with use()")
        self._unmerge()  # per-row rows run beside the pure base
        self._stable_tokens = 0
        plan = self._live_plan(rows) or {}
        if plan:
            self._slots_ready()
        return plan

    def _unmerge(self) -> None:
        """Back to the pure base weights, the merged set live again (a request with its own rows needs them)."""
        if not self._merged:
            return
        with self._use_lock:
            if not self._merged:
                return
            if not self._low_rank(self.active):
                raise UnsupportedError(f"the active set {sorted(self.active)} is merged into the weights; "
                                       "call use(None) (or use a LoRA-family set) before per-row requests")
            self._merge({})
            self._live = self._live_plan([self.active]) if self.active else {}
            self._stable_tokens = 0

    @contextmanager
    def _request(self, plan: Live | None) -> Iterator[Live | None]:
        """One request's read lock and the plan it runs with. None: the active set as it is when the request
        starts (the weights and the live factors of one state: a merge or a swap between the call and the lock
        cannot pair the factors of one with the weights of another). A request's own rows run on the pure base
        weights: when a merge came in between, it is undone first."""
        while True:
            with self._lock.read():  # a merge waits for this request; a live swap never touches it
                if plan is None or not self._merged:
                    yield (self._live or None) if plan is None else (plan or None)
                    return
            self._unmerge()

    # ---- text
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            path = self.manifest.path("tokenizer")
            if path is None or not path.is_file():
                raise FormatError(f"{self.manifest.root}: this base has no tokenizer; pass token ids instead of text")
            self._tokenizer = Tokenizer(path, chat_template=self.manifest.chat_template,
                                        special=self.manifest.special_tokens)
        return self._tokenizer

    def _maybe_auto_merge(self) -> None:
        """auto mode: merge the active set once it has been used alone for long enough (numpy, or onnxruntime's
        fp32 graph; quantized weights stay live: a merge would re-quantize them). The request that called this
        reads the state it runs with afterwards, under its lock (:meth:`_request`)."""
        if (self.requested_mode != "auto" or not self._engine.can_merge or not self.auto_merge_tokens
                or not self.active or self._merged or self._stable_tokens < self.auto_merge_tokens):
            return
        with self._use_lock:
            if self._merged or not self.active or self._stable_tokens < self.auto_merge_tokens:
                return  # a use() came in between
            try:
                self._merge(self.active)
            except UnsupportedError:  # a set that runs live only (a bottleneck adapter; lora_bias without bias slots)
                self._stable_tokens = -(1 << 62)  # until the next use(): requests go on live
