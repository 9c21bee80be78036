"""Which positions of every tensor of a captured module call survive pruning.

The channel labels of the call's graph (``ecospa.analysis.flow``) say which parameter slice sits at
each position of each tensor. A position is *retained* when its unit is kept; the narrow graph
computes only retained positions. Tensors whose channels are batched in blocks (the heads of
``view(B, T, H, D)``) need the same number of retained positions in every block (every head):
when Eq. 9 leaves heads ragged, some removed units are retained as *padding*: whole units, so
rotary pairs stay pairs, computed as zeros (the narrow graph reads zero slices for them). Padded
blocks are rounded up to ``pad_multiple`` positions (fast GEMM widths), never beyond the dense
width. Only tensors laid out in blocks need the padding: flat tensors (a projection's output
before its head view, the weights) keep exactly the kept positions, and ``Layout.padded`` gives
their padded layout for the views that cross over. A block (head) whose units were all removed is left out instead of padded, when every
tensor of the call loses the same heads (``_droppable``): its tensors are narrowed along the head
dim too, and the channel positions are then chosen per kept head.

Per node, a :class:`Narrowing` per narrowed dimension: the dense positions kept along it, for
every position of the dimensions the choice varies along (its *selectors*: a head index, say).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from ecospa.capture.export import Captured, module_of
from ecospa.analysis.flow import FlowResult, propagate
from ecospa.ir.labels import to_ndim, varying
from ecospa.ir.narrowing import Narrowing, same_layout

__all__ = ["Narrowing", "Layout", "analyse", "blocked_factors", "channel_dim", "factor_rows", "kept_labels",
           "part_dims", "same_layout"]


NodeLayout = dict  # dim -> Narrowing, for a tensor value; a tuple of them for several outputs


@dataclass
class Layout:
    """The result of :func:`analyse`.

    Attributes:
        nodes: per graph node, its :data:`NodeLayout` (``{}``: nothing narrowed; None: not a
            tensor; a tuple for ops returning several tensors).
        retained: per parameter (relative name) and dim, the dense indices the narrow graph
            computes (kept units plus padding), for every dim the removal record slices.
        flow: the labelled graph.
        problem: why this call cannot run narrow (None when it can).
        dropped: whole blocks (heads) are left out.
        padded: for the flat tensors (no head blocks) that run at their exact kept widths while
            the head-blocked tensors they are viewed into (or from) carry padding units: their
            layout with the padding, which the views between the two convert to and from.
        blocked: the tensor nodes laid out in heads (always with the padding).
    """

    nodes: dict[torch.fx.Node, object]
    retained: dict[str, dict[int, np.ndarray]]
    flow: FlowResult
    problem: str | None = None
    dropped: bool = False  # some whole blocks (heads) are left out
    padded: dict[torch.fx.Node, object] = field(default_factory=dict)
    blocked: frozenset = frozenset()  # the nodes whose channels are laid out in heads


def factor_rows(f: np.ndarray, n: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(rows x positions along dim n, selector dims)`` of a factor varying along several dims:
    one row per position of its other varying dims (the selectors)."""
    vd = varying(f)
    sel = tuple(d for d in vd if d != n)
    g = np.moveaxis(f.reshape([f.shape[d] for d in vd]), vd.index(n), -1)  # drop size-1 dims
    return g.reshape(-1, f.shape[n]), sel


