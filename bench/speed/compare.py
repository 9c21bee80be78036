"""The variants of a comparison and how they are checked, timed and profiled.

A :class:`Variant` is a model with its own AdamW, its FLOP spec and, for ecospa variants, the
couplings and plan it was pruned with. :func:`ecospa_variant` prunes a copy of a dense model and
checks it against the masked dense model; :func:`time_lengths` times every variant interleaved
(whole-model forward, body forward, train step) per input shape; :func:`execution` reads
``ecospa.execution_report``.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

import ecospa
from bench.speed import flops, plans, subjects
from bench.speed.timing import interleaved, profile_ops, summarise


@dataclass
class Variant:
    model: torch.nn.Module
    spec: flops.Spec
    cg: object = None
    plan: dict | None = None
    opt: torch.optim.Optimizer | None = None
    ecospa: bool = False


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tokens(vocab: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def step(m, opt, x):
    subjects.loss_of(m, x).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def ecospa_variant(dense, spec, cg, plan, vocab, lr, narrow: bool | str = True) -> tuple[Variant, dict]:
    """A pruned copy of ``dense`` with its own AdamW (stepped once before pruning, so moments
    exist and are sliced), checked against the masked dense model in eval and train mode.
    ``narrow``: as ``ecospa.prune``'s (``"padded"``: ragged heads padded, not grouped)."""
    m = copy.deepcopy(dense).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    x = tokens(vocab, 2, 64, 1)
    step(m, opt, x)
    masked = plans.masked_copy(m, cg, plan)
    t0 = time.perf_counter()
    ecospa.prune(m, plan, optimizer=opt, couplings=cg, narrow=narrow)
    info = dict(prune_s=time.perf_counter() - t0, params=flops.param_count(m), **plans.plan_summary(cg, plan))
    for mode in ("eval", "train"):
        m.train(mode == "train")
        masked.train(mode == "train")
        with torch.no_grad():  # not inference_mode: a first call under it cannot capture (see probes)
            t0 = time.perf_counter()
            got = subjects.logits_of(m, x)
            info[f"first_call_{mode}_s"] = time.perf_counter() - t0
            info[f"rel_err_{mode}"] = _rel(got, subjects.logits_of(masked, x))
    m.eval()
    return Variant(m, spec, cg, plan, opt, ecospa=True), info


def dense_variant(model, spec, lr) -> Variant:
    return Variant(model.eval(), spec, opt=torch.optim.AdamW(model.parameters(), lr=lr))


def regions(model) -> list[dict]:
    return [dict(path=r.path, narrow_calls=r.narrow_calls, fallback_calls=r.fallback_calls,
                 reasons=list(r.reasons), kv_cache=r.kv_cache) for r in ecospa.execution_report(model)]


def execution(variants: dict[str, Variant]) -> dict:
    out = {}
    for k, v in variants.items():
        if v.ecospa:
            rows = regions(v.model)
            out[k] = dict(all_narrow=bool(rows) and all(r["fallback_calls"] == 0 and r["narrow_calls"] > 0 for r in rows),
                          regions=len(rows), narrow_calls=sum(r["narrow_calls"] for r in rows),
                          fallback_calls=sum(r["fallback_calls"] for r in rows),
                          not_narrow=[r for r in rows if r["fallback_calls"] or not r["narrow_calls"]])
    return out


def time_lengths(variants: dict[str, Variant], lengths, vocab: int, rounds: int, warmup: int,
                 train_rounds: int, train_warmup: int) -> list[dict]:
    """Forward (whole model, body) and train step per (batch, seq), all variants interleaved.
    Every variant is first called once at the shape in eval and in train mode (``no_grad``), so
    a narrow graph a new shape needs is built before any timed or warm-up round."""
    out = []
    for i, (batch, seq) in enumerate(lengths):
        x = tokens(vocab, batch, seq, 10 + i)
        fl = {k: flops.count(v.model, v.spec, batch, seq, v.cg, v.plan) for k, v in variants.items()}
        ideal = {k: fl["dense"]["total"] / f["total"] for k, f in fl.items()}
        ideal_body = {k: fl["dense"]["body"] / f["body"] for k, f in fl.items()}
        row = dict(batch=batch, seq=seq, flops=fl, load_before=load())
        for v in variants.values():
            for mode in (True, False):
                v.model.train(mode)
                with torch.no_grad():  # a new shape is captured here, never under inference_mode
                    subjects.logits_of(v.model, x)

        def fwd(m, body=False):
            def f():
                with torch.inference_mode():
                    (subjects.body_of if body else subjects.logits_of)(m, x)
            return f

        loads: dict[str, list] = {"forward": [], "body": [], "train": []}
        row["forward"] = summarise(interleaved({k: fwd(v.model) for k, v in variants.items()}, rounds, warmup,
                                               loads["forward"]), ideal=ideal)
        row["body"] = summarise(interleaved({k: fwd(v.model, True) for k, v in variants.items()}, rounds, warmup,
                                            loads["body"]), ideal=ideal_body)
        if train_rounds:
            for v in variants.values():
                v.model.train()
            row["train"] = summarise(interleaved({k: (lambda v=v: step(v.model, v.opt, x)) for k, v in variants.items()},
                                                 train_rounds, train_warmup, loads["train"]), ideal=ideal)
            for v in variants.values():
                v.model.eval()
        row["load_after"] = load()
        row["load_per_round"] = loads
        print(f"  {batch}x{seq} (load {load()[0]}): " + ", ".join(
            f"{k} fwd {r['speedup']:.2f}x/train {row['train'][k]['speedup'] if train_rounds else 0:.2f}x"
            for k, r in row["forward"].items()), flush=True)
        out.append(row)
    return out


def probe_inference_mode(a) -> dict:
    """Is a pruned model's *first* call under ``torch.inference_mode`` served narrow?"""
    torch.manual_seed(a.seed)
    m = subjects.TinyLM(n_layers=1)
    x = tokens(m.cfg.vocab, 2, 32, 3)
    cg = ecospa.auto_couple(m, (x,))
    ecospa.prune(m, plans.uniform_plan(cg), couplings=cg)
    with torch.inference_mode():
        m(x)
    first = regions(m)
    with torch.no_grad():
        m(x)
    return dict(after_first_inference_mode_call=first, after_a_later_no_grad_call=regions(m))


def profile_gpt2(a, variants: dict[str, Variant], cfg: dict) -> dict:
    batch, seq = a.gpt2_lengths[0]
    x = tokens(cfg["vocab"], batch, seq, 7)
    out = {}
    for k, v in variants.items():
        def body(m=v.model):
            with torch.inference_mode():
                m.transformer(x)
        v.model.eval()
        out[k] = dict(body=profile_ops(body, rows=14))
        v.model.train()
        out[k]["train"] = profile_ops(lambda v=v: step(v.model, v.opt, x), rows=14)
        v.model.eval()
    return dict(batch=batch, seq=seq, ops=out)

