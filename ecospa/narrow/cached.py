"""Narrow graphs for calls that carry a KV cache (a Hugging Face ``Cache``): training and
evaluation forwards with the default ``use_cache=True``, prefill and every decoding step of
``generate()``.

A cache object is Python-side state: a graph cannot call its ``update``. So the region is
captured with the cache replaced by a traceable stand-in (:class:`_TraceCache`) whose
``update(key, value, layer_idx, ...)`` becomes ``ecospa::kv_append(past, new)`` (a custom op:
``cat(past, new, dim=-2)``), with the past keys and values as two extra graph inputs and the
appended ones as two extra graph outputs. The op has a channel rule (its output carries the
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
(``DynamicCache``, what ``generate()`` and a default forward create for the architectures of
docs/compatibility.md without sliding windows), not offloaded; and the self-attention cache of an
``EncoderDecoderCache`` (T5, BART, Whisper: the stand-in is dressed as the encoder-decoder cache,
``kvcache.dressed``). Cross-attention, which reads its cache's tensors back directly after the
first step, runs the fallback and says so. The signature of a cached call is
the plain signature with the cache in place of an argument, plus the cache class and whether the
past is empty; the past length is a dynamic dimension of the graph. Everything else (a
``StaticCache``, a sliding-window layer, an ``EncoderDecoderCache``, a module that reads other
cache attributes or updates twice, a failed capture or check) runs the exact fallback over
``kvcache.KVNarrower`` as before, and the reason is in ``execution_report``. Both paths store a
layer at the same kept layout (``KVNarrower.narrow_layers``), so they can alternate on one cache.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ecospa.ops import runtime as ops
from ecospa.narrow.entry import MAX_VARIANTS, Entry, Refusal
from ecospa.narrow.kvcache import CrossAttentionCache, KVIndex, KVNarrower, ProbeStop, dressed, inner_cache
from ecospa.narrow.positions import analyse
from ecospa.narrow.program import CallNotServable, Program, export_call, placeholder_feeds, signature
from ecospa.narrow.rewrite import rewrite
from ecospa.ir.record import param_records
from ecospa.capture.export import Captured
from ecospa.analysis.flow import propagate
from ecospa.ops.cache import kv_append
from ecospa.ops.registry import NarrowError

__all__ = ["CachedGraphs", "NotServed", "kv_append", "KVEntry", "RegionParts", "same_layout"]

log = logging.getLogger("ecospa")
aten = torch.ops.aten
_WRAP = "mod"
_NOT_NARROWED = "no position of the cached tensor is removed"


# ----------------------------------------------------------------------------- stand-ins
class NotServed(Exception):
    """A cached call the narrow graph cannot serve (the reason is the message)."""


class _TraceCache:
    """The cache during the capture: ``update`` appends with :func:`kv_append` to the past
    tensors, which are graph inputs."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self._past = (past_k, past_v)
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self._out is not None:
            raise CallNotServable("the module calls cache.update() more than once per call")
        self._out = (torch.ops.ecospa.kv_append(self._past[0], key_states),
                     torch.ops.ecospa.kv_append(self._past[1], value_states))
        return self._out

    def get_seq_length(self, *args, **kwargs):
        return self._past[0].shape[-2]

    def __getattr__(self, name):
        raise CallNotServable(f"the module reads cache.{name} (only update() and get_seq_length() are "
                              "served by a graph)")


class _DenseCache:
    """The cache for the first-call check: the fallback's ``update`` appends to dense past
    tensors (the narrow ones scattered back) and the result is kept for comparison."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self._past = (past_k, past_v)
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.out = (torch.cat([self._past[0], key_states], -2), torch.cat([self._past[1], value_states], -2))
        return self.out

    def get_seq_length(self, *args, **kwargs):
        return self._past[0].shape[-2]

    def __getattr__(self, name):
        raise AttributeError(name)


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
    cache's position, a :class:`_TraceCache` over the last two tensors (past keys, values).
    Returns ``(module output, keys after the update, values after the update)``."""

    def __init__(self, module: nn.Module, sig, leaf: int, dress: Callable[[Any], Any] = lambda stand: stand):
        super().__init__()
        setattr(self, _WRAP, module)
        self.sig, self.leaf, self.dress = sig, leaf, dress
        self._const = {i: v for i, _, v in sig.constants}

    def forward(self, *tensors):
        *inputs, past_k, past_v = tensors
        stand = _TraceCache(past_k, past_v)
        n = len(self._const) + len(inputs)
        it = iter(inputs)
        leaves: list[Any] = [self._const[i] if i in self._const else next(it) for i in range(n)]
        leaves[self.leaf] = self.dress(stand)
        args, kwargs = pytree.tree_unflatten(leaves, self.sig.spec)
        out = getattr(self, _WRAP).forward(*args, **kwargs)
        if stand._out is None:
            raise CallNotServable("the module did not call update() on the cache object it was given")
        return out, stand._out[0], stand._out[1]


