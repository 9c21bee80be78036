"""Rules for elementwise ops (anything ATen tags ``pointwise``) and identity-like ops."""
from __future__ import annotations

import numpy as np
import torch

from ecospa.graph.labels import merge_aligned
from ecospa.graph.rules.base import Ctx, shape_of, tensor_args
from ecospa.graph.rules.registry import register

aten = torch.ops.aten

__all__ = ["pointwise", "identity", "is_pointwise"]

# Elementwise ops that are linear in their labelled operand (no "nonlinear" event).
_LINEAR = {"add", "sub", "neg", "mul", "div", "_to_copy", "to", "clone", "where", "rsub",
           "true_divide", "type_as", "copy", "masked_fill", "lerp", "addcmul", "addcdiv"}
# Products of two operands: both labelled makes a gate (GLU, gated outputs).
_PRODUCTS = {"mul", "div", "true_divide", "addcmul", "addcdiv"}


def is_pointwise(target) -> bool:
    return torch.Tag.pointwise in getattr(target, "tags", ())


def _name(node: torch.fx.Node) -> str:
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", str(node.target))


def _distinct(per_operand: list[list[np.ndarray]]) -> bool:
    """True when two operands carry different labels at some position (a real gate, not
    ``x * f(x)`` as in tanh-GELU)."""
    first = per_operand[0]
    for other in per_operand[1:]:
        for a in first:
            for b in other:
                x, y = np.broadcast_arrays(a, b)
                if ((x >= 0) & (y >= 0) & (x != y)).any():
                    return True
    return False


def pointwise(ctx: Ctx, node: torch.fx.Node):
    """Broadcasting elementwise op: factors at the same positions are merged (see merge_aligned)."""
    shape = shape_of(node)
    if shape is None:
        return None
    ndim = len(shape)
    factors: list[np.ndarray] = []
    per_operand = []
    for a in tensor_args(node):
        fs = ctx.factors(a, ndim)
        if fs and not ctx.is_param_like(a):  # a weight times a channel is a scale, not a gate
            per_operand.append(fs)
        factors += fs
    out = merge_aligned(ctx.space, factors, ctx.where(node))
    name = _name(node)
    gate = name in _PRODUCTS and len(per_operand) >= 2 and _distinct(per_operand)
    for f in out:
        if gate:
            ctx.space.event("gate", f)
        if name not in _LINEAR:
            ctx.space.event("nonlinear", f)
    return out


@register(aten.clone, aten.contiguous, aten.alias, aten.detach, aten.dropout, aten.feature_dropout,
          aten.alpha_dropout, aten.lift_fresh_copy, aten._to_copy, aten.to, aten.type_as,
          aten._assert_tensor_metadata, aten.lift_fresh)
def identity(ctx: Ctx, node: torch.fx.Node):
    """The output carries the labels of the first argument unchanged."""
    if shape_of(node) is None:
        return None
    return ctx.factors(node.args[0])


@register(aten.native_dropout)
def native_dropout(ctx: Ctx, node: torch.fx.Node):
    return (ctx.factors(node.args[0]), [])
