"""The kinds of transformers cache layer that narrow graphs of cached calls (``cached``) serve:
how each is captured, fed, checked and written back.

A cached call is captured with a stand-in cache (:class:`TraceCache`) whose ``update`` is a
cache op of ``ecospa.ops.cache`` on the past tensors, which are graph inputs; the shim of
``cached`` feeds those inputs from the real layer and stores the graph's results in it. What
differs between layer classes is the op, the inputs and the store:

- :class:`Appended` (``DynamicLayer``): ``kv_append(past, new)``; the past is the layer's keys
  and values (``(B, H_kept, P, w)``, zero-length before the first update); the store assigns the
  appended tensors to the layer.
- :class:`Windowed` (``DynamicSlidingWindowLayer``): the same graph (the layer returns the
  whole past plus the new entries to the attention); the store keeps the last
  ``sliding_window - 1`` positions and advances ``cumulative_length``, as the layer's ``update``.
- :class:`Written` (``StaticLayer``): ``kv_write(buffer, new, start)``; the buffers are the
  layer's own pre-allocated ``(B, H_kept, max_cache_len, w)`` tensors (allocated at the kept
  widths on the first call, through the layer's ``lazy_initialization``) and ``start`` its
  ``cumulative_length``; the narrow graph writes the buffers in place (``kv_write_into``, as
  ``StaticLayer.update``'s ``index_copy_``) and the store advances ``cumulative_length``.

Every other layer class (a ``StaticSlidingWindowLayer``, quantized or linear-attention layers, a
sliding layer recording its past) is not served: :func:`layer_kind` says why.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ecospa.narrow.program import CallNotServable
from ecospa.ops.cache import kv_append, kv_write, kv_write_into

__all__ = ["NotServed", "TraceCache", "DenseCache", "LayerKind", "Appended", "Windowed", "Written", "layer_kind"]

aten = torch.ops.aten
Pair = tuple[torch.Tensor, torch.Tensor]


class NotServed(Exception):
    """A cached call the narrow graph cannot serve (the reason is the message)."""


# ----------------------------------------------------------------------------- stand-ins
class TraceCache:
    """The cache during the capture: ``update`` is ``write(keys, values)`` (cache ops on graph
    inputs); ``get_seq_length`` is ``length`` (the past's symbolic length, or for a static layer
    the graph input holding its ``cumulative_length``, as ``StaticLayer.get_seq_length``
    returns; None: the module may not ask)."""

    def __init__(self, write: Callable[[torch.Tensor, torch.Tensor], Pair], length: Any = None):
        self.write, self.length = write, length
        self.out: Pair | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.out is not None:
            raise CallNotServable("the module calls cache.update() more than once per call")
        self.out = self.write(key_states, value_states)
        return self.out

    def get_seq_length(self, *args, **kwargs):
        if self.length is None:
            raise CallNotServable("the module reads cache.get_seq_length() of a sliding-window layer (its "
                                  "cumulative length, which the graph does not hold)")
        return self.length

    def __getattr__(self, name):
        raise CallNotServable(f"the module reads cache.{name} (only update() and get_seq_length() are "
                              "served by a graph)")


class DenseCache:
    """The cache for the first-call check: the fallback's ``update`` is ``write(keys, values)``
    on dense past tensors (the narrow ones scattered back); the result is kept for comparison."""

    def __init__(self, write: Callable[[torch.Tensor, torch.Tensor], Pair], length: Any):
        self.write, self.length = write, length
        self.out: Pair | None = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.out = self.write(key_states, value_states)
        return self.out

    def get_seq_length(self, *args, **kwargs):
        return self.length

    def __getattr__(self, name):
        raise AttributeError(name)


# ----------------------------------------------------------------------------- kinds
class LayerKind:
    """How narrow graphs serve one class of cache layer (module docstring). ``n_extra`` graph
    inputs follow the call's own: past keys, past values, then any of :meth:`examples`."""

    name = ""
    n_extra = 2
    op: Any = None  # the op packet the stand-in's update calls
    needs_length = False  # the store needs the number of new entries (``t``)

    def refuses(self, layer) -> str | None:
        """Why this layer is not served now (None: it is)."""
        return None

    def seq(self, layer) -> int:
        """Positions the layer has seen (0: the call is a prefill)."""
        raise NotImplementedError

    def preallocated(self, layer) -> bool:
        """True when the layer holds tensors of a fixed size before its first update."""
        return False

    def past_len(self, layer) -> int:
        """Dim 2 of the past tensors the graph gets."""
        raise NotImplementedError

    def examples(self, device) -> list[torch.Tensor]:
        """Example values of the graph inputs after the past keys and values."""
        return []

    def trace(self, extras) -> TraceCache:
        """The stand-in over the graph's extra inputs, during the capture."""
        raise NotImplementedError

    def dense(self, extras) -> DenseCache:
        """The stand-in for the check: ``extras`` with the past grown to the dense widths."""
        raise NotImplementedError

    def feed(self, layer, shapes: Callable[[], list[tuple]], dtypes: list, device, t: int | None) -> tuple:
        """The extra inputs of a call: past keys and values at ``shapes()`` (narrow: computed only
        where needed), and the rest.

        Raises:
            NotServed: the layer's tensors do not fit the graph (the reason is the message).
        """
        raise NotImplementedError

    def store(self, layer, k_all: torch.Tensor, v_all: torch.Tensor, past: tuple, t: int | None) -> None:
        """Write the graph's updated keys/values (``(B, H_kept, ., w)``) into the layer."""
        raise NotImplementedError

    def finish(self, node: torch.fx.Node) -> None:
        """Make a node of :attr:`op` in the narrow graph what it runs at call time."""
        raise NotImplementedError


