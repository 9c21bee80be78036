"""Hypothesis strategies: random MLP stacks and random attention blocks with known couplings.

Each strategy returns a :class:`Generated`: the model (eval mode, random weights from a drawn
seed), example inputs, and the expected exact couplings derived from the drawn parameters alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from tests.zoo.attention import Rotary
from tests.zoo.expect import Expect, attention_expects, ffn_expect, glu_expect, lin_in, lin_out
from tests.zoo.ffn import ACTIVATIONS

__all__ = ["Generated", "MLPSpec", "AttnSpec", "MLPStack", "RandomAttentionBlock",
           "mlp_stacks", "attention_blocks", "expected_mlp", "expected_attention"]

MLP_ACTS = ("relu", "gelu", "tanh", "silu", "sigmoid", "leaky_relu", "identity")
FFN_ACTS = ("relu", "gelu", "gelu_tanh", "silu", "tanh")
LAYOUTS = ("separate", "fused_split", "fused_chunk", "fused_unbind", "fused_headwise")


@dataclass
class Generated:
    """A generated test subject: model, inputs, ground truth and the spec that made it."""

    model: nn.Module
    inputs: tuple
    expected: list[Expect]
    spec: object
    skip_roles: tuple[str, ...] = ()  # sides the ground-truth self-check cannot zero alone
    may_be_dead: bool = False  # a ReLU may kill every unit the self-check picks


@dataclass(frozen=True)
class MLPSpec:
    """Widths ``[in, h1, ..., out]``, one activation between consecutive Linears, biases."""

    widths: tuple[int, ...]
    acts: tuple[str, ...]
    biases: tuple[bool, ...]
    seq: bool  # inputs (B, T, d) instead of (B, d)


class MLPStack(nn.Module):
    """``layers[i]`` Linears with functional activations between them (none after the last)."""

    def __init__(self, spec: MLPSpec):
        super().__init__()
        w = spec.widths
        self.layers = nn.ModuleList(
            nn.Linear(w[i], w[i + 1], bias=spec.biases[i]) for i in range(len(w) - 1)
        )
        self.acts = spec.acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.acts):
                x = ACTIVATIONS[self.acts[i]](x)
        return x


def expected_mlp(spec: MLPSpec) -> list[Expect]:
    """One coupling per hidden width: ``linear`` across an identity, else ``ffn``."""
    out = []
    for i, act in enumerate(spec.acts):
        kind = "linear" if act == "identity" else "ffn"
        out.append(ffn_expect(f"layers.{i}", f"layers.{i + 1}", spec.widths[i + 1],
                              bias=spec.biases[i], kind=kind))
    return out


@st.composite
def mlp_stacks(draw, max_layers: int = 4, max_width: int = 12) -> Generated:
    """Random MLP stacks of 2..``max_layers`` Linears; hidden widths 2..``max_width``."""
    n = draw(st.integers(2, max_layers))
    hidden = [draw(st.integers(2, max_width)) for _ in range(n - 1)]  # width 1: see test_discovery
    widths = (draw(st.integers(1, max_width)), *hidden, draw(st.integers(1, max_width)))
    acts = tuple(draw(st.sampled_from(MLP_ACTS)) for _ in range(n - 1))
    biases = tuple(draw(st.booleans()) for _ in range(n))
    spec = MLPSpec(widths, acts, biases, draw(st.booleans()))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = MLPStack(spec).eval()
    b = draw(st.integers(1, 3))
    shape = (b, draw(st.integers(1, 4)), widths[0]) if spec.seq else (b, widths[0])
    skip = ("in",) if "sigmoid" in acts else ()
    return Generated(model, (torch.randn(*shape),), expected_mlp(spec), spec, skip,
                     may_be_dead="relu" in acts)


@dataclass(frozen=True)
class AttnSpec:
    """Everything that defines a random attention block (see :func:`attention_blocks`)."""

    d: int
    n_kv: int
    rep: int
    hd: int
    layout: str
    qkv_bias: bool
    o_bias: bool
    rotary: str | None
    impl: str  # "sdpa", "manual" or "sdpa_gqa" (enable_gqa=True, no repeat)
    repeat: str  # "expand" or "repeat_interleave"
    causal: bool
    prenorm: bool
    ffn: str | None  # None, "ffn", "glu" or "glu_fused"
    ffn_width: int
    ffn_act: str
    ffn_bias: bool

    @property
    def h(self) -> int:
        """Number of query heads."""
        return self.n_kv * self.rep


class RandomAttentionBlock(nn.Module):
    """``x + o(attention(qkv(norm(x))))`` then an optional FFN/GLU, as ``spec`` says."""

    def __init__(self, s: AttnSpec):
        super().__init__()
        self.s = s
        qd, kd = s.h * s.hd, s.n_kv * s.hd
        self.norm = nn.LayerNorm(s.d) if s.prenorm else nn.Identity()
        if s.layout == "separate":
            self.q = nn.Linear(s.d, qd, bias=s.qkv_bias)
            self.k = nn.Linear(s.d, kd, bias=s.qkv_bias)
            self.v = nn.Linear(s.d, kd, bias=s.qkv_bias)
        else:
            self.qkv = nn.Linear(s.d, qd + 2 * kd, bias=s.qkv_bias)
        self.o = nn.Linear(qd, s.d, bias=s.o_bias)
        self.rope = Rotary(s.hd, s.rotary) if s.rotary else None
        f = s.ffn_width
        if s.ffn == "ffn":
            self.fc, self.out = nn.Linear(s.d, f, bias=s.ffn_bias), nn.Linear(f, s.d, bias=s.ffn_bias)
        elif s.ffn == "glu":
            self.gate = nn.Linear(s.d, f, bias=s.ffn_bias)
            self.up = nn.Linear(s.d, f, bias=s.ffn_bias)
            self.down = nn.Linear(f, s.d, bias=s.ffn_bias)
        elif s.ffn == "glu_fused":
            self.gate_up = nn.Linear(s.d, 2 * f, bias=s.ffn_bias)
            self.down = nn.Linear(f, s.d, bias=s.ffn_bias)

    def _qkv(self, x: torch.Tensor):
        s, (b, t, _) = self.s, x.shape
        h, kv, hd = s.h, s.n_kv, s.hd
        if s.layout == "separate":
            return (self.q(x).view(b, t, h, hd), self.k(x).view(b, t, kv, hd),
                    self.v(x).view(b, t, kv, hd))
        y = self.qkv(x)
        if s.layout == "fused_split":
            q, k, v = y.split([h * hd, kv * hd, kv * hd], dim=-1)
        elif s.layout == "fused_chunk":
            q, k, v = y.chunk(3, dim=-1)
        elif s.layout == "fused_unbind":
            return y.view(b, t, 3, h, hd).unbind(2)
        else:  # fused_headwise: per head [q | k | v]
            return y.view(b, t, h, 3, hd).unbind(3)
        return q.view(b, t, h, hd), k.view(b, t, kv, hd), v.view(b, t, kv, hd)

    def _attend(self, q, k, v):
        s = self.s
        if s.rep > 1 and s.impl != "sdpa_gqa":
            if s.repeat == "expand":
                b, kv, t, hd = k.shape
                k = k[:, :, None].expand(b, kv, s.rep, t, hd).reshape(b, kv * s.rep, t, hd)
                v = v[:, :, None].expand(b, kv, s.rep, t, hd).reshape(b, kv * s.rep, t, hd)
            else:
                k, v = k.repeat_interleave(s.rep, dim=1), v.repeat_interleave(s.rep, dim=1)
        if s.impl == "manual":
            att = q @ k.transpose(-2, -1) * (s.hd ** -0.5)  # (B, h, T, T)
            if s.causal:
                t = att.shape[-1]
                mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
                att = att.masked_fill(mask, float("-inf"))
            return att.softmax(dim=-1) @ v
        return F.scaled_dot_product_attention(q, k, v, is_causal=s.causal,
                                              enable_gqa=s.impl == "sdpa_gqa")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, (b, t, _) = self.s, x.shape
        q, k, v = (z.transpose(1, 2) for z in self._qkv(self.norm(x)))  # (B, heads, T, D)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        y = self._attend(q, k, v).transpose(1, 2).reshape(b, t, s.h * s.hd)
        x = x + self.o(y)
        if s.ffn == "ffn":
            x = x + self.out(ACTIVATIONS[s.ffn_act](self.fc(x)))
        elif s.ffn == "glu":
            x = x + self.down(ACTIVATIONS[s.ffn_act](self.gate(x)) * self.up(x))
        elif s.ffn == "glu_fused":
            g, u = self.gate_up(x).chunk(2, dim=-1)
            x = x + self.down(ACTIVATIONS[s.ffn_act](g) * u)
        return x


def expected_attention(s: AttnSpec) -> list[Expect]:
    """qk/vo per kv head (slice positions from the layout) and the FFN's coupling."""
    h, kv, hd, bias = s.h, s.n_kv, s.hd, s.qkv_bias
    if s.layout == "separate":
        q = lambda hq, j: lin_out("q", hq * hd + j, bias)  # noqa: E731
        k = lambda g, j: lin_out("k", g * hd + j, bias)  # noqa: E731
        v = lambda g, j: lin_out("v", g * hd + j, bias)  # noqa: E731
    elif s.layout == "fused_headwise":
        q = lambda hq, j: lin_out("qkv", hq * 3 * hd + j, bias)  # noqa: E731
        k = lambda g, j: lin_out("qkv", g * 3 * hd + hd + j, bias)  # noqa: E731
        v = lambda g, j: lin_out("qkv", g * 3 * hd + 2 * hd + j, bias)  # noqa: E731
    else:
        q = lambda hq, j: lin_out("qkv", hq * hd + j, bias)  # noqa: E731
        k = lambda g, j: lin_out("qkv", h * hd + g * hd + j, bias)  # noqa: E731
        v = lambda g, j: lin_out("qkv", h * hd + kv * hd + g * hd + j, bias)  # noqa: E731
    out = attention_expects(n_kv=kv, rep=s.rep, head_dim=hd, rotary=s.rotary, q=q, k=k, v=v,
                            o=lambda hq, j: lin_in("o", hq * hd + j))
    f = s.ffn_width
    if s.ffn == "ffn":
        out.append(ffn_expect("fc", "out", f, bias=s.ffn_bias))
    elif s.ffn == "glu":
        out.append(glu_expect("gate", "up", "down", f, bias=s.ffn_bias))
    elif s.ffn == "glu_fused":
        out.append(glu_expect("gate_up", None, "down", f, bias=s.ffn_bias))
    return out


