"""Self-checks of the hypothesis strategies (independent of ecospa's engine).

The generated ground truth must hold numerically: each side of every expected unit carries the
whole unit. If these fail, the strategies are wrong, not the engine.
"""
from __future__ import annotations

import torch
from hypothesis import given

from tests.helpers import call, check_expect_sides
from tests.strategies import attention_blocks, mlp_stacks


@given(mlp_stacks())
def test_mlp_stack_ground_truth(gen):
    """Random MLP stacks: expected units are consistent with the model's function."""
    check_expect_sides(gen.model, gen.inputs, gen.expected, skip_roles=gen.skip_roles,
                       require_effect=not gen.may_be_dead)


@given(attention_blocks())
def test_attention_block_ground_truth(gen):
    """Random attention blocks: expected units are consistent with the model's function."""
    with torch.no_grad():
        assert torch.isfinite(call(gen.model, gen.inputs)).all()
    check_expect_sides(gen.model, gen.inputs, gen.expected, skip_roles=gen.skip_roles,
                       require_effect=not gen.may_be_dead)
