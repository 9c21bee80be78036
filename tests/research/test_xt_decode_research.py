"""x-transformers decoding with its own cache (``model(seq, cache=cache, return_intermediates=True)``:
each ``Attention`` is handed an ``Intermediates`` dataclass holding ``cached_kv`` and returns a new
one) on the x-transformers models of ``bench/research/models.py`` that decode: prefill and every
decode step run narrow (every attention region, no fallback call: the dataclass is flattened into
its fields, ``ecospa/capture/datafields.py``), the logits of a teacher-forced decode equal the masked
dense model's (fp32, rel err <= 1e-5), and the cache the caller holds stays at the dense width and
equals the masked dense model's. Skips unless x_transformers imports (the research venv,
``bench/research/setup_venv.sh``).
"""
from __future__ import annotations

import pytest
import torch

import ecospa
from bench.research.matrix import TOL, masked_copy, rel_err, uniform_half_plan
from bench.research.models import _tokens, all_specs, xt_decode as _decode

SPECS = [pytest.param(s, id=s.name) for s in all_specs() if s.lib == "x_transformers" and s.decode is not None]


def _attn_calls(model) -> tuple[int, int, list]:
    reps = ecospa.execution_report(model)
    return (sum(r.narrow_calls for r in reps), sum(r.fallback_calls for r in reps),
            sorted({x for r in reps for x in r.reasons}))


@pytest.mark.parametrize("spec", SPECS)
def test_xt_decode_with_its_cache_runs_narrow_and_exact(spec):
    pytest.importorskip(spec.lib)
    torch.manual_seed(0)
    model = spec.build().float().eval()
    ex = spec.inputs(2, 16)
    plan = uniform_half_plan(ecospa.auto_couple(model, ex), spec.name)
    masked = masked_copy(model, plan)
    ecospa.prune(model, plan)
    prompt, cont = _tokens(2, 12, seed=3), _tokens(2, 5, seed=4)
    ref, ref_kv = _decode(masked, prompt, cont)
    got, kv = _decode(model, prompt, cont)
    assert max(rel_err(a, b) for a, b in zip(got, ref)) <= TOL
    for pair, ref_pair in zip(kv, ref_kv):
        for t, r in zip(pair, ref_pair):
            assert t.shape == r.shape and rel_err(t, r) <= TOL
    narrow, fallback, reasons = _attn_calls(model)
    assert fallback == 0 and narrow > 0, reasons
    regions = [r for r in ecospa.execution_report(model) if r.narrow_calls]
    assert all(r.narrow_calls == 1 + cont.shape[1] for r in regions), [(r.path, r.narrow_calls) for r in regions]
