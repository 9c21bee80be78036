"""Ragged heads: which layout runs heads of different widths fastest (issue 9, item 2).

Plain PyTorch, no ecospa at run time: a stack of GPT-2-small-shaped blocks (LayerNorm, one qkv
Linear, SDPA, output Linear, FFN at half width) built directly at the widths to compare, fresh
weights. The per-head kept widths of the ragged layouts are those of ecospa's ragged plan for the
HF GPT-2 model of the ``gpt2`` section (per layer: the kept q/k width and the kept v width of each
head). Variants:

- ``dense``: every head 64 wide (q/k and v); FFN 3072.
- ``uniform``: every head keeps half (32); the fastest layout, for comparison.
- ``padded``: ecospa's narrow layout: every head of a layer runs at the layer's largest kept
  width rounded up to a multiple of 8 (q/k and v separately), one SDPA call per layer; where the
  q/k and v widths differ, the narrower is padded with zeros for the SDPA call (as ecospa's narrow
  rule does: CPU's fused kernel needs one width).
- ``padded_unequal``: the same without that last padding: SDPA runs its math kernel where the q/k
  and v widths differ (ecospa before the fix).
- ``grouped``: heads grouped by their larger kept width (q/k or v) rounded up to 8, one SDPA call
  per group at that width; the qkv Linear lays each group out contiguously, so groups are views.
- ``per_head``: every head at its exact widths (the narrower padded for SDPA), one call per head.

Forward (``inference_mode``) and forward + backward (gradient of a squared mean), interleaved.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.speed.timing import interleaved, summarise


def _up8(w: int, cap: int) -> int:
    return min(cap, -(-w // 8) * 8)


class RaggedAttention(nn.Module):
    """Heads ``groups``: ``[(n_heads, qk width, v width), ...]``, one SDPA call per group."""

    def __init__(self, d: int, groups: list[tuple[int, int, int]], head_dim: int, equalise: bool = True):
        super().__init__()
        self.groups, self.equalise = groups, equalise
        self.scale = head_dim ** -0.5  # the dense scale, as ecospa keeps it
        self.qkv = nn.Linear(d, sum(h * (2 * q + v) for h, q, v in groups))
        self.proj = nn.Linear(sum(h * v for h, _, v in groups), d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        parts = self.qkv(x).split([h * (2 * q + v) for h, q, v in self.groups], dim=-1)
        ys = []
        for (h, q, v), p in zip(self.groups, parts):
            qq, kk, vv = p.split([h * q, h * q, h * v], dim=-1)
            qq, kk = (t.view(B, T, h, q).transpose(1, 2) for t in (qq, kk))
            vv = vv.view(B, T, h, v).transpose(1, 2)
            if self.equalise and q > v:
                vv = F.pad(vv, (0, q - v))
            elif self.equalise and v > q:
                qq, kk = F.pad(qq, (0, v - q)), F.pad(kk, (0, v - q))
            y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=self.scale)[..., :v]
            ys.append(y.transpose(1, 2).reshape(B, T, h * v))
        return self.proj(ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1))


class RaggedBlock(nn.Module):
    def __init__(self, d: int, groups, head_dim: int, ffn: int, equalise: bool = True):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = RaggedAttention(d, groups, head_dim, equalise)
        self.fc, self.out = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


def layer_groups(widths: list[tuple[list[int], list[int]]], head_dim: int, layout: str) -> list[list[tuple[int, int, int]]]:
    """Per layer, the head groups of ``layout`` from the per-head kept widths ``(qk, v)``."""
    out = []
    for qk, v in widths:
        if layout in ("padded", "padded_unequal"):
            out.append([(len(qk), _up8(max(qk), head_dim), _up8(max(v), head_dim))])
        elif layout == "grouped":
            count: dict[int, int] = {}
            for a, b in zip(qk, v):
                w = _up8(max(a, b), head_dim)
                count[w] = count.get(w, 0) + 1
            out.append([(n, w, w) for w, n in sorted(count.items())])
        elif layout == "per_head":
            out.append([(1, a, b) for a, b in zip(qk, v)])
        else:
            raise ValueError(layout)
    return out


def plan_widths(cg, plan, head_dim: int) -> list[tuple[list[int], list[int]]]:
    """Per attention scope, in model order: the kept (q/k, v) width of every head."""
    scopes: dict[str, dict[str, list[int]]] = {}
    for c in cg:
        if c.kind in ("qk", "vo"):
            kept = (c.width - len(plan.get(c.name, ()))) * head_dim // c.width
            scopes.setdefault(c.scope, {"qk": [], "vo": []})[c.kind].append(kept)
    return [(s["qk"], s["vo"]) for s in scopes.values()]


def stack(d: int, per_layer, head_dim: int, ffn: int, equalise: bool = True) -> nn.Module:
    return nn.Sequential(*(RaggedBlock(d, g, head_dim, ffn, equalise) for g in per_layer))


def _flops(m: nn.Module, batch: int, seq: int, executed: bool = True) -> int:
    """Matmul FLOPs (full T x T): as executed (q/k and v padded to one width where ``equalise``),
    or at the kept widths."""
    lin = sum(2 * batch * seq * mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))
    attn = sum(2 * batch * seq * seq * h * (2 * max(q, v) if executed and mod.equalise else q + v)
               for mod in m.modules() if isinstance(mod, RaggedAttention) for h, q, v in mod.groups)
    return lin + attn


def section(a, cg, plan, cfg: dict, lengths) -> dict:
    """Every layout, interleaved, per ``(batch, seq)`` of ``lengths``."""
    d, n_head, n_layer = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    hd = d // n_head
    widths = plan_widths(cg, plan, hd)
    torch.manual_seed(a.seed)
    models = {"dense": stack(d, [[(n_head, hd, hd)]] * n_layer, hd, cfg["ffn"]),
              "uniform": stack(d, [[(n_head, hd // 2, hd // 2)]] * n_layer, hd, cfg["ffn"] // 2)}
    for layout in ("padded", "padded_unequal", "grouped", "per_head"):
        models[layout] = stack(d, layer_groups(widths, hd, layout), hd, cfg["ffn"] // 2, layout != "padded_unequal")
    res: dict = dict(widths=widths, groups={k: [list(map(list, g)) for g in layer_groups(widths, hd, k)]
                                            for k in ("padded", "grouped")}, lengths=[])
    for batch, seq in lengths:
        x = torch.randn(batch, seq, d, generator=torch.Generator().manual_seed(3))
        fl = {k: _flops(m, batch, seq) for k, m in models.items()}
        exact = _flops(models["per_head"], batch, seq, executed=False)  # the ragged plan's own FLOPs
        ideal = {k: fl["dense"] / (exact if k not in ("dense", "uniform") else f) for k, f in fl.items()}

        def fwd(m):
            def f():
                with torch.inference_mode():
                    m(x)
            return f

        def train(m):
            def f():
                m(x).pow(2).mean().backward()
                m.zero_grad(set_to_none=True)
            return f

        row = dict(batch=batch, seq=seq, flops=fl, load_per_round={"forward": [], "train": []})
        row["forward"] = summarise(interleaved({k: fwd(m) for k, m in models.items()}, a.rounds, a.warmup,
                                               row["load_per_round"]["forward"]), ideal=ideal)
        row["train"] = summarise(interleaved({k: train(m) for k, m in models.items()}, a.train_rounds, a.train_warmup,
                                             row["load_per_round"]["train"]), ideal=ideal)
        print(f"  layouts {batch}x{seq}: " + ", ".join(f"{k} {row['forward'][k]['speedup']:.2f}x/{row['train'][k]['speedup']:.2f}x"
                                                      for k in models), flush=True)
        res["lengths"].append(row)
    return res
