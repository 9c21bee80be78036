"""KV caches that research code keeps in module buffers, written in place each step (issue 19,
item 2): litgpt's ``index_copy_`` at ``input_pos``, torchtune's ``k_cache[:, :, cache_pos] = k``
with a position counter and an ``assert`` on it, slice assignment ``cache[:, :, s:e] = k``. Pruned
regions decode narrow (``execution_report``), the buffer at its dense width, and every step's
logits equal the masked dense model's (fp32, rel err <= 1e-5).

PYTEST_DONT_REWRITE: the ``assert`` in the models' forward must stay a plain ``assert`` statement
(pytest's rewrite turns it into an ``if``, which a capture treats as data-dependent control flow).
"""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from tests.helpers import masked_copy, plan_units


@pytest.fixture(autouse=True)
def serve_stored(monkeypatch):
    """The narrow path for caches kept in module buffers is off by default (slower than the
    fallback while the cache keeps its dense width: ``narrow/stored.py``): these tests keep it
    exact for when it is on."""
    from ecospa.narrow import stored

    monkeypatch.setattr(stored, "SERVE", True)

TOL = 1e-5
D, H, T_MAX = 32, 4, 24


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _rotate_pairs(x):  # the interleaved layout: (2i, 2i + 1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([-b, a], dim=-1).flatten(-2)


