"""Property tests: random removals from random models give pruned == masked dense."""
from __future__ import annotations

from hypothesis import given, note
from hypothesis import strategies as st

import ecospa
from tests.helpers import assert_pruned_equals_masked
from tests.strategies import attention_blocks, mlp_stacks


def _draw_plan(data, cg):
    plan = {}
    for c in cg:
        idx = data.draw(st.lists(st.integers(0, c.width - 1), unique=True, max_size=c.width - 1),
                        label=c.name)
        if idx:
            plan[c] = sorted(idx)
    return plan


@given(mlp_stacks(), st.data())
def test_random_mlp_stack_prune(gen, data):
    """Any removal (never a whole coupling) from a random MLP stack is exact."""
    note(repr(gen.spec))
    cg = ecospa.auto_couple(gen.model, gen.inputs)
    assert_pruned_equals_masked(gen.model, gen.inputs, _draw_plan(data, cg))


@given(attention_blocks(), st.data())
def test_random_attention_block_prune(gen, data):
    """Any removal from a random attention block is exact, for another sequence length too."""
    note(repr(gen.spec))
    cg = ecospa.auto_couple(gen.model, gen.inputs)
    x = gen.inputs[0]
    other = (x[:1, : max(1, x.shape[1] - 1)].clone(),)
    assert_pruned_equals_masked(gen.model, gen.inputs, _draw_plan(data, cg),
                                check_inputs=[other])
