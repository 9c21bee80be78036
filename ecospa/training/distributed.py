"""EcoSpa under ``torch.distributed``: the process group it talks over, and a JSON broadcast.

Every rank must prune alike: before a round the Eq. 6 statistics are averaged over the group
(``Importance.all_reduce``) and the round's removals are taken from the group's first rank
(:func:`broadcast_json`: JSON bytes in a tensor, never a pickle). See docs/distributed.md.
"""
from __future__ import annotations

import json

import torch

from ecospa.errors import ConfigError

__all__ = ["dist_group", "broadcast_json"]


def dist_group(process_group):
    """The process group EcoSpa communicates over, or None for no communication.

    ``process_group=None`` means automatic: the default group when ``torch.distributed`` is
    initialised with more than one process; ``False`` turns communication off; anything else is
    used as the group."""
    if process_group is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ConfigError("EcoSpa(process_group=...) needs torch.distributed to be initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _comm_device(group) -> torch.device:
    """Where collectives of ``group`` run: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_json(obj, group):
    """``obj`` (JSON data) of the group's first rank, on every rank of ``group``; no pickle."""
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    dev = _comm_device(group)
    data = json.dumps(obj, sort_keys=True).encode() if dist.get_rank() == src else b""
    n = torch.tensor([len(data)], dtype=torch.long, device=dev)
    dist.broadcast(n, src, group=group)
    buf = torch.empty(int(n.item()), dtype=torch.uint8, device=dev)
    if dist.get_rank() == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src, group=group)
    return json.loads(bytes(buf.cpu().tolist()).decode())
