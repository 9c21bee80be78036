"""In-place writes: channels stored into a tensor through a view are read back from it later.

The captured graph keeps in-place ops (``copy_``, ``mul_``, ...). A write through a view
(``self.cache_k[:b, start:start + t] = k``: ``slice``, ``slice``, ``copy_``) changes the *base*
tensor, and later reads of the base (``self.cache_k[:b, :start + t]``) are new views of the base
node, not of the write. :func:`apply_write` follows the view chain back to the base and gives
the base the written labels, so that the read-back keys still carry the channels of ``k`` and
the q.k contraction is seen. Positions are not tracked (the labels sit along the dims where the
written value varies, at every position of the others: a cache holds the same channels at every
position it was written).

Writing channels into a buffer or tensor attribute of the model, or a graph input (a KV cache
that research code keeps in a module buffer) is exact at any width: the narrow graph stores such
a module buffer at the kept widths, or (another tensor, or with ``ECOSPA_NARROW_BUFFER_CACHES=dense``)
writes it at its dense width, zeros at the removed positions as in the masked dense model, and
gathers the kept positions where it is read (``ecospa.ops.inplace``, ``ecospa.narrow.stored``). Writing
them into a parameter or a tensor created in the forward keeps a pruned model from running at the
smaller width: those labels are poisoned with the reason. A write the chain cannot be
followed through loses its labels with the reason (``LabelSpace.lose``). An in-place op on a
plain intermediate (``h.relu_()``) just updates that node's labels.
"""
from __future__ import annotations

import numpy as np
import torch

from ecospa.ir.labels import merge_aligned, to_ndim
from ecospa.ops.base import Ctx, concrete, shape_of
from ecospa.ops.registry import has, op_name
from ecospa.ops.shape import reshape_factor

__all__ = ["written_arg", "apply_write", "is_view", "base_of"]


def written_arg(node: torch.fx.Node) -> int | None:
    """Index of the positional argument ``node``'s op writes into (schema ``Tensor(a!)``), or None."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return None
    for i, a in enumerate(schema.arguments[: len(node.args)]):
        if a.alias_info is not None and a.alias_info.is_write:
            return i if isinstance(node.args[i], torch.fx.Node) else None
    return None


def is_view(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.returns or not schema.arguments:
        return False
    ret, arg = schema.returns[0].alias_info, schema.arguments[0].alias_info
    return ret is not None and not ret.is_write and arg is not None and not arg.is_write


def _back(node: torch.fx.Node, f: np.ndarray) -> np.ndarray | None:
    """Factor ``f`` of the view ``node`` expressed on ``node.args[0]`` (None: cannot say)."""
    name = op_name(node.target)
    src = node.args[0]
    out_shape, in_shape = shape_of(node), shape_of(src)
    if out_shape is None or in_shape is None:
        return None
    nd = len(in_shape)
    f = to_ndim(f, len(out_shape))
    if name in ("alias", "detach", "lift_fresh_copy", "to", "contiguous", "type_as"):
        return f if len(out_shape) == nd else None
    if name == "slice":
        dim = (node.args[1] if len(node.args) > 1 else 0) % nd
        if f.shape[dim] == 1:
            return f
        start = concrete(node.args[2]) if len(node.args) > 2 else None
        end = concrete(node.args[3]) if len(node.args) > 3 else None
        step = concrete(node.args[4]) if len(node.args) > 4 else 1
        if slice(start, end, step).indices(in_shape[dim]) == (0, in_shape[dim], 1):
            return f
        return None  # channels written into part of a channel dim: positions would matter
    if name == "select":
        return np.expand_dims(f, node.args[1] % nd)
    if name == "unsqueeze":
        d = node.args[1] % len(out_shape)
        return np.squeeze(f, axis=d) if f.shape[d] == 1 else None
    if name == "permute":
        perm = [d % nd for d in node.args[1]]
        return np.transpose(f, np.argsort(perm))
    if name in ("transpose", "t"):
        if name == "t":
            return f.T if nd == 2 else f
        return np.swapaxes(f, node.args[1] % nd, node.args[2] % nd)
    if name in ("view", "_unsafe_view", "reshape", "flatten", "unflatten"):
        return reshape_factor(f, out_shape, in_shape)
    return None


def base_of(node: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node]:
    """``(views, base)``: the chain of views from ``node`` back to the tensor it views."""
    chain = []
    base = node
    while isinstance(base, torch.fx.Node) and is_view(base):
        chain.append(base)
        base = base.args[0]
    return chain, base


def _storage(ctx: Ctx, base: torch.fx.Node) -> str | None:
    """Why a tensor's width is fixed, or None for a plain intermediate of the graph."""
    if base.op == "placeholder":
        if base.name in ctx.captured.params:
            return f"the weight {ctx.captured.params[base.name]!r}"
        if base.name in ctx.captured.buffers:
            return f"the model's tensor {base.target!r} (a buffer or tensor attribute)"
        return f"the input {base.name!r}"
    return f"the tensor {base.name!r} created in the forward"


def _stored(ctx: Ctx, base: torch.fx.Node) -> bool:
    """A buffer (or tensor attribute) of the model, or a graph input: the narrow graph stores it at
    the kept widths or writes it dense and gathers its reads (``ecospa.narrow.stored``), so
    removing the written channels stays exact and runs narrow (a KV cache in a module buffer)."""
    return base.op == "placeholder" and base.name not in ctx.captured.params


def apply_write(ctx: Ctx, node: torch.fx.Node) -> None:
    """Give the base tensor ``node`` writes into the labels it writes (see the module docstring)."""
    k = written_arg(node)
    if k is None:
        return
    dst = node.args[k]
    nd = len(shape_of(dst) or ())
    if op_name(node.target) in ("copy_", "copy"):  # the old values are overwritten
        written = ctx.factors(node.args[1], nd) if len(node.args) > 1 else []
    else:
        v = ctx.values.get(node)
        written = [to_ndim(f, nd) for f in v] if isinstance(v, list) else []
    chain, base = base_of(dst)
    if not chain and base.op == "call_function" and not has(base.target, "fresh"):
        ctx.values[base] = list(written)  # h.relu_(): the node itself now holds the result
        return
    if not written:
        return
    where = ctx.where(node)
    levels = chain + [base]  # dst, its source, ..., the base: each gets the labels, in its dims
    per_level: list[list[np.ndarray]] = [[] for _ in levels]
    for f in written:
        steps = [to_ndim(f, nd)]
        for view in chain:
            g = _back(view, steps[-1])
            if g is None:
                break
            steps.append(to_ndim(g, len(shape_of(view.args[0]) or g.shape)))
        if len(steps) < len(levels):
            ctx.space.lose(f, f"written in place through a view ecospa does not follow at {where}",
                           ctx.index.get(node))
            continue
        for i, g in enumerate(steps):
            per_level[i].append(g)
    if not per_level[-1]:
        return
    if not _stored(ctx, base):
        store = _storage(ctx, base)
        for g in per_level[-1]:
            ctx.space.poison(g, f"written into {store} at {where}: its width is fixed, so removing "
                                "these channels does not run at the smaller width")
    for level, fs in zip(levels, per_level):  # later reads of any of these views see the write
        old = ctx.values.get(level)
        old = list(old) if isinstance(old, list) else []
        ctx.values[level] = merge_aligned(ctx.space, old + fs, where)
