"""Plans as data: a :class:`Plan` is every removal so far, in order, as :class:`PlanStep` s
``(step, {coupling name: [unit indices]})``, indices numbered in the model as it was at that step
(before that step's removal).

A plan round-trips through JSON (:meth:`Plan.to_json` / :meth:`Plan.from_json`; the schema is
checked field by field, since plan files from users are untrusted input) and
:meth:`Plan.replay` applies it to a fresh copy of the model (``ecospa.prune`` accepts a Plan too).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ecospa.errors import PlanError
from ecospa.ir.coupling import CouplingGraph

__all__ = ["PlanStep", "Plan"]


def _int(x) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"expected an integer, got {x!r}")
    return int(x)


@dataclass(frozen=True)
class PlanStep:
    """Units removed at one optimizer step: ``{coupling name: unit indices}``, numbered in the
    model as it was just before this removal. ``widths`` (optional) are the widths those
    couplings had then: ``ecospa.prune`` checks them, so that a plan is only applied to the model
    state it was made on."""

    step: int
    removals: dict[str, tuple[int, ...]]
    params_before: int | None = None
    params_after: int | None = None
    widths: dict[str, int] | None = None


_STEP_FIELDS = ("step", "removals", "params_before", "params_after", "widths")


def _step_from_dict(i: int, s) -> PlanStep:
    """Step ``i`` of a plan's ``steps``, checked field by field (see :meth:`Plan.from_dict`)."""
    where = f"malformed plan step {i}"
    if not isinstance(s, Mapping):
        raise PlanError(f"{where}: a step is an object with fields {list(_STEP_FIELDS[:2])}, got "
                        f"{type(s).__name__} {s!r:.60}")
    extra = sorted(map(str, set(s) - set(_STEP_FIELDS)))
    if extra:
        raise PlanError(f"{where}: unknown fields {extra} (a step has {list(_STEP_FIELDS)})")
    for key in ("step", "removals"):
        if key not in s:
            raise PlanError(f"{where}: missing field {key!r}")

    def count(field_: str, v, optional: bool = False) -> int | None:
        if v is None and optional:
            return None
        try:
            n = _int(v)
        except TypeError:
            raise PlanError(f"{where}, field {field_}: expected an int, got {type(v).__name__} {v!r:.40}") from None
        if n < 0:
            raise PlanError(f"{where}, field {field_}: expected an int >= 0, got {n}")
        return n

    step = count("'step'", s["step"])
    def by_name(field_: str, raw, expected: str) -> Mapping:
        """``raw`` checked as a mapping keyed by coupling names (strings)."""
        if not isinstance(raw, Mapping):
            raise PlanError(f"{where}, field {field_!r}: expected {{coupling name: {expected}}}, got "
                            f"{type(raw).__name__}")
        for k in raw:
            if not isinstance(k, str):
                raise PlanError(f"{where}, field {field_!r}: coupling names are strings, got {k!r}")
        return raw

    widths_raw = s.get("widths")
    widths = None
    if widths_raw is not None:
        widths = {k: count(f"'widths'[{k!r}]", v) for k, v in by_name("widths", widths_raw, "width").items()}
    removals = {}
    for k, v in by_name("removals", s["removals"], "[unit indices]").items():
        if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, Sequence):
            raise PlanError(f"{where}, field 'removals'[{k!r}]: expected a list of unit indices, got "
                            f"{type(v).__name__} {v!r:.40}")
        idx = tuple(count(f"'removals'[{k!r}][{j}]", x) for j, x in enumerate(v))
        if len(set(idx)) != len(idx):
            dup = sorted({x for x in idx if idx.count(x) > 1})
            raise PlanError(f"{where}, field 'removals'[{k!r}]: unit indices {dup} repeated")
        if widths is not None and k in widths and idx and max(idx) >= widths[k]:
            raise PlanError(f"{where}, field 'removals'[{k!r}]: unit index {max(idx)} out of range for "
                            f"width {widths[k]} (the step's field 'widths')")
        removals[k] = idx
    return PlanStep(step, removals, count("'params_before'", s.get("params_before"), True),
                    count("'params_after'", s.get("params_after"), True), widths)


