"""A narrow program never serves a call it was not built for (issue 17): calls that vary, after
the first one, each property a capture can specialise on give the masked dense model's output."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ecospa
from tests.narrow.guard_block import BASE, CallSpec, GuardBlock, Outer, call_specs, pair, run_calls



def spec(**kw) -> CallSpec:
    return CallSpec(**{**BASE, **kw})


@pytest.fixture(scope="module")
def pairs():
    return {}


def _pair(pairs, ragged: bool):
    if ragged not in pairs:
        pairs[ragged] = pair(3 + ragged, ragged)
    return pairs[ragged]


def test_the_issue_double_call_is_exact():
    """``block(block(x, x), x)``: the first call's two arguments are one tensor, the second's are
    not; both run narrow and exact (``pair`` checks the output)."""
    p = pair(0, ragged=True)
    reps = ecospa.execution_report(p.pruned)
    assert reps and all(r.narrow_calls >= 2 and r.fallback_calls == 0 for r in reps), reps


@pytest.mark.parametrize("change", [
    dict(ctx="same"), dict(ctx="view"), dict(ctx="other", S=3), dict(mask=True), dict(causal=True),
    dict(scale=0.5), dict(grad=True), dict(train=True), dict(contiguous=False), dict(kw_order=True),
    dict(autocast=True), dict(temp=0.7), dict(gain="inplace"), dict(gain="new"), dict(buffer="inplace"),
    dict(buffer="grow"), dict(hook="add"), dict(T=3, B=1)])
@pytest.mark.parametrize("ragged", [False, True])
def test_a_call_that_changes_one_property_after_the_first(change, ragged):
    """A fresh pruned pair; a plain call, then one call changing a single property, then the plain
    call again: every output equals the masked dense model's."""
    p = pair(11, ragged)
    run_calls(p, [spec(), spec(seed=1, **change), spec(seed=2)])


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(calls=st.lists(call_specs(), min_size=2, max_size=5), ragged=st.booleans())
def test_random_call_sequences_equal_the_masked_dense_model(pairs, calls, ragged):
    """Sequences of calls on a pruned block shared across examples (so narrow programs built for
    earlier calls are there to be wrongly reused) each equal the masked dense model's output.
    bench/fuzz.py runs this property to thousands of examples (``narrow_calls``)."""
    run_calls(_pair(pairs, ragged), calls)


