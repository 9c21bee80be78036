"""Eq. 6 and Eq. 9 (and the baseline scores) against a direct numpy computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from ecospa.scoring.importance import Importance, normalise
from ecospa.scoring.scores import register_unit_score
from ecospa.errors import ConfigError, EcospaError
from ecospa.ir.coupling import Coupling, Site, SliceTable


def make_coupling(name, kind, units, sites=()):
    """A Coupling from ``units``: a list (one per unit) of ``(param, dim, index)``."""
    tables: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for u, slices in enumerate(units):
        for param, dim, index in slices:
            tables.setdefault((param, dim), []).append((u, index))
    tabs = tuple(SliceTable(p, d, np.array([u for u, _ in v]), np.array([i for _, i in v]))
                 for (p, d), v in tables.items())
    return Coupling(name, kind, True, None, len(units), tabs, tuple(sites))


def site(param, dim, role, module):
    return Site(param, dim, role, module, "compact")


class MLP(nn.Module):
    def __init__(self, d=6, f=8, o=4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, o)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def ffn_coupling(f=8):
    units = [[("fc1.weight", 0, j), ("fc1.bias", 0, j), ("fc2.weight", 1, j)] for j in range(f)]
    sites = [site("fc1.weight", 0, "out", "fc1"), site("fc1.bias", 0, "bias", "fc1"),
             site("fc2.weight", 1, "in", "fc2")]
    return make_coupling("ffn", "ffn", units, sites)


def random_grads(model, gen):
    grads = {}
    for n, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        grads[n] = p.grad.detach().double().numpy().copy()
    return grads


def npa(t):
    return t.detach().double().numpy()


@pytest.fixture
def gen():
    torch.manual_seed(0)
    return torch.Generator().manual_seed(0)


def test_fisher_mlp_matches_numpy(gen):
    model, c = MLP(), ffn_coupling()
    imp = Importance(model, [c], stats=("sq", "wg"))
    seen = []
    for _ in range(3):
        seen.append(random_grads(model, gen))
        imp.accumulate()
    assert imp.num_batches == 3
    s1 = sum((g["fc1.weight"] ** 2).sum() + (g["fc1.bias"] ** 2).sum() for g in seen)
    s2 = sum((g["fc2.weight"] ** 2).sum() for g in seen)
    expected = 0.5 * (s1 / (8 * 6 + 8) + s2 / (4 * 8)) / 3
    got = imp.coupling_scores("fisher")["ffn"]
    assert got == pytest.approx(expected, rel=1e-5)
    w1, b1, w2 = npa(model.fc1.weight), npa(model.fc1.bias), npa(model.fc2.weight)
    taylor = sum(np.abs(w1 * g["fc1.weight"]).sum(1) + np.abs(b1 * g["fc1.bias"])
                 + np.abs(w2 * g["fc2.weight"]).sum(0) for g in seen)
    np.testing.assert_allclose(imp.unit_scores(c, "taylor").numpy(), taylor / taylor.sum(), rtol=1e-5)


def test_eq9_mlp_matches_numpy():
    model, c = MLP(), ffn_coupling()
    imp = Importance(model, [c])
    w1, b1, w2 = npa(model.fc1.weight), npa(model.fc1.bias), npa(model.fc2.weight)
    a = np.abs(w1).sum(1) + np.abs(b1)
    b = np.abs(w2).sum(0)
    v = imp.unit_scores(c, "eq9").numpy()
    np.testing.assert_allclose(v, a * b / (a * b).sum(), rtol=1e-6)
    assert v.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(imp.unit_scores(c, "magnitude").numpy(), (a + b) / (a + b).sum(), rtol=1e-6)


def test_eq9_follows_weight_updates():
    model, c = MLP(), ffn_coupling()
    imp = Importance(model, [c])
    before = imp.unit_scores(c).clone()
    with torch.no_grad():
        model.fc1.weight[3].mul_(10.0)  # in-place, as an optimizer step does
    after = imp.unit_scores(c)
    assert after[3] > before[3]


class FusedQKV(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)


@pytest.mark.parametrize("with_sites", [True, False])
def test_fused_qk_head_counts_both_slices(gen, with_sites):
    d, hd, head = 6, 3, 1
    model = FusedQKV(d)
    units = [[("qkv.weight", 0, head * hd + j), ("qkv.weight", 0, d + head * hd + j),
              ("qkv.bias", 0, head * hd + j), ("qkv.bias", 0, d + head * hd + j)] for j in range(hd)]
    sites = [site("qkv.weight", 0, "out", "qkv"), site("qkv.bias", 0, "bias", "qkv")] if with_sites else []
    c = make_coupling("qk", "qk", units, sites)
    imp = Importance(model, [c])
    g = random_grads(model, gen)
    imp.accumulate()
    w, b = npa(model.qkv.weight), npa(model.qkv.bias)
    q = slice(head * hd, head * hd + hd)
    k = slice(d + head * hd, d + head * hd + hd)
    a = np.abs(w[q]).sum(1) + np.abs(b[q])
    bb = np.abs(w[k]).sum(1) + np.abs(b[k])
    np.testing.assert_allclose(imp.unit_scores(c).numpy(), a * bb / (a * bb).sum(), rtol=1e-6)
    sq = (g["qkv.weight"][q] ** 2).sum() + (g["qkv.bias"][q] ** 2).sum()
    sk = (g["qkv.weight"][k] ** 2).sum() + (g["qkv.bias"][k] ** 2).sum()
    n = hd * d + hd
    assert imp.coupling_scores()["qk"] == pytest.approx(0.5 * (sq / n + sk / n), rel=1e-5)


class GQA(nn.Module):
    def __init__(self, d=8, hd=2, n_q=4, n_kv=2):
        super().__init__()
        self.q_proj = nn.Linear(d, n_q * hd, bias=False)
        self.k_proj = nn.Linear(d, n_kv * hd, bias=False)


def test_gqa_group_sums_all_query_heads(gen):
    d, hd = 8, 2
    model = GQA(d, hd)
    group = 1  # query heads 2 and 3 share kv head 1
    units = [[("q_proj.weight", 0, 2 * hd + j), ("q_proj.weight", 0, 3 * hd + j),
              ("k_proj.weight", 0, group * hd + j)] for j in range(hd)]
    c = make_coupling("qk", "qk", units, [site("q_proj.weight", 0, "out", "q_proj"),
                                          site("k_proj.weight", 0, "out", "k_proj")])
    imp = Importance(model, [c])
    g = random_grads(model, gen)
    imp.accumulate()
    wq, wk = npa(model.q_proj.weight), npa(model.k_proj.weight)
    a = np.abs(wq[2 * hd:3 * hd]).sum(1) + np.abs(wq[3 * hd:4 * hd]).sum(1)
    b = np.abs(wk[group * hd:(group + 1) * hd]).sum(1)
    np.testing.assert_allclose(imp.unit_scores(c).numpy(), a * b / (a * b).sum(), rtol=1e-6)
    sq = (g["q_proj.weight"][2 * hd:4 * hd] ** 2).sum()
    sk = (g["k_proj.weight"][group * hd:(group + 1) * hd] ** 2).sum()
    expected = 0.5 * (sq / (2 * hd * d) + sk / (hd * d))
    assert imp.coupling_scores()["qk"] == pytest.approx(expected, rel=1e-5)


class GLU(nn.Module):
    def __init__(self, d=5, f=7):
        super().__init__()
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)


def test_glu_gate_and_up_are_one_side(gen):
    d, f = 5, 7
    model = GLU(d, f)
    units = [[("gate.weight", 0, j), ("up.weight", 0, j), ("down.weight", 1, j)] for j in range(f)]
    c = make_coupling("glu", "glu", units, [site("gate.weight", 0, "out", "gate"),
                                            site("up.weight", 0, "out", "up"),
                                            site("down.weight", 1, "in", "down")])
    imp = Importance(model, [c])
    grads = []
    for _ in range(2):
        grads.append(random_grads(model, gen))
        imp.accumulate()
    wg, wu, wd = npa(model.gate.weight), npa(model.up.weight), npa(model.down.weight)
    a = np.abs(wg).sum(1) + np.abs(wu).sum(1)
    b = np.abs(wd).sum(0)
    np.testing.assert_allclose(imp.unit_scores(c).numpy(), a * b / (a * b).sum(), rtol=1e-6)
    s = [sum((g[k] ** 2).sum() for g in grads) for k in ("gate.weight", "up.weight", "down.weight")]
    expected = 0.5 * ((s[0] + s[1]) / (2 * f * d) + s[2] / (f * d)) / 2  # gate+up | down, 2 batches
    assert imp.coupling_scores()["glu"] == pytest.approx(expected, rel=1e-5)


def test_param_on_both_dims_and_missing_grads(gen):
    """fc2 reads coupling A (dim 1) and produces coupling B (dim 0); fc3 has no grad."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    ca = make_coupling("a", "ffn", [[("0.weight", 0, j), ("2.weight", 1, j)] for j in range(6)])
    cb = make_coupling("b", "ffn", [[("2.weight", 0, j), ("4.weight", 1, j)] for j in range(5)])
    imp = Importance(model, [ca, cb])
    g = random_grads(model, gen)
    model[4].weight.grad = None
    imp.accumulate()
    np.testing.assert_allclose(imp.channel("sq", "2.weight", 1).numpy(), (g["2.weight"] ** 2).sum(0), rtol=1e-5)
    np.testing.assert_allclose(imp.channel("sq", "2.weight", 0).numpy(), (g["2.weight"] ** 2).sum(1), rtol=1e-5)
    assert float(imp.channel("sq", "4.weight", 1).sum()) == 0.0
    expected_b = 0.5 * ((g["2.weight"] ** 2).sum() / 30 + 0.0)
    assert imp.coupling_scores()["b"] == pytest.approx(expected_b, rel=1e-5)


