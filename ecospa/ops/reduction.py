"""Rules for ops that reduce or normalise over dimensions, and for indexing ops.

Summing over a channel dimension is exact (a removed channel contributes zero either way). Any
other reduction over channels (mean, variance, max, softmax, a norm) depends on how many
channels there are or on their values being zero, so the channels it touches are poisoned.
"""
from __future__ import annotations

import numpy as np
import torch

from ecospa.ir.labels import merge_aligned, to_ndim
from ecospa.ops.base import Ctx, narrow_copy, poison_value, shape_of
from ecospa.ops.registry import NarrowError, narrow_rule, no_narrow_rule, op_name, register
from ecospa.ops.shape import dense_to_narrow, select_positions

aten = torch.ops.aten

__all__ = ["reduce_dims"]


def _dims(arg, nd: int) -> list[int]:
    if arg is None:
        return list(range(nd))
    if isinstance(arg, int):
        return [arg % nd]
    dims = list(arg)
    return [d % nd for d in dims] if dims else list(range(nd))


def reduce_dims(ctx: Ctx, node, x, dims: list[int], keepdim: bool, poison: str | None):
    """Factors of ``x`` reduced over ``dims``: varying ones end (poisoned if ``poison``)."""
    nd = len(shape_of(x))
    out = []
    for f in ctx.factors(x, nd):
        if any(f.shape[d] > 1 for d in dims):
            if poison:
                ctx.space.poison(f, f"{poison} at {ctx.where(node)}")
            continue
        out.append(f if keepdim else np.squeeze(f, axis=tuple(dims)) if dims else f)
    return out


@register(aten.sum, aten.nansum, facts=("compact",))
def sum_(ctx: Ctx, node: torch.fx.Node):
    x = node.args[0]
    nd = len(shape_of(x))
    dims = _dims(node.args[1] if len(node.args) > 1 and not isinstance(node.args[1], torch.dtype) else node.kwargs.get("dim"), nd)
    keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    return reduce_dims(ctx, node, x, dims, keep, None)


@register(aten.mean, aten.var, aten.std, aten.amax, aten.amin, aten.logsumexp, aten.prod,
          aten.norm, aten.linalg_vector_norm, aten.var_mean, aten.std_mean)
def mean_like(ctx: Ctx, node: torch.fx.Node):
    x = node.args[0]
    nd = len(shape_of(x))
    name = node.target.overloadpacket.__name__
    dim_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if name in ("norm", "linalg_vector_norm"):
        dim_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if isinstance(dim_arg, (int, float)) and name in ("norm",):
        dim_arg = None
    keep = node.kwargs.get("keepdim", False)
    for a in node.args[2:]:
        if isinstance(a, bool):
            keep = a
    out = reduce_dims(ctx, node, x, _dims(dim_arg, nd), keep, f"{name} over channels")
    if isinstance(node.meta.get("val"), (tuple, list)):
        return (out, out)
    return out


@register(aten.max, aten.min, aten.argmax, aten.argmin, aten.sort, aten.topk, aten.cumsum,
          aten.cumprod, aten.median)
def order_like(ctx: Ctx, node: torch.fx.Node):
    """Ops that order or pick values along ``dim`` (or everywhere, without one): a factor that
    varies along it is poisoned. ``topk``'s dim is its third argument (the second is ``k``);
    ``sort`` and ``topk`` default to the last dim."""
    x = node.args[0]
    nd = len(shape_of(x))
    name = node.target.overloadpacket.__name__
    pos = 2 if name == "topk" else 1
    dim_arg = node.args[pos] if len(node.args) > pos and isinstance(node.args[pos], int) else node.kwargs.get("dim")
    if dim_arg is None and name in ("sort", "topk"):
        dim_arg = -1
    dims = _dims(dim_arg, nd)
    val = node.meta.get("val")
    if name in ("cumsum", "cumprod", "sort"):  # same shape out: poisoned labels flow on
        out = ctx.factors(x, nd)
        for f in out:
            if any(f.shape[d] > 1 for d in dims):
                ctx.space.poison(f, f"{name} over channels at {ctx.where(node)}")
        return (out, []) if isinstance(val, (tuple, list)) else out
    keep = name == "topk" or any(a is True for a in node.args[2:]) or bool(node.kwargs.get("keepdim"))
    out = reduce_dims(ctx, node, x, dims, keep, f"{name} over channels")
    if name in ("argmax", "argmin"):
        out = []
    if isinstance(val, (tuple, list)):
        return tuple(out if i == 0 else [] for i in range(len(val)))
    return out


