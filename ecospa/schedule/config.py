"""The knobs of Algorithm 1: :class:`PlanConfig`, every field checked for its type and range.

Used by the planner (:mod:`ecospa.schedule.planner`), ``EcoSpa`` (its keyword arguments) and
``compress``. A knob of the wrong type or out of range is a :class:`~ecospa.ConfigError` naming it
(never a ``TypeError`` from a comparison); numpy scalars are accepted and become Python numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from ecospa.scoring.scores import COUPLING_SCORES, UNIT_SCORES
from ecospa.errors import ConfigError
from ecospa.schedule.budget import resolve_target

__all__ = ["PlanConfig"]


def _knob_int(name: str, v, lowest: int) -> int:
    """``v`` as a Python int >= ``lowest`` (numpy ints accepted); ConfigError naming the knob."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ConfigError(f"{name} should be an int, got {type(v).__name__} {v!r}")
    if v < lowest:
        what = {0: "a non-negative int", 1: "a positive int"}.get(lowest, f"an int >= {lowest}")
        raise ConfigError(f"{name} should be {what}, got {v!r}")
    return int(v)


def _knob_fraction(name: str, v) -> float:
    """``v`` as a Python float in (0, 1]; ConfigError naming the knob otherwise."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} should be a number in (0, 1], got {type(v).__name__} {v!r}")
    if not (0.0 < float(v) <= 1.0):  # NaN fails too
        raise ConfigError(f"{name} should be in (0, 1], got {v!r}")
    return float(v)


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class PlanConfig:
    """Knobs of Algorithm 1, validated on construction."""

    target: int | float = _help(
        "target size: an int is a total parameter count; a float in (0, 1] the fraction of the "
        "prunable parameters (those inside exact couplings) to keep", 0.5)
    top_k: float = _help("fraction of couplings (lowest coupling score) pruned in each round", 0.3)
    theta: float = _help("kept cumulative unit-score mass in each selected coupling, in (0, 1] "
                         "(1: one unit per selected coupling per round)", 0.9)
    every: int | str = _help("act every N optimizer steps, or 'epoch' (on EcoSpa.end_epoch())", 100)
    start: int = _help("no pruning before this many steps", 0)
    min_units: int = _help("units every coupling keeps (0: a coupling may be emptied)", 1)
    width_multiple: int = _help("kept widths are multiples of this (e.g. 8 for fast kernels)", 1)
    coupling_score: str = _help("how couplings are ranked: 'fisher' (Eq. 6), 'magnitude', "
                                "'taylor', 'random'", "fisher")
    unit_score: str = _help("how units are ranked: 'eq9', 'magnitude', 'taylor', 'random'", "eq9")
    seed: int = _help("seed of the random scores", 0)
    head_widths: str = _help(
        "'ragged': every head's couplings lose units on their own (Eq. 9 per coupling; heads end "
        "up with different widths, run padded); 'uniform': the couplings of one width group (the "
        "heads of one attention) lose the same number of units each, chosen per head by the unit "
        "scores: equal head widths, the fastest layout", "ragged")
    exportable: bool = _help(
        "keep the widths the architecture's config can state, so ecospa.export writes a checkpoint "
        "exactly as small as the pruned model: heads removed whole (the head width stays: one "
        "head_dim for q, k and v, rotary frequencies), the same number of heads and the same FFN "
        "width in every repeated block, GQA groups whole, nothing the config cannot shrink (GPT-2's "
        "heads: n_embd / n_head). Derived from the couplings and the probed config fields "
        "(ecospa.schedule.exportable); overrides head_widths", False)
    end: int | float | None = _help(
        "when the target is reached: an int optimizer step, or a float in (0, 1], that fraction of "
        "total_steps. The rounds between start and end follow the cubic gradual-pruning schedule "
        "size(t) = target + (dense - target) * (1 - (t - start) / (end - start))^3 (big rounds "
        "first, so most steps run small); each round removes what it takes to reach size(t). "
        "None: each round removes what top_k and theta select, until the target", None)
    total_steps: int | None = _help(
        "optimizer steps of the whole run: a float end is a fraction of it, and a run that reaches "
        "it above the target warns (EcospaWarning). The trainer callbacks set it from max_steps", None)

    def __post_init__(self) -> None:
        # every knob is checked for its type and range; numpy scalars become Python numbers
        def put(name, value):
            object.__setattr__(self, name, value)

        t = self.target
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, float, np.integer, np.floating)):
            raise ConfigError(f"target should be an int (parameter count) or a float fraction in (0, 1], "
                              f"got {type(t).__name__} {t!r}")
        if isinstance(t, (float, np.floating)):
            if not (0.0 < float(t) <= 1.0):
                raise ConfigError(f"target as a fraction should be in (0, 1], got {t!r} "
                                  "(pass an int for a parameter count)")
            put("target", float(t))
        else:
            if t <= 0:
                raise ConfigError(f"target as a parameter count should be positive, got {t!r}")
            put("target", int(t))
        put("top_k", _knob_fraction("top_k", self.top_k))
        put("theta", _knob_fraction("theta", self.theta))
        if not (isinstance(self.every, str) and self.every == "epoch"):
            if isinstance(self.every, str):
                raise ConfigError(f"every should be a positive int (steps) or 'epoch', got {self.every!r}")
            try:
                put("every", _knob_int("every", self.every, 1))
            except ConfigError:
                raise ConfigError(f"every should be a positive int (steps) or 'epoch', got "
                                  f"{type(self.every).__name__} {self.every!r}") from None
        for name in ("start", "min_units", "seed"):
            put(name, _knob_int(name, getattr(self, name), 0))
        put("width_multiple", _knob_int("width_multiple", self.width_multiple, 1))
        for name, table in (("coupling_score", COUPLING_SCORES), ("unit_score", UNIT_SCORES)):
            v = getattr(self, name)
            if not isinstance(v, str) or v not in table:
                raise ConfigError(f"{name} should be one of {sorted(table)}, got {v!r}")
        if not isinstance(self.head_widths, str) or self.head_widths not in ("ragged", "uniform"):
            raise ConfigError(f"head_widths should be 'ragged' or 'uniform', got {self.head_widths!r}")
        if not isinstance(self.exportable, (bool, np.bool_)):
            raise ConfigError(f"exportable should be True or False, got {self.exportable!r}")
        put("exportable", bool(self.exportable))
        self._check_schedule(put)

    def _check_schedule(self, put) -> None:
        """``end`` and ``total_steps``: types, ranges, and an end the run can reach."""
        if self.total_steps is not None:
            put("total_steps", _knob_int("total_steps", self.total_steps, 1))
        e = self.end
        if e is None:
            return
        if isinstance(e, (bool, np.bool_)) or not isinstance(e, (int, float, np.integer, np.floating)):
            raise ConfigError(f"end should be an int (optimizer step) or a float fraction in (0, 1] of "
                              f"total_steps, got {type(e).__name__} {e!r}")
        if isinstance(e, (float, np.floating)):
            put("end", _knob_fraction("end", e))
            if self.total_steps is None:
                raise ConfigError(f"end={e!r} is a fraction of the run and total_steps is not given: pass "
                                  "total_steps=<optimizer steps of the run>, or end as a step count (int)")
        else:
            put("end", _knob_int("end", e, 1))
        start = self.start if isinstance(self.start, int) else 0
        if self.end_step <= start:
            raise ConfigError(f"end={self.end!r} (step {self.end_step}) should come after start={start}: "
                              "the schedule runs from start to end")
        if self.total_steps is not None and self.end_step > self.total_steps:
            raise ConfigError(f"end={self.end!r} (step {self.end_step}) is after the last step of the run "
                              f"(total_steps={self.total_steps}): the target would not be reached; ask for "
                              "an end <= total_steps")

    @property
    def end_step(self) -> int | None:
        """The step by which the target is reached (``end`` resolved against ``total_steps``), or
        None when there is no schedule."""
        if self.end is None:
            return None
        if isinstance(self.end, float):
            return max(1, int(math.ceil(self.end * self.total_steps)))
        return int(self.end)

    @property
    def min_keep(self) -> int:
        """Smallest kept width: ``min_units`` rounded up to a multiple of ``width_multiple``."""
        m = self.width_multiple
        return int(math.ceil(self.min_units / m) * m)

    def target_params(self, couplings, model) -> int:
        """This config's ``target`` as a parameter count for ``model`` pruned through
        ``couplings`` (inexact ones ignored): what a plan would aim at.

        Raises:
            ConfigError: the target is larger than the model, or below the smallest size the
                couplings allow (the message gives that size).
        """
        return resolve_target(self, [c for c in couplings if c.exact],
                              {n: tuple(p.shape) for n, p in model.named_parameters()})

    @classmethod
    def help(cls, show: bool = True) -> dict[str, str]:
        """Print the knobs as a table (name, default, what it does; ``show=False``: print nothing)
        and return ``{knob: help text}``."""
        out = {f.name: f.metadata.get("help", "") for f in fields(cls)}
        if show:
            print(help_table(cls))
        return out


def help_table(cls=PlanConfig, width: int = 100) -> str:
    """The knobs of ``cls`` as plain text: one entry per knob, ``name = default``, then its help
    wrapped to ``width`` columns and indented."""
    import textwrap

    lines = [f"{cls.__name__} knobs: keywords of ecospa.EcoSpa(model, optimizer, **knobs) and "
             f"ecospa.{cls.__name__}(**knobs); name = default", ""]
    for f in fields(cls):
        lines.append(f"  {f.name} = {f.default!r}")
        lines += textwrap.wrap(f.metadata.get("help", ""), width, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)
