"""What a narrow graph leaves out of the captured one without changing a value: a join's piece
with no elements even in the dense model (litgpt joins the rotated part of each head with
``q[..., rope_n_elem:]``, empty when the whole head is rotated), a join of one fresh tensor that
nothing else reads (the copy a ``cat`` makes of it), and views nothing reads. Checked: the graph
holds none of them, and the pruned model equals the masked dense one."""
from __future__ import annotations

import operator
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


# ----------------------------------------------------------------------------- common reads
def _graph(build):
    g = torch.fx.Graph()
    out = build(g, g.placeholder("x"), g.placeholder("buf"))
    g.output(out)
    return g


def _targets(g):
    return [n.target for n in g.nodes if n.op == "call_function"]


def test_the_same_read_of_unwritten_inputs_is_computed_once():
    from ecospa.narrow.rewrite import _common_reads

    def build(g, x, buf):
        a = g.call_function(aten.index_select.default, (buf, 0, x))
        b = g.call_function(aten.index_select.default, (buf, 0, x))
        va, vb = (g.call_function(aten.select.int, (t, 1, 0)) for t in (a, b))
        return g.call_function(aten.add.Tensor, (va, vb))
    g = _graph(build)
    xv, bv = torch.tensor([2, 0]), torch.randn(3, 4)
    want = torch.fx.GraphModule(torch.nn.Module(), _graph(build))(xv, bv)
    _common_reads(g)
    assert _targets(g).count(aten.index_select.default) == 1 and _targets(g).count(aten.select.int) == 1
    assert torch.equal(torch.fx.GraphModule(torch.nn.Module(), g)(xv, bv), want)


def test_reads_around_a_write_random_ops_and_unfollowed_aliases_stay_apart():
    from ecospa.narrow.rewrite import _common_reads

    def written(g, x, buf):  # read, write the buffer in place, read again: two values
        a = g.call_function(aten.mul.Tensor, (buf, 2))
        g.call_function(aten.add_.Tensor, (buf, 1))
        b = g.call_function(aten.mul.Tensor, (buf, 2))
        return g.call_function(aten.sub.Tensor, (b, a))

    def random(g, x, buf):
        a = g.call_function(aten.rand_like.default, (buf,))
        b = g.call_function(aten.rand_like.default, (buf,))
        return g.call_function(aten.sub.Tensor, (b, a))

    def split_write(g, x, buf):  # a write into a split's piece: aliases no schema declares
        a = g.call_function(aten.mul.Tensor, (buf, 2))
        piece = g.call_function(operator.getitem, (g.call_function(aten.split.Tensor, (buf, 1)), 0))
        g.call_function(aten.add_.Tensor, (piece, 1))
        b = g.call_function(aten.mul.Tensor, (buf, 2))
        return g.call_function(aten.sub.Tensor, (b, a))
    for build, op in ((written, aten.mul.Tensor), (random, aten.rand_like.default), (split_write, aten.mul.Tensor)):
        g = _graph(build)
        _common_reads(g)
        assert _targets(g).count(op) == 2, build.__name__
    bv = torch.zeros(3, 4)
    got = torch.fx.GraphModule(torch.nn.Module(), _graph(written))(None, bv.clone())
    assert torch.equal(got, torch.full((3, 4), 2.0))


def test_eval_mode_dropout_is_its_input():
    """GPT-2's attention ends in a residual dropout; in eval mode ATen returns its input, and the
    narrow graph holds no ``aten.dropout`` (each cost a dispatch per decode step). Values: the
    masked dense model's."""
    from tests.narrow.test_cached import _pruned, _rel
    model, ref, x = _pruned("gpt2", "uniform", dropout=0.1)  # (eval: _pruned builds it so)
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    assert _rel(got, want) <= 1e-5
    graphs = [e.gm for n, m in model.named_modules() if installed_forward(m) is not None
              and hasattr(installed_forward(m), "entries")
              for es in installed_forward(m).entries.values() for e in es if e.gm is not None]
    assert graphs
    assert not any(n.target is aten.dropout.default for g in graphs for n in g.graph.nodes)
