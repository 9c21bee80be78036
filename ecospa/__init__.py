"""ecospa: coupled structured sparsity for transformers, found automatically and applied in place.

    import ecospa
    cg = ecospa.auto_couple(model, example_inputs)     # every exact coupling, in graph order
    ecospa.prune(model, {c: [0, 3] for c in cg}, optimizer=opt)

See README.md and docs/ for the method and the design.
"""
from ecospa.errors import (CaptureError, CheckpointError, ConfigError, EcospaError, EcospaWarning,
                           NonFiniteGradientWarning, PlanError, PruneError, ShardedModelError)
from ecospa.graph.ir import Coupling, CouplingGraph, Site, Slice, SliceTable, Stamp
from ecospa.coupling.discovery import auto_couple
from ecospa.coupling.executor import PruneResult, Removal, prune, prune_pass, remaining
from ecospa.coupling.importance import Importance
from ecospa.coupling.planner import Plan, PlanConfig, PlanStep
from ecospa.coupling.record import ParamRecord, param_records
from ecospa.coupling.report import RegionReport, execution_report
from ecospa.coupling.scores import register_coupling_score, register_unit_score
from ecospa.coupling.training import EcoSpa, PruneEvent
from ecospa.coupling.compress import CompressError, CompressReport, compress
from ecospa.coupling.calibration import CalibrationError
from ecospa.checkpoint import check_writable, load, save
# ecospa.export is the function from here on (it shadows its package: import submodules by path)
from ecospa.export import ExportError, ExportReport, export

__version__ = "0.1.0"

__all__ = [
    "auto_couple",
    "prune",
    "compress",
    "CompressReport",
    "save",
    "load",
    "check_writable",
    "export",
    "ExportReport",
    "ExportError",
    "prune_pass",
    "remaining",
    "param_records",
    "execution_report",
    "RegionReport",
    "EcoSpa",
    "PruneEvent",
    "PruneResult",
    "Removal",
    "Importance",
    "Plan",
    "PlanConfig",
    "PlanStep",
    "register_coupling_score",
    "register_unit_score",
    "Coupling",
    "CouplingGraph",
    "Slice",
    "SliceTable",
    "Site",
    "Stamp",
    "ParamRecord",
    "EcospaError",
    "CaptureError",
    "ConfigError",
    "PlanError",
    "PruneError",
    "CheckpointError",
    "CompressError",
    "CalibrationError",
    "ShardedModelError",
    "EcospaWarning",
    "NonFiniteGradientWarning",
    "__version__",
]
