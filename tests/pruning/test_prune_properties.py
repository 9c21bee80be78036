"""Property tests: random removals from random models give pruned == masked dense."""
from __future__ import annotations

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import ecospa
from tests.helpers import assert_pruned_equals_masked
from tests.strategies import attention_blocks, mlp_stacks


def _draw_plan(data, cg):
    """Any units of every coupling (all of one too: ``prune`` may empty a coupling)."""
    plan = {}
    for c in cg:
        idx = data.draw(st.lists(st.integers(0, c.width - 1), unique=True, max_size=c.width),
                        label=c.name)
        if idx:
            plan[c] = sorted(idx)
    return plan


def _draw_uniform_plan(data, cg):
    """The same number of units (drawn) from every coupling of each width group: equal heads."""
    groups: dict[str, list] = {}
    for c in cg:
        groups.setdefault(c.group, []).append(c)
    plan = {}
    for name, cs in groups.items():
        k = data.draw(st.integers(0, min(c.width for c in cs)), label=name)
        for c in cs:
            if k:
                plan[c] = sorted(data.draw(st.permutations(range(c.width)), label=c.name)[:k])
    return plan


def _assert_ran_narrow(model):
    """Every region that is not inside another ran all its calls on a narrow graph."""
    reps = ecospa.execution_report(model)
    paths = [r.path for r in reps]
    for r in reps:
        if not any(r.path.startswith(p + ".") or (p == "" and r.path) for p in paths if p != r.path):
            assert r.narrow, f"{r.path} fell back: {r.reasons}"


@given(mlp_stacks(), st.data())
def test_random_mlp_stack_prune(gen, data):
    """Any removal (never a whole coupling) from a random MLP stack is exact."""
    note(repr(gen.spec))
    cg = ecospa.auto_couple(gen.model, gen.inputs)
    assert_pruned_equals_masked(gen.model, gen.inputs, _draw_plan(data, cg))


@pytest.mark.slow
@settings(max_examples=10)  # the long run of this property: python bench/fuzz.py --only prune_attention
@given(attention_blocks(), st.data(), st.sampled_from(["ragged", "uniform"]))
def test_random_attention_block_prune(gen, data, heads):
    """Any removal from a random attention block (ragged heads, or equal widths per head) is
    exact, for another sequence length too, and runs on the narrow graph."""
    note(repr(gen.spec))
    cg = ecospa.auto_couple(gen.model, gen.inputs)
    x = gen.inputs[0]
    other = (x[:1, : max(1, x.shape[1] - 1)].clone(),)
    plan = _draw_plan(data, cg) if heads == "ragged" else _draw_uniform_plan(data, cg)
    assert_pruned_equals_masked(gen.model, gen.inputs, plan, check_inputs=[other])
    _assert_ran_narrow(gen.model)
