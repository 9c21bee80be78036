"""``tp-l1``: torch_pruning 1.6's ``MetaPruner`` (group L1, global) as a step hook at EcoSpa's steps.

torch_pruning cannot follow nanoGPT's ``split``/``view`` head layout, so :func:`make_tp_compatible`
rewrites the attention forward in the timm qkv layout (same function). At each scheduled step the
global pruning ratio is bisected so the removed count is closest to EcoSpa's parameter count after
that event (the search is left out of the wall clock); torch_pruning does not touch optimizer state,
so the AdamW moments of the surviving rows/columns are carried over here.
"""
from __future__ import annotations

import math
import time
import types
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ecospa.recipes.nanogpt import GPT

__all__ = ["make_tp_compatible", "TorchPruningL1"]

def _timm_attention_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT attention in the timm qkv layout (torch_pruning can follow it); same function.

    The attention scale stays 1/sqrt(original head width), as ecospa keeps it.
    """
    B, T, _ = x.shape
    qkv = self.c_attn(x).reshape(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hs)
    q, k, v = qkv.unbind(0)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._bench_scale)  # (B, H, T, hs)
    return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))


def make_tp_compatible(model: GPT) -> GPT:
    """Switch every attention block of ``model`` to :func:`_timm_attention_forward`, in place."""
    for block in model.transformer.h:
        attn = block.attn
        attn._bench_scale = 1.0 / math.sqrt(attn.n_embd // attn.n_head)
        attn.forward = types.MethodType(_timm_attention_forward, attn)
    return model


class TorchPruningL1:
    """``tp-l1``: torch_pruning group L1 pruning to EcoSpa's parameter counts at EcoSpa's steps."""

    def __init__(self, model: GPT, optimizer: torch.optim.Optimizer, schedule: dict[int, int],
                 example: tuple):
        import torch_pruning as tp

        self.tp, self.model, self.optimizer, self.schedule = tp, model, optimizer, schedule
        self.example = example[0]
        blocks = list(model.transformer.h)
        self.ignored = [model.lm_head] + [b.attn.c_proj for b in blocks] + [b.mlp.c_proj for b in blocks]
        self.n_head = {b.attn.c_attn: b.attn.n_head for b in blocks}
        self.misses: list[int] = []
        self.excluded_seconds = 0.0  # the ratio search (bookkeeping of this benchmark, not torch_pruning's cost)

    def _pruner(self):
        tp = self.tp
        return tp.pruner.MetaPruner(
            self.model, self.example, importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=0.5, global_pruning=True, iterative_steps=1, max_pruning_ratio=0.95,
            ignored_layers=self.ignored, num_heads=dict(self.n_head), prune_head_dims=True,
            prune_num_heads=False)

    def _groups(self, pr, ratio: float, apply: bool) -> tuple[int, dict]:
        pr.current_step = 0
        pr._scope_initial_channels = {}
        pr.per_step_pruning_ratio = [0.0, float(ratio)]
        removed, record = 0, {}
        for group in pr.step(interactive=True):
            for dep, idxs in group:
                mod = dep.target.module
                if not isinstance(mod, nn.Linear) or not len(idxs):
                    continue
                out = bool(pr.DG.is_out_channel_pruning_fn(dep.handler))
                if (mod, out) in record:
                    continue
                record[(mod, out)] = sorted(int(i) for i in idxs)
                per = (mod.in_features + (mod.bias is not None)) if out else mod.out_features
                removed += len(idxs) * per
            if apply:
                group.prune()
        return removed, record

    def __call__(self, step: int) -> None:
        target = self.schedule.get(step)
        if target is None:
            return
        current = sum(p.numel() for p in self.model.parameters())
        need = current - target
        if need <= 0:
            return
        pr = self._pruner()
        t0 = time.perf_counter()
        lo, hi, best = 0.0, 0.95, (None, math.inf)
        for _ in range(14):  # bisection on the global ratio: removed(ratio) is non-decreasing
            mid = (lo + hi) / 2
            removed, _ = self._groups(pr, mid, apply=False)
            if abs(removed - need) < best[1]:
                best = (mid, abs(removed - need))
            if removed < need:
                lo = mid
            elif removed > need:
                hi = mid
            else:
                break
        self.excluded_seconds += time.perf_counter() - t0
        before = {m: (m.weight, m.bias) for m in self.model.modules() if isinstance(m, nn.Linear)}
        _, record = self._groups(pr, best[0], apply=True)
        self._carry_state(before, record)
        self.misses.append(sum(p.numel() for p in self.model.parameters()) - target)

    def _carry_state(self, before: dict, record: dict) -> None:
        """Slice the AdamW state of the pruned Linears and point the param groups at the new tensors."""
        swap: dict[int, nn.Parameter] = {}
        for m, (w_old, b_old) in before.items():
            if m.weight is w_old and (m.bias is b_old):
                continue
            keep_out = keep_in = None
            if (m, True) in record:
                gone = set(record[(m, True)])
                keep_out = torch.tensor([i for i in range(w_old.shape[0]) if i not in gone])
            if (m, False) in record:
                gone = set(record[(m, False)])
                keep_in = torch.tensor([i for i in range(w_old.shape[1]) if i not in gone])
            for old, new, dims in ((w_old, m.weight, (keep_out, keep_in)), (b_old, m.bias, (keep_out,))):
                if old is None or new is None or old is new:
                    continue
                st = self.optimizer.state.pop(old, None)
                if st is not None:
                    for key, v in list(st.items()):
                        if torch.is_tensor(v) and v.shape == old.shape:
                            for d, keep in enumerate(dims):
                                if keep is not None:
                                    v = v.index_select(d, keep)
                            st[key] = v
                    self.optimizer.state[new] = st
                swap[id(old)] = new
        for g in self.optimizer.param_groups:
            g["params"] = [swap.get(id(p), p) for p in g["params"]]

    def info(self) -> dict[str, Any]:
        """Parameter-count misses after each event (pruned - target) and the ratio search time."""
        return {"misses": self.misses, "ratio_search_seconds": self.excluded_seconds}
