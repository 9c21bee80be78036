"""A Llama-style character LM (GQA, rotary, SwiGLU) for the larger training run.

Built as a user builds one: ``LlamaForCausalLM(LlamaConfig(...))`` with the config's defaults
for everything but the sizes (the KV cache on, rotary on the default base, untied head). The
wrapper :class:`CharLlama` gives it the benchmark's interface: ``model(idx) -> logits`` and
``model.generate(idx, max_new_tokens, generator=)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["LlamaSize", "CharLlama"]


@dataclass(frozen=True)
class LlamaSize:
    """Sizes of the model (everything else is ``LlamaConfig``'s default)."""

    vocab_size: int
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256

    def config(self):
        """The ``transformers.LlamaConfig`` of these sizes."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads,
                           max_position_embeddings=self.max_position_embeddings)


class CharLlama(nn.Module):
    """``LlamaForCausalLM`` with the interface of :class:`ecospa.recipes.nanogpt.GPT`.

    ``forward(idx)``: ``(B, T)`` long -> ``(B, T, V)`` logits (the model's default forward,
    cache on). ``generate(idx, max_new_tokens, generator=None)``: ``(B, T0)`` -> ``(B, T0 + n)``,
    greedy through ``transformers``' ``generate`` (``generator`` is accepted for the interface
    and unused: greedy needs no randomness).
    """

    def __init__(self, size: LlamaSize):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.lm = LlamaForCausalLM(size.config())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx).logits

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.lm.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
