"""``DistributedDataParallel`` after a prune: a new wrapper around the same (smaller) module.

DDP keeps references to the parameters it was built on and sizes its gradient buckets for them;
ecospa's prune replaces the pruned parameters with smaller tensors, so the old wrapper would
all-reduce stale tensors. DDP has no public way to re-register parameters, so after a round
that pruned, wrap the module again with the same settings::

    model = DDP(net)                                  # net: the plain module
    sp = ecospa.EcoSpa(model.module, opt, target=0.5) # EcoSpa works on the inner module
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step()
        if sp.step():                                 # a PruneEvent: every rank pruned the same units
            model = rewrap(model)
        opt.zero_grad()

EcoSpa averages its Eq. 6 statistics over the ranks and takes each round's removal from rank 0
(``EcoSpa(process_group=...)``), so every rank prunes identically and the new wrapper's
parameter-shape check across ranks passes. See docs/distributed.md.
"""
from __future__ import annotations

import inspect

from torch.nn.parallel import DistributedDataParallel as DDP

__all__ = ["rewrap", "ddp_settings"]

# DDP.__init__ arguments that DDP keeps as attributes of the same name
_SAME_NAME = ("device_ids", "output_device", "dim", "find_unused_parameters", "gradient_as_bucket_view",
              "static_graph", "mixed_precision", "skip_all_reduce_unused_params")


def ddp_settings(ddp: DDP) -> dict:
    """The constructor arguments of ``ddp`` that can be read back from it."""
    sig = inspect.signature(DDP.__init__).parameters
    kw = {n: getattr(ddp, n) for n in _SAME_NAME if n in sig and hasattr(ddp, n)}
    if kw.get("mixed_precision") is None:
        kw.pop("mixed_precision", None)
    if "forward_sync_buffers" in sig and hasattr(ddp, "forward_sync_buffers"):
        kw["forward_sync_buffers"] = ddp.forward_sync_buffers
    elif "broadcast_buffers" in sig and hasattr(ddp, "broadcast_buffers"):
        kw["broadcast_buffers"] = ddp.broadcast_buffers
    if getattr(ddp, "device_mesh", None) is not None and "device_mesh" in sig:
        kw["device_mesh"] = ddp.device_mesh
    elif "process_group" in sig and hasattr(ddp, "process_group"):
        kw["process_group"] = ddp.process_group
    cap = getattr(ddp, "bucket_bytes_cap", None)
    if "bucket_cap_mb" in sig and cap:
        kw["bucket_cap_mb"] = cap / (1024 * 1024)
    return kw


def rewrap(ddp: DDP, **overrides) -> DDP:
    """A new ``DistributedDataParallel`` around ``ddp.module`` with ``ddp``'s settings (device ids,
    process group, bucket size, ``find_unused_parameters``, ``gradient_as_bucket_view``,
    ``static_graph``, buffer syncing, ...) and its registered communication hooks.

    Call it on every rank after a round that pruned (``if sp.step(): model = rewrap(model)``) and
    drop the old wrapper. ``overrides`` replace settings (for example ``init_sync=False`` to
    skip the broadcast of the parameters from rank 0, which the pruned ranks already share).
    The optimizer needs nothing: it holds the module's parameters, not the wrapper's.

    Raises:
        TypeError: ``ddp`` is not a ``DistributedDataParallel``.
        RuntimeError: from DDP, when the ranks' parameter shapes differ (they pruned differently).
    """
    if not isinstance(ddp, DDP):
        raise TypeError(f"rewrap expects a DistributedDataParallel, got {type(ddp).__name__}")
    kw = ddp_settings(ddp)
    kw.update(overrides)
    module = ddp.module
    hooks = list(getattr(ddp, "_comm_hooks", ()))
    new = DDP(module, **kw)
    for hook, state in hooks:
        new.register_comm_hook(state, hook)
    return new
