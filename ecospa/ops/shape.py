"""Rules for layout ops: views and reshapes, permutations, slicing, splitting and joining.

These never mix channels; they only move them. A reshape that splits a channel dimension into
(heads, head_dim) turns a factor of shape (1, 1, C) into (1, 1, H, D); one that merges a
label-free dimension into a labelled one (GQA's expand + reshape) materialises the repetition.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ecospa.ir.labels import merge_aligned, to_ndim, varying
from ecospa.ir.narrowing import Narrowing, same_layout
from ecospa.ops.base import Ctx, all_zero, concrete, narrow_copy, returned_input, shape_of
from ecospa.ops.registry import NarrowError, narrow_rule, no_narrow_rule, op_name, register

aten = torch.ops.aten

__all__ = ["reshape_factor", "reshape_blocks", "dense_to_narrow", "select_positions"]


def reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Group dims of shapes ``a`` and ``b`` (equal numel) into blocks of equal size, in order."""
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        bi, bj = [i], [j]
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                bi.append(i)
                pa *= a[i]
                i += 1
            else:
                bj.append(j)
                pb *= b[j]
                j += 1
        blocks.append((bi, bj))
    if not blocks:
        blocks.append(([], []))
    blocks[-1][0].extend(range(i, len(a)))
    blocks[-1][1].extend(range(j, len(b)))
    return blocks


def reshape_factor(f: np.ndarray, a: tuple[int, ...], b: tuple[int, ...]) -> np.ndarray:
    """Reshape factor ``f`` of a tensor of shape ``a`` into the factor for shape ``b``."""
    f = to_ndim(f, len(a))
    blocks = reshape_blocks(a, b)
    full = list(f.shape)
    target: list[int] = []
    for bi, bj in blocks:
        if any(f.shape[d] > 1 for d in bi):
            for d in bi:
                full[d] = a[d]
            target += [b[d] for d in bj]
        else:
            target += [1] * len(bj)
    g = np.broadcast_to(f, full)
    return np.ascontiguousarray(g).reshape(target)


def _reshape(ctx: Ctx, node, src):
    a, b = shape_of(src), shape_of(node)
    if a is None or b is None:
        return None
    return [reshape_factor(f, a, b) for f in ctx.factors(src, len(a))]


@register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_as,
          aten.squeeze, aten.unsqueeze, aten._reshape_alias, facts=("layout", "transparent", "passive"))
def reshape(ctx: Ctx, node: torch.fx.Node):
    """Any op that keeps the element order and changes the shape."""
    return _reshape(ctx, node, node.args[0])


@register(aten.permute, facts=("layout", "transparent", "transposing", "passive"))
def permute(ctx: Ctx, node: torch.fx.Node):
    x, dims = node.args[0], node.args[1]
    nd = len(shape_of(x))
    perm = [d % nd for d in dims]
    return [np.transpose(f, perm) for f in ctx.factors(x, nd)]


@register(aten.transpose, facts=("layout", "transparent", "transposing", "passive"))
def transpose(ctx: Ctx, node: torch.fx.Node):
    x = node.args[0]
    nd = len(shape_of(x))
    d0, d1 = node.args[1] % nd, node.args[2] % nd
    return [np.swapaxes(f, d0, d1) for f in ctx.factors(x, nd)]


@register(aten.swapaxes, aten.swapdims, facts=("layout", "transparent", "transposing", "passive"))
def swapaxes(ctx: Ctx, node: torch.fx.Node):
    """``swapaxes`` / ``swapdims``: ``transpose`` under other names."""
    return transpose(ctx, node)


@register(aten.t, aten.numpy_T, facts=("layout", "transparent", "transposing", "passive"))
def t(ctx: Ctx, node: torch.fx.Node):
    """``t`` (at most 2-D) and ``numpy_T`` (``x.T``: every dim reversed, also beyond 2-D)."""
    x = node.args[0]
    nd = len(shape_of(x))
    return [np.transpose(f) if nd >= 2 else f for f in ctx.factors(x, nd)]


