"""Narrow graphs for calls with a ``StaticCache`` and with sliding-window cache layers
(ecospa.narrow.cached, ecospa.narrow.cachelayers): the attention runs narrow in the prefill and
every decoding step, the static layers hold their pre-allocated keys/values at the kept widths
(written in place, as ``StaticLayer.update`` does), and every step's logits equal the masked
dense model's (fp32, relative error <= 1e-5). Layers no graph serves (``StaticSlidingWindowLayer``,
a layer allocated at the dense widths beforehand) run the exact fallback and say why."""
from __future__ import annotations

import random

import pytest
import torch

import ecospa
from tests.helpers import masked_copy, plan_units
from tests.narrow.test_cached import _plan, _pruned, _qwen2_sliding, _rel, _seq2seq

transformers = pytest.importorskip("transformers")

TOL = 1e-5
STEPS = 4


def _regions(model):
    from ecospa.ir.record import installed_forward
    from ecospa.narrow import RegionForward

    return [f for m in model.modules() if isinstance(f := installed_forward(m), RegionForward)]


def _decode_narrow(model, paths=None) -> None:
    """Every (selected) region ran its prefill and decoding steps narrow, none on the fallback."""
    reps = [r for r in ecospa.execution_report(model) if paths is None or r.path in paths]
    assert reps and all(r.by_kind.get("decode", (0, 0))[0] > 0 and r.by_kind.get("prefill", (0, 0))[0] > 0
                        and r.fallback_calls == 0 for r in reps), [(r.path, r.calls, r.reasons) for r in reps]


def _stored_as_masked_dense(model, cache, ref_cache) -> None:
    """Each layer holds exactly the kept positions of the masked dense model's layer."""
    for region in _regions(model):
        idx = region.kv.graphs.layer_idx
        lay = region.kv.narrow_layers[cache][idx]
        layer, dense = cache.layers[idx], ref_cache.layers[idx]
        for got, want, ix in ((layer.keys, dense.keys, lay[0]), (layer.values, dense.values, lay[1])):
            if isinstance(ix, str):  # nothing of this tensor was removed: stored at the dense widths
                assert got.shape == want.shape and _rel(got, want) <= TOL
                continue
            assert tuple(got.shape) == (want.shape[0], ix.index.shape[0], want.shape[2], ix.index.shape[1])
            assert _rel(got, ix.shrink(want)) <= TOL and _rel(ix.grow(got), want) <= TOL


GEN = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
           output_logits=True, cache_implementation="static")


@pytest.mark.parametrize("arch,kind", [("llama", "uniform"), ("llama", "ragged"), ("gpt2", "uniform"),
                                       ("gpt2", "ragged")])
def test_generate_with_static_cache_runs_narrow_and_exact(arch, kind):
    model, ref, x = _pruned(arch, kind)
    got, want = model.generate(x[:1], **GEN), ref.generate(x[:1], **GEN)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == STEPS and all(_rel(a, b) <= TOL for a, b in zip(got.logits, want.logits))
    _decode_narrow(model)
    assert all(type(layer).__name__ == "StaticLayer" for layer in got.cache.layers)
    if kind == "uniform":  # half of every coupling: every head keeps half of its 8 channels
        heads = 2 if arch == "llama" else 4
        for layer, dense in zip(got.cache.layers, want.cache.layers):
            assert tuple(dense.keys.shape) == (1, heads, 9 + STEPS - 1, 8)
            assert tuple(layer.keys.shape) == tuple(layer.values.shape) == (1, heads, 9 + STEPS - 1, 4)
    _stored_as_masked_dense(model, got.cache, want.cache)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_cache_by_hand_prefill_and_decode_in_place(arch):
    """A StaticCache passed by hand: a prefill and decoding steps, each exact; the layer's buffers
    are allocated once at the kept widths and written in place (their addresses stay)."""
    model, ref, x = _pruned(arch, "ragged", seed=1)
    cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    ref_cache = transformers.StaticCache(config=ref.config, max_cache_len=16)
    with torch.no_grad():
        a, b = model(x, cache=cache, use_cache=True), ref(x, cache=ref_cache, use_cache=True)
        assert _rel(a.logits, b.logits) <= TOL
        ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
        for step in range(3):
            nxt = torch.randint(3, 100, (2, 1))
            a, b = model(nxt, cache=cache, use_cache=True), ref(nxt, cache=ref_cache, use_cache=True)
            assert _rel(a.logits, b.logits) <= TOL, step
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == ptrs
    assert all(int(layer.cumulative_length) == 12 and layer.keys.shape[2] == 16 for layer in cache.layers)
    reps = ecospa.execution_report(model)
    assert reps and all(r.by_kind == {"decode": (3, 0), "prefill": (1, 0)} for r in reps), [r.calls for r in reps]
    assert all(r.kv_bytes[1] <= r.kv_bytes[0] for r in reps)
    _stored_as_masked_dense(model, cache, ref_cache)


