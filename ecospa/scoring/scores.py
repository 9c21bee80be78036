"""The score functions behind ``Importance.coupling_scores`` / ``unit_scores``, as registries.

A coupling score is ``fn(importance, coupling, salt) -> float`` (smaller = pruned first); a unit
score is ``fn(importance, coupling, salt) -> (width,) tensor >= 0`` (normalised to sum 1 by the
caller; smaller = removed first). ``salt`` (the pruning round) varies the ``random`` draws.
Built in:

=========  ============================================  ==========================================
name       coupling score                                unit score
=========  ============================================  ==========================================
fisher     Eq. 6: mean over the 2 sides of sum g^2/|W_k|  (coupling only)
           divided by the number of batches
eq9        (unit only)                                   Eq. 9: a_j * b_j, L1 norms of the
                                                         producer and the reader slices
magnitude  mean over the 2 sides of sum |w| / |W_k|      sum of |w| over the unit's slices
taylor     like fisher, with accumulated |w * g|         accumulated |w * g| over its slices
random     seeded uniform                                seeded uniform
=========  ============================================  ==========================================

Add one with ``@register_unit_score("name", needs=("sq",))``; ``needs`` lists the gradient
statistics it reads (``"sq"``: squared gradients, ``"wg"``: ``|w * g|``).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from ecospa.errors import ConfigError, EcospaError
from ecospa.ir.coupling import Coupling

__all__ = [
    "COUPLING_SCORES",
    "UNIT_SCORES",
    "register_coupling_score",
    "register_unit_score",
    "lookup",
    "needed_stats",
    "Statistics",
]

class Statistics(Protocol):
    """What a score function reads: the statistics an :class:`~ecospa.scoring.importance.Importance`
    accumulates (per coupling, keyed by name)."""

    num_batches: int

    def per_unit(self, c: Coupling | str, stat: str, side: int | None = None) -> torch.Tensor: ...

    def per_matrix_mean(self, c: Coupling | str, stat: str) -> float: ...

    def sides(self, c: Coupling | str) -> set[int]: ...

    def generator(self, name: str, salt: int = 0) -> torch.Generator: ...


ScoreFn = Callable[[Statistics, Coupling, int], object]
COUPLING_SCORES: dict[str, ScoreFn] = {}
UNIT_SCORES: dict[str, ScoreFn] = {}
NEEDS: dict[str, tuple[str, ...]] = {}  # score name -> gradient statistics it reads


def _register(table: dict, kind: str, name: str, needs: tuple[str, ...]):
    def deco(fn: ScoreFn) -> ScoreFn:
        if name in table:
            raise ConfigError(f"{kind} {name!r} is already registered")
        table[name] = fn
        NEEDS[f"{kind}:{name}"] = needs
        return fn
    return deco


def register_coupling_score(name: str, needs: tuple[str, ...] = ()):
    """Decorator: ``fn(importance, coupling, salt) -> float``, smaller = prune first."""
    return _register(COUPLING_SCORES, "coupling score", name, needs)


def register_unit_score(name: str, needs: tuple[str, ...] = ()):
    """Decorator: ``fn(importance, coupling, salt) -> (width,) tensor >= 0`` (normalised after)."""
    return _register(UNIT_SCORES, "unit score", name, needs)


def lookup(table: dict, name: str, kind: str) -> ScoreFn:
    """``table[name]``, or a ConfigError listing the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {kind} {name!r}; choose from {sorted(table)}") from None


def needed_stats(coupling_score: str, unit_score: str) -> tuple[str, ...]:
    """Gradient statistics the two chosen scores read, e.g. ``("sq",)``."""
    lookup(COUPLING_SCORES, coupling_score, "coupling score")
    lookup(UNIT_SCORES, unit_score, "unit score")
    need = NEEDS[f"coupling score:{coupling_score}"] + NEEDS[f"unit score:{unit_score}"]
    return tuple(dict.fromkeys(need))


@register_coupling_score("fisher", needs=("sq",))
def _fisher(imp: Statistics, c: Coupling, salt: int) -> float:
    if imp.num_batches == 0:
        raise EcospaError(f"no gradients accumulated for {c.name!r}: call accumulate() after "
                          "loss.backward() before scoring with 'fisher'")
    return imp.per_matrix_mean(c, "sq") / imp.num_batches


@register_coupling_score("magnitude")
def _coupling_magnitude(imp: Statistics, c: Coupling, salt: int) -> float:
    return imp.per_matrix_mean(c, "l1")


@register_coupling_score("taylor", needs=("wg",))
def _coupling_taylor(imp: Statistics, c: Coupling, salt: int) -> float:
    return imp.per_matrix_mean(c, "wg") / max(1, imp.num_batches)


@register_coupling_score("random")
def _coupling_random(imp: Statistics, c: Coupling, salt: int) -> float:
    return float(torch.rand(1, generator=imp.generator(c.name, salt)))


@register_unit_score("eq9")
def _eq9(imp: Statistics, c: Coupling, salt: int) -> torch.Tensor:
    sides = imp.sides(c)
    out = torch.ones(c.width, dtype=torch.float64)
    for side in sorted(sides):
        out = out * imp.per_unit(c, "l1", side)
    return out


@register_unit_score("magnitude")
def _unit_magnitude(imp: Statistics, c: Coupling, salt: int) -> torch.Tensor:
    return imp.per_unit(c, "l1")


@register_unit_score("taylor", needs=("wg",))
def _unit_taylor(imp: Statistics, c: Coupling, salt: int) -> torch.Tensor:
    return imp.per_unit(c, "wg")


@register_unit_score("random")
def _unit_random(imp: Statistics, c: Coupling, salt: int) -> torch.Tensor:
    return torch.rand(c.width, generator=imp.generator(c.name, salt), dtype=torch.float64)
