"""Accounting: no weight channel vanishes from the analysis without a reason.

Every label (a slice of a weight) that enters an op must, at that op, either leave it (in the
op's output, or written into a tensor: ``ecospa.analysis.mutation``), be contracted there, be joined
to labels that leave, or be poisoned or lost with a reason. :func:`silent_drops` finds the labels
an op's rule let fall without any of these (a gap in a rule); ``ecospa.analysis.flow`` loses them
with a reason that names the op, so that they are reported as an inexact coupling rather than
disappearing. Ops that select positions (slices, splits, gathers) and ``sum`` (summing channels is
exact: a removed channel adds zero) legitimately end labels; ops whose result is not a tensor
(shape checks) carry none.

:func:`account` is the check run on whole models: every label of every weight used in the graph
ends in a coupling (exact or inexact, with its reason), is poisoned with a reason (it reaches the
model's output, is normalised over, selects embedding rows, ...), or ends where channels
legitimately end (selected away, summed). Whatever is left is listed by ``(param, dim)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ecospa.ir.labels import LabelSpace
from ecospa.ops.base import Ctx, flat_factors, tensor_args
from ecospa.ops.registry import has, op_name

__all__ = ["ENDS", "silent_drops", "value_args", "Unaccounted", "account", "labels_of"]

# ops after which labels that entered may be absent from the output by design
ENDS = frozenset({"slice", "select", "split", "split_with_sizes", "chunk", "unbind", "narrow",
                  "index", "index_select", "getitem", "sum", "nansum", "embedding", "_grouped_mm",
                  "grouped_mm_fallback"})


def labels_of(values) -> np.ndarray:
    """Every label in the factors of ``values`` (nested lists/tuples), repeats included."""
    fs = [f.ravel() for f in flat_factors(values)]
    if not fs:
        return np.zeros(0, dtype=np.int64)
    out = np.concatenate(fs) if len(fs) > 1 else fs[0]
    return out[out >= 0]


_META_ONLY = frozenset({"type_as", "expand_as", "view_as", "reshape_as"})  # 2nd tensor: dtype/shape


def value_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensor arguments whose *values* an op uses (``zeros_like(x)`` and ``y.type_as(x)``
    use only the shape or dtype of ``x``)."""
    if has(node.target, "fresh"):
        return []
    args = tensor_args(node)
    if op_name(node.target) in _META_ONLY or has(node.target, "observer"):
        return args[:1]
    return args


def silent_drops(ctx: Ctx, node: torch.fx.Node, mark) -> np.ndarray:
    """Labels that entered ``node`` and that its rule neither passed on, contracted, joined,
    poisoned nor lost (``mark``: ``ctx.space.mark()`` taken before the rule ran)."""
    if node.op != "call_function" or op_name(node.target) in ENDS:
        return np.zeros(0, dtype=np.int64)
    value = ctx.values.get(node)
    if value is None:  # not a tensor (a shape check, a size): carries nothing by design
        return np.zeros(0, dtype=np.int64)
    entered = labels_of([ctx.values.get(a) for a in value_args(node)])
    if entered.size == 0:
        return entered
    kept = np.zeros(ctx.space.n, dtype=bool)  # masks, not sorted sets: this runs on every op
    kept[labels_of(value)] = True
    kept[ctx.space.handled_since(mark)] = True
    return np.unique(entered[~kept[entered]])


@dataclass(frozen=True)
class Unaccounted:
    """Labels of one ``(param, dim)`` that vanished without a reason: ``count`` of them."""

    param: str
    dim: int
    count: int


def account(space: LabelSpace, used: np.ndarray, ended: np.ndarray) -> list[Unaccounted]:
    """Labels that entered some op (``used``, a mask over labels) and whose unit is in no
    coupling, carries no poison or loss reason, and that did not end at an op of :data:`ENDS`
    (``ended``, a mask), grouped by ``(param, dim)``. Empty when nothing vanished.

    A unit is in a coupling when it is contracted somewhere or lost (``ecospa.analysis.units``)."""
    _, comp = space.components()
    ncomp = int(comp.max()) + 1 if comp.size else 0
    ok = np.zeros(ncomp, dtype=bool)
    for kind in ("contract", "lost"):
        ok[comp[space.event_mask(kind)]] = True
    ok[comp[space.poisoned_mask()]] = True
    ok[comp[ended]] = True  # a unit ends where any of its labels ends (they stand for each other)
    bad = used & ~ok[comp] if comp.size else np.zeros(0, dtype=bool)
    idx = np.nonzero(bad)[0]
    if idx.size == 0:
        return []
    pd = space.pd_of_labels()[idx]
    out = []
    for p in np.unique(pd).tolist():
        name, dim = space.pd_names[p]
        if not name.startswith("<"):
            out.append(Unaccounted(name, dim, int((pd == p).sum())))
    return out
