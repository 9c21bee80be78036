"""Weights used as raw ``nn.Parameter`` objects through ``einsum`` or ``@`` (no ``nn.Linear``), as
interpretability and research code writes attention and MLPs: their couplings are found like
those of ``nn.Linear``, exact, sliced in place, and the attention runs narrow (and on the exact
fallback, the parameters seen at their dense size) equal to the masked dense model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from tests.helpers import assert_pruned_equals_masked, masked_copy, param_count, plan_units

D, H, E, FF, T = 16, 2, 4, 24, 6


class EinsumAttention(nn.Module):
    """Causal attention with per-head weights ``W_Q/W_K/W_V`` (H, D, E), ``W_O`` (H, E, D) and
    biases (H, E) written with ``einsum`` (the TransformerLens style)."""

    def __init__(self):
        super().__init__()
        self.W_Q, self.W_K, self.W_V = (nn.Parameter(torch.randn(H, D, E) / 4) for _ in range(3))
        self.W_O = nn.Parameter(torch.randn(H, E, D) / 4)
        self.b_Q, self.b_K, self.b_V = (nn.Parameter(torch.randn(H, E) / 4) for _ in range(3))
        self.b_O = nn.Parameter(torch.randn(D) / 4)
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        q = torch.einsum("btd,hde->bthe", x, self.W_Q) + self.b_Q
        k = torch.einsum("btd,hde->bthe", x, self.W_K) + self.b_K
        v = torch.einsum("btd,hde->bthe", x, self.W_V) + self.b_V
        scores = torch.einsum("bthe,bshe->bhts", q, k) / E ** 0.5
        n = x.shape[1]
        scores = scores.masked_fill(~self.mask[:n, :n], float("-inf"))
        z = torch.einsum("bhts,bshe->bthe", scores.softmax(-1), v)
        return torch.einsum("bthe,hed->btd", z, self.W_O) + self.b_O


class MatmulMLP(nn.Module):
    """``gelu(x @ w_in + b_in) @ w_out`` with raw ``(D, FF)`` / ``(FF, D)`` weights."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(D, FF) / 4)
        self.b_in = nn.Parameter(torch.randn(FF) / 4)
        self.w_out = nn.Parameter(torch.randn(FF, D) / 4)

    def forward(self, x):
        return F.gelu(x @ self.w_in + self.b_in) @ self.w_out


class FusedMatmulAttention(nn.Module):
    """A fused raw ``(D, 3 * H * E)`` qkv weight through ``@``, SDPA with its implicit scale, and a
    transposed raw output weight ``(D, H * E)`` used as ``y @ w_o.T``."""

    def __init__(self):
        super().__init__()
        self.w_qkv = nn.Parameter(torch.randn(D, 3 * H * E) / 4)
        self.w_o = nn.Parameter(torch.randn(D, H * E) / 4)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (x @ self.w_qkv).split(H * E, dim=-1)
        q, k, v = (u.view(b, t, H, E).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, t, H * E) @ self.w_o.T


