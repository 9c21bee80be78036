"""Repeated blocks: analyse three, reuse the middle one for its twins.

A transformer is mostly one block repeated (32 identical decoder layers in a LLaMA-2-7B). The
graph of a *thinned* model, where each stack of structurally identical blocks keeps only its
first, second and last block, has everything discovery needs: the second block stands for all
the middle ones. :func:`thinned` makes that model (temporarily, in place: the stack keeps the
original keys, so parameter names stay those of the full model), and :func:`replicate` turns the
couplings found on it into those of the full model: couplings inside the second block are copied
for every middle block, couplings that span blocks (the residual stream) get the middle blocks'
slices added. ``discover`` checks that the first and second blocks gave the same couplings (up to
renaming) and otherwise analyses the full model; ``tests/analysis/test_blocks.py`` checks the result
equals the full analysis on several architectures.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch.nn as nn

from ecospa.ir.coupling import Coupling, Site, SliceTable

__all__ = ["Stack", "find_stacks", "thinned", "replicate", "consistent"]

MIN_BLOCKS = 4  # fewer blocks are not worth it


@dataclass(frozen=True)
class Stack:
    """A run of structurally identical blocks in a container (``nn.ModuleList``/``nn.Sequential``).

    Attributes:
        path: the container's name in the model; keys: the run's keys, in order; others: the
            container's other children (a first block that differs, as in T5), always kept.
    """

    path: str
    keys: tuple[str, ...]
    others: tuple[str, ...] = ()

    def prefix(self, key: str) -> str:
        return f"{self.path}.{key}." if self.path else f"{key}."

    @property
    def kept(self) -> tuple[str, str, str]:
        """Keys of the blocks analysed: the first, the representative (second), the last."""
        return self.keys[0], self.keys[1], self.keys[-1]

    @property
    def middle(self) -> tuple[str, ...]:
        """Keys of the blocks whose couplings are copies of the representative's."""
        return self.keys[2:-1]


