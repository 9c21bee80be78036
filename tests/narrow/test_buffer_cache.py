"""KV caches that research code keeps in module buffers, written in place each step (issue 19,
item 2): litgpt's ``index_copy_`` at ``input_pos``, torchtune's ``k_cache[:, :, cache_pos] = k``
with a position counter and an ``assert`` on it, slice assignment ``cache[:, :, s:e] = k``. Pruned
regions decode narrow (``execution_report``) with the buffers stored at the kept widths
(``narrow/stored.py``; on by default, ``stored.NARROW``: set here so the tests do not depend on the environment), and every step's
logits equal the masked dense model's (fp32, rel err <= 1e-5); scattered back to the dense
width, the buffers equal the masked dense model's. By default those calls run the fallback.

PYTEST_DONT_REWRITE: the ``assert`` in the models' forward must stay a plain ``assert`` statement
(pytest's rewrite turns it into an ``if``, which a capture treats as data-dependent control flow).
"""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.ir.record import installed_forward, param_records
from ecospa.narrow import stored
from tests.helpers import masked_copy, plan_units


@pytest.fixture(autouse=True)
def narrow_buffers(monkeypatch):
    """Buffers stored at the kept widths (off by default: not faster than the fallback at the
    measured sizes, ``bench/results/buffer_cache.md``)."""
    monkeypatch.setattr(stored, "NARROW", True)

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


def _dense_caches(blk) -> tuple[torch.Tensor, torch.Tensor]:
    """``blk``'s cache at its dense width (a copy: the block keeps its narrow storage)."""
    table = blk.__dict__.get(stored.ATTR) or {}
    out = []
    for name in ("k_cache", "v_cache"):
        t = blk._buffers[name]
        slot = table.get(name)
        out.append(slot.to_dense(t) if slot is not None and tuple(t.shape) == slot.narrow_shape else t)
    return out[0], out[1]


def _assert_stored_narrow(model, ref, strict: bool = True):
    """Every block's cache is stored at the kept widths (fewer bytes than the dense model's where
    ``strict``: ragged heads padded to the pad multiple may keep the whole head dim) and,
    scattered back, holds what the masked dense model's holds."""
    for blk, rblk in zip(model.blocks, ref.blocks):
        small = [blk.k_cache.numel() < rblk.k_cache.numel(), blk.v_cache.numel() < rblk.v_cache.numel()]
        assert all(small) if strict else blk.k_cache.numel() + blk.v_cache.numel() <= 2 * rblk.k_cache.numel()
        k, v = _dense_caches(blk)
        assert k.shape == rblk.k_cache.shape
        assert _rel(k, rblk.k_cache) <= TOL and _rel(v, rblk.v_cache) <= TOL


@pytest.mark.parametrize("style", ["index_copy", "index_put"])
@pytest.mark.parametrize("kind", ["uniform", "ragged"])
@pytest.mark.parametrize("kv,rotary", [(H, None), (2, "half"), (1, "pairs")])
def test_buffer_cache_decodes_narrow_and_exact(style, kind, kv, rotary):
    model, ref, ids = _pruned(style, kind, kv, rotary, discover_with_cache=True)
    got, want = _decode(model, ids, 6, style), _decode(ref, ids, 6, style)
    for step, (g, w) in enumerate(zip(got, want)):
        assert _rel(g, w) <= TOL, (step, _rel(g, w))
    _assert_narrow(model)
    _assert_stored_narrow(model, ref, strict=kind == "uniform")
    for blk, rblk in zip(model.blocks, ref.blocks):
        if style == "index_put":
            assert torch.equal(blk.cache_pos, rblk.cache_pos)  # advanced once per call, check included
    if kind == "uniform":
        rep = [r for r in ecospa.execution_report(model) if "blocks" in r.path]
        assert all(r.kv_bytes and r.kv_bytes[1] < r.kv_bytes[0] for r in rep), [r.kv_bytes for r in rep]


def test_slice_assignment_at_an_int_start_decodes_narrow_and_exact():
    model, ref, ids = _pruned("slice", "uniform", 2, "half")
    got, want = _decode(model, ids, 2, "slice"), _decode(ref, ids, 2, "slice")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    _assert_narrow(model)


