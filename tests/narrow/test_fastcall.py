"""``narrow/fastcall.py``: each Python binding a bound narrow graph calls in place of an ATen
overload dispatches the same operators and computes the same values as the overload, for the
argument lists graphs pass (positional and keyword, tensors and Python numbers)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ecospa.narrow import fastcall


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _samples() -> dict[str, list[tuple[tuple, dict]]]:
    x, y = _t(2, 3, 4), _t(2, 3, 4, seed=1)
    q, k, v = _t(1, 2, 3, 8), _t(1, 2, 5, 8, seed=1), _t(1, 2, 5, 8, seed=2)
    idx = torch.tensor([2, 0])
    return {
        "aten.view.default": [((x, [6, 4]), {}), ((x, [-1, 12]), {})],
        "aten.reshape.default": [((x.transpose(0, 1), [3, 8]), {})],
        "aten.transpose.int": [((x, 1, 2), {}), ((x, -1, 0), {})],
        "aten.permute.default": [((x, [2, 0, 1]), {})],
        "aten.unsqueeze.default": [((x, 1), {})],
        "aten.squeeze.dim": [((_t(2, 1, 3), 1), {})],
        "aten.expand.default": [((_t(1, 3), [4, 3]), {}), ((_t(1, 3), [4, -1]), {})],
        "aten.select.int": [((x, 1, 2), {})],
        "aten.sym_size.int": [((x, 2), {})],
        "aten.split_with_sizes.default": [((x, [1, 3], 2), {})],
        "aten.split.Tensor": [((x, 2, 2), {}), ((x, 1), {})],
        "aten.unbind.int": [((x, 1), {})],
        "aten.cat.default": [(([x, y], -2), {}), (([x, y],), {})],
        "aten.stack.default": [(([x, y], 1), {})],
        "aten.clone.default": [((x,), {}), ((x.transpose(1, 2),), {"memory_format": torch.contiguous_format})],
        "aten.index_select.default": [((x, 2, idx), {})],
        "aten.gather.default": [((x, 2, torch.zeros(2, 3, 2, dtype=torch.long)), {})],
        "aten.embedding.default": [((_t(5, 4), torch.tensor([[1, 4]])), {})],
        "aten.addmm.default": [((_t(4), _t(2, 3), _t(3, 4)), {}), ((_t(4), _t(2, 3), _t(3, 4)), {"beta": 0.5, "alpha": 2.0})],
        "aten.mm.default": [((_t(2, 3), _t(3, 4)), {})],
        "aten.bmm.default": [((_t(2, 2, 3), _t(2, 3, 4)), {})],
        "aten.matmul.default": [((x, _t(4, 5)), {})],
        "aten.linear.default": [((x, _t(5, 4), _t(5)), {}), ((x, _t(5, 4)), {}), ((x, _t(5, 4), None), {})],
        "aten.scaled_dot_product_attention.default": [
            ((q, k, v), {"scale": 0.125}), ((q, k, v, None, 0.0, False), {}),
            ((q, k, v), {"attn_mask": torch.zeros(3, 5), "scale": 0.5})],
        "aten.mul.Tensor": [((x, y), {}), ((x, 0.125), {}), ((x, 2), {})],
        "aten.add.Tensor": [((x, y), {}), ((x, 1.0), {}), ((x, y), {"alpha": 2})],
        "aten.sub.Tensor": [((x, y), {}), ((x, 1.5), {})],
        "aten.div.Tensor": [((x, y), {}), ((x, 8.0), {})],
        "aten.neg.default": [((x,), {})],
        "aten.rsqrt.default": [((x.abs() + 1,), {})],
        "aten.tanh.default": [((x,), {})],
        "aten.exp.default": [((x,), {})],
        "aten.cos.default": [((x,), {})],
        "aten.sin.default": [((x,), {})],
        "aten.pow.Tensor_Scalar": [((x, 2), {}), ((x, 3.0), {})],
        "aten.mean.dim": [((x, [-1], True), {}), ((x, [0, 2]), {}), ((x, None), {}), ((x, [1], False), {"dtype": torch.float64})],
        "aten.softmax.int": [((x, -1), {}), ((x, 1, torch.float64), {})],
        "aten.silu.default": [((x,), {})],
        "aten.gelu.default": [((x,), {}), ((x,), {"approximate": "tanh"})],
        "aten.where.self": [((x > 0, x, y), {})],
        "aten.masked_fill.Scalar": [((x, x > 0, 0.0), {}), ((x, x > 0, float("-inf")), {})],
        "aten.flatten.using_ints": [((x, 1), {}), ((x, 0, 1), {})],
        "aten.type_as.default": [((x, y), {}), ((x, idx), {})],
        "aten.le.Scalar": [((x, 0.5), {}), ((idx, 1), {})],
        "aten.ne.Scalar": [((idx, 0), {})],
        "aten.item.default": [((torch.tensor(7),), {}), ((torch.tensor(0.5),), {})],
        "aten._assert_scalar.default": [((True, "a message"), {})],
        "aten.add_.Tensor": [((x, y), {}), ((x, 2.0), {})],
        "aten.index_copy_.default": [((_t(2, 3, 6), 2, idx, _t(2, 3, 2, seed=3)), {})],
    }


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _fresh(v):
    """A copy of an argument (tensors cloned: in-place ops must write their own)."""
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_fresh(u) for u in v)
    return v


def _run(fn, args, kwargs):
    args, kwargs = _fresh(args), {k: _fresh(v) for k, v in kwargs.items()}
    with _Record() as rec:
        out = fn(*args, **kwargs)
    return out, rec.ops


def test_every_binding_has_samples():
    assert set(_samples()) == set(fastcall.BINDINGS)


@pytest.mark.parametrize("qual", sorted(fastcall.BINDINGS))
def test_binding_dispatches_the_overload_it_stands_for(qual):
    """The binding, on the argument lists a graph passes, dispatches the same sequence of
    operators as the overload and returns equal values (bitwise: the same kernels)."""
    op = fastcall.overload(*qual.split("."))
    fn = fastcall.binding(op)
    assert fn is not None, f"{qual}: no binding on this torch"
    for args, kwargs in _samples()[qual]:
        want, want_ops = _run(op, args, kwargs)
        got, got_ops = _run(fn, args, kwargs)
        assert got_ops == want_ops, (qual, args, kwargs)
        want_l = list(want) if isinstance(want, (tuple, list)) else [want]
        got_l = list(got) if isinstance(got, (tuple, list)) else [got]
        assert len(got_l) == len(want_l)
        for g, w in zip(got_l, want_l):
            if isinstance(w, torch.Tensor):
                assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
                assert torch.equal(g, w)
            else:
                assert g == w


def test_a_bound_graph_calls_the_bindings():
    """A graph of listed ops gets the bindings as its globals; an op without one gets ``_op``."""
    class M(torch.nn.Module):
        def forward(self, x, w):
            return torch.addmm(x[0], x, w).transpose(0, 1).cumsum(0)

    ep = torch.export.export(M(), (_t(3, 3), _t(3, 3, seed=1)))
    gm = ep.module()
    inner = torch.fx.GraphModule(gm, gm.graph) if isinstance(gm, torch.fx.GraphModule) else gm
    args = (_t(3, 3), _t(3, 3, seed=1))
    want = M()(*args)
    fastcall.bind(inner)
    globs = type(inner).forward.__globals__
    assert globs.get("_ecospa_op_aten_addmm_default") is torch._C._VariableFunctions.addmm
    assert globs.get("_ecospa_op_aten_cumsum_default") is torch.ops.aten.cumsum.default._op
    assert torch.equal(inner(*args), want)