def test_bf16_parameters_accumulate_in_float32(gen):
    model, c = MLP().to(torch.bfloat16), ffn_coupling()
    imp = Importance(model, [c])
    random_grads(model, gen)
    imp.accumulate()
    assert imp.channel("sq", "fc1.weight", 0).dtype == torch.float32
    assert np.isfinite(imp.coupling_scores()["ffn"])


def test_random_scores_seeded():
    model, c = MLP(), ffn_coupling()
    a = Importance(model, [c], seed=3).unit_scores(c, "random", salt=1)
    b = Importance(model, [c], seed=3).unit_scores(c, "random", salt=1)
    other = Importance(model, [c], seed=3).unit_scores(c, "random", salt=2)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert float(a.sum()) == pytest.approx(1.0)


def test_state_dict_round_trip(gen):
    model, c = MLP(), ffn_coupling()
    imp = Importance(model, [c])
    random_grads(model, gen)
    imp.accumulate()
    other = Importance(model, [c])
    other.load_state_dict(imp.state_dict())
    assert other.num_batches == 1
    assert other.coupling_scores() == imp.coupling_scores()


def test_errors_name_the_bad_value():
    model, c = MLP(), ffn_coupling()
    imp = Importance(model, [c])
    with pytest.raises(ConfigError, match="'nope'"):
        imp.unit_scores(c, "nope")
    with pytest.raises(EcospaError, match="no gradients"):
        imp.coupling_scores("fisher")
    with pytest.raises(ConfigError, match="'wg'"):
        imp.channel("wg", "fc1.weight", 0)
    with pytest.raises(ConfigError, match="already registered"):
        register_unit_score("eq9")(lambda imp, c, salt: None)
    bad = make_coupling("bad", "ffn", [[("nope.weight", 0, 0)]])
    with pytest.raises(EcospaError, match="nope.weight"):
        Importance(model, [bad])