def test_fallback_and_graph_alternate_on_one_static_cache():
    """The fallback (narrow graphs off for a step) writes the same buffers at the same layout."""
    model, ref, x = _pruned("llama", "ragged")
    cache = transformers.StaticCache(config=model.config, max_cache_len=12)
    ref_cache = transformers.StaticCache(config=ref.config, max_cache_len=12)
    with torch.no_grad():
        model(x, cache=cache, use_cache=True)
        ref(x, cache=ref_cache, use_cache=True)
        ptrs = [layer.keys.data_ptr() for layer in cache.layers]
        for off in (True, False, True):
            for r in _regions(model):
                r.kv.graphs.why = "off for this test" if off else None
            nxt = torch.randint(3, 100, (2, 1))
            a, b = model(nxt, cache=cache, use_cache=True), ref(nxt, cache=ref_cache, use_cache=True)
            assert _rel(a.logits, b.logits) <= TOL
    assert [layer.keys.data_ptr() for layer in cache.layers] == ptrs
    reps = ecospa.execution_report(model)
    assert all(r.fallback_calls == 2 and r.narrow_calls == 2 for r in reps), [r.calls for r in reps]
    _stored_as_masked_dense(model, cache, ref_cache)


def test_static_cache_allocated_dense_beforehand_falls_back_exactly():
    """``early_initialization`` allocates the layers at the dense widths before any update: they
    stay dense, on the exact fallback, with the reason."""
    model, ref, x = _pruned("llama", "uniform")
    cache = transformers.StaticCache(config=model.config, max_cache_len=12)
    cache.early_initialization(batch_size=2, num_heads=2, head_dim=8, dtype=torch.float32, device="cpu")
    ref_cache = transformers.StaticCache(config=ref.config, max_cache_len=12)
    with torch.no_grad():
        for ids in (x, torch.randint(3, 100, (2, 1))):
            a, b = model(ids, cache=cache, use_cache=True), ref(ids, cache=ref_cache, use_cache=True)
            assert _rel(a.logits, b.logits) <= TOL
    assert all(tuple(layer.keys.shape) == (2, 2, 12, 8) for layer in cache.layers)
    reps = ecospa.execution_report(model)
    assert reps and all(r.narrow_calls == 0 and any("allocated before" in w for w in r.reasons) for r in reps), \
        [(r.calls, r.reasons) for r in reps]


