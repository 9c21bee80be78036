"""Resuming training from a checkpoint: EcoSpa mid-pruning, its optimizer, the RNG, extras."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import ecospa
from ecospa.checkpoint import read_extra
from tests.checkpoint import tiny_run
from tests.checkpoint.helpers import assert_same_optimizer, assert_same_params


def _events(sp):
    return [(e.step, e.removals, e.params_before, e.params_after) for e in sp.events]


@pytest.mark.parametrize("at, lazy", [(4, False), (3, True)])
def test_ecospa_resumes_exactly(at, lazy, tmp_path):
    """Stopped at step ``at`` (between two pruning rounds, or right after the first one, with an
    EcoSpa that found its couplings at the first forward), saved, and resumed on a freshly built
    dense model, optimizer and EcoSpa: the next round and the training steps happen exactly as
    in an uninterrupted run (parameters, Adam state, plan, events, counters)."""
    model, opt, sp = tiny_run.build(lazy=lazy)
    for step in range(1, tiny_run.STEPS + 1):
        tiny_run.train_step(model, opt, sp, step)
        if step == at:
            ecospa.save(model, tmp_path / "ck", ecospa=sp, extra={"step": step}, rng=True)
    assert [e.step for e in sp.events] == [3, 6], "the run should prune before and after the checkpoint"

    model2, opt2, sp2 = tiny_run.build(seed=1, lazy=lazy)
    torch.manual_seed(99)  # the checkpoint's RNG state must win
    ecospa.load(tmp_path / "ck", model2, optimizer=opt2, ecospa=sp2, rng=True)
    assert read_extra(tmp_path / "ck") == {"step": at}
    assert sp2.steps == at and len(sp2.plan) == sum(e.step <= at for e in sp.events)
    for step in range(at + 1, tiny_run.STEPS + 1):
        tiny_run.train_step(model2, opt2, sp2, step)
    assert_same_params(model2, model)
    assert_same_optimizer(model, opt, model2, opt2)
    assert sp2.plan == sp.plan and _events(sp2) == _events(sp)
    assert (sp2.steps, sp2.rounds) == (sp.steps, sp.rounds)


def test_rng_and_extra_round_trip(tmp_path):
    """rng=True restores torch, Python and NumPy generators; extra holds nested data and tensors."""
    model = torch.nn.Linear(3, 2)
    extra = {"step": 7, "lr": [0.1, 0.2], "betas": (0.9, 0.95), "name": "run", "none": None,
             "gen": torch.Generator().manual_seed(3).get_state(), "nested": {"t": torch.arange(4.0)}}
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    ecospa.save(model, tmp_path / "ck", extra=extra, rng=True)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(10), random.random(), np.random.rand(4)
    ecospa.load(tmp_path / "ck", model, rng=True)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]
    back = read_extra(tmp_path / "ck")
    assert back["betas"] == (0.9, 0.95) and back["lr"] == [0.1, 0.2] and back["none"] is None
    assert torch.equal(back["gen"], extra["gen"]) and torch.equal(back["nested"]["t"], torch.arange(4.0))


def test_optimizer_groups_and_sgd(tmp_path):
    """Two param groups with their own hyperparameters, SGD momentum, restored by name."""
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        o = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.1},
                             {"params": m[2].parameters(), "lr": 0.01, "nesterov": True}],
                            momentum=0.9)
        return m, o
    model, opt = make()
    x = torch.randn(5, 4)
    cg = ecospa.auto_couple(model, (x,))
    model(x).sum().backward()
    opt.step()
    ecospa.prune(model, {cg[0]: [1, 4, 6]}, opt, couplings=cg)
    ecospa.save(model, tmp_path / "ck", optimizer=opt)
    model2, opt2 = make()
    ecospa.load(tmp_path / "ck", model2, optimizer=opt2, example_inputs=(x,))
    assert_same_params(model2, model)
    assert_same_optimizer(model, opt, model2, opt2)
    assert opt2.param_groups[1]["nesterov"] is True and opt2.param_groups[0]["lr"] == 0.1


def _damage(path, edit):
    import json

    m = json.loads((path / "ecospa.json").read_text())
    edit(m["ecospa"]["state"])
    (path / "ecospa.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def ecospa_ckpt(tmp_path_factory):
    model, opt, sp = tiny_run.build()
    for step in range(1, 5):
        tiny_run.train_step(model, opt, sp, step)
    return ecospa.save(model, tmp_path_factory.mktemp("sp") / "ck", ecospa=sp)


BAD_ECOSPA = {
    "steps not an int": (lambda s: s.update(steps="4"), "steps"),
    "plan of another model": (
        lambda s: s["plan"]["steps"][0]["removals"].update({"no.such.coupling": [0]}), "does not apply"),
    "plan that is not a plan": (lambda s: s.update(plan=[1, 2]), "plan"),
    "plan not matching the removals": (
        lambda s: s["plan"]["steps"][0]["removals"].update(
            {k: v[:-1] for k, v in list(s["plan"]["steps"][0]["removals"].items())[:1]}),
        "does not produce|does not apply"),
    "statistic of another shape": (
        lambda s: s["importance"]["acc"]["sq"].update(
            {next(iter(s["importance"]["acc"]["sq"])): [1.0, 2.0]}), "statistic"),
}


@pytest.mark.parametrize("case", list(BAD_ECOSPA))
def test_damaged_ecospa_state_changes_nothing(case, ecospa_ckpt, tmp_path):
    import shutil

    from tests.checkpoint.helpers import assert_unchanged, snapshot

    ck = shutil.copytree(ecospa_ckpt, tmp_path / "ck")
    edit, match = BAD_ECOSPA[case]
    _damage(ck, edit)
    model, opt, sp = tiny_run.build(seed=1)
    tiny_run.train_step(model, opt, sp, 1)
    snap = snapshot(model, opt)
    before = (sp.steps, sp.rounds, sp.plan, sp.importance.state_dict())
    with pytest.raises(ecospa.CheckpointError, match=match):
        ecospa.load(ck, model, optimizer=opt, ecospa=sp)
    assert_unchanged(model, snap, opt)
    after = (sp.steps, sp.rounds, sp.plan, sp.importance.state_dict())
    assert before[:3] == after[:3]
    assert all(torch.equal(before[3]["acc"][s][k], after[3]["acc"][s][k]) for s in before[3]["acc"]
               for k in before[3]["acc"][s])