@register(aten.mT, aten.mH, aten.adjoint, aten.matrix_H, facts=("layout", "transparent", "transposing", "passive"))
def matrix_transpose(ctx: Ctx, node: torch.fx.Node):
    """``x.mT`` (and ``mH`` / ``adjoint`` / ``matrix_H``: conjugated, which moves no channel):
    the last two dims swapped (litgpt's soft-capped attention writes ``q @ k.mT``)."""
    x = node.args[0]
    nd = len(shape_of(x))
    return [np.swapaxes(f, -2, -1) for f in ctx.factors(x, nd)]


@register(aten.movedim, aten.moveaxis, facts=("layout", "transparent", "transposing", "passive"))
def movedim(ctx: Ctx, node: torch.fx.Node):
    """``movedim(x, source, destination)`` (an int or a list of ints each)."""
    x, src, dst = node.args[0], node.args[1], node.args[2]
    nd = len(shape_of(x))
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    return [np.moveaxis(f, src, dst) for f in ctx.factors(x, nd)]


@register(aten.view_as_complex, facts=("layout",))
def view_as_complex(ctx: Ctx, node: torch.fx.Node):
    """``(..., n, 2)`` real -> ``(..., n)`` complex (Meta's Llama and torchtitan rotary): the two
    channels of a pair become one complex position, so they are joined (one unit, as the
    interleaved real rotary makes them) and the position carries the label of the pair."""
    x = node.args[0]
    nd = len(shape_of(x))
    out = []
    for f in ctx.factors(x, nd):
        if f.shape[-1] == 1:
            out.append(f[..., 0])
            continue
        re, im = f[..., 0], f[..., 1]
        ctx.space.edge(re, im)
        out.append(np.where(re >= 0, re, im))
    return out


@register(aten.view_as_real, facts=("layout",))
def view_as_real(ctx: Ctx, node: torch.fx.Node):
    """``(..., n)`` complex -> ``(..., n, 2)`` real: both parts carry the label of the position
    (its pair's unit; see :func:`view_as_complex`)."""
    x = node.args[0]
    nd = len(shape_of(x))
    return [f[..., None] for f in ctx.factors(x, nd)]


@register(aten.expand, aten.expand_as, aten.broadcast_to, facts=("layout", "transparent", "passive"))
def expand(ctx: Ctx, node: torch.fx.Node):
    """Expanding only repeats size-1 dims, along which factors do not vary."""
    nd = len(shape_of(node))
    return ctx.factors(node.args[0], nd)


def _slice_factor(f: np.ndarray, dim: int, sl) -> np.ndarray:
    if f.shape[dim] == 1:
        return f
    idx = [slice(None)] * f.ndim
    idx[dim] = sl
    return f[tuple(idx)]


@register(aten.slice, facts=("layout",))
def slice_(ctx: Ctx, node: torch.fx.Node):
    x = node.args[0]
    shape = shape_of(x)
    nd = len(shape)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
    end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    start, end, step = slice(concrete(start), concrete(end), concrete(step)).indices(shape[dim])
    return _nonempty([_slice_factor(f, dim, slice(start, end, step)) for f in ctx.factors(x, nd)])


def _nonempty(fs: list[np.ndarray]) -> list[np.ndarray]:
    """An empty tensor (``q[..., 16:]`` of a 16-wide head: Phi-3's rotary pass-through) carries
    no labels."""
    return [f for f in fs if f.size]


@register(aten.select, facts=("layout",))
def select(ctx: Ctx, node: torch.fx.Node):
    x, dim, index = node.args[0], node.args[1], concrete(node.args[2])
    nd = len(shape_of(x))
    dim %= nd
    out = []
    for f in ctx.factors(x, nd):
        g = f if f.shape[dim] == 1 else np.take(f, [index % f.shape[dim]], axis=dim)
        out.append(np.squeeze(g, axis=dim))
    return out


