"""ecospa: coupled structured sparsity for transformers, found automatically and applied in place.

    import ecospa
    cg = ecospa.auto_couple(model, example_inputs)     # every exact coupling, in graph order
    ecospa.prune(model, {c: [0, 3] for c in cg}, optimizer=opt)

See README.md and docs/ for the method and the design.
"""
from ecospa.errors import CaptureError, ConfigError, EcospaError, PlanError, PruneError
from ecospa.graph.ir import Coupling, CouplingGraph, Slice
from ecospa.graph.discover import auto_couple
from ecospa.coupling.executor import prune, remaining
from ecospa.coupling.importance import Importance
from ecospa.coupling.planner import Plan, PlanConfig, PlanStep
from ecospa.coupling.training import EcoSpa, PruneEvent

__version__ = "0.1.0"

__all__ = [
    "auto_couple",
    "prune",
    "remaining",
    "EcoSpa",
    "PruneEvent",
    "Importance",
    "Plan",
    "PlanConfig",
    "PlanStep",
    "Coupling",
    "CouplingGraph",
    "Slice",
    "EcospaError",
    "CaptureError",
    "ConfigError",
    "PlanError",
    "PruneError",
    "__version__",
]
