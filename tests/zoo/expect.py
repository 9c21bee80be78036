"""Ground truth for coupling discovery: expected couplings written as plain data.

An :class:`Expect` is a coupling kind and its units, each unit a list of ``(param, dim, index)``
tuples. The helpers build the slices of the usual layouts (``nn.Linear`` and GPT-2's ``Conv1D``)
and of attention (heads, GQA groups, rotary pairs), so every model of the zoo and every generated
model states its truth in a few lines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = [
    "Expect",
    "lin_out",
    "lin_in",
    "conv1d_out",
    "conv1d_in",
    "rotary_groups",
    "attention_expects",
    "ffn_expect",
    "glu_expect",
]

SliceT = tuple[str, int, int]
SliceFn = Callable[[int, int], list[SliceT]]


@dataclass(frozen=True)
class Expect:
    """One expected coupling: ``kind`` and ``units`` (list of lists of ``(param, dim, index)``).

    ``roles`` (optional, one string per slice) names the side of the product each slice is on
    (``"q"``/``"k"``, ``"v"``/``"o"``, ``"in"``/``"out"``, ``"gate"``/``"up"``/``"down"``); the
    zoo's self-check zeroes one side at a time.
    """

    kind: str
    units: tuple[tuple[SliceT, ...], ...]
    roles: tuple[tuple[str, ...], ...] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, kind: str, units: Sequence[Sequence[SliceT]],
           roles: Sequence[Sequence[str]] | None = None) -> "Expect":
        """Build from lists (units are frozen to tuples)."""
        frozen_roles = None if roles is None else tuple(tuple(r) for r in roles)
        if frozen_roles is not None:
            assert [len(r) for r in frozen_roles] == [len(u) for u in units]
        return cls(kind, tuple(tuple(tuple(s) for s in u) for u in units), frozen_roles)

    @property
    def width(self) -> int:
        """Number of units."""
        return len(self.units)

    @property
    def params(self) -> tuple[str, ...]:
        """Sorted names of the parameters the coupling slices."""
        return tuple(sorted({s[0] for u in self.units for s in u}))


def lin_out(module: str, index: int, bias: bool = True) -> list[SliceT]:
    """Output channel ``index`` of an ``nn.Linear``: weight row (and bias entry)."""
    out = [(f"{module}.weight", 0, index)]
    if bias:
        out.append((f"{module}.bias", 0, index))
    return out


def lin_in(module: str, index: int) -> list[SliceT]:
    """Input channel ``index`` of an ``nn.Linear``: weight column."""
    return [(f"{module}.weight", 1, index)]


def conv1d_out(module: str, index: int, bias: bool = True) -> list[SliceT]:
    """Output channel of GPT-2's ``Conv1D`` (weight stored ``(in, out)``)."""
    out = [(f"{module}.weight", 1, index)]
    if bias:
        out.append((f"{module}.bias", 0, index))
    return out


def conv1d_in(module: str, index: int) -> list[SliceT]:
    """Input channel of GPT-2's ``Conv1D``: weight row."""
    return [(f"{module}.weight", 0, index)]


def rotary_groups(head_dim: int, rotary: str | None) -> list[list[int]]:
    """Dimensions of one head that must be removed together.

    ``None``: each dim alone; ``"half"`` (rotate_half): ``d`` with ``d + D/2``;
    ``"interleaved"`` (rotate_every_two): ``2i`` with ``2i + 1``.
    """
    if rotary is None:
        return [[d] for d in range(head_dim)]
    half = head_dim // 2
    if rotary == "half":
        return [[p, p + half] for p in range(half)]
    if rotary == "interleaved":
        return [[2 * p, 2 * p + 1] for p in range(half)]
    raise ValueError(f"unknown rotary layout {rotary!r}")


def attention_expects(
    *,
    n_kv: int,
    rep: int,
    head_dim: int,
    q: SliceFn,
    k: SliceFn,
    v: SliceFn,
    o: SliceFn,
    rotary: str | None = None,
    v_head_dim: int | None = None,
) -> list[Expect]:
    """One ``qk`` and one ``vo`` coupling per kv head.

    Args:
        n_kv: number of key/value heads; query head ``hq`` reads kv head ``hq // rep``.
        rep: query heads per kv head (1: plain multi-head attention).
        head_dim: q/k width of a head.
        q, k, v: ``(head, dim) -> slices`` producing that channel.
        o: ``(query_head, dim) -> slices`` of the output projection reading that channel.
        rotary: pairing of q/k dims, see :func:`rotary_groups`.
        v_head_dim: v width of a head (defaults to ``head_dim``).
    """
    vd = head_dim if v_head_dim is None else v_head_dim
    out = []
    for g in range(n_kv):
        heads = range(g * rep, (g + 1) * rep)
        qk, qk_roles = [], []
        for group in rotary_groups(head_dim, rotary):
            unit, roles = [], []
            for d in group:
                unit += k(g, d)
                roles += ["k"] * (len(unit) - len(roles))
                for hq in heads:
                    unit += q(hq, d)
                roles += ["q"] * (len(unit) - len(roles))
            qk.append(unit)
            qk_roles.append(roles)
        vo, vo_roles = [], []
        for d in range(vd):
            unit = list(v(g, d))
            roles = ["v"] * len(unit)
            for hq in heads:
                unit += o(hq, d)
            vo.append(unit)
            vo_roles.append(roles + ["o"] * (len(unit) - len(roles)))
        out += [Expect.of("qk", qk, qk_roles), Expect.of("vo", vo, vo_roles)]
    return out


def ffn_expect(fc: str, out: str | Sequence[str], width: int, *, bias: bool = True,
               kind: str = "ffn") -> Expect:
    """Hidden units of ``fc -> act -> out`` (``out`` may list several readers)."""
    readers = [out] if isinstance(out, str) else list(out)
    units, roles = [], []
    for j in range(width):
        unit = lin_out(fc, j, bias)
        n_in = len(unit)
        for r in readers:
            unit += lin_in(r, j)
        units.append(unit)
        roles.append(["in"] * n_in + ["out"] * (len(unit) - n_in))
    return Expect.of(kind, units, roles)


def glu_expect(gate: str, up: str | None, down: str, width: int, *, bias: bool = False) -> Expect:
    """Hidden units of ``down(act(gate(x)) * up(x))``.

    With ``up=None`` gate and up are fused in ``gate`` (gate rows first, then up rows).
    """
    units, roles = [], []
    for j in range(width):
        g = lin_out(gate, j, bias)
        u = lin_out(gate, width + j, bias) if up is None else lin_out(up, j, bias)
        dn = lin_in(down, j)
        units.append(g + u + dn)
        roles.append(["gate"] * len(g) + ["up"] * len(u) + ["down"] * len(dn))
    return Expect.of("glu", units, roles)
