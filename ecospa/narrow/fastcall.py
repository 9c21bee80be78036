"""Narrow graphs that call their ATen ops without a Python frame per op.

A decode step runs one narrow graph per attention module, and at batch 1 its cost is per-call
overhead more than arithmetic. ``torch.fx`` writes every op of an exported graph as
``torch.ops.aten.view.default(...)``: four attribute lookups and the Python frame of
``OpOverload.__call__`` for each op, then the boxed call of the C++ operator (its arguments
converted one by one against the schema). :func:`bind` gives a graph module a ``forward`` that
calls, for each op, bound once as a global of the generated code:

- the op's public Python binding where :data:`BINDINGS` names one (``torch.addmm``,
  ``Tensor.view``, ``torch._C._nn.scaled_dot_product_attention``, ...): torch's generated
  argument parser and an unboxed call, the path eager code takes. Each entry is an overload the
  binding resolves to for the arguments a graph passes (checked by
  ``tests/narrow/test_fastcall.py``: the same operators dispatched, equal results);
- else the ``OpOverload``'s C++ operator (``OpOverload._op``) directly.

Same operators, same arguments, same results; the generated source is otherwise the one
``torch.fx`` wrote.

Measured on a SmolLM2-shaped attention decode graph (33 ops, 1 CPU thread, hot caches): 125 us
per call through ``gm(...)``, 110 us through ``_op``. Inside a whole ``generate()`` (GPT-2-small
shape, half of every coupling removed, 1 thread), the attention decode graph took 365 us per
call with ``_op`` for every op and 330-350 us with the bindings (three runs; a cold instruction
cache makes the boxed path dearer than it measures hot).

A later ``gm.recompile()`` (any pass that edits the graph afterwards) puts ``torch.fx``'s own
``forward`` back: correct, only without this saving, so callers bind again after editing.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import torch

__all__ = ["bind", "BINDINGS", "binding", "overload"]

_OP = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")
_PREFIX = "_ecospa_op_"

# ATen overload -> (where, name) of the Python binding that dispatches to it: "torch" is
# torch._C._VariableFunctions (torch.addmm), "nn" torch._C._nn, "Tensor" a method of
# torch._C.TensorBase (the C++ methods, not torch.Tensor's Python overrides). Only overloads the
# binding picks for every argument list the op itself accepts (no dimname or out variants). Left
# out: ops whose binding takes fewer argument types than the op (``index_put_``: its binding
# refuses the None entries of an index list, as in ``buffer[:, :, pos] = new``).
BINDINGS: dict[str, tuple[str, str]] = {
    # views and shapes
    "aten.view.default": ("Tensor", "view"),
    "aten.reshape.default": ("torch", "reshape"),
    "aten.transpose.int": ("torch", "transpose"),
    "aten.permute.default": ("torch", "permute"),
    "aten.unsqueeze.default": ("torch", "unsqueeze"),
    "aten.squeeze.dim": ("torch", "squeeze"),
    "aten.expand.default": ("Tensor", "expand"),
    "aten.select.int": ("torch", "select"),
    "aten.sym_size.int": ("Tensor", "size"),
    "aten.split_with_sizes.default": ("torch", "split_with_sizes"),
    "aten.split.Tensor": ("torch", "split"),
    "aten.unbind.int": ("torch", "unbind"),
    "aten.cat.default": ("torch", "cat"),
    "aten.stack.default": ("torch", "stack"),
    "aten.clone.default": ("torch", "clone"),
    "aten.index_select.default": ("torch", "index_select"),
    "aten.gather.default": ("torch", "gather"),
    "aten.embedding.default": ("torch", "embedding"),
    # products and attention
    "aten.addmm.default": ("torch", "addmm"),
    "aten.mm.default": ("torch", "mm"),
    "aten.bmm.default": ("torch", "bmm"),
    "aten.matmul.default": ("torch", "matmul"),
    "aten.linear.default": ("nn", "linear"),
    "aten.scaled_dot_product_attention.default": ("nn", "scaled_dot_product_attention"),
    # elementwise and reductions
    "aten.mul.Tensor": ("torch", "mul"),
    "aten.add.Tensor": ("torch", "add"),
    "aten.sub.Tensor": ("torch", "sub"),
    "aten.div.Tensor": ("torch", "div"),
    "aten.neg.default": ("torch", "neg"),
    "aten.rsqrt.default": ("torch", "rsqrt"),
    "aten.tanh.default": ("torch", "tanh"),
    "aten.exp.default": ("torch", "exp"),
    "aten.cos.default": ("torch", "cos"),
    "aten.sin.default": ("torch", "sin"),
    "aten.pow.Tensor_Scalar": ("torch", "pow"),
    "aten.mean.dim": ("torch", "mean"),
    "aten.softmax.int": ("torch", "softmax"),
    "aten.silu.default": ("nn", "silu"),
    "aten.gelu.default": ("nn", "gelu"),
    "aten.where.self": ("torch", "where"),
    "aten.masked_fill.Scalar": ("torch", "masked_fill"),
    "aten.flatten.using_ints": ("torch", "flatten"),
    "aten.type_as.default": ("Tensor", "type_as"),
    "aten.le.Scalar": ("torch", "le"),
    "aten.ne.Scalar": ("torch", "ne"),
    # values and in-place writes (buffer caches)
    "aten.item.default": ("Tensor", "item"),
    "aten._assert_scalar.default": ("torch", "_assert_scalar"),
    "aten.add_.Tensor": ("Tensor", "add_"),
    "aten.index_copy_.default": ("Tensor", "index_copy_"),
}

_HOMES = {"torch": torch._C._VariableFunctions, "nn": torch._C._nn, "Tensor": torch._C.TensorBase}


def overload(ns: str, packet: str, name: str) -> torch._ops.OpOverload | None:
    """``torch.ops.<ns>.<packet>.<name>`` (e.g. ``aten``, ``view``, ``default``), or None where
    this torch has no such operator (or it is not an ``OpOverload``)."""
    try:
        op = getattr(getattr(getattr(torch.ops, ns), packet), name)
    except (AttributeError, RuntimeError):
        return None
    return op if isinstance(op, torch._ops.OpOverload) else None


@functools.cache
def _resolved() -> dict[torch._ops.OpOverload, Callable]:
    """:data:`BINDINGS` as ``{OpOverload: binding}``, for the ops and bindings this torch has."""
    out = {}
    for qual, (home, name) in BINDINGS.items():
        op, fn = overload(*qual.split(".")), getattr(_HOMES[home], name, None)
        if op is not None and fn is not None:
            out[op] = fn
    return out


def binding(op: torch._ops.OpOverload) -> Callable | None:
    """The Python binding :data:`BINDINGS` names for ``op`` (None: there is none, or this torch
    lacks it)."""
    return _resolved().get(op)


def bind(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with its ``forward`` calling each op's Python binding (:data:`BINDINGS`) or its
    C++ operator directly (in place; returns ``gm``). A source this cannot rewrite keeps
    ``torch.fx``'s ``forward``."""
    src = gm.code
    cls = type(gm)
    globs = dict(cls.forward.__globals__)
    calls: dict[str, object] = {}

    def direct(match: re.Match) -> str:
        op = overload(*match.groups())
        if op is None:  # not an operator after all: leave the text as it is
            return match.group(0)
        key = _PREFIX + "_".join(match.groups())
        calls[key] = binding(op) or op._op
        return key + "("

    fast = _OP.sub(direct, src)
    if not calls:
        return gm
    if any(k in globs and globs[k] is not v for k, v in calls.items()):
        return gm  # a name the generated code already uses: keep torch.fx's forward
    globs.update(calls)
    exec(compile(fast, f"<ecospa narrow graph {id(gm):#x}>", "exec"), globs)
    cls.forward = globs["forward"]
    return gm
