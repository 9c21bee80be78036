"""Parameter budgets: an exact parameter count while units are removed, and a plan's target as a
parameter count (checked to be reachable).

``resolve_target`` reads only ``target``, ``min_keep``, ``min_units`` and ``width_multiple`` of the
config it is given (a :class:`~ecospa.schedule.config.PlanConfig`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ecospa.errors import ConfigError
from ecospa.ir.coupling import Coupling

__all__ = ["ParamCounter", "resolve_target"]


class ParamCounter:
    """Exact parameter count while units are removed (a slice along two dims counts once).

    Args:
        shapes: ``{param: shape}`` of *every* parameter of the model.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]]):
        self.shapes = {n: tuple(int(k) for k in s) for n, s in shapes.items()}
        self.removed: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.total = sum(self._numel(n) for n in self.shapes)

    def _numel(self, name: str) -> int:
        r = self.removed.get(name, {})
        return int(np.prod([k - r.get(d, 0) for d, k in enumerate(self.shapes[name])], dtype=np.int64))

    def remove(self, c: Coupling, units: Iterable[int]) -> int:
        """Account for removing ``units`` of ``c``; return the new total."""
        units = np.asarray(list(units), dtype=np.int64)
        for t in c.tables:
            k = int(np.isin(t.unit, units).sum())
            if k:
                before = self._numel(t.param)
                self.removed[t.param][t.dim] += k
                self.total += self._numel(t.param) - before
        return self.total

    def copy(self) -> "ParamCounter":
        """An independent copy."""
        out = ParamCounter.__new__(ParamCounter)
        out.shapes, out.total = self.shapes, self.total
        out.removed = defaultdict(lambda: defaultdict(int), {n: defaultdict(int, r) for n, r in self.removed.items()})
        return out


def resolve_target(config: Any, couplings: Iterable[Coupling], shapes: Mapping[str, Sequence[int]]) -> int:
    """The target as a total parameter count; checks that it is reachable.

    Args:
        couplings: the couplings that may be pruned (inexact ones are ignored).
        shapes: ``{param: shape}`` of every parameter of the model.

    Raises:
        ConfigError: the target is below the smallest size the couplings allow (the message
            gives that size, as a count and as a fraction of the prunable parameters).
    """
    exact = [c for c in couplings if c.exact]
    everything, floor = ParamCounter(shapes), ParamCounter(shapes)
    total = everything.total
    for c in exact:
        everything.remove(c, range(c.width))
        if c.width > config.min_keep:
            floor.remove(c, range(c.width - config.min_keep))
    prunable = total - everything.total
    if isinstance(config.target, float):
        target = int(round(total - (1.0 - config.target) * prunable))
    else:
        target = int(config.target)
        if target > total:
            raise ConfigError(
                f"target {target} parameters is larger than the model ({total} parameters): nothing "
                f"would be pruned. Ask for at most {total} (or a fraction in (0, 1] of the {prunable} "
                "prunable parameters)")
    if target < floor.total:
        frac = (floor.total - (total - prunable)) / prunable if prunable else 1.0
        raise ConfigError(
            f"target {config.target!r} ({target} parameters) is unreachable: the model has {total} "
            f"parameters, {prunable} of them in {len(exact)} exact couplings, and with "
            f"min_units={config.min_units}, width_multiple={config.width_multiple} the smallest "
            f"reachable size is {floor.total} parameters (keeping {frac:.3f} of the prunable ones); "
            "ask for at least that, or lower min_units")
    return target
