"""Sparse training at equal final size: EcoSpa against the alternatives (CPU, char GPT).

    python bench/bench_training.py                         # the full run (3 seeds), ~30-40 min here
    python bench/bench_training.py --seeds 0 --steps 120   # a quick look

Writes ``bench/results/training.json``, ``bench/results/training_*.png`` and ``BENCHMARKS.md``.

Setup. A nanoGPT-style character model (``ecospa.models.GPT``: 3 layers, width 96, 4 heads,
FFN 384, context 64, tied embeddings; 348k parameters, 65-character vocabulary) trained on the
tiny-shakespeare text shipped with ecospa. The first 90% of the text is the training text, the
last 10% the validation text, never trained on. AdamW (lr 3e-3, betas 0.9/0.95, weight decay
0.1 on matrices, 5% warm-up then cosine to 10%), batch 32 x 64, gradient clipping at 1, fp32,
1 CPU thread. Every variant of a seed starts from the same initial weights (``torch.manual_seed
(seed)`` before building the model), sees the same batches in the same order and takes the same
number of optimizer steps.

Variants (all pruned ones end at the same parameter count, up to one unit; see below):

- ``dense``: the full model.
- ``small-dense``: the same architecture at the *final widths* of EcoSpa, trained from scratch:
  a fresh model (same initial weights) pruned with EcoSpa's final plan (``Plan.replay``) before
  the first step.
- ``ecospa``: ``ecospa.EcoSpa`` with Eq. 6 (``coupling_score="fisher"``) and Eq. 9
  (``unit_score="eq9"``), top_k 0.3, theta 0.9, pruning every ``steps // 50`` steps from 15% of
  the steps until 50% of the prunable parameters are gone (``target=0.5``).
- ``uncoupled``: the same schedule and the same number of removed parameters in the same
  couplings at the same steps as ``ecospa``, but each matrix's rows/columns are scored and
  removed independently: in each coupling that ``ecospa`` cut by k units, the k producer slices
  with the smallest L1 norm (q rows, k rows, v rows, FFN input rows, each with its bias entry)
  and, independently, the k reader slices with the smallest L1 norm (output-projection columns;
  for q·k the k rows) are zeroed. Implemented as masks re-applied after every optimizer step:
  the model keeps its dense shapes (dense compute and memory, plus the masks).
- ``random``: ``EcoSpa`` with ``coupling_score="random"``, ``unit_score="random"`` (coupled
  removal of random units in random couplings, same schedule knobs and target).
- ``ecospa-l1``: ``EcoSpa`` with ``coupling_score="magnitude"``, ``unit_score="magnitude"``:
  L1 group magnitude (sum of |w| over every slice of a unit) on ecospa's couplings.
- ``tp-l1``: torch_pruning 1.6 ``MetaPruner`` with ``GroupMagnitudeImportance(p=1)``, global
  ranking, at the same steps as ``ecospa`` and to the same parameter count after each event
  (the pruning ratio is searched so the removed count is closest; the search is left out of its
  wall clock, one pruner build and one pruning step per event are counted). torch_pruning cannot follow
  nanoGPT's ``split``/``view`` head layout (its importance indexing fails), so this variant's
  attention forward is rewritten in the timm layout (``reshape(B, T, 3, H, -1)``, same function,
  checked equal) and gets ``num_heads`` with ``prune_head_dims=True``: it removes the same
  head-dimension in q, k and v of every head at once, and FFN hidden units. The residual width
  is left alone (lm_head and output projections ignored) like ecospa. torch_pruning does not
  touch optimizer state; the AdamW moments of the surviving rows/columns are carried over by
  this benchmark (indices recorded from its pruning groups).
- ``svd``: the paper's Fig. 5 ablation. At ``ecospa``'s pruning events, every q·k and v·o
  coupling that ``ecospa`` cut from width w to r is replaced by the rank-r truncated SVD of its
  product instead: M = sum_j p_j r_j^T over units j, where p_j is the unit's producer vector
  (weight row plus bias entry) and r_j its reader vector (the k row plus bias for q·k, the
  output column for v·o), so scores x~^T M y~ (q·k) and outputs M^T x~ (v·o) are the products
  being truncated; the kept units get p_j = sqrt(s_j) u_j, r_j = sqrt(s_j) v_j (same parameter
  count as keeping r units) and their AdamW moments are reset. FFN couplings pass through a GELU,
  so there is no product to truncate: there ``svd`` removes the same number of units by Eq. 9,
  exactly as ``ecospa`` does.

How the runs are scheduled. Per seed: first ``ecospa`` is trained alone until it reaches its
target (phase 0), which yields the plan and the events (step, per-coupling counts, parameter
count after) that ``small-dense``, ``uncoupled``, ``svd`` and ``tp-l1`` follow. Then all variants,
``ecospa`` again included, are trained in lockstep (phase 1): every step, each takes one
optimizer step on the same batch, in an order rotating from step to step, so that load from
other processes falls on all alike and their wall clocks compare. Phase 1's ``ecospa`` is checked
to repeat phase 0's plan exactly. Wall clock is the sum of per-step times (forward, backward,
clipping, AdamW, pruning) plus a hook's setup (coupling discovery); evaluation is excluded.
Memory is computed from tensor sizes: weights + gradients + AdamW state (+ masks). Throughput
(forward of 8 x 64 tokens, and sampling 4 x 48 new tokens with ``GPT.generate``) is measured
after training, interleaved over all final models of the seed, median of rounds. Validation loss
is the mean next-character cross-entropy over all non-overlapping 64-character windows of the
validation text (1,742 windows).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ecospa
from ecospa.errors import ConfigError
from ecospa.models import GPT, GPTConfig
from ecospa.train import (CharCorpus, Run, TrainConfig, ecospa_hook, forward_throughput,
                          generate_throughput, train_interleaved)
from ecospa.train.plot import plot_curves

__all__ = ["main", "VARIANTS"]

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, str] = {
    "dense": "full model, no pruning",
    "small-dense": "EcoSpa's final widths, trained from scratch (plan replayed on the initial weights)",
    "ecospa": "EcoSpa: Eq. 6 coupled Fisher + Eq. 9 coupled removal (physical)",
    "uncoupled": "same schedule/budget, rows and columns of each matrix scored and removed independently (masks)",
    "random": "EcoSpa engine, random couplings and random units (coupled, physical)",
    "ecospa-l1": "EcoSpa engine, L1 group magnitude for couplings and units (coupled, physical)",
    "tp-l1": "torch_pruning MetaPruner, GroupMagnitudeImportance(p=1), global, same steps and sizes",
    "svd": "Fig. 5 ablation: rank-r truncated SVD of each q·k / v·o product at EcoSpa's events",
}


# ----------------------------------------------------------------------------- couplings


def coupling_sides(c: ecospa.Coupling) -> dict[int, list[tuple[str, int, np.ndarray, np.ndarray]]]:
    """The slices of a coupling split into its two operands: ``{0: producer, 1: reader}``.

    Each entry is ``(param, dim, units, indices)`` sorted by unit, one slice per unit. The side
    comes from discovery (``SliceTable.side``) when it gives one; otherwise sites with role
    ``"in"`` are readers and, when a coupling has none (q·k: both operands are output rows of the
    fused qkv Linear), the lower index of each unit is the producer (q), the other the reader (k).
    """
    roles = {(s.param, s.dim): s.role for s in c.sites}
    has_reader = any(r == "in" for r in roles.values())
    out: dict[int, list] = {0: [], 1: []}
    for t in c.tables:
        unit, index = np.asarray(t.unit), np.asarray(t.index)
        if getattr(t, "side", None) is not None:
            side = np.asarray(t.side, dtype=np.int64)
        elif has_reader:
            side = np.full(unit.size, 1 if roles.get((t.param, t.dim)) == "in" else 0)
        else:
            order = np.lexsort((index, unit))
            u = unit[order]
            first = np.ones(u.size, dtype=bool)
            first[1:] = u[1:] != u[:-1]
            side = np.zeros(unit.size, dtype=np.int64)
            side[order[~first]] = 1
        for s in (0, 1):
            m = side == s
            if not m.any():
                continue
            o = np.argsort(unit[m], kind="stable")
            u, i = unit[m][o], index[m][o]
            if not np.array_equal(u, np.arange(c.width)):
                raise ConfigError(f"coupling {c.name!r}: {t.param} dim {t.dim} side {s} does not hold "
                                  "exactly one slice per unit; this benchmark cannot split it")
            out[s].append((t.param, t.dim, u, i))
    return out


def side_matrix(params: dict[str, torch.Tensor], side: list) -> torch.Tensor:
    """``(width, n)`` float64: each unit's slices on one side, concatenated."""
    cols = []
    for name, dim, _, idx in side:
        p = params[name].detach()
        sl = p.index_select(dim, torch.as_tensor(idx)).movedim(dim, 0)
        cols.append(sl.reshape(sl.shape[0], -1).double())
    return torch.cat(cols, dim=1)