@register(aten._softmax, aten.softmax, aten._log_softmax, aten.log_softmax, aten.special_softmax)
def softmax(ctx: Ctx, node: torch.fx.Node):
    x, dim = node.args[0], node.args[1]
    nd = len(shape_of(x))
    dim %= nd
    out = []
    for f in ctx.factors(x, nd):
        if f.shape[dim] > 1:
            ctx.space.poison(f, f"softmax over channels at {ctx.where(node)}")
        ctx.space.event("nonlinear", f)
        out.append(f)
    return out


def _norm(ctx: Ctx, node, x, norm_dims: list[int], weights: list, what: str):
    nd = len(shape_of(x))
    fs = []
    for f in ctx.factors(x, nd):
        if any(f.shape[d] > 1 for d in norm_dims):
            ctx.space.poison(f, f"{what} over channels at {ctx.where(node)}")
        fs.append(f)
    for w in weights:
        if w is not None:
            fs += ctx.factors(w, nd)
    out = merge_aligned(ctx.space, fs, ctx.where(node))
    for f in out:
        if any(f.shape[d] > 1 for d in norm_dims):
            ctx.space.poison(f, f"{what} over channels at {ctx.where(node)}")
    return out


@register(aten.layer_norm, aten.native_layer_norm)
def layer_norm(ctx: Ctx, node: torch.fx.Node):
    x, shape = node.args[0], node.args[1]
    nd = len(shape_of(x))
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    out = _norm(ctx, node, x, list(range(nd - len(shape), nd)), [w, b], "layer_norm")
    if node.target.overloadpacket is aten.native_layer_norm:
        return (out, [], [])
    return out


@register(aten.rms_norm)
def rms_norm(ctx: Ctx, node: torch.fx.Node):
    x, shape = node.args[0], node.args[1]
    nd = len(shape_of(x))
    w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    return _norm(ctx, node, x, list(range(nd - len(shape), nd)), [w], "rms_norm")


@register(aten.group_norm, aten.batch_norm, aten.native_batch_norm, aten.instance_norm,
          aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit)
def other_norm(ctx: Ctx, node: torch.fx.Node):
    """Batch, instance and group norms, channels at dim 1: they use running statistics (buffers
    ecospa does not slice) or mix a group's channels, so every label that enters is poisoned;
    the input's labels flow on (poisoned), so the reason names this op."""
    name = node.target.overloadpacket.__name__
    out = poison_value(ctx, node, f"{name} normalises channels", lost=False)
    fs = ctx.factors(node.args[0], len(shape_of(node.args[0])))
    return (fs, *out[1:]) if isinstance(out, tuple) else fs


@register(aten.embedding, facts=("compact",))
def embedding(ctx: Ctx, node: torch.fx.Node):
    """Rows of the table are selected by data (poisoned); its columns become the channels."""
    w = node.args[0]
    fw = ctx.factors(w, 2)
    nd = len(shape_of(node))
    out = []
    for f in fw:
        if f.shape[0] > 1:
            ctx.space.poison(f, f"embedding rows selected by token ids at {ctx.where(node)}")
        else:
            out.append(to_ndim(f.reshape(-1), nd))
    return out


_CONST_PASS = ("lift_fresh_copy", "clone", "detach", "detach_", "_to_copy", "to",
               "alias", "contiguous")


def _known_index(ctx: Ctx, arg) -> np.ndarray | None:
    """Values of an index tensor when they are known without running the model: a buffer or a
    constant (``x[..., [-2]]`` lifts a constant and copies it), else None."""
    for _ in range(4):
        val = ctx.constant(arg)
        if val is not None:
            return val.detach().cpu().numpy()
        if not (isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.args
                and getattr(getattr(arg.target, "overloadpacket", None), "__name__", "") in _CONST_PASS):
            return None
        arg = arg.args[0]
    return None


