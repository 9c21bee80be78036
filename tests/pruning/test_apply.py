"""The executor as a pass with a contract: stale couplings refused, plans replayed only on the
state they were made on, transactions undone on failure, ``verify=True``, no hidden state."""
from __future__ import annotations

import copy
import random

import pytest
import torch

import ecospa
from ecospa.pruning import transaction as execution
from tests.helpers import assert_close_outputs, assert_pruned_equals_masked, masked_copy, plan_units, random_plan
from tests.models import build


def _snapshot(model, opt=None):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [(n, id(p)) for n, p in model.named_parameters()]
    ost = None
    if opt is not None:
        ost = [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
               for p in model.parameters()]
    return state, ids, ost, dict(model.__dict__)


def _assert_unchanged(model, snap, opt=None):
    state, ids, ost, attrs = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].shape == state[k].shape and torch.equal(now[k], state[k]), k
    assert [(n, id(p)) for n, p in model.named_parameters()] == ids
    assert model.__dict__.keys() == attrs.keys()
    if opt is not None:
        assert [id(p) for g in opt.param_groups for p in g["params"]] == [i for _, i in ids]
        for p, before in zip(model.parameters(), ost):
            for k, v in before.items():
                assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


def _trained(name="nanogpt_block"):
    model, inputs = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(*inputs).pow(2).mean().backward()
    opt.step()
    return model, inputs, opt


def test_stale_coupling_of_a_fused_projection_is_refused():
    """The silent corruption of issue 10: q.k of head 0 pruned, then head 1's coupling found
    *before* that prune is reused. Its indices still fit the smaller fused qkv weight, but they
    point at the wrong rows: it must be refused, and the renumbered coupling must work."""
    model, inputs, opt = _trained()
    cg = ecospa.auto_couple(model, inputs)
    h0, h1 = cg["attn.qk.head0"], cg["attn.qk.head1"]
    ecospa.prune(model, {h0: [0, 1]}, optimizer=opt)
    snap = _snapshot(model, opt)
    with pytest.raises(ecospa.PlanError, match="stale") as err:
        ecospa.prune(model, {h1: [0, 1]}, optimizer=opt)
    assert "auto_couple" in str(err.value) and "remaining" in str(err.value)
    _assert_unchanged(model, snap, opt)
    cg2 = ecospa.remaining(cg, {h0: [0, 1]})
    assert_pruned_equals_masked(model, inputs, {cg2["attn.qk.head1"]: [0, 1]}, cg=cg2)


def test_couplings_of_an_identical_copy_apply_but_not_of_a_copy_in_another_state():
    """A structurally identical copy in the same state accepts the couplings; a copy pruned
    differently to the same sizes refuses them."""
    model, inputs = build("nanogpt_block")
    cg = ecospa.auto_couple(model, inputs)
    twin = copy.deepcopy(model)
    assert_pruned_equals_masked(twin, inputs, {cg["attn.vo.head1"]: [2]})
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ecospa.prune(a, {cg["attn.qk.head0"]: [0, 1]})
    ecospa.prune(b, {cg["attn.qk.head1"]: [0, 1]})
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]
    cg_a = ecospa.auto_couple(a, inputs)
    snap = _snapshot(b)
    with pytest.raises(ecospa.PlanError, match="stale"):
        ecospa.prune(b, {cg_a["attn.qk.head2"]: [0]})
    _assert_unchanged(b, snap)


def test_coupling_of_another_architecture_is_refused():
    model, inputs = build("nanogpt_block")
    other, other_inputs = build("mlp")
    c = ecospa.auto_couple(other, other_inputs)[0]
    snap = _snapshot(model)
    with pytest.raises(ecospa.PlanError, match="another model"):
        ecospa.prune(model, {c: [0]})
    _assert_unchanged(model, snap)


def test_prune_pass_returns_the_couplings_of_the_pruned_model():
    """What the pass returns equals a fresh auto_couple of the pruned model (names, widths,
    units), and can be used for the next prune directly."""
    model, inputs = build("llama_rope_half")
    cg = ecospa.auto_couple(model, inputs)
    plan = random_plan(cg, random.Random(0), frac=0.25)
    result = ecospa.prune_pass(model, plan, couplings=cg)
    assert result.model is model and result.params_after < result.params_before
    fresh = ecospa.auto_couple(model, inputs)
    assert [(c.name, c.width, c.units(), c.stamp) for c in result.couplings] == \
        [(c.name, c.width, c.units(), c.stamp) for c in fresh]
    assert result.removed == {c.name: len(i) for c, i in plan.items()}
    assert_pruned_equals_masked(model, inputs, random_plan(result.couplings, random.Random(1), frac=0.25),
                                cg=result.couplings)


