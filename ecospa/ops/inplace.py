"""In-place writes into stored tensors: the KV caches research code keeps in module buffers.

Research code writes each step's keys and values into buffers it owns: litgpt's ``KVCache``
(``self.k[:bs].index_copy_(-2, input_pos, k)``), torchtune's (``k_cache[:, :, pos] = k``:
``index_put_``), slice assignment (``self.cache_k[:b, s:e] = k``: ``copy_`` into a view). The
captured graph keeps these in-place ops.

Channel rules: ``index_copy_`` and ``index_put_`` along a dimension the written value holds no
channels on (the sequence of a cache) give their result the labels of the written value, at the
same channel positions as the tensor written into (which ``ecospa.analysis.mutation`` gives the
written labels, with the view chain back to the buffer). A write *along* channels by a known
index is ``aten.index_copy``'s scatter rule; by an unknown one, poisoned.

Narrow rule (:func:`store_write`), two cases (``ecospa.narrow.stored`` says which tensors are which):

- a module buffer stored at the kept widths (``b.narrow_stored``: the buffer and its views): the
  write runs at the kept widths, the value written laid out like the tensor it is written into
  and zero at the removed positions in the masked dense model (so that the buffer scattered back
  to its dense width for the fallback is the masked dense model's);
- a tensor kept at its dense width (``b.stored``: a graph input, a tensor created in the forward,
  a position counter): the write runs dense on the real storage, every other tensor operand
  scattered back to its dense width with zeros at the removed positions (exact only where those
  are zero in the masked dense model: ``Builder.zero``); reads are gathered by the rewrite.
"""
from __future__ import annotations

import numpy as np
import torch

from ecospa.ir.labels import merge_aligned
from ecospa.ops.base import Ctx, poison_value, shape_of
from ecospa.ops.reduction import index_copy as _index_copy_scatter
from ecospa.ops.registry import NarrowError, narrow_rule, register

__all__ = ["index_copy_", "index_put_", "store_write"]

aten = torch.ops.aten


def _along(ctx: Ctx, node: torch.fx.Node, base, fs: list[np.ndarray], dims: set[int]):
    """The labels of a write of factors ``fs`` (the written value's, aligned to the result) into
    ``base`` along ``dims`` (positions, not channels), or None when they vary along one of them."""
    nd = len(shape_of(node))
    if any(f.shape[d] > 1 for f in fs for d in dims):
        return None
    fb = ctx.factors(base, nd)
    if not fb:
        return fs
    return merge_aligned(ctx.space, fb + fs, ctx.where(node))


@register(aten.index_copy_)
def index_copy_(ctx: Ctx, node: torch.fx.Node):
    """``dst.index_copy_(dim, index, src)``: along positions (a cache's sequence), the result holds
    the channels of ``src`` (and of what ``dst`` held); along channels, the scatter rule of
    ``aten.index_copy``."""
    shape = shape_of(node)
    if shape is None:
        return None
    dim = node.args[1] % len(shape)
    out = _along(ctx, node, node.args[0], ctx.factors(node.args[3], len(shape)), {dim})
    return out if out is not None else _index_copy_scatter(ctx, node)


@register(aten.index_put_)
def index_put_(ctx: Ctx, node: torch.fx.Node):
    """``dst[..., index, ...] = values`` with one index tensor (a position of a cache, 0-d or 1-D):
    the result holds the channels of ``values`` along the other dims (and what ``dst`` held)."""
    shape = shape_of(node)
    if shape is None:
        return None
    indices = list(node.args[1])
    at = [i for i, ix in enumerate(indices) if ix is not None]
    vshape = shape_of(node.args[2]) if isinstance(node.args[2], torch.fx.Node) else ()
    ishape = shape_of(indices[at[0]]) if len(at) == 1 and isinstance(indices[at[0]], torch.fx.Node) else None
    if len(at) != 1 or ishape is None or len(ishape) > 1 or vshape is None or len(vshape) > len(shape):
        return poison_value(ctx, node, "an index_put ecospa does not follow (several or multi-dim indices)")
    if len(ishape) == 0:  # a 0-d index removes the dim from the written value
        if len(vshape) == len(shape):
            return poison_value(ctx, node, "an index_put ecospa does not follow")
        fs = [np.expand_dims(f, at[0]) for f in ctx.factors(node.args[2], len(shape) - 1)]
    else:
        fs = ctx.factors(node.args[2], len(shape))
    out = _along(ctx, node, node.args[0], fs, {at[0]})
    return out if out is not None else poison_value(ctx, node, "an index_put along channels")