def _split_sizes(total: int, size_or_sizes, kind: str) -> list[int]:
    if kind == "chunk":
        n = size_or_sizes
        step = -(-total // n)
        return [min(step, total - i) for i in range(0, total, step)]
    if isinstance(size_or_sizes, int):
        return [min(size_or_sizes, total - i) for i in range(0, total, size_or_sizes)]
    return list(size_or_sizes)


def _split(ctx: Ctx, node: torch.fx.Node, kind: str):
    x = node.args[0]
    shape = shape_of(x)
    nd = len(shape)
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
    sizes_arg = node.args[1]
    sizes_arg = [concrete(a) for a in sizes_arg] if isinstance(sizes_arg, (list, tuple)) else concrete(sizes_arg)
    sizes = _split_sizes(shape[dim], sizes_arg, kind)
    fs = ctx.factors(x, nd)
    outs, start = [], 0
    for s in sizes:
        outs.append(_nonempty([_slice_factor(f, dim, slice(start, start + s)) for f in fs]))
        start += s
    return tuple(outs)


@register(aten.split, aten.split_with_sizes, facts=("layout",))
def split(ctx: Ctx, node: torch.fx.Node):
    return _split(ctx, node, "split")


@register(aten.chunk, facts=("layout",))
def chunk(ctx: Ctx, node: torch.fx.Node):
    return _split(ctx, node, "chunk")


@register(aten.unbind, facts=("layout",))
def unbind(ctx: Ctx, node: torch.fx.Node):
    x = node.args[0]
    shape = shape_of(x)
    nd = len(shape)
    dim = (node.args[1] if len(node.args) > 1 else 0) % nd
    fs = ctx.factors(x, nd)
    outs = []
    for i in range(shape[dim]):
        outs.append([np.squeeze(f if f.shape[dim] == 1 else np.take(f, [i], axis=dim), axis=dim)
                     for f in fs])
    return tuple(outs)


@register(operator.getitem, facts=("layout",))
def getitem(ctx: Ctx, node: torch.fx.Node):
    v = ctx.value(node.args[0])
    if isinstance(v, tuple):
        return v[node.args[1]]
    return [] if shape_of(node) is not None else None


@register(aten.cat, aten.concat, aten.concatenate, facts=("layout",))
def cat(ctx: Ctx, node: torch.fx.Node):
    """Join along ``dim``. Factors that vary along ``dim`` are laid side by side (-1 where an
    input has none). Factors that do not are the same channels on every input (a class token
    prepended along the sequence, a zero row appended to a weight): they are merged, and a
    label-free input simply takes them, which adds no constraint."""
    xs = list(node.args[0])
    nd = len(shape_of(node))
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
    shapes = [shape_of(x) for x in xs]
    slots: dict[frozenset, list] = {}
    across: list[np.ndarray] = []
    for i, x in enumerate(xs):
        if shapes[i] is not None and 0 in shapes[i]:
            continue  # an empty piece adds no positions
        for f in ctx.factors(x, nd):
            if f.shape[dim] > 1:
                key = frozenset(varying(f)) - {dim}
                per = slots.setdefault(key, [None] * len(xs))
                per[i] = f if per[i] is None else merge_aligned(ctx.space, [per[i], f], ctx.where(node))[0]
            else:
                across.append(f)
    out = merge_aligned(ctx.space, across, ctx.where(node)) if across else []
    for key, per in slots.items():
        dims = key | {dim}
        pieces = []
        for i, f in enumerate(per):
            shape = [shapes[i][d] if d in dims else 1 for d in range(nd)]
            pieces.append(np.full(shape, -1, dtype=np.int64) if f is None else np.broadcast_to(f, shape))
        out.append(np.concatenate(pieces, axis=dim))
    return out


@register(aten.stack, facts=("layout",))
def stack(ctx: Ctx, node: torch.fx.Node):
    xs = list(node.args[0])
    nd = len(shape_of(node))
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
    pieces = []
    allf = [ctx.factors(x, nd - 1) for x in xs]
    if not any(allf):
        return []
    dims = sorted(set(d + (d >= dim) for fs in allf for f in fs for d in varying(f)))
    base = shape_of(xs[0])
    for fs in allf:
        shape = [1] * nd
        for d in dims:
            shape[d] = base[d - (d > dim)] if d != dim else 1
        piece = np.full(shape, -1, dtype=np.int64)
        for f in fs:
            piece = np.where(piece >= 0, piece, np.broadcast_to(np.expand_dims(f, dim), shape))
        pieces.append(piece)
    return [np.concatenate(pieces, axis=dim)]


@register(aten.repeat_interleave, facts=("layout",))
def repeat_interleave(ctx: Ctx, node: torch.fx.Node):
    """Each position along ``dim`` repeated ``repeats`` times (GQA's ``repeat_kv``)."""
    x = node.args[0]
    reps = concrete(node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats"))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(x, torch.fx.Node) or not isinstance(reps, int) or dim is None:
        from ecospa.ops.base import poison_value

        return poison_value(ctx, node, "repeat_interleave with tensor repeats or no dim")
    nd = len(shape_of(x))
    dim %= nd
    return [np.repeat(f, reps, axis=dim) if f.shape[dim] > 1 else f for f in ctx.factors(x, nd)]


@register(aten.repeat, aten.tile, facts=("layout",))
def repeat(ctx: Ctx, node: torch.fx.Node):
    """Tile the tensor: labels repeat along the tiled dims."""
    x, reps = node.args[0], [concrete(r) for r in node.args[1]]
    nd = len(shape_of(node))
    reps = [1] * (nd - len(reps)) + reps
    out = []
    for f in ctx.factors(x, nd):
        out.append(np.tile(f, [r if f.shape[d] > 1 else 1 for d, r in enumerate(reps)]))
    return out


# ----------------------------------------------------------------------------- narrow rules
narrow_rule(aten.permute, aten.transpose, aten.swapaxes, aten.swapdims, aten.t, aten.numpy_T, aten.mT, aten.mH,
            aten.adjoint, aten.matrix_H, aten.movedim, aten.moveaxis, aten.concatenate, aten.view_as, aten.expand_as,
            aten.unsqueeze, aten.squeeze, aten.flatten, aten.stack, aten.repeat_interleave,
            aten.repeat, operator.getitem)(narrow_copy)


def _no_elements(b, x) -> bool:
    """True when the narrow value of ``x`` keeps no position along some dim (every channel it
    carries was removed)."""
    lay = b.layout(x) if isinstance(x, torch.fx.Node) else None
    return isinstance(lay, dict) and any(n.width == 0 for n in lay.values())


def _empty_piece(node: torch.fx.Node, x, dim: int) -> bool:
    """True when operand ``x`` of the join ``node`` has no elements in the dense graph itself
    (``q[..., rope_n_elem:]`` where the rotary part is the whole head, as litgpt joins it back)
    and the join's dtype is its own: leaving it out changes neither values nor dtype."""
    val, out = (x.meta.get("val") if isinstance(x, torch.fx.Node) else None), node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(out, torch.Tensor) or val.dtype != out.dtype:
        return False
    return val.dim() == out.dim() and isinstance(val.shape[dim], int) and val.shape[dim] == 0


# ops that read a tensor's metadata only (export's dtype/device assertions, sizes)
_METADATA_ONLY = (aten._assert_tensor_metadata.default, aten.sym_size.int)


def _sole_fresh_use(node: torch.fx.Node, x) -> bool:
    """True when ``x`` is a tensor an op made afresh (its schema returns no alias of an input),
    not written in place, that only ``node`` reads (through ops that return their input itself,
    ``ops.base.returned_input``, read by nothing else but metadata checks): the join's copy of
    it cannot be told apart from it."""
    user = node
    while isinstance(x, torch.fx.Node) and x.op == "call_function" \
            and [u for u in x.users if u.target not in _METADATA_ONLY] == [user]:
        src = returned_input(x)
        if src is not None:
            user, x = x, src
            continue
        schema = getattr(x.target, "_schema", None)
        return (schema is not None and not schema.is_mutable and len(schema.returns) == 1
                and schema.returns[0].alias_info is None)
    return False


@narrow_rule(aten.cat, aten.concat)
def narrow_cat(b, node):
    """Join along ``dim``. An operand that keeps no position (all its channels removed, its layout
    possibly along another dim than the join's, as the rotary part of GPT-J's heads whose rotary
    pairs all went) adds nothing to the join and is left out. Where the output is narrowed along
    other dims only, an operand that is not narrowed there (a KV cache's past keys, a graph input
    of the call at its dense width, joined with the narrow new keys along the sequence) is gathered
    at the output's positions; its dropped positions are not known to be zero (an output that
    returns them is rebuilt at the dense width from the dense operands, ``Builder.dense``).
    Operands narrowed along the join dim itself (the pieces of a fused projection) are joined as
    they are."""
    xs = list(node.args[0])
    out = b.layout(node)
    nd = len(b.shape(node))
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
    keep = [x for x in xs if not _no_elements(b, x) and not _empty_piece(node, x, dim)]
    if keep and len(keep) < len(xs):
        xs = keep
    if len(xs) == 1 and _sole_fresh_use(node, xs[0]) and same_layout(b.layout(xs[0]), out, selectors=True):
        b.zero[node] = b.zero.get(xs[0], True)  # a join of one fresh tensor nothing else reads: that tensor
        return b.env[xs[0]]
    if not out or dim in out:
        if len(xs) == len(node.args[0]):
            return narrow_copy(b, node)
        b.zero[node] = all(b.zero.get(x, True) for x in xs if isinstance(x, torch.fx.Node))
        return b.copy(node, args=(xs, *node.args[1:]))
    pieces, zero = [], True
    for x in xs:
        own = b.layout(x)
        for d, nar in out.items():
            if d in own and not own[d].same(nar):
                raise NarrowError(f"operands of cat narrowed differently along dim {d}")
        if set(own) == set(out):
            pieces.append(b.env[x])
            zero = zero and b.zero.get(x, True)
        elif own:
            raise NarrowError("an operand of cat narrowed along some of the output's narrowed dims only")
        else:
            buffer = _buffer_behind(b, x)
            if buffer is not None:
                raise NarrowError(f"cat of the module buffer {buffer!r} at its dense width with narrowed channels "
                                  "(a cache grown by cat and assigned back, which a graph run would not write back)")
            pieces.append(b.align_operand(x, out, nd))
            zero = False
    b.zero[node] = zero
    return b.emit(node, (pieces, dim), {}, mapped=True)


def _buffer_behind(b, x) -> str | None:
    """The name of the module buffer ``x`` is (or is a view, slice or copy of: one tensor input
    all the way up), or None."""
    kinds = _placeholder_kinds(b.program)
    while isinstance(x, torch.fx.Node):
        if x.op == "placeholder":
            kind = kinds.get(x) or ("",)
            if kind[0] == "buffer":
                return kind[1]
            return kind[3] if kind[0] == "held" and kind[1] == "_buffers" else None
        inputs = [a for a in x.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if len(inputs) != 1:
            return None
        x = inputs[0]
    return None


def _placeholder_kinds(program) -> dict:
    """``{placeholder: kind}`` of a captured program (``Program.kinds``)."""
    return dict(zip((n for n in program.graph.nodes if n.op == "placeholder"), program.kinds))


_SIZE_ARITHMETIC = {operator.floordiv: operator.floordiv, operator.mul: operator.mul, operator.add: operator.add,
                    operator.sub: operator.sub, operator.mod: operator.mod}


def _size_values(b, size) -> tuple[int, int] | None:
    """``(dense value, narrow value)`` of a symbolic size: an integer, ``sym_size(x, d)`` of a
    tensor (narrowed along ``d`` or of a static size there), or integer arithmetic of those; None
    when it depends on anything else (a dynamic dim: the call's batch or length)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if not isinstance(size, torch.fx.Node) or size.op != "call_function":
        return None
    if op_name(size.target) == "sym_size" and len(size.args) >= 2:
        x, d = size.args[0], size.args[1]
        shape = b.shape(x) if isinstance(x, torch.fx.Node) else None
        if shape is None or not isinstance(d, int):
            return None
        d %= len(shape)
        have = b.layout(x).get(d)
        if have is not None:
            return have.size, have.width
        dense = shape[d]
        return (dense, dense) if isinstance(dense, int) else None
    fn = _SIZE_ARITHMETIC.get(size.target)
    if fn is None or len(size.args) != 2:
        return None
    left, right = (_size_values(b, a) for a in size.args)
    if left is None or right is None or (fn in (operator.floordiv, operator.mod) and 0 in (right[0], right[1])):
        return None
    return fn(left[0], right[0]), fn(left[1], right[1])


def _narrow_size_of(b, size: torch.fx.Node, nar: Narrowing) -> bool:
    """True when the symbolic ``size``, computed in the narrow graph from narrow tensors, is
    ``nar``'s width: ``sym_size(x, d)`` of a tensor ``x`` narrowed along ``d`` alike (a rotary
    table gathered at the kept channels), or integer arithmetic of such sizes (``d // 2`` of an
    interleaved rotary's pairs) whose dense value is the dense size and whose narrow value is the
    narrow width."""
    values = _size_values(b, size)
    return values is not None and values == (nar.size, nar.width)


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
    b.zero[node] = all_zero(b, node)
    return b.copy(node, args=tuple(args))


@narrow_rule(aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten._reshape_alias, aten.broadcast_to)
def narrow_view(b, node):
    return _sized(b, node, 1)


@narrow_rule(aten.unflatten)
def narrow_unflatten(b, node):
    nd = len(b.shape(node.args[0]))
    return _sized(b, node, 2, offset=node.args[1] % nd)


def _rows(index: np.ndarray) -> np.ndarray:
    """``index`` (..., k) as rows ``(n, k)``, also when ``k`` is 0."""
    return index.reshape(int(np.prod(index.shape[:-1], dtype=np.int64)), index.shape[-1])


def dense_to_narrow(nin: Narrowing, dense: np.ndarray) -> np.ndarray:
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


def select_positions(b, node, x, dim: int, positions: np.ndarray):
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
def narrow_slice(b, node):
    x = node.args[0]
    nd = len(b.shape(x))
    dim = (node.args[1] if len(node.args) > 1 else 0) % nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return narrow_copy(b, node)
    size = nin.size
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    start, end, step = slice(concrete(start), concrete(end), concrete(step)).indices(size)
    out_layout = b.layout(node)
    if any(n.width == 0 for n in out_layout.values()):
        return _empty_slice(b, node, x, dim, len(range(start, end, step)))
    nout = out_layout.get(dim)
    out_pos = nout.index if nout is not None else np.arange(len(range(start, end, step)))
    b.zero[node] = b.zero.get(x, True)
    return select_positions(b, node, x, dim, dense_to_narrow(nin, start + out_pos * step))


def _empty_slice(b, node, x, dim: int, length: int):
    """A slice that keeps no position along some dim of its output (it reads only removed
    channels: the rotary part of a head whose rotary pairs all went, say, laid out along the head
    dim): the narrow value has no elements, so it is a zero-size tensor of the narrow shape,
    whatever positions of ``x`` the slice read."""
    out, xin = b.layout(node), b.layout(x)
    sizes = []
    for i in range(len(b.shape(node))):
        if i in out:
            sizes.append(out[i].width)
        elif i == dim:
            sizes.append(length)
        elif i in xin:
            sizes.append(xin[i].size)
        else:
            sizes.append(b.call(aten.sym_size.int, (b.arg(x), i)))
    b.zero[node] = True
    return b.call(aten.new_zeros.default, (b.arg(x), sizes))


@narrow_rule(aten.select)
def narrow_select(b, node):
    x, dim, index = node.args[0], node.args[1], concrete(node.args[2])
    nd = len(b.shape(x))
    dim %= nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return narrow_copy(b, node)
    pos = dense_to_narrow(nin, np.array([index % nin.size]))
    if not (pos == pos.reshape(-1)[0]).all():
        raise NarrowError("select of a channel at different narrow positions per head")
    b.zero[node] = b.zero.get(x, True)
    return b.call(aten.select.int, (b.arg(x), dim, int(pos.reshape(-1)[0])))


@narrow_rule(aten.split, aten.split_with_sizes, aten.chunk)
def narrow_split(b, node):
    x = node.args[0]
    nd = len(b.shape(x))
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % nd
    nin = b.layout(x).get(dim)
    if nin is None:
        return narrow_copy(b, node)
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
def narrow_unbind(b, node):
    """Unbinding a dim that is not narrowed (q, k, v of a stacked qkv) is a copy."""
    x = node.args[0]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(b.shape(x))
    if dim in b.layout(x):
        raise NarrowError("unbind along narrowed channels")
    return narrow_copy(b, node)


@narrow_rule(aten.view_as_complex, aten.view_as_real)
def narrow_complex(b, node):
    """The complex views keep whole pairs (one unit each): narrowed along the complex positions,
    never inside a pair."""
    pair = node.args[0] if op_name(node.target) == "view_as_complex" else node
    if len(b.shape(pair)) - 1 in b.layout(pair):
        raise NarrowError(f"{op_name(node.target)} of a pair dim narrowed inside its pairs")
    return narrow_copy(b, node)


no_narrow_rule(aten.tile, reason="tile of narrowed channels: not rewritten narrow")
