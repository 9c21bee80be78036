"""Narrow graphs for calls with a KV cache (ecospa.narrow.cached): models built from their
default configs (``use_cache=True``) run their attention narrow in every forward (eval, training,
prefill, each decoding step of ``generate()``), with the cache at the kept widths, and every
step's logits equal the masked dense model's (fp32, relative error <= 1e-5)."""
from __future__ import annotations

import random

import pytest
import torch

import ecospa
from tests.helpers import masked_copy, plan_units

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _gpt2(dropout: float | None = None):
    kw = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48,
                                  bos_token_id=1, eos_token_id=2, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(dropout: float | None = None):
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _qwen2(dropout: float | None = None):
    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    return transformers.Qwen2ForCausalLM(cfg)


def _qwen2_sliding(dropout: float | None = None, max_window_layers: int = 0):
    """Qwen2 with a sliding window of 4 on the layers from ``max_window_layers`` on (the others
    full attention): a ``StaticCache`` gives those ``StaticSlidingWindowLayer`` layers."""
    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=max_window_layers)
    return transformers.Qwen2ForCausalLM(cfg)


ARCHS = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2}


def _plan(cg, kind: str, rng: random.Random) -> dict:
    """``uniform``: half of every coupling; ``ragged``: 1 to width-1 units of each (heads of
    different widths); ``heads``: uniform, and one attention head of every layer removed whole."""
    plan = {}
    for c in cg:
        if c.width < 2:
            continue
        n = c.width // 2 if kind != "ragged" else rng.randint(1, c.width - 1)
        if kind == "heads" and c.kind in ("qk", "vo") and c.name.endswith("head1"):
            n = c.width
        plan[c] = sorted(rng.sample(range(c.width), n))
    return plan


def _pruned(arch, kind: str, seed: int = 0, dropout: float | None = None):
    """``arch``: a name of :data:`ARCHS` or a model builder."""
    torch.manual_seed(seed)
    model = (ARCHS[arch] if isinstance(arch, str) else arch)(dropout).eval()
    assert model.config.use_cache  # the default config, as a user gets it
    x = torch.randint(3, 100, (2, 9))
    cg = ecospa.auto_couple(model, {"input_ids": x})
    plan = _plan(cg, kind, random.Random(seed))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    return model, ref, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def _all_narrow(model) -> None:
    rep = ecospa.execution_report(model)
    assert rep and all(r.narrow_calls > 0 and r.fallback_calls == 0 for r in rep), \
        [(r.path, r.narrow_calls, r.fallback_calls, r.reasons) for r in rep]


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("kind", ["uniform", "ragged", "heads"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_forward_runs_narrow_and_exact(arch, kind):
    model, ref, x = _pruned(arch, kind)
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert _rel(got.logits, want.logits) <= TOL
    _all_narrow(model)
    small, dense = _cache_bytes(got.cache), _cache_bytes(want.cache)
    assert small < dense if kind != "ragged" else small <= dense  # ragged heads pad to 8 channels
    # a second forward continuing the cache (a decoding step by hand) is narrow and exact too
    nxt = torch.randint(3, 100, (2, 1))
    with torch.no_grad():
        a = model(nxt, cache=got.cache).logits
        b = ref(nxt, cache=want.cache).logits
    assert _rel(a, b) <= TOL
    _all_narrow(model)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_report_counts_prefill_and_decode_and_the_cache_bytes(arch):
    """``execution_report`` says per kind of call what ran, and the bytes of each module's cache
    layer against the dense widths (the same as the masked dense model's cache holds)."""
    model, ref, x = _pruned(arch, "uniform")
    with torch.no_grad():
        got, want = model(x), ref(x)
        model(torch.randint(3, 100, (2, 1)), cache=got.cache)
        ref(torch.randint(3, 100, (2, 1)), cache=want.cache)
        model(x, use_cache=False)
    reps = ecospa.execution_report(model)
    assert reps and all(r.by_kind == {"decode": (1, 0), "plain": (1, 0), "prefill": (1, 0)} for r in reps), \
        [r.calls for r in reps]
    layers = [(lay.keys, lay.values) for lay in got.cache.layers]
    dense_layers = [(lay.keys, lay.values) for lay in want.cache.layers]
    for r, (k, v), (dk, dv) in zip(reps, layers, dense_layers):
        stored = k.numel() * k.element_size() + v.numel() * v.element_size()
        assert r.kv_bytes == (dk.numel() * 4 + dv.numel() * 4, stored) and stored * 2 == r.kv_bytes[0]


def test_report_counts_calls_with_a_cache_that_fall_back():
    """A cache layer no graph serves (a StaticSlidingWindowLayer) runs the exact fallback: its
    calls are counted as such, per kind."""
    model, _, x = _pruned(_qwen2_sliding, "uniform")
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
    reps = ecospa.execution_report(model)
    assert reps and all(r.narrow_calls == 0 and sum(f for _, _, f in r.calls) == r.fallback_calls == 1
                        for r in reps), [r.calls for r in reps]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_step_with_default_cache_runs_narrow(arch):
    model, ref, x = _pruned(arch, "ragged", dropout=0.0)
    model.train()
    ref.train()
    got, want = model(x, labels=x), ref(x, labels=x)
    got.loss.backward()
    want.loss.backward()
    assert _rel(got.loss, want.loss) <= TOL
    emb, emb_ref = model.get_input_embeddings().weight, ref.get_input_embeddings().weight
    assert _rel(emb.grad, emb_ref.grad) <= 1e-4
    _all_narrow(model)


def test_training_with_dropout_runs_narrow():
    """GPT-2's default dropout: the graph with random ops is checked through its eval twin."""
    model, _, x = _pruned("gpt2", "uniform")
    model.train()
    model(x, labels=x).loss.backward()
    _all_narrow(model)


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=0.9),
    "beam": dict(do_sample=False, num_beams=3),
}


