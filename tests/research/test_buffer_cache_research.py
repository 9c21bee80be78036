"""Research-code KV caches in module buffers (issue 19, item 2) on the litgpt and torchtune models
of ``bench/research/models.py``: prefill and decode run narrow (every attention region, no
fallback call), every step's logits equal the masked dense model's (fp32, rel err <= 1e-5), the
cache buffers are stored at the kept widths, and a cache the model allocates again (litgpt
``set_kv_cache`` anew: new cache modules) or resets in place (torchtune ``reset_caches``) is
handled (``stored.NARROW``, on by default; set here so the tests do not depend on the environment). Skips unless the library imports (the
research venv, ``bench/research/setup_venv.sh``).
"""
from __future__ import annotations

import pytest
import torch

import ecospa
from ecospa.narrow import stored
from bench.research.matrix import TOL, masked_copy, rel_err, uniform_half_plan
from bench.research.models import _tokens, all_specs

CACHE_NAMES = ("k", "v", "k_cache", "v_cache")
SPECS = [pytest.param(s, id=s.name) for s in all_specs() if s.lib in ("litgpt", "torchtune") and s.decode is not None]


@pytest.fixture(autouse=True)
def narrow_buffers(monkeypatch):
    monkeypatch.setattr(stored, "NARROW", True)


def _cache_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.split(".")[-1] in CACHE_NAMES)


def _attn_calls(model) -> dict:
    return {r.path: (r.narrow_calls, r.fallback_calls, r.reasons) for r in ecospa.execution_report(model)
            if r.path.endswith("attn")}


def _decode_steps(spec, model, tokens, cont):
    """Prefill then one token a step, with the library's own cache (set up before, kept after)."""
    b, t = tokens.shape
    outs = []
    with torch.no_grad():
        if spec.lib == "litgpt":
            outs.append(model(tokens, input_pos=torch.arange(t)))
            for i in range(cont.shape[1]):
                outs.append(model(cont[:, i:i + 1], input_pos=torch.tensor([t + i])))
            return outs
        maxlen = model.ecospa_test_maxlen
        causal = torch.tril(torch.ones(maxlen, maxlen, dtype=torch.bool))
        outs.append(model(tokens, mask=causal[None, :t].expand(b, t, maxlen),
                          input_pos=torch.arange(t).unsqueeze(0).expand(b, t)))
        for i in range(cont.shape[1]):
            outs.append(model(cont[:, i:i + 1], mask=causal[None, t + i:t + i + 1].expand(b, 1, maxlen),
                              input_pos=torch.full((b, 1), t + i)))
    return outs


def _setup(spec, model, b: int, maxlen: int, again: bool) -> None:
    if spec.lib == "litgpt":
        model.max_seq_length = maxlen
        model.set_kv_cache(batch_size=b)  # anew: new cache modules, dense
    elif again:
        model.reset_caches()  # in place: zeros, position counter back to 0
    else:
        model.setup_caches(batch_size=b, dtype=torch.float32, decoder_max_seq_len=maxlen)
        model.ecospa_test_maxlen = maxlen


@pytest.mark.parametrize("spec", SPECS)
def test_module_buffer_cache_decodes_narrow_at_the_kept_widths(spec):
    pytest.importorskip(spec.lib)
    torch.manual_seed(0)
    model = spec.build().eval()
    tokens, cont = _tokens(2, 8), _tokens(2, 5, seed=1)
    cg = ecospa.auto_couple(model, (tokens,))
    plan = uniform_half_plan(cg, spec.name)
    ref = masked_copy(model, plan)
    ecospa.prune(model, plan)
    for again in (False, True):
        for m in (model, ref):
            _setup(spec, m, 2, 16, again)
        before = _attn_calls(model)
        got, want = _decode_steps(spec, model, tokens, cont), _decode_steps(spec, ref, tokens, cont)
        for step, (g, w) in enumerate(zip(got, want)):
            assert rel_err(g, w) <= TOL, (again, step, rel_err(g, w))
        after = _attn_calls(model)
        assert after and all(n > before.get(p, (0, 0))[0] and f == before.get(p, (0, 0))[1]
                             for p, (n, f, _) in after.items()), after
        assert _cache_bytes(model) < _cache_bytes(ref), (_cache_bytes(model), _cache_bytes(ref))