def test_a_plan_is_accepted_by_prune_and_only_on_its_starting_state():
    """``ecospa.prune(model, sp.plan)`` replays EcoSpa's plan on a fresh dense copy (same
    parameters as the trained model's shapes); on the already-pruned model it is refused."""
    model, inputs = build("nanogpt_block")
    fresh = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sp = ecospa.EcoSpa(model, opt, target=0.6, example_inputs=inputs, every=1, top_k=0.5)
    for _ in range(20):
        model(*inputs).sum().backward()
        sp.step()
        opt.zero_grad()
        if sp.done:
            break
    assert len(sp.plan) >= 2
    ecospa.prune(fresh, sp.plan, couplings=ecospa.auto_couple(fresh, inputs))
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    with torch.no_grad():
        assert torch.allclose(fresh(*inputs), model(*inputs))
    snap = _snapshot(model)
    with pytest.raises(ecospa.PlanError, match="width"):
        ecospa.prune(model, sp.plan, couplings=ecospa.auto_couple(model, inputs))
    _assert_unchanged(model, snap)


def test_a_failure_inside_the_transaction_undoes_everything(monkeypatch):
    """An error after the parameters were sliced leaves model and optimizer as they were."""
    model, inputs, opt = _trained()
    plan = random_plan(ecospa.auto_couple(model, inputs), random.Random(2))
    snap = _snapshot(model, opt)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr("ecospa.pruning.apply.update_forwards", boom)
    with pytest.raises(RuntimeError, match="injected"):
        ecospa.prune(model, plan, optimizer=opt)
    _assert_unchanged(model, snap, opt)
    monkeypatch.undo()
    assert_pruned_equals_masked(model, inputs, plan)  # and the model still prunes normally


def test_verify_passes_on_a_correct_prune_and_restores_on_a_wrong_one(monkeypatch):
    model, inputs, opt = _trained("llama_rope_half")
    cg = ecospa.auto_couple(model, inputs)
    plan = random_plan(cg, random.Random(3))
    ok = copy.deepcopy((model, opt))
    ecospa.prune(ok[0], plan, optimizer=ok[1], couplings=ecospa.auto_couple(ok[0], inputs), verify=True)
    snap = _snapshot(model, opt)
    real = execution.update_forwards

    def sabotage(model_, resolved, tx, **kw):  # a wrong slice: the rows of one weight reversed
        real(model_, resolved, tx, **kw)
        mod = model_.self_attn.q_proj
        tx.set_item(mod._parameters, "weight", torch.nn.Parameter(mod.weight.detach().flip(0)))

    monkeypatch.setattr("ecospa.pruning.apply.update_forwards", sabotage)
    with pytest.raises(ecospa.PruneError, match="verify"):
        ecospa.prune(model, plan, optimizer=opt, couplings=cg, verify=True)
    _assert_unchanged(model, snap, opt)


def test_a_rollback_gives_the_narrow_regions_back_what_they_had_built(monkeypatch):
    """Installing the new forwards makes every narrow region forget its graphs; a transaction
    undone afterwards gives them back (same graphs, same call counts: no rebuild on the next call)."""
    model, inputs = build("nanogpt_block")
    cg = ecospa.auto_couple(model, inputs)
    first = {c: u for c, u in random_plan(cg, random.Random(7)).items() if c.kind == "qk"}
    cg = ecospa.prune_pass(model, first, couplings=cg).couplings
    model(*inputs)
    before = ecospa.execution_report(model)
    assert before and all(r.narrow_calls == 1 and r.signatures == 1 for r in before), before
    real = execution.update_forwards

    def fail_after(*args, **kw):
        real(*args, **kw)
        raise RuntimeError("injected failure")

    monkeypatch.setattr("ecospa.pruning.apply.update_forwards", fail_after)
    with pytest.raises(RuntimeError, match="injected"):
        ecospa.prune(model, random_plan(cg, random.Random(8)), couplings=cg)
    assert ecospa.execution_report(model) == before
    model(*inputs)
    after = ecospa.execution_report(model)
    assert [(r.narrow_calls, r.signatures) for r in after] == [(2, 1)] * len(before), after


