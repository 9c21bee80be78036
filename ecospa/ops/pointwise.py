"""Rules for elementwise ops (anything ATen tags ``pointwise``) and identity-like ops."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ecospa.ir.labels import merge_aligned
from ecospa.ops.base import Ctx, narrow_copy, shape_of, tensor_args
from ecospa.ops.registry import OpSpec, has, narrow_rule, op_name, register, set_pointwise

aten = torch.ops.aten

__all__ = ["pointwise", "pointwise_spec", "identity", "copy", "where", "narrow_pointwise"]

# Facts of the pointwise ops that have more than the default ("compact"), by op name.
_LINEAR = {"add", "sub", "neg", "mul", "div", "_to_copy", "to", "clone", "where", "rsub",
           "true_divide", "type_as", "copy", "masked_fill", "lerp", "addcmul", "addcdiv"}
_GATE = {"mul", "div", "true_divide", "addcmul", "addcdiv"}
_ZERO = {"mul", "div", "true_divide", "neg", "_to_copy", "to", "clone", "type_as", "relu", "gelu",
         "silu", "tanh", "sin", "abs", "square", "leaky_relu", "hardtanh", "elu", "mish",
         "hardswish", "sign", "sinh", "asin", "atan", "erf", "relu6", "celu", "selu", "softsign",
         "tan", "asinh", "atanh", "trunc", "round", "sgn", "expm1", "log1p", "nan_to_num"}
_ADDITIVE = {"add", "sub", "rsub"}


@lru_cache(maxsize=None)
def _pointwise_facts(name: str) -> frozenset[str]:
    if name.endswith("_") and not name.endswith("__") and name[:-1] in _LINEAR | _ZERO | _GATE | _ADDITIVE:
        name = name[:-1]  # add_, mul_, relu_: the facts of add, mul, relu
    facts = {"compact"}
    if name in _LINEAR:
        facts.add("linear")
    if name in _GATE:
        facts.add("gate")
    if name in _ZERO:
        facts.add("zero")
    if name in _ADDITIVE:
        facts.add("additive")
    if name in ("_to_copy", "to", "clone", "type_as"):
        facts.update(("transparent", "passive"))
    if name == "add":
        facts.add("passive")  # the bias add of a linear-like module
    return frozenset(facts)


def pointwise_spec(target) -> OpSpec:
    """The :class:`OpSpec` of an op ATen tags pointwise: the shared rules and per-name facts."""
    return OpSpec(pointwise, _pointwise_facts(op_name(target)), narrow_pointwise)


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
    gate = has(node.target, "gate") and len(per_operand) >= 2 and _distinct(per_operand)
    linear = has(node.target, "linear")
    for f in out:
        if gate:
            ctx.space.event("gate", f)
        if not linear:
            ctx.space.event("nonlinear", f)
    return out


@register(aten.clone, aten.contiguous, aten.alias, aten.detach, aten.lift_fresh_copy, aten._to_copy,
          aten.to, aten.type_as,
          facts=("transparent", "compact", "passive", "linear", "zero"))
def identity(ctx: Ctx, node: torch.fx.Node):
    """The output carries the labels of the first argument unchanged."""
    if shape_of(node) is None:
        return None
    return ctx.factors(node.args[0])


@register(aten.where, aten.masked_fill, facts=tuple(_pointwise_facts("where")))
def where(ctx: Ctx, node: torch.fx.Node):
    """``where(cond, x, y)`` and ``masked_fill(x, mask, value)`` in every overload (ATen tags
    only the all-tensor ones pointwise; ``where(cond, x, 0.0)`` is ``where.ScalarOther``)."""
    return pointwise(ctx, node)


@register(aten.copy_, facts=("linear", "zero"))
def copy(ctx: Ctx, node: torch.fx.Node):
    """``dst.copy_(src)``: the result holds ``src``'s values, broadcast to ``dst``'s shape (the
    write into ``dst`` and the tensor it views is followed by ``ecospa.analysis.mutation``)."""
    shape = shape_of(node)
    if shape is None:
        return None
    return ctx.factors(node.args[1], len(shape))


@register(aten.dropout, aten.feature_dropout, aten.alpha_dropout, facts=("compact", "linear", "zero"))
def dropout(ctx: Ctx, node: torch.fx.Node):
    """Dropout zeroes or scales each position: the labels pass through unchanged."""
    return identity(ctx, node)


@register(aten._assert_tensor_metadata, facts=("compact", "passive"))
def assert_metadata(ctx: Ctx, node: torch.fx.Node):
    """A runtime check of a tensor's dtype/device: no value."""
    return None


@register(aten.native_dropout, facts=("compact", "linear", "zero"))
def native_dropout(ctx: Ctx, node: torch.fx.Node):
    return (ctx.factors(node.args[0]), [])


# ----------------------------------------------------------------------------- narrow rules
narrow_rule(aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to, aten.type_as,
            aten.lift_fresh_copy, aten.dropout, aten.feature_dropout, aten.alpha_dropout,
            aten.native_dropout)(narrow_copy)


@narrow_rule(aten._assert_tensor_metadata)
def narrow_drop(b, node):
    """Runtime checks of dense metadata: not needed (and wrong) in the narrow graph."""
    return None



def narrow_pointwise(b, node):
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



set_pointwise(pointwise_spec)


narrow_rule(aten.where, aten.masked_fill)(narrow_pointwise)
