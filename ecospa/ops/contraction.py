"""Rules for products that sum over a dimension: linear, matmul family, einsum, attention.

A contraction is where channels meet their partner: the labels along a summed dimension of one
operand are joined (edges) with the labels at the same positions of the other operand, which is
what makes a coupling. Dimensions shared by both operands and kept in the output (heads of a
batched product) tag the labels, which separates per-head couplings. Factors along dimensions
that are not summed pass through to the output (the value channels of ``attn @ v``).
"""
from __future__ import annotations

import string

import numpy as np
import torch

from ecospa.ir.labels import merge_aligned, to_ndim, varying
from ecospa.ops.base import Ctx, shape_of
from ecospa.ops.registry import NarrowError, narrow_rule, no_narrow_rule, register
from ecospa.ops.runtime import pin_scale

aten = torch.ops.aten

__all__ = ["contract", "attention"]

_LETTERS = string.ascii_letters


def _align(arr: np.ndarray, have: tuple[str, ...], want: tuple[str, ...]) -> np.ndarray:
    """View ``arr`` (axes ``have``) with axes ``want`` (size 1 where missing)."""
    order = [have.index(c) for c in want if c in have]
    a = np.transpose(arr, order) if order != list(range(len(order))) else arr
    shape, k = [], 0
    for c in want:
        if c in have:
            shape.append(a.shape[k])
            k += 1
        else:
            shape.append(1)
    return a.reshape(shape)


def contract(ctx: Ctx, node: torch.fx.Node, operands, out: str, sizes: dict[str, int]):
    """General product. ``operands``: list of (arg node or None, factors, letters).

    Returns the output factors (letters ``out``).
    """
    space = ctx.space
    where = ctx.where(node)
    letters_all = set("".join(l for _, _, l in operands))
    summed = [c for c in letters_all if c not in out and sizes.get(c, 1) > 1]
    batch = [c for c in out if sizes.get(c, 1) > 1 and sum(c in l for _, _, l in operands) >= 2]
    items = []  # (operand index, array, varying letters)
    for k, (_, fs, letters) in enumerate(operands):
        for f in fs:
            f = to_ndim(f, len(letters))
            vd = varying(f)
            if not vd:
                space.poison(f, f"a single weight entry broadcast in the product at {where}")
                continue
            items.append((k, f.reshape([f.shape[d] for d in vd]), tuple(letters[d] for d in vd)))
    param_like = [ctx.is_param_like(a) for a, _, _ in operands]
    consumed = set()
    for c in summed:
        holders = [i for i, it in enumerate(items) if c in it[2]]
        by_op: dict[int, list[int]] = {}
        for i in holders:
            by_op.setdefault(items[i][0], []).append(i)
        partners = [k for k, (_, _, l) in enumerate(operands) if c in l]
        for i in holders:
            consumed.add(i)
        if len(by_op) == 1 and len(partners) >= 2:
            for i in holders:
                space.poison(items[i][1], f"summed against a tensor that carries no weight channels at {where}")
                space.event("contract", items[i][1])
                space.site(items[i][1], ctx.index[node])
            continue
        ops = sorted(by_op)
        for a_op in ops[:1]:
            for b_op in ops[1:]:
                for i in by_op[a_op]:
                    for j in by_op[b_op]:
                        la, lb = items[i][2], items[j][2]
                        union = tuple(dict.fromkeys(la + lb))
                        x = _align(items[i][1], la, union)
                        y = _align(items[j][1], lb, union)
                        space.edge(x, y, cross=True)
                        for k2, arr in ((a_op, x), (b_op, y)):
                            space.event("contract", arr)
                            space.site(arr, ctx.index[node])
                        # the second operand reads the channels of the first: a weight's input
                        # columns in x @ W^T, k's head dims in q @ k^T
                        space.event("reader", y)
                        if not param_like[a_op] and not param_like[b_op]:
                            space.event("actact", x)
                            space.event("actact", y)
    # tags: position along the batch letters (heads) of every labelled operand
    if batch:
        bsizes = [sizes[c] for c in batch]
        base = space.new_tags(int(np.prod(bsizes)))[0] if bsizes else 0
        strides = np.cumprod([1] + bsizes[::-1][:-1])[::-1]
        for i, (k, arr, vl) in enumerate(items):
            bl = [c for c in vl if c in batch]
            if not bl:
                continue
            tag = np.full(arr.shape, base, dtype=np.int64)
            for c in bl:
                ax = vl.index(c)
                shape = [1] * arr.ndim
                shape[ax] = arr.shape[ax]
                tag = tag + np.arange(arr.shape[ax]).reshape(shape) * int(strides[batch.index(c)])
            space.tag(arr, tag)
    if not any(param_like):  # channels carried through a product of activations (attn @ v)
        for i, (k, arr, vl) in enumerate(items):
            if i not in consumed:
                space.event("bmm", arr)
    passing = [_align(arr, vl, tuple(out)) for i, (k, arr, vl) in enumerate(items) if i not in consumed]
    return merge_aligned(space, passing, where)


