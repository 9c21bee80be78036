"""FlexAttention (``torch.nn.attention.flex_attention``, as torchtitan uses it): q.k and v.o
couplings like SDPA's where ``score_mod`` and the block mask see only scalar scores and indices,
exact, and the attention region runs narrow. On CPU FlexAttention has no backward: the model is
captured without gradients, and pruned models are run under ``torch.no_grad``."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn

import ecospa
from ecospa.ops import flex as flex_ops
from ecospa.ops.flex import run_flex
from tests.helpers import assert_pruned_equals_masked, param_count

flex = pytest.importorskip("torch.nn.attention.flex_attention")

C, H, HS, T = 32, 4, 16, 16
FLEX_TARGETS = (torch.ops.higher_order.flex_attention, run_flex)  # the op, or the op compiled


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _softcap(score, b, h, q_idx, kv_idx):
    return torch.tanh(score / 5) * 5


class FlexAttention(nn.Module):
    """q/k/v/o ``nn.Linear``; ``kv`` key/value heads (grouped queries when fewer than ``H``); the
    block mask is built once, outside the forward (as torchtitan does); ``alibi``: a score_mod
    that reads the head index (per-head slopes, a constant buffer)."""

    def __init__(self, kv=H, alibi=False):
        super().__init__()
        self.kv, self.alibi = kv, alibi
        self.q, self.o = nn.Linear(C, H * HS), nn.Linear(H * HS, C)
        self.k, self.v = nn.Linear(C, kv * HS), nn.Linear(C, kv * HS)
        self.register_buffer("slopes", torch.tensor([2.0 ** -(i + 1) for i in range(H)]), persistent=False)
        self.block_mask = flex.create_block_mask(_causal, None, None, T, T, device="cpu")

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, HS).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, HS).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, HS).transpose(1, 2)
        score_mod = _softcap
        if self.alibi:
            slopes = self.slopes

            def score_mod(score, bi, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx)
        y = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=self.block_mask,
                                enable_gqa=self.kv != H)
        return self.o(y.transpose(1, 2).reshape(b, t, H * HS))


class Model(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(C)
        self.attn = FlexAttention(**kw)
        self.head = nn.Linear(C, 7)

    def forward(self, x):
        return self.head(x + self.attn(self.norm(x)))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield


def _model(seed=0, grad=False, **kw):
    torch.manual_seed(seed)
    model = Model(**kw).eval()
    model.requires_grad_(grad)
    return model, (torch.randn(2, T, C),)


def test_flex_couplings_are_found_like_sdpa():
    """q.k per head and v.o per head, exact, with parameters that require gradients (captured
    without them: CPU FlexAttention refuses autograd); the output projection's input columns
    belong to the v.o couplings."""
    model, x = _model(grad=True)
    cg = ecospa.auto_couple(model, x)
    qk = [c for c in cg if c.kind == "qk"]
    vo = [c for c in cg if c.kind == "vo"]
    assert len(qk) == H and len(vo) == H and all(c.width == HS for c in qk + vo), cg.summary()
    assert all(c.scope == "attn" for c in qk + vo)
    assert all(any(t.param == "attn.o.weight" and t.dim == 1 for t in c.tables) for c in vo)
    assert not [c for c in cg.inexact if c.name.startswith("attn.")], cg.summary()


def _half_plan(cg, whole_head=None):
    plan = {c: list(range(0, c.width, 2)) for c in cg if c.kind in ("qk", "vo")}
    if whole_head is not None:  # every unit of one head: the head is left out or padded
        for c in cg:
            if c.kind in ("qk", "vo") and c.name.endswith(f"head{whole_head}"):
                plan[c] = list(range(c.width))
    return plan


@pytest.mark.parametrize("kw", [{}, {"kv": 2}, {"alibi": True}], ids=["mha", "gqa", "alibi"])
@pytest.mark.parametrize("whole_head", [None, 1])
def test_flex_pruned_runs_narrow_and_equals_masked_dense(kw, whole_head):
    if whole_head is not None and kw.get("kv"):
        whole_head = 0  # a whole kv group: its query heads go with it
    model, x = _model(**kw)
    cg = ecospa.auto_couple(model, x)
    plan = _half_plan(cg, whole_head)
    n0 = param_count(model)
    with torch.no_grad():
        assert_pruned_equals_masked(model, x, plan, cg=cg, check_inputs=[(torch.randn(3, T, C),)])
    assert param_count(model) < n0
    (rep,) = ecospa.execution_report(model)
    assert rep.narrow_calls >= 2 and rep.fallback_calls == 0, rep


def test_flex_narrow_rule_refuses_heads_left_out_when_score_mod_reads_the_head():
    """With per-head slopes read by index, leaving a head out would renumber the others: the
    layout that drops it is refused and the heads are padded instead (still narrow, exact)."""
    from ecospa.narrow import RegionForward
    from ecospa.ir.record import installed_forward

    for alibi, dropped in ((False, True), (True, False)):
        model, x = _model(alibi=alibi)
        cg = ecospa.auto_couple(model, x)
        ecospa.prune(model, _half_plan(cg, whole_head=1), couplings=cg)
        with torch.no_grad():
            model(*x)
        fwd = installed_forward(model.attn)
        assert isinstance(fwd, RegionForward)
        (entry,) = [e for es in fwd.entries.values() for e in es]
        flex_nodes = [n for n in entry.gm.graph.nodes if n.target in FLEX_TARGETS]
        assert len(flex_nodes) == 1
        feeds = [f() for f in entry.feeds]
        shapes = {}

        class Spy(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target in FLEX_TARGETS:
                    shapes["q"] = tuple(args[0].shape)
                return super().call_function(target, args, kwargs)

        with torch.no_grad():
            Spy(entry.gm).run(*feeds, *x)
        assert shapes["q"][1] == (H - 1 if dropped else H), (alibi, shapes)  # padded: a zero head
        assert shapes["q"][-1] == HS // 2


def test_flex_runs_narrow_with_parameters_that_require_grad():
    model, x = _model(grad=True)
    cg = ecospa.auto_couple(model, x)
    with torch.no_grad():
        assert_pruned_equals_masked(model, x, _half_plan(cg), cg=cg)
    (rep,) = ecospa.execution_report(model)
    assert rep.narrow_calls >= 1 and rep.fallback_calls == 0, rep


def _flex_targets(model) -> list:
    """The targets of the flex nodes in the narrow graphs of ``model.attn`` (after a call)."""
    from ecospa.ir.record import installed_forward

    fwd = installed_forward(model.attn)
    return [n.target for es in fwd.entries.values() for e in es for n in e.gm.graph.nodes
            if n.target in FLEX_TARGETS]


def test_flex_narrow_graph_calls_the_compiled_kernel_and_is_exact():
    """The narrow graph's flex node calls ``run_flex``, which runs the op through torch.compile
    (the fused kernel, as models call flex_attention), not torch's eager reference: exact."""
    model, x = _model()
    cg = ecospa.auto_couple(model, x)
    before = Counter(flex_ops.calls)
    with torch.no_grad():
        assert_pruned_equals_masked(model, x, _half_plan(cg), cg=cg, check_inputs=[(torch.randn(3, T, C),)])
    assert set(_flex_targets(model)) == {run_flex}
    assert flex_ops.calls["compiled"] >= before["compiled"] + 2, flex_ops.calls
    assert flex_ops.calls["eager"] == before["eager"], flex_ops.calls
    (rep,) = ecospa.execution_report(model)
    assert rep.fallback_calls == 0, rep


