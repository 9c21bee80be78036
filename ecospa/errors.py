"""The ecospa error hierarchy.

Every error a user can trigger through the public API is an :class:`EcospaError`. Messages name
the thing at fault (module, node, coupling, index) and the way out. Warnings (something skipped,
the result still correct) are :class:`EcospaWarning` s, issued with ``warnings.warn``.
"""
from __future__ import annotations

__all__ = [
    "EcospaError",
    "CaptureError",
    "PlanError",
    "PruneError",
    "ConfigError",
    "CheckpointError",
    "ShardedModelError",
    "EcospaWarning",
    "NonFiniteGradientWarning",
]


class EcospaError(Exception):
    """Base class of every error raised by ecospa on user input."""


class CaptureError(EcospaError):
    """The model's forward could not be captured as a dataflow graph."""


class PlanError(EcospaError, ValueError):
    """A removal plan is malformed: unknown coupling, index out of range, duplicates.

    Raised before anything is changed: the model and optimizer are left untouched.
    """


class PruneError(EcospaError):
    """A coupling cannot be removed physically (for example it is not exact)."""


class ConfigError(EcospaError, ValueError):
    """A configuration value is out of its valid range."""


class CheckpointError(EcospaError):
    """A checkpoint directory cannot be written, or does not match the model it is loaded into:
    a missing or damaged file, a schema or format-version mismatch, a parameter missing or of
    another shape. Raised by ``ecospa.load`` before the model, the optimizer or EcoSpa change."""


class ShardedModelError(EcospaError):
    """The model's parameters are sharded ``DTensor`` s (FSDP2 ``fully_shard``, tensor
    parallelism): finding couplings in it or pruning it is not supported yet. Prune (or replay
    the plan) before sharding; see docs/distributed.md."""


class EcospaWarning(RuntimeWarning):
    """Base class of the warnings ecospa issues (``warnings.warn``): something was skipped or
    fell back, and the result is still correct."""


class NonFiniteGradientWarning(EcospaWarning):
    """A step's gradients held NaN or Inf: its Eq. 6 statistics were skipped (not accumulated,
    not counted), so the scores are those of the finite steps. The message names the parameters."""
