"""The knobs of :func:`ecospa.compress`: :class:`CompressConfig`, every field checked for its type and range.

``compress(model, target, data, config=CompressConfig(rounds=2))`` and ``compress(model, target,
data, rounds=2)`` are the same call: keyword knobs override the fields of ``config``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from ecospa.errors import EcospaError
from ecospa.schedule.config import PlanConfig
from ecospa.scoring.scores import COUPLING_SCORES, UNIT_SCORES

__all__ = ["CompressConfig", "CompressError"]


class CompressError(EcospaError, ValueError):
    """A ``compress`` argument is invalid (the message names it and what to pass instead)."""


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise CompressError(f"{name} should be an int >= {lo}, got {v!r}")
    return int(v)


def _choice(name: str, v, choices) -> None:
    if v not in choices:
        raise CompressError(f"{name} should be one of {sorted(choices)}, got {v!r}")


def _positive(name: str, v, *, optional: bool = False) -> None:
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise CompressError(f"{name} should be a positive number{' or None' if optional else ''}, got {v!r}")


def _bool(name: str, v) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise CompressError(f"{name} should be True or False, got {v!r}")


@dataclass(frozen=True)
class CompressConfig:
    """How :func:`ecospa.compress` calibrates, allocates, refits and recovers (module docstring of
    ``ecospa.compression.compress`` for the method). Checked when built: a wrong value raises
    :class:`CompressError` naming the field."""

    rounds: int = _help("calibration rounds; each recalibrates the model as pruned so far", 4)
    score: str = _help("unit score: 'fisher' (mask Fisher) or a registered unit score ('eq9', ...)", "fisher")
    allocation: str = _help("'global' (ranked over the model), 'uniform' (same fraction per coupling) or "
                            "'planner' (Algorithm 1)", "global")
    reconstruct: bool = _help("refit the consumers' kept columns by least squares after each round", True)
    damp: float = _help("ridge of the refit, relative to the mean diagonal of the Gram matrix", 0.01)
    head_widths: str = _help("'ragged' or 'uniform' (equal kept widths inside each width group)", "ragged")
    exportable: bool = _help(
        "keep widths the config can state (whole heads, the same heads and FFN width in every layer, "
        "nothing the config cannot shrink): ecospa.export writes it exactly as small, no padding "
        "(ecospa.schedule.exportable; overrides head_widths)", False)
    min_units: int = _help("units every coupling keeps (exportable: heads every attention keeps)", 1)
    width_multiple: int = _help("kept widths are multiples of this", 1)
    calibration_batches: int | None = _help("use at most this many batches of data (None: all)", None)
    per_sample: bool = _help("split tensor batches into rows: one Fisher sample per row", True)
    top_k: float = _help("Algorithm 1: share of couplings pruned per step (allocation='planner')", 0.3)
    theta: float = _help("Algorithm 1: kept score mass per pruned coupling (allocation='planner')", 0.9)
    coupling_score: str = _help("Algorithm 1: coupling score (allocation='planner')", "fisher")
    recover_steps: int = _help("optimizer steps of recovery fine-tuning after pruning (0: none)", 0)
    recovery: str = _help("'distill' (KL to the dense model's outputs) or 'lm' (the calibration loss)", "distill")
    recover_lr: float = _help("peak learning rate of the recovery (AdamW, warm-up and linear decay)", 1e-4)
    recover_cpu_seconds: float | None = _help("stop the recovery after this much process CPU time", None)
    seed: int = _help("seed of random scores and of the recovery's data order", 0)
    physical: bool = _help("cut the removed units out; False leaves them zeroed at the dense shapes", True)

    def __post_init__(self) -> None:
        _int("rounds", self.rounds, 1)
        _int("recover_steps", self.recover_steps, 0)
        _int("min_units", self.min_units, 0)
        _int("width_multiple", self.width_multiple, 1)
        if self.calibration_batches is not None:
            _int("calibration_batches", self.calibration_batches, 1)
        _choice("allocation", self.allocation, ("global", "uniform", "planner"))
        if self.score != "fisher" and self.score not in UNIT_SCORES:
            raise CompressError(f"score should be 'fisher' or one of {sorted(UNIT_SCORES)}, got {self.score!r}")
        _choice("head_widths", self.head_widths, ("ragged", "uniform"))
        _choice("recovery", self.recovery, ("distill", "lm"))
        if self.allocation == "planner":
            _choice("coupling_score", self.coupling_score, COUPLING_SCORES)
        _positive("damp", self.damp)
        _positive("recover_lr", self.recover_lr)
        _positive("recover_cpu_seconds", self.recover_cpu_seconds, optional=True)
        for name in ("reconstruct", "per_sample", "physical", "exportable"):
            _bool(name, getattr(self, name))

    @classmethod
    def merged(cls, config: "CompressConfig | None", options: Mapping[str, Any]) -> "CompressConfig":
        """``config`` (default: the defaults) with the keyword knobs ``options`` set.

        Raises:
            CompressError: ``config`` is not a CompressConfig, or an option is not one of its
                fields (the message suggests the closest).
        """
        if config is not None and not isinstance(config, cls):
            raise CompressError(f"config should be an ecospa.CompressConfig, got {type(config).__name__}")
        known = [f.name for f in fields(cls)]
        for name in options:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; the knobs are {known}"
                raise CompressError(f"compress() got an unknown option {name!r}{hint}")
        return cls(**options) if config is None else dataclasses.replace(config, **options)

    def plan_config(self, target: int | float) -> PlanConfig:
        """The :class:`~ecospa.PlanConfig` of these knobs for ``target`` (the planner's and the
        target's view of them)."""
        return PlanConfig(target=target, min_units=self.min_units, width_multiple=self.width_multiple,
                          top_k=self.top_k, theta=self.theta, coupling_score=self.coupling_score,
                          unit_score=self.score if self.score in UNIT_SCORES else "eq9",
                          head_widths=self.head_widths, seed=self.seed, exportable=bool(self.exportable))

    @classmethod
    def help(cls, show: bool = True) -> dict[str, str]:
        """Print the knobs (name, default, what it does; ``show=False``: print nothing) and return
        ``{knob: help text}``."""
        out = {f.name: f.metadata.get("help", "") for f in fields(cls)}
        if show:
            for f in fields(cls):
                print(f"{f.name:<22} {f.default!r:<12} {out[f.name]}")
        return out
