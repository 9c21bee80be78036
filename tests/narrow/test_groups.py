"""Ragged heads grouped by width (``prune(..., narrow="grouped")``): one narrow graph per group,
outputs added (ecospa.narrow.groups). Exact, gradients too; a module whose output is not the sum of
its heads' contributions runs the padded layout instead."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.narrow.groups import GroupSum
from ecospa.ir.record import installed_forward
from tests.helpers import assert_pruned_equals_masked, call, masked_copy, plan_units
from tests.zoo.blocks import LlamaBlock, NanoGPTBlock


def _entries(model):
    out = []
    for m in model.modules():
        f = installed_forward(m)
        for es in getattr(f, "entries", {}).values():
            out += [e for e in es if e.gm is not None]
    return out


def _ragged(cg, keep: dict[str, float]):
    """Per coupling kind and head, a different kept fraction: heads of several width classes."""
    plan = {}
    for c in cg:
        if c.kind in ("qk", "vo"):
            h = int(c.name.rsplit("head", 1)[1])
            frac = keep[c.kind][h % len(keep[c.kind])]
            plan[c] = list(range(int(round(c.width * (1 - frac)))))
    return {c: v for c, v in plan.items() if v}


CASES = {
    "mha": lambda: NanoGPTBlock(d=128, h=4),
    "gqa_rotary": lambda: LlamaBlock(d=64, h=4, kv=2, hd=32, f=48),
    "mha_rotary": lambda: LlamaBlock(d=64, h=4, kv=4, hd=32, f=48),
}
KEEP = {"qk": (0.25, 1.0, 0.5, 0.75), "vo": (0.25, 0.75, 1.0, 0.5)}


@pytest.mark.parametrize("name", list(CASES))
def test_ragged_heads_run_grouped_and_exact(name):
    torch.manual_seed(0)
    model = CASES[name]()
    x = (torch.randn(2, 9, model.ln_1.normalized_shape[0] if hasattr(model, "ln_1") else 64),)
    cg = ecospa.auto_couple(model, x)
    plan = _ragged(cg, KEEP)
    ref = masked_copy(copy.deepcopy(model), plan_units(plan))
    assert_pruned_equals_masked(model, x, plan, check_inputs=[(torch.randn(1, 4, x[0].shape[-1]),)], narrow="grouped")
    entries = _entries(model)
    assert entries and any(isinstance(e.gm, GroupSum) and len(e.gm.graphs) >= 2 for e in entries)
    assert all(r.narrow for r in ecospa.execution_report(model))
    model.train(), ref.train()
    for m in (model, ref):
        call(m, x).pow(2).mean().backward()
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.shape == grads[n].shape:
            assert torch.allclose(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6), n


class ResidualInside(nn.Module):
    """Attention whose module output adds its input: not a sum of head contributions alone."""

    def __init__(self, d=128, h=4):
        super().__init__()
        self.h = h
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        return x + self.proj(y)


def test_a_head_independent_term_in_the_output_falls_back_to_padding():
    torch.manual_seed(0)
    model = ResidualInside()
    x = (torch.randn(2, 7, 128),)
    cg = ecospa.auto_couple(model, x)
    plan = _ragged(cg, KEEP)
    assert plan
    assert_pruned_equals_masked(model, x, plan, narrow="grouped")
    entries = _entries(model)
    assert entries and not any(isinstance(e.gm, GroupSum) for e in entries)
    assert all(r.narrow for r in ecospa.execution_report(model))


def test_default_keeps_one_padded_graph_and_a_bad_value_is_refused():
    torch.manual_seed(0)
    model = CASES["mha"]()
    x = (torch.randn(2, 9, 128),)
    cg = ecospa.auto_couple(model, x)
    plan = _ragged(cg, KEEP)
    with pytest.raises(ecospa.ConfigError, match="narrow should be"):
        ecospa.prune(copy.deepcopy(model), plan, couplings=cg, narrow="fast")
    ref = masked_copy(copy.deepcopy(model), plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    with torch.no_grad():
        torch.testing.assert_close(call(model, x), call(ref, x), rtol=1e-5, atol=1e-6)
    entries = _entries(model)
    assert entries and not any(isinstance(e.gm, GroupSum) for e in entries)
