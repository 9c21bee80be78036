"""Issue 10, during training: non-finite gradients never poison Eq. 6, optimizers that do not hold
the model are refused, ``verify`` restores and raises on a wrong prune, and a prune that fails
inside its transaction leaves nothing behind.
"""
from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch
import torch.nn as nn

import ecospa
from ecospa.pruning import transaction as execution
from tests.tiny_gpt import batch, example, train_step
from tests.helpers import assert_pruned_equals_masked, assert_unchanged, random_plan, snapshot
from tests.helpers import call as call_model
from tests.models import build


# ----------------------------------------------------------------------------- non-finite gradients


def _acc(imp):
    return {s: {k: v.clone() for k, v in acc.items()} for s, acc in imp._acc.items()}


@pytest.mark.parametrize("bad", [(float("nan"),), (float("inf"),), (-float("inf"),), (float("nan"), float("inf"))],
                         ids=["nan", "inf", "-inf", "nan and inf"])
@pytest.mark.parametrize("stats", [("sq",), ("sq", "wg")])
def test_non_finite_gradients_skip_the_step_with_a_warning(gpt, bad, stats):
    """A NaN or Inf in one parameter's gradient: that step adds nothing to any accumulator, is
    not counted in ``num_batches``, and warns (NonFiniteGradientWarning) naming the parameter;
    the scores equal those of a run that never saw the step."""
    model, _, cg = gpt
    imp = ecospa.Importance(model, cg, stats=stats)
    ref = ecospa.Importance(model, cg, stats=stats)
    name, p = next((n, p) for n, p in model.named_parameters() if n.endswith("mlp.c_fc.weight"))
    for i in range(4):
        model.zero_grad()
        x = batch(i)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        if i == 1:
            for j, value in enumerate(bad):
                p.grad[3, 2 + j] = value
            before = _acc(imp)
            with pytest.warns(ecospa.NonFiniteGradientWarning) as warned:
                assert imp.accumulate() is False
            assert len(warned) == 1 and name in str(warned[0].message), [str(w.message) for w in warned]
            assert "skipped" in str(warned[0].message)
            assert imp.num_batches == 1 and imp.skipped == 1
            after = _acc(imp)
            assert all(torch.equal(before[s][k], after[s][k]) for s in before for k in before[s])
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", ecospa.NonFiniteGradientWarning)
            assert imp.accumulate() is True
        ref.accumulate()
    assert imp.num_batches == ref.num_batches == 3
    for method in ("fisher",) + (("taylor",) if "wg" in stats else ()):
        got, want = imp.coupling_scores(method), ref.coupling_scores(method)
        assert all(math.isfinite(v) for v in got.values()) and got == want
    for c in cg:
        assert torch.equal(imp.unit_scores(c), ref.unit_scores(c))


def test_ecospa_skips_non_finite_steps_and_still_prunes(gpt):
    """Through EcoSpa: the NaN and Inf steps warn and are not counted; the round plans on the
    finite steps alone (the same removal as a run that never saw the bad steps)."""
    model, opt, cg = gpt
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    twin_opt.load_state_dict(opt.state_dict())
    sp = ecospa.EcoSpa(model, opt, 0.8, couplings=cg, every=4)
    ref = ecospa.EcoSpa(twin, twin_opt, 0.8, couplings=cg, every=2)  # sees only the 2 finite steps
    p = dict(model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        for i in range(4):
            x = batch(i)
            opt.zero_grad()
            model.loss(x[:, :-1], x[:, 1:]).backward()
            if i in (1, 2):
                p.grad[0, 0] = float("nan") if i == 1 else float("inf")
            event = sp.step()  # statistics before the optimizer step, which would spread the NaN
            if i < 3:
                assert sp.importance.num_batches == 1  # the NaN and Inf steps are not counted
            else:
                twin_opt.zero_grad()
                twin.loss(x[:, :-1], x[:, 1:]).backward()
                ref_event = ref.step()
            if i == 0:
                twin_opt.zero_grad()
                twin.loss(x[:, :-1], x[:, 1:]).backward()
                ref.step()
    assert event is not None and event.units_removed > 0
    assert ref_event is not None and event.removals == ref_event.removals
    msgs = [str(w.message) for w in warned if issubclass(w.category, ecospa.NonFiniteGradientWarning)]
    assert len(msgs) == 2 and all("transformer.h.0.attn.c_attn.weight" in m for m in msgs), msgs


# ----------------------------------------------------------------------------- optimizers


def test_ecospa_refuses_an_optimizer_that_does_not_hold_the_model(gpt):
    model, opt, cg = gpt
    snap = snapshot(model, opt)
    other = torch.optim.Adam(build("mlp")[0].parameters())
    with pytest.raises(ecospa.PruneError, match="none of this model"):
        ecospa.EcoSpa(model, other, 0.5, couplings=cg)
    some = torch.optim.Adam([p for n, p in model.named_parameters() if "attn" in n])
    with pytest.raises(ecospa.PruneError, match="does not hold"):
        ecospa.EcoSpa(model, some, 0.5, couplings=cg)
    assert_unchanged(model, snap, opt)


def test_an_optimizer_that_loses_parameters_later_fails_the_round_and_changes_nothing(gpt):
    """The executor's check at prune time, through EcoSpa: PruneError from ``sp.step()``, and the
    model, the optimizer and EcoSpa (rounds, events, plan) are as before."""
    model, opt, cg = gpt
    sp = ecospa.EcoSpa(model, opt, 0.8, couplings=cg, every=2)
    train_step(model, opt, 1)
    sp.step()
    train_step(model, opt, 2)
    opt.param_groups[0]["params"] = opt.param_groups[0]["params"][:2]
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.PruneError, match="does not hold"):
        sp.step()
    assert_unchanged(model, snap, opt)
    assert (sp.rounds, sp.events, len(sp.plan), sp.importance.num_batches) == (0, [], 0, 2)


