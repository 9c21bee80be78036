"""Transformers models from tiny configs (sdpa attention) and ``nn.TransformerEncoderLayer``.

Discovery must find per-head qk/vo (per kv head under GQA, rotary pairs for Llama), the FFN/GLU
of every layer, nothing else; pruning must equal the masked dense model.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn as nn

import ecospa
from tests.helpers import (
    assert_couplings_match,
    assert_pruned_equals_masked,
    masked_copy,
    plan_units,
    random_plan,
)
from tests.zoo.attention import mha_expected
from tests.zoo.expect import (
    Expect,
    attention_expects,
    conv1d_in,
    conv1d_out,
    ffn_expect,
    glu_expect,
    lin_in,
    lin_out,
)

transformers = pytest.importorskip("transformers")

L, D_MODEL, H, KV, HD, FF = 2, 32, 4, 2, 8, 48


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=D_MODEL, n_layer=L, n_head=H,
                                  n_positions=64, n_inner=FF, bos_token_id=0, eos_token_id=0,
                                  use_cache=False, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _gpt2_expected():
    out = []
    for i in range(L):
        p = f"transformer.h.{i}."
        out += attention_expects(
            n_kv=H, rep=1, head_dim=HD,
            q=lambda h, j, p=p: conv1d_out(f"{p}attn.c_attn", h * HD + j),
            k=lambda g, j, p=p: conv1d_out(f"{p}attn.c_attn", D_MODEL + g * HD + j),
            v=lambda g, j, p=p: conv1d_out(f"{p}attn.c_attn", 2 * D_MODEL + g * HD + j),
            o=lambda h, j, p=p: conv1d_in(f"{p}attn.c_proj", h * HD + j))
        units = [conv1d_out(f"{p}mlp.c_fc", j) + conv1d_in(f"{p}mlp.c_proj", j) for j in range(FF)]
        out.append(Expect.of("ffn", units))
    return out


def _gqa_decoder(config_cls, model_cls):
    """A tiny GQA decoder of the Llama family (Llama, Qwen3): D_MODEL wide, H/KV heads of HD."""
    cfg = config_cls(vocab_size=100, hidden_size=D_MODEL, intermediate_size=FF, num_hidden_layers=L,
                     num_attention_heads=H, num_key_value_heads=KV, head_dim=HD,
                     max_position_embeddings=64, use_cache=False, attn_implementation="sdpa")
    return model_cls(cfg).eval()


def _llama():
    return _gqa_decoder(transformers.LlamaConfig, transformers.LlamaForCausalLM)


def _llama_expected():
    out = []
    for i in range(L):
        p = f"model.layers.{i}."
        out += attention_expects(
            n_kv=KV, rep=H // KV, head_dim=HD, rotary="half",
            q=lambda h, j, p=p: lin_out(f"{p}self_attn.q_proj", h * HD + j, False),
            k=lambda g, j, p=p: lin_out(f"{p}self_attn.k_proj", g * HD + j, False),
            v=lambda g, j, p=p: lin_out(f"{p}self_attn.v_proj", g * HD + j, False),
            o=lambda h, j, p=p: lin_in(f"{p}self_attn.o_proj", h * HD + j))
        out.append(glu_expect(f"{p}mlp.gate_proj", f"{p}mlp.up_proj", f"{p}mlp.down_proj", FF))
    return out


def _bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=D_MODEL, num_hidden_layers=L,
                                  num_attention_heads=H, intermediate_size=FF,
                                  max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


def _bert_like_expected(layer, q, k, v, o, fc, out_fc):
    res = []
    for i in range(L):
        p = layer.format(i)
        res += attention_expects(
            n_kv=H, rep=1, head_dim=HD,
            q=lambda h, j, p=p: lin_out(p + q, h * HD + j),
            k=lambda g, j, p=p: lin_out(p + k, g * HD + j),
            v=lambda g, j, p=p: lin_out(p + v, g * HD + j),
            o=lambda h, j, p=p: lin_in(p + o, h * HD + j))
        res.append(ffn_expect(p + fc, p + out_fc, FF))
    return res


def _bert_expected():
    return _bert_like_expected("encoder.layer.{}.", "attention.self.query", "attention.self.key",
                               "attention.self.value", "attention.output.dense",
                               "intermediate.dense", "output.dense")


def _vit():
    cfg = transformers.ViTConfig(hidden_size=D_MODEL, num_hidden_layers=L, num_attention_heads=H,
                                 intermediate_size=FF, image_size=16, patch_size=8,
                                 attn_implementation="sdpa")
    return transformers.ViTModel(cfg).eval()


def _vit_expected(model):
    names = {n for n, _ in model.named_parameters()}
    if "layers.0.attention.q_proj.weight" in names:  # transformers 5 layout
        return _bert_like_expected("layers.{}.", "attention.q_proj", "attention.k_proj",
                                   "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    return _bert_like_expected("encoder.layer.{}.", "attention.attention.query",
                               "attention.attention.key", "attention.attention.value",
                               "attention.output.dense", "intermediate.dense", "output.dense")


def _ids(b=2, t=7):
    return {"input_ids": torch.randint(0, 100, (b, t))}


def _pixels(b=2):
    return {"pixel_values": torch.randn(b, 3, 16, 16)}


HF = {
    "gpt2": (_gpt2, lambda m: _gpt2_expected(), _ids),
    "llama_gqa": (_llama, lambda m: _llama_expected(), _ids),
    "bert": (_bert, lambda m: _bert_expected(), _ids),
    "vit": (_vit, _vit_expected, lambda b=2, t=None: _pixels(b)),
}


@pytest.mark.parametrize("name", list(HF))
def test_hf_discovery(name):
    """Exactly the expected couplings, from example inputs given as a dict of kwargs."""
    build, expected, inputs = HF[name]
    model = build()
    cg = ecospa.auto_couple(model, inputs())
    assert_couplings_match(cg, expected(model))


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "bert"])
def test_hf_discovery_without_inputs(name):
    """HF models need no example inputs (dummy inputs); same couplings and names."""
    build, _, inputs = HF[name]
    model = build()
    a = ecospa.auto_couple(model)
    b = ecospa.auto_couple(model, inputs())
    assert [(c.name, c.units()) for c in a] == [(c.name, c.units()) for c in b]


@pytest.mark.parametrize("name", list(HF))
def test_hf_pruned_equals_masked(name):
    """A third of every coupling removed: outputs equal the masked dense model, other sizes too."""
    build, _, inputs = HF[name]
    model = build()
    x = inputs()
    plan = random_plan(ecospa.auto_couple(model, x), random.Random(0))
    assert plan
    assert_pruned_equals_masked(model, x, plan, check_inputs=[inputs(3, 4)])


def test_gpt2_generate_after_pruning_matches_masked():
    """Greedy generate() with the KV cache on the pruned GPT-2 gives the masked model's tokens."""
    model = _gpt2()
    x = _ids(1, 5)
    plan = random_plan(ecospa.auto_couple(model, x), random.Random(1))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan)
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(model.generate(**x, **kw), ref.generate(**x, **kw))


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer(batch_first=True)`` as the whole model."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D_MODEL, H, FF, dropout=0.1, batch_first=True)

    def forward(self, x):
        return self.layer(x)


