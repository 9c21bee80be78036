"""Tiny random-weight models from research libraries, built by config (no downloads).

Each ``Spec`` builds a model in eval mode with fp32 weights and says what ecospa should find in
it (``expected``: the number of couplings of each kind, read from the library's source and the
config) and how to drive it (example inputs, a loss for one training step, a KV-cache decode
when the library has one). Used by ``bench/research/matrix.py`` and
``tests/research/test_research_models.py``.

Expected counts: ecospa reports one q.k and one v.o coupling per *key/value* head and layer (a
GQA group's query heads share their k/v head's units), one FFN coupling (``ffn`` or ``glu``) per
feed-forward block (per expert in a MoE), and on a cross-attention layer one q.k and one v.o per
head too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

VOCAB = 256
DIM = 128
HEADS = 4
KV = 2
FFN = 256
LAYERS = 2


@dataclass
class Spec:
    name: str
    lib: str                        # the module to import (skipped when it does not import)
    notes: str                      # the config in words
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int], Any]   # (batch, seq) -> example inputs (tuple or dict)
    expected: dict                  # {"qk": n, "vo": n, "ffn": n}
    narrow_prefill: bool = True     # every attention region should run the prefill narrow
    trainable: bool = True          # a backward pass runs on CPU
    decode: Callable | None = None  # (model, tokens, steps) -> list of logits, or None
    fast: bool = False              # in the pytest subset
    extra: dict = field(default_factory=dict)


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _tokens(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


# -- torchtune ----------------------------------------------------------------------------------

def _tt_decode(model, tokens, cont):
    """torchtune's KV cache (``setup_caches``: module buffers), prefill then one token a step."""
    b, t = tokens.shape
    steps = cont.shape[1]
    maxlen = t + steps + 1
    model.setup_caches(batch_size=b, dtype=torch.float32, decoder_max_seq_len=maxlen)
    causal = torch.tril(torch.ones(maxlen, maxlen, dtype=torch.bool))
    outs = []
    with torch.no_grad():
        pos = torch.arange(t).unsqueeze(0).expand(b, t)
        outs.append(model(tokens, mask=causal[None, :t].expand(b, t, maxlen), input_pos=pos)[:, -1])
        for i in range(steps):
            p = torch.full((b, 1), t + i)
            outs.append(model(cont[:, i:i + 1], mask=causal[None, t + i:t + i + 1].expand(b, 1, maxlen),
                              input_pos=p)[:, -1])
    from torchtune.modules.common_utils import delete_kv_caches
    delete_kv_caches(model)
    return outs


def _torchtune_specs() -> list[Spec]:
    def llama3(kv):
        def build():
            from torchtune.models.llama3 import llama3
            return llama3(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=kv,
                          embed_dim=DIM, max_seq_len=1024, intermediate_dim=FFN, rope_base=10000)
        return build

    def qwen2():
        from torchtune.models.qwen2 import qwen2
        return qwen2(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV, embed_dim=DIM,
                     intermediate_dim=FFN, max_seq_len=1024, rope_base=10000.0, tie_word_embeddings=True)

    def gemma():
        from torchtune.models.gemma._component_builders import gemma
        return gemma(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, head_dim=32, num_kv_heads=1,
                     embed_dim=DIM, intermediate_dim=FFN, max_seq_len=1024)

    def phi3():
        from torchtune.models.phi3._component_builders import phi3
        return phi3(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=HEADS, embed_dim=DIM,
                    intermediate_dim=FFN, max_seq_len=1024)

    tok = lambda b, t: (_tokens(b, t),)  # noqa: E731
    return [
        Spec("torchtune.llama3 GQA", "torchtune", f"llama3 builder, {HEADS} heads / {KV} kv, SwiGLU, RoPE",
             llama3(KV), tok, {"qk": LAYERS * KV, "vo": LAYERS * KV, "ffn": LAYERS}, decode=_tt_decode, fast=True),
        Spec("torchtune.llama3 MQA", "torchtune", f"llama3 builder, {HEADS} heads / 1 kv",
             llama3(1), tok, {"qk": LAYERS, "vo": LAYERS, "ffn": LAYERS}, decode=_tt_decode),
        Spec("torchtune.qwen2", "torchtune", f"qwen2 builder, qkv bias, {KV} kv, tied embeddings",
             qwen2, tok, {"qk": LAYERS * KV, "vo": LAYERS * KV, "ffn": LAYERS}, decode=_tt_decode),
        Spec("torchtune.gemma", "torchtune", "gemma builder, MQA, head_dim 32, GeGLU, scaled embeddings",
             gemma, tok, {"qk": LAYERS, "vo": LAYERS, "ffn": LAYERS}, decode=_tt_decode),
        Spec("torchtune.phi3", "torchtune", "phi3 builder, fused qkv_proj, fused gate_up_proj",
             phi3, tok, {"qk": LAYERS * HEADS, "vo": LAYERS * HEADS, "ffn": LAYERS}, decode=_tt_decode),
    ]


