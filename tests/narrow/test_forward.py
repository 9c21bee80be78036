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
