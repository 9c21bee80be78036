"""A plain dataclass argument (x-transformers' ``Intermediates`` holding ``cached_kv``) is a container:
flattened into its fields for the signature and the capture, rebuilt around the graph
(``ecospa/capture/datafields.py``), so a decode step that hands each attention its past keys and values
in such an object, and gets a new one back, runs narrow and exact. The past arrives at the dense
width and is gathered at the kept channels; the returned cache is rebuilt at the dense width from the
past as it came and the new keys scattered back (``Builder.dense_twin``), so the cache user code
holds equals the masked dense model's, for any past.

Refused (the exact fallback, with the field named): a dataclass holding state the graph cannot
update (a module, a list the callee appends to), and a forward that assigns a field of its argument.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.narrow.program import CallNotServable, signature
from tests.helpers import masked_copy, plan_units, random_plan, rel_err

H, D, DIM = 4, 8, 32


@dataclass
class Inter:
    """What an attention returns and is given back at the next step (x-transformers style)."""

    cached_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    scores: torch.Tensor | None = None
    layer_type: str | None = None


@dataclass
class Stateful:
    """A cache object with Python-side state: ``seen`` is appended to by the callee."""

    cached_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    seen: list | None = None


@dataclass
class WithModule:
    cached_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    norm: nn.Module | None = None


class Attn(nn.Module):
    """Causal attention ``(b, t, DIM) -> ((b, t, DIM), Inter)``; with ``cache`` the past keys and
    values are joined before the new ones (x-transformers' ``cat((ck, k), dim=-2)``)."""

    def __init__(self, assign: bool = False):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, H * D) for _ in range(3))
        self.o = nn.Linear(H * D, DIM)
        self.assign = assign

    def forward(self, x: torch.Tensor, cache=None):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, H, D).transpose(1, 2) for f in (self.q, self.k, self.v))
        if cache is not None:
            ck, cv = cache.cached_kv
            k, v = torch.cat((ck, k), dim=-2), torch.cat((cv, v), dim=-2)
            if isinstance(getattr(cache, "seen", None), list):
                cache.seen.append(t)
            if self.assign:
                cache.layer_type = "seen"
        n = k.shape[-2]
        mask = torch.ones(t, n, dtype=torch.bool).tril(n - t)
        scores = (q @ k.transpose(-1, -2)) / D ** 0.5
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.o(out.transpose(1, 2).reshape(b, t, H * D))
        return out, Inter(cached_kv=(k, v), scores=scores, layer_type="a")


class Model(nn.Module):
    def __init__(self, layers: int = 2, assign: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Attn(assign) for _ in range(layers))

    def forward(self, x: torch.Tensor, caches=None):
        new = []
        for i, layer in enumerate(self.layers):
            y, inter = layer(x, cache=caches[i] if caches is not None else None)
            x = x + y
            new.append(inter)
        return x, new


def _pruned(model: nn.Module, seed: int = 0):
    x = torch.randn(2, 6, DIM)
    plan = random_plan(ecospa.auto_couple(model, (x,)), random.Random(seed), frac=0.5)
    masked = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan)
    return model, masked


def _decode(model, steps: torch.Tensor, prompt: torch.Tensor, make=Inter):
    """Prefill ``prompt``, then one token of ``steps`` at a time with the cache the model returned."""
    outs = []
    with torch.no_grad():
        y, inters = model(prompt)
        outs.append(y)
        for i in range(steps.shape[1]):
            caches = [make(cached_kv=c.cached_kv) for c in inters]
            y, inters = model(steps[:, i:i + 1], caches)
            outs.append(y)
    return outs, inters


def _calls(model) -> tuple[int, int, list]:
    reps = [r for r in ecospa.execution_report(model) if r.path.startswith("layers.")]
    return (sum(r.narrow_calls for r in reps), sum(r.fallback_calls for r in reps),
            sorted({x for r in reps for x in r.reasons}))


def test_a_dataclass_cache_decodes_narrow_and_exact():
    torch.manual_seed(0)
    model, masked = _pruned(Model().eval())
    prompt, steps = torch.randn(2, 5, DIM), torch.randn(2, 4, DIM)
    ref, ref_inters = _decode(masked, steps, prompt)
    got, inters = _decode(model, steps, prompt)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= 1e-5
    for a, b in zip(inters, ref_inters):  # the cache the caller holds: the dense width, as the masked model's
        assert isinstance(a, Inter) and a.layer_type == "a"
        for t, r in zip(a.cached_kv, b.cached_kv):
            assert t.shape == r.shape and rel_err(t, r) <= 1e-5
    narrow, fallback, reasons = _calls(model)
    assert fallback == 0 and narrow == 2 * (1 + steps.shape[1]), reasons