def test_a_position_passed_as_an_int_stops_capturing_after_a_few_values():
    """A decode loop passing its position as a Python int (``start``, as Meta's reference Llama
    passes ``start_pos``): each value is a constant of a graph, so after ``MAX_VALUES`` of them
    the region stops capturing (a capture per step would cost far more than the step) and runs
    the exact fallback, with a reason that names the argument."""
    from ecospa.narrow.entry import MAX_VALUES
    model, ref, ids = _pruned("slice", "uniform", 2, "half")
    steps = MAX_VALUES + 4
    got, want = _decode(model, ids, steps, "slice"), _decode(ref, ids, steps, "slice")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    for blk in model.blocks:
        fwd = installed_forward(blk)
        assert len(fwd.entries) <= MAX_VALUES
        reasons = [r["reason"] for r in fwd.report() if r["path"] == "fallback"]
        assert any("argument 2" in r and "pass it as a tensor" in r for r in reasons), reasons


def test_reallocated_cache_is_used():
    """The model allocates its cache again (``setup_caches`` anew): the graph writes into the new
    buffer (placeholders are fed the live buffers)."""
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half")
    _decode(model, ids, 2, "index_copy")
    _decode(ref, ids, 2, "index_copy")
    model.setup_cache(2)
    ref.setup_cache(2)
    assert model.blocks[0].k_cache.shape == ref.blocks[0].k_cache.shape  # fresh, dense: sliced at the next call
    got, want = _decode(model, ids[:, :4], 3, "index_copy"), _decode(ref, ids[:, :4], 3, "index_copy")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    assert model.blocks[0].k_cache.abs().sum() > 0
    _assert_narrow(model)
    _assert_stored_narrow(model, ref)


def test_reallocated_cache_of_another_batch_size_is_sliced():
    """A cache allocated again for another batch size: a new capture for its shape (the guards
    see the dense shape of a narrow buffer), sliced at the next call, still narrow and exact."""
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half")
    _decode(model, ids, 2, "index_copy")
    for m in (model, ref):
        m.setup_cache(3)
    ids3 = torch.randint(0, 50, (3, 5))
    got, want = _decode(model, ids3, 3, "index_copy"), _decode(ref, ids3, 3, "index_copy")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    _assert_narrow(model)
    _assert_stored_narrow(model, ref)


@pytest.mark.parametrize("style", ["index_copy", "index_put"])
def test_fallback_and_narrow_calls_alternate_on_one_cache(style):
    """A fallback call in the middle of decoding (the buffer scattered back to its dense width
    first) and narrow calls after it (sliced again): every step exact."""
    model, ref, ids = _pruned(style, "ragged", 2, "half")
    b, t = ids.shape
    with torch.no_grad():
        assert _rel(model(ids, torch.arange(t), 0), ref(ids, torch.arange(t), 0)) <= TOL
        for i in range(5):
            nxt = ids[:, i:i + 1]
            pos = torch.tensor([t + i])
            want = ref(nxt, pos, t + i)
            if i % 2 == 0:  # the exact path of every block, by hand
                h = model.emb(nxt)
                for blk, norm in zip(model.blocks, model.norms):
                    h = h + installed_forward(blk).run_fallback(norm(h), pos, t + i)
                    assert blk.k_cache.shape == ref.blocks[0].k_cache.shape  # dense while the fallback runs
                got = model.head(h)
            else:
                got = model(nxt, pos, t + i)
            assert _rel(got, want) <= TOL, (i, _rel(got, want))
    _assert_stored_narrow(model, ref, strict=False)


