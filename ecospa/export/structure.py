"""A pruned model's structure by state-dict key: dense shapes and kept dense indices per dim.

``ecospa.param_records`` names each sliced parameter once (``named_parameters``); a state dict
also lists tied aliases (``lm_head.weight`` tied to ``model.embed_tokens.weight``). Here every
key of ``model.state_dict()`` gets its dense shape and, per dim, its kept indices (all of them
for a dim never sliced), and :func:`dense_tensor` gives the masked dense tensor of one key: the
pruned values at their dense positions, zeros where slices were removed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn

from ecospa.ir.record import ParamRecord, param_records

__all__ = ["Structure", "structure_of", "dense_tensor"]


@dataclass(frozen=True)
class Structure:
    """``tensors``: the pruned model's state dict; ``dense``: ``{key: dense shape}``;
    ``records``: ``{key: ParamRecord}`` for the sliced keys (aliases included)."""

    tensors: Mapping[str, torch.Tensor]
    dense: Mapping[str, tuple[int, ...]]
    records: Mapping[str, ParamRecord]

    def kept(self, key: str, dim: int) -> np.ndarray:
        """Kept dense indices of ``key`` along ``dim`` (all of them when never sliced)."""
        r = self.records.get(key)
        return np.arange(self.dense[key][dim], dtype=np.int64) if r is None else r.kept_or_all(dim)

    @property
    def pruned(self) -> bool:
        return bool(self.records)


def structure_of(model: nn.Module) -> Structure:
    """The :class:`Structure` of ``model`` (dense or pruned)."""
    named = dict(model.named_parameters())
    recs = param_records(model)
    by_id = {id(named[n]): r for n, r in recs.items()}
    records: dict[str, ParamRecord] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            records[n] = by_id[id(p)]
    tensors = model.state_dict()
    dense = {k: tuple(records[k].dense_shape) if k in records else tuple(t.shape) for k, t in tensors.items()}
    return Structure(tensors, dense, records)


def dense_tensor(s: Structure, key: str) -> torch.Tensor:
    """The masked dense tensor of ``key``: shape ``s.dense[key]``, the pruned values at their kept
    positions, zeros elsewhere (the tensor itself when the key was never sliced)."""
    t = s.tensors[key].detach()
    r = s.records.get(key)
    if r is None:
        return t
    out = t.new_zeros(r.dense_shape)
    index = tuple(torch.as_tensor(r.kept_or_all(d), device=t.device).view(
        [-1 if i == d else 1 for i in range(t.dim())]) for d in range(t.dim()))
    out[index] = t
    return out
