"""A tiny, deterministic EcoSpa training run (CPU), shared by the resume test and the crash
script: a 2-layer character GPT with dropout, AdamW, pruning every 3 steps to half the prunable
parameters. Batches depend only on the step number; dropout draws from torch's global generator,
which checkpoints save with ``rng=True``.
"""
from __future__ import annotations

import torch

import ecospa
from ecospa.recipes.nanogpt import GPT, GPTConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=13, dropout=0.1)
STEPS = 7
EVERY = 3


def example() -> tuple[torch.Tensor]:
    """Example inputs for the couplings."""
    return (torch.zeros(1, CFG.block_size, dtype=torch.long),)


def build(seed: int = 0, *, lazy: bool = False):
    """``(model, optimizer, EcoSpa)`` of a fresh dense run (``lazy``: EcoSpa without example
    inputs, finding its couplings at the first forward)."""
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sp = ecospa.EcoSpa(model, opt, target=0.5, every=EVERY, example_inputs=None if lazy else example())
    return model, opt, sp


def batch(step: int) -> torch.Tensor:
    """The batch of optimizer step ``step`` (1-based)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.vocab_size, (4, CFG.block_size + 1), generator=g)


def train_step(model, opt, sp, step: int) -> None:
    """One optimizer step and ``sp.step()``."""
    model.train()
    x = batch(step)
    opt.zero_grad(set_to_none=True)
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    sp.step()
