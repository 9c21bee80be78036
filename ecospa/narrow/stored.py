"""Tensors a region writes in place and reads back (KV caches in module buffers), in a narrow graph.

Research code keeps its KV cache in module buffers written in place each step (litgpt's
``index_copy_``, torchtune's ``k_cache[:, :, pos] = k``, slice assignment). Design (issue 19,
item 2): **such a buffer is stored at the kept widths** and the narrow graph reads and writes it
there, like any other narrow tensor (no scatter, no gather; a fraction of the cache bytes). On by
default (:data:`NARROW`; ``ECOSPA_NARROW_BUFFER_CACHES=0`` turns it off, the exact fallback then
serves such calls with the cache at its dense width: :data:`REFUSED`). Measured
(bench/results/buffer_cache.md): half the cache bytes; at width 1024 1.6-1.7x dense, level with
the fallback; at width 256 a decode step is bound by per-call cost and the fallback's eager
forward is the faster one (narrow 0.91-0.95x dense, fallback 1.10-1.21x).

- Which: a buffer of the region's module (placeholder kind ``"buffer"``) written in place whose
  layout narrows it (:func:`narrow_buffers`); the labels of the writes say which positions are
  kept (``ecospa.analysis.mutation``). Every value written into it must be zero at the removed
  positions in the masked dense model (``Builder.zero``), so that the buffer scattered back to its
  dense width is the masked dense model's (else the rewrite is refused).
- The rewrite (``narrow.rewrite``) treats its placeholder as narrow already: views of it take
  their ordinary narrow rules, writes into it run at the kept widths
  (``ecospa.ops.inplace.store_write``), the graph records a :class:`BufferSlot` per such
  placeholder (:func:`slots`).
- The buffer becomes narrow at the first narrow call (:func:`make_narrow`): the module's dense
  buffer is replaced by its kept slice (removed heads left out) and the owner module records it
  (:data:`ATTR`: ``{attribute: BufferSlot}``). A buffer the model allocates again
  (``setup_caches``, ``set_kv_cache``: a new tensor of the dense shape, or a new cache module) is
  sliced at the next narrow call: it is fresh, nothing is lost. A buffer of neither shape runs
  the fallback, with the reason.
- Everything that needs the buffer dense gets it scattered back (zeros at the removed positions,
  as in the masked dense model; :func:`make_dense`): the exact fallback of the region, a new
  capture (``record.dense_view``: also ``auto_couple`` and export of a pruned model), a new round
  of pruning (``RegionForward.invalidate``: the next call slices at the new widths). So the
  fallback and narrow calls can alternate on one cache (a conversion each time they switch).
- A persistent buffer (saved by ``state_dict`` and ``ecospa.save``, which must find the dense
  shape a freshly built model has) is not stored narrow: its calls run the fallback, with the
  reason. KV caches are non-persistent buffers (litgpt, torchtune).

Tensors written in place that are not such buffers (a graph input, a tensor created in the
forward and written through a view, a buffer without narrowed positions such as a position
counter) stay at their dense width (:func:`stored_nodes`): a write into one runs dense, its
narrow operands scattered back with zeros, and every read with narrowed positions is gathered
(:func:`read_stored`). That path is exact but slower than the fallback where it gathers (the
whole cache read every step: bench/results/buffer_cache.md), so a graph that would gather a
stored tensor is refused (:data:`REFUSED`) unless ``SERVE`` (``ECOSPA_NARROW_BUFFER_CACHES=dense``)
turns it on; layout-free ones (a position counter) always run. While :data:`NARROW` is off,
buffers count as such stored tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from ecospa.analysis.mutation import base_of, is_view, written_arg
from ecospa.ir.narrowing import Narrowing, same_layout
from ecospa.ops import runtime as ops
from ecospa.ops.registry import has

__all__ = ["NARROW", "SERVE", "REFUSED", "ATTR", "META", "BufferSlot", "narrow_buffers", "stored_nodes",
           "written_inputs", "read_stored", "slots", "make_narrow", "make_dense", "logical", "live", "buffer_bytes"]

_MODE = os.environ.get("ECOSPA_NARROW_BUFFER_CACHES", "")
#: Whether buffers a region writes in place are stored at the kept widths and served by its
#: narrow graph (on unless ``ECOSPA_NARROW_BUFFER_CACHES`` is ``0`` or ``dense``). Measured
#: (bench/results/buffer_cache.md, ``bench/bench_buffer_cache.py``, 1 CPU thread, 4 layers):
#: exact, half the cache bytes, no gather or scatter left; at width 1024 decoding 1.62x / 1.67x
#: dense (litgpt / torchtune), level with the fallback; at width 256, where a decode step is
#: bound by per-call cost, 0.91x / 0.95x dense against the fallback's 1.10x / 1.21x.
NARROW = _MODE not in ("0", "dense")
#: Whether narrow graphs serve calls that gather a tensor kept at its dense width (off by
#: default; ``ECOSPA_NARROW_BUFFER_CACHES=dense`` turns it on, with :data:`NARROW` off): the
#: gather of the whole dense cache on every read costs more than the narrow attention saves
#: (litgpt width 256: 0.79x dense against the fallback's 1.45x), so the fallback serves those calls.
SERVE = _MODE == "dense"
REFUSED = ("the module writes a tensor it keeps in place (a KV cache in a module buffer) that is not stored at the "
           "kept widths (a graph input, a tensor made in the forward, a persistent buffer, or "
           "ECOSPA_NARROW_BUFFER_CACHES=0): the exact fallback serves it")
#: The attribute of a module (in its ``__dict__``) recording its buffers stored at the kept widths.
ATTR = "_ecospa_narrow_buffers"
#: The key of a narrow graph's ``meta`` holding its :class:`BufferSlot` s.
META = "ecospa_buffer_slots"


# --------------------------------------------------------------------------- the graph side
def _roots(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    roots = set()
    for node in graph.nodes:
        k = written_arg(node)
        if k is None:
            continue
        chain, base = base_of(node.args[k])
        if not isinstance(base, torch.fx.Node):
            continue
        if chain or base.op == "placeholder" or (base.op == "call_function" and has(base.target, "fresh")):
            roots.add(base)
    return roots


def narrow_buffers(graph: torch.fx.Graph, kinds: Sequence[tuple],
                   layout_of: Callable[[torch.fx.Node], dict]) -> dict[torch.fx.Node, int]:
    """``{placeholder: position}`` of the module buffers the graph writes in place whose layout
    narrows them: they are stored at the kept widths (empty when :data:`NARROW` is off)."""
    if not NARROW:
        return {}
    roots = _roots(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return {n: i for i, (n, kind) in enumerate(zip(placeholders, kinds))
            if n in roots and kind[0] == "buffer" and layout_of(n)}


def stored_nodes(graph: torch.fx.Graph, roots: set | frozenset | None = None,
                 skip: set | frozenset | dict = frozenset()) -> frozenset[torch.fx.Node]:
    """``roots`` (default: the bases of in-place writes through a view or into a graph
    placeholder, less ``skip``) and every view of them and write result aliasing them."""
    out = set(_roots(graph) if roots is None else roots) - set(skip)
    if not out:
        return frozenset()
    for node in graph.nodes:  # in order: a view or a write of a stored node aliases it
        if node in out or node.op != "call_function" or not node.args:
            continue
        k = written_arg(node)
        if (k is not None and node.args[k] in out) or (is_view(node) and node.args[0] in out):
            out.add(node)
    return frozenset(out)


def written_inputs(graph: torch.fx.Graph) -> list[int]:
    """Positions among the graph's placeholders of those written in place (buffers, inputs)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    roots = _roots(graph)
    return [i for i, n in enumerate(placeholders) if n in roots]


