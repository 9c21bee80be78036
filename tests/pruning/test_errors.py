"""Bad plans (dicts and Plan JSON) and uncapturable models: clear ecospa errors, raised before
anything changes. More bad input (indices, knobs, optimizers, gradients, verify) in
test_reliability*.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ecospa
from tests.helpers import assert_unchanged as _assert_unchanged
from tests.helpers import snapshot as _snapshot
from tests.models import build


@pytest.fixture
def subject():
    """A trained-one-step nanoGPT block, its inputs, couplings and Adam optimizer."""
    model, inputs = build("nanogpt_block")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(*inputs).pow(2).mean().backward()
    opt.step()
    return model, inputs, ecospa.auto_couple(model, inputs), opt


def _bad_plans(cg):
    c = cg[0]
    return {
        "unknown name": {"no.such.coupling": [0]},
        "index == width": {c: [0, c.width]},
        "index far out": {c: [c.width + 5]},
        "negative index": {c: [-1]},
        "duplicate index": {c: [1, 1]},
        "float index": {c: [0.5]},
    }


@pytest.mark.parametrize("case", ["unknown name", "index == width", "index far out",
                                  "negative index", "duplicate index", "float index"])
def test_bad_plan_raises_plan_error_and_changes_nothing(subject, case):
    """Each malformed plan raises PlanError; model and optimizer are untouched."""
    model, _, cg, opt = subject
    snap = _snapshot(model, opt)
    with pytest.raises(ecospa.PlanError):
        ecospa.prune(model, _bad_plans(cg)[case], optimizer=opt)
    _assert_unchanged(model, snap, opt)


def test_valid_entries_are_not_applied_when_another_is_bad(subject):
    """A plan with good entries first and one bad entry last changes nothing at all."""
    model, _, cg, opt = subject
    plan = {c: [0] for c in list(cg)[:-1]}
    plan[list(cg)[-1]] = [list(cg)[-1].width]
    snap = _snapshot(model, opt)
    with pytest.raises(ecospa.PlanError):
        ecospa.prune(model, plan, optimizer=opt)
    _assert_unchanged(model, snap, opt)


def test_error_names_the_coupling_and_the_index(subject):
    """The message says which coupling and which index is wrong."""
    model, _, cg, _ = subject
    c = cg[0]
    with pytest.raises(ecospa.PlanError) as err:
        ecospa.prune(model, {c: [c.width + 3]})
    assert c.name in str(err.value) and str(c.width + 3) in str(err.value)


def test_inexact_coupling_is_refused():
    """Pruning a coupling from ``cg.inexact`` raises an EcospaError before any change."""
    model, inputs = build("layernorm_ffn")
    cg = ecospa.auto_couple(model, inputs, include_inexact=True)
    assert cg.inexact, cg.summary()
    c = cg.inexact[0]
    snap = _snapshot(model)
    with pytest.raises(ecospa.EcospaError):
        ecospa.prune(model, {c: [0]})
    with pytest.raises(ecospa.EcospaError):
        ecospa.prune(model, {c.name: [0]})
    _assert_unchanged(model, snap)


def test_stale_coupling_after_pruning_is_refused(subject):
    """A coupling found before pruning, reused after its width changed: PlanError, no change."""
    model, _, cg, _ = subject
    c = next(c for c in cg if c.kind == "ffn")
    ecospa.prune(model, {c: list(range(c.width // 2))})
    snap = _snapshot(model)
    with pytest.raises(ecospa.PlanError):
        ecospa.prune(model, {c: [c.width - 1]})
    _assert_unchanged(model, snap)


class DataDependentBranch(nn.Module):
    """Python control flow on tensor values: not capturable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class Wrapper(nn.Module):
    """fc -> inner (uncapturable) -> out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.inner = DataDependentBranch()
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(torch.relu(self.fc(x))))


def test_uncapturable_model_raises_capture_error_naming_the_module():
    """CaptureError (an EcospaError) names the module at fault; the model is untouched."""
    model = Wrapper()
    snap = _snapshot(model)
    with pytest.raises(ecospa.CaptureError) as err:
        ecospa.auto_couple(model, (torch.randn(3, 8),))
    msg = str(err.value)
    assert "'inner'" in msg and "Wrapper" in msg, msg  # the module at fault, in the model
    assert "data-dependent" in msg and "Ways out" in msg and "submodule" in msg, msg  # the way out
    _assert_unchanged(model, snap)


def test_plain_module_without_inputs_says_to_pass_them():
    """A plain module has no dummy inputs: a CaptureError asking for example inputs."""
    model, _ = build("mlp")
    with pytest.raises(ecospa.CaptureError, match="example"):
        ecospa.auto_couple(model)


# ----------------------------------------------------------------------------- plan JSON


def _plan_dict():
    return {"version": 2, "steps": [
        {"step": 4, "removals": {"attn.qk.head0": [0, 2]}, "params_before": 100, "params_after": 90,
         "widths": {"attn.qk.head0": 8}},
        {"step": 8, "removals": {"mlp.ffn": [1]}, "params_before": 90, "params_after": 80, "widths": None},
    ]}


def _with(path, value):
    d = _plan_dict()
    *head, last = path
    node = d
    for k in head:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return d


BAD_PLAN_DICTS = {  # (plan, what the message must contain: step and field)
    "not an object": ([1, 2], "JSON object"),
    "no version": (_with(["version"], KeyError), "version"),
    "version 3": (_with(["version"], 3), "version"),
    "version as a string": (_with(["version"], "2"), "version"),
    "version True": (_with(["version"], True), "version"),
    "no steps": (_with(["steps"], KeyError), "'steps'"),
    "steps an object": (_with(["steps"], {"0": {}}), "'steps' should be a list"),
    "steps a string": (_with(["steps"], "abc"), "'steps' should be a list"),
    "unknown top field": (_with(["comment"], "hi"), "comment"),
    "step not an object": (_with(["steps", 1], [8, {}]), "step 1"),
    "missing step": (_with(["steps", 1, "step"], KeyError), "step 1: missing field 'step'"),
    "missing removals": (_with(["steps", 0, "removals"], KeyError), "step 0: missing field 'removals'"),
    "step a float": (_with(["steps", 1, "step"], 8.5), "step 1, field 'step'"),
    "step negative": (_with(["steps", 1, "step"], -1), "step 1, field 'step'"),
    "removals a list": (_with(["steps", 0, "removals"], [[0, 2]]), "step 0, field 'removals'"),
    "indices a string": (_with(["steps", 1, "removals", "mlp.ffn"], "1"), "step 1, field 'removals'['mlp.ffn']"),
    "indices an int": (_with(["steps", 1, "removals", "mlp.ffn"], 1), "step 1, field 'removals'['mlp.ffn']"),
    "index a float": (_with(["steps", 1, "removals", "mlp.ffn"], [1.0]), "'removals'['mlp.ffn'][0]"),
    "index a bool": (_with(["steps", 1, "removals", "mlp.ffn"], [0, True]), "'removals'['mlp.ffn'][1]"),
    "index None": (_with(["steps", 1, "removals", "mlp.ffn"], [None]), "'removals'['mlp.ffn'][0]"),
    "index nested": (_with(["steps", 1, "removals", "mlp.ffn"], [[1]]), "'removals'['mlp.ffn'][0]"),
    "index negative": (_with(["steps", 1, "removals", "mlp.ffn"], [-2]), "'removals'['mlp.ffn'][0]"),
    "index repeated": (_with(["steps", 0, "removals", "attn.qk.head0"], [2, 2]), "step 0, field 'removals'['attn.qk.head0']"),
    "index over the width": (_with(["steps", 0, "removals", "attn.qk.head0"], [8]), "step 0, field 'removals'['attn.qk.head0']"),
    "widths a list": (_with(["steps", 0, "widths"], [8]), "step 0, field 'widths'"),
    "width a string": (_with(["steps", 0, "widths", "attn.qk.head0"], "8"), "step 0, field 'widths'['attn.qk.head0']"),
    "params_before a string": (_with(["steps", 0, "params_before"], "100"), "step 0, field 'params_before'"),
    "unknown step field": (_with(["steps", 0, "width"], {}), "step 0: unknown fields ['width']"),
}


@pytest.mark.parametrize("case", list(BAD_PLAN_DICTS))
def test_plan_json_failing_its_schema_names_the_step_and_field(case):
    """Plan.from_dict / from_json check the whole schema; PlanError names the step and field."""
    import json

    data, where = BAD_PLAN_DICTS[case]
    with pytest.raises(ecospa.PlanError) as err:
        ecospa.Plan.from_dict(data)
    assert where in str(err.value), str(err.value)
    with pytest.raises(ecospa.PlanError) as err:
        ecospa.Plan.from_json(json.dumps(data))
    assert where in str(err.value), str(err.value)


def test_plan_json_round_trips_and_rejects_non_json():
    plan = ecospa.Plan.from_dict(_plan_dict())
    assert ecospa.Plan.from_json(plan.to_json()) == plan
    assert ecospa.Plan.from_dict({"version": 1, "steps": [{"step": 0, "removals": {}}]}).steps[0].widths is None
    for text in ("{not json", "", b"\xff\xfe", "[1, 2", "NaN"):
        with pytest.raises(ecospa.PlanError):
            ecospa.Plan.from_json(text)
    with pytest.raises(ecospa.PlanError, match="JSON text"):
        ecospa.Plan.from_json({"version": 2})


def test_plan_json_that_does_not_match_the_model_is_refused_when_applied(subject):
    """Valid JSON for another model: an unknown coupling, or indices beyond a coupling's width,
    raise PlanError naming the coupling (and the index) when applied; nothing changes."""
    model, inputs, cg, opt = subject
    c = cg[0]
    snap = _snapshot(model, opt)
    unknown = ecospa.Plan.from_dict({"version": 2, "steps": [
        {"step": 1, "removals": {c.name: [0]}}, {"step": 2, "removals": {"h.7.attn.qk.head0": [1]}}]})
    with pytest.raises(ecospa.PlanError, match="h.7.attn.qk.head0"):
        ecospa.prune(model, unknown, optimizer=opt, couplings=cg)
    beyond = ecospa.Plan.from_dict({"version": 2, "steps": [{"step": 1, "removals": {c.name: [c.width + 4]}}]})
    with pytest.raises(ecospa.PlanError, match=f"{c.width + 4}.*{c.name}"):
        ecospa.prune(model, beyond, optimizer=opt, couplings=cg)
    with pytest.raises(ecospa.PlanError, match=c.name):
        beyond.replay(model, opt, couplings=cg)
    _assert_unchanged(model, snap, opt)


def test_plan_errors_when_applied_name_the_step(subject):
    model, inputs, cg, opt = subject
    plan = ecospa.Plan.from_dict({"version": 2, "steps": [
        {"step": 1, "removals": {cg[0].name: [0]}}, {"step": 2, "removals": {"h.7.attn.qk.head0": [1]}}]})
    with pytest.raises(ecospa.PlanError, match="step 1"):
        ecospa.prune(model, plan, optimizer=opt, couplings=cg)


def test_pruning_an_emptied_coupling_says_it_has_no_units_left():
    """A coupling emptied by a previous prune (min_units=0 allows it): asking for one of its units
    says the coupling has no units left and what to do, not "indices are 0..-1"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 4)
    cg = ecospa.auto_couple(model, (x,))
    c = cg[0]
    ecospa.prune(model, {c.name: list(range(c.width))}, couplings=cg)
    for now in (ecospa.auto_couple(model, (x,)), ecospa.remaining(cg, {c.name: list(range(c.width))})):
        assert now[0].width == 0
        with pytest.raises(ecospa.PlanError) as e:
            ecospa.prune(model, {now[0].name: [0]}, couplings=now)
        msg = str(e.value)
        assert "0..-1" not in msg and "has no units left" in msg and "leave it out of the removal" in msg, msg
