"""EcoSpa inside the training tools people already use. Nothing here is imported by
``import ecospa``, and each integration imports its framework only when it is used:

- :mod:`ecospa.integrations.hf`: ``EcoSpaCallback`` for ``transformers.Trainer``;
- :mod:`ecospa.integrations.lightning`: ``EcoSpaLightningCallback`` for (PyTorch) Lightning;
- :mod:`ecospa.integrations.ddp`: ``rewrap(ddp_model)`` after a prune under
  ``DistributedDataParallel`` (see docs/distributed.md);
- ``save_state`` / ``load_state``: EcoSpa's state as ``ecospa_state.json`` +
  ``ecospa_state.safetensors`` in a folder (no pickle).

See docs/integrations.md.
"""
from __future__ import annotations

import importlib

__all__ = ["EcoSpaCallback", "EcoSpaLightningCallback", "rewrap", "save_state", "load_state",
           "unwrap_optimizer"]

_WHERE = {
    "EcoSpaCallback": "ecospa.integrations.hf",
    "EcoSpaLightningCallback": "ecospa.integrations.lightning",
    "rewrap": "ecospa.integrations.ddp",
    "save_state": "ecospa.integrations._state",
    "load_state": "ecospa.integrations._state",
    "unwrap_optimizer": "ecospa.integrations._common",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ecospa.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