def read_stored(b, node: torch.fx.Node, run):
    """``run()`` (the narrow rule of ``node``) with every stored operand of ``node`` gathered at
    the kept positions of its layout first (its removed positions are not known to be zero)."""
    ins = [a for a in node.all_input_nodes if a in b.stored and b.layout(a)]
    saved = {a: (b.env[a], b.zero.get(a)) for a in ins}
    try:
        for a in ins:
            new, ndim = b.env[a], len(b.shape(a))
            for dim, nar in sorted(b.layout(a).items()):
                new = b.gather(new, dim, nar.index, nar.selectors, ndim)
            b.env[a], b.zero[a] = new, False
        return run()
    finally:
        for a, (env, zero) in saved.items():
            b.env[a] = env
            if zero is None:
                b.zero.pop(a, None)
            else:
                b.zero[a] = zero


# --------------------------------------------------------------------------- one stored buffer
def _index_array(nar: Narrowing, ndim: int) -> np.ndarray:
    """The index of ``nar`` shaped for ``ops.gather`` / ``ops.scatter`` on an ``ndim``-dim tensor:
    1-D, or size 1 but along its selector dims and its own (``Builder.gather``)."""
    if not nar.selectors or nar.index.ndim == 1:
        return nar.index.reshape(-1)
    shape = [1] * ndim
    for d, k in zip(nar.selectors, nar.index.shape[:-1]):
        shape[d] = k
    shape[nar.dim] = nar.width
    order = list(nar.selectors) + [nar.dim]
    return np.moveaxis(nar.index, range(len(order)), np.argsort(np.argsort(order))).reshape(shape)


