"""A tiny nanoGPT (one layer, two heads) and its data: the subject of the reliability tests."""
from __future__ import annotations

import torch

from ecospa.recipes.nanogpt import GPT, GPTConfig

__all__ = ["CFG", "tiny_gpt", "example", "batch", "train_step"]

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=13)


def tiny_gpt() -> GPT:
    """The model, seeded: every call builds the same weights."""
    torch.manual_seed(0)
    return GPT(CFG)


def example():
    """Example inputs for auto_couple: one sequence of zeros."""
    return (torch.zeros(1, CFG.block_size, dtype=torch.long),)


def batch(seed: int):
    """Three random sequences of block_size + 1 tokens (inputs and shifted targets)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (3, CFG.block_size + 1), generator=g)


def train_step(model, opt, seed: int):
    """One optimizer step on ``batch(seed)``."""
    x = batch(seed)
    opt.zero_grad(set_to_none=True)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
