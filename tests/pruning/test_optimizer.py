"""Optimizer state follows pruning: sliced like its parameter, and training goes on exactly.

The reference is the dense model with the removed slices zeroed and an optimizer holding the
same state: one more step on both must agree on every surviving entry (Adam, AdamW, SGD with
momentum are element-wise).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch

import ecospa
from tests.helpers import call, delete_indices, masked_copy, plan_units, random_plan, removed_by_param
from tests.models import build

OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=1e-3),
}


def _step(model, opt, inputs):
    opt.zero_grad()
    call(model, inputs).pow(2).mean().backward()
    opt.step()


def _state_by_name(model, opt):
    return {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for n, p in model.named_parameters() if p in opt.state}


def _setup(name, opt_name, seed=0):
    model, inputs = build(name)
    opt = OPTIMIZERS[opt_name](model.parameters())
    for _ in range(2):
        _step(model, opt, inputs)
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(seed))
    return model, inputs, opt, plan


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", ["nanogpt_block", "mlp"])
def test_optimizer_state_is_sliced_like_the_parameters(name, opt_name):
    """Every state tensor shaped like its parameter loses exactly the removed indices."""
    model, inputs, opt, plan = _setup(name, opt_name)
    before = _state_by_name(model, opt)
    removed = removed_by_param(plan_units(plan))
    ecospa.prune(model, plan, optimizer=opt)
    group_params = [p for g in opt.param_groups for p in g["params"]]
    assert len(group_params) == len({id(p) for p in group_params})
    assert {id(p) for p in group_params} == {id(p) for p in model.parameters()}
    for n, p in model.named_parameters():
        state = opt.state[p]
        assert set(before[n]) <= set(state), f"{n}: state keys lost"
        for key, old in before[n].items():
            new = state[key]
            if old.dim() == 0:
                assert torch.equal(new, old), f"{n}.{key} changed"
                continue
            assert new.shape == p.shape, f"{n}.{key}: {tuple(new.shape)} vs {tuple(p.shape)}"
            assert torch.equal(new, delete_indices(old, removed.get(n, {}))), f"{n}.{key}"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", ["nanogpt_block", "alibi"])
def test_training_continues_like_the_masked_dense_model(name, opt_name):
    """One more step after pruning equals a step of the masked dense model on kept entries."""
    model, inputs, opt, plan = _setup(name, opt_name)
    units = plan_units(plan)
    removed = removed_by_param(units)
    twin = masked_copy(model, units)
    twin_opt = OPTIMIZERS[opt_name](twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    ecospa.prune(model, plan, optimizer=opt)
    model.train(), twin.train()
    _step(model, opt, inputs)
    _step(twin, twin_opt, inputs)
    twin_params = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        want = delete_indices(twin_params[n].detach(), removed.get(n, {}))
        # entries whose gradient is zero in exact arithmetic (a k bias under softmax) get
        # rounding noise that Adam normalises to a full step: compare the others
        live = delete_indices(twin_params[n].grad, removed.get(n, {})).abs() > 1e-8
        assert torch.allclose(p.detach()[live], want[live], rtol=1e-4, atol=1e-6), n


def test_param_groups_keep_their_members():
    """With two param groups (decay / no decay) each pruned parameter stays in its group."""
    model, inputs = build("nanogpt_block")
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    other = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=1e-3)
    _step(model, opt, inputs)
    names = {id(p): n for n, p in model.named_parameters()}
    groups_before = [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]
    ecospa.prune(model, random_plan(ecospa.auto_couple(model, inputs), random.Random(1)),
                 optimizer=opt)
    names = {id(p): n for n, p in model.named_parameters()}
    groups_after = [sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups]
    assert groups_after == groups_before
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    _step(model, opt, inputs)


def test_prune_before_any_step_and_then_train():
    """An optimizer without state yet: pruning works and the first step creates sliced state."""
    model, inputs = build("nanogpt_block")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ecospa.prune(model, random_plan(ecospa.auto_couple(model, inputs), random.Random(2)),
                 optimizer=opt)
    _step(model, opt, inputs)
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape


def test_optimizer_state_dict_round_trip_after_pruning():
    """The pruned optimizer's state_dict loads into an optimizer over the pruned parameters."""
    model, inputs, opt, plan = _setup("nanogpt_block", "adam")
    ecospa.prune(model, plan, optimizer=opt)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][key], opt.state[p][key]), key
    twin = copy.deepcopy((model, opt))
    _step(model, fresh, inputs)
    _step(*twin, inputs)  # the original optimizer, on an identical copy: the same update
    for a, b in zip(model.parameters(), twin[0].parameters()):
        assert torch.equal(a, b)