def _generate(model, ids, mask, mode: str):
    torch.manual_seed(123)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                          pad_token_id=0, return_dict_in_generate=True, output_scores=True, output_logits=True,
                          **MODES[mode])


@pytest.mark.parametrize("mode,kind", [("greedy", "uniform"), ("greedy", "ragged"), ("sample", "ragged"),
                                       ("beam", "uniform")])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_every_step_equals_masked_dense(arch, mode, kind):
    model, ref, x = _pruned(arch, kind)
    ids = x[:1]
    mask = torch.ones_like(ids)
    got, want = _generate(model, ids, mask, mode), _generate(ref, ids, mask, mode)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == len(want.logits) == 6
    for a, b in zip(got.logits, want.logits):
        assert _rel(a, b) <= TOL
    for a, b in zip(got.scores, want.scores):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)) and _rel(a[fin], b[fin]) <= TOL
    _all_narrow(model)
    small, dense = _cache_bytes(got.cache), _cache_bytes(want.cache)
    assert small < dense if kind != "ragged" else small <= dense


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_batch_with_left_padding(arch):
    model, ref, x = _pruned(arch, "ragged", seed=1)
    ids = x.clone()
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # the first row is 3 tokens shorter, padded on the left
    for mode in ("greedy", "beam"):
        got, want = _generate(model, ids, mask, mode), _generate(ref, ids, mask, mode)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):
            assert _rel(a, b) <= TOL
    _all_narrow(model)


def test_cache_layers_hold_the_kept_widths():
    """Removed heads are left out of the cache and the kept channels are all it stores."""
    model, ref, x = _pruned("llama", "heads")
    with torch.no_grad():
        got, want = model(x).cache, ref(x).cache
    for a, b in zip(got.layers, want.layers):
        # 2 KV heads of 8 channels: head 1 removed whole, head 0 keeps half its channels
        assert tuple(b.keys.shape) == (2, 2, 9, 8)
        assert tuple(a.keys.shape) == (2, 1, 9, 4) and tuple(a.values.shape) == (2, 1, 9, 4)


