"""Which config fields set which parameter sizes, found by probing (no per-model tables).

A transformers model is rebuilt from its config on the meta device (no memory, no weights) with
one integer field doubled at a time; the dims of the state dict that double are the ones that
field sets. A dim set by fields ``f1..fn`` has size ``c * f1 * ... * fn`` and its dense index
is the mixed-radix number ``(c, f_outer, ..., f_inner)``: ``q_proj.weight`` rows are
``(num_attention_heads, head_dim)``, ``k_proj`` rows ``(num_key_value_heads, head_dim)``,
``gate_proj`` rows ``(intermediate_size,)``. The field that sets more dims is the inner one
(``head_dim`` sets q, k, v and o; the head counts two of them each), ties broken by the name.
Fields whose value is None and that a size depends on (GPT-2's ``n_inner``) are probed at the
pruned dense sizes. A field that changes a size non-proportionally, or the set of parameters
(``num_hidden_layers``), is not editable. Two head-count fields over the same inner layout
whose values divide (``num_attention_heads`` 8, ``num_key_value_heads`` 2) are *grouped*: a
query head ``h`` belongs to key/value head ``h // (8 / 2)``, and the export keeps whole groups.
"""
from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn

from ecospa.export.report import ExportError

__all__ = ["Layout", "FieldMap", "probe_fields", "build_meta", "config_with"]

# conventional optional fields that attention modules read as ``getattr(config, name, derived)``
# (Qwen2's head_dim is hidden_size // num_attention_heads unless the config states it): when the
# config does not state one, its derived value is found by probing and stated in the export
OPTIONAL_FIELDS = ("head_dim",)


@dataclass(frozen=True)
class Layout:
    """A dim of size ``const * prod(values of fields)``; dense index = ravel over
    ``(const, *fields)``, outer to inner."""

    const: int
    fields: tuple[str, ...]


@dataclass(frozen=True)
class FieldMap:
    """What probing found.

    Attributes:
        values: dense value of every editable field.
        layouts: ``{(key, dim): Layout}`` of every state-dict dim an editable field sets.
        groups: ``{head field: (group field, heads per group)}`` (GQA).
        fixed: fields that set sizes but cannot be edited, with why.
        stated: optional fields the config derives and the export states (``{"head_dim": 64}``).
    """

    values: Mapping[str, int]
    layouts: Mapping[tuple[str, int], Layout]
    groups: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    fixed: Mapping[str, str] = field(default_factory=dict)
    stated: Mapping[str, int] = field(default_factory=dict)

    def inner_fields(self) -> set[str]:
        """Fields that are the inner factor of a layout with several fields (head widths)."""
        return {lay.fields[-1] for lay in self.layouts.values() if len(lay.fields) > 1}


def config_with(config, values: Mapping[str, object]):
    """A deep copy of ``config`` with ``values`` set."""
    cfg = copy.deepcopy(config)
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def build_meta(cls: type, config) -> dict[str, tuple[int, ...]]:
    """``{state-dict key: shape}`` of ``cls`` built from ``config`` on the meta device."""
    with torch.device("meta"):
        m = cls._from_config(config)
    return {k: tuple(t.shape) for k, t in m.state_dict().items()}


def _try_shapes(cls, config, values) -> dict[str, tuple[int, ...]] | None:
    try:
        return build_meta(cls, config_with(config, values))
    except Exception:  # noqa: BLE001 - any model's constructor may refuse a probed value, in its own way
        return None


def _candidates(config, sizes: set[int]) -> dict[str, int]:
    """``{field: value}``: the int fields that divide a pruned dense size."""
    out: dict[str, int] = {}
    for k in config.to_dict():
        v = getattr(config, k, None)
        if not k.startswith("_") and isinstance(v, int) and not isinstance(v, bool) and v > 1 \
                and any(n % v == 0 for n in sizes):
            out[k] = v
    return out