def test_flex_runs_eagerly_and_exact_when_compiling_is_off_or_fails(monkeypatch):
    """``COMPILE = False``: the eager op; a compiler failure: one EcospaWarning, then the eager op
    for that score_mod / mask_mod. Exact either way."""
    model, x = _model()
    cg = ecospa.auto_couple(model, x)
    plan = _half_plan(cg)
    monkeypatch.setattr(flex_ops, "COMPILE", False)
    before = Counter(flex_ops.calls)
    with torch.no_grad():
        assert_pruned_equals_masked(model, x, plan, cg=cg)
    assert flex_ops.calls["eager"] > before["eager"] and flex_ops.calls["compiled"] == before["compiled"]

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(flex_ops, "COMPILE", True)
    monkeypatch.setattr(flex_ops, "_EAGER", set())
    monkeypatch.setattr(flex_ops, "_compiled", lambda: broken)
    model, x = _model()
    cg = ecospa.auto_couple(model, x)
    before = Counter(flex_ops.calls)
    with pytest.warns(ecospa.EcospaWarning, match="compiling flex_attention failed.*no compiler here"):
        with torch.no_grad():
            assert_pruned_equals_masked(model, x, _half_plan(cg), cg=cg, check_inputs=[(torch.randn(3, T, C),)])
    assert flex_ops.calls["eager"] >= before["eager"] + 2 and flex_ops.calls["compiled"] == before["compiled"]
