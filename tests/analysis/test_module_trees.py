"""Discovery survives any module tree (issue 20): ``None`` entries in containers (x-transformers
holds them in every layer), nested containers, ``ModuleDict``, a module at two places, a module
called several times. Each model gives the couplings of the full analysis (no block reuse), the
expected heads, and prunes exactly."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import ecospa
from ecospa.analysis.blocks import find_stacks
from ecospa.analysis.discover import discover
from tests.helpers import assert_pruned_equals_masked, random_plan
from tests.zoo.blocks import NanoGPTBlock

D, H = 16, 2


def _block():
    return NanoGPTBlock(D, H)


class XStyle(nn.Module):
    """x-transformers' layout: each layer is ``ModuleList([norms, block, residual])`` and
    ``norms`` is ``ModuleList([norm, None, None])``."""

    def __init__(self, depth=4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([nn.ModuleList([nn.LayerNorm(D), None, None]), _block(), nn.Identity()])
            for _ in range(depth))

    def forward(self, x):
        for (norms, block, residual) in self.layers:
            pre, post, _ = norms
            y = block(pre(x))
            x = residual(y) if post is None else post(y)
        return x


class Holes(nn.Module):
    """Blocks with empty slots between them (a layer dropped by setting it to None)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_block(), None, _block(), _block(), None, _block(), _block(), _block(),
                                     _block()])

    def forward(self, x):
        for b in self.blocks:
            if b is not None:
                x = b(x)
        return x


class Nested(nn.Module):
    """Containers inside containers: a Sequential of ModuleLists of blocks."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(*(nn.ModuleList([_block(), _block()]) for _ in range(4)))

    def forward(self, x):
        for stage in self.stages:
            for b in stage:
                x = b(x)
        return x


class Dict(nn.Module):
    """Blocks in a ModuleDict, called by key."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({f"layer_{i}": _block() for i in range(5)})

    def forward(self, x):
        for key in self.blocks:
            x = self.blocks[key](x)
        return x


class SharedInStack(nn.Module):
    """The same block object at every position of a stack (ALBERT-style sharing)."""

    def __init__(self):
        super().__init__()
        shared = _block()
        self.blocks = nn.ModuleList([shared] * 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class SharedOutside(nn.Module):
    """A stack whose second block also lives outside the stack (and runs there too)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_block() for _ in range(5)])
        self.extra = self.blocks[1]

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.extra(x)


class Reentrant(nn.Module):
    """Every block of a stack called twice per forward."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_block() for _ in range(4)])

    def forward(self, x):
        for _ in range(2):
            for b in self.blocks:
                x = b(x)
        return x


MODELS = {"x_style": XStyle, "holes": Holes, "nested": Nested, "module_dict": Dict,
          "shared_in_stack": SharedInStack, "shared_outside": SharedOutside, "reentrant": Reentrant}
# distinct attention blocks, hence qk couplings (one per head), in each model
BLOCKS = {"x_style": 4, "holes": 7, "nested": 8, "module_dict": 5, "shared_in_stack": 1,
          "shared_outside": 5, "reentrant": 4}


def _key(cg):
    return [(c.name, c.kind, c.exact, c.reason, c.width,
             sorted((t.param, t.dim, t.unit.tolist(), t.index.tolist()) for t in c.tables)) for c in cg.all]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_module_tree(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = (torch.randn(2, 5, D),)
    find_stacks(model)  # must not fail on None entries, nesting or sharing
    fast = discover(model, x, include_inexact=True)
    full = discover(model, x, include_inexact=True, reuse_blocks=False)
    assert _key(fast) == _key(full)
    assert len([c for c in fast if c.kind == "qk"]) == BLOCKS[name] * H, fast.summary()
    cg = ecospa.auto_couple(model, x)
    assert_pruned_equals_masked(model, x, random_plan(cg, random.Random(0)), cg=cg,
                                check_inputs=[(torch.randn(1, 3, D),)])


def test_stacks_skip_holes_and_shared_blocks():
    holes = find_stacks(Holes())
    assert [(s.path, s.keys) for s in holes] == [("blocks", ("5", "6", "7", "8"))]
    assert find_stacks(SharedInStack()) == []
    assert find_stacks(SharedOutside()) == []  # thinning would rename blocks.1's parameters
    assert [s.path for s in find_stacks(Reentrant())] == ["blocks"]
