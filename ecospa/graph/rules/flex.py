"""The rule of FlexAttention (``torch.nn.attention.flex_attention.flex_attention``).

torch.export keeps it as one higher-order op, ``torch.ops.higher_order.flex_attention(q, k, v,
score_mod, block_mask, scale, kernel_options, score_mod_other_buffers,
mask_mod_other_buffers)``, whose ``score_mod`` and the block mask's ``mask_mod`` are subgraphs
(``get_attr`` nodes). Those functions see one scalar score and the indices ``b, h, q_idx, kv_idx``:
they cannot mix channels, so q·k pair their head dims and v's channels pass through, as in SDPA.
What they *capture* (the ``*_other_buffers`` tensors: a learned bias table, a tensor computed from
the input) enters the scores: its labels are poisoned, with the reason. Outputs: the attention
output (B.., H, L, Ev), then the logsumexp (and max) of the scores per row, which carry no
channels.
"""
from __future__ import annotations

import torch

from ecospa.graph.rules.base import Ctx
from ecospa.graph.rules.contraction import attention
from ecospa.graph.rules.registry import register

__all__ = ["FLEX", "flex_attention", "captured_tensors"]

FLEX = getattr(torch.ops.higher_order, "flex_attention", None)


def captured_tensors(node: torch.fx.Node) -> list[tuple[torch.fx.Node, str]]:
    """``[(tensor node, what uses it)]``: the block mask's tensors and what ``score_mod`` and
    ``mask_mod`` capture."""
    out = []
    groups = ((4, "used in the block mask of flex_attention"),
              (7, "captured by the score_mod of flex_attention"),
              (8, "captured by the mask_mod of flex_attention"))
    for pos, how in groups:
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg(node.args[pos] if len(node.args) > pos else (), found.append)
        out += [(a, how) for a in found if isinstance(a.meta.get("val"), torch.Tensor)]
    return out


if FLEX is not None:
    @register(FLEX)
    def flex_attention(ctx: Ctx, node: torch.fx.Node):
        """``(out, logsumexp[, max])``: out as SDPA's (``attention``); the statistics carry no
        channels (the scores they reduce are poisoned inside the softmax)."""
        q, k, v = node.args[:3]
        out = attention(ctx, node, q, k, v, captured_tensors(node))
        val = node.meta.get("val")
        n = len(val) if isinstance(val, (tuple, list)) else 1
        return tuple([out] + [[] for _ in range(n - 1)]) if n > 1 else out