def test_pruning_again_mid_decode_restores_and_reslices_the_cache():
    """A second round of pruning while the caches are stored narrow: the buffers take their dense
    width back (``invalidate``), and the next call stores them at the new kept widths; decoding
    goes on over the same cache, exact against the masked dense model of both rounds."""
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half")
    cg = ecospa.auto_couple(model, (ids, torch.arange(6)))
    _decode(model, ids, 2, "index_copy")
    _decode(ref, ids, 2, "index_copy")
    narrow_numel = model.blocks[0].k_cache.numel()
    plan = {c: [0] for c in cg if c.width >= 2}
    records = param_records(model)  # the units of a pruned model's couplings: kept positions
    ref = masked_copy(ref, [[(p, d, int(records[p].kept_or_all(d)[i]) if p in records else i) for p, d, i in unit]
                            for unit in plan_units(plan)])
    ecospa.prune(model, plan, couplings=cg)
    assert model.blocks[0].k_cache.shape == ref.blocks[0].k_cache.shape  # dense again
    with torch.no_grad():
        for i in range(3):
            pos = torch.tensor([8 + i])
            assert _rel(model(ids[:, i:i + 1], pos, 8 + i), ref(ids[:, i:i + 1], pos, 8 + i)) <= TOL, i
    assert model.blocks[0].k_cache.numel() < narrow_numel  # the new, smaller kept widths
    _assert_narrow(model)
    # (the masked reference's cache still holds what the first round wrote at the units of the
    # second: read by nothing, since their q and o columns are zero; the narrow cache dropped them)


def test_capture_of_the_pruned_model_sees_dense_buffers():
    """``auto_couple`` of a pruned model (``dense_view``) while its caches are stored narrow: the
    capture sees them dense, and decoding goes on narrow and exact afterwards."""
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half")
    _decode(model, ids, 2, "index_copy")
    _decode(ref, ids, 2, "index_copy")
    cg = ecospa.auto_couple(model, (ids, torch.arange(6)))
    assert [c for c in cg if c.kind == "qk"]
    with torch.no_grad():
        pos = torch.tensor([8])
        assert _rel(model(ids[:, :1], pos, 8), ref(ids[:, :1], pos, 8)) <= TOL
    _assert_stored_narrow(model, ref)


def test_persistent_cache_runs_the_fallback_and_says_why(tmp_path):
    """A persistent buffer (saved by ``state_dict`` and ``ecospa.save`` at the dense shape a
    fresh model has) is not stored narrow: its calls run the fallback, with the reason, exact;
    the checkpoint loads back."""
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half")
    for m in (model, ref):
        for blk in m.blocks:
            blk._non_persistent_buffers_set.discard("k_cache")
    got, want = _decode(model, ids, 2, "index_copy"), _decode(ref, ids, 2, "index_copy")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    rep = [r for r in ecospa.execution_report(model) if "blocks" in r.path]
    assert rep and all(r.narrow_calls == 0 and any("persistent" in x for x in r.reasons) for r in rep), \
        [r.reasons for r in rep]
    assert model.blocks[0].k_cache.shape == ref.blocks[0].k_cache.shape
    ecospa.save(model, tmp_path / "ck")
    fresh = TinyLM("index_copy", 2, "half").eval()
    fresh.setup_cache(2)
    for blk in fresh.blocks:
        blk._non_persistent_buffers_set.discard("k_cache")
    loaded = ecospa.load(tmp_path / "ck", fresh, example_inputs=(ids, torch.arange(6)))
    assert torch.equal(loaded.blocks[0].k_cache, model.blocks[0].k_cache)


def test_copied_model_with_narrow_caches_decodes():
    model, ref, ids = _pruned("index_put", "uniform", 2, "half")
    _decode(model, ids, 2, "index_put")
    _decode(ref, ids, 2, "index_put")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        pos = torch.tensor([8])
        assert _rel(twin(ids[:, :1], pos, 8), ref(ids[:, :1], pos, 8)) <= TOL
    _assert_narrow(twin)


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


def _cache_numel(model, names=("k", "v", "k_cache", "v_cache")) -> int:
    return sum(b.numel() for n, b in model.named_buffers() if n.split(".")[-1] in names)


def _attn_narrow(model):
    rep = ecospa.execution_report(model)
    assert all(r.narrow_calls > 0 and r.fallback_calls == 0 for r in rep if r.path.endswith("attn")), \
        [(r.path, r.narrow_calls, r.fallback_calls, r.reasons) for r in rep]