def _encoder_expected():
    return mha_expected("layer.self_attn.", D_MODEL, H) + [
        ffn_expect("layer.linear1", "layer.linear2", FF)]


def test_transformer_encoder_layer_discovery_and_prune():
    """Packed in-projection heads and the linear1/linear2 FFN; pruned == masked (eval, the
    fused fast path included) and train() still applies dropout."""
    model = EncoderLayer().eval()
    x = (torch.randn(2, 7, D_MODEL),)
    cg = ecospa.auto_couple(model, x)
    assert_couplings_match(cg, _encoder_expected())
    plan = random_plan(cg, random.Random(2))
    assert_pruned_equals_masked(model, x, plan, check_inputs=[(torch.randn(3, 4, D_MODEL),)])
    model.train()
    out = model(*x)
    out.sum().backward()
    assert not torch.allclose(out, model(*x))


def test_llama_pruning_twice_without_inputs():
    """Llama (GQA, rotary): prune, re-discover with dummy inputs, prune again: still exact, and
    every coupling's width dropped by what the first round removed."""
    model = _llama()
    x = _ids()
    cg1 = ecospa.auto_couple(model)
    plan1 = random_plan(cg1, random.Random(3), frac=0.25)
    assert_pruned_equals_masked(model, x, plan1)
    cg2 = ecospa.auto_couple(model)
    done = {c.name: len(i) for c, i in plan1.items()}
    assert {c.name: c.width for c in cg2} == {c.name: c.width - done.get(c.name, 0) for c in cg1}
    assert_pruned_equals_masked(model, x, random_plan(cg2, random.Random(4), frac=0.25))


def _albert():
    cfg = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=D_MODEL,
                                    num_hidden_layers=3, num_attention_heads=H, intermediate_size=FF,
                                    max_position_embeddings=64, attn_implementation="sdpa")
    return transformers.AlbertModel(cfg).eval()


def test_albert_shared_layer_one_coupling_per_head():
    """ALBERT runs one layer three times: one qk and one vo coupling per head (not per call),
    one FFN, all exact, pruned exactly in every call."""
    model = _albert()
    x = _ids()
    cg = ecospa.auto_couple(model, x)
    p = "encoder.albert_layer_groups.0.albert_layers.0."
    out = attention_expects(
        n_kv=H, rep=1, head_dim=HD,
        q=lambda h, j: lin_out(f"{p}attention.query", h * HD + j),
        k=lambda g, j: lin_out(f"{p}attention.key", g * HD + j),
        v=lambda g, j: lin_out(f"{p}attention.value", g * HD + j),
        o=lambda h, j: lin_in(f"{p}attention.dense", h * HD + j))
    out.append(ffn_expect(f"{p}ffn", f"{p}ffn_output", FF))
    # embedding_hidden_mapping_in (16 -> 32) feeds the residual stream: its rows are inexact
    assert_couplings_match(cg, out)
    assert_pruned_equals_masked(model, x, random_plan(cg, random.Random(5)), check_inputs=[_ids(3, 4)])


def _qwen3():
    return _gqa_decoder(transformers.Qwen3Config, transformers.Qwen3ForCausalLM)


def test_qwen3_qk_norm_makes_qk_inexact_but_vo_and_glu_prune():
    """Qwen3's RMSNorm over each head's q and k dims mixes a unit's channels: every qk coupling
    is inexact and says so; v.o (per KV head) and the GLU still prune exactly."""
    model = _qwen3()
    x = _ids()
    cg = ecospa.auto_couple(model, x)
    qk = [c for c in cg.inexact if c.kind == "qk"]
    assert len(qk) == L * KV, cg.summary()
    assert all("over channels" in c.reason and ("q_norm" in c.reason or "k_norm" in c.reason) for c in qk)
    assert sorted(Counter(c.kind for c in cg).items()) == [("glu", L), ("vo", L * KV)]
    assert_pruned_equals_masked(model, x, random_plan(cg, random.Random(6)), check_inputs=[_ids(3, 4)])
