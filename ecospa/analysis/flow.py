"""Channel flow: run the op rules over a captured graph, in order.

Placeholders of parameters get fresh labels (one per index of every dimension); inputs and
buffers carry none. Each op's rule computes the factors of its output and records edges, poison,
tags and events in the :class:`LabelSpace`. Labels that reach the model's output are poisoned.
In-place writes give the tensor written into the labels written (``ecospa.analysis.mutation``), and
labels a rule lets fall without a reason are lost with one (``ecospa.analysis.accounting``).

Sizes computed from tensor values (unbacked symbols: the token rows MoE routing picks with
``torch.where(mask)`` or ``nonzero``) reach the rules as stand-ins (``ecospa.ops.symbolic``): an
expert's channels pass through its token gather, its linears and its scatter-add like any
other's. Labels a rule puts along such a dimension are lost with a reason naming the op and the
dim (which channel sits where depends on the data), and an op whose rule fails on such a size
loses the labels that enter it, with a reason naming the op, instead of failing the flow.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ecospa.capture.export import Captured, module_of
from ecospa.ir.labels import LabelSpace, to_ndim
from ecospa.ops import lookup
from ecospa.analysis.accounting import ENDS, account, labels_of, silent_drops, value_args
from ecospa.analysis.mutation import apply_write
from ecospa.ops.base import Ctx, flat_factors, poison_value, tensor_args
from ecospa.ops.symbolic import data_dependent_dims
from ecospa.ops.registry import op_name

__all__ = ["FlowResult", "propagate", "coupled_factors"]


@dataclass
class FlowResult:
    """Labels of every node and the facts collected about them.

    ``drops`` lists the ops whose rule let labels fall without a reason, ``(node name, op,
    number of labels)``: those labels are lost with a reason naming the op (an inexact coupling),
    and the list is empty when the rules follow every op of the graph (tests check it).
    ``used`` and ``ended`` mark the labels that entered some op, and that entered an op where
    channels legitimately end (``ecospa.analysis.accounting``).
    """

    space: LabelSpace
    nodes: list[torch.fx.Node]
    values: dict[torch.fx.Node, Any]
    captured: Captured
    drops: list[tuple[str, str, int]] = field(default_factory=list)
    used: np.ndarray | None = None
    ended: np.ndarray | None = None

    def unaccounted(self) -> list:
        """Weight channels that vanished without a reason (``ecospa.analysis.accounting.account``)."""
        return account(self.space, self.used, self.ended)


def propagate(captured: Captured) -> FlowResult:
    """Push labels through ``captured.graph``; see the module docstring."""
    space = LabelSpace()
    nodes = list(captured.graph.nodes)
    ctx = Ctx(space=space, values={}, captured=captured, index={n: i for i, n in enumerate(nodes)})
    drops: list[tuple[str, str, int]] = []
    entered: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for node in nodes:
        try:
            mark = space.mark()
            if node.op in ("call_function", "output"):
                labs = labels_of([ctx.values.get(a) for a in value_args(node)] if node.op == "call_function"
                               else _leaves(ctx, node.args))
                entered.append(labs)
                if node.op == "call_function" and op_name(node.target) in ENDS:
                    ends.append(labs)
            try:
                ctx.values[node] = _run(ctx, node)
                if node.op == "call_function":
                    ctx.values[node] = _refuse_channels_along_data_dependent(ctx, node, ctx.values[node])
                    apply_write(ctx, node)
            except Exception as exc:
                if node.op != "call_function" or not (_is_data_dependent(exc) or _touches_data_dependent(node)):
                    raise
                ctx.values[node] = _data_dependent(ctx, node)
            if node.op == "call_function":
                lost = silent_drops(ctx, node, mark)
                if lost.size:
                    drops.append((node.name, op_name(node.target), int(lost.size)))
                    space.lose(lost, f"dropped by op {op_name(node.target)} at {ctx.where(node)}, "
                                     "whose rule does not pass these channels on", ctx.index[node])
        except Exception as exc:  # name the node at fault, keep the original error chained
            from ecospa.errors import CaptureError

            raise CaptureError(
                f"channel flow failed at node {node.format_node()} (module "
                f"{module_of(node) or '<root>'!r}): {type(exc).__name__}: {exc}. This is a bug in "
                "ecospa's op rules; please report it with the model."
            ) from exc
    used = np.zeros(space.n, dtype=bool)
    ended = np.zeros(space.n, dtype=bool)
    for labs in entered:
        used[labs] = True
    for labs in ends:
        ended[labs] = True
    return FlowResult(space=space, nodes=nodes, values=ctx.values, captured=captured, drops=drops,
                      used=used, ended=ended)


def _run(ctx: Ctx, node: torch.fx.Node):
    if node.op == "placeholder":
        pname = ctx.captured.params.get(node.name)
        if pname is None:
            return _input_factors(ctx, node)
        return list(ctx.space.param_factors(pname, ctx.captured.shapes[pname]))
    if node.op == "output":
        for f in flat_factors(_leaves(ctx, node.args)):
            ctx.space.poison(f, "reaches the model's output")
        return None
    if node.op == "get_attr":
        return []
    if node.op != "call_function":
        return poison_value(ctx, node, f"{node.op} {node.target}")
    rule = lookup(node.target)
    if rule is None:
        return poison_value(ctx, node, f"op {node.target} has no channel rule")
    return rule(ctx, node)


def _is_data_dependent(exc: BaseException) -> bool:
    """``exc`` is torch's error for a guard on a data-dependent size (not imported up front:
    ``import ecospa`` loads no sympy; a graph with such sizes has loaded it)."""
    mod = sys.modules.get("torch.fx.experimental.symbolic_shapes")
    return mod is not None and isinstance(exc, mod.GuardOnDataDependentSymNode)


_DATA_DEPENDENT = "meets a data-dependent shape (a size computed from tensor values, as after torch.where(mask) or nonzero)"


def _touches_data_dependent(node: torch.fx.Node) -> bool:
    """``node`` or one of its tensor operands has a size computed from tensor values."""
    vals = [node.meta.get("val")] + [a.meta.get("val") for a in tensor_args(node)]
    vals += [v for t in vals if isinstance(t, (tuple, list)) for v in t]
    return any(data_dependent_dims(v) for v in vals)


def _refuse_channels_along_data_dependent(ctx: Ctx, node: torch.fx.Node, value):
    """Rules read a data-dependent size as a stand-in (``ecospa.ops.symbolic``), which is right
    where it sizes a dimension that carries no weight channels (MoE routing's token rows). Where
    the rule put weight channels along such a dimension (a reshape that merges token rows with
    channels, a gather of channels by a computed index), which channel sits where depends on the
    data: those labels are lost with a reason naming the op and the dimension, and leave the
    output."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return _refuse_one(ctx, node, val, value)
    if isinstance(val, (tuple, list)) and isinstance(value, tuple) and len(value) == len(val):
        return tuple(_refuse_one(ctx, node, t, v) for t, v in zip(val, value))
    return value


def _refuse_one(ctx: Ctx, node: torch.fx.Node, val, value):
    dims = data_dependent_dims(val)
    if not dims or not isinstance(value, list):
        return value
    keep = []
    for f in value:
        g = to_ndim(f, val.dim()) if f.ndim <= val.dim() else f
        bad = [d for d in dims if d < g.ndim and g.shape[d] > 1]
        if not bad:
            keep.append(f)
            continue
        ctx.space.lose(f, f"op {op_name(node.target)} {_DATA_DEPENDENT} along dim {bad[0]}, which carries "
                          f"weight channels, at {ctx.where(node)}", ctx.index[node])
    return keep


def _data_dependent(ctx: Ctx, node: torch.fx.Node):
    """An op whose rule met a size that depends on the values of a tensor (an unbacked symbol:
    the rows picked by ``torch.where(mask)`` / ``nonzero`` in MoE routing) cannot be followed:
    the labels that enter it are lost with a reason naming the op, its output carries none, and
    the flow goes on (the rest of the model still couples)."""
    return poison_value(ctx, node, f"op {op_name(node.target)} {_DATA_DEPENDENT}")


def _input_factors(ctx: Ctx, node: torch.fx.Node):
    """A model input's channels (its last dimension) get labels, poisoned at once: they cannot
    be removed, and whatever meets them at the same positions cannot be either. Buffers and
    integer inputs (token ids) carry none."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    if node.name in ctx.captured.buffers or not val.is_floating_point() or val.dim() < 2:
        return []
    size = int(val.shape[-1])
    if size <= 1:
        return []
    f = ctx.space.param_factors(f"<input {node.name}>", (1,) * (val.dim() - 1) + (size,))
    for x in f:
        ctx.space.poison(x, f"carries the channels of the model input {node.name!r}")
    return list(f)


def _leaves(ctx: Ctx, args) -> list:
    out: list = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            out.append(ctx.values.get(a))
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(args)
    return out


def coupled_factors(flow: FlowResult, coupling_of_label: np.ndarray):
    """Per op node whose value carries labels of couplings: ``(node, [(factor, coupling ids)])``.

    ``coupling_of_label`` gives the coupling index of every label (-1: none); a factor is listed
    with the sorted unique couplings of its labels (factors of no coupling are left out).
    """
    for node in flow.nodes:
        if node.op != "call_function":
            continue
        items = []
        for f in flat_factors(flow.values.get(node)):
            labs = f[f >= 0]
            if labs.size:
                gs = np.unique(coupling_of_label[labs])
                gs = gs[gs >= 0]
                if gs.size:
                    items.append((f, gs))
        if items:
            yield node, items