def _keep(rows: np.ndarray, comp: np.ndarray, retained: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(component per position (-1: none), retained mask)`` of label rows."""
    c = np.where(rows >= 0, comp[np.maximum(rows, 0)], -1)
    return c, (c < 0) | retained[np.maximum(c, 0)]


def channel_dim(f: np.ndarray, comp: np.ndarray) -> int:
    """The dim of ``f`` to narrow: its last varying dim along which the units change (a head's
    channels). Dims along which a row stays inside one unit (the two halves of a rotary pair
    stacked on a new dim) hold parts of a unit, not channels; the heads come before."""
    vd = varying(f)
    for n in reversed(vd):
        rows = factor_rows(f, n)[0]
        c = np.where(rows >= 0, comp[np.maximum(rows, 0)], -1)
        if (c[:, 1:] != c[:, :-1]).any():
            return n
    return vd[-1]


def blocked_factors(flow: FlowResult) -> list[np.ndarray]:
    """The label factors of every tensor of ``flow`` laid out in blocks: those varying along two
    or more dims (heads x channels), whose blocks need equal retained widths."""
    out = []
    for node in flow.nodes:
        v = flow.values.get(node)
        for fs in (v if isinstance(v, tuple) else (v,)):
            if isinstance(fs, list):
                out += [f for f in fs if len(varying(f)) >= 2]
    return out


def _pad(blocked: list[np.ndarray], comp: np.ndarray, retained: np.ndarray, multiple: int,
         drop: bool = False) -> None:
    """Retain removed units until every block row has the same number of retained positions.
    With ``drop``, rows left with no retained position (a head whose units all went) stay empty:
    the narrow graph leaves the whole block out (see :func:`_droppable`)."""
    changed = True
    while changed:
        changed = False
        for f in blocked:
            n = channel_dim(f, comp)
            rows, sel = factor_rows(f, n)  # ragged heads: pad each head's channels to the same width
            c, mask = _keep(rows, comp, retained)
            counts = mask.sum(1)
            live = counts > 0 if drop else np.ones(len(counts), dtype=bool)
            if not live.any() or counts[live].min() == counts[live].max():
                continue
            width = min(rows.shape[1], -(-int(counts[live].max()) // multiple) * multiple)
            for r in np.nonzero(live & (counts < width))[0]:
                for pos in np.nonzero(~mask[r])[0]:
                    if mask[r].sum() >= width:
                        break
                    retained[c[r, pos]] = True
                    mask[r] = (c[r] < 0) | retained[np.maximum(c[r], 0)]
                changed = True


def part_dims(f: np.ndarray, comp: np.ndarray, sel) -> set[int]:
    """The selector dims of ``f`` along which the units do not change: parts of one unit (the two
    halves of a rotary pair stacked on a dim), not blocks."""
    c = np.where(f >= 0, comp[np.maximum(f, 0)], -1)
    return {d for d in sel if (c == c.take([0], axis=d)).all()}


def _empty_blocks(f: np.ndarray, comp: np.ndarray, retained: np.ndarray):
    """Where a blocked factor lost whole blocks: ``(selector dims, head dim or None, empty head
    positions)``; None when its empty rows are not whole positions of one selector dim."""
    rows, sel = factor_rows(f, channel_dim(f, comp))
    empty = (_keep(rows, comp, retained)[1].sum(1) == 0).reshape([f.shape[d] for d in sel])
    if not empty.any():
        return sel, None, frozenset()
    for i, d in enumerate(sel):
        other = tuple(j for j in range(len(sel)) if j != i)
        red = empty.all(axis=other) if other else empty
        if np.array_equal(np.broadcast_to(np.expand_dims(red, other) if other else red, empty.shape), empty):
            return sel, d, frozenset(np.nonzero(red)[0].tolist())
    return None


def _droppable(blocked: list[np.ndarray], comp: np.ndarray, retained: np.ndarray) -> bool:
    """True when whole blocks can be left out safely: every blocked factor that loses blocks
    loses whole positions of one selector dim (the heads), and every selector dim of the same
    size, in every factor, loses the same positions (tensors combined along the head axis stay
    aligned: a head goes from q, k, v and the output together, or not at all)."""
    seen: dict[int, frozenset] = {}
    for f in blocked:
        e = _empty_blocks(f, comp, retained)
        if e is None:
            return False
        sel, head, gone = e
        if head is not None and len(gone) == f.shape[head]:
            return False  # every block of a tensor gone: nothing left to attend with
        parts = part_dims(f, comp, sel)
        for d in sel:
            if d != head and d in parts:
                continue  # parts of one unit (the halves of a rotary pair), not blocks
            if seen.setdefault(f.shape[d], gone if d == head else frozenset()) != (gone if d == head else frozenset()):
                return False
    return any(seen.values())


def _narrowing(f: np.ndarray, comp: np.ndarray, retained: np.ndarray) -> list[Narrowing] | str:
    """The narrowings of one factor that loses positions: its channels, and its blocks (heads)
    when whole blocks lost every position (then the channel index is per kept block)."""
    vd = varying(f)
    n = channel_dim(f, comp)
    rows, sel = factor_rows(f, n)
    m = _keep(rows, comp, retained)[1]
    if len(vd) == 1:
        return [Narrowing(n, f.shape[n], np.nonzero(m.reshape(-1))[0])]
    counts = m.sum(1)
    if not counts.all() and counts.any():  # whole blocks left out (``_droppable`` checked it)
        e = _empty_blocks(f, comp, retained)
        if e is None or e[1] is None:
            return "blocks of unequal widths"
        head = e[1]
        i = sel.index(head)
        shape = [f.shape[d] for d in sel]
        kept_heads = np.array(sorted(set(range(f.shape[head])) - e[2]))
        out = [Narrowing(head, f.shape[head], kept_heads)]
        m = np.take(m.reshape(shape + [m.shape[1]]), kept_heads, axis=i)
        shape[i] = kept_heads.size
        m = m.reshape(-1, m.shape[-1])
        counts = m.sum(1)
        if counts.min() != counts.max():
            return "blocks of unequal widths"
        if counts[0] == m.shape[1]:
            return out
        idx = np.nonzero(m)[1].reshape(m.shape[0], int(counts[0]))
        out.append(Narrowing(n, f.shape[n], idx[0]) if (idx == idx[:1]).all()
                   else Narrowing(n, f.shape[n], idx.reshape(shape + [idx.shape[1]]), sel))
        return out
    if counts.min() != counts.max():
        return "blocks of unequal widths"
    idx = np.nonzero(m)[1].reshape(rows.shape[0], int(m[0].sum()))
    if (idx == idx[:1]).all():
        return [Narrowing(n, f.shape[n], idx[0])]
    return [Narrowing(n, f.shape[n], idx.reshape([f.shape[d] for d in sel] + [idx.shape[1]]), sel)]


def _node_layout(fs: list, ndim: int, comp: np.ndarray, retained: np.ndarray) -> NodeLayout | str:
    out: dict[int, Narrowing] = {}
    for f in fs:
        f = to_ndim(f, ndim)
        c = np.where(f >= 0, comp[np.maximum(f, 0)], -1)
        keep = (c < 0) | retained[np.maximum(c, 0)]
        if keep.all():
            continue
        nars = _narrowing(f, comp, retained)
        if isinstance(nars, str):
            return nars
        for nar in nars:
            old = out.get(nar.dim)
            if old is not None and not old.same(nar):
                return f"two sets of channels narrowed along dim {nar.dim}"
            out[nar.dim] = nar
    return out


def kept_labels(space, kept: Mapping[str, Mapping[int, np.ndarray]]) -> np.ndarray:
    """Per label of ``space``: True unless the removal record ``kept`` dropped its slice."""
    keep = np.ones(space.n, dtype=bool)
    for i, (name, dim) in enumerate(space.pd_names):
        k = kept.get(name, {}).get(dim)
        if k is not None:
            lab = np.zeros(space.pd_size[i], dtype=bool)
            lab[k] = True
            keep[space.pd_start[i]: space.pd_start[i] + space.pd_size[i]] = lab
    return keep


def _input_labels(space) -> np.ndarray:
    """Per label of ``space``: True for the labels of the call's inputs (``<input ...>``)."""
    out = np.zeros(space.n, dtype=bool)
    for i, (name, _) in enumerate(space.pd_names):
        if name.startswith("<"):
            out[space.pd_start[i]: space.pd_start[i] + space.pd_size[i]] = True
    return out


def _is_blocked(fs) -> bool:
    return any(len(varying(f)) >= 2 for f in fs)


def analyse(captured: Captured, kept: Mapping[str, Mapping[int, np.ndarray]], *,
            pad_multiple: int = 8, drop_blocks: bool = True, exact_flat: bool = True,
            flow: FlowResult | None = None) -> Layout:
    """Narrow layout of a captured call.

    Args:
        captured: the call's graph, parameters named relative to the module.
        kept: per parameter (relative name) and sliced dim, the kept dense indices (the removal
            record).
        pad_multiple: padded blocks are rounded up to a multiple of this many positions.
        drop_blocks: leave out whole blocks (heads) whose units were all removed, where that is
            safe (:func:`_droppable`); otherwise they are padded like any narrower head.
        exact_flat: tensors without head blocks (projection inputs and outputs, parameters)
            keep only the kept units, the padding of ragged heads lives in the head-blocked
            tensors alone (``Layout.padded``): the projections run at the exact kept widths.
            False: every tensor carries the padding (the weights are padded with zero slices).
        flow: ``propagate(captured)`` when the caller has it (it depends on the graph only).
    """
    flow = flow if flow is not None else propagate(captured)
    space = flow.space
    ncomp, comp = space.components()
    keep_label = kept_labels(space, kept)
    # the call's inputs carry labels too (``<input ...>``: never sliced); one that meets removed
    # channels at the same positions (a rotary table times a single k head, MQA) follows them:
    # the narrow graph gathers it at the retained positions (``rewrite``)
    param = ~_input_labels(space)
    has_param = np.zeros(ncomp, dtype=bool)
    has_param[comp[param]] = True
    all_kept = np.ones(ncomp, dtype=bool)
    any_kept = ~has_param
    np.logical_and.at(all_kept, comp[param], keep_label[param])
    np.logical_or.at(any_kept, comp[param], keep_label[param])
    mixed = np.nonzero(all_kept != any_kept)[0]
    if mixed.size:
        lab = int(np.nonzero(comp == mixed[0])[0][0])
        pd = int(np.searchsorted(space.pd_start, lab, side="right") - 1)
        return Layout({}, {}, flow, f"a unit of {space.pd_names[pd][0]} is only partly removed")
    blocked = blocked_factors(flow)
    retained = all_kept.copy()
    _pad(blocked, comp, retained, max(1, int(pad_multiple)), drop=drop_blocks)
    dropped = drop_blocks and _droppable(blocked, comp, retained)
    if drop_blocks and not dropped:
        retained = all_kept.copy()
        _pad(blocked, comp, retained, max(1, int(pad_multiple)))
    exact = all_kept if exact_flat and not np.array_equal(all_kept, retained) else None

    def tensor_layout(fs: list, ndim: int):
        """``(layout, padded layout or None)`` of one tensor value: a flat tensor runs at its
        exact widths (when ``exact``), a head-blocked one with the padding."""
        lay = _node_layout(fs, ndim, comp, retained)
        if isinstance(lay, str) or exact is None or _is_blocked(fs):
            return lay, None
        flat = _node_layout(fs, ndim, comp, exact)
        if isinstance(flat, str) or same_layout(flat, lay):
            return flat, None
        return flat, lay

    nodes: dict[torch.fx.Node, object] = {}
    padded: dict[torch.fx.Node, object] = {}
    blocked_params: set[str] = set()
    blocked: set[torch.fx.Node] = set()
    for node in flow.nodes:
        v = flow.values.get(node)
        val = node.meta.get("val")
        pad = None
        if isinstance(v, tuple):
            vals = val if isinstance(val, (tuple, list)) else [None] * len(v)
            both = [tensor_layout(fs, len(t.shape)) if isinstance(fs, list) and isinstance(t, torch.Tensor)
                    else (None, None) for fs, t in zip(v, vals)]
            lay = tuple(x for x, _ in both)
            if any(p is not None for _, p in both):
                pad = tuple(x if p is None else p for x, p in both)
            bad = next((x for x in lay if isinstance(x, str)), None)
            if any(isinstance(fs, list) and _is_blocked(fs) for fs in v):
                blocked.add(node)
        elif isinstance(v, list) and isinstance(val, torch.Tensor):
            lay, pad = tensor_layout(v, val.dim())
            bad = lay if isinstance(lay, str) else None
            if _is_blocked(v):
                blocked.add(node)
                if node.name in captured.params:
                    blocked_params.add(captured.params[node.name])  # a parameter laid out in heads: padded
        else:
            lay, bad = None, None
        if bad is not None:
            return Layout(nodes, {}, flow, f"{bad} at {node.name} ({node.target}) in {module_of(node) or '<root>'}")
        nodes[node] = lay
        if pad is not None:
            padded[node] = pad
    retained_idx: dict[str, dict[int, np.ndarray]] = {}
    for i, (name, dim) in enumerate(space.pd_names):
        if name.startswith("<"):
            continue
        c = comp[space.pd_start[i]: space.pd_start[i] + space.pd_size[i]]
        r = (retained if exact is None or name in blocked_params else exact)[c]
        if not r.all() or kept.get(name, {}).get(dim) is not None:
            retained_idx.setdefault(name, {})[dim] = np.nonzero(r)[0]
    return Layout(nodes, retained_idx, flow, dropped=dropped, padded=padded, blocked=frozenset(blocked))


