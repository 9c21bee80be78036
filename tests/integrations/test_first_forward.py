"""EcoSpa without example inputs: the couplings come from the inputs of the model's first forward."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import ecospa
from ecospa.errors import ConfigError, EcospaError
from ecospa.integrations import load_state, save_state
from ecospa.recipes.nanogpt import GPT, GPTConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=13)


def tiny():
    torch.manual_seed(0)
    return GPT(CFG).double()


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (3, CFG.block_size + 1), generator=g) for _ in range(n)]


def train(model, opt, sp, xs):
    for x in xs:
        opt.zero_grad(set_to_none=True)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        sp.step()


def test_before_the_first_forward_everything_says_what_to_do():
    model = tiny()
    sp = ecospa.EcoSpa(model, None, 0.5, every=2)
    assert not sp.ready and not sp.done and sp.inputs is None and sp.plan.steps == ()
    for attr in ("couplings", "importance", "target_params", "dense_widths"):
        with pytest.raises(EcospaError, match="first forward"):
            getattr(sp, attr)
    with pytest.raises(EcospaError, match="has not run yet"):
        sp.step()
    assert sp.steps == 0
    assert sp.state_dict()["importance"] is None
    with pytest.raises(AttributeError):
        sp.no_such_attribute


def test_first_forward_inputs_are_recorded_detached_and_the_hook_removed():
    model = tiny()
    sp = ecospa.EcoSpa(model, None, 0.5)
    hooks = dict(model._forward_pre_hooks)
    assert len(hooks) == 1
    x = batches(1)[0][:, :-1]
    model(x)
    assert len(model._forward_pre_hooks) == 0
    (got,), kwargs = sp.inputs
    assert torch.equal(got, x) and got is not x and kwargs == {}
    assert not sp.ready and not sp.done
    for attr in ("couplings", "importance", "target_params", "dense_widths"):  # reading never captures
        with pytest.raises(EcospaError, match=r"sp\.capture\(\)"):
            getattr(sp, attr)
    assert not sp.ready
    assert len(sp.capture()) > 0 and sp.ready and sp.couplings is sp.capture()


def test_recorded_inputs_hold_no_autograd_graph():
    torch.manual_seed(0)
    emb, body = nn.Embedding(10, 8), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    sp = ecospa.EcoSpa(body, None, 0.5)
    h = emb(torch.tensor([[1, 2, 3]]))
    assert h.grad_fn is not None
    body(h).sum().backward()
    (rec,), _ = sp.inputs
    assert rec.grad_fn is None and not rec.requires_grad
    assert [c.kind for c in sp.capture()] == ["ffn"]


@pytest.mark.parametrize("opt_kind", ["adamw", "sgd"])
def test_same_plan_and_weights_as_with_example_inputs(opt_kind):
    def make(m):
        if opt_kind == "adamw":
            return torch.optim.AdamW(m.parameters(), lr=3e-3)
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    a, b = tiny(), tiny()
    oa, ob = make(a), make(b)
    kw = dict(every=3, top_k=0.5, theta=0.8)
    sp_a = ecospa.EcoSpa(a, oa, 0.5, **kw)
    sp_b = ecospa.EcoSpa(b, ob, 0.5, example_inputs=(torch.zeros(1, CFG.block_size, dtype=torch.long),), **kw)
    xs = batches(12)
    train(a, oa, sp_a, xs)
    train(b, ob, sp_b, xs)
    assert len(sp_a.events) >= 2 and sp_a.plan == sp_b.plan
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_unreachable_target_is_reported_at_the_first_step():
    model = tiny()
    sp = ecospa.EcoSpa(model, None, 0.001)  # no capture yet: no error
    model(batches(1)[0][:, :-1])
    with pytest.raises(ConfigError, match="smallest reachable size"):
        sp.step()


def test_positional_and_keyword_inputs_are_bound_by_name():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 6)

        def forward(self, x, scale=None):
            h = torch.relu(self.up(x))
            return self.down(h if scale is None else h * scale)

    torch.manual_seed(0)
    m = Gated()
    sp = ecospa.EcoSpa(m, None, 0.5)
    m(torch.randn(2, 6), scale=torch.tensor(2.0))
    assert [c.kind for c in sp.capture()] == ["ffn"]


def test_explicit_capture_and_saved_inputs_restore_a_fresh_model(tmp_path):
    model = tiny()
    fresh = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sp = ecospa.EcoSpa(model, opt, 0.5, every=2, theta=0.8)
    train(model, opt, sp, batches(6))
    assert sp.plan.steps
    save_state(sp, tmp_path)
    # a fresh dense model, EcoSpa without inputs, no forward yet: the saved inputs capture it
    sp2 = ecospa.EcoSpa(fresh, None, 0.5, every=2, theta=0.8)
    sp2.load_state_dict(load_state(tmp_path))
    assert sp2.plan == sp.plan and sp2.steps == sp.steps
    assert {n: p.shape for n, p in fresh.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    fresh.load_state_dict(model.state_dict())
    x = batches(1, seed=7)[0][:, :-1]
    torch.testing.assert_close(fresh(x), model(x))
    torch.testing.assert_close(sp2.importance.channel("sq", *next(iter(sp.importance._acc["sq"]))),
                               sp.importance.channel("sq", *next(iter(sp.importance._acc["sq"]))))
    # capture() with explicit inputs, before any forward
    sp3 = ecospa.EcoSpa(tiny(), None, 0.5)
    cg = sp3.capture(torch.zeros(1, 4, dtype=torch.long))
    assert sp3.ready and cg is sp3.couplings and sp3.inputs[0][0].shape == (1, 4)
