"""Accounting (issue 20): every contraction between weight channels ends as an offered coupling
or an inexact one with a reason; nothing vanishes silently.

- On every model of the test suite, no op rule drops labels without a reason (``flow.drops``)
  and every weight channel that enters an op is accounted for (``flow.unaccounted()``).
- x-transformers' rotary embedding (applied under ``autocast(enabled=False)``, interleaved pairs
  through ``(d r)`` reshapes, partial rotary), reproduced in plain torch: its q.k couplings are
  found, exact, and prune exactly.
- A reference Llama writing k/v into its own cache tensors: the q.k and v.o couplings are found,
  inexact with the reason; with a complex-number rotary, q and k still couple per kv head.
- An op without a rule, and a rule that drops labels, report the channels with a reason.
- MoE routing by ``torch.where(mask)`` / ``nonzero`` (data-dependent row counts): nothing vanishes,
  the experts couple exactly next to attention and the dense FFN (tests/analysis/
  test_data_dependent.py has the cases where such a size meets channels).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.capture.export import capture
from ecospa.analysis.flow import propagate
import dataclasses

from ecospa.ops import OPS
from tests.helpers import assert_pruned_equals_masked, random_plan
from tests.models import CASES


def _flow(model, inputs):
    return propagate(capture(model.eval(), inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_nothing_vanishes_in_the_zoo(name):
    torch.manual_seed(0)
    case = CASES[name]
    flow = _flow(case.factory(), case.inputs())
    assert flow.drops == [], f"rules dropped labels without a reason: {flow.drops}"
    assert flow.unaccounted() == []


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_nothing_vanishes_in_hf_models(name):
    pytest.importorskip("transformers")
    from tests.analysis.test_blocks import MODELS

    build, inputs = MODELS[name]
    flow = _flow(build(), inputs())
    assert flow.drops == [] and flow.unaccounted() == []


# -- x-transformers' rotary, in plain torch ----------------------------------------------------

class XRotary(nn.Module):
    """Frequencies for ``rot`` dims, each repeated for its pair: ``(d r) r=2`` interleaved."""

    def __init__(self, rot: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot)))

    def forward(self, t: int) -> torch.Tensor:
        freqs = torch.einsum("i,j->ij", torch.arange(t).float(), self.inv_freq)
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)  # (T, rot)


def _rotate_pairs(x):
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _apply_rotary(t, freqs):
    with torch.autocast("cpu", enabled=False):  # x-transformers' @disable_autocast
        rot = freqs.shape[-1]
        t, rest = t[..., :rot], t[..., rot:]
        t = t * freqs.cos() + _rotate_pairs(t) * freqs.sin()
        return torch.cat((t, rest), dim=-1)


class XAttention(nn.Module):
    def __init__(self, d=32, h=4, hd=8, rot=4):
        super().__init__()
        self.h, self.hd = h, hd
        self.to_q, self.to_k, self.to_v = (nn.Linear(d, h * hd, bias=False) for _ in range(3))
        self.to_out = nn.Linear(h * hd, d, bias=False)
        self.rotary = XRotary(rot)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.h, self.hd).permute(0, 2, 1, 3) for f in (self.to_q, self.to_k, self.to_v))
        freqs = self.rotary(t)
        q, k = _apply_rotary(q, freqs), _apply_rotary(k, freqs)
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.hd ** -0.5
        out = torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(-1), v)
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, t, self.h * self.hd))


class XLayer(nn.Module):
    def __init__(self, rot):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = XAttention(rot=rot)

    def forward(self, x):
        return x + self.attn(self.norm(x))


@pytest.mark.parametrize("rot", [4, 8])
def test_x_transformers_rotary_keeps_its_qk_couplings(rot):
    torch.manual_seed(0)
    model = nn.Sequential(XLayer(rot), XLayer(rot)).eval()
    x = (torch.randn(2, 5, 32),)
    flow = _flow(model, x)
    assert flow.drops == [] and flow.unaccounted() == []
    cg = ecospa.auto_couple(model, x, include_inexact=True)
    qk = [c for c in cg.all if c.kind == "qk"]
    assert len(qk) == 2 * 4, cg.summary()  # one per head and layer
    assert all(c.exact for c in qk), cg.summary()
    assert {c.width for c in qk} == {rot // 2 + (8 - rot)}  # rotated pairs + free dims
    assert len([c for c in cg if c.kind == "vo" and c.exact]) == 2 * 4
    plan = random_plan([c for c in cg if c.exact], random.Random(0))
    assert_pruned_equals_masked(model, x, plan, cg=cg, check_inputs=[(torch.randn(1, 3, 32),)])


# -- a reference Llama that writes k/v into its own cache --------------------------------------

class CachedAttention(nn.Module):
    """k and v written into cache tensors the module owns, then read back for attention."""

    def __init__(self, d=32, h=4, kv=2, buffers=False, complex_rope=False):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.wq = nn.Linear(d, h * self.hd, bias=False)
        self.wk = nn.Linear(d, kv * self.hd, bias=False)
        self.wv = nn.Linear(d, kv * self.hd, bias=False)
        self.wo = nn.Linear(h * self.hd, d, bias=False)
        ck, cv = torch.zeros(4, 16, kv, self.hd), torch.zeros(4, 16, kv, self.hd)
        if buffers:
            self.register_buffer("cache_k", ck, persistent=False)
            self.register_buffer("cache_v", cv, persistent=False)
        else:  # plain tensor attributes, as the reference code keeps them
            self.cache_k, self.cache_v = ck, cv
        self.complex_rope = complex_rope
        angles = torch.outer(torch.arange(16).float(), 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, x, start: int = 0):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.h, self.hd)
        k = self.wk(x).view(b, t, self.kv, self.hd)
        v = self.wv(x).view(b, t, self.kv, self.hd)
        if self.complex_rope:
            f = self.freqs[:t].view(1, t, 1, -1)
            q = torch.view_as_real(torch.view_as_complex(q.float().reshape(b, t, self.h, -1, 2)) * f).flatten(3)
            k = torch.view_as_real(torch.view_as_complex(k.float().reshape(b, t, self.kv, -1, 2)) * f).flatten(3)
        self.cache_k = self.cache_k.to(q)
        self.cache_v = self.cache_v.to(q)
        self.cache_k[:b, start:start + t] = k
        self.cache_v[:b, start:start + t] = v
        keys = self.cache_k[:b, :start + t].repeat_interleave(self.h // self.kv, dim=2)
        vals = self.cache_v[:b, :start + t].repeat_interleave(self.h // self.kv, dim=2)
        q, keys, vals = q.transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2)
        scores = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(self.hd)
        out = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), vals)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class RefBlock(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = CachedAttention(**kw)

    def forward(self, x):
        return x + self.attn(x)


def _reported(cg, param: str, dim: int = 0):
    return [c for c in cg.all if any(t.param == param and t.dim == dim for t in c.tables)]


@pytest.mark.parametrize("buffers", [False, True])
def test_reference_llama_cache_writes_are_exact(buffers):
    torch.manual_seed(0)
    model = RefBlock(buffers=buffers).eval()
    x = (torch.randn(2, 5, 32),)
    flow = _flow(model, x)
    assert flow.drops == [] and flow.unaccounted() == []
    cg = ecospa.auto_couple(model, x)
    qk = [c for c in cg.all if c.kind == "qk"]
    vo = [c for c in cg.all if c.kind == "vo"]
    assert len(qk) == 2 and len(vo) == 2, cg.summary()  # one per kv head
    for c in qk + vo:  # a cache the model owns keeps its dense width: removing them is exact (issue 19)
        assert c.exact, cg.summary()
        assert {"attn.wq.weight", "attn.wk.weight"} <= set(c.params) or "attn.wv.weight" in c.params
    assert_pruned_equals_masked(model, x, random_plan(qk + vo, random.Random(0)), cg=cg)


def test_reference_llama_complex_rotary_reports_q_and_k():
    torch.manual_seed(0)
    model = RefBlock(complex_rope=True).eval()
    x = (torch.randn(2, 5, 32),)
    assert _flow(model, x).unaccounted() == []
    cg = ecospa.auto_couple(model, x)
    for p in ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight"):
        hits = _reported(cg, p)
        assert hits and all(c.exact or c.reason for c in hits), cg.summary()
    # through view_as_complex / view_as_real, q and k still meet per kv head, in whole pairs
    qk = [c for c in cg.all if c.kind == "qk"]
    assert len(qk) == 2 and all(c.width == 4 and {"attn.wq.weight", "attn.wk.weight"} <= set(c.params)
                                for c in qk), cg.summary()


# -- ops the analysis cannot follow ------------------------------------------------------------

class Pair(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 6)
        self.op = op

    def forward(self, x):
        return self.b(self.op(self.a(x)))


def test_an_op_without_a_rule_reports_the_channels():
    """``a``'s rows go into an op no rule covers: they are an inexact coupling with the reason,
    not nothing."""
    model = Pair(lambda h: torch.roll(h, 1, dims=-1))
    cg = ecospa.auto_couple(model, (torch.randn(2, 3, 6),))
    hits = _reported(cg, "a.weight")
    assert hits and "has no channel rule" in hits[0].reason, cg.summary()


def test_a_rule_that_drops_labels_is_caught(monkeypatch):
    """A rule that lets labels fall (here: clone returning none) is listed in ``flow.drops`` and
    the channels are reported with the op's name."""
    key = torch.ops.aten.clone
    monkeypatch.setitem(OPS, key, dataclasses.replace(OPS[key], channel=lambda ctx, node: []))
    model = Pair(lambda h: h.clone())
    x = (torch.randn(2, 3, 6),)
    flow = _flow(model, x)
    assert [op for _, op, _ in flow.drops] == ["clone"]
    cg = ecospa.auto_couple(model, x)
    hits = _reported(cg, "a.weight")
    assert hits and "dropped by op clone" in hits[0].reason, cg.summary()


