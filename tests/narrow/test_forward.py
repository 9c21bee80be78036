"""Narrow execution: pruned attention runs a rewritten graph at its kept widths, exactly, and
falls back to the exact scatter path, with a reason, where it cannot."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from tests.helpers import (assert_close_outputs, assert_pruned_equals_masked, call, masked_copy,
                           plan_units, random_plan)
from tests.models import CASES, build

ATTENTION = ["nanogpt_block", "nanogpt", "llama_rope_half", "llama_rope_interleaved", "llama_mqa_no_rope",
             "alibi", "cross_attention", "per_head_modulelist", "nn_multihead_attention", "qk_norm",
             "fused_glu"]


def _outer(model):
    """Reports of the regions that are not inside another region (those run the calls)."""
    reps = ecospa.execution_report(model)
    paths = [r.path for r in reps]
    return [r for r in reps if not any(r.path.startswith(p + ".") or (p == "" and r.path)
                                       for p in paths if p != r.path)]


def _uniform_plan(cg, rng, frac=0.5):
    """The same number of units removed from every coupling of a width group (uniform heads)."""
    plan, groups = {}, {}
    for c in cg:
        groups.setdefault(c.group, []).append(c)
    for cs in groups.values():
        k = max(1, int(min(c.width for c in cs) * frac))
        for c in cs:
            if c.width > k:
                plan[c] = sorted(rng.sample(range(c.width), k))
    return plan


def _strategies(model) -> set[str]:
    """The ladder rungs (``forward.LADDER``, or ``"grouped"``) that built the narrow graphs so far."""
    from ecospa.narrow import RegionForward
    from ecospa.ir.record import installed_forward

    out = set()
    for m in model.modules():
        fwd = installed_forward(m)
        if isinstance(fwd, RegionForward):
            out |= {row["strategy"] for row in fwd.report() if row["path"] == "narrow"}
    return out


EXACT = {"dropped-heads exact-projections", "kept-heads exact-projections"}


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_runs_narrow_and_exact(name):
    """A random third of every coupling removed: exact on the example and other sizes, and every
    call of every outer region served by a narrow graph."""
    model, inputs = build(name)
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(0))
    others = [CASES[name].inputs(3, 5), CASES[name].inputs(1, 2)]
    assert_pruned_equals_masked(model, inputs, plan, check_inputs=others)
    reports = _outer(model)
    assert reports, "no narrow region installed"
    for r in reports:
        assert r.narrow, f"{r.path}: {r.fallback_calls} calls fell back: {r.reasons}"


@pytest.mark.parametrize("name", ["nanogpt_block", "llama_rope_half", "llama_rope_interleaved"])
def test_uniform_heads_need_no_padding_ragged_heads_are_padded(name):
    """Equal widths per head: the live weights are used as they are. Ragged heads: the
    projections still run on the live weights at the exact kept widths, and only the head views
    carry padding units (scattered in with zeros); both exact."""
    model, inputs = build(name)
    cg = ecospa.auto_couple(model, inputs)
    uniform = copy.deepcopy(model)
    assert_pruned_equals_masked(uniform, inputs, _uniform_plan(cg, random.Random(1)))
    assert _strategies(uniform) == {"dropped-heads exact-projections"}
    ragged = {c: [0] for c in cg if c.kind in ("qk", "vo") and c.name.endswith("0") and c.width > 1}
    assert ragged
    assert_pruned_equals_masked(model, inputs, ragged)
    assert _strategies(model) and _strategies(model) <= EXACT
    assert all(r.narrow for r in _outer(model))


@pytest.mark.parametrize("name", ["llama_rope_half", "fused_glu", "cross_attention"])
def test_gradients_through_the_narrow_graph_equal_masked_gradients(name):
    model, inputs = build(name)
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(2))
    units = plan_units(plan)
    ref = masked_copy(model, units)
    ecospa.prune(model, plan)
    model.train(), ref.train()
    for m in (model, ref):
        call(m, inputs).pow(2).mean().backward()
    assert all(r.narrow for r in _outer(model))
    removed = {}
    for u in units:
        for p, d, i in u:
            removed.setdefault(p, {}).setdefault(d, set()).add(i)
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        want = ref_grads[n].grad
        for d, idx in removed.get(n, {}).items():
            keep = [i for i in range(want.shape[d]) if i not in idx]
            want = want.index_select(d, torch.tensor(keep))
        assert torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6), n


def test_dropout_in_training_runs_narrow_checked_through_its_eval_twin():
    """nanoGPT with dropout 0.1: train() runs a narrow graph with dropout (outputs vary), checked
    once through the eval-mode graph; eval() is exact."""
    model, inputs = build("nanogpt")
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(3))
    ref = masked_copy(model, plan_units(plan)).eval()
    ecospa.prune(model, plan)
    model.train()
    with torch.no_grad():
        a, b = model(*inputs), model(*inputs)
    assert not torch.allclose(a, b)
    assert all(r.narrow for r in _outer(model))
    model.eval()
    with torch.no_grad():
        assert_close_outputs(model(*inputs), ref(*inputs))


class Memo:
    """A Python object argument (like a KV cache): a graph cannot update it."""

    def __init__(self):
        self.seen = 0


class AttnWithMemo(nn.Module):
    def __init__(self, d=16, h=4):
        super().__init__()
        self.h = h
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x, memo=None):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in self.qkv(x).split(c, -1))
        if memo is not None:
            memo.seen += 1
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.o(y)


def test_a_call_with_python_state_falls_back_with_the_reason():
    model = AttnWithMemo().eval()
    x = torch.randn(2, 5, 16)
    plan = random_plan(ecospa.auto_couple(model, (x,)), random.Random(4))
    ref = masked_copy(model, plan_units(plan)).eval()
    ecospa.prune(model, plan)
    memo = Memo()
    with torch.no_grad():
        assert_close_outputs(model(x, memo), ref(x))
        assert_close_outputs(model(x), ref(x))
    assert memo.seen == 1  # the fallback ran the model's own code, side effects included
    (rep,) = ecospa.execution_report(model)
    assert rep.narrow_calls == 1 and rep.fallback_calls == 1
    assert "Memo" in rep.reasons[0] and "state" in rep.reasons[0]


def test_a_wrong_narrow_graph_is_caught_and_the_call_falls_back(monkeypatch):
    """A narrow rule that computes something else (here: a wrong attention scale) is caught by
    the first-call check; that signature runs on the exact fallback, with the reason."""
    import dataclasses

    from ecospa.ops import OPS

    def bad_sdpa(b, node):
        kwargs = dict(node.kwargs, scale=1.0)
        b.zero[node] = True
        return b.copy(node, kwargs=kwargs)

    key = torch.ops.aten.scaled_dot_product_attention
    monkeypatch.setitem(OPS, key, dataclasses.replace(OPS[key], narrow=bad_sdpa))
    model, inputs = build("nanogpt_block")
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(5))
    assert_pruned_equals_masked(model, inputs, plan)
    (rep,) = ecospa.execution_report(model)
    assert rep.narrow_calls == 0 and rep.refusals == ("mismatch",) and "exact path" in rep.reasons[0]


@pytest.mark.parametrize("name", ["nanogpt_block", "llama_rope_interleaved"])
def test_ragged_projections_run_at_exact_widths_with_the_all_padded_layout_as_the_next_try(name, monkeypatch):
    """Ragged heads: the projections multiply the live (exact) weights and only the head views
    are padded. Where that mixed layout cannot be built, the all-padded one (weights laid out
    with zero slices) still serves the call narrow and exact."""
    import ecospa.narrow.forward as forward
    from ecospa.narrow.entry import LADDER

    model, inputs = build(name)
    cg = ecospa.auto_couple(model, inputs)
    # head 0 loses one unit, the others half: ragged in every layer
    plan = {c: list(range(1 if c.name.endswith("head0") else c.width // 2))
            for c in cg if c.kind in ("qk", "vo") and c.width > 2}
    twin = copy.deepcopy(model)
    assert_pruned_equals_masked(model, inputs, plan, cg=cg)
    assert _strategies(model) and _strategies(model) <= EXACT
    assert all(r.narrow for r in _outer(model))

    # the ladder without its exact-projection rungs: what serves a call whose mixed layout
    # cannot be built
    monkeypatch.setattr(forward, "LADDER", tuple(s for s in LADDER if not s.exact))
    assert_pruned_equals_masked(twin, inputs, plan, cg=cg)
    assert _strategies(twin) and all(s.endswith("padded") for s in _strategies(twin))
    assert all(r.narrow for r in _outer(twin))


@pytest.mark.parametrize("name", ["llama_rope_half", "nanogpt"])
def test_a_first_call_under_inference_mode_runs_narrow_and_later_trains(name):
    """Evaluation loops run under ``torch.inference_mode``: the first call there must build the
    narrow graph (export cannot trace inference tensors), and the same graph must then serve a
    call with gradients (no inference tensors kept inside it)."""
    model, inputs = build(name)
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(3))
    ref = masked_copy(model, plan_units(plan)).eval()
    ecospa.prune(model, plan)
    model.eval()
    with torch.inference_mode():
        got = call(model, inputs)
    with torch.no_grad():
        assert_close_outputs(got, call(ref, inputs))
    reports = _outer(model)
    assert reports and all(r.narrow for r in reports), [r.reasons for r in reports]
    call(model, inputs).pow(2).mean().backward()  # eval mode, gradients on: a signature of its own
    assert all(r.signatures == 2 and r.fallback_calls == 0 for r in _outer(model))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pruning_again_rebuilds_the_narrow_graphs():
    model, inputs = build("llama_rope_half")
    cg = ecospa.auto_couple(model, inputs)
    plan = random_plan(cg, random.Random(6), frac=0.25)
    assert_pruned_equals_masked(model, inputs, plan, cg=cg)
    cg2 = ecospa.remaining(cg, plan)
    assert_pruned_equals_masked(model, inputs, random_plan(cg2, random.Random(7), frac=0.25), cg=cg2)
    assert all(r.narrow for r in _outer(model))


def test_narrow_false_keeps_the_scatter_path_only():
    model, inputs = build("nanogpt_block")
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(8))
    ref = masked_copy(model, plan_units(plan)).eval()
    ecospa.prune(model, plan, narrow=False)
    with torch.no_grad():
        assert_close_outputs(model(*inputs), ref(*inputs))
    assert ecospa.execution_report(model) == []


def test_copies_of_a_pruned_model_rebuild_their_own_graphs():
    model, inputs = build("nanogpt_block")
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(9))
    ecospa.prune(model, plan)
    with torch.no_grad():
        out = model(*inputs)
        twin = copy.deepcopy(model)
        assert torch.allclose(twin(*inputs), out, atol=1e-6)
    assert _outer(twin)[0].narrow


@pytest.mark.parametrize("name", ["nanogpt_block", "llama_rope_half"])
def test_qk_and_v_of_different_widths_keep_the_fused_attention_kernel(name):
    """q/k heads narrower (or wider) than v heads: SDPA's fused CPU kernel needs one head width,
    so the narrower side is padded with zero channels for the call; exact, gradients too."""
    for drop_kind, keep in (("qk", "vo"), ("vo", "qk")):
        model, inputs = build(name)
        cg = ecospa.auto_couple(model, inputs)
        plan = {c: list(range(c.width // 2)) for c in cg if c.kind == drop_kind and c.width > 1}
        assert plan
        ref = masked_copy(model, plan_units(plan))
        assert_pruned_equals_masked(model, inputs, plan)
        with _SDPAShapes() as rec, torch.no_grad():
            call(model, inputs)
        assert rec.qkv and all(q[-1] == k[-1] == v[-1] for q, k, v in rec.qkv), rec.qkv  # one head width
        assert all(r.narrow for r in _outer(model))
        model.train(), ref.train()
        for m in (model, ref):
            call(m, inputs).pow(2).mean().backward()
        assert all(r.narrow for r in _outer(model))
        grads = dict(ref.named_parameters())
        for n, p in model.named_parameters():
            if p.shape == grads[n].shape:
                assert torch.allclose(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6), (name, drop_kind, n)


class _SDPAShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the query shape (``shapes``) and the q, k, v shapes (``qkv``) of every attention
    kernel call."""

    def __init__(self):
        super().__init__()
        self.shapes, self.qkv = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.shapes.append(tuple(args[0].shape))
            self.qkv.append(tuple(tuple(a.shape) for a in args[:3]))
        return func(*args, **(kwargs or {}))


