"""Issue 10, bad input: every mistake a user can make gets an ``EcospaError`` that names the thing
at fault and the way out, and leaves the model and the optimizer exactly as they were.

Here: ops without a rule, nothing to prune, couplings of another model or state, bad unit
indices and names. Knobs and targets: test_reliability_config.py; gradients, optimizers and
``verify``: test_reliability_training.py; plan JSON: test_errors.py. The subject (``gpt``) is in
conftest.py.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import ecospa
from tests.tiny_gpt import example, train_step
from tests.helpers import assert_pruned_equals_masked, assert_unchanged, snapshot
from tests.models import build


# ----------------------------------------------------------------------------- ops without a rule


class RolledFFN(nn.Module):
    """``fc -> relu -> (+ roll over channels) -> out``: ``torch.roll`` has no channel rule, so the
    hidden channels mix with their neighbours; a second, plain FFN stays exact."""

    def __init__(self, branch: bool = True):
        super().__init__()
        self.branch = branch
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 8)
        self.fc2, self.out2 = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        h = h + torch.roll(h, 1, dims=-1) if self.branch else torch.roll(h, 1, dims=-1)
        return x + self.out(h) + self.out2(torch.relu(self.fc2(x)))


def test_an_op_without_a_rule_makes_its_coupling_inexact_with_the_op_named():
    """Never a wrong prune: the rolled FFN is inexact and says ``roll`` has no channel rule;
    prune refuses it (by object and by name) and changes nothing; the plain FFN still prunes."""
    torch.manual_seed(0)
    model, x = RolledFFN(), (torch.randn(3, 8),)
    opt = torch.optim.Adam(model.parameters())
    cg = ecospa.auto_couple(model, x)
    rolled = [c for c in cg.inexact if "roll" in c.reason]
    assert len(rolled) == 1 and "no channel rule" in rolled[0].reason, cg.summary()
    assert {"fc.weight", "out.weight"} <= set(rolled[0].params), cg.summary()
    assert len(cg) == 1 and "fc2.weight" in cg[0].params, cg.summary()
    snap = snapshot(model, opt)
    for key in (rolled[0], rolled[0].name):
        with pytest.raises(ecospa.PlanError, match="not exact") as err:
            ecospa.prune(model, {key: [0]}, optimizer=opt, couplings=cg)
        assert "roll" in str(err.value) and rolled[0].name in str(err.value)
    assert_unchanged(model, snap, opt)
    assert_pruned_equals_masked(model, x, {cg[0]: [0, 3]}, cg=cg)


def test_an_op_without_a_rule_on_the_only_path_offers_nothing_exact():
    """With the roll on the only path from fc to out, no coupling on fc/out is offered; the one
    on out's columns is listed inexact and refused."""
    torch.manual_seed(0)
    model, x = RolledFFN(branch=False), (torch.randn(3, 8),)
    cg = ecospa.auto_couple(model, x)
    assert all("fc.weight" not in c.params and "out.weight" not in c.params for c in cg), cg.summary()
    reading = [c for c in cg.inexact if "out.weight" in c.params]
    assert reading, cg.summary()
    snap = snapshot(model)
    with pytest.raises(ecospa.PlanError, match="not exact"):
        ecospa.prune(model, {reading[0]: [0]})
    assert_unchanged(model, snap)


# ----------------------------------------------------------------------------- nothing to prune


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x)


