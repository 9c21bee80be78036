"""Narrow graphs for calls that carry a KV cache (a Hugging Face ``Cache``): training and
evaluation forwards with the default ``use_cache=True``, prefill and every decoding step of
``generate()``.

A cache object is Python-side state: a graph cannot call its ``update``. So the region is
captured with the cache replaced by a traceable stand-in (``cachelayers.TraceCache``) whose
``update(key, value, layer_idx, ...)`` becomes ``ecospa::kv_append(past, new)`` (a custom op:
``cat(past, new, dim=-2)``), with the past keys and values as two extra graph inputs and the
appended ones as two extra graph outputs. (A ``StaticLayer`` is captured with
``ecospa::kv_write(buffer, new, start)`` instead, the same way: ``cachelayers`` has what differs
per kind of cache layer.) The op has a channel rule (its output carries the
labels of ``new``; the past, a graph input, brings none) and a narrow rule (the past arrives
already at the kept layout; the rewritten graph runs a plain ``aten.cat``), so the narrow graph
reads and writes keys and values at the kept widths, heads whose units all went left out, ragged
heads padded as in the attention itself. A thin shim (:class:`CachedGraphs`) fetches the past
tensors from the real cache before the call and stores the graph's appended tensors in the cache
layer after it: the cache itself holds the narrow tensors (``DynamicLayer.keys``/``values``), so
``get_seq_length``, the mask sizes, beam reordering, cropping and batch repeats of
``generate()`` work on them unchanged.

Choice (issue 19): the alternatives were (a) run the fallback and store narrow (``kvcache``,
what ran before: exact, smaller cache, attention at the dense width: 0.94-1.08x dense decoding),
(b) a tensor subclass carrying the narrow layout through the model's own cache code (Python
dispatch on every op of every step), (c) this: one graph per call layout, the cache update done
by the shim in Python (two attribute assignments per layer and step). (c) keeps the decode step
as fast as the cacheless narrow forward and leaves the cache object an ordinary one.

Served: caches with a ``layers`` list whose layer for the module is a plain ``DynamicLayer``
(``DynamicCache``, what ``generate()`` and a default forward create), a
``DynamicSlidingWindowLayer`` (the same graph; the shim keeps the window) or a ``StaticLayer``
(``StaticCache``, ``generate(..., cache_implementation="static")``: the graph writes the layer's
pre-allocated buffers, held at the kept widths, in place), not offloaded; and the self-attention
cache of an ``EncoderDecoderCache`` (T5, BART, Whisper: the stand-in is dressed as the
encoder-decoder cache, ``kvcache.dressed``). Cross-attention, which reads its cache's tensors back
directly after the first step, runs the fallback and says so. The signature of a cached call is
the plain signature with the cache in place of an argument, plus the cache class, the layer kind
and whether the past is empty; the past length is a dynamic dimension of the graph. Everything
else (a ``StaticSlidingWindowLayer``, quantized layers, a static layer allocated at the dense
widths before its first update, a module that reads other cache attributes or updates twice, a
failed capture or check) runs the exact fallback over ``kvcache.KVNarrower`` as before, and the
reason is in ``execution_report``. Both paths store a
layer at the same kept layout (``KVNarrower.narrow_layers``), so they can alternate on one cache.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import sympy
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ecospa.ops import runtime as ops
from ecospa.ops.observe import unobserved
from ecospa.narrow.entry import MAX_VARIANTS, Entry, Refusal
from ecospa.narrow.cachelayers import LayerKind, NotServed, layer_kind
from ecospa.narrow.kvcache import CrossAttentionCache, KVIndex, KVNarrower, ProbeStop, dressed, inner_cache
from ecospa.narrow.positions import analyse
from ecospa.capture import datafields
from ecospa.narrow.program import CallNotServable, Program, export_call, placeholder_feeds, signature
from ecospa.narrow import fastcall
from ecospa.narrow.lane import MISS, CachedLane, Lane, fingerprint
from ecospa.narrow.rewrite import rewrite
from ecospa.ir.record import param_records
from ecospa.capture.export import Captured
from ecospa.analysis.flow import propagate
from ecospa.ops.cache import kv_append
from ecospa.ops.registry import NarrowError

__all__ = ["CachedGraphs", "NotServed", "kv_append", "KVEntry", "RegionParts", "same_layout"]

log = logging.getLogger("ecospa")
_WRAP = "mod"
_NOT_NARROWED = "no position of the cached tensor is removed"


# ----------------------------------------------------------------------------- stand-ins
class _Probe:
    """The cache during the probe: records the layer index and the dense shapes of the first
    update, then stops the forward."""

    def __init__(self, real: Any):
        self._real = real
        self.seen: tuple | None = None
        self.reads: str | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        idx = args[0] if args else kwargs.get("layer_idx")
        self.seen = (idx, tuple(key_states.shape), tuple(value_states.shape), key_states.dtype, value_states.dtype)
        raise ProbeStop

    def get_seq_length(self, *args, **kwargs):
        return self._real.get_seq_length(*args, **kwargs)

    def __getattr__(self, name):
        self.reads = name
        raise ProbeStop


class _CachedCall(nn.Module):
    """Calls ``mod.forward`` with the constants of a signature, the given tensors and, at the
    cache's position, the stand-in of ``kind`` over the last ``kind.n_extra`` tensors (past keys,
    values, ...). Returns ``(module output, keys after the update, values after the update)``."""

    def __init__(self, module: nn.Module, sig, leaf: int, kind: LayerKind,
                 dress: Callable[[Any], Any] = lambda stand: stand):
        super().__init__()
        setattr(self, _WRAP, module)
        self.sig, self.leaf, self.kind, self.dress = sig, leaf, kind, dress
        self._const = {i: v for i, _, v in sig.constants}

    def forward(self, *tensors):
        n = self.kind.n_extra
        inputs, extras = tensors[:-n], tensors[-n:]
        stand = self.kind.trace(extras)
        n = len(self._const) + len(inputs)
        it = iter(inputs)
        leaves: list[Any] = [self._const[i] if i in self._const else next(it) for i in range(n)]
        leaves[self.leaf] = self.dress(stand)
        with datafields.watch() as made:  # dataclass arguments rebuilt from their fields
            args, kwargs = pytree.tree_unflatten(leaves, self.sig.spec)
        out = getattr(self, _WRAP).forward(*args, **kwargs)
        field = datafields.assigned(made)
        if field is not None:
            raise CallNotServable(f"the forward assigns {field} of a dataclass argument, which a graph run "
                                  "would not write back")
        if stand.out is None:
            raise CallNotServable("the module did not call update() on the cache object it was given")
        return out, stand.out[0], stand.out[1]


def _strip(name: str) -> str:
    return name[len(_WRAP) + 1:] if name.startswith(_WRAP + ".") else name


def _export(module: nn.Module, sig, leaf: int, tensors: list[torch.Tensor], kind: LayerKind,
            dress: Callable[[Any], Any] = lambda stand: stand) -> Program:
    """The dense capture of a cached call, names relative to ``module`` (as ``export_call``);
    ``dress`` puts the stand-in cache of ``kind`` in the place of the cache the module is given."""
    wrap = _CachedCall(module, sig, leaf, kind, dress)
    flat = dataclasses.replace(sig, spec=pytree.tree_flatten((tuple(tensors), {}))[1], constants=())
    program = export_call(wrap, flat, tensors)
    kinds = [(k[0], _strip(k[1])) if k[0] in ("param", "buffer") else k for k in program.kinds]
    changes: dict[str, Any] = {"kinds": kinds, "shapes": {_strip(n): s for n, s in program.shapes.items()}}
    if getattr(program, "buffer_shapes", None):
        changes["buffer_shapes"] = {_strip(n): s for n, s in program.buffer_shapes.items()}
    reads = getattr(program, "reads", None)
    if reads is not None:
        names = {("" if p == _WRAP else _strip(p)): set(n) for p, n in reads.names.items()
                 if p == _WRAP or p.startswith(_WRAP + ".")}
        fixed = type(reads)(names)
        changes.update(reads=fixed, read_values=fixed.values(module))
    return dataclasses.replace(program, **changes)


# ----------------------------------------------------------------------------- layouts
def _kv_index(lay: Any, shape: tuple) -> KVIndex | str | None:
    """The :class:`KVIndex` of a cached tensor's narrow layout (``{dim: Narrowing}`` of its dense
    ``(B, H, T, D)`` shape); the reason string where nothing is narrowed; None where the layout
    is not one a cache can hold."""
    if not isinstance(lay, dict) or len(shape) != 4:
        return None
    if not lay:
        return _NOT_NARROWED
    if set(lay) - {1, 3}:
        return None
    h, d = int(shape[1]), int(shape[3])
    heads, ch = lay.get(1), lay.get(3)
    if heads is not None and heads.selectors:
        return None
    kept = np.arange(h) if heads is None else heads.index
    if ch is None:
        idx = np.broadcast_to(np.arange(d), (kept.size, d))
    elif not ch.selectors:
        idx = np.broadcast_to(ch.index, (kept.size, ch.width))
    elif ch.selectors == (1,) and ch.index.shape[0] == kept.size:
        idx = ch.index
    else:
        return None
    return KVIndex(None if heads is None else torch.as_tensor(kept, dtype=torch.long),
                   torch.as_tensor(np.array(idx, dtype=np.int64)), h, d)


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str)
    return (a.dense_heads == b.dense_heads and a.dense_width == b.dense_width
            and torch.equal(a.index, b.index)
            and ((a.heads is None and b.heads is None)
                 or (a.heads is not None and b.heads is not None and torch.equal(a.heads, b.heads))))


def same_layout(a: tuple, b: tuple) -> bool:
    """True when two ``(keys, values)`` layouts store the same positions."""
    return all(_same(x, y) for x, y in zip(a, b))


def _grow(ix, t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(ix, str) else ix.grow(t)


def _narrow_shape(ix, dense: tuple) -> tuple:
    if isinstance(ix, str):
        return dense
    return (dense[0], ix.index.shape[0], dense[2], ix.index.shape[1])


def _finish(gm: torch.fx.GraphModule, kind: LayerKind) -> torch.fx.GraphModule:
    """The graph's last two outputs (keys, values after the update) at their narrow layout (not
    scattered back to the dense width), and the cache ops of ``kind`` as they run at call time
    (``kv_append``: a plain ``cat``; ``kv_write``: written in place)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(out.args[0])
    for i in (len(flat) - 2, len(flat) - 1):
        n = flat[i]
        while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is ops.scatter:
            n = n.args[0]
        flat[i] = n
    out.args = (type(out.args[0])(flat),)
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is kind.op:
            kind.finish(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return fastcall.bind(gm)


@dataclass
class KVEntry(Entry):
    """An :class:`Entry` of a cached call: also the layout its keys/values are stored at."""

    lay: tuple | None = None  # (keys, values): KVIndex, or a reason string (stored dense)
    past: tuple | None = None  # ``_past_plan`` of the program, once computed
    kind: LayerKind | None = None  # the kind of cache layer the graph reads and writes
    length: int | tuple | None = None  # ``_length_plan``: the number of new entries of a call
    past_range: tuple | None = None  # ``_past_range`` of the program, once computed (``()``: none)


# ----------------------------------------------------------------------------- the shim
@dataclass(frozen=True)
class RegionParts:
    """What the cached path uses of its ``RegionForward`` beyond its public fields, handed over
    by the region itself (``RegionForward._cached_call``)."""

    fallback: Callable[..., Any]  # the exact dense-width forward
    modules: list  # the scope's subtree (train/eval flags in the signature; hooks)
    state: Callable  # program -> (state, buffers) an entry guards
    close: Callable  # (got, want) -> None or why they differ
    is_random: Callable  # program -> True when the graph has random ops (dropout in training)
    outside_inference_mode: Callable  # context manager: build outside torch.inference_mode


class CachedGraphs:
    """Per region: serves its calls with a KV cache by narrow graphs (module docstring).

    Args:
        region: the ``RegionForward`` (its module, path, shared captures, entries, options).
        kv: the region's ``KVNarrower`` (which layers of which cache are stored at which layout).
        parts: the region's fallback and helpers (:class:`RegionParts`).
    """

    def __init__(self, region, kv: KVNarrower, parts: RegionParts):
        self.region, self.kv, self.parts = region, kv, parts
        self.layer_idx: int | None = None
        self.why: str | None = None  # why this module's calls cannot be served at all
        self._last: tuple | None = None  # (weak reference to the last cache, its stored layouts)
        self._lane: CachedLane | None = None  # the last call served, for the next (``lane``)
        # (keys bytes, values bytes, layout) of the layer after the last call served here
        self.last_bytes: tuple | None = None

    # ------------------------------------------------------------- per call
    def __call__(self, cache, args: tuple, kwargs: dict):
        """The module's output for a call with ``cache``, computed by a narrow graph.

        Raises:
            NotServed: the call runs the fallback instead (the reason is the message).
        """
        if self.why is not None:
            raise NotServed(self.why)
        outer, cache = cache, inner_cache(cache)
        if not isinstance(getattr(cache, "layers", None), list):
            raise NotServed(f"a cache of class {type(cache).__name__} (only caches with a list of layers "
                            "run narrow)")
        if getattr(cache, "offloading", False):
            raise NotServed("an offloaded cache")
        plain_args, plain_kwargs = _without(outer, args, kwargs)
        try:
            sig, tensors = signature(self.parts.modules, plain_args, plain_kwargs, hooks=self.parts.modules[1:])
        except CallNotServable as e:
            raise NotServed(str(e)) from None
        if self.layer_idx is None:
            self._probe(outer, args, kwargs)
        idx = self.layer_idx
        if len(cache.layers) <= idx:
            make = getattr(cache, "layer_class_to_replicate", None)
            if make is None:
                raise NotServed(f"the cache has no layer {idx}")
            while len(cache.layers) <= idx:
                cache.layers.append(make())
        layer = cache.layers[idx]
        kind = layer_kind(layer)
        if isinstance(kind, str):
            raise NotServed(kind)
        seq = kind.seq(layer)
        layers = self._stored_layers(cache)
        stored = layers.get(idx) if layers is not None else None
        if seq and stored is None:
            raise NotServed("the cache already held dense entries for this layer")
        if stored is None and kind.preallocated(layer):
            raise NotServed("the cache layer was allocated before its first update (e.g. by early_initialization), "
                            "at widths ecospa did not choose")
        key = ("kv", type(outer).__name__, seq == 0, sig, kind.name)
        variants = self.region.entries.setdefault(key, [])
        entry = None
        for v in variants:
            if v.program is None:
                entry = v
                break
            if self._fits(v, tensors, kind, kind.past_len(layer)):
                entry = v
                break
        if entry is None:
            if len(variants) >= MAX_VARIANTS:
                raise NotServed(f"more than {MAX_VARIANTS} shape variants of one signature")
            leaf = next(i for i, v in enumerate(pytree.tree_leaves((args, kwargs))) if v is outer)
            entry = self._build(key, sig, leaf, tensors, outer, layer, kind, stored, args, kwargs)
            variants.append(entry)
            if entry.gm is None:
                log.info("ecospa: %s runs on the exact fallback for calls with a cache: %s",
                         self.region.path or "<root>", entry.reason)
        if entry.gm is None:
            raise NotServed(entry.reason)
        if stored is not None and stored is not entry.lay and not same_layout(stored, entry.lay):
            raise NotServed("the cache holds this layer at the fallback's layout")
        if layers is None:
            layers = self._stored_layers(cache, create=True)
        out = self._run(entry, layer, layers, tensors)
        self._remember(outer, layer, seq == 0, entry, args, kwargs)
        return out

    def lane(self, args: tuple, kwargs: dict) -> Any:
        """The module's output for a call that repeats the last one served (``narrow.lane``),
        computed by the same entry, or :data:`~ecospa.narrow.lane.MISS` (then the full lookup
        runs). Checked: the same cache object and layer object, the same fingerprint (the
        signature) and hooks, still a prefill or still a decode step, the layer stored at the
        entry's layout, the entry still among the region's, and ``_fits`` (its guard for these
        input shapes and past length, the module state the capture read)."""
        lane = self._lane
        outer = lane.cache_of(args, kwargs) if lane is not None else None
        if outer is None or self.why is not None:
            return MISS
        found = fingerprint(args, kwargs, outer, self.parts.modules)
        if not lane.serves(found, self.region.entries, self.parts.modules[1:]):
            return MISS
        entry, layer, idx = lane.entry, lane.layer(), self.layer_idx
        cache = inner_cache(outer)
        layers = getattr(cache, "layers", None)
        if (not isinstance(layers, list) or len(layers) <= idx or layers[idx] is not layer
                or getattr(cache, "offloading", False)):
            return MISS
        kind = entry.kind
        if layer_kind(layer) is not kind or (kind.seq(layer) == 0) is not lane.prefill:
            return MISS
        stored = self._stored_layers(cache)
        if stored is None or stored.get(idx) is not entry.lay:
            return MISS
        if not self._fits(entry, found[1], kind, kind.past_len(layer)):  # guard, past length, module state
            return MISS
        try:
            return self._run(entry, layer, stored, found[1])
        except NotServed:  # the graph failed on this call (logged, the entry retired): the full lookup
            return MISS

    def _remember(self, outer, layer, prefill: bool, entry: KVEntry, args: tuple, kwargs: dict) -> None:
        """Keep the call just served as the :class:`~ecospa.narrow.lane.Lane` for the next
        (none where it is not one the lane covers, or the cache has no weak references)."""
        self._lane = None
        slot = CachedLane.slot_of(outer, args, kwargs)
        if slot is None:
            return
        found = fingerprint(args, kwargs, outer, self.parts.modules)
        if found is None:
            return
        try:
            self._lane = CachedLane(found[0], self.region.entries, entry, *Lane.hooks_now(self.parts.modules[1:]),
                                    slot=slot, outer=weakref.ref(outer), layer=weakref.ref(layer), prefill=prefill)
        except TypeError:  # a cache or layer class without weak references
            pass

    def _run(self, entry: KVEntry, layer, layers: dict, tensors: list):
        """Run ``entry``'s graph on ``tensors`` and the past of ``layer``; store the new keys and
        values in the layer (at the entry's layout, recorded in ``layers``); the module's output."""
        t = _length(entry.length, tensors)
        past = self._past(entry, layer, tensors, t)
        layers[self.layer_idx] = entry.lay  # (feeding may have allocated the layer at the kept widths)
        try:
            flat = entry.gm.forward(*entry.feed(), *tensors, *past)  # (no module hooks: skipped)
        except Exception as e:  # a graph that cannot run this call must cost speed, never the forward
            entry.gm, entry.refusal = None, Refusal.BUG
            entry.reason = f"the narrow graph failed on a later call: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log.warning("ecospa: %s: %s; calls with a cache run on the exact fallback from now on. Please "
                        "report this with the model.", self.region.path or "<root>", entry.reason)
            self._lane = None
            raise NotServed(entry.reason) from None
        out, k_all, v_all = _output(entry.program, flat)
        entry.kind.store(layer, k_all, v_all, past, t)
        self.kv.stored += 1
        entry.calls += 1
        self.last_bytes = (layer.keys.nbytes, layer.values.nbytes, entry.lay)
        return out

    def _stored_layers(self, cache, create: bool = False) -> dict | None:
        """``kv.narrow_layers[cache]`` (``{layer index: layout}``; created when ``create``), with
        the last cache remembered by a weak reference (its dict lives as long as the cache: the
        entry of ``narrow_layers`` is only created, never replaced)."""
        last = self._last
        if last is not None and last[0]() is cache:
            return last[1]
        layers = self.kv.narrow_layers.setdefault(cache, {}) if create else self.kv.narrow_layers.get(cache)
        if layers is not None:
            self._last = (weakref.ref(cache), layers)
        return layers

    def _fits(self, v: KVEntry, tensors, kind: LayerKind, past_len: int) -> bool:
        """True when entry ``v`` serves a call with ``tensors`` and past tensors ``past_len``
        long: the capture's guards hold for the inputs and for dense past tensors of that length
        (and the other inputs of ``kind``). Where the past length is a size of its own (a symbol
        no other size mentions: :func:`_past_range`), the guard of the rest is remembered per
        input shapes and the past length is checked against its range alone (the same answer)."""
        if v.past is None:
            v.past = _past_plan(v.program, kind.n_extra) or ()
        if not v.past:
            return False
        if v.past_range is None:
            v.past_range = _past_range(v.program, kind.n_extra)
        if not v.past_range:
            return v.state_ok() and self._guard(v, tensors, kind, past_len)
        lo, hi = v.past_range
        if not lo <= past_len <= hi:
            return False
        ok = v.remembered(tensors, lambda: self._guard(v, tensors, kind, lo))  # (all but the past length)
        return ok and v.state_ok()

    @staticmethod
    def _guard(v: KVEntry, tensors, kind: LayerKind, past_len: int) -> bool:
        """:meth:`Program.guard` of ``v`` for the inputs and dense past tensors ``past_len`` long."""
        plans, dtypes = v.past
        shapes = _plan_shapes(plans, tensors, past_len)
        extras = [t.shape for t in kind.examples(None)]
        try:
            return v.program.guard([*tensors, *(_Shaped(s) for s in (*shapes, *extras))])
        except (AttributeError, TypeError):  # a guard that reads more than shapes: shape-only tensors
            metas = [torch.empty(s, device="meta", dtype=d) for s, d in zip(shapes, dtypes)]
            return v.program.guard([*tensors, *metas, *(t.to("meta") for t in kind.examples(None))])

    def _past(self, entry: KVEntry, layer, tensors, t: int | None) -> tuple:
        """The graph's extra inputs for a call (past keys and values at the kept widths, ...),
        read from ``layer`` (``LayerKind.feed``; the narrow past shapes computed only where the
        kind asks for them)."""
        if entry.past is None:
            entry.past = _past_plan(entry.program, entry.kind.n_extra) or ()
        plans, dt = entry.past
        dev = tensors[0].device if tensors else None

        def shapes() -> list[tuple]:
            dense = _plan_shapes(plans, tensors, entry.kind.past_len(layer))
            return [_narrow_shape(ix, s) for ix, s in zip(entry.lay, dense)]
        return entry.kind.feed(layer, shapes, dt, dev, t)

    # ------------------------------------------------------------- building
    def _run_probe(self, cache, args, kwargs) -> _Probe | str:
        """The fallback run with a stand-in cache that records the first ``update`` and stops
        the forward there; why not, when the forward failed."""
        probe = _Probe(inner_cache(cache))
        a, k = _with(cache, probe, args, kwargs)
        try:
            with torch.no_grad(), unobserved():  # a probe, not a call: statistics hooks skip it
                self.parts.fallback(*a, **k)
        except ProbeStop:
            pass
        except CrossAttentionCache as e:
            return str(e)
        except Exception as e:  # the probe decides a speed path only: a failure means the fallback
            return f"the probe forward with a cache failed ({type(e).__name__})"
        return probe

    def _probe(self, cache, args, kwargs) -> None:
        """Learn the module's layer index (and that it stores through ``cache.update``)."""
        probe = self._run_probe(cache, args, kwargs)
        if isinstance(probe, str):
            self.why = probe
            raise NotServed(self.why)
        if probe.seen is None:
            self.why = (f"the module reads cache.{probe.reads} before updating it" if probe.reads
                        else "the module does not call update() on the cache object it was given")
            raise NotServed(self.why)
        if not isinstance(probe.seen[0], int):
            self.why = "the module calls cache.update() without a layer index"
            raise NotServed(self.why)
        self.layer_idx = probe.seen[0]

    def _program(self, key, sig, leaf, tensors, cache, kind: LayerKind) -> Program:
        region = self.region
        program, _ = region.cache.get(region.module, region.cache.key(region.module, key), tensors,
                                      lambda: _export(region.module, sig, leaf, tensors, kind,
                                                      lambda stand: dressed(cache, stand)))
        return program

    def _build(self, key, sig, leaf, tensors, cache, layer, kind: LayerKind, stored, args, kwargs) -> KVEntry:
        region = self.region
        shapes = self._dense_past(cache, args, kwargs, kind.past_len(layer))
        if isinstance(shapes, str):
            return KVEntry(None, reason=shapes, refusal=Refusal.UNSERVABLE)
        dev = tensors[0].device if tensors else None
        with self.parts.outside_inference_mode(tensors, args, kwargs) as (tensors, args, kwargs):
            examples = [*(torch.zeros(s, dtype=d, device=dev) for s, d in shapes), *kind.examples(dev)]
            try:
                program = self._program(key, sig, leaf, [*tensors, *examples], cache, kind)
            except CallNotServable as e:
                return KVEntry(None, reason=str(e), refusal=Refusal.UNSERVABLE)
            if not program.guard([*tensors, *examples]):
                return KVEntry(None, reason="the capture specialised a dimension these inputs do not match",
                               refusal=Refusal.SPECIALISED)
            plan, length = _past_plan(program, kind.n_extra), _length_plan(program, kind)
            if plan is None or (kind.needs_length and length is None):
                return KVEntry(program, reason="the sizes of the cached keys/values are not sizes of the call's "
                                               "inputs", refusal=Refusal.UNSERVABLE)
            state, buffers = self.parts.state(program)
            kept = {n: dict(r.kept) for n, r in param_records(region.module).items()}
            params, consts, feeds = placeholder_feeds(program, region.module, dev)
            captured = Captured(graph=program.graph, params=params, buffers=consts, shapes=program.shapes)
            try:
                flow = propagate(captured)
            except Exception as e:  # an optimisation: a failure costs speed, never the forward
                return KVEntry(program, reason=f"the channel flow of the cached call failed: {e}", refusal=Refusal.BUG)
            appends = _cache_ops(program, kind)
            entry = KVEntry(program, reason="no layout of the cached call could be built", refusal=Refusal.NO_RULE)
            for drop, exact in ((True, True), (True, False), (False, True), (False, False)):
                layout = analyse(captured, kept, pad_multiple=region.pad_multiple, drop_blocks=drop,
                                 exact_flat=exact, flow=flow)
                if drop and not layout.dropped and not layout.problem:
                    continue  # nothing left out: the layouts without dropping are the same
                if len(appends) != 2:
                    return KVEntry(program, reason="the cache update is not one call of update()",
                                   refusal=Refusal.UNSERVABLE)
                lay = tuple(_kv_index(layout.nodes.get(n), tuple(n.meta["val"].shape)) for n in appends)
                if any(x is None for x in lay):
                    entry = KVEntry(program, reason="the cached keys/values are not laid out (batch, heads, "
                                                    "time, channels)", refusal=Refusal.NO_RULE)
                    continue
                try:
                    gm = _finish(rewrite(program, layout, kept, consts), kind)
                except NarrowError as e:
                    entry = KVEntry(program, reason=str(e), refusal=Refusal.NO_RULE)
                    continue
                except Exception as e:  # a bug in a narrow rule must cost speed, never the forward
                    entry = KVEntry(program, reason=f"building the narrow graph failed: {type(e).__name__}: {e}",
                                    refusal=Refusal.BUG)
                    continue
                if dev is not None:
                    gm = gm.to(dev)
                entry = KVEntry(program, gm, feeds=feeds, state=state, buffers=buffers, lay=lay, past=plan,
                                kind=kind, length=length)
                if region.check:
                    problem = self._check(entry, key, sig, leaf, tensors, cache, layer, args, kwargs)
                    if problem:
                        entry = KVEntry(program, reason=f"checked against the exact path: {problem}",
                                        refusal=Refusal.MISMATCH)
                        continue
                if stored is None:
                    self.kv.preferred = lay
                return entry
        return entry

    def _dense_past(self, cache, args, kwargs, past_len: int):
        """``[(shape, dtype)]`` of dense past keys and values ``past_len`` long (from a probe of
        the new entries' shapes), or why not."""
        probe = self._run_probe(cache, args, kwargs)
        if isinstance(probe, str):
            return probe
        if probe.seen is None:
            return "the module does not call update() on the cache object it was given"
        _, ks, vs, kd, vd = probe.seen
        if len(ks) != 4 or len(vs) != 4:
            return "cached keys/values that are not (batch, heads, time, channels)"
        return [((s[0], s[1], past_len, s[3]), d) for s, d in ((ks, kd), (vs, vd))]

    def _check(self, entry: KVEntry, key, sig, leaf, tensors, cache, layer, args, kwargs) -> str | None:
        """Compare the narrow graph (output, keys and values after the update) with the fallback
        on this call's inputs, past included (no gradients). A graph with random ops (dropout in
        training) is checked through its eval-mode twin."""
        if self.parts.is_random(entry.program):
            mods = self.parts.modules
            modes = [m.training for m in mods]
            try:
                for m in mods:
                    m.training = False
                plain_args, plain_kwargs = _without(cache, args, kwargs)
                sig_eval, _ = signature(mods, plain_args, plain_kwargs, hooks=mods[1:])
                key_eval = (*key[:3], sig_eval, *key[4:])
                twin = self._build(key_eval, sig_eval, leaf, tensors, cache, layer, entry.kind, None, args, kwargs)
                self.region.entries.setdefault(key_eval, []).append(twin)
                if twin.gm is not None and not same_layout(twin.lay, entry.lay):
                    return "its eval-mode twin stores the cache at another layout"
                return twin.reason if twin.gm is None else None
            finally:
                for m, t in zip(mods, modes):
                    m.training = t
        with torch.no_grad(), unobserved():  # a check, not a call: statistics hooks skip it
            # a copy of the layer, and of its tensors: the graph may write them in place
            past = tuple(p.clone() for p in self._past(entry, copy.copy(layer), tensors,
                                                       _length(entry.length, tensors)))
            dense = entry.kind.dense((*(_grow(ix, p) for ix, p in zip(entry.lay, past)), *past[2:]))
            try:
                flat = entry.gm(*entry.feed(), *tensors, *past)
                got, k_all, v_all = _output(entry.program, flat)
            except Exception as e:  # a wrong narrow graph must cost speed, never a forward
                return f"the narrow graph failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            a, k = _with(cache, dense, args, kwargs)
            want = self.parts.fallback(*a, **k)
            if dense.out is None:
                return "the fallback did not update the cache"
            grown = (_grow(entry.lay[0], k_all), _grow(entry.lay[1], v_all))
        return self.parts.close((got, *grown), (want, *dense.out))