def _strip(name: str) -> str:
    return name[len(_WRAP) + 1:] if name.startswith(_WRAP + ".") else name


def _export(module: nn.Module, sig, leaf: int, tensors: list[torch.Tensor],
            dress: Callable[[Any], Any] = lambda stand: stand) -> Program:
    """The dense capture of a cached call, names relative to ``module`` (as ``export_call``);
    ``dress`` puts the stand-in cache in the place of the cache the module is given."""
    wrap = _CachedCall(module, sig, leaf, dress)
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


def _finish(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph's last two outputs (keys, values after the update) at their narrow layout (not
    scattered back to the dense width), and any :func:`kv_append` left as a plain ``cat``."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(out.args[0])
    for i in (len(flat) - 2, len(flat) - 1):
        n = flat[i]
        while isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target is ops.scatter:
            n = n.args[0]
        flat[i] = n
    out.args = (type(out.args[0])(flat),)
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is torch.ops.ecospa.kv_append:
            n.target = aten.cat.default
            n.args = ([n.args[0], n.args[1]], -2)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@dataclass
class KVEntry(Entry):
    """An :class:`Entry` of a cached call: also the layout its keys/values are stored at."""

    lay: tuple | None = None  # (keys, values): KVIndex, or a reason string (stored dense)
    past: tuple | None = None  # ``_past_plan`` of the program, once computed


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

    # ------------------------------------------------------------- per call
    def __call__(self, cache, args: tuple, kwargs: dict):
        """The module's output for a call with ``cache``, computed by a narrow graph.

        Raises:
            NotServed: the call runs the fallback instead (the reason is the message).
        """
        if self.why is not None:
            raise NotServed(self.why)
        outer, cache = cache, inner_cache(cache)
        layer_cls = _dynamic_layer()
        if layer_cls is None or not isinstance(getattr(cache, "layers", None), list):
            raise NotServed(f"a cache of class {type(cache).__name__} (only caches with DynamicLayer "
                            "layers run narrow)")
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
        if type(layer) is not layer_cls:
            raise NotServed(f"a cache layer of class {type(layer).__name__} (only DynamicLayer runs narrow)")
        seq = layer.get_seq_length()
        stored = self.kv.narrow_layers.get(cache, {}).get(idx)
        if seq and stored is None:
            raise NotServed("the cache already held dense entries for this layer")
        key = ("kv", type(outer).__name__, seq == 0, sig)
        variants = self.region.entries.setdefault(key, [])
        entry = None
        for v in variants:
            if v.program is None:
                entry = v
                break
            if self._fits(v, tensors, seq):
                entry = v
                break
        if entry is None:
            if len(variants) >= MAX_VARIANTS:
                raise NotServed(f"more than {MAX_VARIANTS} shape variants of one signature")
            leaf = next(i for i, v in enumerate(pytree.tree_leaves((args, kwargs))) if v is outer)
            entry = self._build(key, sig, leaf, tensors, outer, layer, seq, stored, args, kwargs)
            variants.append(entry)
            if entry.gm is None:
                log.info("ecospa: %s runs on the exact fallback for calls with a cache: %s",
                         self.region.path or "<root>", entry.reason)
        if entry.gm is None:
            raise NotServed(entry.reason)
        if stored is not None and stored is not entry.lay and not same_layout(stored, entry.lay):
            raise NotServed("the cache holds this layer at the fallback's layout")
        past = self._past(entry, layer, seq, tensors)
        flat = entry.gm(*[f() for f in entry.feeds], *tensors, *past)
        out, k_all, v_all = _output(entry.program, flat)
        self._store(cache, layer, idx, k_all, v_all, entry.lay)
        entry.calls += 1
        return out

    def _fits(self, v: KVEntry, tensors, seq: int) -> bool:
        """True when entry ``v`` serves a call with ``tensors`` and ``seq`` past positions: the
        capture's guards hold for the inputs and for dense past tensors of that length."""
        if v.past is None:
            v.past = _past_plan(v.program) or ()
        if not v.past:
            return False
        plans, dtypes = v.past
        shapes = _plan_shapes(plans, tensors, seq)
        try:
            ok = v.program.guard([*tensors, *(_Shaped(s) for s in shapes)])
        except (AttributeError, TypeError):  # a guard that reads more than shapes: shape-only tensors
            ok = v.program.guard([*tensors, *(torch.empty(s, device="meta", dtype=d) for s, d in zip(shapes, dtypes))])
        return ok and v.state_ok()

    def _past(self, entry: KVEntry, layer, seq: int, tensors) -> tuple[torch.Tensor, torch.Tensor]:
        if seq:
            return layer.keys, layer.values
        if entry.past is None:
            entry.past = _past_plan(entry.program) or ()
        plans, dt = entry.past
        dense = _plan_shapes(plans, tensors, 0)
        dev = tensors[0].device if tensors else None
        return tuple(torch.zeros(_narrow_shape(ix, s), dtype=d, device=dev)
                     for ix, s, d in zip(entry.lay, dense, dt))

    def _store(self, cache, layer, idx: int, k_all, v_all, lay) -> None:
        if not layer.is_initialized:
            layer.lazy_initialization(k_all, v_all)
        layer.keys, layer.values = k_all, v_all
        self.kv.narrow_layers.setdefault(cache, {})[idx] = lay
        self.kv.stored += 1

    # ------------------------------------------------------------- building
    def _run_probe(self, cache, args, kwargs) -> _Probe | str:
        """The fallback run with a stand-in cache that records the first ``update`` and stops
        the forward there; why not, when the forward failed."""
        probe = _Probe(inner_cache(cache))
        a, k = _with(cache, probe, args, kwargs)
        try:
            with torch.no_grad():
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

    def _program(self, key, sig, leaf, tensors, cache) -> Program:
        region = self.region
        program, _ = region.cache.get(region.module, region.cache.key(region.module, key), tensors,
                                      lambda: _export(region.module, sig, leaf, tensors,
                                                      lambda stand: dressed(cache, stand)))
        return program

    def _build(self, key, sig, leaf, tensors, cache, layer, seq, stored, args, kwargs) -> KVEntry:
        region = self.region
        shapes = self._dense_past(cache, args, kwargs, seq)
        if isinstance(shapes, str):
            return KVEntry(None, reason=shapes, refusal=Refusal.UNSERVABLE)
        dev = tensors[0].device if tensors else None
        with self.parts.outside_inference_mode(tensors, args, kwargs) as (tensors, args, kwargs):
            examples = [torch.zeros(s, dtype=d, device=dev) for s, d in shapes]
            try:
                program = self._program(key, sig, leaf, [*tensors, *examples], cache)
            except CallNotServable as e:
                return KVEntry(None, reason=str(e), refusal=Refusal.UNSERVABLE)
            if not program.guard([*tensors, *examples]):
                return KVEntry(None, reason="the capture specialised a dimension these inputs do not match",
                               refusal=Refusal.SPECIALISED)
            state, buffers = self.parts.state(program)
            kept = {n: dict(r.kept) for n, r in param_records(region.module).items()}
            params, consts, feeds = placeholder_feeds(program, region.module, dev)
            captured = Captured(graph=program.graph, params=params, buffers=consts, shapes=program.shapes)
            try:
                flow = propagate(captured)
            except Exception as e:  # an optimisation: a failure costs speed, never the forward
                return KVEntry(program, reason=f"the channel flow of the cached call failed: {e}", refusal=Refusal.BUG)
            appends = [n for n in program.graph.nodes if n.op == "call_function"
                       and getattr(n.target, "overloadpacket", None) is torch.ops.ecospa.kv_append]
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
                    gm = _finish(rewrite(program, layout, kept, consts))
                except NarrowError as e:
                    entry = KVEntry(program, reason=str(e), refusal=Refusal.NO_RULE)
                    continue
                except Exception as e:  # a bug in a narrow rule must cost speed, never the forward
                    entry = KVEntry(program, reason=f"building the narrow graph failed: {type(e).__name__}: {e}",
                                    refusal=Refusal.BUG)
                    continue
                if dev is not None:
                    gm = gm.to(dev)
                entry = KVEntry(program, gm, feeds=feeds, state=state, buffers=buffers, lay=lay)
                if region.check:
                    problem = self._check(entry, key, sig, leaf, tensors, cache, layer, seq, args, kwargs)
                    if problem:
                        entry = KVEntry(program, reason=f"checked against the exact path: {problem}",
                                        refusal=Refusal.MISMATCH)
                        continue
                if stored is None:
                    self.kv.preferred = lay
                return entry
        return entry

    def _dense_past(self, cache, args, kwargs, seq: int):
        """``[(shape, dtype)]`` of dense past keys and values of length ``seq`` (from a probe of
        the new entries' shapes), or why not."""
        probe = self._run_probe(cache, args, kwargs)
        if isinstance(probe, str):
            return probe
        if probe.seen is None:
            return "the module does not call update() on the cache object it was given"
        _, ks, vs, kd, vd = probe.seen
        if len(ks) != 4 or len(vs) != 4:
            return "cached keys/values that are not (batch, heads, time, channels)"
        return [((s[0], s[1], seq, s[3]), d) for s, d in ((ks, kd), (vs, vd))]

    def _check(self, entry: KVEntry, key, sig, leaf, tensors, cache, layer, seq, args, kwargs) -> str | None:
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
                key_eval = (*key[:-1], sig_eval)
                twin = self._build(key_eval, sig_eval, leaf, tensors, cache, layer, seq, None, args, kwargs)
                self.region.entries.setdefault(key_eval, []).append(twin)
                if twin.gm is not None and not same_layout(twin.lay, entry.lay):
                    return "its eval-mode twin stores the cache at another layout"
                return twin.reason if twin.gm is None else None
            finally:
                for m, t in zip(mods, modes):
                    m.training = t
        with torch.no_grad():
            past = self._past(entry, layer, seq, tensors)
            dense = _DenseCache(*(_grow(ix, p) for ix, p in zip(entry.lay, past)))
            try:
                flat = entry.gm(*[f() for f in entry.feeds], *tensors, *past)
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
def _dynamic_layer():
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers missing: there is no Hugging Face cache to serve
        return None
    return DynamicLayer