def _filled(layer) -> bool:
    return bool(layer.is_initialized) and isinstance(layer.keys, torch.Tensor) and layer.keys.numel() > 0


def _zeros(shapes: list[tuple], dtypes: list, device) -> tuple:
    return tuple(torch.zeros(s, dtype=d, device=device) for s, d in zip(shapes, dtypes))


class Appended(LayerKind):
    """``DynamicLayer``: the past grows by concatenation."""

    name = "append"
    op = torch.ops.ecospa.kv_append

    def seq(self, layer) -> int:
        return int(layer.get_seq_length())

    def past_len(self, layer) -> int:
        return int(layer.keys.shape[-2]) if _filled(layer) else 0

    def trace(self, extras) -> TraceCache:
        pk, pv = extras
        return TraceCache(lambda k, v: (kv_append(pk, k), kv_append(pv, v)), pk.shape[-2])

    def dense(self, extras) -> DenseCache:
        pk, pv = extras
        return DenseCache(lambda k, v: (torch.cat([pk, k], -2), torch.cat([pv, v], -2)), pk.shape[-2])

    def feed(self, layer, shapes, dtypes, device, t) -> tuple:
        if self.past_len(layer):
            return layer.keys, layer.values
        return _zeros(shapes(), dtypes, device)

    def store(self, layer, k_all, v_all, past, t) -> None:
        if not layer.is_initialized:
            layer.lazy_initialization(k_all, v_all)
        layer.keys, layer.values = k_all, v_all

    def finish(self, node: torch.fx.Node) -> None:
        node.target = aten.cat.default
        node.args = ([node.args[0], node.args[1]], -2)


class Windowed(Appended):
    """``DynamicSlidingWindowLayer``: the attention gets the past and the new entries; the layer
    keeps the last ``sliding_window - 1`` positions."""

    name = "window"

    def refuses(self, layer) -> str | None:
        if getattr(layer, "record_past", False):
            return "a sliding-window cache layer recording its past (assisted decoding)"
        return None

    def seq(self, layer) -> int:
        return int(layer.cumulative_length)

    def trace(self, extras) -> TraceCache:
        # the layer's get_seq_length() is its cumulative length, not the length of the window the
        # graph holds: a module that asks for it is not served (the capture raises)
        pk, pv = extras
        return TraceCache(lambda k, v: (kv_append(pk, k), kv_append(pv, v)), None)

    def store(self, layer, k_all, v_all, past, t) -> None:
        if not layer.is_initialized:
            layer.lazy_initialization(k_all, v_all)
        layer.cumulative_length += int(k_all.shape[-2]) - int(past[0].shape[-2])
        keep = -layer.sliding_window + 1  # as DynamicSlidingWindowLayer.update
        layer.keys, layer.values = k_all[:, :, keep:, :], v_all[:, :, keep:, :]


