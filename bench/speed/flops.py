"""Matmul FLOPs of one forward, with the attention core counted.

For N = B * T tokens (elementwise ops, norms, softmax, embeddings and the AdamW step ignored):

- linear layers: ``2 * N * numel(W)`` for every nn.Linear / GPT-2 ``Conv1D`` weight, read from
  the parameter shapes of each model as it is (dense, pruned, Torch-Pruning's, the reference);
- lm_head: the same for the output projection (tied to the embedding, never pruned), kept apart
  so that "body" (no lm_head) and "total" (whole model) can both be reported;
- attention core: per query head ``2 * B * T^2 * d_qk`` (Q K^T) ``+ 2 * B * T^2 * d_v`` (A V),
  with the widths each head keeps, full T x T (causal masking ignored), GQA counted per query head.

Ideal speedup = FLOPs(dense) / FLOPs(variant). A train step is forward + backward, about 3x the
forward's matmuls on both sides, so its ideal is the whole-model forward ratio.

Ragged heads run padded in the attention core (ecospa's narrow layout: every head of a blocked
tensor gets the largest kept width of the block rounded up to 8, and SDPA pads q/k and v to one
width for its fused kernel; the projections run at the exact kept widths): :func:`attention` with
``padded=True`` estimates the FLOPs actually executed, an explanation of the gap, not the target.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Spec:
    """Attention shape of a model."""

    n_layer: int
    n_head: int
    n_kv: int
    head_dim: int
    d_model: int
    lm_head: str  # module name of the output projection


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear(model: nn.Module, spec: Spec, n_tokens: int) -> tuple[int, int]:
    """``(linear layers, lm_head)`` FLOPs from the model's parameter shapes."""
    lin = head = 0
    for name, m in model.named_modules():
        if _linear_like(m):
            f = 2 * n_tokens * m.weight.numel()
            if name == spec.lm_head:
                head += f
            else:
                lin += f
    return lin, head


def _groups(cg, plan) -> dict[tuple[str, str], list[tuple[int, int]]]:
    """``{(scope, kind): [(kept units, width), ...]}`` for the attention couplings."""
    out: dict = defaultdict(list)
    for c in cg:
        if c.kind in ("qk", "vo"):
            out[(c.scope, c.kind)].append((c.width - len(plan.get(c.name, ())), c.width))
    return out


def attention(spec: Spec, batch: int, seq: int, cg=None, plan=None, padded: bool = False) -> tuple[int, int]:
    """``(attention core FLOPs, extra linear FLOPs of padding)`` for one forward (the extra is
    0 since the projections of ragged heads run at their exact widths; kept in the signature).

    Without ``plan`` every head has ``spec.head_dim`` (dense, the reference, Torch-Pruning's
    model built with its own spec). With ``cg`` and ``plan``: each coupling's kept units times
    ``head_dim / width`` channels per unit (rotary pairs are units of 2 channels), over the
    query heads it covers (``n_head / couplings of its kind in its scope``).
    """
    per = 2 * batch * seq * seq
    if plan is None:
        return per * spec.n_layer * spec.n_head * 2 * spec.head_dim, 0
    groups = _groups(cg, plan)
    pad: dict[tuple[str, str], int] = {}
    for (scope, kind), cs in groups.items():
        dims = [k * spec.head_dim / w for k, w in cs]
        pad[(scope, kind)] = min(spec.head_dim, -(-int(max(dims)) // 8) * 8)
    for scope in {s for s, _ in groups}:  # SDPA's fused kernel: q/k and v at one width
        p = max(pad.get((scope, "qk"), 0), pad.get((scope, "vo"), 0))
        pad[(scope, "qk")] = pad[(scope, "vo")] = p
    core = 0
    for (scope, kind), cs in groups.items():
        m = len(cs)
        for k, w in cs:
            run = pad[(scope, kind)] if padded else k * spec.head_dim / w
            core += per * run * spec.n_head / m
    return int(core), 0


def count(model: nn.Module, spec: Spec, batch: int, seq: int, cg=None, plan=None) -> dict:
    """Every FLOP figure of one forward (see the module docstring)."""
    lin, head = linear(model, spec, batch * seq)
    attn, _ = attention(spec, batch, seq, cg, plan)
    attn_pad, extra = attention(spec, batch, seq, cg, plan, padded=True)
    body = lin + attn
    body_pad = lin + extra + attn_pad
    return dict(linear=lin, attention=attn, lm_head=head, body=body, total=body + head,
                body_padded=body_pad, total_padded=body_pad + head)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