def _with(cache, stand_in, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with ``stand_in`` in the place of the cache it updates (dressed as
    the cache the module is given: ``kvcache.dressed``)."""
    stand_in = dressed(cache, stand_in)
    return (tuple(stand_in if a is cache else a for a in args),
            {k: stand_in if v is cache else v for k, v in kwargs.items()})


def _without(cache, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with the cache replaced by None (for the signature)."""
    return _with(cache, None, args, kwargs)


def _past_nodes(program: Program) -> list[torch.fx.Node]:
    return [n for n in program.graph.nodes if n.op == "placeholder"][-2:]


def _plan_shapes(plans: list, tensors, seq: int) -> list[tuple]:
    """Dense shapes of the past keys/values for a call with ``tensors`` and ``seq`` past
    positions, from a :func:`_past_plan`."""
    return [tuple(seq if d is None else d if isinstance(d, int) else tensors[d[0]].shape[d[1]] for d in dims)
            for dims in plans]


class _Shaped:
    """A shape-only stand-in of a dense past tensor, for :meth:`Program.guard`."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple):
        self.shape = shape

    def dim(self) -> int:
        return len(self.shape)


def _past_plan(program: Program) -> tuple | None:
    """How to compute the dense past shapes of a call from its other inputs: per past tensor and
    dim, an int, None (the past length) or ``(input, dim)`` holding the same symbol; and the past
    dtypes. None when a size cannot be found that way."""
    where: dict = {}
    for i, shape in enumerate(program.input_shapes[:-2]):
        for d, s in enumerate(shape):
            if getattr(s, "is_Symbol", False):
                where.setdefault(s, (i, d))
    plans = []
    for shape in program.input_shapes[-2:]:
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
    return plans, [n.meta["val"].dtype for n in _past_nodes(program)]


def _output(program: Program, flat) -> tuple:
    out = program.output(flat) if hasattr(program, "output") else pytree.tree_unflatten(list(flat), program.out_spec)
    return out[0], out[1], out[2]