def test_normalise_degenerate():
    assert torch.allclose(normalise(torch.zeros(4)), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.allclose(normalise(torch.tensor([1.0, 3.0])), torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_nanogpt_head_eq9_on_discovered_couplings():
    ecospa = pytest.importorskip("ecospa")
    from ecospa.recipes.nanogpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11))
    cg = ecospa.auto_couple(model, (torch.randint(0, 11, (1, 4)),))
    imp = Importance(model, cg)
    w = npa(model.transformer.h[0].attn.c_attn.weight)
    b = npa(model.transformer.h[0].attn.c_attn.bias)
    wo = npa(model.transformer.h[0].attn.c_proj.weight)
    hd, C = 4, 8
    for h in range(2):
        q, k, v = (slice(o + h * hd, o + (h + 1) * hd) for o in (0, C, 2 * C))
        aq = np.abs(w[q]).sum(1) + np.abs(b[q])
        ak = np.abs(w[k]).sum(1) + np.abs(b[k])
        np.testing.assert_allclose(imp.unit_scores(cg[f"transformer.h.0.attn.qk.head{h}"]).numpy(),
                                   aq * ak / (aq * ak).sum(), rtol=1e-6)
        av = np.abs(w[v]).sum(1) + np.abs(b[v])
        bo = np.abs(wo[:, h * hd:(h + 1) * hd]).sum(0)
        np.testing.assert_allclose(imp.unit_scores(cg[f"transformer.h.0.attn.vo.head{h}"]).numpy(),
                                   av * bo / (av * bo).sum(), rtol=1e-6)


