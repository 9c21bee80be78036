"""Data-dependent sizes (unbacked symbols) in the channel flow.

An MoE router picks, per expert, the token rows ``torch.where(mask)`` (or ``nonzero``) returns:
their count is computed from tensor values. That size sizes a token dimension, which carries no
weight channels, so each expert's in/out contraction is still exact per unit: the experts'
FFN / GLU couplings are offered exact and prune to the masked dense model (the experts'
``nn.Linear`` are sliced physically). Where a data-dependent size meets a dimension that carries
weight channels (token rows flattened into the channels, channels sliced to a data-dependent
width), the channels stay inexact, with a reason naming the op.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.analysis.flow import propagate
from ecospa.capture.export import capture
from tests.helpers import assert_pruned_equals_masked, random_plan

D, H, EXPERTS = 16, 12, 4


class _GluExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.gate, self.down = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False), nn.Linear(H, D)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _MlpExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.out(F.gelu(self.fc(x)))


class _TopKMoE(nn.Module):
    """A router, ``torch.topk``, then per expert the token rows it was picked for (``torch.where``
    or ``nonzero``), the expert on those rows, added back at them with the router's weight."""

    def __init__(self, expert: type[nn.Module], k: int = 2, nonzero: bool = False):
        super().__init__()
        self.router = nn.Linear(D, EXPERTS, bias=False)
        self.experts = nn.ModuleList(expert() for _ in range(EXPERTS))
        self.k, self.nonzero = k, nonzero

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weight, picked = torch.topk(self.router(x), self.k, dim=-1)
        weight = weight.softmax(dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            hit = picked == e
            rows, slot = hit.nonzero().unbind(-1) if self.nonzero else torch.where(hit)
            out[rows] += weight[rows, slot, None] * expert(x[rows])
        return out.view(shape)


class _Net(nn.Module):
    def __init__(self, expert: type[nn.Module], nonzero: bool = False):
        super().__init__()
        self.embed = nn.Embedding(32, D)
        self.moe = _TopKMoE(expert, nonzero=nonzero)
        self.head = nn.Linear(D, 32)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.head(h + self.moe(h))


def _tokens(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randint(0, 32, (b, t), generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("expert,kind", [(_GluExpert, "glu"), (_MlpExpert, "ffn")])
@pytest.mark.parametrize("nonzero", [False, True])
def test_moe_experts_couple_exactly_through_routed_token_rows(expert, kind, nonzero):
    """Every expert's (in, out) contraction is an exact coupling of its kind, nothing vanishes
    from the flow, and pruning a random part of every coupling matches the masked dense model on
    inputs that route different token counts to each expert, with fewer parameters."""
    torch.manual_seed(0)
    model = _Net(expert, nonzero).eval()
    x = _tokens(2, 9)
    flow = propagate(capture(model, x))
    assert flow.drops == [] and flow.unaccounted() == []
    cg = ecospa.auto_couple(model, x)
    found = sorted((c.name, c.kind, c.width) for c in cg)
    assert found == [(f"moe.experts.{e}.{kind}", kind, H) for e in range(EXPERTS)], cg.summary()
    assert not any("data-dependent" in c.reason for c in cg.inexact), cg.summary()
    params = sum(p.numel() for p in model.parameters())
    plan = random_plan(list(cg), random.Random(1), frac=1 / 2)
    assert_pruned_equals_masked(model, x, plan, cg=cg, check_inputs=[_tokens(1, 5, 2), _tokens(3, 17, 3)])
    assert sum(p.numel() for p in model.parameters()) < params
    widths = {e.out.in_features if kind == "ffn" else e.down.in_features for e in model.moe.experts}
    assert widths == {H - H // 2}


class _FlattenedRows(nn.Module):
    """An expert that flattens its routed token rows into the hidden channels and views them
    back: which channel sits where along the flattened dim depends on the token count."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        rows = torch.where(x[:, 0] > 0)[0]
        hidden = F.relu(self.fc(x[rows])).flatten()
        y = torch.zeros_like(x)
        y[rows] += self.out(hidden.view(-1, H))
        return y


class _DataDependentWidth(nn.Module):
    """Hidden channels cut to a width computed from the data (then padded back)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        n = (x[:, 0] > 0).sum().item()
        torch._check(n >= 0)
        torch._check(n <= H)
        hidden = F.relu(self.fc(x))
        return self.out(F.pad(hidden[:, :n], (0, H - n)))


@pytest.mark.parametrize("module,reason", [
    (_FlattenedRows, "op flatten meets a data-dependent shape (a size computed from tensor values, as after "
                     "torch.where(mask) or nonzero) along dim 0, which carries weight channels"),
    (_DataDependentWidth, "op slice meets a data-dependent shape"),
])
def test_data_dependent_size_along_channels_stays_inexact(module, reason):
    """A data-dependent size that sizes a dimension carrying weight channels leaves the hidden
    channels inexact, with the reason naming the op (and the dim, where a rule put them there),
    and offers nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(module()).eval()
    x = (torch.randn(10, D),)
    flow = propagate(capture(model, x))
    assert flow.drops == [] and flow.unaccounted() == []
    cg = ecospa.auto_couple(model, x)
    assert list(cg) == [], cg.summary()
    hits = [c for c in cg.inexact if any(t.param == "0.fc.weight" and t.dim == 0 for t in c.tables)]
    assert hits and all(reason in c.reason for c in hits), cg.summary()
