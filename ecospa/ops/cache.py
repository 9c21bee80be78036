"""The cache op of narrow decoding: ``ecospa::kv_append(past, new)``, a KV-cache update as a graph op.

``ecospa.narrow.cached`` captures a region that carries a Hugging Face ``Cache`` with a stand-in
whose ``update`` calls this op, so the past keys/values are graph inputs and the appended ones
graph outputs. Its channel rule: the result carries the channels of ``new`` (the past, stored by
the shim at the kept layout, brings none); its narrow rule: a plain ``cat`` of the two.
"""
from __future__ import annotations

import torch

from ecospa.ops.registry import NarrowError, narrow_rule, register

__all__ = ["kv_append"]

aten = torch.ops.aten


@torch.library.custom_op("ecospa::kv_append", mutates_args=())
def kv_append(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``cat(past, new, dim=-2)``: the cached keys (or values) of a layer after an update, as a
    graph op (``(B, H, P, D), (B, H, T, D) -> (B, H, P + T, D)``)."""
    return torch.cat([past, new], dim=-2)


@kv_append.register_fake
def _kv_append_fake(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return torch.cat([past, new], dim=-2)


def _kv_append_setup(ctx, inputs, output) -> None:
    ctx.past = inputs[0].shape[-2]


def _kv_append_backward(ctx, grad: torch.Tensor):
    n = grad.shape[-2] - ctx.past
    return grad.narrow(-2, 0, ctx.past), grad.narrow(-2, ctx.past, n)


kv_append.register_autograd(_kv_append_backward, setup_context=_kv_append_setup)


@register("ecospa::kv_append", facts=("layout",))
def _kv_append_labels(ctx, node: torch.fx.Node):
    """Channel rule: the appended tensor carries the channels of the new entries; the past, a
    graph input stored by the shim at the kept layout, brings none."""
    val = node.meta.get("val")
    return ctx.factors(node.args[1], val.dim() if isinstance(val, torch.Tensor) else None)


@narrow_rule("ecospa::kv_append")
def _kv_append_narrow(b, node: torch.fx.Node):
    """Narrow rule: the past arrives at the kept layout of the new entries; a plain ``cat``."""
    past, new = node.args[0], node.args[1]
    if b.layout(past):
        raise NarrowError("the past keys/values of a cache are narrowed inside the graph")
    if not b.zero.get(new, True):
        raise NarrowError("keys/values whose removed positions are not zero cannot be cached narrow")
    b.zero[node] = True
    return b.call(aten.cat.default, ([b.env[past], b.env[new]], -2))