def probe_fields(model: nn.Module, dense: Mapping[str, tuple[int, ...]], pruned: set[tuple[str, int]]) -> FieldMap:
    """Probe ``model``'s config against its dense shapes ``dense``; ``pruned``: the (key, dim)s
    the record sliced (their sizes choose the candidate fields).

    Raises:
        ExportError: the config does not rebuild the dense model (a config that no longer
            describes the model).
    """
    cls, config = type(model), model.config
    base = _try_shapes(cls, config, {})
    if base is None or base != dict(dense):
        diff = sorted(k for k in set(base or {}) | set(dense) if (base or {}).get(k) != dense.get(k))[:3]
        raise ExportError(f"{cls.__name__}'s config does not rebuild the dense model it was pruned from "
                          f"(keys {diff} differ): export needs model.config to describe the dense model; "
                          "keep the config of the model you pruned")
    sizes = {dense[k][d] for k, d in pruned}
    stated = _stated(cls, config, base, sizes)
    config = config_with(config, stated)
    sets: dict[tuple[str, int], set[str]] = defaultdict(set)
    values: dict[str, int] = {}
    fixed: dict[str, str] = {}
    for name, v in _candidates(config, sizes).items():
        doubled = _try_shapes(cls, config, {name: 2 * v})
        if doubled is None or doubled == base:
            continue
        if set(doubled) != set(base):
            fixed[name] = "it changes which parameters the model has"
            continue
        changed = [(k, d) for k in base for d, (a, b) in enumerate(zip(base[k], doubled[k])) if a != b]
        if any(doubled[k][d] != 2 * base[k][d] for k, d in changed):
            fixed[name] = "it changes sizes non-proportionally"
        values[name] = v
        for kd in changed:
            sets[kd].add(name)
    # a dim set by a fixed field cannot shrink along the other fields either
    for kd, names in sets.items():
        if names & set(fixed):
            fixed.update({n: f"it shares a dim ({kd[0]}) with {sorted(names & set(fixed))}"
                          for n in names - set(fixed)})
    weight = Counter(n for names in sets.values() for n in names)
    layouts: dict[tuple[str, int], Layout] = {}
    for kd, names in sets.items():
        if names & set(fixed):
            continue
        order = tuple(sorted(names, key=lambda n: (weight[n], "dim" in n, n)))
        prod = 1
        for n in order:
            prod *= values[n]
        if dense[kd[0]][kd[1]] % prod:
            fixed.update({n: f"{kd[0]} dim {kd[1]} is not a multiple of their product" for n in names})
            continue
        layouts[kd] = Layout(dense[kd[0]][kd[1]] // prod, order)
    layouts = {kd: lay for kd, lay in layouts.items() if not set(lay.fields) & set(fixed)}
    editable = {n: v for n, v in values.items() if n not in fixed}
    return FieldMap(editable, layouts, _groups(layouts, editable), fixed, stated)


def _stated(cls, config, base, sizes: set[int]) -> dict[str, int]:
    """Fields the config leaves to the model (None, or absent among :data:`OPTIONAL_FIELDS`), at
    the value that rebuilds the same shapes and that sets sizes when doubled (GPT-2's ``n_inner``
    = 4 * n_embd, Qwen2's ``head_dim``): the pruned sizes are tried, and for the optional fields
    their divisors too."""
    names = [k for k, v in config.to_dict().items() if v is None and not k.startswith("_") and hasattr(config, k)]
    names += [n for n in OPTIONAL_FIELDS if getattr(config, n, None) is None and n not in names]
    divisors = sorted({d for n in sizes for d in range(2, n) if n % d == 0} - sizes)
    out: dict[str, int] = {}
    for name in names:
        if name not in OPTIONAL_FIELDS and _try_shapes(cls, config, {name: 2 * max(sizes)}) in (None, base):
            continue  # one build says it sets no size (most None fields: token ids, rope scaling, ...)
        for d in sorted(sizes) + (divisors if name in OPTIONAL_FIELDS else []):
            if _try_shapes(cls, config, {name: d}) == base \
                    and _try_shapes(cls, config, {name: 2 * d}) not in (None, base):
                out[name] = d
                break
    return out


def _groups(layouts: Mapping[tuple[str, int], Layout], values: Mapping[str, int]) -> dict[str, tuple[str, int]]:
    """Head fields grouped by another head field over the same inner fields (GQA): the field
    with the larger value is grouped by the smaller one (equal values: by name)."""
    tails: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for lay in layouts.values():
        if len(lay.fields) > 1:
            tails[lay.fields[1:]].add(lay.fields[0])
    out: dict[str, tuple[str, int]] = {}
    for heads in tails.values():
        if len(heads) != 2:
            continue
        a, b = sorted(heads, key=lambda n: (-values[n], n))
        if values[a] % values[b] == 0 and a not in out and b not in out:
            out[a] = (b, values[a] // values[b])
    return out
