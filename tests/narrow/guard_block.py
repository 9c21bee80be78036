"""A pruned attention block called again and again with calls that vary every property a captured
narrow program could specialise on (issue 17): argument aliasing, optional inputs, non-tensor
arguments, keyword order, grad mode and requires_grad, train/eval, strides, autocast, sizes,
module attributes, plain tensor attributes, buffers and hooks. Every call is compared with the
masked dense model given the same call. Used by tests/narrow/test_program_guards.py and by
bench/fuzz.py (property ``narrow_calls``)."""
from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

import ecospa
from tests.helpers import masked_copy, plan_units, rel_err

__all__ = ["GuardBlock", "Pair", "CallSpec", "BASE", "CHANGES", "call_specs", "pair", "run_calls", "check_call_sequence"]


class GuardBlock(nn.Module):
    """Cross-attention (q from ``x``, k/v from ``ctx``, ``ctx`` defaults to ``x``) whose forward
    reads a plain attribute (``temp``), a plain tensor attribute (``gain``), a buffer (``pos``),
    optional and keyword arguments, and behaves differently in train mode (deterministically)."""

    def __init__(self, d: int = 32, h: int = 4, maxlen: int = 8):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.temp = 1.0
        self.gain = torch.ones(())
        self.register_buffer("pos", torch.linspace(0.0, 0.5, maxlen))

    def forward(self, x, ctx=None, mask=None, *, causal: bool = False, scale: float = 1.0):
        ctx = x if ctx is None else ctx
        B, T, D = x.shape
        S = ctx.shape[1]
        q = self.q(x).view(B, T, self.h, D // self.h).transpose(1, 2)
        k = self.k(ctx).view(B, S, self.h, D // self.h).transpose(1, 2)
        v = self.v(ctx).view(B, S, self.h, D // self.h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (scale * self.temp / math.sqrt(D // self.h))
        att = att + self.pos[:S]
        if mask is not None:
            att = att + mask
        if causal:
            att = att.masked_fill(torch.ones(T, S, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        out = self.o(y) * self.gain
        if self.training:
            out = out * 2
        return x + out


class Outer(nn.Module):
    """The issue's model: the block called with one tensor for both arguments, then two."""

    def __init__(self):
        super().__init__()
        self.block = GuardBlock()

    def forward(self, x):
        return self.block(self.block(x, x), x)


@dataclass(frozen=True)
class CallSpec:
    """One call of the block and the changes made to both models before it."""

    B: int
    T: int
    S: int
    ctx: str  # "none" | "same" | "view" | "other"
    mask: bool
    causal: bool
    scale: float
    grad: bool
    train: bool
    contiguous: bool
    kw_order: bool
    autocast: bool
    temp: float | None  # set block.temp first
    gain: str  # "keep" | "inplace" | "new"
    buffer: str  # "keep" | "inplace" | "grow"
    hook: str  # "keep" | "add" | "remove"
    seed: int


BASE = dict(B=2, T=5, S=5, ctx="none", mask=False, causal=False, scale=1.0, grad=False, train=False,
            contiguous=True, kw_order=False, autocast=False, temp=None, gain="keep", buffer="keep",
            hook="keep", seed=0)
# per property, the values a call may take instead of BASE's
CHANGES = {
    "size": [dict(T=3, S=3), dict(B=1), dict(B=1, T=3, S=3)],
    "ctx": [dict(ctx="same"), dict(ctx="view"), dict(ctx="other", S=3), dict(ctx="other", S=2)],
    "mask": [dict(mask=True)], "causal": [dict(causal=True)], "scale": [dict(scale=0.5)],
    "grad": [dict(grad=True)], "train": [dict(train=True)], "contiguous": [dict(contiguous=False)],
    "kw_order": [dict(kw_order=True)], "autocast": [dict(autocast=True)],
    "temp": [dict(temp=0.7), dict(temp=1.0)], "gain": [dict(gain="inplace"), dict(gain="new")],
    "buffer": [dict(buffer="inplace"), dict(buffer="grow")], "hook": [dict(hook="add"), dict(hook="remove")],
}


@st.composite
def call_specs(draw) -> CallSpec:
    """A call that differs from :data:`BASE` in up to three properties (most calls then share a
    signature with earlier ones: a wrongly reused program has a chance to show)."""
    spec = dict(BASE, seed=draw(st.integers(0, 2**16)))
    for prop in draw(st.lists(st.sampled_from(sorted(CHANGES)), max_size=3, unique=True)):
        spec.update(draw(st.sampled_from(CHANGES[prop])))
    if spec["ctx"] in ("none", "same", "view"):
        spec["S"] = spec["T"]
    return CallSpec(**spec)


@dataclass
class Pair:
    """A pruned model and its masked dense reference, changed together."""

    pruned: Outer
    ref: Outer
    hooks: list


def pair(seed: int, ragged: bool) -> Pair:
    """An :class:`Outer` pruned with a random plan (ragged or uniform heads), called once as the
    issue did, and its masked dense reference."""
    torch.manual_seed(seed)
    model = Outer()
    x = torch.randn(2, 5, 32)
    cg = ecospa.auto_couple(model, (x,))
    rng = random.Random(seed)
    plan = {}
    for c in cg:
        k = rng.randrange(1, c.width) if ragged else c.width // 2
        plan[c] = sorted(rng.sample(range(c.width), k))
    ref = masked_copy(model, plan_units(plan, cg))
    ecospa.prune(model, plan)
    with torch.no_grad():
        got, want = model(x), ref(x)
    if rel_err(got, want) > 1e-4:
        raise AssertionError(f"the issue's double call differs: {rel_err(got, want):.1e}")
    return Pair(model, ref, [])


def _hook(module, args, out):
    return out * 1.5


def _prepare(p: Pair, spec: CallSpec) -> None:
    """The changes to both models that a call of ``spec`` starts with."""
    for m in (p.pruned.block, p.ref.block):
        if spec.temp is not None:
            m.temp = spec.temp
        if spec.gain == "inplace":
            m.gain.mul_(1.1)
        elif spec.gain == "new":
            m.gain = torch.full((), 0.9)
        if spec.buffer == "inplace":
            m.pos.add_(0.05)
        elif spec.buffer == "grow":
            m.pos = torch.linspace(0.0, 0.5, m.pos.numel() + 1)
        m.train(spec.train)
    if spec.hook == "add":
        p.hooks.append((p.pruned.block.o.register_forward_hook(_hook), p.ref.block.o.register_forward_hook(_hook)))
    elif spec.hook == "remove" and p.hooks:
        for h in p.hooks.pop():
            h.remove()


def _inputs(spec: CallSpec) -> tuple[dict, list]:
    g = torch.Generator().manual_seed(spec.seed)
    if spec.contiguous:
        x = torch.randn(spec.B, spec.T, 32, generator=g)
    else:
        x = torch.randn(spec.T, spec.B, 32, generator=g).transpose(0, 1)
    kwargs: dict = {}
    if spec.ctx == "same":
        kwargs["ctx"] = x
    elif spec.ctx == "view":
        kwargs["ctx"] = x[:, :]
    elif spec.ctx == "other":
        kwargs["ctx"] = torch.randn(spec.B, spec.S, 32, generator=g)
    if spec.mask:
        kwargs["mask"] = torch.randn(spec.T, spec.S, generator=g)
    kwargs["causal"] = spec.causal
    kwargs["scale"] = spec.scale
    if spec.kw_order:
        kwargs = dict(reversed(list(kwargs.items())))
    return {"x": x, **kwargs} if not spec.kw_order else {**kwargs, "x": x}, [x]


def run_calls(p: Pair, specs: list[CallSpec]) -> None:
    """Make each call on both models; every output (and, with gradients, the gradient of the
    input) must agree with the masked dense model's."""
    for i, spec in enumerate(specs):
        _prepare(p, spec)
        kwargs, (x,) = _inputs(spec)
        outs, grads = [], []
        for m in (p.pruned.block, p.ref.block):
            xx = x.detach().clone().requires_grad_(spec.grad) if spec.grad else x
            call_kwargs = {k: (xx if v is x else v) for k, v in kwargs.items()}
            if spec.ctx == "view":
                call_kwargs["ctx"] = xx[:, :]
            elif spec.ctx == "same":
                call_kwargs["ctx"] = xx
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if spec.autocast else contextlib.nullcontext()
            with torch.set_grad_enabled(spec.grad), amp:
                out = m(**call_kwargs)
            outs.append(out.float())
            if spec.grad:
                out.float().pow(2).mean().backward()
                grads.append(xx.grad)
        tol = 5e-2 if spec.autocast else 1e-4
        err = rel_err(outs[0].detach(), outs[1].detach())
        if not err <= tol:
            raise AssertionError(f"call {i} ({spec}) differs from the masked dense model: {err:.1e}")
        if spec.grad:
            gerr = rel_err(grads[0], grads[1])
            if not gerr <= tol * 10:
                raise AssertionError(f"call {i} ({spec}): the input gradient differs: {gerr:.1e}")


_POOL: dict[tuple[bool, int], Pair] = {}


def check_call_sequence(calls: list[CallSpec], heads: str, slot: int = 0, fresh: bool = False) -> None:
    """The fuzz property (bench/fuzz.py ``narrow_calls``): ``calls`` on a pruned pair kept across
    examples (``slot`` of three per head layout; ``fresh`` prunes a new one first), every call
    equal to the masked dense model's."""
    key = (heads == "ragged", slot)
    if fresh or key not in _POOL:
        _POOL[key] = pair(len(_POOL) * 7 + slot, heads == "ragged")
    run_calls(_POOL[key], calls)