# -- data-dependent shapes (MoE routing by torch.where / nonzero) --------------------------------

class _Expert(nn.Module):
    def __init__(self, d=32, f=16):
        super().__init__()
        self.fc_1, self.fc_2, self.proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class _RoutedMoE(nn.Module):
    """litgpt's LLaMAMoE routing: per expert, the tokens ``torch.where(mask)`` picks (a count
    known only from the data), or ``nonzero`` with ``nonzero_rows``."""

    def __init__(self, d=32, n=3, nonzero_rows=False):
        super().__init__()
        self.gate = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(_Expert(d) for _ in range(n))
        self.nonzero_rows = nonzero_rows

    def forward(self, x):
        b, t, c = x.shape
        x = x.reshape(-1, c)
        probs, idx = torch.topk(self.gate(x), 2)
        probs = probs.softmax(dim=1)
        masks = (idx.unsqueeze(-1) == torch.arange(len(self.experts))).permute(2, 0, 1)
        y = torch.zeros_like(x)
        for mask, expert in zip(masks, self.experts):
            if self.nonzero_rows:
                tok, slot = mask.nonzero().unbind(-1)
            else:
                tok, slot = torch.where(mask)
            y[tok] += probs[tok, slot, None] * expert(x[tok])
        return y.view(b, t, c)


