"""Issue 10, bad input: every mistake a user can make gets an ``EcospaError`` that names the thing
at fault and the way out, and leaves the model and the optimizer exactly as they were.

Capture and rules, nothing to prune, couplings of another model or state, bad unit indices, bad
targets and knobs, non-finite gradients, optimizers that do not hold the model, and the
``verify`` self-check of EcoSpa. Plan JSON schema errors are in ``test_errors.py``.
"""
from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import ecospa
from ecospa.coupling import execution
from ecospa.coupling.planner import plan_round
from ecospa.recipes.nanogpt import GPT, GPTConfig
from tests.helpers import assert_pruned_equals_masked, assert_unchanged, random_plan, snapshot
from tests.helpers import call as call_model
from tests.models import build

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=13)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def example():
    return (torch.zeros(1, CFG.block_size, dtype=torch.long),)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (3, CFG.block_size + 1), generator=g)


def train_step(model, opt, seed: int):
    x = batch(seed)
    opt.zero_grad(set_to_none=True)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()


_COUPLINGS = []


@pytest.fixture
def gpt():
    """A tiny GPT trained one AdamW step, its optimizer and couplings (found once: every copy
    is in the same state, so the same couplings apply)."""
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, 0)
    if not _COUPLINGS:
        _COUPLINGS.append(ecospa.auto_couple(model, example()))
    return model, opt, _COUPLINGS[0]


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


# ----------------------------------------------------------------------------- targets and knobs


def test_targets_outside_what_the_model_allows(gpt):
    model, opt, cg = gpt
    total = sum(p.numel() for p in model.parameters())
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.ConfigError, match=f"larger than the model \\({total} parameters\\)"):
        ecospa.EcoSpa(model, opt, total + 1, couplings=cg)
    with pytest.raises(ecospa.ConfigError, match=r"\(0, 1\]"):
        ecospa.EcoSpa(model, opt, 1.5, couplings=cg)
    with pytest.raises(ecospa.ConfigError, match="smallest reachable size"):
        ecospa.EcoSpa(model, opt, 100, couplings=cg)
    with pytest.raises(ecospa.ConfigError, match="smallest reachable size"):
        ecospa.EcoSpa(model, opt, 0.1, couplings=cg, min_units=8)
    assert_unchanged(model, snap, opt)
    ecospa.EcoSpa(model, opt, total, couplings=cg)  # the whole model: legal, nothing to do
    ecospa.EcoSpa(model, opt, 1.0, couplings=cg)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, float("nan"), float("inf")])
@pytest.mark.parametrize("knob", ["top_k", "theta"])
def test_top_k_and_theta_outside_zero_one(knob, value):
    with pytest.raises(ecospa.ConfigError, match=knob):
        ecospa.PlanConfig(**{knob: value})


def test_theta_one_is_legal_and_removes_one_unit_per_selected_coupling(gpt):
    """theta = 1 keeps the whole mass: the slowest schedule, one unit per selected coupling per
    round (the limit of theta -> 1), and EcoSpa still reaches its target."""
    model, opt, cg = gpt
    cfg = ecospa.PlanConfig(theta=1, top_k=1.0)
    assert cfg.theta == 1.0 and isinstance(cfg.theta, float)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    rng = np.random.default_rng(0)
    out = plan_round(list(cg), shapes, coupling_scores={c.name: float(i) for i, c in enumerate(cg)},
                     unit_scores=lambda c: rng.random(c.width), config=cfg, target_params=1)
    assert sorted(out) == sorted(c.name for c in cg) and all(len(v) == 1 for v in out.values())
    sp = ecospa.EcoSpa(model, opt, 0.8, couplings=cg, every=1, theta=1.0, top_k=1.0)
    for i in range(80):
        train_step(model, opt, i)
        sp.step()
        if sp.done:
            break
    assert sp.done and all(e.units_removed <= len(cg) for e in sp.events)


@pytest.mark.parametrize("every", [0, -5])
def test_every_must_be_positive(gpt, every):
    model, opt, cg = gpt
    snap = snapshot(model, opt)
    with pytest.raises(ecospa.ConfigError, match="every"):
        ecospa.EcoSpa(model, opt, 0.5, couplings=cg, every=every)
    assert_unchanged(model, snap, opt)


