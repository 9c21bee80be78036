"""Self-checks of the test zoo itself (independent of ecospa's engine).

If these fail, the ground truth the engine is judged against is wrong, not the engine.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import call, check_expect_sides
from tests.models import CASES, build


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_runs_on_two_sizes(name):
    """Each zoo model runs for two batch/sequence sizes and gives finite outputs."""
    model, inputs = build(name)
    other = CASES[name].inputs(3, 5)
    with torch.no_grad():
        for x in (inputs, other):
            out = call(model, x)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_expected_slices_are_valid_and_disjoint(name):
    """Expected slices name real parameters, valid dims and indices, and never repeat."""
    model, _ = build(name)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    seen = set()
    for e in CASES[name].expected():
        assert e.width > 0
        for unit in e.units:
            for pname, dim, idx in unit:
                assert pname in shapes, f"{pname} is not a parameter of {name}"
                assert 0 <= dim < len(shapes[pname]) and 0 <= idx < shapes[pname][dim]
                assert (pname, dim, idx) not in seen, f"slice {(pname, dim, idx)} twice"
                seen.add((pname, dim, idx))
    for pname in CASES[name].inexact_params:
        assert pname in shapes


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_ground_truth_sides(name):
    """Zeroing any one side of an expected unit equals zeroing the whole unit."""
    model, inputs = build(name)
    check_expect_sides(model, inputs, CASES[name].expected())


@pytest.mark.parametrize("name", ["nanogpt_block", "llama_rope_half", "nn_multihead_attention",
                                  "cross_attention", "moe_2_experts"])
def test_zoo_model_is_exportable(name):
    """torch.export (non-strict) captures the zoo model: a capture failure is the engine's."""
    model, inputs = build(name)
    torch.export.export(model, inputs, strict=False)