# ----------------------------------------------------------------------------- EcoSpa(verify=True)


def test_ecospa_verify_passes_on_correct_prunes(gpt):
    model, opt, cg = gpt
    sp = ecospa.EcoSpa(model, opt, 0.7, couplings=cg, every=2, top_k=0.5, verify=True)
    for i in range(40):
        train_step(model, opt, i)
        sp.step()
        if sp.done:
            break
    assert sp.done and len(sp.events) >= 2


def test_ecospa_verify_restores_and_raises_on_a_wrong_prune(gpt, monkeypatch):
    model, opt, cg = gpt
    sp = ecospa.EcoSpa(model, opt, 0.7, example_inputs=example(), every=2, verify=True)
    train_step(model, opt, 1)
    sp.step()
    train_step(model, opt, 2)
    real = execution.update_forwards

    def sabotage(model_, resolved, tx, **kw):  # a wrong slice: one weight's rows reversed
        real(model_, resolved, tx, **kw)
        mod = model_.transformer.h[0].mlp.c_proj
        tx.set_item(mod._parameters, "weight", nn.Parameter(mod.weight.detach().flip(0)))

    monkeypatch.setattr("ecospa.pruning.apply.update_forwards", sabotage)
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.PruneError, match="verify"):
        sp.step()
    assert_unchanged(model, snap, opt)
    assert ecospa.param_records(model) == {}
    assert (sp.rounds, sp.events, len(sp.plan)) == (0, [], 0)
    monkeypatch.undo()
    event = sp.prune_now()  # the statistics are still there: the same round now succeeds
    assert event is not None and event.step == 2 and sp.rounds == 1


def test_ecospa_verify_needs_example_inputs():
    model, x = build("mlp")
    cg = ecospa.auto_couple(model, x)
    bare = ecospa.CouplingGraph(cg.all, shapes=cg.shapes, kept=cg.kept)  # no inputs recorded
    with pytest.raises(ecospa.ConfigError, match="example_inputs"):
        ecospa.EcoSpa(model, None, 0.5, couplings=bare, verify=True)
    ecospa.EcoSpa(model, None, 0.5, couplings=bare)  # fine without verify
    ecospa.EcoSpa(model, None, 0.5, couplings=cg, verify=True)  # the couplings carry their inputs


def test_prune_verify_with_a_random_plan_passes():
    model, x = build("nanogpt_block")
    cg = ecospa.auto_couple(model, x)
    ecospa.prune(model, random_plan(cg, random.Random(0)), couplings=cg, verify=True)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rolled_back_prune_leaves_no_empty_record_or_buffer_slot(monkeypatch, when):
    """A failure inside the transaction (before or after the forwards are installed) undoes
    everything: no empty removal record, no registered-but-empty buffer slot, no forward."""
    model, x = build("nanogpt_block")
    cg = ecospa.auto_couple(model, x)
    opt = torch.optim.Adam(model.parameters())
    call_model(model, x).sum().backward()
    opt.step()
    snap = snapshot(model, opt)
    real = execution.update_forwards

    def boom(*args, **kwargs):
        if when == "after":
            real(*args, **kwargs)
        raise RuntimeError("injected failure")

    monkeypatch.setattr("ecospa.pruning.apply.update_forwards", boom)
    with pytest.raises(RuntimeError, match="injected"):
        ecospa.prune(model, {c: [0] for c in cg}, opt, couplings=cg)
    assert_unchanged(model, snap, opt)
    assert ecospa.param_records(model) == {}
    monkeypatch.undo()
    assert_pruned_equals_masked(model, x, {c: [0] for c in cg}, cg=cg)  # and it still prunes