def write_side(params: dict[str, torch.Tensor], side: list, rows: torch.Tensor,
               optimizer: torch.optim.Optimizer | None) -> None:
    """Write ``rows`` ``(width, n)`` back into one side's slices; zero their AdamW moments."""
    off = 0
    with torch.no_grad():
        for name, dim, _, idx in side:
            p = params[name]
            shape = list(p.shape)
            shape.pop(dim)
            k = int(np.prod(shape)) if shape else 1
            block = rows[:, off:off + k].reshape(rows.shape[0], *shape).to(p.dtype).movedim(0, dim)
            ix = torch.as_tensor(idx)
            p.index_copy_(dim, ix, block)
            if optimizer is not None:
                for v in optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v.index_fill_(dim, ix, 0.0)
            off += k


# ----------------------------------------------------------------------------- hooks


class UncoupledMasks:
    """``uncoupled``: per coupling cut by k units, zero the k weakest producer slices and,
    independently, the k weakest reader slices (L1 norm each); masks re-applied every step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: dict[int, dict[str, int]], example: tuple):
        self.model, self.schedule = model, schedule
        self.params = dict(model.named_parameters())
        self.couplings = {c.name: c for c in ecospa.auto_couple(model, example)}
        self.sides = {n: coupling_sides(c) for n, c in self.couplings.items()}
        self.alive = {n: [np.ones(c.width, dtype=bool), np.ones(c.width, dtype=bool)]
                      for n, c in self.couplings.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.dense_params = sum(p.numel() for p in model.parameters())

    def _remove(self, name: str, k: int) -> None:
        for s in (0, 1):
            side = self.sides[name][s]
            score = side_matrix(self.params, side).abs().sum(1).numpy()
            alive = np.flatnonzero(self.alive[name][s])
            drop = alive[np.argsort(score[alive], kind="stable")[:k]]
            self.alive[name][s][drop] = False
            for pname, dim, _, idx in side:
                m = self.masks.setdefault(pname, torch.ones_like(self.params[pname], dtype=torch.bool))
                m.index_fill_(dim, torch.as_tensor(idx[drop]), False)

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        for name, k in self.schedule.get(step, {}).items():
            self._remove(name, k)
        for pname, m in self.masks.items():
            self.params[pname].mul_(m)

    def effective_params(self) -> int:
        """Dense count minus the masked entries."""
        return self.dense_params - sum(int((~m).sum()) for m in self.masks.values())

    def extra_bytes(self) -> int:
        """Bytes of the masks."""
        return sum(m.numel() * m.element_size() for m in self.masks.values())


class SvdAtEvents:
    """``svd``: at each scheduled event, truncated SVD of each cut q·k / v·o product; Eq. 9 for FFN."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: dict[int, dict[str, int]], example: tuple):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.cg = ecospa.auto_couple(model, example)
        self.imp = ecospa.Importance(model, self.cg, stats=())
        self.kept_energy: list[float] = []

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        todo = self.schedule.get(step)
        if not todo:
            return
        params = dict(self.model.named_parameters())
        removal: dict[ecospa.Coupling, list[int]] = {}
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, k in todo.items():
            c = self.cg[name]
            r = c.width - k
            if c.kind in ("qk", "vo"):
                sides = coupling_sides(c)
                a, b = side_matrix(params, sides[0]), side_matrix(params, sides[1])  # (w, n0), (w, n1)
                u, s, vh = torch.linalg.svd(a.T @ b, full_matrices=False)  # M = sum_j a_j b_j^T
                self.kept_energy.append(float((s[:r] ** 2).sum() / (s ** 2).sum().clamp_min(1e-30)))
                root = s[:r].sqrt()
                factors[name] = ((u[:, :r] * root).T, (vh[:r].T * root).T)  # (r, n0), (r, n1)
                removal[c] = list(range(r, c.width))  # which r slots stay does not matter: rewritten
            else:
                v = self.imp.unit_scores(c, "eq9")
                removal[c] = sorted(torch.argsort(v, stable=True)[:k].tolist())
        ecospa.prune(self.model, removal, self.optimizer, couplings=self.cg)
        self.cg = ecospa.remaining(self.cg, removal)
        self.imp.rebind(self.cg)
        params = dict(self.model.named_parameters())
        for name, (f0, f1) in factors.items():
            sides = coupling_sides(self.cg[name])
            write_side(params, sides[0], f0, self.optimizer)
            write_side(params, sides[1], f1, self.optimizer)

    def info(self) -> dict[str, Any]:
        """Mean fraction of the squared singular values kept by the truncations."""
        e = self.kept_energy
        return {"truncations": len(e), "mean_kept_energy": float(np.mean(e)) if e else None}


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