class Block(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn, self.mlp = attn, MatmulMLP()

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class RawModel(nn.Module):
    def __init__(self, attn_cls):
        super().__init__()
        self.emb = nn.Embedding(11, D)
        self.blocks = nn.ModuleList([Block(attn_cls()) for _ in range(2)])
        self.head = nn.Linear(D, 11)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def _model(attn_cls, seed=0):
    torch.manual_seed(seed)
    return RawModel(attn_cls).eval(), (torch.randint(0, 11, (2, T)),)


def _by_param(cg, param, dim):
    return [c for c in cg.all if any(t.param == param and t.dim == dim for t in c.tables)]


def test_einsum_attention_and_matmul_mlp_are_exact_couplings():
    model, inputs = _model(EinsumAttention)
    cg = ecospa.auto_couple(model, inputs)
    for i in range(2):
        p = f"blocks.{i}.attn."
        qk = _by_param(cg, p + "W_Q", 2)
        assert len(qk) == 1 and qk[0].exact and qk[0].kind == "qk" and qk[0].width == E, cg.summary()
        assert {(t.param, t.dim) for t in qk[0].tables} >= {(p + "W_K", 2), (p + "b_Q", 1), (p + "b_K", 1)}
        vo = _by_param(cg, p + "W_V", 2)
        assert len(vo) == 1 and vo[0].exact and vo[0].kind == "vo" and vo[0].width == E, cg.summary()
        assert (p + "W_O", 1) in {(t.param, t.dim) for t in vo[0].tables}
        heads = _by_param(cg, p + "W_O", 0)  # whole heads: one coupling per head
        assert len(heads) == H and all(c.exact for c in heads), cg.summary()
        ffn = _by_param(cg, f"blocks.{i}.mlp.w_in", 1)
        assert len(ffn) == 1 and ffn[0].exact and ffn[0].kind == "ffn" and ffn[0].width == FF
        assert all(s.layout == "compact" for s in ffn[0].sites)  # its channels simply vanish
        assert all(c.scope == f"blocks.{i}.attn" for c in qk + vo + heads)


def _plan(cg):
    """Half of the q.k and v.o channels, the first head of block 0, a third of every FFN."""
    plan = {}
    for c in cg:
        if c.kind in ("qk", "vo") and c.width == E:
            plan[c] = [0, 3] if c.kind == "qk" else [1, 2]
        elif c.kind == "ffn":
            plan[c] = list(range(0, c.width, 3))
    plan[_by_param(cg, "blocks.0.attn.W_O", 0)[0]] = [0]
    return plan


@pytest.mark.parametrize("narrow", [True, False])
def test_einsum_attention_pruned_equals_masked_dense(narrow):
    model, inputs = _model(EinsumAttention)
    cg = ecospa.auto_couple(model, inputs)
    n0 = param_count(model)
    other = (torch.randint(0, 11, (3, T - 2)),)
    assert_pruned_equals_masked(model, inputs, _plan(cg), cg=cg, check_inputs=[other], narrow=narrow)
    assert param_count(model) < n0
    attn = model.blocks[0].attn
    assert tuple(attn.W_Q.shape) == (H - 1, D, E - 2) and tuple(attn.W_O.shape) == (H - 1, E - 2, D)
    assert tuple(model.blocks[1].mlp.w_in.shape) == (D, FF - FF // 3)
    if narrow:
        reps = {r.path: r for r in ecospa.execution_report(model)}
        for i in range(2):
            r = reps[f"blocks.{i}.attn"]
            assert r.narrow_calls >= 2 and r.fallback_calls == 0, r


def test_fused_matmul_attention_runs_narrow_and_exact():
    model, inputs = _model(FusedMatmulAttention)
    cg = ecospa.auto_couple(model, inputs)
    att = [c for c in cg if c.scope.endswith(".attn")]
    assert len(att) == 2 * 2 * H and all(c.kind in ("qk", "vo") for c in att), cg.summary()
    assert any(t.param.endswith("w_o") and t.dim == 1 for c in att for t in c.tables)
    plan = {c: list(range(0, c.width, 2)) for c in cg if c.width > 1 and c.kind != "linear"}
    assert_pruned_equals_masked(model, inputs, plan, cg=cg)
    for r in ecospa.execution_report(model):
        assert r.narrow_calls >= 1 and r.fallback_calls == 0, r


def test_fallback_gradients_equal_masked_dense_gradients():
    """On the exact fallback the sliced parameters are seen dense with zeros where removed:
    the gradients of the kept entries equal those of the masked dense model."""
    model, inputs = _model(EinsumAttention)
    cg = ecospa.auto_couple(model, inputs)
    plan = _plan(cg)
    ref = masked_copy(model, plan_units(plan, cg))
    ecospa.prune(model, plan, couplings=cg, narrow=False)
    ref(*inputs).square().mean().backward()
    model(*inputs).square().mean().backward()
    kept_q = [i for i in range(E) if i not in (0, 3)]
    want = ref.blocks[0].attn.W_Q.grad[1:][:, :, kept_q]
    torch.testing.assert_close(model.blocks[0].attn.W_Q.grad, want)
    kept_f = [i for i in range(FF) if i % 3]
    torch.testing.assert_close(model.blocks[1].mlp.w_in.grad, ref.blocks[1].mlp.w_in.grad[:, kept_f])


def test_pruning_twice_and_deepcopy_stay_exact():
    """A second prune on the remaining couplings, and a deep copy of the pruned model."""
    model, inputs = _model(EinsumAttention)
    cg = ecospa.auto_couple(model, inputs)
    dense = copy.deepcopy(model)
    plan1 = {c: [0] for c in cg if c.kind == "qk" and c.width == E}
    res = ecospa.prune_pass(model, plan1, couplings=cg)
    plan2 = {c: [1] for c in res.couplings if c.kind == "vo" and c.width == E}
    assert len(plan1) == len(plan2) == 2
    ecospa.prune(model, plan2, couplings=res.couplings)
    units = plan_units(plan1, cg) + plan_units(plan2, cg)
    with torch.no_grad():
        want = masked_copy(dense, units)(*inputs)
        for m in (model, copy.deepcopy(model)):
            torch.testing.assert_close(m(*inputs), want, rtol=1e-5, atol=1e-5)
