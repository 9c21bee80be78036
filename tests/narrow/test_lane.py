"""The decode lane (``ecospa.narrow.lane``): a call that repeats the last one's signature skips
the lookup where the last entry's checks pass. Its key must tell apart every pair of calls whose
signatures differ (a property test against ``program.signature``); the lane must serve the steps
of a decode loop without the full lookup, and every change a signature or an entry's checks would
see (a hook, train/eval, grad mode, another cache, a new round of pruning, a module attribute the
capture read) must send the call back to the full lookup, with results equal to the masked dense
model's."""
from __future__ import annotations

import dataclasses
import gc
import weakref
from typing import Any

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ecospa.narrow import cached, forward, program
from ecospa.narrow.lane import fingerprint
from tests.narrow.test_cached import _all_narrow, _pruned, _rel

TOL = 1e-5
CACHE = object()  # stands for the cache argument (its contents are never read)


@dataclasses.dataclass
class _Fields:  # a plain dataclass argument, as x-transformers' Intermediates
    a: Any = None
    b: Any = None


# ----------------------------------------------------------------------------- the key
_base = torch.arange(24.0).reshape(2, 3, 4)
_tensors = [
    _base, _base.clone(), _base[:1], _base.transpose(1, 2), _base.to(torch.float64),
    _base.clone().requires_grad_(), torch.zeros(2, 3, 5), torch.zeros(3), _base.expand(2, 3, 4)[:, :, :2],
    torch.nn.Parameter(torch.zeros(3)),
]
_plain = [None, True, False, 0, 1, 1.0, 2.5, "a", "b", torch.float32, torch.float16]


@st.composite
def _call(draw, pool):
    """``(args, kwargs)`` made of tensors from ``pool`` (shared between the two calls compared,
    so that the same tensor may come twice: aliasing), plain values, tuples and the cache."""
    def leaf():
        if draw(st.booleans()):
            return draw(st.sampled_from(pool))
        return draw(st.sampled_from(_plain))

    def value():
        k = draw(st.integers(0, 6))
        if k == 0:
            return tuple(leaf() for _ in range(draw(st.integers(0, 3))))
        if k == 1:
            return CACHE
        if k == 2:
            first = tuple(leaf() for _ in range(draw(st.integers(0, 2)))) if draw(st.booleans()) else leaf()
            return _Fields(first, leaf())
        return leaf()
    args = tuple(value() for _ in range(draw(st.integers(0, 3))))
    names = draw(st.lists(st.sampled_from("abcd"), unique=True, max_size=4))
    return args, {n: value() for n in names}


def _sig(args, kwargs):
    swap = lambda v: None if v is CACHE else v  # noqa: E731  (as cached._without does)
    return program.signature([], tuple(map(swap, args)), {k: swap(v) for k, v in kwargs.items()})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_equal_keys_mean_equal_signatures(data):
    pool = data.draw(st.lists(st.sampled_from(_tensors), min_size=1, max_size=4))
    a, b = data.draw(_call(pool)), data.draw(_call(pool))
    fa, fb = fingerprint(*a, CACHE, []), fingerprint(*b, CACHE, [])
    sa, ta = _sig(*a)
    sb, tb = _sig(*b)
    assert fa is not None and fb is not None  # every argument here is one the key covers
    # the key's tensors are the signature's, in the signature's order
    assert all(x is y for x, y in zip(fa[1], ta)) and len(fa[1]) == len(ta)
    if fa[0] == fb[0]:
        assert sa == sb
    assert fingerprint(*a, CACHE, [])[0] == fa[0]  # the same call twice is recognised


