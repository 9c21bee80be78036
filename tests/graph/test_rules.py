"""One test per op rule: a small module routes the hidden channels of a Linear pair through the
op, and discovery must say whether the pair stays an exact coupling (and pruning must match the
masked dense model when it does)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.graph.labels import LabelSpace, merge_aligned
from ecospa.graph.rules import RULES
from ecospa.graph.rules.shape import reshape_blocks, reshape_factor

D, HID = 6, 8


class Pair(nn.Module):
    """x -> a(x) -> op -> b -> out, where op acts on the hidden channels."""

    def __init__(self, op, hid=HID, out_hid=None):
        super().__init__()
        self.a = nn.Linear(D, hid)
        self.b = nn.Linear(out_hid or hid, D)
        self.op = op

    def forward(self, x):
        return self.b(self.op(self.a(x)))


def _heads(h):  # (B, T, 8) -> (B, 2, T, 4) -> back
    b, t, _ = h.shape
    return h.view(b, t, 2, 4).transpose(1, 2).contiguous().transpose(1, 2).reshape(b, t, 8)


CASES = {
    # name: (op, exact, kind, out_hid)
    "gelu": (F.gelu, True, "ffn", None),
    "relu_dropout": (lambda h: F.dropout(F.relu(h), 0.0), True, "ffn", None),
    "sigmoid": (torch.sigmoid, True, "ffn", None),
    "scale_add_scalar": (lambda h: 2 * h + 1, True, "linear", None),
    "identity": (lambda h: h.clone().contiguous(), True, "linear", None),
    "view_transpose": (_heads, True, "linear", None),
    "permute": (lambda h: h.permute(1, 0, 2).permute(1, 0, 2), True, "linear", None),
    "flatten_unflatten": (lambda h: h.unflatten(-1, (2, 4)).flatten(-2), True, "linear", None),
    "unsqueeze_squeeze": (lambda h: h.unsqueeze(0).squeeze(0), True, "linear", None),
    "split_cat": (lambda h: torch.cat(h.split(3, dim=-1)[::-1], dim=-1), True, "linear", None),
    "chunk_mul_glu": (lambda h: F.silu(h.chunk(2, dim=-1)[0]) * h.chunk(2, dim=-1)[1], True, "glu", HID // 2),
    "unbind_stack": (lambda h: torch.stack(h.view(*h.shape[:-1], 2, 4).unbind(-2), dim=-2).flatten(-2), True, "linear", None),
    "slice_select": (lambda h: h[..., 2:], True, "linear", HID - 2),
    "repeat_interleave": (lambda h: h.repeat_interleave(2, dim=-1), True, "linear", 2 * HID),
    "expand": (lambda h: h.unsqueeze(-2).expand(*h.shape[:-1], 2, HID).sum(-2), True, "linear", None),
    "softmax_over_channels": (lambda h: torch.softmax(h, -1), False, None, None),
    "layer_norm_over_channels": (lambda h: F.layer_norm(h, (HID,)), False, None, None),
    "mean_over_channels": (lambda h: h - h.mean(-1, keepdim=True), False, None, None),
    "max_over_channels": (lambda h: h - h.amax(-1, keepdim=True), False, None, None),
    "cumsum_over_channels": (lambda h: h.cumsum(-1), False, None, None),
    "softmax_over_time": (lambda h: torch.softmax(h, 1), True, "ffn", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_through_pair(name):
    op, exact, kind, out_hid = CASES[name]
    torch.manual_seed(0)
    model = Pair(op, out_hid=out_hid).eval()
    x = torch.randn(2, 3, D)
    cg = ecospa.auto_couple(model, (x,))
    pair = [c for c in cg.all if "a.weight" in c.params and any(t.param == "a.weight" and t.dim == 0 for t in c.tables)]
    assert pair, cg.summary()
    c = pair[0]
    assert c.exact is exact, cg.summary()
    if not exact:
        assert c.reason
        assert c not in list(cg)
        return
    assert c.kind == kind
    units = c.units()
    drop = list(range(0, c.width, 2))
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(ref_model.named_parameters())
        for u in (units[i] for i in drop):
            for p, d, i in u:
                params[p].select(d, i).zero_()
        ref = ref_model(x)
    n0 = sum(p.numel() for p in model.parameters())
    removed = sum(np.prod([k for dd, k in enumerate(dict(model.named_parameters())[p].shape) if dd != d])
                  for i in drop for (p, d, _) in units[i])
    ecospa.prune(model, {c: drop})
    with torch.no_grad():
        got = model(x)
    assert sum(p.numel() for p in model.parameters()) == n0 - removed
    assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_registry_refuses_unknown_facts_and_double_registration():
    """Facts are words of FACTS; an op cannot get two rules."""
    from ecospa.graph.rules.registry import register

    with pytest.raises(RuntimeError, match="unknown op facts"):
        register(torch.ops.aten.erfinv, facts=("fast",))
    with pytest.raises(RuntimeError, match="registered twice"):
        register(torch.ops.aten.view)(lambda ctx, node: None)


def test_reshape_blocks_split_and_merge():
    assert reshape_blocks((2, 3, 8), (2, 3, 2, 4)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert reshape_blocks((2, 3, 2, 4), (6, 8)) == [([0, 1], [0]), ([2, 3], [1])]
    assert reshape_blocks((1, 6), (6,)) == [([0, 1], [0])]


def test_reshape_factor_heads_and_gqa_repeat():
    f = np.arange(8).reshape(1, 1, 8)
    g = reshape_factor(f, (2, 3, 8), (2, 3, 2, 4))
    assert g.shape == (1, 1, 2, 4) and g[0, 0, 1, 2] == 6
    # a label-free dim merged into a labelled one materialises the repetition (repeat_kv)
    kv = np.arange(2).reshape(1, 2, 1, 1)
    h = reshape_factor(kv, (2, 2, 3, 5), (2, 6, 5))
    assert h.shape == (1, 6, 1) and h.ravel().tolist() == [0, 0, 0, 1, 1, 1]


def test_merge_aligned_joins_same_positions_and_poisons_broadcast():
    space = LabelSpace()
    a = space.param_factors("a", (4,))[0]
    b = space.param_factors("b", (4,))[0]
    out = merge_aligned(space, [a, b], "test")
    assert len(out) == 1
    n, comp = space.components()
    assert comp[0] == comp[4] and comp[1] == comp[5]
    s2 = LabelSpace()
    head = s2.param_factors("h", (2, 4))  # two factors (2,1) and (1,4)
    shared = s2.param_factors("s", (4,))[0].reshape(1, 4)
    per_head = head[0]  # varies on dim 0 only: broadcast across dim 1 of `shared`... and back
    merge_aligned(s2, [per_head * 0 + np.arange(8).reshape(2, 4), shared], "test")
    assert (s2.poison_array()[6:10] >= 0).all()  # "s" broadcast across the head dim: poisoned