class _MoEBlock(nn.Module):
    def __init__(self, nonzero_rows=False):
        super().__init__()
        self.attn = _SdpaAttention()
        self.mlp = _Expert(32, 24)
        self.moe = _RoutedMoE(nonzero_rows=nonzero_rows)

    def forward(self, x):
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return x + self.moe(x)


class _SdpaAttention(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (m(x).view(b, t, self.h, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("nonzero_rows", [False, True])
def test_data_dependent_token_rows_keep_every_coupling(nonzero_rows):
    """The rows an MoE router picks have a data-dependent count (an unbacked size) that sizes
    only token dimensions: nothing vanishes from the flow, every expert couples as an exact GLU
    next to attention and the dense FFN, all prune to the masked dense model, and attention runs
    narrow."""
    torch.manual_seed(0)
    model = nn.Sequential(_MoEBlock(nonzero_rows), _MoEBlock(nonzero_rows)).eval()
    x = (torch.randn(2, 6, 32),)
    flow = _flow(model, x)
    assert flow.drops == [] and flow.unaccounted() == []
    cg = ecospa.auto_couple(model, x)
    for p in ("moe.experts.0.fc_1.weight", "moe.experts.2.proj.weight"):
        hits = [c for c in cg if any(t.param.endswith(p) for t in c.tables)]
        assert len(hits) == 2 and all(c.exact and c.kind == "glu" for c in hits), cg.summary()
    assert not any("data-dependent" in c.reason for c in cg.inexact), cg.summary()
    kinds = sorted(c.kind for c in cg)
    assert kinds == ["glu"] * 8 + ["qk"] * 8 + ["vo"] * 8, cg.summary()
    plan = random_plan(list(cg), random.Random(0))
    assert_pruned_equals_masked(model, x, plan, cg=cg, check_inputs=[(torch.randn(1, 5, 32),)])
    reps = [r for r in ecospa.execution_report(model) if r.path.endswith("attn")]
    assert len(reps) == 2 and all(r.narrow_calls and not r.fallback_calls for r in reps), reps
