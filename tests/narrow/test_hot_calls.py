"""The per-call shortcuts of narrow decoding: a call that repeats the last one's cache, layer,
signature and entry skips the lookup (``CachedGraphs.lane``, ``narrow/lane.py``), and narrow graphs call their
ATen operators directly (``narrow/fastcall.py``). Neither may change a result: decoding two
caches in turn, pruning again between steps, and the graphs' own outputs are compared with the
masked dense model and with ``torch.fx``'s own forward. (A new round of pruning gives the region
a new entries dict and a new ``CachedGraphs``: the remembered call cannot outlive it.)
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

import ecospa
from ecospa.narrow import fastcall
from ecospa.narrow.entry import Entry
from tests.narrow.test_cached import _all_narrow, _pruned, _rel

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _step(model, token, cache):
    with torch.no_grad():
        out = model(token, cache=cache)
    return out.logits, out.cache


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_caches_decoded_in_turn_stay_exact(arch):
    """Each call switches cache object, so the remembered call never matches: every step takes
    the full lookup, and both streams equal the masked dense model's."""
    model, ref, x = _pruned(arch, "ragged", seed=3)
    a, b = x[:1], x[1:]
    la, ca = _step(model, a, None)
    lb, cb = _step(model, b, None)
    ra, rca = _step(ref, a, None)
    rb, rcb = _step(ref, b, None)
    for i in range(4):
        ta, tb = torch.full((1, 1), 5 + i), torch.full((1, 1), 40 + i)
        la, ca = _step(model, ta, ca)
        ra, rca = _step(ref, ta, rca)
        lb, cb = _step(model, tb, cb)
        rb, rcb = _step(ref, tb, rcb)
        assert _rel(la, ra) <= TOL and _rel(lb, rb) <= TOL, i
    _all_narrow(model)


def test_the_remembered_call_does_not_keep_a_cache_alive():
    model, _, x = _pruned("llama", "uniform")
    with torch.no_grad():
        out = model(x)
        out = model(torch.full((2, 1), 9), cache=out.cache)
    ref = weakref.ref(out.cache)
    del out
    gc.collect()
    assert ref() is None


def test_bound_graphs_compute_what_fx_forward_computes():
    """Every narrow graph a decoding step runs, on that step's own inputs: its bound forward and
    ``torch.fx``'s own (after ``recompile``) give equal outputs."""
    model, _, x = _pruned("llama", "ragged", seed=2)
    with torch.no_grad():
        out = model(x)
        out = model(torch.full((2, 1), 4), cache=out.cache)
    entries = [o for o in gc.get_objects() if isinstance(o, Entry) and o.gm is not None]
    calls = []
    for entry in entries:
        cls = type(entry.gm)
        assert cls.forward.__code__.co_filename.startswith("<ecospa narrow graph"), entry.gm.code

        def record(self, *args, _bound=cls.forward):
            calls.append((self, _bound, [a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
            return _bound(self, *args)
        cls.forward = record
    with torch.no_grad():
        model(torch.full((2, 1), 6), cache=out.cache)
    assert calls
    for gm, bound, args in calls:
        got = bound(gm, *args)
        gm.recompile()  # torch.fx's own forward back
        want = gm.forward(*args)
        fastcall.bind(gm)
        for u, v in zip(got, want):
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v)
