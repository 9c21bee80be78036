"""What a training run costs: bytes of training state, validation loss, inference throughput.

Memory is computed from tensor sizes, not read from the allocator: the bytes of the model's
parameters (each tensor once, tied weights once), of their gradients and of every tensor in the
optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, its step counters...). Activations are not
counted: they depend on batch size and sequence length, not on the method.

Throughput is measured *interleaved*: after a warm-up, each round runs every model once, in an
order that rotates from round to round, so that load from other processes on a shared machine
falls on all models alike; the median over rounds is reported.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecospa.recipes.train.corpus import CharCorpus

__all__ = ["state_bytes", "count_params", "evaluate", "forward_throughput", "generate_throughput", "throughput"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of ``weights``, ``grads`` (those currently allocated), ``optimizer`` state, and ``total``."""
    params = list(model.parameters())  # unique tensors
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    opt = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    opt += v.numel() * v.element_size()
    return {"weights": weights, "grads": grads, "optimizer": opt, "total": weights + grads + opt}


@torch.inference_mode()
def evaluate(model: nn.Module, split: torch.Tensor, starts: torch.Tensor, block_size: int,
             batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over the windows of ``split`` beginning at ``starts``.

    The model is put in eval mode and restored to its previous mode afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            s = starts[i:i + batch_size]
            w = split[s[:, None] + torch.arange(block_size + 1)]  # (b, T+1)
            logits = model(w[:, :-1])  # (b, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += w[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(1, count)


def _interleaved(fns: Mapping[str, callable], rounds: int, warmup: int) -> dict[str, list[float]]:
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def _summary(times: list[float], tokens: int) -> dict[str, float]:
    med = statistics.median(times)
    return {"tokens_per_s": tokens / med, "median_s": med, "min_s": min(times), "rounds": len(times)}


@contextlib.contextmanager
def _eval_mode(models: Mapping[str, nn.Module]):
    """Put every model in eval mode, and each back in its own mode afterwards."""
    modes = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        yield
    finally:
        for n, m in models.items():
            m.train(modes[n])


def forward_throughput(models: Mapping[str, nn.Module], batch: torch.Tensor, *, rounds: int = 7,
                       warmup: int = 2) -> dict[str, dict[str, float]]:
    """Tokens per second of a batched forward (``model(batch)``, eval mode, inference mode).

    Returns ``{name: {"tokens_per_s", "median_s", "min_s", "rounds"}}``, measured interleaved.
    """
    def make(m: nn.Module):
        def fn() -> None:
            with torch.inference_mode():
                m(batch)
        return fn

    with _eval_mode(models):
        times = _interleaved({n: make(m) for n, m in models.items()}, rounds, warmup)
    return {n: _summary(t, batch.numel()) for n, t in times.items()}


def generate_throughput(models: Mapping[str, nn.Module], prompt: torch.Tensor, new_tokens: int, *,
                        rounds: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, dict[str, float]]:
    """New tokens per second of ``model.generate(prompt, new_tokens)`` (sampling, same seed).

    ``prompt`` is ``(B, T0)``; each model needs a ``generate(idx, max_new_tokens, generator=)``
    method like :class:`ecospa.recipes.nanogpt.GPT`. Returns the same fields as :func:`forward_throughput`.
    """
    def make(m: nn.Module):
        def fn() -> None:
            m.generate(prompt, new_tokens, generator=torch.Generator().manual_seed(seed))
        return fn

    with _eval_mode(models):
        times = _interleaved({n: make(m) for n, m in models.items()}, rounds, warmup)
    return {n: _summary(t, prompt.shape[0] * new_tokens) for n, t in times.items()}


def throughput(models: Mapping[str, nn.Module], corpus: CharCorpus, block_size: int, *, rounds: int = 7,
               new_tokens: int = 48, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Forward and generation speed of trained models, on validation text, measured interleaved.

    Forward: 8 validation windows of ``block_size`` tokens, :func:`forward_throughput` over
    ``rounds`` rounds. Generation: 4 prompts of 16 validation characters, ``new_tokens`` new
    tokens each, :func:`generate_throughput` over ``max(2, rounds // 2)`` rounds.

    Returns:
        ``{name: {"forward_tokens_per_s", "generate_tokens_per_s", "throughput": {"forward":
        {...}, "generate": {...}}}}``, ready to merge into a run's summary.
    """
    fwd_batch = CharCorpus.windows(corpus.val, corpus.val_starts(block_size, 8), block_size)[:, :-1]  # (8, T)
    prompt = CharCorpus.windows(corpus.val, corpus.val_starts(16, 4), 16)[:, :-1]  # (4, 16)
    fwd = forward_throughput(models, fwd_batch, rounds=rounds)
    gen = generate_throughput(models, prompt, new_tokens, rounds=max(2, rounds // 2), seed=seed)
    return {n: {"forward_tokens_per_s": fwd[n]["tokens_per_s"], "generate_tokens_per_s": gen[n]["tokens_per_s"],
                "throughput": {"forward": fwd[n], "generate": gen[n]}} for n in models}