class NormedFFN(nn.Module):
    """Only an inexact coupling: a LayerNorm over the hidden channels."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.out(torch.relu(self.norm(self.fc(x))))


@pytest.mark.parametrize("model_cls, why", [(OneLinear, "model input"), (NormedFFN, "layer_norm")])
def test_ecospa_on_a_model_with_nothing_to_prune_says_so_and_why(model_cls, why):
    torch.manual_seed(0)
    model, x = model_cls(), (torch.randn(3, 8),)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(*x).sum().backward()
    opt.step()
    snap = snapshot(model, opt)
    assert len(ecospa.auto_couple(model, x)) == 0
    with pytest.raises(ecospa.ConfigError, match="nothing to prune") as err:
        ecospa.EcoSpa(model, opt, 0.5, example_inputs=x)
    assert why in str(err.value) and model_cls.__name__ in str(err.value), str(err.value)
    assert_unchanged(model, snap, opt)


def test_prune_by_name_on_a_model_with_nothing_to_prune():
    """A name that is not there: PlanError naming it; the name of an inexact coupling: PlanError
    with its reason."""
    torch.manual_seed(0)
    model, x = NormedFFN(), (torch.randn(3, 8),)
    cg = ecospa.auto_couple(model, x)
    snap = snapshot(model)
    with pytest.raises(ecospa.PlanError, match="no coupling named 'ffn.0.typo'"):
        ecospa.prune(model, {"ffn.0.typo": [0]}, couplings=cg)
    inexact = cg.inexact[0]
    with pytest.raises(ecospa.PlanError, match="not exact") as err:
        ecospa.prune(model, {inexact.name: [0]}, couplings=cg)
    assert inexact.reason in str(err.value)
    assert_unchanged(model, snap)


def test_prune_by_unknown_name_says_there_is_nothing_to_prune():
    torch.manual_seed(0)
    model, x = NormedFFN(), (torch.randn(3, 8),)
    with pytest.raises(ecospa.PlanError, match="nothing to prune"):
        ecospa.prune(model, {"ffn.1": [0]}, couplings=ecospa.auto_couple(model, x))


# ----------------------------------------------------------------------------- another model, stale


def test_coupling_of_a_same_named_model_of_other_sizes_is_refused():
    """Same parameter names, other widths: the stamps differ, PlanError says to call auto_couple."""
    small = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    big = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 4))
    c = ecospa.auto_couple(big, (torch.randn(2, 8),))[0]
    snap = snapshot(small)
    with pytest.raises(ecospa.PlanError, match="auto_couple") as err:
        ecospa.prune(small, {c: [0]})
    assert c.name in str(err.value)
    assert_unchanged(small, snap)


def test_stale_couplings_by_name_are_refused(gpt):
    """Names looked up in a graph found before the last prune: stale, refused."""
    model, opt, cg = gpt
    ffn = next(c for c in cg if c.kind == "ffn")
    ecospa.prune(model, {ffn: [0, 1]}, optimizer=opt)
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.PlanError, match="stale"):
        ecospa.prune(model, {ffn.name: [2]}, optimizer=opt, couplings=cg)
    assert_unchanged(model, snap, opt)
    ecospa.prune(model, {ffn.name: [2]}, optimizer=opt, couplings=ecospa.remaining(cg, {ffn: [0, 1]}))


def test_ecospa_refuses_couplings_of_another_model_or_state(gpt):
    """EcoSpa checks its couplings up front (not at the first round, many steps later)."""
    model, opt, cg = gpt
    other, other_x = build("mlp")
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.EcospaError, match="another model|auto_couple"):
        ecospa.EcoSpa(model, opt, 0.5, couplings=ecospa.auto_couple(other, other_x))
    twin = copy.deepcopy(model)  # pruned differently to the same sizes
    qk = [c for c in cg if c.kind == "qk"]
    ecospa.prune(model, {qk[0]: [0]}, optimizer=opt)
    ecospa.prune(twin, {qk[1]: [0]})
    snap = snapshot(model, opt)
    for stale in (cg, ecospa.auto_couple(twin, example())):
        with pytest.raises(ecospa.PlanError, match="stale"):
            ecospa.EcoSpa(model, opt, 0.5, couplings=stale)
        assert_unchanged(model, snap, opt)
    ecospa.EcoSpa(model, opt, 0.5, couplings=ecospa.remaining(cg, {qk[0]: [0]}))


# ----------------------------------------------------------------------------- unit indices

TYPE, RANGE, TWICE = "list of unit indices (ints)", "indices are 0..", "list each unit once"
BAD_INDICES = {  # the indices, and the way out the message must give
    "float": ([0.5], TYPE), "integral float": ([1.0], TYPE), "numpy float": ([np.float64(1.0)], TYPE),
    "bool": ([True], TYPE), "numpy bool": ([np.bool_(True)], TYPE), "string": (["1"], TYPE),
    "None": ([None], TYPE), "not a list": (3, TYPE), "None instead of a list": (None, TYPE),
    "string instead of a list": ("01", TYPE), "negative": ([-1], RANGE), "out of range": ([10_000], RANGE),
    "duplicated": ([2, 2], TWICE), "huge": ([1 << 70], RANGE), "mixed float": ([1, 2.5], TYPE),
    "float tensor": (torch.tensor([1.0]), TYPE), "2-D array": (np.array([[0, 1]]), TYPE),
}


@pytest.mark.parametrize("case", list(BAD_INDICES))
def test_bad_unit_indices_raise_plan_error_naming_the_coupling(gpt, case):
    model, opt, cg = gpt
    c = next(c for c in cg if c.kind == "ffn")
    idx, way_out = BAD_INDICES[case]
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.PlanError) as err:
        ecospa.prune(model, {c: idx}, optimizer=opt)
    assert c.name in str(err.value) and way_out in str(err.value), str(err.value)
    assert_unchanged(model, snap, opt)


@pytest.mark.parametrize("idx", [[True, 2], [[0, 1]], {0: 1}], ids=["bool among ints", "nested", "dict"])
def test_indices_numpy_would_coerce_are_refused(gpt, idx):
    """Never coerced: numpy would read [True, 2] as [1, 2], flatten [[0, 1]], take a dict's keys."""
    model, opt, cg = gpt
    c = next(c for c in cg if c.kind == "ffn")
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.PlanError) as err:
        ecospa.prune(model, {c: idx}, optimizer=opt)
    assert TYPE in str(err.value) and c.name in str(err.value), str(err.value)
    assert_unchanged(model, snap, opt)


