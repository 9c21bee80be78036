"""Calls whose arguments are not plain tensors and values, served narrow and exact:

- a *module* passed as an argument (x-transformers hands each attention the model's ALiBi module,
  which registers its bias table as a buffer the first time it runs): held in the signature by
  identity, traced as part of the region, its parameters and buffers fed live;
- FlexAttention's ``BlockMask`` passed as an argument (torchtitan builds one per batch): a pytree
  node (``ecospa.capture.argtypes``), its tensors inputs of the graph, its metadata part of the
  signature.
"""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.narrow.program import CallNotServable, signature
from tests.helpers import assert_close_outputs, assert_pruned_equals_masked, masked_copy, plan_units, random_plan

H, D, DIM = 4, 8, 32


class SlopeBias(nn.Module):
    """ALiBi as x-transformers writes it: slopes in a buffer, the ``(h, i, j)`` table built on the
    first call long enough and kept as a (non-persistent) buffer, sliced on later calls."""

    def __init__(self, heads: int = H):
        super().__init__()
        self.heads = heads
        self.register_buffer("slopes", torch.tensor([2.0 ** (-(k + 1)) for k in range(heads)]).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("bias", None, persistent=False)

    def forward(self, i: int, j: int) -> torch.Tensor:
        """``(heads, i, j)``."""
        if self.bias is not None and self.bias.shape[-1] >= j and self.bias.shape[-2] >= i:
            return self.bias[..., -i:, -j:]
        q = torch.arange(j - i, j, device=self.slopes.device)
        k = torch.arange(j, device=self.slopes.device)
        bias = -(k.view(1, -1) - q.view(-1, 1)).abs().unsqueeze(0) * self.slopes
        self.register_buffer("bias", bias, persistent=False)
        return self.bias


class LearnedBias(nn.Module):
    """A trainable per-head bias module (its parameter must get gradients through the graph)."""

    def __init__(self, heads: int = H):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, heads).view(-1, 1, 1))

    def forward(self, i: int, j: int) -> torch.Tensor:
        pos = torch.arange(j, dtype=torch.float32) - torch.arange(i, dtype=torch.float32).view(-1, 1)
        return -pos.abs().unsqueeze(0) * self.scale