_SIDE = {"q": 0, "v": 0, "in": 0, "gate": 0, "up": 0, "gain": 0, "k": 1, "o": 1, "out": 1, "down": 1}


def _zoo_cases():
    from tests.models import CASES

    return [name for name, case in CASES.items() if any(e.roles for e in case.expected())]


@pytest.mark.parametrize("case", _zoo_cases())
def test_eq9_sides_on_the_zoo(case):
    """On every zoo model, Eq. 9 of each discovered coupling equals numpy Eq. 9 computed from the
    ground-truth sides (q|k, v|o, in|out, gate+up|down)."""
    import ecospa
    from tests.helpers import canon
    from tests.models import CASES, build

    model, inputs = build(case)
    cg = ecospa.auto_couple(model, inputs)
    imp = Importance(model, cg)
    params = {n: npa(p) for n, p in model.named_parameters()}
    by_units = {canon(c.units()): c for c in cg}
    checked = 0
    for e in CASES[case].expected():
        c = by_units.get(canon(e.units))
        if c is None or e.roles is None:
            continue
        ab = np.zeros((2, e.width))
        for j, (unit, roles) in enumerate(zip(e.units, e.roles)):
            for (name, dim, idx), role in zip(unit, roles):
                ab[_SIDE[role], j] += np.abs(np.take(params[name], idx, axis=dim)).sum()
        want = ab[0] * ab[1] / (ab[0] * ab[1]).sum()
        order = [next(j for j, u in enumerate(e.units) if canon([u]) == canon([cu])) for cu in c.units()]
        np.testing.assert_allclose(imp.unit_scores(c).numpy(), want[order], rtol=1e-6, err_msg=c.name)
        checked += 1
    assert checked, f"no coupling of {case} matched its ground truth"


def test_accumulate_restores_the_thread_count(gen):
    model, c = MLP(), ffn_coupling()
    imp = Importance(model, [c])
    random_grads(model, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        imp.accumulate()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_column_reduction_in_blocks_matches_numpy(gen, monkeypatch):
    import ecospa.scoring.importance as importance

    monkeypatch.setattr(importance, "_CHUNK", 10)  # many blocks, the last one partial
    g = torch.randn(7, 4, generator=gen)
    np.testing.assert_allclose(importance._channel_reduce(g, 1).numpy(), (npa(g) ** 2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(importance._channel_reduce(g.t(), 0).numpy(), (npa(g) ** 2).sum(0), rtol=1e-6)
