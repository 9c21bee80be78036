"""The cache ops of narrow decoding: KV-cache updates as graph ops.

``ecospa.narrow.cached`` captures a region that carries a Hugging Face ``Cache`` with a stand-in
whose ``update`` calls one of these ops, so the past keys/values are graph inputs and the updated
ones graph outputs:

- ``ecospa::kv_append(past, new)``: ``cat(past, new, dim=-2)``, the update of a growing cache
  layer (``DynamicLayer``, ``DynamicSlidingWindowLayer``);
- ``ecospa::kv_write(buffer, new, start)``: ``new`` written into a pre-allocated buffer at
  positions ``start, start + 1, ...`` of dim -2, the update of a ``StaticLayer``.

Channel rules: the result carries the channels of ``new`` (the past or buffer, stored by the shim
at the kept layout, brings none). Narrow rules: the same op on the narrow tensors (a plain ``cat``
for ``kv_append``); a narrow graph then writes the buffer in place (:func:`kv_write_into`).
"""
from __future__ import annotations

import torch
from torch import _check as check_size  # documented torch API; imported by name (tests/test_layering.py)

from ecospa.ops.registry import NarrowError, narrow_rule, register

__all__ = ["kv_append", "kv_write", "kv_write_into"]

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


def _cache_op_labels(ctx, node: torch.fx.Node):
    """Channel rule of ``kv_append`` and ``kv_write``: the result carries the channels of the new
    entries; the past (or the static buffer), a graph input stored by the shim at the kept
    layout, brings none."""
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


# ----------------------------------------------------------------------------- kv_write
def _positions(new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``start + arange(T)``, the positions of dim -2 that ``new`` ``(B, H, T, D)`` is written at."""
    return torch.arange(new.shape[-2], device=new.device) + start.to(new.device)


@torch.library.custom_op("ecospa::kv_write", mutates_args=())
def kv_write(buffer: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``buffer`` with ``new`` written at positions ``start .. start + T - 1`` of dim -2: the
    cached keys (or values) of a static layer after an update, as a graph op
    (``(B, H, L, D), (B, H, T, D), () -> (B, H, L, D)``; ``start`` a long scalar tensor)."""
    return buffer.index_copy(-2, _positions(new, start), new)


@kv_write.register_fake
def _kv_write_fake(buffer: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    for d in (0, 1, -1):  # batch, heads and channels of the buffer are those of the new entries
        check_size(buffer.shape[d] == new.shape[d])
    return new.new_empty((*new.shape[:-2], buffer.shape[-2], new.shape[-1]))


def _kv_write_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2])
    ctx.length = inputs[1].shape[-2]


def _kv_write_backward(ctx, grad: torch.Tensor):
    start, = ctx.saved_tensors
    pos = torch.arange(ctx.length, device=grad.device) + start.to(grad.device)
    return grad.index_fill(-2, pos, 0), grad.index_select(-2, pos), None


kv_write.register_autograd(_kv_write_backward, setup_context=_kv_write_setup)


def kv_write_into(buffer: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """:func:`kv_write` done in place: ``buffer`` (a static cache layer's own tensor, at the kept
    widths) gets ``new`` at positions ``start ..`` and is returned. What a narrow graph runs, so
    the layer keeps its tensors (and their addresses) as ``StaticLayer.update`` does."""
    return buffer.index_copy_(-2, _positions(new, start), new)


register("ecospa::kv_append", "ecospa::kv_write", facts=("layout",))(_cache_op_labels)


@narrow_rule("ecospa::kv_write")
def _kv_write_narrow(b, node: torch.fx.Node):
    """Narrow rule: the buffer arrives at the kept layout of the new entries; the same write."""
    buffer, new, start = node.args[0], node.args[1], node.args[2]
    if b.layout(buffer):
        raise NarrowError("the keys/values buffer of a static cache is narrowed inside the graph")
    if not b.zero.get(new, True):
        raise NarrowError("keys/values whose removed positions are not zero cannot be cached narrow")
    b.zero[node] = True
    return b.call(torch.ops.ecospa.kv_write.default, (b.env[buffer], b.env[new], b.env[start]))