class _CarriesInputs(torch.nn.Module):
    """An MLP that carries its own example inputs (as Hugging Face models do: ``dummy_inputs``)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
        self.dummy_inputs = {"x": torch.randn(2, 4)}

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_resolve_never_captures_and_prune_finds_the_couplings_of_names_first(monkeypatch):
    """The checks are pure: names without ``couplings=`` are refused by ``resolve``, not looked up
    by a capture inside it; ``prune`` (the public contract) captures once, before the checks."""
    from ecospa.analysis import auto_couple as discovery
    from ecospa.pruning.apply import resolve

    model = _CarriesInputs()
    (name,) = [c.name for c in ecospa.auto_couple(model)]
    captures = []
    real = discovery.auto_couple
    monkeypatch.setattr(discovery, "auto_couple", lambda *a, **k: captures.append(a) or real(*a, **k))
    with pytest.raises(ecospa.PlanError, match="couplings="):
        resolve(model, {name: [0]})
    assert captures == []
    [(cg, units)] = resolve(model, {name: [0]}, real(model))
    assert cg is not None and [c.name for c in units] == [name] and captures == []
    assert ecospa.prune_pass(model, {name: [0, 1]}).removed == {name: 2}
    assert len(captures) == 1 and model.up.out_features == 6


def test_a_plan_is_read_by_its_steps_and_anything_else_refused():
    model, inputs = build("mlp")
    cg = ecospa.auto_couple(model, inputs)
    plan = ecospa.Plan((ecospa.PlanStep(0, {cg[0].name: (0,)}, widths={cg[0].name: cg[0].width}),))
    ecospa.prune(model, plan, couplings=cg)
    for bad in (3, [("a", [0])], ecospa.EcoSpa(build("mlp")[0], None, 0.5)):
        with pytest.raises(ecospa.PlanError, match="a removal is a dict"):
            ecospa.prune(model, bad, couplings=cg)


def test_verify_needs_inputs_for_a_plain_module():
    model, inputs = build("mlp")
    c = ecospa.auto_couple(model, inputs)[0]
    with pytest.raises(ecospa.ConfigError, match="example inputs"):
        ecospa.prune(model, {c: [0]}, verify=True)
    ecospa.prune(model, {c: [0]}, verify=True, example_inputs=inputs)


def test_optimizer_of_another_model_or_missing_parameters_is_refused():
    model, inputs, opt = _trained()
    cg = ecospa.auto_couple(model, inputs)
    plan = random_plan(cg, random.Random(4))
    other = torch.optim.Adam(build("mlp")[0].parameters())
    snap = _snapshot(model, opt)
    with pytest.raises(ecospa.PruneError, match="none of this model"):
        ecospa.prune(model, plan, optimizer=other)
    some = torch.optim.Adam([p for n, p in model.named_parameters() if "mlp" in n])
    with pytest.raises(ecospa.PruneError, match="does not hold"):
        ecospa.prune(model, plan, optimizer=some)
    _assert_unchanged(model, snap, opt)


def test_discovery_leaves_nothing_on_the_model_and_prune_only_the_record():
    """auto_couple adds no attribute; prune adds the removal record and forwards only to the
    modules whose parameters it sliced, and they describe the model exactly."""
    model, inputs = build("nanogpt_block")
    attrs = {name: set(m.__dict__) for name, m in model.named_modules()}
    cg = ecospa.auto_couple(model, inputs)
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == attrs
    plan = random_plan(cg, random.Random(5))
    ecospa.prune(model, plan)
    records = ecospa.param_records(model)
    sliced = {s.param for u in plan_units(plan) for s in map(ecospa.Slice._make, u)}
    assert set(records) == sliced
    for name, rec in records.items():
        p = dict(model.named_parameters())[name]
        assert tuple(rec.kept_or_all(d).size for d in range(p.dim())) == tuple(p.shape)


def test_auto_couple_of_a_pruned_model_equals_remaining_and_stays_exact():
    model, inputs = build("nanogpt")
    cg = ecospa.auto_couple(model, inputs)
    plan = random_plan(cg, random.Random(6), frac=0.3)
    ref = masked_copy(model, plan_units(plan)).eval()
    ecospa.prune(model, plan)
    again = ecospa.auto_couple(model, inputs)
    rem = ecospa.remaining(cg, plan)
    assert [(c.name, c.units(), c.stamp) for c in again] == [(c.name, c.units(), c.stamp) for c in rem]
    with torch.no_grad():  # discovery ran on the dense view; the model is pruned as before
        assert_close_outputs(model.eval()(*inputs), ref(*inputs))