class BiasedAttention(nn.Module):
    """Causal attention ``(b, t, DIM) -> (b, t, DIM)`` that takes the position-bias module as an
    argument."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, H * D) for _ in range(3))
        self.o = nn.Linear(H * D, DIM)

    def forward(self, x: torch.Tensor, rel_pos: nn.Module) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, H, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D) + rel_pos(t, t)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, H * D)
        return self.o(out)


class BiasModel(nn.Module):
    """Two attention layers sharing one bias module owned by the model."""

    def __init__(self, bias: nn.Module):
        super().__init__()
        self.rel_pos = bias
        self.layers = nn.ModuleList(BiasedAttention() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, self.rel_pos)
        return x


def _regions(model) -> list:
    return [r for r in ecospa.execution_report(model) if r.path.startswith("layers.")]


def _pruned(bias: nn.Module, *, warm: bool):
    torch.manual_seed(0)
    model = BiasModel(bias).eval()
    x = torch.randn(2, 10, DIM)
    if warm:  # the bias table exists before the capture (the dense model ran)
        with torch.no_grad():
            model(x)
    plan = random_plan(ecospa.auto_couple(model, (x,)), random.Random(0))
    others = [(torch.randn(1, 13, DIM),), (torch.randn(1, 6, DIM),), (torch.randn(2, 10, DIM),)]
    assert_pruned_equals_masked(model, (x,), plan, check_inputs=others)
    return model


@pytest.mark.parametrize("warm", [False, True])
def test_a_bias_module_argument_runs_narrow_and_exact(warm):
    model = _pruned(SlopeBias(), warm=warm)
    regions = _regions(model)
    assert len(regions) == 2
    for r in regions:
        assert r.narrow and not r.fallback_calls, (r.path, r.reasons)
    assert not any(isinstance(t, torch._subclasses.FakeTensor) for t in model.rel_pos.buffers())


def test_a_trainable_bias_module_gets_its_gradients_through_the_graph():
    torch.manual_seed(0)
    model = BiasModel(LearnedBias()).eval()
    x = torch.randn(2, 10, DIM)
    plan = random_plan(ecospa.auto_couple(model, (x,)), random.Random(1))
    masked = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan)
    model(x).square().sum().backward()
    masked(x).square().sum().backward()
    assert torch.allclose(model.rel_pos.scale.grad, masked.rel_pos.scale.grad, rtol=1e-4, atol=1e-6)
    assert all(r.narrow and not r.fallback_calls for r in _regions(model))


def test_another_module_object_is_another_signature():
    mods = list(BiasedAttention().modules())
    x = torch.randn(1, 5, DIM)
    a, b = SlopeBias(), SlopeBias()
    sa, _ = signature(mods, (x, a), {}, hold_modules=True)
    assert signature(mods, (x, a), {}, hold_modules=True)[0] == sa
    assert signature(mods, (x, b), {}, hold_modules=True)[0] != sa
    a.eval()
    assert signature(mods, (x, a), {}, hold_modules=True)[0] != sa  # its mode is part of it
    with pytest.raises(CallNotServable):
        signature(mods, (x, a), {})  # not held unless asked


def test_a_module_made_per_call_runs_the_fallback_with_a_reason():
    model = _pruned(SlopeBias(), warm=False)
    x = torch.randn(1, 7, DIM)
    with torch.no_grad():
        ref = model.layers[0](x, model.rel_pos)
        got = model.layers[0](x, copy.deepcopy(model.rel_pos))
    assert_close_outputs(got, ref)
    reasons = " ".join(" ".join(r.reasons) for r in _regions(model))
    assert "not a submodule of the model" in reasons


def test_a_copy_of_the_pruned_model_serves_its_own_bias_module():
    model = _pruned(SlopeBias(), warm=True)
    twin = copy.deepcopy(model)
    x = torch.randn(1, 9, DIM)
    with torch.no_grad():
        assert_close_outputs(twin(x), model(x))
    assert all(r.narrow and not r.fallback_calls for r in _regions(twin))


# -- FlexAttention with a BlockMask argument ----------------------------------------------------

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _causal(b, h, q, kv):
    return q >= kv


class FlexAttention(nn.Module):
    """``(b, t, DIM), BlockMask -> (b, t, DIM)`` with FlexAttention."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * H * D)
        self.o = nn.Linear(H * D, DIM)

    def forward(self, x: torch.Tensor, block_mask) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D).permute(2, 0, 3, 1, 4)
        out = flex.flex_attention(q, k, v, block_mask=block_mask)
        return self.o(out.transpose(1, 2).reshape(b, t, H * D))


class FlexModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(FlexAttention() for _ in range(2))

    def forward(self, x: torch.Tensor, block_mask) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, block_mask)
        return x


def _mask(b: int, t: int):
    return flex.create_block_mask(_causal, b, None, t, t, device="cpu")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_with_a_block_mask_argument_runs_narrow_and_exact():
    torch.manual_seed(0)
    model = FlexModel().eval()
    x = torch.randn(2, 16, DIM)
    with torch.no_grad():
        cg = ecospa.auto_couple(model, (x, _mask(2, 16)))
        plan = random_plan(cg, random.Random(0))
        assert plan, "no couplings found through flex_attention"
        assert_pruned_equals_masked(model, (x, _mask(2, 16)), plan,
                                    check_inputs=[(torch.randn(1, 23, DIM), _mask(1, 23)),
                                                  (torch.randn(2, 16, DIM), _mask(2, 16))])
    regions = _regions(model)
    assert len(regions) == 2
    for r in regions:
        assert r.narrow and not r.fallback_calls, (r.path, r.reasons)