@dataclass(eq=False)
class BufferSlot:
    """A module buffer a narrow graph reads and writes at the kept widths.

    Attributes:
        position: its placeholder's position in the graph.
        name: the buffer's name relative to the region's module (``"kv_cache.k"``).
        dense_shape: its shape in the dense model, e.g. ``(B, H_kv, T, head_dim)``.
        narrowings: the positions kept along each narrowed dim (head and per-head channel dims;
            a per-head choice indexes the kept heads).
    """

    position: int
    name: str
    dense_shape: tuple[int, ...]
    narrowings: tuple[Narrowing, ...]
    _index: dict = field(default_factory=dict, repr=False)  # (dim, device) -> index tensor

    @property
    def narrow_shape(self) -> tuple[int, ...]:
        shape = list(self.dense_shape)
        for nar in self.narrowings:
            shape[nar.dim] = nar.width
        return tuple(shape)

    def same(self, other: "BufferSlot") -> bool:
        """The same dense shape and kept positions (the same narrow storage)."""
        return self.dense_shape == other.dense_shape and same_layout(
            {n.dim: n for n in self.narrowings}, {n.dim: n for n in other.narrowings}, selectors=True)

    def index(self, nar: Narrowing, device: torch.device) -> torch.Tensor:
        key = (nar.dim, device)
        if key not in self._index:
            self._index[key] = torch.as_tensor(_index_array(nar, len(self.dense_shape)), dtype=torch.long,
                                               device=device)
        return self._index[key]

    def to_narrow(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``dense_shape``) at the kept positions (``narrow_shape``), a new tensor: whole
        dims (heads) first, then the positions chosen per kept head."""
        for nar in sorted(self.narrowings, key=lambda n: (bool(n.selectors), n.dim)):
            x = ops.gather(x, nar.dim, self.index(nar, x.device), x.dim())
        return x.contiguous()

    def to_dense(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (``narrow_shape``) scattered back to ``dense_shape``, zeros at the removed
        positions (what the masked dense model holds there: the rewrite checked it)."""
        for nar in sorted(self.narrowings, key=lambda n: (not n.selectors, -n.dim)):
            x = ops.scatter(x, nar.dim, self.index(nar, x.device), nar.size)
        return x.contiguous()


def slots(gm: torch.nn.Module | None) -> tuple[BufferSlot, ...]:
    """The buffers a narrow graph stores at the kept widths (none for most graphs)."""
    meta = getattr(gm, "meta", None)
    return meta.get(META, ()) if isinstance(meta, dict) else ()


# --------------------------------------------------------------------------- the module side
def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """``(module owning buffer name, attribute)`` as the module is now (a cache module the model
    replaced is the new one), or None."""
    *path, attr = name.split(".")
    owner = module
    for part in path:
        owner = owner._modules.get(part)
        if owner is None:
            return None
    return owner, attr


def _set(owner: nn.Module, attr: str, slot: BufferSlot | None, value: torch.Tensor) -> None:
    """Put ``value`` in place of ``owner``'s buffer ``attr`` and record (``slot``) or forget
    (None) that it is stored narrow."""
    owner._buffers[attr] = value
    table = owner.__dict__.get(ATTR)
    if slot is None:
        if table is not None:
            table.pop(attr, None)
        return
    if table is None:
        table = owner.__dict__[ATTR] = {}
    table[attr] = slot


