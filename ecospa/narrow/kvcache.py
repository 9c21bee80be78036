"""KV caches at the kept widths, for calls with a cache that no narrow graph serves.

Calls with a ``DynamicCache`` or a ``StaticCache`` run narrow graphs that read and write the cache
at the kept widths (``cached``); this module covers the rest (a ``StaticSlidingWindowLayer``,
cross-attention, a failed capture or check) and keeps, per cache and layer, the layout a layer is stored
at (:attr:`KVNarrower.narrow_layers`), which both paths read and write.

A call that passes a KV cache object (Hugging Face ``Cache``: anything with ``update(key, value,
layer_idx, ...)`` and ``get_seq_length(layer_idx)``) runs the exact fallback: the module's own
code at the dense head width. Its cache would then hold dense-width keys and values, half of
them zeros after pruning half of the units. :class:`KVNarrower` stores them at the kept widths
instead, found from the graph's data flow, not from names:

1. *probe* (once per call layout): the fallback runs with every removed output position of the
   scope's pruned projections set to NaN, and a stand-in cache whose ``update`` records the key
   and value tensors it receives and stops the forward. A position of the cached tensor that is
   NaN everywhere depends on removed units; one that is finite does not. The probe never touches
   the real cache.
2. *store*: during the real call, the cache's ``update`` (wrapped for the duration of the call)
   receives the keys/values with only the kept positions of each head (``(B, H_kept, T, w)``,
   ``w`` the widest head's kept count: narrower heads carry a few zero positions), and the
   history it returns is scattered back to the dense width for the module's own attention code.
   Every stored tensor is checked: the positions it drops must be exactly zero (they are, in the
   masked dense model); if not, that layer's cache stays dense.

Exact: the attention sees the same keys and values as the masked dense model. What shrinks is the
memory of the cache (its bytes scale with the kept widths); attention itself still runs at the
dense width on this path. A cache that already holds entries this narrower did not write (for
example, filled by the dense model), or a layer allocated at other widths before its first update
(``StaticCache.early_initialization``), is left dense, and so is a cache the module does not update
through the object it was passed (an ``EncoderDecoderCache``, whose inner caches the attention
picks itself: cross-attention reads their tensors directly, so they must keep their layout).
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ecospa.ops import runtime as ops
from ecospa.ops.observe import unobserved
from ecospa.ir.record import installed_forward

__all__ = ["KVNarrower", "find_cache", "KVIndex", "ProbeStop"]


def _is_cache(v: Any) -> bool:
    return (not isinstance(v, (torch.Tensor, tuple, list, dict, str, int, float, bool)) and v is not None
            and callable(getattr(v, "update", None)) and callable(getattr(v, "get_seq_length", None)))


def find_cache(args: tuple, kwargs: dict) -> Any | None:
    """The KV cache object among a call's top-level arguments, or None."""
    for v in (*args, *kwargs.values()):
        if _is_cache(v):
            return v
    return None


@dataclass(frozen=True)
class KVIndex:
    """Which positions of a cached ``(B, H, T, D)`` tensor are stored: heads ``heads`` (None: all)
    and, per stored head, the ``w`` positions ``index[h]`` (sorted; kept ones first in count)."""

    heads: torch.Tensor | None
    index: torch.Tensor  # (H_kept, w)
    dense_heads: int
    dense_width: int

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T, D) -> (B, H_kept, T, w)``."""
        if self.heads is not None:
            x = ops.gather(x, 1, self.heads.to(x.device), 4)
        return ops.gather(x, 3, self.index.to(x.device)[None, :, None, :], 4)

    def grow(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, H_kept, T, w) -> (B, H, T, D)``, zeros at the positions not stored."""
        out = ops.scatter(y, 3, self.index.to(y.device)[None, :, None, :], self.dense_width)
        if self.heads is not None:
            out = ops.scatter(out, 1, self.heads.to(y.device), self.dense_heads)
        return out

    @property
    def fraction(self) -> float:
        return self.index.numel() / (self.dense_heads * self.dense_width)


def _index_from_probe(x: torch.Tensor) -> KVIndex | str:
    """The :class:`KVIndex` of a probed tensor (NaN where a position depends on removed units)."""
    if x.dim() != 4:
        return f"a cached tensor of {x.dim()} dims (4 expected: batch, heads, time, channels)"
    nan = torch.isnan(x)
    dropped = nan.all(0).all(-2)
    if not torch.equal(nan.any(0).any(-2), dropped):
        return "the removed positions of a cached tensor vary along batch or time"
    keep = ~dropped
    counts = keep.sum(-1)
    heads = torch.nonzero(counts > 0).flatten()
    if heads.numel() == 0:
        return "a cached tensor with no kept position"
    w = int(counts.max())
    h, d = keep.shape
    if w == d and heads.numel() == h:
        return "no position of the cached tensor is removed"
    rows = []
    for i in heads.tolist():
        kept = torch.nonzero(keep[i]).flatten()
        fill = torch.nonzero(~keep[i]).flatten()[: w - kept.numel()]  # zero positions of narrower heads
        rows.append(torch.sort(torch.cat([kept, fill])).values)
    return KVIndex(None if heads.numel() == h else heads, torch.stack(rows), h, d)