@register(aten.index_select)
def index_select(ctx: Ctx, node: torch.fx.Node):
    """Gather along ``dim`` by an index whose values are known (a buffer): labels move with it."""
    x, dim, index = node.args[0], node.args[1], node.args[2]
    nd = len(shape_of(x))
    dim %= nd
    idx = _known_index(ctx, index)
    out = []
    for f in ctx.factors(x, nd):
        if f.shape[dim] == 1:
            out.append(f)
        elif idx is None:
            ctx.space.poison(f, f"gathered by a data-dependent index at {ctx.where(node)}")
        else:
            out.append(np.take(f, idx.astype(np.int64), axis=dim))
    return out


@register(aten.index)
def index(ctx: Ctx, node: torch.fx.Node):
    """``x[i0, i1, ...]`` with index tensors (None: a whole dim), numpy's advanced indexing.

    Labels along an indexed dim move with known index values (a constant, a buffer) and are
    poisoned when the index depends on data (tokens routed to experts, a mask); labels along the
    other dims pass through."""
    x, indices = node.args[0], list(node.args[1])
    shape, out_shape = shape_of(x), shape_of(node)
    nd = len(shape)
    pos = [d for d, i in enumerate(indices) if i is not None]
    known = {d: _known_index(ctx, indices[d]) for d in pos}
    bools = any(known[d] is not None and known[d].dtype == bool or
                isinstance(indices[d], torch.fx.Node) and shape_of(indices[d]) is not None
                and indices[d].meta["val"].dtype == torch.bool for d in pos)
    out = []
    for f in ctx.factors(x, nd):
        varies = [d for d in pos if f.shape[d] > 1]
        if varies and (bools or any(known[d] is None for d in pos)):
            ctx.space.poison(f, f"gathered by a data-dependent index at {ctx.where(node)}")
            continue
        if varies:
            full = [shape[d] if d in pos else f.shape[d] for d in range(nd)]
            g = np.broadcast_to(f, full)
            sel = tuple(known[d].astype(np.int64) if d in pos else slice(None) for d in range(len(indices)))
        else:  # the indexed dims carry no labels: only the shape changes
            g = f
            sel = tuple(np.zeros((1,) * _index_ndim(indices[d]), dtype=np.int64) if d in pos
                        else slice(None) for d in range(len(indices)))
        try:
            h = np.ascontiguousarray(g[sel])
        except IndexError:
            h = None
        if h is None or h.ndim != len(out_shape) or any(a not in (1, b) for a, b in zip(h.shape, out_shape)):
            ctx.space.poison(f, f"indexed in a way ecospa does not follow at {ctx.where(node)}")
            continue
        out.append(h)
    return out


def _index_ndim(arg) -> int:
    s = shape_of(arg)
    return len(s) if s is not None else 1


@register(aten.index_copy)
def index_copy(ctx: Ctx, node: torch.fx.Node):
    """Scatter ``source`` into ``self`` along ``dim`` at a known index (ecospa's own adapters)."""
    base, dim, index, src = node.args[0], node.args[1], node.args[2], node.args[3]
    shape = shape_of(node)
    nd = len(shape)
    dim %= nd
    idx = _known_index(ctx, index)
    fb, fs = ctx.factors(base, nd), ctx.factors(src, nd)
    if idx is None:
        return poison_value(ctx, node, "scatter by a data-dependent index")
    idx = idx.astype(np.int64)
    out = []
    for f in fs:
        if f.shape[dim] == 1:
            ctx.space.poison(f, f"scattered without a channel layout at {ctx.where(node)}")
            continue
        full = list(f.shape)
        full[dim] = shape[dim]
        g = np.full(full, -1, dtype=np.int64)
        sl = [slice(None)] * nd
        sl[dim] = idx
        g[tuple(sl)] = f
        out.append(g)
    for f in fb:
        ctx.space.poison(f, f"overwritten by a scatter at {ctx.where(node)}")
    return out