# -- litgpt -------------------------------------------------------------------------------------

def _lit_decode(model, tokens, cont):
    """litgpt's KV cache (``set_kv_cache``: module buffers), prefill then one token a step."""
    b, t = tokens.shape
    steps = cont.shape[1]
    model.max_seq_length = t + steps + 1
    model.set_kv_cache(batch_size=b)
    outs = []
    with torch.no_grad():
        outs.append(model(tokens, input_pos=torch.arange(t))[:, -1])
        for i in range(steps):
            outs.append(model(cont[:, i:i + 1], input_pos=torch.tensor([t + i]))[:, -1])
    model.clear_kv_cache()
    model.max_seq_length = model.config.block_size
    return outs


def _litgpt_specs() -> list[Spec]:
    def gpt(**kw):
        def build():
            from litgpt.model import GPT
            from litgpt.config import Config
            base = dict(block_size=1024, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS,
                        n_embd=DIM, bias=False, intermediate_size=FFN)
            base.update(kw)
            return GPT(Config(**base))
        return build

    tok = lambda b, t: (_tokens(b, t),)  # noqa: E731
    L = LAYERS
    llama = dict(norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", parallel_residual=False, rotary_percentage=1.0)
    return [
        Spec("litgpt pythia-like", "litgpt", "parallel residual, GptNeoxMLP, LayerNorm, rotary 25%, bias",
             gpt(parallel_residual=True, bias=True, rotary_percentage=0.25),
             tok, {"qk": L * HEADS, "vo": L * HEADS, "ffn": L}, decode=_lit_decode, fast=True),
        Spec("litgpt llama GQA", "litgpt", f"LLaMAMLP, RMSNorm, {KV} query groups, full rotary",
             gpt(n_query_groups=KV, **llama), tok, {"qk": L * KV, "vo": L * KV, "ffn": L}, decode=_lit_decode),
        Spec("litgpt MQA partial-rotary", "litgpt", "1 query group, rotary 50%",
             gpt(n_query_groups=1, **{**llama, "rotary_percentage": 0.5}), tok,
             {"qk": L, "vo": L, "ffn": L}, decode=_lit_decode),
        Spec("litgpt falcon-like parallel", "litgpt", "parallel residual + shared attention norm, MQA",
             gpt(parallel_residual=True, shared_attention_norm=True, n_query_groups=1, rotary_percentage=1.0), tok,
             {"qk": L, "vo": L, "ffn": L}, decode=_lit_decode),
        Spec("litgpt gemma-like", "litgpt", "GemmaMLP (GeGLU), softcapped attention logits 50",
             gpt(n_query_groups=KV, norm_class_name="RMSNorm", mlp_class_name="GemmaMLP", parallel_residual=False,
                 rotary_percentage=1.0, attention_logit_softcapping=50.0), tok,
             {"qk": L * KV, "vo": L * KV, "ffn": L}, decode=_lit_decode),
        Spec("litgpt MoE", "litgpt", "LLaMAMoE, 4 experts, top-2, GQA",
             gpt(n_query_groups=KV, n_expert=4, n_expert_per_token=2, moe_intermediate_size=64,
                 **{**llama, "mlp_class_name": "LLaMAMoE"}), tok,
             {"qk": L * KV, "vo": L * KV, "ffn": L * 4}, decode=_lit_decode, fast=True),
    ]


# -- x-transformers -----------------------------------------------------------------------------

def xt_decode(model, tokens, cont) -> tuple[list[torch.Tensor], list]:
    """Teacher-forced decode with x-transformers' cache (``return_intermediates=True`` /
    ``cache=``: each attention gets an ``Intermediates`` dataclass holding ``cached_kv``): the
    last-position logits of every step, and each attention's ``cached_kv`` after the last one."""
    outs = []
    with torch.no_grad():
        logits, cache = model(tokens, return_intermediates=True)
        outs.append(logits[:, -1])
        seq = tokens
        for i in range(cont.shape[1]):
            seq = torch.cat([seq, cont[:, i:i + 1]], 1)
            logits, cache = model(seq, cache=cache, return_intermediates=True)
            outs.append(logits[:, -1])
    return outs, [a.cached_kv for a in cache.attn_intermediates]


def _xt_specs() -> list[Spec]:
    def wrapper(**kw):
        def build():
            from x_transformers import TransformerWrapper, Decoder
            return TransformerWrapper(num_tokens=VOCAB, max_seq_len=1024,
                                      attn_layers=Decoder(dim=DIM, depth=LAYERS, heads=HEADS, attn_dim_head=DIM // HEADS, **kw))
        return build

    def xdecode(model, tokens, cont):
        return xt_decode(model, tokens, cont)[0]

    def cross_build():
        from x_transformers import TransformerWrapper, Decoder
        return TransformerWrapper(num_tokens=VOCAB, max_seq_len=1024,
                                  attn_layers=Decoder(dim=DIM, depth=LAYERS, heads=HEADS, attn_dim_head=DIM // HEADS,
                                                      cross_attend=True, rotary_pos_emb=True))

    def cross_inputs(b, t):
        g = torch.Generator().manual_seed(1)
        return {"x": _tokens(b, t), "context": torch.randn(b, 7, DIM, generator=g)}

    tok = lambda b, t: (_tokens(b, t),)  # noqa: E731
    L = LAYERS
    return [
        Spec("x-transformers rotary", "x_transformers", "Decoder, rotary (x-transformers default: half of head dim)",
             wrapper(rotary_pos_emb=True), tok, {"qk": L * HEADS, "vo": L * HEADS, "ffn": L}, decode=xdecode, fast=True),
        Spec("x-transformers GQA+GLU", "x_transformers", f"attn_kv_heads={KV}, rotary, ff_glu, rmsnorm",
             wrapper(rotary_pos_emb=True, attn_kv_heads=KV, ff_glu=True, use_rmsnorm=True), tok,
             {"qk": L * KV, "vo": L * KV, "ffn": L}, decode=xdecode),
        Spec("x-transformers MQA", "x_transformers", "attn_one_kv_head, rotary",
             wrapper(rotary_pos_emb=True, attn_one_kv_head=True), tok, {"qk": L, "vo": L, "ffn": L}, decode=xdecode,
             fast=True),
        Spec("x-transformers cross-attn", "x_transformers", "cross_attend=True (self + cross per layer), rotary",
             cross_build, cross_inputs, {"qk": 2 * L * HEADS, "vo": 2 * L * HEADS, "ffn": L}),
        Spec("x-transformers talking heads", "x_transformers", "pre + post softmax talking heads",
             wrapper(attn_pre_talking_heads=True, attn_post_talking_heads=True), tok,
             {"qk": L * HEADS, "vo": L * HEADS, "ffn": L}),
        Spec("x-transformers alibi+GLU", "x_transformers", "ALiBi position bias, ff_glu",
             wrapper(alibi_pos_bias=True, ff_glu=True), tok, {"qk": L * HEADS, "vo": L * HEADS, "ffn": L},
             fast=True),
    ]


# -- torchtitan ---------------------------------------------------------------------------------

def _titan_specs() -> list[Spec]:
    def build(backend, kv, fuse):
        def b():
            from torchtitan.models.llama3 import Llama3Model
            from torchtitan.models.llama3 import _build_llama3_layers  # the llama3 flavours' own layer builder
            from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
            layers = _build_llama3_layers(
                fuse_qkv=fuse, n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=kv, hidden_dim=FFN,
                rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=1024, theta=10000, scaling="none"),
                attn_backend="flex")
            if backend == "sdpa":  # the inner attention Flux uses: plain F.scaled_dot_product_attention, causal
                from torchtitan.models.common.attention import ScaledDotProductAttention
                for lc in layers:
                    lc.attention.inner_attention = ScaledDotProductAttention.Config()
            cfg = Llama3Model.Config(
                dim=DIM, vocab_size=VOCAB,
                tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM,
                                                param_init={"weight": torch.nn.init.normal_}),
                norm=RMSNorm.Config(normalized_shape=DIM, param_init={"weight": torch.nn.init.ones_}),
                lm_head=Linear.Config(in_features=DIM, out_features=VOCAB,
                                      param_init={"weight": lambda w: torch.nn.init.normal_(w, std=DIM ** -0.5),
                                                  "bias": torch.nn.init.zeros_}),
                layers=layers)
            m = cfg.build()
            m.init_weights()
            m.extra_flex = backend == "flex"
            return m
        return b

    def flex_inputs(b, t):
        from torchtitan.models.common.attention import create_attention_mask, get_causal_mask_mod
        pos = torch.arange(t).unsqueeze(0).expand(b, t).contiguous()
        mask = create_attention_mask(get_causal_mask_mod(), b, None, t, t)
        return {"tokens": _tokens(b, t), "positions": pos, "attention_masks": mask}

    def sdpa_inputs(b, t):
        return (_tokens(b, t),)

    class WithMask(torch.nn.Module):
        """Holds the block-causal BlockMask per (batch, length), built outside any trace (as
        torchtitan's trainer builds it once per batch), so the forward takes tokens only."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self._masks = {}

        def mask(self, b, t):
            if (b, t) not in self._masks:
                from torchtitan.models.common.attention import create_attention_mask, get_causal_mask_mod
                self._masks[(b, t)] = create_attention_mask(get_causal_mask_mod(), b, None, t, t)
            return self._masks[(b, t)]

        def forward(self, tokens):
            b, t = tokens.shape
            return self.model(tokens, None, self.mask(b, t))

    def wrapped():
        m = WithMask(build("flex", KV, True)())
        for b, t in ((2, 16), (1, 23), (1, 256)):
            m.mask(b, t)
        return m

    L = LAYERS
    return [
        Spec("torchtitan llama3 flex+wrapper", "torchtitan", "FlexAttention, BlockMask held by a wrapper module",
             wrapped, sdpa_inputs, {"qk": L * KV, "vo": L * KV, "ffn": L}, trainable=False),
        Spec("torchtitan llama3 sdpa", "torchtitan", f"Llama3Model, fused wqkv, {KV} kv, complex RoPE, SDPA inner attention",
             build("sdpa", KV, True), sdpa_inputs, {"qk": L * KV, "vo": L * KV, "ffn": L}, fast=True),
        Spec("torchtitan llama3 sdpa MQA unfused", "torchtitan", "separate wq/wk/wv, 1 kv head, SDPA",
             build("sdpa", 1, False), sdpa_inputs, {"qk": L, "vo": L, "ffn": L}),
        Spec("torchtitan llama3 flex", "torchtitan", "FlexAttention (compiled; block-causal mask built from positions)",
             build("flex", KV, True), flex_inputs, {"qk": L * KV, "vo": L * KV, "ffn": L}, trainable=False,
             fast=True, extra={"flex": True}),
    ]


def all_specs() -> list[Spec]:
    return _torchtune_specs() + _litgpt_specs() + _xt_specs() + _titan_specs()
