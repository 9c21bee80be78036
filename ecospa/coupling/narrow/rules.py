"""Narrow rules: how each op is rewritten when its tensors lose positions.

A rule ``rule(b, node) -> new node`` builds the narrow version of ``node`` with the
:class:`~ecospa.coupling.narrow.rewrite.Builder`: its inputs are already narrow (``b.arg``), the
layout every tensor must have is known (``b.layout``). Most ops need nothing but a copy (their
output size follows from their inputs): they are registered with :func:`same`. Ops that carry
sizes or positions as arguments (views, slices, splits) recompute them; an elementwise op gathers
a label-free operand (a rotary cos/sin table, a mask) at the kept positions; the attention scale
is pinned to the dense value. An op with no rule makes the call run on the exact fallback path.

Safety: a dropped position must not change anything the graph computes. The builder tracks, per
tensor, whether its dropped positions are zero in the masked dense model (``b.zero``); a sum over
dropped positions where no operand is zero there, or a graph output that carries narrowed
channels, refuses the rewrite.
"""
from __future__ import annotations

import operator
from typing import Callable

import numpy as np
import torch

from ecospa.coupling.narrow.layout import Narrowing
from ecospa.coupling.narrow.ops import pin_scale
from ecospa.graph.rules.base import concrete
from ecospa.graph.rules.registry import has, is_pointwise, op_name

__all__ = ["NARROW_RULES", "narrow_rule", "rule_for", "NarrowError"]

aten = torch.ops.aten
NARROW_RULES: dict[object, Callable] = {}


class NarrowError(Exception):
    """The rewrite of one node is impossible (the reason is the message)."""


def narrow_rule(*targets):
    """Register ``fn`` as the narrow rule of ``targets`` (ATen packets or callables)."""
    def deco(fn):
        for t in targets:
            key = getattr(t, "overloadpacket", t)
            if key in NARROW_RULES:
                raise RuntimeError(f"narrow rule for {key} registered twice")
            NARROW_RULES[key] = fn
        return fn
    return deco


def rule_for(target) -> Callable | None:
    """The narrow rule of ``target`` (pointwise ops share one; a custom op may be registered by
    its qualified name, ``"namespace::name"``), or None."""
    key = getattr(target, "overloadpacket", target)
    hit = NARROW_RULES.get(key)
    if hit is None:
        name = getattr(key, "_qualified_op_name", None)
        hit = NARROW_RULES.get(name) if name is not None else None
    if hit is None and is_pointwise(target):
        return pointwise
    return hit


# ----------------------------------------------------------------------------- copies
def _all_zero(b, node) -> bool:
    """Every tensor input's dropped positions are zero (symbolic sizes are no operands)."""
    return all(b.zero.get(a, True) for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))


