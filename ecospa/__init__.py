"""ecospa: coupled structured sparsity for transformers, found automatically and applied in place.

    import ecospa
    cg = ecospa.auto_couple(model, example_inputs)     # every exact coupling, in graph order
    ecospa.prune(model, {c: [0, 3] for c in cg}, optimizer=opt)

See README.md and docs/ for the method and the design.
"""
from ecospa.errors import (CaptureError, CheckpointError, ConfigError, EcospaError, EcospaWarning,
                           NonFiniteGradientWarning, PlanError, PruneError, ShardedModelError)
from ecospa.ir.coupling import Coupling, CouplingGraph, Site, Slice, SliceTable, Stamp
from ecospa.analysis.auto_couple import auto_couple
from ecospa.pruning.apply import PruneResult, Removal, prune, prune_pass, remaining
from ecospa.scoring.importance import Importance
from ecospa.schedule.planner import Plan, PlanConfig, PlanStep
from ecospa.ir.record import ParamRecord, param_records
from ecospa.pruning.report import RegionReport, execution_report
from ecospa.scoring.scores import register_coupling_score, register_unit_score
from ecospa.training.sparse import EcoSpa, PruneEvent
from ecospa.compression.compress import CompressConfig, CompressError, CompressReport, compress
from ecospa.compression.calibration import CalibrationError
from ecospa.checkpoint import check_writable, load, save
# ecospa.export is the function from here on (it shadows its package: import submodules by path)
from ecospa.export import ExportError, ExportReport, export
from ecospa.version import __version__


__all__ = [
    "auto_couple",
    "prune",
    "compress",
    "CompressConfig",
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