@register(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.zeros_like,
          aten.ones_like, aten.empty_like, aten.full_like, aten.zeros, aten.ones, aten.full,
          aten.empty, aten.arange, aten.rand, aten.randn, aten.rand_like, aten.randn_like,
          aten.scalar_tensor, facts=("fresh",))
def fresh(ctx: Ctx, node: torch.fx.Node):
    """New tensors carry no labels (their values do not depend on any weight)."""
    return [] if shape_of(node) is not None else None


@register(aten.sym_size, facts=("fresh", "passive"))
def sym_size(ctx: Ctx, node: torch.fx.Node):
    """A size of a tensor (dynamic shapes): an integer, no labels."""
    return None


# ----------------------------------------------------------------------------- narrow rules
narrow_rule(aten.sym_size)(narrow_copy)


@narrow_rule(aten.sum, aten.nansum)
def narrow_sum(b, node):
    x = node.args[0]
    lay = b.layout(x)
    if lay and not b.zero.get(x, True):
        dims = node.args[1] if len(node.args) > 1 else None
        nd = len(b.shape(x))
        summed = set(range(nd)) if dims is None else {d % nd for d in ([dims] if isinstance(dims, int) else dims)}
        if summed & set(lay):
            raise NarrowError("a sum over dropped channels that are not zero")
    b.zero[node] = b.zero.get(x, True)
    return b.copy(node)


@narrow_rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.zeros, aten.ones,
             aten.full, aten.empty, aten.arange, aten.zeros_like, aten.ones_like, aten.empty_like,
             aten.full_like, aten.scalar_tensor)
def narrow_fresh(b, node):
    """New tensors carry no labels: copied dense; an op combining them with narrow ones gathers."""
    b.zero[node] = True
    return b.copy(node)


@narrow_rule(aten.index_select)
def narrow_index_select(b, node):
    x, dim, index = node.args[:3]
    nd = len(b.shape(x))
    dim %= nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return narrow_copy(b, node)
    src = b.constant(index)
    if src is None:
        raise NarrowError("index_select by a computed index along narrowed channels")
    src = src.detach().cpu().numpy().astype(np.int64)
    nout = b.layout(node).get(dim)
    out_pos = nout.index if nout is not None else np.arange(src.size)
    b.zero[node] = b.zero.get(x, True)
    return select_positions(b, node, x, dim, dense_to_narrow(nin, src[out_pos]))



@narrow_rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def narrow_softmax(b, node):
    """Softmax over a dim that is not narrowed is a copy; over narrowed channels it is refused
    (the dropped positions would change the normaliser)."""
    if node.args[1] % len(b.shape(node)) in b.layout(node.args[0]):
        raise NarrowError(f"{op_name(node.target)} over narrowed channels")
    return narrow_copy(b, node)


no_narrow_rule(aten.mean, aten.var, aten.std, aten.amax, aten.amin, aten.logsumexp, aten.prod, aten.norm,
               aten.linalg_vector_norm, aten.var_mean, aten.std_mean,
               reason="a statistic (mean, var, norm, ...) of a tensor that loses channels: its value may depend on "
                      "the dropped positions")
no_narrow_rule(aten.max, aten.min, aten.argmax, aten.argmin, aten.sort, aten.topk, aten.cumsum, aten.cumprod,
               aten.median, reason="an order statistic or running reduction of a tensor that loses channels")
no_narrow_rule(aten.special_softmax, reason="special_softmax of a tensor that loses channels: not rewritten narrow")
no_narrow_rule(aten.layer_norm, aten.native_layer_norm, aten.rms_norm, aten.group_norm, aten.batch_norm,
               aten.native_batch_norm, aten.instance_norm, aten._native_batch_norm_legit_no_training,
               aten._native_batch_norm_legit,
               reason="a normalisation of a tensor that loses channels: its statistics would change")
no_narrow_rule(aten.embedding, aten.index, reason="an embedding or index lookup into a tensor that loses channels: "
                                                  "not rewritten narrow")
no_narrow_rule(aten.index_copy, reason="an index_copy into a tensor that loses channels (a cache written in place "
                                       "keeps its dense width)")
no_narrow_rule(aten.rand, aten.randn, aten.rand_like, aten.randn_like,
               reason="random numbers drawn at a narrowed shape would differ from the dense draw")