def _written_arg(node: torch.fx.Node) -> int | None:
    """Index of the positional argument ``node``'s op writes into (schema ``Tensor(a!)``)."""
    schema = getattr(node.target, "_schema", None)
    for i, a in enumerate(schema.arguments[: len(node.args)] if schema is not None else ()):
        if a.alias_info is not None and a.alias_info.is_write:
            return i
    return None


#: The positional argument holding the value written, per in-place write op.
_VALUE = {"index_copy_": 3, "index_put_": 2, "copy_": 1}


def _one_dim_indices(node: torch.fx.Node) -> bool:
    """The indices of an ``index_put_`` are 1-D (or None): the indexed tensor keeps the rank of
    the tensor written into, and the value broadcasts against it right-aligned."""
    return all(ix is None or (isinstance(ix, torch.fx.Node) and len(shape_of(ix) or ()) == 1)
               for ix in node.args[1])


def _write_narrow(b, node: torch.fx.Node, k: int) -> torch.fx.Node:
    """``node`` writing into a buffer stored at the kept widths, run there: the value written
    must be laid out like the tensor written into (``(B, H_kept, T, w)`` into ``(B, H_kept,
    T_max, w)``) and zero at the removed positions in the masked dense model."""
    dst = node.args[k]
    want, nd = b.layout(dst), len(b.shape(dst))
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", str(node.target))
    args = list(b.arg(node.args))
    v = node.args[_VALUE[name]] if name in _VALUE and len(node.args) > _VALUE.get(name, 0) else None
    if isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.Tensor):
        own, vshape = b.layout(v), b.shape(v)
        off = nd - len(vshape)
        mine = {d + off: nar for d, nar in own.items()}
        same = off >= 0 and mine.keys() == want.keys() and all(
            nar.same(want[d]) and tuple(s + off for s in nar.selectors) == want[d].selectors
            for d, nar in mine.items())
        if not same or (name == "index_put_" and not _one_dim_indices(node)):
            raise NarrowError("a value written into a buffer stored at the kept widths is not laid out like it")
        if own and not b.zero.get(v, True):
            raise NarrowError("a value written into a buffer stored at the kept widths has removed positions "
                              "that are not zero")
    elif want:
        raise NarrowError("a write of a constant into a buffer stored at the kept widths")
    b.zero[node] = True
    return b.emit(node, tuple(args), b.arg(node.kwargs), mapped=True)


def store_write(b, node: torch.fx.Node):
    """Narrow rule of an in-place write into a stored tensor (see the module docstring): at the
    kept widths into a buffer stored there (``b.narrow_stored``), else dense on the real storage
    of a tensor kept at its dense width (``b.stored``), its other tensor operands scattered back
    to the dense width (their removed positions must be zero in the masked dense model); the
    result is the storage, dense (reads gather it)."""
    k = _written_arg(node)
    if k is not None and node.args[k] in getattr(b, "narrow_stored", ()):
        return _write_narrow(b, node, k)
    if k is None or node.args[k] not in b.stored:
        raise NarrowError("an in-place write into a tensor that loses channels (not a stored buffer)")

    def dense(a):
        if not isinstance(a, torch.fx.Node) or not isinstance(a.meta.get("val"), torch.Tensor):
            return b.arg(a)
        if a in b.stored:
            return b.env[a]
        if b.layout(a) and not b.zero.get(a, True):
            raise NarrowError("a value written into a stored buffer has removed positions that are not zero")
        return b.dense(a)

    args = [b.env[a] if i == k else (torch.fx.node.map_aggregate(a, dense) if isinstance(a, (list, tuple))
                                     else dense(a)) for i, a in enumerate(node.args)]
    kwargs = {n: dense(v) for n, v in node.kwargs.items()}
    b.zero[node] = True
    return b.emit(node, tuple(args), kwargs, mapped=True)


narrow_rule(aten.index_copy_, aten.index_put_, aten.copy_)(store_write)