@pytest.mark.parametrize("groups", [4, 2])
def test_litgpt_kv_cache_decodes_narrow(groups):
    """litgpt ``set_kv_cache`` (``index_copy_``): narrow, exact, the cache at the kept widths;
    ``set_kv_cache`` called anew (new cache modules, dense) is sliced at the next call."""
    pytest.importorskip("litgpt")
    from litgpt.model import GPT
    torch.manual_seed(0)
    model = GPT(_litgpt_config(n_query_groups=groups)).eval()
    x = torch.randint(0, 256, (2, 8))
    cg = ecospa.auto_couple(model, (x,))
    plan = _plan(cg, "uniform", random.Random(0))
    ref = masked_copy(model, plan_units(plan))
    ecospa.prune(model, plan, couplings=cg)
    for rounds in range(2):
        for m in (model, ref):
            m.max_seq_length = 32
            m.set_kv_cache(batch_size=2)
        assert _cache_numel(model) == _cache_numel(ref)  # allocated dense by the model
        with torch.no_grad():
            for step in range(6 - 2 * rounds):
                if step == 0:
                    inp, pos = x, torch.arange(8)
                else:
                    inp, pos = x[:, step:step + 1], torch.tensor([7 + step])
                assert _rel(model(inp, input_pos=pos), ref(inp, input_pos=pos)) <= TOL, (rounds, step)
        assert _cache_numel(model) < _cache_numel(ref)  # stored at the kept widths
        _attn_narrow(model)


def test_torchtune_kv_cache_decodes_narrow():
    """torchtune ``setup_caches`` (``index_put_`` at ``cache_pos``, an ``assert`` on it): narrow,
    exact, the cache at the kept widths; ``reset_caches`` (in place) and decoding again."""
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
    for rounds in range(2):
        if rounds:
            for m in (model, ref):
                m.reset_caches()
        with torch.no_grad():
            for step in range(6 - 2 * rounds):
                if step == 0:
                    inp, s, e = x, 0, 8
                else:
                    inp, s, e = x[:, step:step + 1], 7 + step, 8 + step
                kw = dict(mask=causal[None, s:e].expand(2, e - s, 32), input_pos=torch.arange(s, e).expand(2, e - s))
                assert _rel(model(inp, **kw), ref(inp, **kw)) <= TOL, (rounds, step)
        assert _cache_numel(model) < _cache_numel(ref)
        _attn_narrow(model)


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


def test_buffer_caches_turned_off_run_the_fallback_and_say_why(monkeypatch):
    """With narrow storage off (``stored.NARROW``, ``ECOSPA_NARROW_BUFFER_CACHES=0``) the fallback
    serves the calls, with the reason."""
    monkeypatch.setattr(stored, "NARROW", False)
    model, ref, ids = _pruned("index_copy", "uniform", 2, "half", discover_with_cache=True)
    got, want = _decode(model, ids, 3, "index_copy"), _decode(ref, ids, 3, "index_copy")
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    rep = ecospa.execution_report(model)
    assert rep and all(r.narrow_calls == 0 and r.fallback_calls > 0 for r in rep)
    assert all(any("KV cache in a module buffer" in w for w in r.reasons) for r in rep), [r.reasons for r in rep]
    assert model.blocks[0].k_cache.shape == ref.blocks[0].k_cache.shape


@pytest.mark.parametrize("style", ["index_copy", "index_put"])
def test_dense_storage_path_stays_exact(monkeypatch, style):
    """``ECOSPA_NARROW_BUFFER_CACHES=dense`` with narrow storage off: the older path (the buffer
    at its dense width, writes scattered, reads gathered) serves the calls, exact."""
    monkeypatch.setattr(stored, "NARROW", False)
    monkeypatch.setattr(stored, "SERVE", True)
    model, ref, ids = _pruned(style, "ragged", 2, "half")
    got, want = _decode(model, ids, 4, style), _decode(ref, ids, 4, style)
    for g, w in zip(got, want):
        assert _rel(g, w) <= TOL
    _assert_narrow(model)
    for blk, rblk in zip(model.blocks, ref.blocks):
        assert blk.k_cache.shape == rblk.k_cache.shape
        assert _rel(blk.k_cache, rblk.k_cache) <= TOL


def test_narrow_storage_is_the_default():
    """Unless ``ECOSPA_NARROW_BUFFER_CACHES`` says ``0`` or ``dense``, buffer caches are stored
    at the kept widths (the setting is read once, at import)."""
    import os

    assert stored.NARROW is (os.environ.get("ECOSPA_NARROW_BUFFER_CACHES", "") not in ("0", "dense"))