def test_a_past_with_nonzero_removed_channels_is_returned_as_it_came():
    """The fallback keeps whatever the past holds at the removed channels (the masked model
    would too): the narrow graph's returned cache rebuilds them from the past, not as zeros."""
    torch.manual_seed(1)
    model, masked = _pruned(Model(layers=1).eval(), seed=1)
    x = torch.randn(1, 1, DIM)
    past = Inter(cached_kv=(torch.randn(1, H, 5, D), torch.randn(1, H, 5, D)))
    with torch.no_grad():
        model(x, [past])  # the first call builds and checks the graph
        y, (inter,) = model(x, [past])
        y_ref, (inter_ref,) = masked(x, [past])
    assert _calls(model)[1] == 0
    for t, r in zip(inter.cached_kv, inter_ref.cached_kv):
        assert torch.equal(t[:, :, :5], r[:, :, :5])
        assert rel_err(t, r) <= 1e-5
    # the output reads the past only at the kept channels (the removed ones meet zeros)
    assert rel_err(y, y_ref) <= 1e-5


def test_the_signature_holds_the_class_and_the_field_values():
    mods = list(Attn().modules())
    x = torch.randn(1, 1, DIM)
    kv = (torch.randn(1, H, 3, D), torch.randn(1, H, 3, D))
    sig, tensors = signature(mods, (x,), {"cache": Inter(cached_kv=kv, layer_type="a")})
    assert len(tensors) == 3 and tensors[1] is kv[0] and tensors[2] is kv[1]
    assert signature(mods, (x,), {"cache": Inter(cached_kv=kv, layer_type="a")})[0] == sig
    assert signature(mods, (x,), {"cache": Inter(cached_kv=kv, layer_type="b")})[0] != sig
    assert signature(mods, (x,), {"cache": Inter(cached_kv=kv, scores=x)})[0] != sig


@pytest.mark.parametrize("make, field", [(lambda **kw: Stateful(seen=[], **kw), "seen"),
                                          (lambda **kw: WithModule(norm=nn.LayerNorm(2), **kw), "norm")])
def test_a_dataclass_holding_state_runs_the_fallback_and_says_which_field(make, field):
    mods = list(Attn().modules())
    kv = (torch.randn(1, H, 3, D), torch.randn(1, H, 3, D))
    with pytest.raises(CallNotServable, match=f"field '{field}'"):
        signature(mods, (torch.randn(1, 1, DIM),), {"cache": make(cached_kv=kv)})
    torch.manual_seed(2)
    model, masked = _pruned(Model().eval())
    prompt, steps = torch.randn(1, 4, DIM), torch.randn(1, 2, DIM)
    got, _ = _decode(model, steps, prompt, make=make)
    ref, _ = _decode(masked, steps, prompt, make=make)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, ref))
    narrow, fallback, reasons = _calls(model)
    assert fallback == 2 * steps.shape[1] and any(f"field '{field}'" in r for r in reasons), reasons
    cache = make(cached_kv=kv)
    if isinstance(cache, Stateful):  # the callee's append is seen: the module's own forward ran
        with torch.no_grad():
            model.layers[0](torch.randn(1, 1, DIM), cache=cache)
        assert cache.seen == [1]


def test_a_forward_that_assigns_a_field_of_its_argument_runs_the_fallback():
    torch.manual_seed(3)
    model, masked = _pruned(Model(assign=True).eval())
    prompt, steps = torch.randn(1, 4, DIM), torch.randn(1, 2, DIM)
    got, _ = _decode(model, steps, prompt)
    ref, _ = _decode(masked, steps, prompt)
    assert all(rel_err(a, b) <= 1e-5 for a, b in zip(got, ref))
    narrow, fallback, reasons = _calls(model)
    assert fallback == 2 * steps.shape[1] and any("assigns Inter.layer_type" in r for r in reasons), reasons
    cache = Inter(cached_kv=(torch.randn(1, H, 3, D), torch.randn(1, H, 3, D)))
    with torch.no_grad():
        model.layers[0](torch.randn(1, 1, DIM), cache=cache)
    assert cache.layer_type == "seen"  # not lost: the module's own forward ran


def test_the_dataclass_class_itself_is_not_registered_with_pytree():
    import torch.utils._pytree as pytree

    mods = list(Attn().modules())
    signature(mods, (torch.randn(1, 1, DIM),), {"cache": Inter(cached_kv=(torch.randn(1, H, 3, D),) * 2)})
    assert Inter not in pytree.SUPPORTED_NODES
    assert pytree.tree_leaves(Inter())[0].__class__ is Inter
