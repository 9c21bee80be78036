"""Calibration of a pruned model runs its narrow graphs and measures what the masked dense model
gives: the same consumer Grams (read through ``ecospa::observe``) and the same unit Fisher."""
from __future__ import annotations

import copy

import pytest
import torch

import ecospa
from ecospa.compression.calibration import calibrate, causal_lm_loss, consumers_of
from ecospa.ir.record import param_records
from ecospa.pruning.apply import prune_pass
from tests.compression.test_compress import _gpt2, _llama, _tokens
from tests.helpers import masked_copy

pytest.importorskip("transformers")


def _calls(model) -> tuple[int, int]:
    rep = ecospa.execution_report(model)
    return sum(r.narrow_calls for r in rep), sum(r.fallback_calls for r in rep)


def _plan(exact, ragged: bool) -> dict:
    """Half of every coupling; ``ragged``: coupling k of a kind loses k % 3 + 1 units instead, so
    the heads of an attention keep different widths (padded in the narrow graph)."""
    if not ragged:
        return {c: list(range(0, c.width, 2)) for c in exact}
    return {c: list(range(0, min(c.width - 1, k % 3 + 1))) for k, c in enumerate(exact)}


@pytest.mark.parametrize("name,cache,ragged", [("gpt2", False, False), ("llama", True, False),
                                               ("llama", False, False), ("llama", True, True),
                                               ("gpt2", False, True)])
def test_pruned_calibration_runs_narrow_and_equals_masked_dense(name, cache, ragged):
    dense = {"gpt2": _gpt2, "llama": _llama}[name]()
    dense.config.use_cache = cache  # True: the default config's DynamicCache in every forward
    data = _tokens()
    cg = ecospa.auto_couple(dense)
    exact = [c for c in cg if c.exact]
    plan = _plan(exact, ragged)
    masked = masked_copy(dense, [list(c.units()[i]) for c, idx in plan.items() for i in idx]).eval()
    pruned = copy.deepcopy(dense)
    cg_p = prune_pass(pruned, {c.name: v for c, v in plan.items()}, couplings=cg).couplings
    exact_p = [c for c in cg_p if c.exact]

    ref = calibrate(masked, exact, data, causal_lm_loss)
    got = calibrate(pruned, exact_p, data, causal_lm_loss)

    narrow, fallback = _calls(pruned)
    assert narrow > 0 and fallback == 0, ecospa.execution_report(pruned)
    records = param_records(pruned)
    cons = consumers_of(pruned, exact_p)
    assert set(got.grams) == set(ref.grams) == set(cons)
    for pname, g in got.grams.items():
        assert got.tokens[pname] == ref.tokens[pname]  # every sample once: no check call counted
        kept = torch.as_tensor(records[pname].kept_or_all(cons[pname].in_dim))
        want = ref.grams[pname][kept][:, kept]
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-6), pname
        assert torch.allclose(got.means[pname], ref.means[pname][kept], rtol=1e-4, atol=1e-6), pname
    by_name = {c.name: c for c in exact}
    for c in exact_p:  # the kept units' Fisher: pruned numbering = the kept dense units in order
        kept_units = [u for u in range(by_name[c.name].width) if u not in set(plan[by_name[c.name]])]
        assert torch.allclose(got.fisher[c.name], ref.fisher[c.name][kept_units], rtol=1e-3, atol=1e-12), c.name


def test_a_check_call_is_not_counted():
    """The first call of a new narrow graph is checked against the exact path: that check runs
    the model twice more, and a statistics hook must see the call once."""
    dense = _gpt2()
    data = _tokens(n=1, b=1)
    cg = ecospa.auto_couple(dense)
    pruned = copy.deepcopy(dense)
    cg_p = prune_pass(pruned, {c.name: list(range(0, c.width, 2)) for c in cg if c.exact}, couplings=cg).couplings
    got = calibrate(pruned, [c for c in cg_p if c.exact], data, causal_lm_loss)
    assert set(got.tokens.values()) == {data[0].numel()}