@pytest.mark.parametrize("impl", [None, "static"])
def test_sliding_window_layers(impl):
    """Qwen2 with a sliding window of 4 on its second layer, a prompt longer than the window:
    with the default cache the ``DynamicSlidingWindowLayer`` runs narrow (and keeps the last 3
    positions at the kept widths); with a static cache the full-attention ``StaticLayer`` runs
    narrow and the ``StaticSlidingWindowLayer`` the exact fallback, saying why."""
    torch.manual_seed(0)
    model = _qwen2_sliding(max_window_layers=1).eval()
    x = torch.randint(3, 100, (1, 9))
    cg = ecospa.auto_couple(model, {"input_ids": x})
    plan = _plan(cg, "uniform", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    kw = dict(GEN, cache_implementation=impl)
    got, want = model.generate(x, **kw), ref.generate(x, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(_rel(a, b) <= TOL for a, b in zip(got.logits, want.logits))
    names = [type(layer).__name__ for layer in got.cache.layers]
    if impl is None:
        assert names == ["DynamicLayer", "DynamicSlidingWindowLayer"]
        assert tuple(got.cache.layers[1].keys.shape) == (1, 2, 3, 4)
        assert got.cache.layers[1].cumulative_length == want.cache.layers[1].cumulative_length == 9 + STEPS - 1
        _decode_narrow(model)
        _stored_as_masked_dense(model, got.cache, want.cache)
        return
    assert names == ["StaticLayer", "StaticSlidingWindowLayer"]
    _decode_narrow(model, {"model.layers.0.self_attn"})
    sliding = [r for r in ecospa.execution_report(model) if r.path == "model.layers.1.self_attn"]
    assert sliding and sliding[0].narrow_calls == 0 and "StaticSlidingWindowLayer" in sliding[0].reasons[0]
    assert tuple(got.cache.layers[1].keys.shape) == (1, 2, 4, 4)  # the fallback stores it narrow too


def test_encoder_decoder_static_self_attention_runs_narrow():
    """T5 with ``cache_implementation="static"``: an ``EncoderDecoderCache`` of two static caches.
    The decoder's self-attention (which also reads ``get_seq_length()`` for its position bias: the
    graph input holding ``cumulative_length``) runs narrow at every step; cross-attention the
    exact fallback, as with the default cache."""
    torch.manual_seed(0)
    model = _seq2seq("t5")
    x = torch.randint(3, 100, (2, 7))
    cg = ecospa.auto_couple(model, {"input_ids": x, "decoder_input_ids": torch.randint(3, 100, (2, 5))})
    plan = _plan(cg, "ragged", random.Random(1))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    kw = dict(GEN, pad_token_id=None)
    with torch.no_grad():
        got, want = model.generate(x, **kw), ref.generate(x, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(_rel(a, b) <= TOL for a, b in zip(got.logits, want.logits))
    assert type(got.cache.self_attention_cache).__name__ == "StaticCache"
    decoder_self = {r.path for r in ecospa.execution_report(model) if "decoder" in r.path and "SelfAttention" in r.path}
    assert len(decoder_self) == 2
    _decode_narrow(model, decoder_self)


def test_kv_write_op_and_its_gradient():
    """``ecospa::kv_write``: ``new`` written at ``start ..`` of dim -2, the gradient split back."""
    from ecospa.ops.cache import kv_write, kv_write_into

    buf = torch.randn(2, 3, 6, 4, dtype=torch.double, requires_grad=True)
    new = torch.randn(2, 3, 2, 4, dtype=torch.double, requires_grad=True)
    start = torch.tensor(3)
    out = kv_write(buf, new, start)
    assert torch.equal(out[:, :, 3:5], new) and torch.equal(out[:, :, :3], buf[:, :, :3])
    assert torch.equal(out[:, :, 5:], buf[:, :, 5:])
    assert torch.autograd.gradcheck(lambda b, n: kv_write(b, n, start), (buf, new))
    held = buf.detach().clone()
    assert kv_write_into(held, new.detach(), start) is held and torch.equal(held, out.detach())


def test_a_module_asking_a_sliding_layer_its_length_runs_the_fallback():
    """A ``DynamicSlidingWindowLayer`` answers ``get_seq_length()`` with its cumulative length,
    which the narrow graph does not hold (it holds the window): an attention that asks is not
    served by a graph (it would see the window's length), and runs the exact fallback, saying so."""

    class AsksLength(transformers.models.qwen2.modeling_qwen2.Qwen2Attention):
        def forward(self, hidden_states, *args, **kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None:  # what an attention offsetting its positions by the cache would read
                hidden_states = hidden_states + 0.0 * cache.get_seq_length(self.layer_idx)
            return super().forward(hidden_states, *args, **kwargs)

    torch.manual_seed(0)
    model = _qwen2_sliding(max_window_layers=1).eval()
    model.model.layers[1].self_attn.__class__ = AsksLength
    x = torch.randint(3, 100, (1, 9))
    cg = ecospa.auto_couple(model, {"input_ids": x})
    plan = _plan(cg, "uniform", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    kw = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0)
    got, want = model.generate(x, **kw), ref.generate(x, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert all(_rel(a, b) <= TOL for a, b in zip(got.logits, want.logits))
    sliding = [r for r in ecospa.execution_report(model) if r.path == "model.layers.1.self_attn"]
    assert sliding and sliding[0].narrow_calls == 0, sliding
    assert any("get_seq_length() of a sliding-window layer" in w for w in sliding[0].reasons), sliding[0].reasons