def test_the_key_covers_modes_and_refuses_what_it_cannot_compare():
    x = torch.zeros(2, 3)
    mods = [torch.nn.Linear(2, 2)]
    key = fingerprint((x,), {"c": CACHE}, CACHE, mods)[0]
    with torch.no_grad():
        assert fingerprint((x,), {"c": CACHE}, CACHE, mods)[0] != key
    mods[0].eval()
    assert fingerprint((x,), {"c": CACHE}, CACHE, mods)[0] != key
    mods[0].train()
    assert fingerprint((x,), {"c": CACHE}, CACHE, mods)[0] == key
    assert fingerprint((x,), {"c": object()}, CACHE, mods) is None  # another object where the cache was
    assert fingerprint((x, {"k": x}), {}, CACHE, mods) is None  # a dict: the full lookup
    assert fingerprint(((x, (x,)),), {}, CACHE, mods) is None  # nested containers: the full lookup
    assert fingerprint((mods[0],), {}, CACHE, mods) is None  # a module argument: the full lookup
    assert fingerprint((_Fields([x], 1),), {}, CACHE, mods) is None  # a dataclass holding a list
    odd = _Fields(x, 1)
    odd.extra = 2
    assert fingerprint((odd,), {}, CACHE, mods) is None  # ... or an attribute that is not a field


# ----------------------------------------------------------------------------- decoding
def _step(model, token, cache):
    with torch.no_grad():
        out = model(token, cache=cache)
    return out.logits, out.cache