class ProbeStop(Exception):
    """Ends the probe forward once the cache update was seen."""


class CrossAttentionCache(Exception):
    """A cross-attention module reached for its cache (not served: its keys come once from the
    encoder and are read back directly, not through ``update``)."""


def inner_cache(cache: Any) -> Any:
    """The cache a self-attention module updates: the self-attention cache of an encoder-decoder
    cache (``EncoderDecoderCache``: ``self_attention_cache`` and ``cross_attention_cache``), else
    the cache itself."""
    sub = getattr(cache, "self_attention_cache", None)
    return sub if sub is not None and hasattr(cache, "cross_attention_cache") else cache


class _NoCrossCache:
    """The cross-attention cache of a dressed encoder-decoder stand-in: any use stops the call."""

    def __getattr__(self, name):
        raise CrossAttentionCache(f"a cross-attention cache (cache.cross_attention_cache.{name}): its keys are "
                                  "computed once from the encoder and read back directly, not served narrow")


def dressed(cache: Any, stand_in: Any) -> Any:
    """``stand_in`` in the place of the cache a module is given: for an encoder-decoder cache, a
    copy of it (same class: models test ``isinstance``) whose self-attention cache is
    ``stand_in`` and whose cross-attention cache stops the call; ``stand_in`` itself otherwise."""
    if stand_in is None or inner_cache(cache) is cache:
        return stand_in
    out = copy.copy(cache)
    out.self_attention_cache = stand_in
    out.cross_attention_cache = _NoCrossCache()
    out.is_updated = dict(getattr(cache, "is_updated", {}))
    return out


class _ProbeCache:
    """Stand-in for the real cache during the probe: records the first ``update`` and stops."""

    def __init__(self, real: Any):
        self._real = real
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key, value, *args, **kwargs):
        self.seen = (key.detach(), value.detach())
        raise ProbeStop

    def get_seq_length(self, *args, **kwargs):
        return self._real.get_seq_length(*args, **kwargs)

    def __getattr__(self, name):  # anything else could read or write the real cache: stop
        raise ProbeStop


def _poisoned(module: nn.Module):
    """The scope's pruned linear adapters, set to write NaN at removed output positions."""
    return [f for m in module.modules() if (f := installed_forward(m)) is not None and f.poisonable]