def test_fallback_and_graph_share_one_cache():
    """A cache written by the fallback (narrow graphs off for a while) is read by the narrow graph
    later, and the other way round: one layout per layer, exact throughout."""
    model, ref, x = _pruned("gpt2", "ragged")
    from ecospa.narrow import RegionForward
    from ecospa.ir.record import installed_forward

    regions = [f for m in model.modules() if isinstance(f := installed_forward(m), RegionForward)]
    with torch.no_grad():
        got, want = model(x), ref(x)  # narrow graphs write the cache
        for r in regions:
            r.kv.graphs.why = "off for this test"  # the next call runs the fallback
        nxt = torch.randint(3, 100, (2, 1))
        a = model(nxt, cache=got.cache).logits
        b = ref(nxt, cache=want.cache).logits
        assert _rel(a, b) <= TOL
        for r in regions:
            r.kv.graphs.why = None
        a = model(nxt, cache=got.cache).logits
        b = ref(nxt, cache=want.cache).logits
        assert _rel(a, b) <= TOL
    rep = ecospa.execution_report(model)
    assert all(r.fallback_calls == 1 and r.narrow_calls >= 2 for r in rep), rep


def test_static_sliding_window_cache_falls_back_exactly_and_says_why():
    """A cache layer class the graphs do not serve (StaticSlidingWindowLayer, what a static cache
    gives a sliding-window model) runs the exact fallback, reported. (A plain StaticCache runs
    narrow: tests/narrow/test_static_cache.py.)"""
    model, ref, x = _pruned(_qwen2_sliding, "uniform")
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_logits=True, cache_implementation="static")
    got, want = model.generate(x[:1], **kw), ref.generate(x[:1], **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(_rel(a, b) <= TOL for a, b in zip(got.logits, want.logits))
    rep = ecospa.execution_report(model)
    assert all(r.fallback_calls > 0 and any("StaticSlidingWindowLayer" in w for w in r.reasons) for r in rep), rep


def test_layers_share_one_capture_though_each_reads_its_own_layer_idx(monkeypatch):
    """Every HF attention reads its own ``layer_idx`` (to pick its cache layer); the captures of
    two layers are the same graph, so the other layers share it instead of exporting again."""
    import ecospa.narrow.cached as cached_mod
    import ecospa.narrow.forward as fwd_mod
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    cg = ecospa.auto_couple(model)
    ecospa.prune(model, {c: list(range(c.width // 2)) for c in cg})
    exports = []
    for mod in (fwd_mod, cached_mod):
        real = mod.export_call if hasattr(mod, "export_call") else None
        if real is not None:
            monkeypatch.setattr(mod, "export_call", lambda *a, _r=real, **k: exports.append(1) or _r(*a, **k))
    with torch.no_grad():
        model(torch.randint(0, 96, (2, 8)))
    reps = ecospa.execution_report(model)
    assert reps and all(r.narrow for r in reps), [r.reasons for r in reps]
    assert len(exports) <= 2, f"{len(exports)} exports for 6 layers"


def _seq2seq(name: str):
    if name == "t5":
        cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_cache_decoder_self_attention_runs_narrow(name):
    """Encoder-decoder models get an ``EncoderDecoderCache``: the decoder's self-attention runs
    narrow on its self-attention cache (prefill and every decoding step); cross-attention reads
    its keys back directly and runs the exact fallback, saying so. Every step equals the masked
    dense model."""
    torch.manual_seed(0)
    model = _seq2seq(name)
    x = torch.randint(3, 100, (2, 7))
    inputs = {"input_ids": x, "decoder_input_ids": torch.randint(3, 100, (2, 5))}
    cg = ecospa.auto_couple(model, inputs)
    plan = _plan(cg, "ragged", random.Random(1))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        got, want = model.generate(x, **kw), ref.generate(x, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(_rel(a, b) <= TOL for a, b in zip(got.logits, want.logits))
    reps = ecospa.execution_report(model)
    decoder_self = [r for r in reps if "decoder" in r.path and ("SelfAttention" in r.path or "self_attn" in r.path)]
    cross = [r for r in reps if "EncDecAttention" in r.path or "encoder_attn" in r.path]
    assert decoder_self and all(r.narrow and r.by_kind.get("decode", (0, 0))[0] > 0 for r in decoder_self), \
        [(r.path, r.calls, r.reasons) for r in decoder_self]
    assert cross and all(r.fallback_calls and "cross-attention cache" in r.reasons[0] for r in cross)