def _fresh(n: int, skip: str = "") -> str:
    pool = [c for c in _LETTERS if c not in skip]
    return "".join(pool[:n])


def _sizes(letters: str, shape) -> dict[str, int]:
    return {c: int(k) for c, k in zip(letters, shape)}


def _bias(ctx: Ctx, node, out_factors, bias, ndim):
    if bias is None:
        return out_factors
    fs = ctx.factors(bias, ndim)
    return merge_aligned(ctx.space, list(out_factors) + fs, ctx.where(node))


@register(aten.linear, facts=("product", "compact"))
def linear(ctx: Ctx, node: torch.fx.Node):
    """``x @ W.T + b``: x (..., i), W (o, i), b (o,) -> (..., o)."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    xs, ws = shape_of(x), shape_of(w)
    batch = _fresh(len(xs) - 1, "oi")
    sizes = {**_sizes(batch + "i", xs), **_sizes("oi", ws)}
    out = contract(ctx, node, [(x, ctx.factors(x, len(xs)), batch + "i"), (w, ctx.factors(w, 2), "oi")],
                   batch + "o", sizes)
    return _bias(ctx, node, out, b, len(xs))


@register(aten.addmm, facts=("product", "compact"))
def addmm(ctx: Ctx, node: torch.fx.Node):
    """``b + x @ W``: x (n, i), W (i, o) (GPT-2 Conv1D stores its weight this way)."""
    b, x, w = node.args[0], node.args[1], node.args[2]
    sizes = {**_sizes("ni", shape_of(x)), **_sizes("io", shape_of(w))}
    out = contract(ctx, node, [(x, ctx.factors(x, 2), "ni"), (w, ctx.factors(w, 2), "io")], "no", sizes)
    return _bias(ctx, node, out, b, 2)


def _matmul_letters(sa, sb) -> tuple[str, str, str, dict[str, int]]:
    """Einsum letters for torch.matmul's broadcasting rules."""
    na, nb = len(sa), len(sb)
    if na == 1 and nb == 1:
        return "k", "k", "", {"k": sa[0]}
    if nb == 1:
        bl = _fresh(na - 2 + 1, "knm")[: na - 1]
        la = bl + "k"
        return la, "k", bl, {**_sizes(la, sa)}
    if na == 1:
        bl = _fresh(nb - 2, "knm")
        lb = bl + "km"
        return "k", lb, bl + "m", _sizes(lb, sb)
    nbatch = max(na, nb) - 2
    bl = _fresh(nbatch, "knm")
    la = bl[nbatch - (na - 2):] + "nk"
    lb = bl[nbatch - (nb - 2):] + "km"
    sizes: dict[str, int] = {}
    for letters, shape in ((la, sa), (lb, sb)):
        for c, k in zip(letters, shape):
            sizes[c] = max(sizes.get(c, 1), int(k))
    return la, lb, bl + "nm", sizes


@register(aten.matmul, aten.mm, facts=("product", "compact"))
def matmul(ctx: Ctx, node: torch.fx.Node):
    """``a @ b`` with torch.matmul's broadcasting (a linear-like module may be ``x @ self.w``)."""
    return _matmul(ctx, node)


@register(aten.bmm, aten.dot)
def bmm(ctx: Ctx, node: torch.fx.Node):
    """Batched product of two activations (attention) or of vectors."""
    return _matmul(ctx, node)


def _matmul(ctx: Ctx, node: torch.fx.Node):
    a, b = node.args[0], node.args[1]
    sa, sb = shape_of(a), shape_of(b)
    la, lb, lo, sizes = _matmul_letters(sa, sb)
    return contract(ctx, node, [(a, ctx.factors(a, len(sa)), la), (b, ctx.factors(b, len(sb)), lb)], lo, sizes)


@register(aten.baddbmm, aten.addbmm)
def baddbmm(ctx: Ctx, node: torch.fx.Node):
    """``c + a @ b`` batched (baddbmm), or summed over the batch too (addbmm: 2-D output)."""
    c, a, b = node.args[0], node.args[1], node.args[2]
    sa, sb = shape_of(a), shape_of(b)
    la, lb, lo, sizes = _matmul_letters(sa, sb)
    lo = lo[len(lo) - len(shape_of(node)):]  # addbmm sums the batch letter away
    out = contract(ctx, node, [(a, ctx.factors(a, len(sa)), la), (b, ctx.factors(b, len(sb)), lb)], lo, sizes)
    return _bias(ctx, node, out, c, len(shape_of(node)))


@register(aten.einsum)
def einsum(ctx: Ctx, node: torch.fx.Node):
    eq = node.args[0].replace(" ", "")
    xs = list(node.args[1])
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    shapes = [shape_of(x) for x in xs]
    used = set(eq)
    pool = [c for c in _LETTERS if c not in used]
    ell_n = max((len(s) - (len(t) - 3) for t, s in zip(terms, shapes) if "..." in t), default=0)
    ell = "".join(pool[:ell_n])
    full_terms = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            n = len(s) - (len(t) - 3)
            t = t.replace("...", ell[ell_n - n:])
        full_terms.append(t)
    if not rhs and "->" not in eq:
        counts = {c: "".join(full_terms).count(c) for c in set("".join(full_terms))}
        rhs = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    rhs = rhs.replace("...", ell)
    sizes: dict[str, int] = {}
    for t, s in zip(full_terms, shapes):
        for c, k in zip(t, s):
            sizes[c] = max(sizes.get(c, 1), int(k))
    ops = [(x, ctx.factors(x, len(s)), t) for x, s, t in zip(xs, shapes, full_terms)]
    return contract(ctx, node, ops, rhs, sizes)