@narrow_rule(aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to,
             aten.type_as, aten.lift_fresh_copy, aten.dropout, aten.feature_dropout,
             aten.alpha_dropout, aten.native_dropout, aten.permute, aten.transpose, aten.t,
             aten.numpy_T, aten.concatenate, aten.view_as, aten.expand_as, aten.unsqueeze,
             aten.squeeze, aten.flatten, aten.cat, aten.concat, aten.stack,
             aten.repeat_interleave, aten.repeat, operator.getitem, aten.sym_size,
             aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def same(b, node):
    """The op computes the narrow result from narrow inputs unchanged (no size arguments).
    Softmax is here for reductions over dims that are not narrowed (a narrowed one is refused)."""
    name = op_name(node.target)
    if "softmax" in name and node.args[1] % len(b.shape(node)) in b.layout(node.args[0]):
        raise NarrowError(f"{name} over narrowed channels")
    b.zero[node] = _all_zero(b, node)
    return b.copy(node)


@narrow_rule(aten._assert_tensor_metadata)
def drop(b, node):
    """Runtime checks of dense metadata: not needed (and wrong) in the narrow graph."""
    return None


@narrow_rule(aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm, aten.baddbmm, aten.dot,
             aten.einsum, aten._grouped_mm, "transformers::grouped_mm_fallback")
def contraction(b, node):
    """Products: narrow inputs give the narrow product. A sum over dropped positions must have
    a zero operand there (weights always are)."""
    ins = [a for a in node.all_input_nodes if b.layout(a)]
    if len(ins) >= 2 and sum(not b.zero.get(a, True) for a in ins) >= 2:
        raise NarrowError("a product of two operands whose dropped channels are not zero")
    b.zero[node] = all(b.zero.get(a, True) for a in ins)
    return b.copy(node)


@narrow_rule(aten.sum, aten.nansum)
def sum_(b, node):
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


def _last_width(b, x) -> int:
    nar = b.layout(x).get(len(b.shape(x)) - 1)
    return int(b.shape(x)[-1]) if nar is None else nar.width


@narrow_rule(aten.scaled_dot_product_attention)
def sdpa(b, node):
    """Attention: q.k sums over narrowed head dims (one of q, k must be zero where dropped); the
    scale stays the dense ``1/sqrt(head_dim)`` when the model left it implicit.

    The fused CPU kernel (flash) needs q/k and v of one head width; with different widths (ragged
    heads padded per tensor, or q/k and v couplings keeping different counts) SDPA falls back to
    its math kernel, which materialises the T x T scores (5-6x slower at 1024 tokens). So the
    narrower side is padded with zero channels for the call: zero q/k channels add nothing to the
    scores, zero v channels give zero output channels, which are sliced off."""
    q, k, v = node.args[:3]
    if b.layout(q) and not (b.zero.get(q, True) or b.zero.get(k, True)):
        raise NarrowError("attention scores over dropped channels that are not zero")
    b.zero[node] = b.zero.get(v, True)
    kwargs = dict(node.kwargs)
    if kwargs.get("scale") is None:
        kwargs["scale"] = pin_scale(int(b.shape(q)[-1]))
    wq, wv = _last_width(b, q), _last_width(b, v)
    if wq == wv:
        return b.copy(node, kwargs=kwargs)
    args = list(b.arg(node.args))
    for i in ((2,) if wv < wq else (0, 1)):
        args[i] = b.call(aten.constant_pad_nd.default, (args[i], [0, abs(wq - wv)], 0.0))
    out = b.emit(node, args, b.arg(kwargs), mapped=True)
    if wv < wq:
        out = b.call(aten.slice.Tensor, (out, -1, 0, wv))
    # the kernel lays its output out like q, and the model's later views may rely on that layout
    # (``y.transpose(1, 2).view(B, T, C)``): lay the result out as the dense call did
    val = node.meta.get("val")
    order = sorted(range(val.dim()), key=lambda d: (-val.stride(d), d)) if isinstance(val, torch.Tensor) else []
    if order != list(range(len(order))):
        out = b.call(aten.permute.default, (out, order))
    out = b.call(aten.clone.default, (out,), {"memory_format": torch.contiguous_format})
    if order != list(range(len(order))):
        out = b.call(aten.permute.default, (out, [int(i) for i in np.argsort(order)]))
    return out


# ----------------------------------------------------------------------------- elementwise
def pointwise(b, node):
    """Elementwise ops: operands narrowed alike; a label-free operand with full-size channel
    dims is gathered at the kept positions."""
    out = b.layout(node)
    nd = len(b.shape(node))
    args = list(node.args)
    for i, a in enumerate(args):
        if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            args[i] = b.align_operand(a, out, nd)
    kwargs = {k: (b.align_operand(v, out, nd) if isinstance(v, torch.fx.Node) else v)
              for k, v in node.kwargs.items()}
    b.zero[node] = _pointwise_zero(b, node, out)
    return b.emit(node, tuple(args), kwargs, mapped=True)


def _pointwise_zero(b, node, out) -> bool:
    if not out:
        return True
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    narrowed = [a for a in tensors if b.layout(a)]
    if has(node.target, "zero"):
        if op_name(node.target) in ("div", "true_divide"):
            return bool(narrowed) and node.args[0] in narrowed and b.zero.get(node.args[0], True)
        return any(b.zero.get(a, True) for a in narrowed)
    if has(node.target, "additive"):
        scalars = [a for a in node.args[:2] if isinstance(a, (int, float)) and a != 0]
        return not scalars and len(narrowed) == len(tensors) and all(b.zero.get(a, True) for a in narrowed)
    return False


# ----------------------------------------------------------------------------- sizes
def _narrow_size_of(b, size: torch.fx.Node, nar: Narrowing) -> bool:
    """True when the symbolic ``size`` is ``sym_size(x, d)`` of a tensor ``x`` narrowed along ``d``
    to ``nar``'s width (a rotary table gathered at the kept channels, say): in the narrow graph
    it is that width."""
    if size.op != "call_function" or op_name(size.target) != "sym_size" or len(size.args) < 2:
        return False
    x, d = size.args[0], size.args[1]
    if not isinstance(x, torch.fx.Node) or not isinstance(d, int):
        return False
    have = b.layout(x).get(d % len(b.shape(x)))
    return have is not None and have.width == nar.width and have.size == nar.size


def _sized(b, node, pos: int, offset: int = 0):
    """Copy ``node`` with its size list (argument ``pos``) set to the narrow sizes of the output
    dims ``offset..`` (``-1`` entries stay)."""
    out = b.layout(node)
    sizes = list(node.args[pos])
    for d, nar in out.items():
        i = d - offset
        if 0 <= i < len(sizes):
            if isinstance(sizes[i], torch.fx.Node):
                if _narrow_size_of(b, sizes[i], nar):
                    continue  # read from a tensor narrowed alike: the narrow graph reads the narrow size
                raise NarrowError(f"a narrowed dim given by a symbolic size {sizes[i].name}")
            if sizes[i] != -1:
                sizes[i] = nar.width
    args = list(node.args)
    args[pos] = sizes
    b.zero[node] = _all_zero(b, node)
    return b.copy(node, args=tuple(args))


@narrow_rule(aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten._reshape_alias, aten.broadcast_to)
def view(b, node):
    return _sized(b, node, 1)


@narrow_rule(aten.unflatten)
def unflatten(b, node):
    nd = len(b.shape(node.args[0]))
    return _sized(b, node, 2, offset=node.args[1] % nd)


@narrow_rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.zeros, aten.ones,
             aten.full, aten.empty, aten.arange, aten.zeros_like, aten.ones_like, aten.empty_like,
             aten.full_like, aten.scalar_tensor)