def _narrow_slot(owner: nn.Module, attr: str) -> BufferSlot | None:
    """The slot ``owner``'s buffer ``attr`` is stored at now, or None (dense, or replaced)."""
    table = owner.__dict__.get(ATTR)
    slot = table.get(attr) if table else None
    live = owner._buffers.get(attr)
    if slot is None or live is None or tuple(live.shape) != slot.narrow_shape:
        return None
    return slot


def make_narrow(module: nn.Module, wanted: Sequence[BufferSlot], feeds: list) -> bool | str:
    """Store every buffer of ``wanted`` at its kept widths (slicing a dense one: the model's
    first or newly allocated cache, or one the fallback wrote) and put the live narrow tensors
    in ``feeds`` at their placeholders. Returns why the call cannot run narrow (a string), else
    whether a buffer was sliced (True) or all were stored so already (False)."""
    sliced = False
    for slot in wanted:
        found = _owner(module, slot.name)
        now = found[0]._buffers.get(found[1]) if found is not None else None
        if now is None:
            return f"the buffer {slot.name!r} written in place is gone"
        owner, attr = found
        if attr not in owner._non_persistent_buffers_set:
            return (f"the buffer {slot.name!r} written in place is persistent (state_dict and ecospa.save store it at "
                    "its dense shape), so it is not stored at the kept widths")
        have = _narrow_slot(owner, attr)
        if have is not slot and have is not None and have.same(slot):
            owner.__dict__[ATTR][attr] = slot  # the same storage: the next call takes the fast path
        elif have is not slot:
            sliced = True
            if have is not None:  # stored at another layout (a graph of another rung)
                dense = have.to_dense(now)
            elif tuple(now.shape) == slot.dense_shape:
                dense = now
            else:
                return (f"the buffer {slot.name!r} written in place has shape {tuple(now.shape)}, neither its "
                        f"dense shape {slot.dense_shape} nor the kept widths {slot.narrow_shape}")
            with torch.inference_mode(False), torch.no_grad():
                now = slot.to_narrow(dense)
            _set(owner, attr, slot, now)
        feeds[slot.position] = now
    return sliced


def _dense_one(owner: nn.Module) -> None:
    table = owner.__dict__.get(ATTR)
    if not table:
        return
    for attr in list(table):
        slot = _narrow_slot(owner, attr)
        if slot is None:  # replaced by the model since: forget it
            table.pop(attr)
            continue
        with torch.inference_mode(False), torch.no_grad():
            _set(owner, attr, None, slot.to_dense(owner._buffers[attr]))


def make_dense(module: nn.Module) -> None:
    """Give every buffer of ``module``'s subtree stored at the kept widths back its dense width
    (zeros at the removed positions, as in the masked dense model): before the exact fallback,
    a capture, or a new round of pruning. The next narrow call slices it again."""
    for m in module.modules():
        if m.__dict__.get(ATTR):
            _dense_one(m)


class _Shape:
    """Stands for a buffer stored narrow in a guard: its dense shape."""

    __slots__ = ("shape",)

    def __init__(self, shape: tuple[int, ...]):
        self.shape = torch.Size(shape)


def logical(module: nn.Module, name: str) -> Callable[[], object]:
    """A function giving ``module``'s buffer ``name`` as it is when called (the owner looked up
    anew: a cache module the model replaced is the new one); a buffer stored at the kept widths
    stands as an object whose ``shape`` is its dense shape (what a capture saw)."""
    def get():
        found = _owner(module, name)
        if found is None:
            return None
        slot = _narrow_slot(*found)
        return found[0]._buffers.get(found[1]) if slot is None else _Shape(slot.dense_shape)
    return get


def live(module: nn.Module, slot: BufferSlot) -> torch.Tensor | None:
    """The buffer of ``slot`` as ``module`` holds it now (narrow or dense)."""
    found = _owner(module, slot.name)
    return found[0]._buffers.get(found[1]) if found is not None else None


def buffer_bytes(module: nn.Module, wanted: Sequence[BufferSlot]) -> tuple[int, int]:
    """``(dense, stored)`` bytes of the buffers of ``wanted`` as they are stored now."""
    dense = stored = 0
    for slot in wanted:
        t = live(module, slot)
        if t is not None:
            stored += t.numel() * t.element_size()
            dense += int(np.prod(slot.dense_shape)) * t.element_size()
    return dense, stored
