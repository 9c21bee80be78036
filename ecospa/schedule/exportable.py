"""Exportable plans: removals whose kept widths the architecture's config can state, so that
``ecospa.export`` writes a checkpoint exactly as small as the pruned model (no padding).

A transformers config states one value per size *field* for the whole model: one head count
(and one key/value head count), one head width, one FFN width. A pruned model is expressible
when every layer keeps the same number of whole heads and the same FFN width, and nothing else
shrank. ``PlanConfig(exportable=True)`` / ``CompressConfig(exportable=True)`` ask the planner
and the allocators for exactly that. The rules are derived from the couplings and, for a
transformers model, from the config fields that set each sliced dim (probed by
``ecospa.export.fields``, the same probe the export uses); no model is named anywhere:

- **Heads are removed whole.** A coupling of kind ``qk`` or ``vo``, or one of a width group
  of several couplings (heads batched in one tensor), is part of a head. The head-width field is
  never shrunk: it is one value shared by q, k and v where the config has one ``head_dim``
  (Llama: q/k width must equal v width), and rotary embeddings read it (a smaller head width
  changes the frequencies, so the export could not state it exactly). Inside one scope (the
  attention module) the width groups of heads are aligned by order: head ``i`` is the ``i``-th
  coupling of each group (``qk.head1`` with ``vo.head1``); under GQA a head is a whole key/value
  group with its query heads, which keeps the groups consistent. The merged head is one unit of
  a coupling of kind ``"heads"`` per scope (:func:`view`), ranked by the sum of its couplings'
  scores.
- **Repeated blocks move in lockstep.** Couplings (and head sets) whose names differ only in
  numeric components (``model.layers.3.mlp.glu``, ``model.layers.7.mlp.glu``) form one block
  that loses the same number of units from each member, which units chosen by each member's own
  scores: every layer keeps the same FFN width and the same number of heads.
- **Only what the config can state shrinks.** For a transformers model, a coupling is *frozen*
  (keeps every unit) when one of the dims it slices is set by no editable config field, or by a
  field that also sets a dim no coupling slices (GPT-2's head width is ``n_embd / n_head`` and
  ``n_embd`` is the embedding width: its heads stay, its FFN (``n_inner``) shrinks), or, for a
  coupling that is not a head, by more than one field. Without a config (a plain module) only
  the first two rules apply.

The cost is flexibility: no per-layer widths, no partial heads. ``bench/export_cost.py``
measures it (docs/checkpoints.md).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ecospa.ir.coupling import Coupling, SliceTable
from ecospa.schedule.budget import ParamCounter

__all__ = ["ExportRules", "ExportView", "exportable_rules", "view", "check_exportable_target", "HEADS"]

HEADS = "heads"  # kind of a merged head coupling: its units are whole heads
_DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _pattern(name: str) -> str:
    """``name`` with its numeric components replaced: the same name in every repeated block."""
    return _DIGITS.sub("*", name)


@dataclass(frozen=True)
class ExportRules:
    """What an exportable plan may remove, by (dense) coupling name.

    Attributes:
        head: ``{coupling: head id}`` for the couplings that are part of a head (``"<scope>#i"``):
            removed whole, all couplings of one head together.
        frozen: ``{coupling: why}``: couplings that keep every unit.
        names: every exact coupling the rules were made for (others keep every unit).
    """

    head: Mapping[str, str] = field(default_factory=dict)
    frozen: Mapping[str, str] = field(default_factory=dict)
    names: frozenset = frozenset()

    def lockstep(self, name: str) -> str:
        """The block key of a coupling or of a merged head coupling (its name's pattern)."""
        return _pattern(name)


def _is_head(c: Coupling, group_size: Mapping[str, int]) -> bool:
    return c.kind in ("qk", "vo") or (bool(c.group) and group_size.get(c.group, 1) > 1)


def exportable_rules(couplings: Sequence[Coupling], model=None) -> ExportRules:
    """The :class:`ExportRules` of ``couplings`` (exact ones) of ``model``; the config fields are
    probed when ``model`` is a transformers model (its config must describe the dense model)."""
    exact = [c for c in couplings if c.exact]
    group_size: dict[str, int] = defaultdict(int)
    for c in exact:
        if c.group:
            group_size[c.group] += 1
    by_scope: dict[str, dict[str, list[Coupling]]] = defaultdict(dict)
    for c in exact:
        if _is_head(c, group_size):
            by_scope[c.scope].setdefault(c.group or c.name, []).append(c)
    head: dict[str, str] = {}
    for scope, groups in by_scope.items():
        for members in groups.values():
            for i, c in enumerate(members):
                head[c.name] = f"{scope}#{i}"
    frozen = _config_frozen(exact, head, model) if model is not None else {}
    # a head is removed whole: one frozen member freezes it
    frozen_heads = {head[n] for n in frozen if n in head}
    for n, h in head.items():
        if h in frozen_heads and n not in frozen:
            frozen[n] = f"its head shares {h.split('#')[0]} with a coupling that cannot shrink"
    return ExportRules(head, frozen, frozenset(c.name for c in exact))


def _config_frozen(exact: Sequence[Coupling], head: Mapping[str, str], model) -> dict[str, str]:
    """``{coupling: why}`` for the couplings whose removal the config of ``model`` cannot state
    (nothing for a model without a transformers config)."""
    import sys

    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return {}
    from ecospa.export.fields import probe_fields
    from ecospa.export.structure import structure_of

    s = structure_of(model)
    sliced = {(t.param, t.dim) for c in exact for t in c.tables}
    fm = probe_fields(model, s.dense, {kd for kd in sliced if kd[0] in s.dense})
    dims_of: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for kd, lay in fm.layouts.items():
        for f in lay.fields:
            dims_of[f].add(kd)
    shrinkable = {f for f, kds in dims_of.items() if kds <= sliced}
    inner = fm.inner_fields()
    out: dict[str, str] = {}
    for c in exact:
        for t in c.tables:
            lay = fm.layouts.get((t.param, t.dim))
            if lay is None:
                why = f"no editable config field sets {t.param} dim {t.dim}"
            elif c.name in head:
                outer = [f for f in lay.fields if f not in inner] or list(lay.fields)
                bad = [f for f in outer if f not in shrinkable]
                why = (f"{', '.join(bad)} also sets sizes no coupling removes" if bad else None)
            elif len(lay.fields) > 1:
                why = f"{t.param} dim {t.dim} is set by {' x '.join(lay.fields)}: only whole heads shrink"
            elif lay.fields[0] not in shrinkable:
                why = f"{lay.fields[0]} also sets sizes no coupling removes"
            else:
                why = None
            if why:
                out[c.name] = why
                break
    return out


@dataclass
class ExportView:
    """The couplings an exportable plan works on, built from the current couplings.

    Attributes:
        couplings: merged head couplings (kind ``"heads"``, one per scope, a unit per alive head)
            and the other couplings that may shrink, as they are.
        blocks: lists of ``couplings`` cut in lockstep (same number of units from each).
        members: ``{merged name: [[member couplings of head 0], [of head 1], ...]}``.
    """

    couplings: list[Coupling]
    blocks: list[list[Coupling]]
    members: dict[str, list[list[Coupling]]]

    def expand(self, removal: Mapping[str, Sequence[int]],
               alive: Mapping[str, np.ndarray] | None = None) -> dict[str, list[int]]:
        """A removal of the view's units as one of the original couplings' units (a head: every
        unit of its couplings, or every alive one when ``alive`` masks are given)."""
        out: dict[str, list[int]] = {}
        for name, units in removal.items():
            if name not in self.members:
                out.setdefault(name, []).extend(int(u) for u in units)
                continue
            for h in units:
                for c in self.members[name][int(h)]:
                    keep = np.arange(c.width) if alive is None else np.nonzero(alive[c.name])[0]
                    out.setdefault(c.name, []).extend(int(u) for u in keep)
        return {n: sorted(set(u)) for n, u in out.items() if u}

    def merge_values(self, c: Coupling, of_member: Callable[[Coupling], float]) -> np.ndarray:
        """``(width,)`` per head: the sum of ``of_member`` over its couplings."""
        return np.asarray([sum(float(of_member(m)) for m in head) for head in self.members[c.name]],
                          dtype=np.float64)

    def floor(self, shapes: Mapping[str, Sequence[int]], min_units: int, min_keep: int) -> int:
        """Smallest parameter count this view reaches (heads down to ``min_units`` per scope,
        other couplings down to ``min_keep``)."""
        pc = ParamCounter(shapes)
        for c in self.couplings:
            keep = min_units if c.kind == HEADS else min_keep
            if c.width > keep:
                pc.remove(c, range(c.width - keep))
        return pc.total


def view(couplings: Sequence[Coupling], rules: ExportRules,
         alive: Mapping[str, np.ndarray] | None = None) -> ExportView:
    """The :class:`ExportView` of the current ``couplings`` (names as in ``rules``; a coupling
    ``rules`` does not know keeps its units). ``alive``: per coupling the units still there
    (compress's masked rounds); default all of them. A head is alive while a unit of it is."""

    def live(c: Coupling) -> int:
        return c.width if alive is None else int(np.asarray(alive[c.name]).sum())

    exact = [c for c in couplings if c.exact and live(c) > 0]
    heads: dict[str, dict[str, list[Coupling]]] = defaultdict(dict)  # scope -> head id -> members
    plain: list[Coupling] = []
    for c in exact:
        if c.name in rules.frozen:
            continue
        h = rules.head.get(c.name)
        if h is not None:
            heads[h.rsplit("#", 1)[0]].setdefault(h, []).append(c)
        elif c.name in rules.names:
            plain.append(c)
    merged: list[Coupling] = []
    members: dict[str, list[list[Coupling]]] = {}
    for scope, hs in heads.items():
        ids = sorted(hs, key=lambda h: int(h.rsplit("#", 1)[1]))
        tables = []
        for i, h in enumerate(ids):
            for c in hs[h]:
                for t in c.tables:
                    tables.append(SliceTable(t.param, t.dim, np.full(t.index.size, i, dtype=np.int64), t.index,
                                             t.side))
        name = f"{scope}.{HEADS}" if scope else HEADS
        merged.append(Coupling(name, HEADS, True, None, len(ids), tuple(tables), scope=scope, group=""))
        members[name] = [hs[h] for h in ids]
    out = merged + plain
    blocks: dict[str, list[Coupling]] = {}
    for c in out:
        blocks.setdefault(rules.lockstep(c.name), []).append(c)
    return ExportView(out, list(blocks.values()), members)



def check_exportable_target(config, couplings: Sequence[Coupling], rules: ExportRules,
                            shapes: Mapping[str, Sequence[int]], target: int) -> None:
    """Refuse a target an exportable plan cannot reach (``config``: ``min_units``, ``min_keep``).

    Raises:
        ConfigError: ``target`` is below the smallest exportable size (the message gives it and
            what keeps the rest: frozen couplings and why).
    """
    from ecospa.errors import ConfigError

    floor = view(couplings, rules).floor(shapes, config.min_units, config.min_keep)
    if target < floor:
        why = sorted(set(rules.frozen.values()))[:3]
        raise ConfigError(
            f"target {config.target!r} ({target} parameters) is unreachable with exportable=True: the "
            f"smallest exportable size is {floor} parameters (whole heads, the same widths in every "
            f"layer{'; kept whole: ' + '; '.join(why) if why else ''}); ask for at least that, or "
            "exportable=False (ecospa.export then pads)")