class BufferCacheAttention(nn.Module):
    """An attention block whose cache lives in buffers it writes in place (``style``):
    ``index_copy``: ``k[:b].index_copy_(2, pos, k)`` (litgpt); ``index_put``: ``k[:, :, cache_pos[:t]]
    = k`` with a counter buffer advanced by ``add_`` and an ``assert`` on it (torchtune);
    ``slice``: ``k[:b, :, start:start + t] = k`` at an int ``start``."""

    def __init__(self, style: str, kv: int = H, rotary: str | None = None):
        super().__init__()
        self.style, self.kv, self.hd, self.rotary = style, kv, D // H, rotary
        self.q = nn.Linear(D, H * self.hd)
        self.k = nn.Linear(D, kv * self.hd)
        self.v = nn.Linear(D, kv * self.hd)
        self.o = nn.Linear(H * self.hd, D)

    def setup_cache(self, batch: int) -> None:
        shape = (batch, self.kv, T_MAX, self.hd)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("cache_pos", torch.arange(T_MAX), persistent=False)

    def _rope(self, x, pos):
        if self.rotary is None:
            return x
        inv = 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd)
        ang = pos.float()[:, None] * inv[None, :]
        if self.rotary == "half":
            ang = torch.cat([ang, ang], -1)
            return x * ang.cos() + _rotate_half(x) * ang.sin()
        ang = ang.repeat_interleave(2, -1)
        return x * ang.cos() + _rotate_pairs(x) * ang.sin()

    def forward(self, x, pos, start: int = 0):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, H, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = self._rope(q, pos), self._rope(k, pos)
        if self.style == "index_copy":
            keys = self.k_cache[:b].index_copy_(2, pos, k)
            vals = self.v_cache[:b].index_copy_(2, pos, v)
        elif self.style == "index_put":
            assert (self.cache_pos[0] + t) <= self.k_cache.shape[2]
            self.k_cache[:, :, self.cache_pos[:t]] = k
            self.v_cache[:, :, self.cache_pos[:t]] = v
            self.cache_pos.add_(t)
            keys, vals = self.k_cache, self.v_cache
        else:
            self.k_cache[:b, :, start:start + t] = k
            self.v_cache[:b, :, start:start + t] = v
            keys, vals = self.k_cache[:b], self.v_cache[:b]
        mask = torch.arange(keys.shape[2])[None, :] <= pos[:, None]
        keys = keys.repeat_interleave(H // self.kv, dim=1)
        vals = vals.repeat_interleave(H // self.kv, dim=1)
        scores = q @ keys.transpose(-1, -2) / math.sqrt(self.hd)
        att = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return self.o((att @ vals).transpose(1, 2).reshape(b, t, H * self.hd))


class TinyLM(nn.Module):
    def __init__(self, style: str, kv: int = H, rotary: str | None = None, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.blocks = nn.ModuleList(BufferCacheAttention(style, kv, rotary) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(layers))  # the residual stays dense
        self.head = nn.Linear(D, 50)

    def setup_cache(self, batch: int) -> None:
        for blk in self.blocks:
            blk.setup_cache(batch)

    def forward(self, ids, pos, start: int = 0):
        h = self.emb(ids)
        for blk, norm in zip(self.blocks, self.norms):
            h = h + blk(norm(h), pos, start)
        return self.head(h)


def _plan(cg, kind: str, rng: random.Random) -> dict:
    plan = {}
    for c in cg:
        if c.width < 2:
            continue
        n = c.width // 2 if kind == "uniform" else rng.randint(1, c.width - 1)
        plan[c] = sorted(rng.sample(range(c.width), n))
    return plan


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def _decode(model, ids, steps: int, style: str):
    """Prefill ``ids`` then ``steps`` greedy steps; the logits of every call."""
    out = []
    b, t = ids.shape
    with torch.no_grad():
        logits = model(ids, torch.arange(t), 0)
        out.append(logits)
        for i in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, torch.tensor([t + i]), t + i)
            out.append(logits)
    return out


def _pruned(style, kind, kv=H, rotary=None, seed=0, discover_with_cache=True):
    torch.manual_seed(seed)
    model = TinyLM(style, kv, rotary).eval()
    ids = torch.randint(0, 50, (2, 6))
    if discover_with_cache:  # the buffers exist during discovery: the writes into them stay exact
        model.setup_cache(2)
    cg = ecospa.auto_couple(model, (ids, torch.arange(6)))
    assert [c for c in cg if c.kind == "qk"] and [c for c in cg if c.kind == "vo"], cg.summary()
    plan = _plan(cg, kind, random.Random(seed))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    model.setup_cache(2)
    ref.setup_cache(2)
    return model, ref, ids


def _assert_narrow(model):
    rep = [r for r in ecospa.execution_report(model) if "blocks" in r.path]
    assert rep and all(r.narrow_calls > 0 and r.fallback_calls == 0 for r in rep), \
        [(r.path, r.narrow_calls, r.fallback_calls, r.reasons) for r in rep]


@pytest.mark.parametrize("style", ["index_copy", "index_put"])
@pytest.mark.parametrize("kind", ["uniform", "ragged"])
@pytest.mark.parametrize("kv,rotary", [(H, None), (2, "half"), (1, "pairs")])
def test_buffer_cache_decodes_narrow_and_exact(style, kind, kv, rotary):
    model, ref, ids = _pruned(style, kind, kv, rotary, discover_with_cache=True)
    got, want = _decode(model, ids, 6, style), _decode(ref, ids, 6, style)
    for step, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) <= TOL, (step, _rel(g, w))
    _assert_narrow(model)
    for blk, rblk in zip(model.blocks, ref.blocks):  # the cache, dense width, holds what the dense model's does
        assert blk.k_cache.shape == rblk.k_cache.shape
        assert _rel(blk.k_cache, rblk.k_cache) <= TOL and _rel(blk.v_cache, rblk.v_cache) <= TOL
        if style == "index_put":
            assert torch.equal(blk.cache_pos, rblk.cache_pos)  # advanced once per call, check included


def test_slice_assignment_at_an_int_start_decodes_narrow_and_exact():
    model, ref, ids = _pruned("slice", "uniform", 2, "half")
    got, want = _decode(model, ids, 2, "slice"), _decode(ref, ids, 2, "slice")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    _assert_narrow(model)


def test_reallocated_cache_is_used():
    """The model allocates its cache again (``setup_caches`` anew): the graph writes into the new
    buffer (placeholders are fed the live buffers)."""
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half")
    _decode(model, ids, 2, "index_copy")
    _decode(ref, ids, 2, "index_copy")
    model.setup_cache(2)
    ref.setup_cache(2)
    got, want = _decode(model, ids[:, :4], 3, "index_copy"), _decode(ref, ids[:, :4], 3, "index_copy")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    assert model.blocks[0].k_cache.abs().sum() > 0
    _assert_narrow(model)


def test_failing_assert_still_raises():
    """The ``assert`` on the counter became a runtime check of the graph: overflowing the cache
    still raises instead of writing out of range silently."""
    model, _, ids = _pruned("index_put", "uniform")
    with torch.no_grad():
        model(ids, torch.arange(6))
        _assert_narrow(model)
        with pytest.raises(Exception):
            for i in range(T_MAX):
                model(ids, torch.arange(6) + 6 * (i + 1))


def _litgpt_config(**kw):
    from litgpt.config import Config
    return Config(block_size=64, vocab_size=256, padded_vocab_size=256, n_layer=2, n_head=4, n_embd=64,
                  intermediate_size=128, rotary_percentage=0.25, **kw)


@pytest.mark.parametrize("groups", [4, 2])
def test_litgpt_kv_cache_decodes_narrow(groups):
    pytest.importorskip("litgpt")
    from litgpt.model import GPT
    torch.manual_seed(0)
    model = GPT(_litgpt_config(n_query_groups=groups)).eval()
    x = torch.randint(0, 256, (2, 8))
    cg = ecospa.auto_couple(model, (x,))
    plan = _plan(cg, "uniform", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    for m in (model, ref):
        m.max_seq_length = 32
        m.set_kv_cache(batch_size=2)
    with torch.no_grad():
        for step in range(6):
            if step == 0:
                inp, pos = x, torch.arange(8)
            else:
                inp, pos = x[:, step:step + 1], torch.tensor([7 + step])
            assert _rel(model(inp, input_pos=pos), ref(inp, input_pos=pos)) <= TOL, step
    rep = ecospa.execution_report(model)
    assert all(r.narrow_calls > 0 and r.fallback_calls == 0 for r in rep if r.path.endswith("attn")), \
        [(r.path, r.narrow_calls, r.fallback_calls, r.reasons) for r in rep]


def test_torchtune_kv_cache_decodes_narrow():
    pytest.importorskip("torchtune")
    from torchtune.models.llama3 import llama3
    torch.manual_seed(0)
    model = llama3(vocab_size=256, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=256,
                   intermediate_dim=128, rope_base=10000).eval()
    x = torch.randint(0, 256, (2, 8))
    cg = ecospa.auto_couple(model, (x,))
    plan = _plan(cg, "uniform", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    for m in (model, ref):
        m.setup_caches(batch_size=2, dtype=torch.float32, decoder_max_seq_len=32)
    causal = torch.tril(torch.ones(32, 32, dtype=torch.bool))
    with torch.no_grad():
        for step in range(6):
            if step == 0:
                inp, s, e = x, 0, 8
            else:
                inp, s, e = x[:, step:step + 1], 7 + step, 8 + step
            kw = dict(mask=causal[None, s:e].expand(2, e - s, 32), input_pos=torch.arange(s, e).expand(2, e - s))
            assert _rel(model(inp, **kw), ref(inp, **kw)) <= TOL, step
    rep = ecospa.execution_report(model)
    assert all(r.narrow_calls > 0 and r.fallback_calls == 0 for r in rep if r.path.endswith("attn")), \
        [(r.path, r.narrow_calls, r.fallback_calls, r.reasons) for r in rep]


class CatCache(nn.Module):
    """``self.k_cache = torch.cat([self.k_cache, k], 2)``: a cache grown by re-assigning the buffer.
    Not served narrow yet (the graph cannot assign the buffer back): it must stay exact."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.reset()

    def reset(self):
        self.register_buffer("k_cache", torch.zeros(2, H, 0, D // H), persistent=False)
        self.register_buffer("v_cache", torch.zeros(2, H, 0, D // H), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, H, D // H).transpose(1, 2) for lin in (self.q, self.k, self.v))
        self.k_cache = torch.cat([self.k_cache, k], 2)
        self.v_cache = torch.cat([self.v_cache, v], 2)
        att = F.softmax(q @ self.k_cache.transpose(-1, -2) / math.sqrt(D // H), -1)
        return self.o((att @ self.v_cache).transpose(1, 2).reshape(b, t, D))


def test_cat_onto_a_reassigned_buffer_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(D), CatCache()).eval()
    x = torch.randn(2, 5, D)
    cg = ecospa.auto_couple(model, (x,))
    plan = _plan(cg, "uniform", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    for m in (model, ref):
        m[1].reset()
    with torch.no_grad():
        for step in range(4):
            inp = x if step == 0 else x[:, step:step + 1]
            assert _rel(model(inp), ref(inp)) <= TOL, step


def test_by_default_buffer_caches_run_the_fallback_and_say_why(monkeypatch):
    from ecospa.narrow import stored

    monkeypatch.setattr(stored, "SERVE", False)
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half", discover_with_cache=True)
    got, want = _decode(model, ids, 3, "index_copy"), _decode(ref, ids, 3, "index_copy")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    rep = ecospa.execution_report(model)
    assert rep and all(r.narrow_calls == 0 and r.fallback_calls > 0 for r in rep)
    assert all(any("KV cache in a module buffer" in w for w in r.reasons) for r in rep), [r.reasons for r in rep]
