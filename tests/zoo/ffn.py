"""Feed-forward modules of the zoo, each with the couplings it must yield.

Plain FFN, SwiGLU (separate and fused gate/up), a hidden read by two consumers, a low-rank pair,
an FFN with a LayerNorm inside (inexact), an FFN with a learned per-channel gain, and a mixture
of two experts weighted by a softmax gate.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.zoo.expect import Expect, ffn_expect, glu_expect, lin_in, lin_out

__all__ = [
    "ACTIVATIONS",
    "FFN",
    "SwiGLU",
    "FusedGLU",
    "TwoReaders",
    "LowRankStack",
    "LayerNormFFN",
    "SoftmaxFFN",
    "MeanReadFFN",
    "GainFFN",
    "MoE",
]

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "identity": lambda x: x,
}


class FFN(nn.Module):
    """``fc_out(act(fc_in(x)))`` with optional dropout on the output."""

    def __init__(self, d: int, f: int, act: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.c_fc = nn.Linear(d, f, bias=bias)
        self.c_proj = nn.Linear(f, d, bias=bias)
        self.act = act
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(ACTIVATIONS[self.act](self.c_fc(x))))

    @staticmethod
    def expected(prefix: str, f: int, bias: bool = True, act: str = "gelu") -> list[Expect]:
        """One ``ffn`` coupling (``linear`` for the identity activation)."""
        kind = "linear" if act == "identity" else "ffn"
        return [ffn_expect(f"{prefix}c_fc", f"{prefix}c_proj", f, bias=bias, kind=kind)]


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases (Llama's MLP)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    @staticmethod
    def expected(prefix: str, f: int) -> list[Expect]:
        """One ``glu`` coupling: gate row + up row + down column."""
        return [glu_expect(f"{prefix}gate_proj", f"{prefix}up_proj", f"{prefix}down_proj", f)]


class FusedGLU(nn.Module):
    """Gate and up fused in one Linear, then ``chunk(2)`` (gate rows first)."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.w12 = nn.Linear(d, 2 * f, bias=False)
        self.w3 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * up)

    @staticmethod
    def expected(prefix: str, f: int) -> list[Expect]:
        """One ``glu`` coupling over the fused projection."""
        return [glu_expect(f"{prefix}w12", None, f"{prefix}w3", f)]


class TwoReaders(nn.Module):
    """A hidden read by two Linears whose outputs are added."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.read_a = nn.Linear(f, d)
        self.read_b = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hid = F.relu(self.fc(x))
        return x + self.read_a(hid) + self.read_b(hid)

    @staticmethod
    def expected(prefix: str, f: int) -> list[Expect]:
        """One ``ffn`` coupling whose units hold both readers' columns."""
        return [ffn_expect(f"{prefix}fc", [f"{prefix}read_a", f"{prefix}read_b"], f)]


class LowRankStack(nn.Module):
    """``head(relu(up(down(relu(inp(x))))))``: the low-rank pair down/up has nothing between."""

    def __init__(self, d_in: int = 16, d: int = 24, r: int = 4, d_out: int = 8):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.down = nn.Linear(d, r, bias=False)
        self.up = nn.Linear(r, d)
        self.head = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.up(self.down(F.relu(self.inp(x))))))

    @staticmethod
    def expected(d: int = 24, r: int = 4) -> list[Expect]:
        """inp->down (ffn), down->up (linear), up->head (ffn); head produces the output."""
        return [
            ffn_expect("inp", "down", d),
            ffn_expect("down", "up", r, bias=False, kind="linear"),
            ffn_expect("up", "head", d),
        ]


class LayerNormFFN(nn.Module):
    """A LayerNorm over the hidden width between fc and out: the coupling is inexact."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.norm = nn.LayerNorm(f)
        self.out = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(F.gelu(self.norm(self.fc(x))))


class SoftmaxFFN(nn.Module):
    """A softmax over the hidden width between fc and out: the coupling is inexact."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.out = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.fc(x).softmax(dim=-1))


class MeanReadFFN(nn.Module):
    """The hidden is also averaged over its width (a mean read): the coupling is inexact."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.out = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hid = F.gelu(self.fc(x))
        return x + self.out(hid) + hid.mean(dim=-1, keepdim=True)


class GainFFN(nn.Module):
    """A learned per-channel gain multiplies the hidden: the gain rides along in every unit."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc = nn.Linear(d, f)
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(f))
        self.out = nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(F.gelu(self.fc(x)) * self.gain)

    @staticmethod
    def expected(f: int) -> list[Expect]:
        """fc row + fc bias + gain entry + out column."""
        units = [lin_out("fc", j) + [("gain", 0, j)] + lin_in("out", j) for j in range(f)]
        roles = [["in", "in", "gain", "out"]] * f
        return [Expect.of("ffn", units, roles)]


class MoE(nn.Module):
    """Two experts applied densely, weighted by a softmax router."""

    def __init__(self, d: int, f: int, n_experts: int = 2):
        super().__init__()
        self.router = nn.Linear(d, n_experts)
        self.experts = nn.ModuleList(FFN(d, f, "gelu") for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.router(x).softmax(dim=-1)  # (..., E)
        y = sum(w[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        return x + y

    @staticmethod
    def expected(prefix: str, f: int, n_experts: int = 2) -> list[Expect]:
        """One ``ffn`` coupling per expert; the router couples with nothing."""
        return [e for i in range(n_experts) for e in FFN.expected(f"{prefix}experts.{i}.", f)]