class Written(LayerKind):
    """``StaticLayer``: new entries are written into pre-allocated buffers at
    ``cumulative_length``; the attention gets the whole buffers."""

    name = "write"
    n_extra = 3
    op = torch.ops.ecospa.kv_write
    needs_length = True

    def seq(self, layer) -> int:
        return int(layer.cumulative_length) if layer.is_initialized else 0

    def past_len(self, layer) -> int:
        return int(layer.max_cache_len)

    def preallocated(self, layer) -> bool:
        return bool(layer.is_initialized)

    def examples(self, device) -> list[torch.Tensor]:
        return [torch.zeros((), dtype=torch.long, device=device)]

    def trace(self, extras) -> TraceCache:
        bk, bv, start = extras
        return TraceCache(lambda k, v: (kv_write(bk, k, start), kv_write(bv, v, start)), start)

    def dense(self, extras) -> DenseCache:
        bk, bv, start = extras
        return DenseCache(lambda k, v: (kv_write(bk, k, start), kv_write(bv, v, start)), start)

    def feed(self, layer, shapes, dtypes, device, t) -> tuple:
        shapes = shapes()
        if not layer.is_initialized:  # allocate the layer's buffers at the kept widths
            empty = [torch.empty((s[0], s[1], 0, s[3]), dtype=d, device=device) for s, d in zip(shapes, dtypes)]
            layer.lazy_initialization(*empty)
        if tuple(layer.keys.shape) != tuple(shapes[0]) or tuple(layer.values.shape) != tuple(shapes[1]):
            raise NotServed(f"the static cache layer holds buffers of shape {tuple(layer.keys.shape)}, not the "
                            f"kept widths {tuple(shapes[0])} (allocated before, e.g. by early_initialization)")
        if t is not None and self.seq(layer) + t > layer.max_cache_len:
            raise NotServed(f"the static cache is full (max_cache_len {layer.max_cache_len})")
        return layer.keys, layer.values, layer.cumulative_length

    def store(self, layer, k_all, v_all, past, t) -> None:
        if k_all is not layer.keys or v_all is not layer.values:  # written in place: the layer's own tensors
            layer.keys.copy_(k_all)
            layer.values.copy_(v_all)
        layer.cumulative_length.add_(t)

    def finish(self, node: torch.fx.Node) -> None:
        node.target = kv_write_into


APPENDED, WINDOWED, WRITTEN = Appended(), Windowed(), Written()

_NOT_SERVED = {
    "StaticSlidingWindowLayer": "its update rolls or re-copies the window in place once full",
    "QuantizedLayer": "quantized keys/values", "QuantoQuantizedLayer": "quantized keys/values",
    "HQQQuantizedLayer": "quantized keys/values", "Fp8QuantizedLayer": "quantized keys/values",
}


_KINDS: dict[type, LayerKind] | None = None  # layer class -> kind, once transformers is imported


def _kinds() -> dict[type, LayerKind] | str:
    global _KINDS
    if _KINDS is None:
        try:
            from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer
        except ImportError:  # transformers missing: there is no Hugging Face cache layer to serve
            return "transformers cache layers are not available"
        _KINDS = {DynamicLayer: APPENDED, DynamicSlidingWindowLayer: WINDOWED, StaticLayer: WRITTEN}
    return _KINDS


def layer_kind(layer) -> LayerKind | str:
    """The :class:`LayerKind` serving ``layer`` (by exact class: a subclass may update otherwise),
    or why none does."""
    kinds = _kinds()
    if isinstance(kinds, str):
        return kinds
    kind = kinds.get(type(layer))
    if kind is None:
        cls = type(layer).__name__
        why = _NOT_SERVED.get(cls)
        return (f"a cache layer of class {cls}" + (f" ({why})" if why else "")
                + "; only DynamicLayer, DynamicSlidingWindowLayer and StaticLayer run narrow")
    return kind.refuses(layer) or kind
