"""What every op rule needs: the context (values so far, label space) and small helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ecospa.graph.capture import Captured, module_of
from ecospa.graph.labels import LabelSpace, to_ndim

__all__ = ["Ctx", "flat_factors", "poison_value", "shape_of", "tensor_args"]


def shape_of(node) -> tuple[int, ...] | None:
    """Static shape of a node's tensor value, or None (not a tensor)."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
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
        """True when ``arg`` is a parameter, possibly transposed/viewed/converted."""
        seen = 0
        while isinstance(arg, torch.fx.Node) and seen < 8:
            if arg.op == "placeholder":
                return arg.name in self.captured.params
            if arg.op != "call_function" or not arg.args:
                return False
            name = getattr(getattr(arg.target, "overloadpacket", None), "__name__", "")
            if name == "cat" and arg.args[0]:  # ecospa's adapters append zero rows to a weight
                arg = arg.args[0][0]
                seen += 1
                continue
            if name not in {"t", "transpose", "permute", "view", "reshape", "expand", "alias",
                            "_to_copy", "to", "contiguous", "clone", "detach", "unsqueeze"}:
                return False
            arg = arg.args[0]
            seen += 1
        return False


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


def poison_value(ctx: Ctx, node: torch.fx.Node, why: str):
    """Default for ops without a rule: labels that enter are poisoned; the output is label-free."""
    for a in tensor_args(node):
        for f in ctx.factors(a):
            ctx.space.poison(f, f"{why} at {ctx.where(node)}")
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return []
    if isinstance(val, (tuple, list)):
        return tuple([] if isinstance(v, torch.Tensor) else None for v in val)
    return None