def _count_lookups(monkeypatch, where=cached) -> list:
    """Calls of the full lookup (the signature ``where`` computes: ``cached`` for calls with a
    cache object, ``forward`` for the others), recorded."""
    calls = []
    real = where.signature

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(where, "signature", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decode_steps_take_the_lane_and_stay_exact(arch, monkeypatch):
    model, ref, x = _pruned(arch, "ragged", seed=5)
    lookups = _count_lookups(monkeypatch)
    got, cache = _step(model, x, None)
    want, rcache = _step(ref, x, None)
    for i in range(5):
        tok = torch.full((2, 1), 7 + i)
        before = len(lookups)
        got, cache = _step(model, tok, cache)
        want, rcache = _step(ref, tok, rcache)
        assert _rel(got, want) <= TOL, i
        if i >= 2:  # prefill, then the first decode step, looked up; the later steps take the lane
            assert len(lookups) == before, i
    _all_narrow(model)


def test_every_change_a_signature_sees_leaves_the_lane(monkeypatch):
    """After each change the step is looked up again (not served by the lane's entry) and the
    result equals the masked dense model's under the same change."""
    model, ref, x = _pruned("llama", "uniform", seed=1)
    lookups = _count_lookups(monkeypatch)
    got, cache = _step(model, x, None)
    want, rcache = _step(ref, x, None)
    tok = iter(range(10, 60))

    def step(expect_lookup: bool):
        nonlocal cache, rcache
        t = torch.full((2, 1), next(tok))
        before = len(lookups)
        a, cache = _step(model, t, cache)
        b, rcache = _step(ref, t, rcache)
        assert _rel(a, b) <= TOL
        assert (len(lookups) > before) is expect_lookup

    step(True)
    step(False)
    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    rattn = [m for n, m in ref.named_modules() if n.endswith("self_attn")]

    def double(mod, args, out):
        return out * 2
    handles = [m.q_proj.register_forward_hook(double) for m in attn + rattn]  # a hook on a submodule
    step(True)
    for h in handles:
        h.remove()
    step(True)
    step(False)
    for m in attn + rattn:  # a module attribute the capture read
        m.scaling = m.scaling * 0.5
    step(True)
    step(False)
    model.train(), ref.train()  # train/eval (no dropout in this config: same results)
    step(True)
    model.eval(), ref.eval()
    step(True)
    step(False)


def test_a_new_cache_or_a_cropped_one_leaves_the_lane():
    model, ref, x = _pruned("qwen2", "ragged", seed=4)
    got, cache = _step(model, x, None)
    want, rcache = _step(ref, x, None)
    for i in range(3):
        got, cache = _step(model, torch.full((2, 1), 3 + i), cache)
        want, rcache = _step(ref, torch.full((2, 1), 3 + i), rcache)
    cache.crop(-3), rcache.crop(-3)  # a shorter past, the same layer objects
    for i in range(3):
        got, cache = _step(model, torch.full((2, 1), 20 + i), cache)
        want, rcache = _step(ref, torch.full((2, 1), 20 + i), rcache)
        assert _rel(got, want) <= TOL, i
    fresh, _ = _step(model, x[:, :4], None)  # a new cache of another length
    assert _rel(fresh, _step(ref, x[:, :4], None)[0]) <= TOL
    _all_narrow(model)


def test_the_lane_holds_no_cache_layer_alive():
    model, _, x = _pruned("llama", "uniform")
    with torch.no_grad():
        out = model(x)
        for i in range(3):
            out = model(torch.full((2, 1), 9 + i), cache=out.cache)
    layers = [weakref.ref(layer) for layer in out.cache.layers]
    keys = [weakref.ref(layer.keys) for layer in out.cache.layers]
    del out
    gc.collect()
    assert all(r() is None for r in layers + keys)


# ----------------------------------------------------------------------------- plain calls
@pytest.mark.parametrize("style", ["index_copy", "index_put"])
def test_buffer_cache_decode_steps_take_the_lane_and_stay_exact(style, monkeypatch):
    """Research-style caches in module buffers: the calls of a decode loop repeat their
    signature and shapes, so after the first steps they skip the lookup; every step's logits
    equal the masked dense model's."""
    from tests.narrow.test_buffer_cache import _pruned as _buffer_model
    model, ref, ids = _buffer_model(style, "ragged", seed=2)
    lookups = _count_lookups(monkeypatch, forward)

    def decode(m):  # (``start`` stays 0: these styles read the position from ``pos``)
        out, t = [], ids.shape[1]
        with torch.no_grad():
            logits = m(ids, torch.arange(t))
            for i in range(6):
                out.append(logits)
                logits = m(logits[:, -1:].argmax(-1), torch.tensor([t + i]))
        return out
    got = decode(model)
    assert len(lookups) == 2 * 2  # two blocks: the prefill and the first decode step, then the lane
    want = decode(ref)
    assert all(_rel(a, b) <= TOL for a, b in zip(got, want))


def test_plain_calls_leave_the_lane_at_every_change(monkeypatch):
    """A model without cache objects called again and again with one input: after each change
    the call is looked up again, and the output equals the masked dense model's."""
    import random
    import ecospa
    from tests.helpers import masked_copy, plan_units
    from tests.narrow.test_buffer_cache import TinyLM, _plan
    torch.manual_seed(0)
    model = TinyLM("index_copy", rotary="half").eval()
    ids = torch.randint(0, 50, (2, 6))
    model.setup_cache(2)
    cg = ecospa.auto_couple(model, (ids, torch.arange(6)))
    plan = _plan(cg, "ragged", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    model.setup_cache(2), ref.setup_cache(2)
    lookups = _count_lookups(monkeypatch, forward)

    def call(expect_lookup: bool, grad: bool = False):
        before = len(lookups)
        with torch.set_grad_enabled(grad):
            a, b = model(ids, torch.arange(6)), ref(ids, torch.arange(6))
        assert _rel(a, b) <= TOL
        assert (len(lookups) > before) is expect_lookup

    call(True)
    call(False)
    call(True, grad=True)  # grad mode
    call(False, grad=True)
    call(True)
    handles = [m.blocks[0].q.register_forward_pre_hook(lambda mod, args: (args[0] * 3,)) for m in (model, ref)]
    call(True)  # a hook
    call(False)
    for h in handles:
        h.remove()
    call(True)
    model.blocks[0].q.train(), ref.blocks[0].q.train()  # train/eval of a submodule
    call(True)
    call(False)
    for m in (model, ref):  # an attribute the capture read: the rotary embedding off
        m.blocks[1].rotary = None
    call(True)
    call(False)