class _Hooked(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Outer().block

    def forward(self, x):
        return self.inner(x)


def test_hooks_on_the_scope_module_run_once():
    """A forward hook on the region's own module runs around the installed forward, once: the
    captured graph must not contain it too."""
    torch.manual_seed(0)
    model = _Hooked()
    x = torch.randn(2, 5, 32)
    cg = ecospa.auto_couple(model, (x,))
    ref = copy.deepcopy(model)
    ecospa.prune(model, {c: [0] for c in cg})
    from tests.helpers import masked_copy, plan_units
    ref = masked_copy(ref, plan_units({c.name: [0] for c in cg}, cg))
    for m in (model, ref):
        m.inner.register_forward_hook(lambda mod, a, out: out * 3.0)
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()
    assert ecospa.execution_report(model)[0].narrow_calls == 1


def test_verify_checks_each_new_shape_a_narrow_program_serves(monkeypatch):
    """``prune(..., verify=True)``: the first call of every input shape a narrow program serves is
    compared with the exact path; a program that goes wrong on a later shape is sent to the
    fallback with a warning instead of returning a wrong result."""
    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(2, 5, 32)
    cg = ecospa.auto_couple(model, (x,))
    ecospa.prune(model, {c: [0, 1] for c in cg}, verify=True, example_inputs=(x,))
    from ecospa.narrow import RegionForward
    from ecospa.ir.record import installed_forward

    fwd = installed_forward(model.block)
    assert isinstance(fwd, RegionForward) and fwd.verify_calls
    with torch.no_grad():
        want = model(torch.randn(1, 3, 32))
    entries = [e for es in fwd.entries.values() for e in es if e.gm is not None]
    assert entries and any(((1, 3, 32), (1, 3, 32)) in e.verified for e in entries)
    # a narrow graph that is wrong for a new shape (sabotaged): verify catches it
    for e in entries:
        gm = e.gm
        e.gm = lambda *a, gm=gm: tuple(t * 1.01 for t in gm(*a))
    y = torch.randn(1, 4, 32)
    with pytest.warns(ecospa.EcospaWarning, match="verify"):
        with torch.no_grad():
            model(y)
    assert want is not None


class _Checked(GuardBlock):
    """A block whose forward, once ``strict`` is set, asserts on a tensor's value (data-dependent:
    torch.export cannot capture it)."""

    strict = False

    def forward(self, x, pos):
        if self.strict:
            assert int(pos.max()) < 100
        return super().forward(x)


class _Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Checked()

    def forward(self, x, pos):
        return self.inner(x, pos)


def test_a_failed_narrow_export_is_one_line_not_a_graph_dump(capfd):
    """A region whose capture fails runs the fallback and says why in one line; nothing of torch's
    (the partial FX graph of a failed export) reaches stderr."""
    torch.manual_seed(0)
    model = _Wrapped()
    x, pos = torch.randn(2, 5, 32), torch.arange(5)
    cg = ecospa.auto_couple(model, (x, pos))
    ecospa.prune(model, {c: [0] for c in cg if c.kind in ("qk", "vo")})
    model.inner.strict = True
    capfd.readouterr()
    from tests.helpers import masked_copy  # noqa: F401
    with torch.no_grad():
        model(x, pos)
    out, err = capfd.readouterr()
    assert "def forward" not in err and "def forward" not in out, err[:500]
    reports = ecospa.execution_report(model)
    assert reports and all(rep.refusals == ("unservable",) for rep in reports), reports
    assert all(len(rep.reasons) == 1 and "\n" not in rep.reasons[0] for rep in reports), reports


@dataclasses.dataclass
class _Intermediates:
    logits: torch.Tensor
    extra: tuple


class _DataclassOut(nn.Module):
    """An attention module returning a class of its own (as x-transformers' ``Intermediates``)."""

    def __init__(self):
        super().__init__()
        self.block = Outer().block

    def forward(self, x):
        y = self.block(x)
        return y, _Intermediates(logits=y * 2, extra=(y.sum(),))


class _UsesDataclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _DataclassOut()

    def forward(self, x):
        y, inter = self.attn(x)
        return y + inter.logits + inter.extra[0]


def test_a_region_returning_a_custom_class_runs_narrow():
    torch.manual_seed(0)
    model = _UsesDataclass()
    x = torch.randn(2, 5, 32)
    cg = ecospa.auto_couple(model, (x,))
    from tests.helpers import masked_copy, plan_units
    plan = {c: [0, 1] for c in cg if c.kind in ("qk", "vo")}
    ref = masked_copy(model, plan_units(plan, cg))
    ecospa.prune(model, plan)
    with torch.no_grad():
        got, want = model(x), ref(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    reps = ecospa.execution_report(model)
    assert reps and all(r.narrow and r.fallback_calls == 0 for r in reps), [r.reasons for r in reps]


class _AttnWithIntermediates(nn.Module):
    """Attention whose own forward returns ``(out, dataclass)`` (x-transformers' ``Attention``
    returns its ``Intermediates`` so): the dataclass is the region's own output."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.h, D // self.h).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        out = self.o(y.transpose(1, 2).reshape(B, T, D))
        return out, _Intermediates(logits=out * 2, extra=(out.sum(),))


class _Caller(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _AttnWithIntermediates()

    def forward(self, x):
        y, inter = self.attn(x)
        inter.seen = True  # the caller writes to the object (x-transformers sets layer_type)
        return y + inter.logits + inter.extra[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_region_whose_own_output_is_a_custom_class_gets_that_class_back(seed):
    """The narrow graph returns plain containers; the region gives back the module's own class
    (torch.export restores the traced module's attributes, so what the capture learns about the
    output class must survive that)."""
    import random

    from tests.helpers import masked_copy, plan_units

    torch.manual_seed(seed)
    model = _Caller()
    x = torch.randn(2, 5, 32)
    cg = ecospa.auto_couple(model, (x,))
    rng = random.Random(seed)
    plan = {c: sorted(rng.sample(range(c.width), c.width // 2)) for c in cg if c.kind in ("qk", "vo")}
    ref = masked_copy(model, plan_units(plan, cg))
    ecospa.prune(model, plan)
    with torch.no_grad():
        got, want = model(x), ref(x)
        _, inter = model.attn(x)
    assert isinstance(inter, _Intermediates)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    reps = ecospa.execution_report(model)
    assert reps and all(r.narrow and r.fallback_calls == 0 for r in reps), [r.reasons for r in reps]


def test_a_narrow_graph_that_raises_on_a_later_call_falls_back_for_good():
    """Should a graph that passed its guards still fail on some call (a shape its capture fixed
    that no guard knew of), that call and every later one run the exact fallback; the forward
    never raises because of ecospa."""
    from ecospa.narrow import RegionForward
    from ecospa.ir.record import installed_forward

    p = pair(21, ragged=False)
    fwd = installed_forward(p.pruned.block)
    assert isinstance(fwd, RegionForward)

    def broken(*a):
        raise RuntimeError("shape '[2, 5, 4, 4]' is invalid")
    for es in fwd.entries.values():
        for e in es:
            if e.gm is not None:
                e.gm = broken
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got, want = p.pruned(x), p.ref(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    reps = ecospa.execution_report(p.pruned)
    assert reps[0].refusals == ("bug",) and "later call" in reps[0].reasons[0]
