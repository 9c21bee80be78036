"""Property tests: discovery finds exactly the couplings a random generator built in."""
from __future__ import annotations

import pytest
from hypothesis import given, note, settings

import ecospa
from tests.helpers import assert_couplings_match
from tests.strategies import attention_blocks, mlp_stacks


@given(mlp_stacks())
def test_random_mlp_stack_discovery(gen):
    """One coupling per hidden width (ffn, or linear across an identity), none on the output."""
    note(repr(gen.spec))
    assert_couplings_match(ecospa.auto_couple(gen.model, gen.inputs), gen.expected)


@pytest.mark.slow
@settings(max_examples=10)  # the long run of this property: python bench/fuzz.py --only discovery_attention
@given(attention_blocks())
def test_random_attention_block_discovery(gen):
    """qk/vo per kv head (rotary pairs, GQA groups, any qkv layout) and the FFN/GLU."""
    note(repr(gen.spec))
    assert_couplings_match(ecospa.auto_couple(gen.model, gen.inputs), gen.expected)
