"""Fused qkv with any number of kv groups (litgpt's layout: one ``nn.Linear`` producing the q of
every head, then the k and v of each group; ``repeat_interleave`` to the query heads; rotary on
all or part of each head, its cos/sin tables passed in from the model): exact and narrow. With
one group (multi-query) the rotary table multiplies the single k head without a head dim to
broadcast along, so its channels meet the qk units at the same positions."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from tests.helpers import assert_pruned_equals_masked, param_count

C, H, HS, T = 32, 4, 8, 6


def _rope(x, cos, sin):
    half = x.size(-1) // 2
    cos, sin = (t.view(1, 1, t.size(0), t.size(1)) for t in (cos, sin))  # sizes read from the table
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class FusedQKV(nn.Module):
    def __init__(self, groups: int, rope: int):
        super().__init__()
        self.groups, self.rope = groups, rope
        self.qkv = nn.Linear(C, (H + 2 * groups) * HS)
        self.proj = nn.Linear(H * HS, C)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        g, r = self.groups, self.rope
        q, k, v = self.qkv(x).split((H * HS, g * HS, g * HS), dim=-1)
        q = q.view(b, t, H, HS).transpose(1, 2)
        k = k.view(b, t, g, HS).transpose(1, 2)
        v = v.view(b, t, g, HS).transpose(1, 2)
        q = torch.cat((_rope(q[..., :r], cos, sin), q[..., r:]), dim=-1)
        k = torch.cat((_rope(k[..., :r], cos, sin), k[..., r:]), dim=-1)
        if g != H:
            k, v = k.repeat_interleave(H // g, dim=1), v.repeat_interleave(H // g, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=HS ** -0.5)
        return self.proj(y.transpose(1, 2).reshape(b, t, H * HS))


class Model(nn.Module):
    def __init__(self, groups: int, rope: int):
        super().__init__()
        self.emb = nn.Embedding(13, C)
        self.norm = nn.LayerNorm(C)
        self.attn = FusedQKV(groups, rope)
        self.head = nn.Linear(C, 13)
        theta = 1.0 / (10000 ** (torch.arange(0, rope, 2).float() / rope))
        ang = torch.outer(torch.arange(32).float(), theta).repeat(1, 2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, ids):
        x = self.emb(ids)
        t = ids.shape[1]
        return self.head(x + self.attn(self.norm(x), self.cos[:t], self.sin[:t]))


@pytest.mark.parametrize("groups,rope", [(1, HS), (1, HS // 2), (2, HS // 2), (H, HS)])
def test_fused_qkv_any_kv_groups_runs_narrow_and_exact(groups, rope):
    torch.manual_seed(0)
    model = Model(groups, rope).eval()
    ids = torch.randint(0, 13, (2, T))
    cg = ecospa.auto_couple(model, (ids,))
    att = [c for c in cg if c.scope == "attn"]
    assert {c.kind for c in att} == {"qk", "vo"}, cg.summary()
    assert sum(c.kind == "vo" for c in att) == groups  # one v.o coupling per kv group
    n0 = param_count(model)
    plan = {c: list(range(0, c.width, 2)) for c in att}
    assert_pruned_equals_masked(model, (ids,), plan, cg=cg, check_inputs=[(torch.randint(0, 13, (3, T - 1)),)])
    assert param_count(model) < n0
    (rep,) = ecospa.execution_report(model)
    assert rep.narrow_calls >= 2 and rep.fallback_calls == 0, rep
