"""KV caches at the kept widths: ``generate()`` on a pruned model gives the masked dense model's
tokens while its cache holds fewer bytes (ecospa.narrow.kvcache)."""
from __future__ import annotations

import random

import pytest
import torch

import ecospa
from tests.helpers import masked_copy, plan_units, random_plan

transformers = pytest.importorskip("transformers")
from tests.test_hf_models import HF  # noqa: E402

GEN = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0, return_dict_in_generate=True)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _pruned(name: str, seed: int = 1):
    build, _, make = HF[name]
    model, x = build(), make()
    cg = ecospa.auto_couple(model, x)
    plan = random_plan(cg, random.Random(seed))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    return model, ref, x["input_ids"]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_generate_stores_the_cache_at_kept_widths(name):
    model, ref, ids = _pruned(name)
    got, want = model.generate(input_ids=ids, **GEN), ref.generate(input_ids=ids, **GEN)
    assert torch.equal(got.sequences, want.sequences)
    small, dense = _cache_bytes(got.past_key_values), _cache_bytes(want.past_key_values)
    assert small < dense, (small, dense)
    kv = [r.kv_cache for r in ecospa.execution_report(model)]
    assert kv and all(k and k.startswith("KV cache stored at the kept widths") for k in kv), kv
    # the scores of every step match too (exact, not only the argmax)
    got = model.generate(input_ids=ids, output_scores=True, **GEN)
    want = ref.generate(input_ids=ids, output_scores=True, **GEN)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cache_filled_elsewhere_stays_dense():
    """A cache that already holds entries ecospa did not write (here: from the masked dense model)
    is continued at the dense width, and the result is still exact."""
    model, ref, ids = _pruned("gpt2")
    past = ref(input_ids=ids, use_cache=True).past_key_values
    nxt = torch.tensor([[3]] * ids.shape[0])
    want = ref(input_ids=nxt, past_key_values=past, use_cache=True).logits
    past = ref(input_ids=ids, use_cache=True).past_key_values
    got = model(input_ids=nxt, past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    kv = [r.kv_cache for r in ecospa.execution_report(model)]
    assert all(k and k.startswith("KV cache at the dense width") for k in kv), kv


def test_the_model_itself_is_untouched_by_the_cache_path():
    """No attribute left on the cache or the modules after a call (the wrap lasts one call)."""
    model, _, ids = _pruned("llama_gqa")
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    assert "update" not in vars(cache)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    assert "update" not in vars(cache)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_encoder_decoder_cache_self_attention_narrow_cross_attention_dense():
    """BART passes an EncoderDecoderCache: the decoder's self-attention cache is stored at the
    kept widths; cross-attention reads its cache's tensors back directly, so that one stays dense,
    said so; every step exact."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=64)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    x = {"input_ids": torch.randint(3, 64, (1, 7)), "decoder_input_ids": torch.zeros(1, 3, dtype=torch.long)}
    cg = ecospa.auto_couple(model, x)
    plan = random_plan(cg, random.Random(3))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, return_dict_in_generate=True, output_scores=True)
    got, want = model.generate(input_ids=x["input_ids"], **kw), ref.generate(input_ids=x["input_ids"], **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    reps = {r.path: r for r in ecospa.execution_report(model)}
    self_attn = [r.kv_cache for p, r in reps.items() if p.endswith("self_attn") and "decoder" in p]
    cross = [r.reasons for p, r in reps.items() if p.endswith("encoder_attn")]
    assert self_attn and all(k and "stored at the kept widths" in k for k in self_attn), self_attn
    assert cross and all(w and "cross-attention cache" in w[0] for w in cross), cross