def _signature(m: nn.Module | None) -> tuple | None:
    """Structure of a block (None for an empty slot of a container, which ends any run)."""
    if m is None:
        return None
    return (type(m),
            tuple((n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()),
            tuple((n, tuple(b.shape)) for n, b in m.named_buffers()),
            tuple((n, type(s)) for n, s in m.named_modules()))


def _longest_run(children: list[tuple[str, nn.Module]]) -> list[str]:
    """Keys of the longest run of consecutive structurally identical children with parameters."""
    best: list[str] = []
    run: list[str] = []
    prev = None
    for key, child in children:
        sig = _signature(child)
        if sig is None:  # ModuleList([block, None, ...]): a hole ends the run
            run, prev = [], None
            continue
        run = run + [key] if sig == prev else [key]
        prev = sig
        if len(run) > len(best) and sig[1]:
            best = list(run)
    return best


def _owned(model: nn.Module) -> dict[int, int]:
    """How many places of the module tree hold each parameter (shared modules, tied weights)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def find_stacks(model: nn.Module) -> list[Stack]:
    """In the outermost containers, the longest run of at least ``MIN_BLOCKS`` structurally
    identical children (same classes, parameter and buffer shapes all the way down) whose
    parameters live nowhere else: not shared between blocks, nor with a module outside the run
    (thinning would rename or drop them). Empty slots (None) of a container end a run."""
    out: list[Stack] = []
    taken: list[str] = []
    everywhere = _owned(model)
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < MIN_BLOCKS:
            continue
        if any(path == t or path.startswith(t + ".") for t in taken):
            continue
        children = list(mod._modules.items())
        run = _longest_run(children)
        if len(run) < MIN_BLOCKS:
            continue
        ids = [{id(p) for p in mod._modules[k].parameters()} for k in run]
        if len(set().union(*ids)) != sum(len(s) for s in ids):
            continue
        inside: dict[int, int] = {}
        for k in run:
            for _, p in mod._modules[k].named_parameters(remove_duplicate=False):
                inside[id(p)] = inside.get(id(p), 0) + 1
        if any(everywhere.get(i, 0) != n for i, n in inside.items()):
            continue
        out.append(Stack(path, tuple(run), tuple(k for k, _ in children if k not in run)))
        taken.append(path)
    return out


@contextlib.contextmanager
def thinned(model: nn.Module, stacks: list[Stack]) -> Iterator[nn.Module]:
    """``model`` with each stack reduced to its first, second and last block (same keys), restored
    on exit."""
    saved = []
    try:
        for s in stacks:
            container = model.get_submodule(s.path) if s.path else model
            saved.append((container, dict(container._modules)))
            keep = set(s.kept) | set(s.others)
            container._modules = {k: m for k, m in container._modules.items() if k in keep}
        yield model
    finally:
        for container, modules in saved:
            container._modules = modules


def _rename(name: str, src: str, dst: str) -> str:
    return dst + name[len(src):] if name.startswith(src) else name


def _renamed(c: Coupling, src: str, dst: str) -> Coupling:
    tables = tuple(SliceTable(_rename(t.param, src, dst), t.dim, t.unit, t.index, t.side) for t in c.tables)
    sites = tuple(Site(_rename(s.param, src, dst), s.dim, s.role, _rename(s.module + ".", src, dst)[:-1]
                       if s.module else s.module, s.layout, s.transposed) for s in c.sites)
    return c.replace(name=_rename_path(c.name, src, dst), tables=tables, sites=sites,
                     scope=_rename_path(c.scope, src, dst), group=_rename_path(c.group, src, dst))


def _rename_path(path: str, src: str, dst: str) -> str:
    return _rename(path + ".", src, dst)[:-1] if (path + ".").startswith(src) else path


def _inside(c: Coupling, prefix: str) -> bool:
    return all(t.param.startswith(prefix) for t in c.tables)


def _touches(c: Coupling, prefix: str) -> bool:
    return any(t.param.startswith(prefix) for t in c.tables)


def consistent(couplings: list[Coupling], stacks: list[Stack]) -> bool:
    """True when, in every stack, the first and the second block have the same couplings (names,
    kinds, widths, units, exactness) once renamed: the twins behave alike."""
    def key(c: Coupling, src: str, dst: str):
        r = _renamed(c, src, dst)
        return (r.name, r.kind, r.exact, r.width, tuple((t.param, t.dim, t.unit.tobytes(), t.index.tobytes())
                                                         for t in r.tables))

    for s in stacks:
        first, second = s.prefix(s.keys[0]), s.prefix(s.keys[1])
        a = sorted(key(c, first, second) for c in couplings if _inside(c, first))
        b = sorted(key(c, second, second) for c in couplings if _inside(c, second))
        if a != b:
            return False
    return True


def replicate(couplings: list[Coupling], stacks: list[Stack]) -> list[Coupling]:
    """The couplings of the full model from those of the thinned one (see the module docstring)."""
    out = list(couplings)
    for s in stacks:
        rep = s.prefix(s.keys[1])
        nxt: list[Coupling] = []
        block: list[Coupling] = []
        for c in out:
            if _inside(c, rep):
                block.append(c)
                continue
            if block:  # the representative's couplings end: its copies follow
                nxt += block + [_renamed(b, rep, s.prefix(k)) for k in s.middle for b in block]
                block = []
            if _touches(c, rep):  # spans blocks: the middle blocks' slices join it
                extra = [SliceTable(_rename(t.param, rep, s.prefix(k)), t.dim, t.unit, t.index, t.side)
                         for k in s.middle for t in c.tables if t.param.startswith(rep)]
                sites = [Site(_rename(x.param, rep, s.prefix(k)), x.dim, x.role,
                              _rename_path(x.module, rep, s.prefix(k)), x.layout, x.transposed)
                         for k in s.middle for x in c.sites if x.param.startswith(rep)]
                c = c.replace(tables=c.tables + tuple(extra), sites=c.sites + tuple(sites))
            nxt.append(c)
        if block:
            nxt += block + [_renamed(b, rep, s.prefix(k)) for k in s.middle for b in block]
        out = nxt
    return out

