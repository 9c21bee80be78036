"""Shared helpers of the checkpoint tests: train a step, compare models and optimizers."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tests.helpers import call, flat_outputs

__all__ = ["train_step", "outputs", "assert_same_outputs", "assert_same_params", "assert_same_optimizer",
           "snapshot", "assert_unchanged"]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: Any) -> None:
    """One optimizer step on the sum of the model's floating outputs (train mode, then eval)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    sum(o.float().square().mean() for o in flat_outputs(call(model, inputs)) if o.is_floating_point()).backward()
    opt.step()
    model.eval()


def outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Every output tensor of ``model(inputs)`` in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return flat_outputs(call(model, inputs))


def assert_same_outputs(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """Bit-identical outputs."""
    assert len(got) == len(ref) and ref
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and torch.equal(a, b), (
            f"output {i} differs: max abs diff {(a.double() - b.double()).abs().max().item():.3g}")


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    """Same parameter names, shapes and values, and the same state_dict."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert list(pa) == list(pb)
    for n in pa:
        assert pa[n].shape == pb[n].shape, f"{n}: {tuple(pa[n].shape)} vs {tuple(pb[n].shape)}"
        assert torch.equal(pa[n], pb[n]), f"{n} differs"
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"state_dict[{k}] differs"


def assert_same_optimizer(model_a: nn.Module, opt_a, model_b: nn.Module, opt_b) -> None:
    """Same state (every tensor equal, e.g. Adam moments and step) and hyperparameters, by name."""
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    for n in pa:
        sa, sb = opt_a.state.get(pa[n], {}), opt_b.state.get(pb[n], {})
        assert sa.keys() == sb.keys(), f"{n}: state keys {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), f"optimizer state {k} of {n} differs"
            else:
                assert sa[k] == sb[k]
    na = {id(p): n for n, p in pa.items()}
    nb = {id(p): n for n, p in pb.items()}
    assert len(opt_a.param_groups) == len(opt_b.param_groups)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
        assert [na[id(p)] for p in ga["params"]] == [nb[id(p)] for p in gb["params"]]


def snapshot(model: nn.Module, opt=None) -> tuple:
    """Copies of the state_dict, parameter identities and optimizer state."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(n, p, tuple(p.shape)) for n, p in model.named_parameters()]
    ost = None
    if opt is not None:
        ost = ({id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                for p, s in opt.state.items()},
               [[id(p) for p in g["params"]] for g in opt.param_groups],
               [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    return sd, params, ost


def assert_unchanged(model: nn.Module, snap: tuple, opt=None) -> None:
    """Nothing changed since :func:`snapshot`."""
    sd, params, ost = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k in sd:
        assert now[k].shape == sd[k].shape and torch.equal(now[k], sd[k]), f"{k} changed"
    assert [(n, id(p), tuple(p.shape)) for n, p in model.named_parameters()] == [(n, id(p), s) for n, p, s in params]
    if opt is not None:
        state, groups, hyper = ost
        assert {id(p) for p in opt.state} == set(state)
        for p, s in opt.state.items():
            for k, v in s.items():
                assert (torch.equal(v, state[id(p)][k]) if torch.is_tensor(v) else v == state[id(p)][k])
        assert [[id(p) for p in g["params"]] for g in opt.param_groups] == groups
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == hyper
