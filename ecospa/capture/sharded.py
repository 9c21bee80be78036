"""Refuse models whose parameters are ``DTensor`` shards (FSDP2 ``fully_shard``, tensor
parallelism) up front, with one line and the way out, instead of a torch error from deep inside
the executor or the capture. Pruning under FSDP2 is not supported yet (docs/distributed.md)."""
from __future__ import annotations

import sys

import torch.nn as nn

from ecospa.errors import ShardedModelError

__all__ = ["refuse_sharded"]


def _dtensor_type():
    """DTensor, or None when no DTensor can exist: its module is not imported (importing it costs
    about a second, and a model holding DTensors has imported it) or torch has no distributed."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def refuse_sharded(model: nn.Module, what: str) -> None:
    """Raise :class:`~ecospa.errors.ShardedModelError` when a parameter or buffer of ``model`` is a
    DTensor; ``what`` names the call (``"ecospa.prune"``)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(model, nn.Module):
        return
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if isinstance(t, dtensor):
                raise ShardedModelError(
                    f"{what}: {type(model).__name__} is sharded ({kind} {name!r} is a DTensor, as after FSDP2 "
                    "fully_shard): pruning under FSDP2 is not supported yet; prune the unsharded model (or "
                    "replay the plan with ecospa.prune(model, plan)) before fully_shard, then shard the pruned "
                    "model (docs/distributed.md)")