# ----------------------------------------------------------------------------- one seed


def _ecospa_knobs(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return dict(every=max(1, args.steps // 50), start=int(round(0.15 * args.steps)), top_k=0.3, theta=0.9,
                seed=seed)


def run_seed(seed: int, args: argparse.Namespace, corpus: CharCorpus, gcfg: GPTConfig,
             tcfg: TrainConfig) -> dict[str, Any]:
    """Phase 0 (EcoSpa alone, to its target) then phase 1 (every variant in lockstep)."""
    example = (torch.zeros(1, gcfg.block_size, dtype=torch.long),)

    def fresh() -> GPT:
        torch.manual_seed(seed)
        return GPT(gcfg)

    knobs = _ecospa_knobs(args, seed)
    # phase 0 -----------------------------------------------------------------------------
    ref = Run("ecospa", fresh(), tcfg, ecospa_hook(args.target, example, **knobs))
    starts = corpus.train_starts(tcfg.steps, tcfg.batch_size, tcfg.block_size, tcfg.seed)
    t0 = time.perf_counter()
    for i in range(tcfg.steps):
        ref.train_step(CharCorpus.windows(corpus.train, starts[i], tcfg.block_size))
        if ref.hook.sp.done:
            break
    sp0 = ref.hook.sp
    phase0_seconds = time.perf_counter() - t0
    if not sp0.done:
        raise ConfigError(f"EcoSpa did not reach its target within {tcfg.steps} steps (seed {seed}); "
                          "give more steps")
    plan = sp0.plan
    counts = {e.step: {n: len(v) for n, v in e.removals.items()} for e in sp0.events}
    sizes = {e.step: e.params_after for e in sp0.events}
    print(f"[seed {seed}] phase 0: EcoSpa reached {sp0.num_params:,} params in {len(sp0.events)} rounds "
          f"(steps {sp0.events[0].step}-{sp0.events[-1].step}), {phase0_seconds:.0f} s", flush=True)

    # phase 1 -----------------------------------------------------------------------------
    runs: list[Run] = []
    want = set(args.variants)
    if "dense" in want:
        runs.append(Run("dense", fresh(), tcfg))
    if "small-dense" in want:
        runs.append(Run("small-dense", plan.replay(fresh(), example_inputs=example), tcfg))
    if "ecospa" in want:
        runs.append(Run("ecospa", fresh(), tcfg, ecospa_hook(args.target, example, **knobs)))
    if "uncoupled" in want:
        runs.append(Run("uncoupled", fresh(), tcfg, lambda m, o: UncoupledMasks(m, o, counts, example)))
    if "random" in want:
        runs.append(Run("random", fresh(), tcfg, ecospa_hook(args.target, example, coupling_score="random",
                                                             unit_score="random", **knobs)))
    if "ecospa-l1" in want:
        runs.append(Run("ecospa-l1", fresh(), tcfg, ecospa_hook(args.target, example, coupling_score="magnitude",
                                                                unit_score="magnitude", **knobs)))
    if "tp-l1" in want:
        runs.append(Run("tp-l1", make_tp_compatible(fresh()), tcfg,
                        lambda m, o: TorchPruningL1(m, o, sizes, example)))
    if "svd" in want:
        runs.append(Run("svd", fresh(), tcfg, lambda m, o: SvdAtEvents(m, o, counts, example)))
    train_interleaved(runs, corpus, tcfg, progress=not args.no_progress, desc=f"seed {seed}")

    fwd_batch = CharCorpus.windows(corpus.val, corpus.val_starts(gcfg.block_size, 8), gcfg.block_size)[:, :-1]
    prompt = CharCorpus.windows(corpus.val, corpus.val_starts(16, 4), 16)[:, :-1]
    models = {r.name: r.model for r in runs}
    fwd = forward_throughput(models, fwd_batch, rounds=args.throughput_rounds)
    gen = generate_throughput(models, prompt, 48, rounds=max(2, args.throughput_rounds // 2), seed=seed)
    out: dict[str, Any] = {"seed": seed, "phase0_seconds": phase0_seconds, "plan_rounds": len(plan),
                           "events": [{"step": e.step, "params_after": e.params_after} for e in sp0.events],
                           "variants": {}}
    for r in runs:
        s = r.summary()
        s["forward_tokens_per_s"] = fwd[r.name]["tokens_per_s"]
        s["generate_tokens_per_s"] = gen[r.name]["tokens_per_s"]
        if r.name == "ecospa":
            s["plan_identical_to_phase0"] = r.hook.sp.plan == plan
        out["variants"][r.name] = s
    print(f"[seed {seed}] " + ", ".join(f"{n} {v['val_loss']:.4f} ({v['train_seconds']:.0f} s)"
                                       for n, v in out["variants"].items()), flush=True)
    return out


# ----------------------------------------------------------------------------- aggregate


METRICS = ("val_loss", "val_ppl", "params", "train_seconds", "train_time_vs_dense", "peak_state_bytes",
           "mean_state_bytes", "final_state_bytes", "forward_tokens_per_s", "generate_tokens_per_s",
           "forward_vs_dense", "generate_vs_dense")


def aggregate(seeds: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{variant: {metric: {"mean", "std", "values"}}}`` over seeds (ratios taken per seed first)."""
    names = list(seeds[0]["variants"])
    agg: dict[str, dict[str, dict[str, float]]] = {}
    for n in names:
        per: dict[str, list[float]] = {m: [] for m in METRICS}
        for sd in seeds:
            v = sd["variants"][n]
            d = sd["variants"].get("dense")
            for m in METRICS:
                if m == "train_time_vs_dense":
                    x = v["train_seconds"] / d["train_seconds"] if d else float("nan")
                elif m == "forward_vs_dense":
                    x = v["forward_tokens_per_s"] / d["forward_tokens_per_s"] if d else float("nan")
                elif m == "generate_vs_dense":
                    x = v["generate_tokens_per_s"] / d["generate_tokens_per_s"] if d else float("nan")
                else:
                    x = float(v[m])
                per[m].append(x)
        agg[n] = {m: {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                      "values": xs} for m, xs in per.items()}
    return agg


def _pm(a: dict[str, float], fmt: str) -> str:
    return f"{a['mean']:{fmt}} ± {a['std']:{fmt}}"


def markdown_table(agg: dict[str, Any]) -> str:
    """The main Markdown table, one row per variant."""
    head = ("| variant | val loss | val ppl | params | train wall clock (s) | vs dense | peak state (MiB) "
            "| final state (MiB) | fwd tokens/s | gen tokens/s |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    mib = lambda a: {k: (v / 2 ** 20 if k in ("mean", "std") else v) for k, v in a.items()}
    for n, a in agg.items():
        rows.append(
            f"| {n} | {_pm(a['val_loss'], '.4f')} | {_pm(a['val_ppl'], '.3f')} | {a['params']['mean']:,.0f} "
            f"| {_pm(a['train_seconds'], '.1f')} | {_pm(a['train_time_vs_dense'], '.2f')}× "
            f"| {_pm(mib(a['peak_state_bytes']), '.2f')} | {_pm(mib(a['final_state_bytes']), '.2f')} "
            f"| {a['forward_tokens_per_s']['mean']:,.0f} ({a['forward_vs_dense']['mean']:.2f}×) "
            f"| {a['generate_tokens_per_s']['mean']:,.0f} ({a['generate_vs_dense']['mean']:.2f}×) |")
    return "\n".join(rows)


def findings(agg: dict[str, Any], seeds: list[dict[str, Any]]) -> list[str]:
    """Plain statements computed from the numbers: where EcoSpa wins and where it loses."""
    out: list[str] = []
    if "ecospa" not in agg:
        return out
    e = agg["ecospa"]
    el, es = e["val_loss"]["mean"], e["val_loss"]["std"]

    def diff(n: str) -> str:
        o = agg[n]["val_loss"]
        per = [a - b for a, b in zip(e["val_loss"]["values"], o["values"])]
        wins = sum(1 for x in per if x < 0)
        sd = statistics.stdev(per) if len(per) > 1 else 0.0
        return (f"{n} {o['mean']:.4f} ± {o['std']:.4f} (paired per seed: EcoSpa − {n} = "
                f"{statistics.fmean(per):+.4f} ± {sd:.4f} nats, EcoSpa lower in {wins}/{len(per)} seeds)")

    out.append(f"EcoSpa validation loss {el:.4f} ± {es:.4f} at {e['params']['mean']:,.0f} parameters.")
    for n in agg:
        if n != "ecospa":
            out.append("vs " + diff(n) + ".")
    if "dense" in agg:
        d = agg["dense"]
        gap = (el - d["val_loss"]["mean"]) / d["val_loss"]["mean"] * 100
        out.append(f"Against dense: {gap:+.2f}% validation loss with "
                   f"{e['params']['mean'] / d['params']['mean']:.1%} of the parameters; training wall clock "
                   f"{e['train_time_vs_dense']['mean']:.2f}× dense; peak training state "
                   f"{e['peak_state_bytes']['mean'] / d['peak_state_bytes']['mean']:.2f}× dense (EcoSpa starts "
                   f"dense), averaged over the steps {e['mean_state_bytes']['mean'] / d['mean_state_bytes']['mean']:.2f}×, "
                   f"final {e['final_state_bytes']['mean'] / d['final_state_bytes']['mean']:.2f}×; "
                   f"forward {e['forward_vs_dense']['mean']:.2f}× and generation "
                   f"{e['generate_vs_dense']['mean']:.2f}× dense tokens/s.")
    if "small-dense" in agg:
        s = agg["small-dense"]
        out.append(f"Against small-dense (same final widths, trained small from the start): training "
                   f"wall clock {e['train_seconds']['mean'] / s['train_seconds']['mean']:.2f}× small-dense's; "
                   f"peak state {e['peak_state_bytes']['mean'] / s['peak_state_bytes']['mean']:.2f}×.")
    same = all(sd["variants"]["ecospa"].get("plan_identical_to_phase0") for sd in seeds)
    out.append(f"Phase-1 EcoSpa repeated phase 0's plan exactly in every seed: {same}.")
    return out


def write_markdown(result: dict[str, Any], path: Path, plots: list[str]) -> None:
    """BENCHMARKS.md: what was run, the table, the plots, the findings."""
    agg, cfg = result["aggregate"], result["config"]
    host = result["host"]
    lines = [
        "# Benchmarks: sparse training at equal final size",
        "",
        f"Generated by `{result['command']}` on {result['date']}. Raw numbers: "
        "[bench/results/training.json](bench/results/training.json). Other benchmarks: "
        "[bench/results/speed.md](bench/results/speed.md) (forward speed of pruned GPT-2 small), "
        "[bench/results/discovery.md](bench/results/discovery.md).",
        "",
        "**Question.** At the same final parameter count and the same number of training steps, on the "
        "same data and seeds, does EcoSpa train a better model, faster, than the alternatives?",
        "",
        "**Setup.** nanoGPT-style character model (`ecospa.models.GPT`: "
        f"{cfg['model']['n_layer']} layers, width {cfg['model']['n_embd']}, {cfg['model']['n_head']} heads, "
        f"FFN {4 * cfg['model']['n_embd']}, context {cfg['model']['block_size']}, tied embeddings, "
        f"{agg['dense']['params']['mean']:,.0f} parameters if dense) on the tiny-shakespeare text shipped "
        f"with ecospa: first 90% train, last 10% validation (never trained on; the loss is over all of it). "
        f"{cfg['train']['steps']} AdamW steps of {cfg['train']['batch_size']} × {cfg['train']['block_size']} "
        f"characters, lr {cfg['train']['lr']}, seeds {cfg['seeds']}, fp32, {cfg['threads']} CPU thread, "
        f"device: CPU ({host['cpu_count']} cores, shared with other jobs; load average "
        f"{host['loadavg_before']} before, {host['loadavg_after']} after). Pruned variants go to "
        f"{cfg['target']:.0%} of the prunable parameters (those inside exact couplings), i.e. "
        f"{agg['ecospa']['params']['mean'] / agg['dense']['params']['mean']:.1%} of all parameters "
        "(embeddings, norms and the residual width are not prunable), starting at 15% of the steps, every "
        f"{cfg['ecospa']['every']} steps.",
        "",
        "## Results (mean ± std over seeds)",
        "",
        markdown_table(agg),
        "",
        "- *train wall clock*: sum of per-step times (forward, backward, AdamW, pruning) plus coupling "
        "discovery; evaluation excluded. All variants of a seed were trained in lockstep (one step each, "
        "rotating order), so their times share the machine's load; *vs dense* is the per-seed ratio.",
        "- *state*: weights + gradients + AdamW moments (+ masks for `uncoupled`), from tensor sizes; "
        "*peak* is the largest over training, *final* at the end. Activations are not counted.",
        "- *fwd tokens/s*: forward of 8 × 64 tokens in eval mode; *gen tokens/s*: `GPT.generate`, 4 prompts "
        "× 48 new tokens (no KV cache in this model). Median of rounds interleaved across all variants; "
        "(×) is relative to dense.",
        "",
    ]
    for p in plots:
        rel = os.path.relpath(p, path.resolve().parent)
        lines += [f"![{Path(p).stem}]({rel})", ""]
    lines += ["## Findings (computed from the numbers above)", ""]
    lines += [f"- {f}" for f in result["findings"]]
    lines += ["", "## Variants", ""]
    lines += [f"- `{n}`: {d}" for n, d in VARIANTS.items() if n in agg]
    lines += ["", "Exact definitions (what `uncoupled`, `tp-l1` and `svd` do precisely) are in the docstring "
              "of [bench/bench_training.py](bench/bench_training.py).", ""]
    extra = result.get("analysis")
    if extra:
        lines += ["## Where EcoSpa loses, and why", "", extra, ""]
    path.write_text("\n".join(lines))


def make_plots(seeds: list[dict[str, Any]], agg: dict[str, Any], out_dir: Path) -> list[str]:
    """Curves (mean over seeds, min-max band) and a bar chart of the final validation loss."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    series = []
    for n in agg:
        hs = [sd["variants"][n]["history"] for sd in seeds]
        k = min(len(h) for h in hs)
        hist = [{"step": hs[0][i]["step"],
                 "train_seconds": statistics.fmean(h[i]["train_seconds"] for h in hs),
                 "val_loss": statistics.fmean(h[i]["val_loss"] for h in hs)} for i in range(k)]
        band = {"step": [hs[0][i]["step"] for i in range(k)],
                "lo": [min(h[i]["val_loss"] for h in hs) for i in range(k)],
                "hi": [max(h[i]["val_loss"] for h in hs) for i in range(k)]}
        series.append({"label": n, "history": hist, "band": band,
                       "param_trace": seeds[0]["variants"][n]["param_trace"]})
    curves = plot_curves(series, out_dir / "training_curves.png",
                         title="char GPT on tinyshakespeare: mean over seeds (band: min-max); sizes: seed "
                               f"{seeds[0]['seed']}")
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(agg)
    means = [agg[n]["val_loss"]["mean"] for n in names]
    stds = [agg[n]["val_loss"]["std"] for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=["#888" if n in ("dense", "small-dense") else "#1f77b4"
                                                      for n in names])
    lo, hi = min(means) - 3 * max(stds + [0.005]), max(means) + 3 * max(stds + [0.005])
    ax.set_ylim(lo, hi)
    ax.set_ylabel("final validation loss (nats/char)")
    ax.set_title("final validation loss, mean ± std over seeds (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    bars = out_dir / "training_final.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [str(curves), str(bars)]


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target", type=float, default=0.5, help="fraction of prunable parameters kept")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--throughput-rounds", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    ap.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"), help="Markdown report path ('' for none)")
    ap.add_argument("--analysis", default=None, help="a Markdown file whose text goes under 'Where EcoSpa "
                    "loses, and why' (default: bench/results/training_analysis.md if present)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild the plots and the Markdown report from OUT/training.json")
    args = ap.parse_args(argv)
    if args.steps < 40:
        ap.error(f"--steps should be at least 40, got {args.steps}")
    if "ecospa" not in args.variants:
        args.variants.append("ecospa")
    return args


def report(result: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> None:
    """Findings, analysis text, plots, JSON and Markdown from a finished ``result``."""
    result["findings"] = findings(result["aggregate"], result["seeds"])
    analysis = Path(args.analysis) if args.analysis else out_dir / "training_analysis.md"
    if analysis.is_file():
        result["analysis"] = analysis.read_text().strip()
    plots = make_plots(result["seeds"], result["aggregate"], out_dir)
    (out_dir / "training.json").write_text(json.dumps(result, indent=1, default=float))
    if args.md:
        write_markdown(result, Path(args.md), plots)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        result = json.loads((out_dir / "training.json").read_text())
        report(result, args, out_dir)
        print(markdown_table(result["aggregate"]))
        return 0
    corpus = CharCorpus.tinyshakespeare()
    gcfg = GPTConfig(block_size=args.block, vocab_size=corpus.vocab_size, n_layer=args.layers,
                     n_head=args.heads, n_embd=args.width)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    seeds = []
    for seed in args.seeds:
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, block_size=args.block, lr=args.lr,
                           warmup=max(1, args.steps // 20), eval_every=max(1, args.steps // 12),
                           eval_windows=192, final_eval_windows=None, seed=seed)
        seeds.append(run_seed(seed, args, corpus, gcfg, tcfg))
    agg = aggregate(seeds)
    order = [n for n in VARIANTS if n in agg]
    agg = {n: agg[n] for n in order}
    result: dict[str, Any] = {
        "command": "python bench/bench_training.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"seeds": args.seeds, "target": args.target, "threads": args.threads,
                   "model": asdict(gcfg), "train": asdict(tcfg), "ecospa": _ecospa_knobs(args, 0) | {"seed": "= seed"},
                   "variants": order},
        "variants": {n: VARIANTS[n] for n in order},
        "host": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                 "cpu_count": os.cpu_count(), "device": "cpu", "loadavg_before": load_before,
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "total_seconds": time.perf_counter() - t0,
        "aggregate": agg,
        "seeds": seeds,
    }
    report(result, args, out_dir)
    print()
    print(markdown_table(agg))
    print()
    for f in result["findings"]:
        print("-", f)
    print(f"\n{result['total_seconds'] / 60:.1f} min; wrote {out_dir / 'training.json'}"
          + (f" and {args.md}" if args.md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
