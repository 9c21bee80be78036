"""One test per op rule: the cases of ``tests/ops/rule_cases.py`` (a small model whose graph
contains the op) say whether a coupling through the op stays exact, of which kind, or why not;
pruning an exact one must equal the masked dense model. Every op registered in
``ecospa.ops.OPS`` must appear in the captured graph of some case, and must have a narrow rule
or say why it has none."""
from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

import ecospa
from ecospa.capture.export import capture
from ecospa.ir.labels import LabelSpace, merge_aligned
from ecospa.ops import OPS, OpSpec, entry_key
from ecospa.ops.shape import reshape_blocks, reshape_factor
from tests.ops.rule_cases import CASES


def _build(name):
    torch.manual_seed(0)
    model, inputs = CASES[name].build()
    return model.eval(), inputs


def _couplings(cg, param, dim):
    """The couplings that slice ``param`` along ``dim`` (one per head for attention)."""
    hits = [c for c in cg.all if any(t.param == param and t.dim == dim for t in c.tables)]
    assert hits, f"no coupling slices {param} dim {dim}:\n{cg.summary()}"
    return hits


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_case(name):
    case = CASES[name]
    model, inputs = _build(name)
    cg = ecospa.auto_couple(model, inputs)
    hits = _couplings(cg, case.param, case.dim)
    for c in hits:
        assert c.exact is case.exact, cg.summary()
        if not case.exact:
            assert case.reason in c.reason, c.reason
            assert c not in list(cg)
        else:
            assert c.kind == case.kind, cg.summary()
    if not case.exact:
        return
    plan = {c: list(range(0, c.width, 2)) for c in hits}
    ref_model = copy.deepcopy(model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    removed = 0
    with torch.no_grad():
        params = dict(ref_model.named_parameters())
        for c, drop in plan.items():
            units = c.units()
            for p, d, i in (s for j in drop for s in units[j]):
                params[p].select(d, i).zero_()
                removed += int(np.prod([k for dd, k in enumerate(shapes[p]) if dd != d]))
        ref = ref_model(*inputs)
    n0 = sum(p.numel() for p in model.parameters())
    ecospa.prune(model, plan)
    with torch.no_grad():
        got = model(*inputs)
    assert sum(p.numel() for p in model.parameters()) == n0 - removed
    err = ((got - ref).double().norm() / ref.double().norm()).item()
    assert err <= case.tol, f"pruned != masked dense: relative error {err:.2e}"


@functools.lru_cache(maxsize=None)
def _ops_of_case(name) -> frozenset:
    """The OPS keys of every op in the captured graph of a case."""
    model, inputs = _build(name)
    graph = capture(model, inputs).graph
    return frozenset(k for n in graph.nodes if n.op == "call_function" and (k := entry_key(n.target)) is not None)


def _loaded(key) -> bool:
    """False for a custom op registered by name whose library is not installed here."""
    if not isinstance(key, str):
        return True
    ns, _, op = key.partition("::")
    try:
        getattr(getattr(torch.ops, ns), op)
        return True
    except (AttributeError, RuntimeError):
        return False


def _without_case(rules) -> list[str]:
    seen = frozenset().union(*(_ops_of_case(n) for n in CASES))
    return sorted(str(k) for k in rules if k not in seen and _loaded(k))


def test_every_registered_op_has_a_rule_case():
    """Each op in OPS appears in the captured graph of at least one case (computed, not
    listed: registering an op without a case fails here)."""
    missing = _without_case(OPS)
    assert not missing, f"registered ops without a rule case in tests/ops/rule_cases.py: {missing}"


def test_the_coverage_check_sees_an_op_without_a_case():
    extra = {torch.ops.aten.erfinv: None, "nowhere::op": None}
    assert _without_case({**OPS, **extra}) == ["aten.erfinv"]


def undecided(ops) -> list[str]:
    """Ops with a channel rule but neither a narrow rule nor a stated reason for having none: a
    region whose narrowed tensors pass through one would fall back with no word of why."""
    return sorted(str(k) for k, s in ops.items() if s.channel is not None and s.narrow is None and not s.no_narrow)


def test_every_op_has_both_rules_or_says_why_it_has_no_narrow_rule():
    """The one table holds both rules of every op: discovery and narrow execution cannot drift
    apart (an op added on the channel side only fails here), and every op has a channel rule."""
    assert not undecided(OPS), f"ops with a channel rule and no narrow decision: {undecided(OPS)}"
    assert not [str(k) for k, s in OPS.items() if s.channel is None], "ops with a narrow rule only"


def test_the_narrow_coverage_check_sees_an_op_without_a_decision():
    extra = {torch.ops.aten.erfinv: OpSpec(channel=lambda ctx, node: [])}
    assert undecided({**OPS, **extra}) == ["aten.erfinv"]


def test_registry_refuses_unknown_facts_and_double_registration():
    """Facts are words of FACTS; an op cannot get two rules."""
    from ecospa.ops.registry import register

    with pytest.raises(RuntimeError, match="unknown op facts"):
        register(torch.ops.aten.erfinv, facts=("fast",))
    with pytest.raises(RuntimeError, match="registered twice"):
        register(torch.ops.aten.view)(lambda ctx, node: None)
    from ecospa.ops.registry import narrow_rule

    with pytest.raises(RuntimeError, match="registered twice"):
        narrow_rule(torch.ops.aten.view)(lambda b, node: None)


def test_reshape_blocks_split_and_merge():
    assert reshape_blocks((2, 3, 8), (2, 3, 2, 4)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert reshape_blocks((2, 3, 2, 4), (6, 8)) == [([0, 1], [0]), ([2, 3], [1])]
    assert reshape_blocks((1, 6), (6,)) == [([0, 1], [0])]


def test_reshape_factor_heads_and_gqa_repeat():
    f = np.arange(8).reshape(1, 1, 8)
    g = reshape_factor(f, (2, 3, 8), (2, 3, 2, 4))
    assert g.shape == (1, 1, 2, 4) and g[0, 0, 1, 2] == 6
    # a label-free dim merged into a labelled one materialises the repetition (repeat_kv)
    kv = np.arange(2).reshape(1, 2, 1, 1)
    h = reshape_factor(kv, (2, 2, 3, 5), (2, 6, 5))
    assert h.shape == (1, 6, 1) and h.ravel().tolist() == [0, 0, 0, 1, 1, 1]


def test_merge_aligned_joins_same_positions_and_poisons_broadcast():
    space = LabelSpace()
    a = space.param_factors("a", (4,))[0]
    b = space.param_factors("b", (4,))[0]
    out = merge_aligned(space, [a, b], "test")
    assert len(out) == 1
    n, comp = space.components()
    assert comp[0] == comp[4] and comp[1] == comp[5]
    s2 = LabelSpace()
    head = s2.param_factors("h", (2, 4))  # two factors (2,1) and (1,4)
    shared = s2.param_factors("s", (4,))[0].reshape(1, 4)
    per_head = head[0]  # varies on dim 0 only: broadcast across dim 1 of `shared`... and back
    merge_aligned(s2, [per_head * 0 + np.arange(8).reshape(2, 4), shared], "test")
    assert (s2.poison_array()[6:10] >= 0).all()  # "s" broadcast across the head dim: poisoned