def fresh(b, node):
    """New tensors carry no labels: copied dense; an op combining them with narrow ones gathers."""
    b.zero[node] = True
    return b.copy(node)


def _rows(index: np.ndarray) -> np.ndarray:
    """``index`` (..., k) as rows ``(n, k)``, also when ``k`` is 0."""
    return index.reshape(int(np.prod(index.shape[:-1], dtype=np.int64)), index.shape[-1])


def _positions(nin: Narrowing, dense: np.ndarray) -> np.ndarray:
    """Narrow positions of dense positions ``dense`` (..., k), per selector row of ``nin``."""
    idx = nin.index
    if idx.ndim == 1:
        pos = np.searchsorted(idx, dense)
        ok = (pos < idx.size) & (idx[np.minimum(pos, idx.size - 1)] == dense)
    else:
        rows = _rows(idx)
        d = np.broadcast_to(dense, idx.shape[:-1] + dense.shape[-1:]).reshape(rows.shape[0], -1)
        pos = np.stack([np.searchsorted(r, x) for r, x in zip(rows, d)])
        ok = np.stack([(p < r.size) & (r[np.minimum(p, r.size - 1)] == x) for r, p, x in zip(rows, pos, d)])
        pos = pos.reshape(idx.shape[:-1] + (-1,))
        ok = ok.reshape(pos.shape)
    if not ok.all():
        raise NarrowError("selects channels that were dropped")
    return pos


def _select_positions(b, node, x, dim: int, positions: np.ndarray):
    """Narrow ``x`` along ``dim`` at narrow ``positions`` (..., k): a slice when they form the
    same arithmetic progression in every row, a gather otherwise."""
    rows = _rows(positions)
    first = rows[:1]
    if (rows == first).all():
        p = first[0]
        step = int(p[1] - p[0]) if p.size > 1 else 1
        if p.size == 0 or (step > 0 and (np.diff(p) == step).all()):
            start = int(p[0]) if p.size else 0
            return b.call(aten.slice.Tensor, (b.arg(x), dim, start, start + step * p.size, step))
        return b.gather(b.arg(x), dim, p, None, len(b.shape(node)))
    sel = b.layout(node)[dim].selectors if dim in b.layout(node) else b.layout(x)[dim].selectors
    return b.gather(b.arg(x), dim, positions, sel, len(b.shape(node)))


@narrow_rule(aten.slice)
def slice_(b, node):
    x = node.args[0]
    nd = len(b.shape(x))
    dim = (node.args[1] if len(node.args) > 1 else 0) % nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return same(b, node)
    size = nin.size
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    start, end, step = slice(concrete(start), concrete(end), concrete(step)).indices(size)
    nout = b.layout(node).get(dim)
    out_pos = nout.index if nout is not None else np.arange(len(range(start, end, step)))
    b.zero[node] = b.zero.get(x, True)
    return _select_positions(b, node, x, dim, _positions(nin, start + out_pos * step))


@narrow_rule(aten.select)
def select(b, node):
    x, dim, index = node.args[0], node.args[1], concrete(node.args[2])
    nd = len(b.shape(x))
    dim %= nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return same(b, node)
    pos = _positions(nin, np.array([index % nin.size]))
    if not (pos == pos.reshape(-1)[0]).all():
        raise NarrowError("select of a channel at different narrow positions per head")
    b.zero[node] = b.zero.get(x, True)
    return b.call(aten.select.int, (b.arg(x), dim, int(pos.reshape(-1)[0])))


