"""Modules called more than once per forward: a block applied twice, a projection shared by two
inputs. Their units are shared across the calls: one coupling per head (not one per call), and
pruning removes the units from every call exactly."""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.capture.export import capture
from ecospa.analysis.flow import propagate
from ecospa.analysis.sites import linear_like_modules
from tests.helpers import assert_couplings_match, assert_pruned_equals_masked, random_plan
from tests.zoo.attention import CrossAttention
from tests.zoo.blocks import NanoGPTBlock


class Twice(nn.Module):
    """One transformer block applied twice (ALBERT-style weight sharing)."""

    def __init__(self):
        super().__init__()
        self.b = NanoGPTBlock(32, 4)

    def forward(self, x):
        return self.b(self.b(x))


class SharedContextAttention(CrossAttention):
    """Keys and values of two sources through the same projections, joined along the sequence."""

    def __init__(self):
        super().__init__(16, 16, 2, 8)

    def forward(self, x, mem):
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, y.shape[1], self.h, self.hd).transpose(1, 2)

        q = heads(self.to_q(x))
        k = heads(torch.cat([self.to_k(x), self.to_k(mem)], 1))
        v = heads(torch.cat([self.to_v(x), self.to_v(mem)], 1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(b, t, self.h * self.hd))


class Toggle(nn.Module):
    """A Linear whose second call adds a step of its own: not linear-like."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = F.linear(x, self.weight)
        return y if self.calls % 2 else torch.tanh(y)


def test_block_applied_twice_has_one_coupling_per_head():
    model = Twice().eval()
    x = (torch.randn(2, 5, 32),)
    cg = ecospa.auto_couple(model, x)
    assert_couplings_match(cg, NanoGPTBlock.expected("b."))
    assert sorted(c.name for c in cg if c.kind == "qk") == [f"b.attn.qk.head{i}" for i in range(4)]
    assert_pruned_equals_masked(model, x, random_plan(cg, random.Random(0)),
                                check_inputs=[(torch.randn(3, 4, 32),)])


def test_projection_shared_by_two_inputs():
    model = SharedContextAttention().eval()
    x = (torch.randn(2, 5, 16), torch.randn(2, 3, 16))
    cg = ecospa.auto_couple(model, x)
    assert_couplings_match(cg, CrossAttention.expected("", 2, 8))
    assert not cg.inexact or all("input" in c.reason for c in cg.inexact), cg.summary()
    assert_pruned_equals_masked(model, x, random_plan(cg, random.Random(1)),
                                check_inputs=[(torch.randn(1, 2, 16), torch.randn(1, 6, 16))])


def test_linear_like_needs_every_call_to_agree():
    """Each call of a shared Linear is the same product: linear-like. A module whose calls
    differ is not."""
    class Uses(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.tog = Toggle()

        def forward(self, x):
            return self.lin(self.lin(x)) + self.tog(self.tog(x))

    model = Uses().eval()
    flow = propagate(capture(model, (torch.randn(2, 3, 8),)))
    found = linear_like_modules(flow, model)
    assert found["lin"].weight == "lin.weight" and found["lin"].bias == "lin.bias"
    assert "tog" not in found