@st.composite
def attention_specs(draw) -> AttnSpec:
    """Random :class:`AttnSpec`: 1-3 kv heads, 1-3 query heads per kv head, head dim 2-8.

    Width-1 couplings (head dim 1, FFN width 1) have their own test in ``test_discovery``.
    """
    n_kv, rep = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rotary = draw(st.sampled_from([None, "half", "interleaved"]))
    hd = draw(st.sampled_from([4, 6, 8] if rotary else [2, 3, 4, 5, 8]))
    layouts = LAYOUTS if rep == 1 else ("separate", "fused_split")
    impl = draw(st.sampled_from(["sdpa", "manual"] + (["sdpa_gqa"] if rep > 1 else [])))
    ffn = draw(st.sampled_from([None, "ffn", "glu", "glu_fused"]))
    return AttnSpec(
        d=draw(st.integers(4, 24)), n_kv=n_kv, rep=rep, hd=hd,
        layout=draw(st.sampled_from(layouts)), qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()), rotary=rotary, impl=impl,
        repeat=draw(st.sampled_from(["expand", "repeat_interleave"])),
        causal=draw(st.booleans()), prenorm=draw(st.booleans()), ffn=ffn,
        ffn_width=draw(st.integers(2, 16)),
        ffn_act=draw(st.sampled_from(("silu", "gelu") if ffn and ffn != "ffn" else FFN_ACTS)),
        ffn_bias=draw(st.booleans()),
    )


@st.composite
def attention_blocks(draw) -> Generated:
    """A :class:`RandomAttentionBlock` with inputs of 1-2 sequences of 2-6 tokens."""
    spec = draw(attention_specs())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = RandomAttentionBlock(spec).eval()
    x = torch.randn(draw(st.integers(1, 2)), draw(st.integers(2, 6)), spec.d)
    return Generated(model, (x,), expected_attention(spec), spec,
                     may_be_dead=spec.ffn_act == "relu")
