"""Issue 10, bad knobs and targets: ``ConfigError`` naming the knob (never a ``TypeError``), the
model and optimizer unchanged; what is legal at the edges (theta = 1, the whole model).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ecospa
from ecospa.schedule.planner import plan_round
from tests.tiny_gpt import train_step
from tests.helpers import assert_unchanged, snapshot


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