@dataclass(frozen=True)
class Plan:
    """Every removal so far, in order; JSON-serialisable and replayable on a fresh model."""

    steps: tuple[PlanStep, ...] = ()

    def __len__(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict:
        """Plain data: ``{"version": 2, "steps": [{"step", "removals", "widths", ...}]}``."""
        return {"version": 2, "steps": [
            {**asdict(s), "removals": {k: list(v) for k, v in s.removals.items()}} for s in self.steps]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        """Inverse of :meth:`to_dict` (also reads version 1, which has no widths).

        The schema is checked in full (files from users are untrusted input): ``version`` 1 or 2;
        ``steps`` a list; each step an object with ``step`` (int >= 0) and ``removals``
        (``{coupling name: [unit indices]}``, indices ints >= 0, no repeats, each below the
        coupling's width when ``widths`` gives it), optional ``widths`` (``{name: int >= 0}``),
        ``params_before`` and ``params_after`` (int >= 0 or null), and no other field. Whether the
        couplings exist and the indices fit a model is checked when the plan is applied.

        Raises:
            PlanError: the message names the step (its position in ``steps``) and the field.
        """
        if not isinstance(data, Mapping):
            raise PlanError(f"a plan is a JSON object {{'version': 2, 'steps': [...]}}, got {type(data).__name__}")
        extra = sorted(map(str, set(data) - {"version", "steps"}))
        if extra:
            raise PlanError(f"plan: unknown fields {extra} (a plan has 'version' and 'steps')")
        version = data.get("version")
        if isinstance(version, bool) or version not in (1, 2):
            raise PlanError(f"plan field 'version': unknown plan version {version!r} (expected 1 or 2); "
                            "write plans with Plan.to_json()")
        if "steps" not in data:
            raise PlanError("plan: missing field 'steps' (a list of steps; [] for an empty plan)")
        raw = data["steps"]
        if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
            raise PlanError(f"plan field 'steps' should be a list, got {type(raw).__name__}")
        return cls(tuple(_step_from_dict(i, s) for i, s in enumerate(raw)))

    def to_json(self, **kwargs) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Inverse of :meth:`to_json`.

        Raises:
            PlanError: ``text`` is not JSON, or not a plan (see :meth:`from_dict`).
        """
        if not isinstance(text, (str, bytes, bytearray)):
            raise PlanError(f"Plan.from_json takes JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise PlanError(f"a plan file is JSON text; this is not: {e}") from None
        return cls.from_dict(data)

    def replay(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
               example_inputs=None, couplings: CouplingGraph | None = None) -> nn.Module:
        """Apply every step to ``model`` (a fresh copy of the dense model) in place; return it.

        ``couplings`` defaults to ``ecospa.auto_couple(model, example_inputs)``. Same as
        ``ecospa.prune(model, plan, optimizer, couplings=couplings)``.
        """
        from ecospa.analysis.auto_couple import auto_couple
        from ecospa.pruning.apply import prune

        cg = couplings if couplings is not None else auto_couple(model, example_inputs)
        return prune(model, self, optimizer, couplings=cg)

    def removed_original(self, widths: Mapping[str, int]) -> dict[str, list[int]]:
        """Every removed unit in the numbering of the dense model, given its widths ``{name: width}``."""
        alive = {n: list(range(w)) for n, w in widths.items()}
        out: dict[str, list[int]] = defaultdict(list)
        for s in self.steps:
            for name, idx in s.removals.items():
                if name not in alive:
                    raise PlanError(f"plan names coupling {name!r}, not among the given widths")
                gone = set(idx)
                out[name] += [alive[name][i] for i in idx]
                alive[name] = [a for i, a in enumerate(alive[name]) if i not in gone]
        return {n: sorted(v) for n, v in out.items()}
