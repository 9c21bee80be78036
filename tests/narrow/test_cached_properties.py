"""Property: random decoders with a KV cache (``DynamicCache``, the default of their configs) decode
exactly and narrow after pruning: Llama (rotary in two halves, MHA / GQA / MQA) and GPT-J (rotary on
interleaved pairs, full or partial), with uniform, ragged or whole-head plans. A prefill and three
decoding steps, each step's logits against the masked dense model's (fp32, relative error <= 1e-5).

The suite runs 6 examples; ``ECOSPA_CACHE_EXAMPLES=200 python -m pytest
tests/narrow/test_cached_properties.py`` runs more.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ecospa
from tests.helpers import masked_copy, plan_units
from tests.narrow.test_cached import _plan, _rel

transformers = pytest.importorskip("transformers")

TOL = 1e-5


@st.composite
def decoders(draw):
    """``(arch, heads, head_dim, kv_heads, rotary_dim, plan kind, seed)``."""
    arch = draw(st.sampled_from(["llama", "gptj"]))
    heads = draw(st.sampled_from([2, 4]))
    head_dim = draw(st.sampled_from([4, 8]))
    kv = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])) if arch == "llama" else heads
    rotary = head_dim if arch == "llama" else draw(st.sampled_from([head_dim, head_dim // 2]))
    kind = draw(st.sampled_from(["uniform", "ragged", "heads"]))
    return arch, heads, head_dim, kv, rotary, kind, draw(st.integers(0, 2**16))


def _model(arch: str, heads: int, head_dim: int, kv: int, rotary: int):
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=heads * head_dim, intermediate_size=24,
                                       num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                                       head_dim=head_dim, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPTJConfig(vocab_size=64, n_embd=heads * head_dim, n_layer=2, n_head=heads,
                                  rotary_dim=rotary, n_positions=64, n_inner=24)
    return transformers.GPTJForCausalLM(cfg).eval()


@settings(max_examples=int(os.environ.get("ECOSPA_CACHE_EXAMPLES", "6")), deadline=None)
@given(decoders())
def test_random_decoders_decode_exactly_and_narrow(spec):
    arch, heads, head_dim, kv, rotary, kind, seed = spec
    torch.manual_seed(seed)
    model = _model(arch, heads, head_dim, kv, rotary)
    x = torch.randint(3, 64, (2, 6))
    cg = ecospa.auto_couple(model, {"input_ids": x})
    plan = _plan(cg, kind, random.Random(seed))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    with torch.no_grad():
        got, want = model(x), ref(x)
        assert _rel(got.logits, want.logits) <= TOL, spec
        cache, ref_cache = got.cache, want.cache
        for step in range(3):
            nxt = torch.randint(3, 64, (2, 1))
            a, b = model(nxt, cache=cache), ref(nxt, cache=ref_cache)
            assert _rel(a.logits, b.logits) <= TOL, (spec, step)
            cache, ref_cache = a.cache, b.cache
    reps = ecospa.execution_report(model)
    assert reps and all(r.narrow and r.by_kind.get("decode", (0, 0))[0] == 3 for r in reps), \
        (spec, [(r.path, r.calls, r.reasons) for r in reps])