def _allocated_otherwise(cache, layer_idx: int, k_n: torch.Tensor, v_n: torch.Tensor) -> bool:
    """True when the cache's layer already holds ``(B, H, L, D)`` tensors whose heads or channels
    are not those of the narrow entries ``k_n``/``v_n`` (a ``StaticLayer`` allocated at the dense
    widths by ``early_initialization``): they can only be stored dense."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or len(layers) <= layer_idx:
        return False
    layer = layers[layer_idx]
    if not getattr(layer, "is_initialized", False):
        return False
    return any(isinstance(t, torch.Tensor) and t.dim() == 4 and (t.shape[1], t.shape[3]) != (n.shape[1], n.shape[3])
               for t, n in ((getattr(layer, "keys", None), k_n), (getattr(layer, "values", None), v_n)))


class KVNarrower:
    """Per attention scope: stores its KV-cache entries at the kept widths (module docstring).

    Args:
        module: the scope; fallback: ``(*args, **kwargs) -> output``, the exact dense-width forward.
    """

    def __init__(self, module: nn.Module, fallback: Callable):
        self.module, self.fallback = module, fallback
        self.layouts: dict[tuple, tuple[KVIndex, KVIndex] | str] = {}
        # per cache: {layer index: (keys, values) layout} of the layers stored at the kept widths,
        # by this fallback or by a narrow graph (``cached``): both read and write that layout
        self.narrow_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.preferred: tuple | None = None  # the narrow graphs' layout: fresh layers use it too
        self.graphs = None  # the region's ``cached.CachedGraphs`` (narrow graphs for cached calls)
        self.stored = 0  # updates stored narrow
        self.dense = 0  # updates stored at the dense width
        self.why_dense: str | None = None

    def reset(self) -> None:
        """Forget layouts (the pruned state changed). Caches written before stay as they are."""
        self.layouts.clear()
        self.preferred = None
        self.graphs = None

    # ----------------------------------------------------------------- probe
    def _probe(self, cache, args: tuple, kwargs: dict) -> tuple[KVIndex, KVIndex] | str:
        stand_in = _ProbeCache(inner_cache(cache))
        dress = dressed(cache, stand_in)
        args = tuple(dress if a is cache else a for a in args)
        kwargs = {k: dress if v is cache else v for k, v in kwargs.items()}
        adapters = _poisoned(self.module)
        try:
            for a in adapters:
                a.poison = True
            with torch.no_grad(), unobserved():  # a probe, not a call: statistics hooks skip it
                self.fallback(*args, **kwargs)
        except ProbeStop:
            pass
        except CrossAttentionCache as e:
            return str(e)
        except Exception as e:  # the probe is an optimisation: a failure keeps the cache dense
            return f"the probe forward failed ({type(e).__name__})"
        finally:
            for a in adapters:
                a.poison = False
        if stand_in.seen is None:
            return "the module does not store its keys through cache.update()"
        k, v = (_index_from_probe(t) for t in stand_in.seen)
        if isinstance(k, str) and isinstance(v, str):
            return k
        return k, v

    # ----------------------------------------------------------------- calls
    def __call__(self, cache, args: tuple, kwargs: dict):
        """Run the fallback for a call with ``cache``, storing its entries narrow where possible
        (in the self-attention cache of an encoder-decoder cache)."""
        outer, cache = cache, inner_cache(cache)
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
        key = None if first is None else (first.dim(), first.shape[-1], first.dtype)
        if self.preferred is not None:
            lay = self.preferred
        else:
            if key not in self.layouts:
                self.layouts[key] = self._probe(outer, args, kwargs)
            lay = self.layouts[key]
        held = bool(self.narrow_layers.get(cache))  # layers held narrow must be read narrow
        if (isinstance(lay, str) and not held) or "update" in getattr(cache, "__dict__", {"update": None}):
            self.why_dense = lay if isinstance(lay, str) else "the cache object cannot be wrapped"
            return self.fallback(*args, **kwargs)
        if isinstance(lay, str):
            self.why_dense = lay
            lay = (lay, lay)
        real = cache.update
        try:
            cache.update = self._wrap(cache, real, lay)
        except (TypeError, AttributeError):  # no weak references or instance attributes
            self.why_dense = "the cache object cannot be wrapped"
            return self.fallback(*args, **kwargs)
        before = self.stored + self.dense
        try:
            out = self.fallback(*args, **kwargs)
        finally:
            del cache.update
        if self.stored + self.dense == before:  # e.g. cross-attention: it updates the cross-attention cache
            self.dense += 1
            self.why_dense = ("the module did not call update() on the cache object it was given "
                              f"({type(cache).__name__})")
        return out

    def _wrap(self, cache, real: Callable, lay: tuple[KVIndex | str, KVIndex | str]):
        layers = self.narrow_layers.setdefault(cache, {})

        def update(key, value, layer_idx, *args, **kwargs):
            fresh = layer_idx not in layers
            ki, vi = lay if fresh else layers[layer_idx]
            if fresh and cache.get_seq_length(layer_idx) != 0:  # history written by someone else
                self.dense += 1
                self.why_dense = "the cache already held dense entries for this layer"
                return real(key, value, layer_idx, *args, **kwargs)
            k_n = key if isinstance(ki, str) else ki.shrink(key)
            v_n = value if isinstance(vi, str) else vi.shrink(value)
            if fresh and _allocated_otherwise(cache, layer_idx, k_n, v_n):
                self.dense += 1
                self.why_dense = "the cache layer was allocated at other widths before its first update"
                return real(key, value, layer_idx, *args, **kwargs)
            exact = ((isinstance(ki, str) or torch.equal(ki.grow(k_n), key))
                     and (isinstance(vi, str) or torch.equal(vi.grow(v_n), value)))
            if not exact:
                if fresh:
                    self.dense += 1
                    self.why_dense = "a dropped position of the keys/values was not zero"
                    return real(key, value, layer_idx, *args, **kwargs)
                raise RuntimeError("ecospa: a KV-cache position stored narrow became non-zero; "
                                   "please report this with the model")
            layers[layer_idx] = (ki, vi)
            self.stored += 1
            k_all, v_all = real(k_n, v_n, layer_idx, *args, **kwargs)
            return (k_all if isinstance(ki, str) else ki.grow(k_all),
                    v_all if isinstance(vi, str) else vi.grow(v_all))

        return update

    def describe(self) -> str | None:
        """One line for the execution report, or None before any call with a cache."""
        if not self.stored and not self.dense:
            return None
        lay = self.preferred or next((v for v in self.layouts.values() if not isinstance(v, str)), ())
        fr = [f"{name} {x.fraction:.0%}" for name, x in zip(("keys", "values"), lay) if isinstance(x, KVIndex)]
        if self.stored and not self.dense:
            return f"KV cache stored at the kept widths ({', '.join(fr)} of dense){self._graph_calls()}"
        return f"KV cache at the dense width: {self.why_dense}{self._graph_calls()}"

    def _graph_calls(self) -> str:
        """How many calls with a cache the narrow graphs served, prefill and decode apart."""
        if self.graphs is None:
            return ""
        pre = dec = 0
        for key, entries in self.graphs.region.entries.items():
            if isinstance(key, tuple) and key and key[0] == "kv":
                n = sum(e.calls for e in entries if e.gm is not None)
                pre, dec = (pre + n, dec) if key[2] else (pre, dec + n)
        if not pre and not dec:
            return ""
        return f"; narrow graph calls: {pre} with an empty past (prefill), {dec} continuing a cache (decode)"
