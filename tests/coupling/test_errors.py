"""Bad plans and uncapturable models: clear ecospa errors, raised before anything changes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ecospa
from tests.models import build


def _snapshot(model, opt=None):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(n, p) for n, p in model.named_parameters()]
    opt_state = None
    if opt is not None:
        opt_state = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                     for _, p in params}
    return state, params, opt_state


def _assert_unchanged(model, snap, opt=None):
    state, params, opt_state = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].shape == state[k].shape and torch.equal(now[k], state[k]), f"{k} changed"
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in params]
    if opt is not None:
        for _, p in params:
            for key, v in opt_state[id(p)].items():
                assert torch.equal(opt.state[p][key], v)


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
    assert "inner" in msg or "DataDependentBranch" in msg, msg
    _assert_unchanged(model, snap)


def test_plain_module_without_inputs_says_to_pass_them():
    """A plain module has no dummy inputs: a CaptureError asking for example inputs."""
    model, _ = build("mlp")
    with pytest.raises(ecospa.CaptureError, match="example"):
        ecospa.auto_couple(model)
