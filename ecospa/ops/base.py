"""What every op rule needs: the context (values so far, label space) and small helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ecospa.capture.export import Captured, module_of
from ecospa.ir.labels import LabelSpace, to_ndim
from ecospa.ops.registry import has
from ecospa.ops.symbolic import size_of

__all__ = ["Ctx", "concrete", "flat_factors", "param_behind", "poison_value", "shape_of", "tensor_args", "all_zero",
           "narrow_copy", "returned_input"]


def returned_input(node: torch.fx.Node) -> torch.fx.Node | None:
    """The input that ``node`` returns unchanged in eager mode, or None: ``aten.alias``,
    ``aten.to`` to the dtype the tensor has (``Tensor.to`` returns the tensor itself) and
    ``aten.dropout`` with ``train`` false (ATen returns its input in eval mode)."""
    if node.op != "call_function" or node.kwargs or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    target, src = node.target, node.args[0]
    if target is torch.ops.aten.alias.default and len(node.args) == 1:
        return src
    if target is torch.ops.aten.dropout.default and len(node.args) == 3 and node.args[2] is False:
        return src
    if target is torch.ops.aten.to.dtype and len(node.args) == 2:
        val = src.meta.get("val")
        return src if isinstance(val, torch.Tensor) and val.dtype == node.args[1] else None
    return None


def shape_of(node) -> tuple[int, ...] | None:
    """Static shape of a node's tensor value, or None (not a tensor). A size computed from
    tensor values (MoE routing's token count) is its stand-in (``ecospa.ops.symbolic``)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(size_of(s) for s in val.shape)
    return None


def flat_factors(values) -> list[np.ndarray]:
    """All factor arrays found in a (nested) value."""
    out: list[np.ndarray] = []

    def visit(v):
        if isinstance(v, np.ndarray):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    visit(values)
    return out


@dataclass
class Ctx:
    """Rule context: label space, values computed so far, the captured program."""

    space: LabelSpace
    values: dict[torch.fx.Node, Any]
    captured: Captured
    index: dict[torch.fx.Node, int]

    def value(self, arg) -> Any:
        """Factors of an argument (``[]`` for label-free tensors, None for non-tensors)."""
        if isinstance(arg, torch.fx.Node):
            return self.values.get(arg)
        return None

    def factors(self, arg, ndim: int | None = None) -> list[np.ndarray]:
        """Factors of a tensor argument, optionally aligned (right) to ``ndim`` dims."""
        v = self.value(arg)
        if not isinstance(v, list):
            return []
        if ndim is None:
            return list(v)
        return [to_ndim(f, ndim) for f in v]

    def where(self, node: torch.fx.Node) -> str:
        mod = module_of(node)
        return f"{node.name} ({node.target}) in {mod or '<root>'}"

    def constant(self, arg) -> torch.Tensor | None:
        """Real value of a buffer/constant placeholder argument (for index ops), or None."""
        if isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
            return self.captured.buffers.get(arg.name)
        return None

    def is_param_like(self, arg) -> bool:
        """True when ``arg`` is a parameter, possibly through ops with the ``transparent`` fact
        (transposed, viewed, converted)."""
        return param_behind(self.captured, arg)[0] is not None


def param_behind(captured: Captured, arg, *, same_shape: bool = False,
                 max_depth: int = 8) -> tuple[str | None, bool]:
    """``(parameter name, transposed)`` when ``arg`` is a parameter seen through ops with the
    ``transparent`` fact (an odd number of ``transposing`` ones makes it transposed), else
    ``(None, False)``. With ``same_shape``, only ops that keep the shape (or reverse it, for the
    transposing ones) count: the value is the weight itself or its transpose, not a view of it."""
    flips = 0
    for _ in range(max_depth):
        if not isinstance(arg, torch.fx.Node):
            break
        if arg.op == "placeholder":
            name = captured.params.get(arg.name)
            return (name, bool(flips % 2)) if name is not None else (None, False)
        if arg.op != "call_function" or not arg.args or not has(arg.target, "transparent"):
            break
        flip = has(arg.target, "transposing")
        if same_shape:
            out, src = shape_of(arg), shape_of(arg.args[0])
            if out is None or src is None or out != (tuple(reversed(src)) if flip else src):
                break
        flips += flip
        arg = arg.args[0]
    return None, False


def concrete(arg):
    """An int argument as a Python int: a symbolic size (a node computing a dynamic dimension)
    becomes the size it had in the captured example; other values are returned unchanged."""
    if isinstance(arg, torch.fx.Node):
        val = arg.meta.get("val")
        if isinstance(val, torch.SymInt):
            return int(val)
    if isinstance(arg, torch.SymInt):
        return int(arg)
    return arg


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Tensor-valued node arguments of ``node``, flattened (lists included)."""
    out = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            if isinstance(a.meta.get("val"), torch.Tensor) or a.op == "placeholder":
                out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    visit(node.args)
    visit(tuple(node.kwargs.values()))
    return out


def poison_value(ctx: Ctx, node: torch.fx.Node, why: str, *, lost: bool = True):
    """Default for ops without a rule: labels that enter are lost (poisoned and reported as an
    inexact coupling even when no contraction of theirs is seen; with ``lost=False`` only
    poisoned, for a rule that passes the labels on itself); the output is label-free."""
    for a in tensor_args(node):
        for f in ctx.factors(a):
            if lost:
                ctx.space.lose(f, f"{why} at {ctx.where(node)}", ctx.index.get(node))
            else:
                ctx.space.poison(f, f"{why} at {ctx.where(node)}")
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return []
    if isinstance(val, (tuple, list)):
        return tuple([] if isinstance(v, torch.Tensor) else None for v in val)
    return None


# ----------------------------------------------------------------------------- narrow rules
def all_zero(b, node) -> bool:
    """Every tensor input's dropped positions are zero (symbolic sizes are no operands)."""
    return all(b.zero.get(a, True) for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor))



def narrow_copy(b, node):
    """The op computes the narrow result from narrow inputs unchanged (no size arguments): the
    narrow rule of every op whose arguments hold no channel sizes or positions."""
    b.zero[node] = all_zero(b, node)
    return b.copy(node)