def _whole_heads_plan(cg, rng, heads=(0,)):
    """Every unit of the given heads (q.k and v.o) removed, a random third of every other coupling."""
    plan = {}
    for c in cg:
        if c.kind in ("qk", "vo") and any(c.name.endswith(f"head{h}") for h in heads):
            plan[c] = list(range(c.width))
        elif c.width > 2:
            plan[c] = sorted(rng.sample(range(c.width), c.width // 3))
    return plan


@pytest.mark.parametrize("name", ["nanogpt_block", "llama_rope_half", "llama_rope_interleaved",
                                  "llama_mqa_no_rope"])
def test_whole_heads_removed_are_left_out_not_padded(name):
    """A head whose q.k and v.o units all went is dropped from the narrow graph (the attention
    kernel sees fewer heads): exact, gradients too."""
    model, inputs = build(name)
    cg = ecospa.auto_couple(model, inputs)
    heads = {c.name.rsplit("head", 1)[1] for c in cg if c.kind == "qk" and "head" in c.name}
    if len(heads) < 2:
        pytest.skip("a single query/key head: nothing to drop beside it")
    with _SDPAShapes() as rec:
        with torch.no_grad():
            call(model, inputs)
    dense_heads = [s[1] for s in rec.shapes]
    ref_model = copy.deepcopy(model)
    plan = _whole_heads_plan(cg, random.Random(0))
    assert_pruned_equals_masked(model, inputs, plan, check_inputs=[CASES[name].inputs(3, 5)])
    assert all(r.narrow for r in _outer(model))
    with _SDPAShapes() as rec:
        with torch.no_grad():
            call(model, inputs)
    if dense_heads and rec.shapes:  # models that call SDPA: one KV group's query heads fewer per call
        groups = len(heads)
        want = [h * (groups - 1) // groups for h in dense_heads[:len(rec.shapes)]]
        assert [s[1] for s in rec.shapes] == want, (rec.shapes, dense_heads)
    # gradients through the dropped-head graph equal the masked model's
    ref = masked_copy(ref_model, plan_units(plan))
    model.train(), ref.train()
    for m in (model, ref):
        call(m, inputs).pow(2).mean().backward()
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if p.shape == grads[n].shape and p.grad is not None:
            assert torch.allclose(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6), n


def test_a_head_losing_only_its_qk_units_is_padded_not_dropped():
    """q.k of head 0 removed, its v.o kept: the head still contributes (uniform attention over
    its values), so it must stay; the graph pads it and stays exact."""
    model, inputs = build("nanogpt_block")
    cg = ecospa.auto_couple(model, inputs)
    plan = {c: list(range(c.width)) for c in cg if c.kind == "qk" and c.name.endswith("head0")}
    assert plan
    with _SDPAShapes() as rec:
        with torch.no_grad():
            call(model, inputs)
    dense_heads = [s[1] for s in rec.shapes]
    assert_pruned_equals_masked(model, inputs, plan)
    assert all(r.narrow for r in _outer(model))
    with _SDPAShapes() as rec:
        with torch.no_grad():
            call(model, inputs)
    assert dense_heads and [s[1] for s in rec.shapes] == dense_heads  # every head still attends


def test_pruning_again_never_exports_again(monkeypatch):
    """A capture of the dense view does not depend on the widths kept: later rounds of pruning
    rewrite the same captures (issue 21: cheap rounds), and stay exact."""
    import ecospa.narrow.forward as fwd_mod

    model, inputs = build("nanogpt")
    cg = ecospa.auto_couple(model, inputs)
    plan = random_plan(cg, random.Random(8), frac=0.25)
    assert_pruned_equals_masked(model, inputs, plan, cg=cg)
    exports = []
    real = fwd_mod.export_call
    own = {id(m) for m in model.modules()}  # (the masked references are copies with their own)

    def counted(module, *a, **k):
        if id(module) in own:
            exports.append(module)
        return real(module, *a, **k)
    monkeypatch.setattr(fwd_mod, "export_call", counted)
    for seed in (9, 10):
        cg = ecospa.remaining(cg, plan)
        plan = random_plan(cg, random.Random(seed), frac=0.25)
        assert_pruned_equals_masked(model, inputs, plan, cg=cg)
    assert all(r.narrow for r in _outer(model))
    assert exports == [], f"{len(exports)} exports after the first round"


# -- complex rotary (Meta's reference Llama, torchtitan): pairs as complex numbers ------------

def _meta_apply_rotary_emb(xq, xk, freqs_cis):
    """Meta's Llama ``apply_rotary_emb`` as written there (and in torchtitan)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    shape = [d if i == 1 or i == xq_.ndim - 1 else 1 for i, d in enumerate(xq_.shape)]
    freqs_cis = freqs_cis.view(*shape)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class _ComplexRopeAttention(nn.Module):
    def __init__(self, d, h, kv):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.wq = nn.Linear(d, h * self.hd, bias=False)
        self.wk = nn.Linear(d, kv * self.hd, bias=False)
        self.wv = nn.Linear(d, kv * self.hd, bias=False)
        self.wo = nn.Linear(h * self.hd, d, bias=False)

    def forward(self, x, freqs_cis):
        b, t, _ = x.shape
        xq = self.wq(x).view(b, t, self.h, self.hd)
        xk = self.wk(x).view(b, t, self.kv, self.hd)
        xv = self.wv(x).view(b, t, self.kv, self.hd)
        xq, xk = _meta_apply_rotary_emb(xq, xk, freqs_cis)
        xk = torch.repeat_interleave(xk, self.h // self.kv, dim=2)
        xv = torch.repeat_interleave(xv, self.h // self.kv, dim=2)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(b, t, -1))


class _ComplexRopeLlama(nn.Module):
    """Two blocks of attention with complex rotary and a SwiGLU FFN; the table is a complex buffer."""

    def __init__(self, d=32, h=4, kv=2, max_len=16):
        super().__init__()
        self.attn = nn.ModuleList(_ComplexRopeAttention(d, h, kv) for _ in range(2))
        self.w1, self.w3, self.w2 = nn.Linear(d, 48, bias=False), nn.Linear(d, 48, bias=False), nn.Linear(48, d, bias=False)
        hd = d // h
        freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        angles = torch.outer(torch.arange(max_len).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, x):
        f = self.freqs_cis[: x.shape[1]]
        for a in self.attn:
            x = x + a(x, f)
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("uniform", [True, False])
def test_complex_rotary_couples_q_k_per_head_and_runs_narrow(kv, uniform):
    """``view_as_complex`` joins each pair (2i, 2i + 1) into one unit, the complex product with
    the label-free table keeps the labels, ``view_as_real`` gives both parts back: q.k couples
    per kv head as for the real rotary (MHA, GQA, MQA), pruned == masked dense, attention narrow."""
    torch.manual_seed(0)
    model = _ComplexRopeLlama(kv=kv).eval()
    inputs = (torch.randn(2, 6, 32),)
    cg = ecospa.auto_couple(model, inputs)
    qk = [c for c in cg.all if c.kind == "qk"]
    assert len(qk) == 2 * kv and all(c.exact and c.width == 4 for c in qk), cg.summary()
    for c in qk:  # every unit holds whole pairs (2i, 2i + 1) of q rows and of k rows
        for u in c.units():
            for p in ("wq.weight", "wk.weight"):
                rows = {i for name, _, i in u if name.endswith(p)}
                assert rows and rows == {i ^ 1 for i in rows}, u
    assert len([c for c in cg if c.kind == "vo"]) == 2 * kv and [c.kind for c in cg if c.kind == "glu"] == ["glu"]
    rng = random.Random(kv)
    plan = _uniform_plan(cg, rng) if uniform else random_plan(cg, rng)
    assert_pruned_equals_masked(model, inputs, plan, cg=cg,
                                check_inputs=[(torch.randn(1, 3, 32),), (torch.randn(3, 9, 32),)])
    reports = _outer(model)
    assert len(reports) == 2
    for r in reports:
        assert r.narrow_calls and not r.fallback_calls, f"{r.path}: {r.reasons}"