WRONG_TYPES = [
    ("target", None), ("target", "0.5"), ("target", [0.5]), ("target", True), ("target", float("nan")),
    ("top_k", "0.3"), ("top_k", None), ("top_k", True), ("top_k", [0.3]),
    ("theta", "0.9"), ("theta", None), ("theta", False), ("theta", 1j),
    ("every", 1.5), ("every", "10"), ("every", None), ("every", True), ("every", 2.0),
    ("start", 1.5), ("start", "1"), ("start", None), ("start", True), ("start", -1),
    ("min_units", 1.0), ("min_units", "1"), ("min_units", None), ("min_units", False),
    ("width_multiple", 8.0), ("width_multiple", True), ("width_multiple", None), ("width_multiple", 0),
    ("coupling_score", 3), ("coupling_score", None), ("coupling_score", ["fisher"]), ("coupling_score", "l2"),
    ("unit_score", 9), ("unit_score", None), ("unit_score", ("eq9",)), ("unit_score", "svd"),
    ("seed", 1.5), ("seed", "0"), ("seed", None), ("seed", -1),
    ("head_widths", None), ("head_widths", ["uniform"]), ("head_widths", "square"),
]


@pytest.mark.parametrize("knob, value", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v in WRONG_TYPES])
def test_every_knob_refuses_wrong_types_with_its_name(knob, value):
    """ConfigError (never a TypeError from a comparison) naming the knob."""
    with pytest.raises(ecospa.ConfigError, match=knob):
        ecospa.PlanConfig(**{knob: value})


def test_every_knob_is_checked_through_ecospa_too(gpt):
    model, opt, cg = gpt
    snap = snapshot(model, opt)
    for knob, value in WRONG_TYPES:
        if (knob, value) == ("target", None):  # EcoSpa's target=None means the default
            continue
        kwargs = {"target": 0.5, knob: value}
        with pytest.raises(ecospa.ConfigError, match=knob):
            ecospa.EcoSpa(model, opt, couplings=cg, **kwargs)
    with pytest.raises(ecospa.ConfigError, match="every"):
        ecospa.EcoSpa(model, opt, 0.5, couplings=cg, config=ecospa.PlanConfig(), every=0)
    assert_unchanged(model, snap, opt)


def test_numpy_scalars_are_accepted_as_plain_numbers():
    cfg = ecospa.PlanConfig(target=np.int64(1000), top_k=np.float32(0.5), theta=np.float64(0.8),
                            every=np.int32(5), min_units=np.int64(2), seed=np.uint8(3))
    assert (type(cfg.target), type(cfg.top_k), type(cfg.every), type(cfg.min_units)) == (int, float, int, int)
    assert ecospa.PlanConfig(target=np.float32(0.25)).target == 0.25


@pytest.mark.parametrize("arg, value, match", [
    ("model", "gpt", "torch.nn.Module"), ("optimizer", "adam", "torch.optim.Optimizer"),
    ("optimizer", [torch.zeros(1)], "torch.optim.Optimizer"), ("config", {"target": 0.5}, "PlanConfig"),
    ("verify", "yes", "verify"), ("verify", 1, "verify"),
])
def test_ecospa_arguments_of_the_wrong_type(gpt, arg, value, match):
    model, opt, cg = gpt
    kwargs = {"model": model, "optimizer": opt, "couplings": cg, arg: value}
    with pytest.raises(ecospa.ConfigError, match=match):
        ecospa.EcoSpa(**kwargs)


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

    monkeypatch.setattr("ecospa.coupling.executor.update_forwards", sabotage)
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

    monkeypatch.setattr("ecospa.coupling.executor.update_forwards", boom)
    with pytest.raises(RuntimeError, match="injected"):
        ecospa.prune(model, {c: [0] for c in cg}, opt, couplings=cg)
    assert_unchanged(model, snap, opt)
    assert ecospa.param_records(model) == {}
    monkeypatch.undo()
    assert_pruned_equals_masked(model, x, {c: [0] for c in cg}, cg=cg)  # and it still prunes
