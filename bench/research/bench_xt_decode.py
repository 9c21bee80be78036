"""Decode speed of x-transformers with its own KV cache (``cache=`` an ``Intermediates`` dataclass).

x-transformers ``TransformerWrapper`` + ``Decoder`` (rotary; ``--kv-heads`` for GQA), width ``--width``,
4 layers, heads of 64, random weights; a random half of every coupling's units removed (the same
count in every head: uniform widths; as bench/research/matrix.py; removing the first half instead
takes out x-transformers' whole rotary part, whose prefill runs the fallback, a separate matter). Decoding as x-transformers does it: ``model(seq, cache=cache,
return_intermediates=True)``, each ``Attention`` handed its layer's ``Intermediates`` (past keys and
values in ``cached_kv``), returning a new one. Variants, interleaved round by round: ``dense``;
``fallback`` (the pruned model with ``narrow=False``: the exact scatter path at the dense head
width, what every decode call ran before dataclass arguments were flattened); ``narrow`` (the pruned
model: each decode call runs the rewritten graph, the past keys/values read as graph inputs at
their dense width and gathered at the kept channels, the returned cache rebuilt at the dense width);
``kept`` (a dense x-transformers model built directly at the kept widths: head dim and FFN halved,
the speed a narrow graph could reach). Greedy decoding, batch 1, a 32-token prompt, 64 new tokens,
1 thread; decode tokens/s (prefill excluded), median over rounds (and the best round); the greedy tokens of ``narrow``
and ``fallback`` against the masked dense model's; which path the decode calls ran.

Run (needs x_transformers): ``python bench/research/bench_xt_decode.py [--rounds 5] [--width 256]``
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import torch

import ecospa

PROMPT, NEW, BATCH, LAYERS, HEAD = 32, 64, 1, 4, 64


def build(width: int, kv_heads: int | None, head: int = HEAD, ff_mult: int = 4):
    from x_transformers import Decoder, TransformerWrapper
    kw = {"attn_kv_heads": kv_heads} if kv_heads else {}
    return TransformerWrapper(num_tokens=1024, max_seq_len=1024, attn_layers=Decoder(
        dim=width, depth=LAYERS, heads=width // HEAD, attn_dim_head=head, rotary_pos_emb=True, ff_mult=ff_mult,
        **kw)).eval()


def masked(model, plan) -> torch.nn.Module:
    """The dense model with the removed slices zeroed."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for c, units in plan.items():
            unit_list = c.units()
            for u in units:
                for name, dim, idx in unit_list[u]:
                    params[name].select(dim, idx).zero_()
    return m


def decode(model, prompt: torch.Tensor, new: int) -> tuple[list[int], float]:
    """Greedy tokens and decode seconds (prefill excluded)."""
    with torch.no_grad():
        logits, cache = model(prompt, return_intermediates=True)
        seq = torch.cat([prompt, logits[:, -1:].argmax(-1)], 1)
        t0 = time.perf_counter()
        for _ in range(new - 1):
            logits, cache = model(seq, cache=cache, return_intermediates=True)
            seq = torch.cat([seq, logits[:, -1:].argmax(-1)], 1)
        dt = time.perf_counter() - t0
    return seq[0, prompt.shape[1]:].tolist(), dt


def paths(model) -> dict:
    out = {"narrow": 0, "fallback": 0, "reasons": set()}
    for r in ecospa.execution_report(model):
        out["narrow"] += r.narrow_calls
        out["fallback"] += r.fallback_calls
        out["reasons"].update(r.reasons)
    out["reasons"] = sorted(out["reasons"])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--kv-heads", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = build(args.width, args.kv_heads or None)
    prompt = torch.randint(0, 1024, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    cg = ecospa.auto_couple(dense, (prompt[:, :16],))
    rng = random.Random(0)
    plan = {c: sorted(rng.sample(range(c.width), c.width // 2)) for c in cg if c.width >= 2}
    ref = masked(dense, plan)
    narrow = ecospa.prune(copy.deepcopy(dense), dict(plan))
    fallback = ecospa.prune(copy.deepcopy(dense), dict(plan), narrow=False)
    torch.manual_seed(0)
    kept = build(args.width, args.kv_heads or None, head=HEAD // 2, ff_mult=2)
    variants = {"dense": dense, "fallback": fallback, "narrow": narrow, "kept": kept}
    want, _ = decode(ref, prompt, NEW)
    same = {}
    for name in ("narrow", "fallback"):
        got, _ = decode(variants[name], prompt, NEW)  # also the first calls: captures, checks
        same[name] = got == want
    before = paths(narrow)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, m in variants.items():
            times[name].append(decode(m, prompt, NEW)[1])
    after = paths(narrow)
    tps = {k: round((NEW - 1) / statistics.median(v), 1) for k, v in times.items()}
    best = {k: round((NEW - 1) / min(v), 1) for k, v in times.items()}
    result = {"width": args.width, "kv_heads": args.kv_heads or args.width // HEAD, "layers": LAYERS,
              "prompt": PROMPT, "new": NEW, "rounds": args.rounds, "decode_tokens_per_s": tps, "best_round_tokens_per_s": best,
              "narrow_vs_fallback": round(tps["narrow"] / tps["fallback"], 2),
              "narrow_vs_dense": round(tps["narrow"] / tps["dense"], 2),
              "greedy_tokens_equal_masked": same,
              "narrow_model_calls_during_timing": {"narrow": after["narrow"] - before["narrow"],
                                                   "fallback": after["fallback"] - before["fallback"]},
              "fallback_reasons": after["reasons"]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