def test_integer_like_indices_are_accepted(gpt):
    """numpy ints, int tensors, sets and ranges are fine."""
    model, _, cg = gpt
    c = next(c for c in cg if c.kind == "ffn")
    for idx in ([np.int32(1)], torch.tensor([0, 3]), {4, 2}, range(5, 7), np.array([7])):
        assert_pruned_equals_masked(copy.deepcopy(model), example(), {c: idx}, cg=cg)


def test_direct_prune_may_empty_a_coupling_min_units_is_the_planner_s(gpt):
    """``min_units`` is a planner knob: ``prune`` removes every unit when told to (the result
    is still the masked dense model); EcoSpa never takes a coupling below ``min_units``."""
    model, opt, cg = gpt
    c = next(c for c in cg if c.kind == "ffn")
    assert_pruned_equals_masked(copy.deepcopy(model), example(), {c: range(c.width)}, cg=cg)
    sp = ecospa.EcoSpa(model, opt, 0.2, couplings=cg, every=1, top_k=1.0, theta=0.5, min_units=2)
    for i in range(60):
        train_step(model, opt, i)
        sp.step()
        if sp.done:
            break
    assert sp.done and min(c.width for c in sp.couplings) >= 2


def test_plan_with_an_unknown_name_is_refused(gpt):
    model, opt, cg = gpt
    plan = ecospa.Plan((ecospa.PlanStep(1, {cg[0].name: (0,)}), ecospa.PlanStep(2, {"h.9.mlp.ffn": (0,)})))
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.PlanError, match="h.9.mlp.ffn"):
        ecospa.prune(model, plan, optimizer=opt, couplings=cg)
    assert_unchanged(model, snap, opt)
