"""Repeated blocks: analysing a thinned model (first, second and last block of each stack) and
copying the second block's couplings gives exactly the couplings of the full analysis."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ecospa.analysis.blocks import find_stacks
from ecospa.analysis.discover import discover

transformers = pytest.importorskip("transformers")

LAYERS = 5


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, use_cache=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=32,
                                  use_cache=False, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
                                  attn_implementation="sdpa")
    return transformers.BertModel(cfg).eval()


def _t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=LAYERS,
                                num_decoder_layers=LAYERS, num_heads=4, use_cache=False)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _nanogpt():
    from ecospa.recipes.nanogpt import GPT, GPTConfig

    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=LAYERS, n_head=4, n_embd=32)).eval()


MODELS = {
    "llama": (_llama, lambda: {"input_ids": torch.randint(0, 64, (2, 7))}),
    "gpt2": (_gpt2, lambda: {"input_ids": torch.randint(0, 64, (2, 7))}),
    "bert": (_bert, lambda: {"input_ids": torch.randint(0, 64, (2, 7))}),
    "t5": (_t5, lambda: {"input_ids": torch.randint(0, 64, (2, 7)), "decoder_input_ids": torch.randint(0, 64, (2, 5))}),
    "nanogpt": (_nanogpt, lambda: (torch.randint(0, 32, (2, 7)),)),
}


def _key(cg):
    return [(c.name, c.kind, c.exact, c.reason, c.width, c.scope, c.group, sorted(c.sites),
             sorted((t.param, t.dim, t.unit.tolist(), t.index.tolist(), None if t.side is None else t.side.tolist())
                    for t in c.tables)) for c in cg.all]


@pytest.mark.parametrize("name", list(MODELS))
def test_thinned_analysis_equals_the_full_one(name):
    build, inputs = MODELS[name]
    model = build()
    x = inputs()
    assert find_stacks(model), "no stack of repeated blocks found"
    fast = discover(model, x, include_inexact=True)
    full = discover(model, x, include_inexact=True, reuse_blocks=False)
    assert _key(fast) == _key(full)
    assert fast.shapes == full.shapes


def test_blocks_that_differ_are_analysed_in_full():
    """A stack whose first block behaves differently (here: it skips its FFN) is analysed whole."""

    class Block(nn.Module):
        def __init__(self, skip):
            super().__init__()
            self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 8)
            self.skip = skip

        def forward(self, x):
            return x if self.skip else x + self.out(torch.relu(self.fc(x)))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(i == 0) for i in range(5)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = Stack()
    x = (torch.randn(2, 8),)
    fast, full = discover(model, x), discover(model, x, reuse_blocks=False)
    assert _key(fast) == _key(full) and len(full) == 4


def test_a_stack_indexed_by_position_falls_back_to_the_full_analysis():
    """A forward that indexes its blocks by number cannot run thinned: the full model is used."""

    class Indexed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
                                         for _ in range(4)])

        def forward(self, x):
            for i in range(4):
                x = x + self.blocks[i](x)
            return x

    model = Indexed()
    x = (torch.randn(2, 8),)
    assert _key(discover(model, x)) == _key(discover(model, x, reuse_blocks=False))
