"""Measurements: training-state bytes, validation loss, interleaved throughput."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ecospa.recipes.nanogpt import GPT, GPTConfig
from ecospa.recipes.train import CharCorpus, count_params, evaluate, state_bytes, throughput

TEXT = "".join(chr(ord("a") + (i * 5) % 11) for i in range(2000))


class Uniform(nn.Module):
    """Zero logits over ``vocab`` tokens: the loss is exactly ``log(vocab)``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*idx.shape, self.vocab) * self.w  # (B, T, V)


def test_state_bytes_counts_weights_grads_and_adam_moments():
    m = nn.Linear(6, 4)  # 28 fp32 parameters
    opt = torch.optim.AdamW(m.parameters())
    assert state_bytes(m, opt) == {"weights": 112, "grads": 0, "optimizer": 0, "total": 112}
    m(torch.randn(3, 6)).sum().backward()
    opt.step()
    s = state_bytes(m, opt)
    assert (s["weights"], s["grads"]) == (112, 112)
    assert s["optimizer"] >= 2 * 112  # exp_avg and exp_avg_sq (+ step counters)
    assert s["total"] == s["weights"] + s["grads"] + s["optimizer"]


def test_tied_weights_count_once():
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert count_params(model) == sum(p.numel() for p in set(model.parameters()))


def test_evaluate_is_mean_cross_entropy_and_restores_the_mode():
    c = CharCorpus.from_text(TEXT)
    m = Uniform(c.vocab_size).train()
    loss = evaluate(m, c.val, c.val_starts(8), 8, batch_size=3)
    assert loss == pytest.approx(math.log(c.vocab_size), rel=1e-6)
    assert m.training


def test_throughput_reports_both_speeds_for_every_model():
    c = CharCorpus.from_text(TEXT)
    cfg = GPTConfig(block_size=16, vocab_size=c.vocab_size, n_layer=1, n_head=2, n_embd=8)
    models = {"a": GPT(cfg), "b": GPT(cfg).eval()}
    out = throughput(models, c, 16, rounds=2, new_tokens=3)
    assert set(out) == {"a", "b"}
    for r in out.values():
        assert r["forward_tokens_per_s"] > 0 and r["generate_tokens_per_s"] > 0
        assert r["throughput"]["forward"]["rounds"] == 2 and r["throughput"]["generate"]["rounds"] == 2
    assert models["a"].training and not models["b"].training  # each model back in its own mode
