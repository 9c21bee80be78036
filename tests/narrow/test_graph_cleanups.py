"""What a narrow graph leaves out of the captured one without changing a value: a join's piece
with no elements even in the dense model (litgpt joins the rotated part of each head with
``q[..., rope_n_elem:]``, empty when the whole head is rotated), a join of one fresh tensor that
nothing else reads (the copy a ``cat`` makes of it), and views nothing reads. Checked: the graph
holds none of them, and the pruned model equals the masked dense one."""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.ir.record import installed_forward
from tests.helpers import masked_copy, plan_units

aten = torch.ops.aten
D, H, HD = 32, 4, 8


def _rope(x, cos, sin, n):
    """litgpt's ``apply_rope`` on the first ``n`` channels, joined back with the rest."""
    half = x[..., : n // 2], x[..., n // 2: n]
    rotated = torch.cat((-half[1], half[0]), dim=-1)
    roped = (x[..., :n] * cos + rotated * sin).to(dtype=x.dtype)
    return torch.cat((roped, x[..., n:]), dim=-1)


class WholeHeadRope(nn.Module):
    def __init__(self, n: int = HD):
        super().__init__()
        self.n = n
        self.qkv = nn.Linear(D, 3 * H * HD, bias=False)
        self.proj = nn.Linear(H * HD, D, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, HD).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin, self.n), _rope(k, cos, sin, self.n)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, H * HD))


def _tables(t: int, n: int):
    inv = 1.0 / 10000 ** (torch.arange(0, n, 2).float() / n)
    ang = torch.arange(t).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def test_empty_pieces_and_single_joins_are_left_out_and_values_kept():
    torch.manual_seed(0)
    model = WholeHeadRope().eval()
    x = torch.randn(2, 6, D)
    cos, sin = _tables(6, HD)
    cg = ecospa.auto_couple(model, (x, cos, sin))
    rng = random.Random(0)
    plan = {c: sorted(rng.sample(range(c.width), c.width // 2)) for c in cg if c.width >= 2}
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    with torch.no_grad():
        got, want = model(x, cos, sin), ref(x, cos, sin)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    rep = ecospa.execution_report(model)
    assert rep and all(r.narrow_calls > 0 and r.fallback_calls == 0 for r in rep), rep
    graphs = [e.gm for es in installed_forward(model).entries.values() for e in es if e.gm is not None]
    assert graphs
    for gm in graphs:
        for n in gm.graph.nodes:
            assert not (n.target is aten.cat.default and len(n.args[0]) == 1), gm.code
            assert not (n.target is aten.slice.Tensor and len(n.args) > 3 and n.args[2] == n.args[3]), gm.code
            assert not (n.op == "call_function" and n.target is aten.slice.Tensor and not n.users), gm.code
