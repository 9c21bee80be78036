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

from ecospa.ops.base import Ctx
from ecospa.ops.contraction import attention
from ecospa.ops.registry import NarrowError, narrow_rule, register
from ecospa.ops.runtime import pin_scale

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


# ----------------------------------------------------------------------------- narrow rules
def _subgraph(b, arg) -> torch.fx.GraphModule | None:
    """The ``score_mod`` / ``mask_mod`` subgraph a ``get_attr`` argument names, or None."""
    owner = b.program.graph.owning_module
    if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr" or owner is None:
        return None
    try:
        mod = owner.get_submodule(arg.target)
    except AttributeError:
        return None
    return mod if isinstance(mod, torch.fx.GraphModule) else None


def _reads_arg(gm: torch.fx.GraphModule | None, pos: int) -> bool:
    """True unless ``gm`` is known not to use its placeholder number ``pos``."""
    if gm is None:
        return True
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return pos < len(ph) and len(ph[pos].users) > 0


def _flex_heads_free(b, node) -> bool:
    """The head index reaches nothing in ``score_mod``, ``mask_mod`` or the block mask: heads may
    be left out (renumbered) without changing what the kept ones compute."""
    mask = node.args[4] if len(node.args) > 4 else ()
    mask_mod = mask[-1] if isinstance(mask, (tuple, list)) and mask else None
    if _reads_arg(_subgraph(b, node.args[3]), 2) or (mask_mod is not None and _reads_arg(_subgraph(b, mask_mod), 1)):
        return False
    tensors = [a for a in (mask if isinstance(mask, (tuple, list)) else ()) if isinstance(a, torch.fx.Node)
               and isinstance(a.meta.get("val"), torch.Tensor)]
    return all(a.meta["val"].dim() < 2 or a.meta["val"].shape[1] == 1 for a in tensors)


def narrow_flex(b, node):
    """FlexAttention: as SDPA, q.k sums over the narrowed head dims (one of q, k must be zero
    where dropped) and v's channels pass through; the scale was fixed from the dense head width
    when the call was captured (pinned here if not). ``score_mod`` and ``mask_mod`` see scalar
    scores and indices only; whole heads are left out only where the head index reaches neither
    of them nor the block mask. The logsumexp output is not narrowed."""
    q, k, v = node.args[:3]
    nd = len(b.shape(q))
    if any(d != nd - 1 for x in (q, k, v) for d in b.layout(x)) and not _flex_heads_free(b, node):
        raise NarrowError("flex_attention whose score_mod, mask_mod or block mask reads the head index, "
                          "with whole heads left out")
    if b.layout(q) and not (b.zero.get(q, True) or b.zero.get(k, True)):
        raise NarrowError("attention scores over dropped channels that are not zero")
    b.zero[node] = b.zero.get(v, True)
    args = list(node.args)
    if len(args) > 5 and args[5] is None:
        args[5] = pin_scale(int(b.shape(q)[-1]))
    return b.copy(node, args=tuple(args))



if FLEX is not None:
    narrow_rule(FLEX)(narrow_flex)