# ----------------------------------------------------------------------------- helpers

def _with(cache, stand_in, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with ``stand_in`` in the place of the cache it updates (dressed as
    the cache the module is given: ``kvcache.dressed``)."""
    stand_in = dressed(cache, stand_in)
    return (tuple(stand_in if a is cache else a for a in args),
            {k: stand_in if v is cache else v for k, v in kwargs.items()})


def _without(cache, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with the cache replaced by None (for the signature)."""
    return _with(cache, None, args, kwargs)


def _past_nodes(program: Program, n_extra: int) -> list[torch.fx.Node]:
    """The placeholders of the past keys and values (the first two of the ``n_extra`` last)."""
    return [n for n in program.graph.nodes if n.op == "placeholder"][-n_extra:][:2]


def _cache_ops(program: Program, kind: LayerKind) -> list[torch.fx.Node]:
    """The nodes of the cache op of ``kind`` (keys, values: one each when served)."""
    return [n for n in program.graph.nodes if n.op == "call_function"
            and getattr(n.target, "overloadpacket", None) is kind.op]


def _symbols(program: Program, n_extra: int) -> dict:
    """``{symbol: (input, dim)}``: where each symbolic size first occurs among the call's own
    inputs (the ``n_extra`` cache inputs left out)."""
    where: dict = {}
    for i, shape in enumerate(program.input_shapes[:-n_extra]):
        for d, s in enumerate(shape):
            if getattr(s, "is_Symbol", False):
                where.setdefault(s, (i, d))
    return where


def _length_plan(program: Program, kind: LayerKind) -> int | tuple | None:
    """How to compute the number of new cache entries of a call (dim -2 of the keys given to
    ``update``) from its inputs: an int, ``(input, dim)`` holding the same symbol, or None."""
    ops_ = _cache_ops(program, kind)
    val = ops_[0].args[1].meta.get("val") if ops_ and isinstance(ops_[0].args[1], torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    size = val.shape[-2]
    if isinstance(size, int):
        return size
    sym = getattr(getattr(size, "node", None), "expr", size)
    if getattr(sym, "is_number", False):
        return int(sym)
    return _symbols(program, kind.n_extra).get(sym)


def _length(plan: int | tuple | None, tensors) -> int | None:
    """The number of new cache entries of a call, from a :func:`_length_plan`."""
    if plan is None or isinstance(plan, int):
        return plan
    return int(tensors[plan[0]].shape[plan[1]])


def _plan_shapes(plans: list, tensors, past_len: int) -> list[tuple]:
    """Dense shapes of the past keys/values for a call with ``tensors`` and past tensors
    ``past_len`` long, from a :func:`_past_plan`."""
    return [tuple(past_len if d is None else d if isinstance(d, int) else tensors[d[0]].shape[d[1]] for d in dims)
            for dims in plans]


class _Shaped:
    """A shape-only stand-in of a dense past tensor, for :meth:`Program.guard`."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple):
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)




def _past_range(program: Program, n_extra: int) -> tuple:
    """``(lowest, highest)`` past length :meth:`Program.guard` accepts where the past keys' and
    values' length (dim 2) is a symbol each that no other size of the graph's inputs mentions
    (their guard is then that range alone, whatever the other sizes); ``()`` where not."""
    shapes = program.input_shapes
    first = len(shapes) - n_extra
    past = shapes[first:first + 2]
    if len(past) != 2 or any(len(s) != 4 for s in past):
        return ()
    syms = {past[0][2], past[1][2]}
    if not all(isinstance(sym, sympy.Symbol) for sym in syms):
        return ()
    for i, shape in enumerate(shapes):
        for d, size in enumerate(shape):
            if d == 2 and first <= i < first + 2:
                continue
            if syms & set(getattr(size, "free_symbols", ())):
                return ()
    return (max(program.lower.get(sym, 0) for sym in syms),
            min(program.upper.get(sym, sys.maxsize) for sym in syms))


def _past_plan(program: Program, n_extra: int = 2) -> tuple | None:
    """How to compute the dense past shapes of a call from its other inputs: per past tensor and
    dim, an int, None (the past length) or ``(input, dim)`` holding the same symbol; and the past
    dtypes. None when a size cannot be found that way. The past keys and values are the first
    two of the last ``n_extra`` inputs."""
    where = _symbols(program, n_extra)
    plans = []
    for shape in program.input_shapes[-n_extra:][:2]:
        dims: list = []
        for j, s in enumerate(shape):
            if j == 2:
                dims.append(None)
            elif isinstance(s, int):
                dims.append(s)
            elif s in where:
                dims.append(where[s])
            else:
                return None
        plans.append(dims)
    return plans, [n.meta["val"].dtype for n in _past_nodes(program, n_extra)]


def _output(program: Program, flat) -> tuple:
    out = program.output(flat) if hasattr(program, "output") else pytree.tree_unflatten(list(flat), program.out_spec)
    return out[0], out[1], out[2]
