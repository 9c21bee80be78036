"""Torch-Pruning (1.6) on :class:`~bench.speed.subjects.LinearGPT`, to ecospa's parameter count.

torch_pruning follows the timm-style attention of ``LinearGPT`` (``qkv`` Linear reshaped to
``(B, T, 3, H, -1)``) given ``num_heads``; it cannot follow HF GPT-2's ``Conv1D`` split attention,
hence the separate class. ``MetaPruner`` with group L1 importance, ``global_pruning=False`` and
ratio 0.5 on every group whose root is not ignored (the residual stream is left alone by ignoring
the output projections and the lm_head):

- ``head_dims``: ``prune_head_dims=True``: every head keeps half of its q/k/v channels (64 -> 32),
  the FFN half of its hidden units. Same structure as ecospa's uniform removal.
- ``num_heads``: ``prune_num_heads=True`` (``head_pruning_ratio=0.5``): 6 of 12 heads go whole,
  head width stays 64; the FFN loses half.

Both remove exactly the parameters ecospa's half-of-every-coupling removal removes (checked in
``run.py``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def tp_prune(model: nn.Module, example: torch.Tensor, mode: str) -> nn.Module:
    """A copy of ``model`` pruned by torch_pruning (``mode``: ``"head_dims"`` or ``"num_heads"``)."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    blocks = list(m.h)
    ignored = [m.lm_head] + [b.attn.proj for b in blocks] + [b.mlp.proj for b in blocks]
    pruner = tp.pruner.MetaPruner(
        m, example, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=0.5,
        global_pruning=False, ignored_layers=ignored, num_heads={b.attn.qkv: b.attn.n_head for b in blocks},
        prune_head_dims=mode == "head_dims", prune_num_heads=mode == "num_heads", head_pruning_ratio=0.5)
    pruner.step()
    for b in blocks:
        b.attn.n_head = pruner.num_heads[b.attn.qkv]
    return m


def head_config(model: nn.Module) -> tuple[int, int]:
    """``(heads, head width)`` of the first block of a (possibly pruned) LinearGPT."""
    a = model.h[0].attn
    return a.n_head, a.qkv.out_features // (3 * a.n_head)
