"""Tiny transformers models of the export tests (built from config objects, nothing downloaded)
and the plans they are pruned with: *uniform* (config-expressible: whole key/value groups and
the same FFN width in every layer) and *ragged* (a third of each coupling's units, seeded)."""
from __future__ import annotations

import random

import torch

import ecospa

VOCAB = 100
ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def build(arch: str):
    """A 2-layer model of ``arch`` (GQA 4/2 heads of 8 for the Llama family), seeded, eval."""
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg).eval()
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[arch]
    return cls[1](cls[0](**kw)).eval()


def inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def plan(cg, kind: str) -> dict:
    """``uniform``: every unit of the second key/value head's couplings and every third FFN unit,
    in every layer (GPT-2's head width is tied to n_embd / n_head: heads stay, FFN only);
    ``ragged``: a seeded third of every coupling's units."""
    rng = random.Random(0)
    out = {}
    for c in cg:
        if kind == "ragged":
            out[c.name] = sorted(rng.sample(range(c.width), c.width // 3))
        elif c.kind in ("glu", "ffn"):
            out[c.name] = list(range(0, c.width, 3))
        elif c.name.endswith("head1") and "transformer.h" not in c.name:
            out[c.name] = list(range(c.width))
    return out


def pruned(arch: str, kind: str):
    m = build(arch)
    cg = ecospa.auto_couple(m, (inputs()[:1],))
    ecospa.prune(m, plan(cg, kind))
    return m