@register(aten._grouped_mm, "transformers::grouped_mm_fallback", facts=("compact",))
def grouped_mm(ctx: Ctx, node: torch.fx.Node):
    """Mixture-of-experts product: x (n, i) times W (experts, i, o), each row of x by the expert
    its offsets give it -> (n, o). The expert index is chosen per token by data, so labels along
    W's expert dim are poisoned; a slice of its i or o dim is that index in every expert."""
    x, w = node.args[0], node.args[1]
    xs, ws = shape_of(x), shape_of(w)
    if len(xs) != 2 or len(ws) != 3:
        from ecospa.ops.base import poison_value

        return poison_value(ctx, node, "grouped product of other than 2-D by 3-D operands")
    fw = []
    for f in ctx.factors(w, 3):
        if f.shape[0] > 1:
            ctx.space.poison(f, f"expert weights chosen per token by a router at {ctx.where(node)}")
        else:
            fw.append(f)
    sizes = {**_sizes("ni", xs), **_sizes("eio", ws)}
    return contract(ctx, node, [(x, ctx.factors(x, 2), "ni"), (w, fw, "eio")], "no", sizes)


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: Ctx, node: torch.fx.Node):
    """``softmax(q @ k^T * scale + mask) @ v``: q·k pairs head dims, v's channels pass through."""
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    masks = [] if mask is None else [(mask, "used as an attention mask")]
    return attention(ctx, node, q, k, v, masks)


def attention(ctx: Ctx, node: torch.fx.Node, q, k, v, masks) -> list:
    """The factors of ``softmax(f(q @ k^T)) @ v`` for ``(B.., H, L, E)`` operands (k and v may have
    fewer heads: grouped queries), where ``f`` sees only the scores: q·k pairs head dims, v's
    channels pass through. ``masks``: ``[(tensor node, how it is used)]``, tensors that enter the
    scores (masks, biases): whatever labels they carry are poisoned."""
    sq, sk, sv = shape_of(q), shape_of(k), shape_of(v)
    nd = len(sq)
    fq, fk, fv = ctx.factors(q, nd), ctx.factors(k, nd), ctx.factors(v, nd)
    if nd >= 3 and sk[-3] != sq[-3] and sk[-3] > 0 and sq[-3] % sk[-3] == 0:  # enable_gqa
        rep = sq[-3] // sk[-3]
        fk = [np.repeat(f, rep, axis=-3) if f.shape[-3] > 1 else f for f in fk]
        fv = [np.repeat(f, rep, axis=-3) if f.shape[-3] > 1 else f for f in fv]
        sk = sk[:-3] + (sq[-3],) + sk[-2:]
        sv = sv[:-3] + (sq[-3],) + sv[-2:]
    for mask, how in masks:
        for f in ctx.factors(mask):
            ctx.space.poison(f, f"{how} at {ctx.where(node)}")
    bl = _fresh(nd - 2, "lsev")
    sizes = {**_sizes(bl + "le", sq), **_sizes(bl + "se", sk)}
    scores = contract(ctx, node, [(q, fq, bl + "le"), (k, fk, bl + "se")], bl + "ls", sizes)
    for f in scores:
        ctx.space.poison(f, f"inside the softmax of attention at {ctx.where(node)}")
    sizes = {**_sizes(bl + "ls", sq[:-1] + (sk[-2],)), **_sizes(bl + "sv", sv)}
    return contract(ctx, node, [(None, [], bl + "ls"), (v, fv, bl + "sv")], bl + "lv", sizes)


# ----------------------------------------------------------------------------- narrow rules
@narrow_rule(aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm, aten.baddbmm, aten.dot,
             aten.einsum, aten._grouped_mm, "transformers::grouped_mm_fallback")
def narrow_contraction(b, node):
    """Products: narrow inputs give the narrow product. A sum over dropped positions must have
    a zero operand there (weights always are)."""
    ins = [a for a in node.all_input_nodes if b.layout(a)]
    if len(ins) >= 2 and sum(not b.zero.get(a, True) for a in ins) >= 2:
        raise NarrowError("a product of two operands whose dropped channels are not zero")
    b.zero[node] = all(b.zero.get(a, True) for a in ins)
    return b.copy(node)


def _last_width(b, x) -> int:
    nar = b.layout(x).get(len(b.shape(x)) - 1)
    return int(b.shape(x)[-1]) if nar is None else nar.width


@narrow_rule(aten.scaled_dot_product_attention)
def narrow_sdpa(b, node):
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


no_narrow_rule(aten.addbmm, reason="addbmm sums its batch of products: not rewritten narrow")