@narrow_rule(aten.split, aten.split_with_sizes, aten.chunk)
def split(b, node):
    x = node.args[0]
    nd = len(b.shape(x))
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return same(b, node)
    total = nin.size
    arg = node.args[1]
    if op_name(node.target) == "chunk":
        step = -(-total // arg)
        sizes = [min(step, total - i) for i in range(0, total, step)]
    elif isinstance(arg, int):
        sizes = [min(arg, total - i) for i in range(0, total, arg)]
    else:
        sizes = list(arg)
    rows = _rows(nin.index)
    new, lo = [], 0
    for s in sizes:
        counts = ((rows >= lo) & (rows < lo + s)).sum(1)
        if counts.min() != counts.max():
            raise NarrowError("a split whose pieces keep different widths per head")
        new.append(int(counts[0]))
        lo += s
    b.zero[node] = b.zero.get(x, True)
    return b.call(aten.split_with_sizes.default, (b.arg(x), new, dim))


@narrow_rule(aten.unbind)
def unbind(b, node):
    """Unbinding a dim that is not narrowed (q, k, v of a stacked qkv) is a copy."""
    x = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(b.shape(x))
    if dim in b.layout(x):
        raise NarrowError("unbind along narrowed channels")
    return same(b, node)


@narrow_rule(aten.index_select)
def index_select(b, node):
    x, dim, index = node.args[:3]
    nd = len(b.shape(x))
    dim %= nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return same(b, node)
    src = b.constant(index)
    if src is None:
        raise NarrowError("index_select by a computed index along narrowed channels")
    src = src.detach().cpu().numpy().astype(np.int64)
    nout = b.layout(node).get(dim)
    out_pos = nout.index if nout is not None else np.arange(src.size)
    b.zero[node] = b.zero.get(x, True)
    return _select_positions(b, node, x, dim, _positions(nin, src[out_pos]))


# ----------------------------------------------------------------------------- flex attention
def _subgraph(b, arg) -> torch.fx.GraphModule | None:
    """The ``score_mod`` / ``mask_mod`` subgraph a ``get_attr`` argument names, or None."""
    owner = b.program.graph.owning_module
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr" or owner is None:
        return None
    try:
        mod = owner.get_submodule(arg.target)
    except AttributeError:
        return None
    return mod if isinstance(mod, torch.fx.GraphModule) else None


def _reads_arg(gm: torch.fx.GraphModule | None, pos: int) -> bool:
    """True unless ``gm`` is known not to use its placeholder number ``pos``."""
    if gm is None:
        return True
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return pos < len(ph) and len(ph[pos].users) > 0


def _flex_heads_free(b, node) -> bool:
    """The head index reaches nothing in ``score_mod``, ``mask_mod`` or the block mask: heads may
    be left out (renumbered) without changing what the kept ones compute."""
    mask = node.args[4] if len(node.args) > 4 else ()
    mask_mod = mask[-1] if isinstance(mask, (tuple, list)) and mask else None
    if _reads_arg(_subgraph(b, node.args[3]), 2) or (mask_mod is not None and _reads_arg(_subgraph(b, mask_mod), 1)):
        return False
    tensors = [a for a in (mask if isinstance(mask, (tuple, list)) else ()) if isinstance(a, torch.fx.Node)
               and isinstance(a.meta.get("val"), torch.Tensor)]
    return all(a.meta["val"].dim() < 2 or a.meta["val"].shape[1] == 1 for a in tensors)


def _flex(b, node):
    """FlexAttention: as SDPA, q.k sums over the narrowed head dims (one of q, k must be zero
    where dropped) and v's channels pass through; the scale was fixed from the dense head width
    when the call was captured (pinned here if not). ``score_mod`` and ``mask_mod`` see scalar
    scores and indices only; whole heads are left out only where the head index reaches neither
    of them nor the block mask. The logsumexp output is not narrowed."""
    q, k, v = node.args[:3]
    nd = len(b.shape(q))
    if any(d != nd - 1 for x in (q, k, v) for d in b.layout(x)) and not _flex_heads_free(b, node):
        raise NarrowError("flex_attention whose score_mod, mask_mod or block mask reads the head index, "
                          "with whole heads left out")
    if b.layout(q) and not (b.zero.get(q, True) or b.zero.get(k, True)):
        raise NarrowError("attention scores over dropped channels that are not zero")
    b.zero[node] = b.zero.get(v, True)
    args = list(node.args)
    if len(args) > 5 and args[5] is None:
        args[5] = pin_scale(int(b.shape(q)[-1]))
    return b.copy(node, args=tuple(args))


def _register_flex() -> None:
    from ecospa.graph.rules.flex import FLEX

    if FLEX is not None:
        narrow_rule(FLEX)(_flex)


_register_flex()
