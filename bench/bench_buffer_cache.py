"""Decode speed of research-code models whose KV cache lives in module buffers (issue 19, item 2).

litgpt ``GPT`` (``set_kv_cache``: ``index_copy_``) and torchtune ``llama3`` (``setup_caches``:
``index_put_`` at ``cache_pos``, an ``assert`` on it), width 256 (``--width``), 4 layers, heads of 64, random weights; half of
every coupling removed (uniform). Variants, interleaved round by round: ``dense``; ``fallback``
(the same pruned model with ``narrow=False``: the exact scatter path, cache at its dense width);
``narrow`` (regions served by the rewritten graph, the cache buffers stored at the kept widths:
``ecospa/narrow/stored.py``; the default, ``ECOSPA_NARROW_BUFFER_CACHES`` forced to ``1`` here so
the environment cannot change what is measured). Greedy decoding, batch 1, a 32-token prompt, 64 new
tokens, 1 thread; decode tokens/s (prefill excluded), median over rounds; cache bytes after the
last decode (the narrow variant's buffers are sliced at its first narrow call).

Run (needs litgpt and torchtune): ``python bench/bench_buffer_cache.py [--rounds 7]``
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

os.environ["ECOSPA_NARROW_BUFFER_CACHES"] = "1"  # the variant measured as "narrow" (the default)
import ecospa  # noqa: E402

PROMPT, NEW, BATCH = 32, 64, 1
WIDTH = 256


def _plan(cg):
    return {c: list(range(c.width // 2)) for c in cg if c.width >= 2}


def litgpt_models():
    from litgpt.config import Config
    from litgpt.model import GPT
    torch.manual_seed(0)
    cfg = Config(block_size=256, vocab_size=1024, padded_vocab_size=1024, n_layer=4, n_head=WIDTH // 64, n_query_groups=WIDTH // 64,
                 n_embd=WIDTH, intermediate_size=4 * WIDTH, rotary_percentage=1.0, bias=False)
    dense = GPT(cfg).eval()

    def setup(m):
        m.max_seq_length = PROMPT + NEW + 1
        m.set_kv_cache(batch_size=BATCH)

    def step(m, ids, pos):
        return m(ids, input_pos=pos)
    return dense, setup, step


def torchtune_models():
    from torchtune.models.llama3 import llama3
    torch.manual_seed(0)
    dense = llama3(vocab_size=1024, num_layers=4, num_heads=WIDTH // 64, num_kv_heads=WIDTH // 128, embed_dim=WIDTH,
                   max_seq_len=512, intermediate_dim=4 * WIDTH, rope_base=10000).eval()
    n = PROMPT + NEW + 1
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))

    def setup(m):
        if m.caches_are_setup():
            m.reset_caches()
        else:
            m.setup_caches(batch_size=BATCH, dtype=torch.float32, decoder_max_seq_len=n)

    def step(m, ids, pos):
        t = ids.shape[1]
        s = int(pos[0])
        return m(ids, mask=causal[None, s:s + t].expand(BATCH, t, n), input_pos=pos.expand(BATCH, t))
    return dense, setup, step


def decode(model, setup, step, prompt) -> tuple[float, torch.Tensor]:
    """Decode tokens/s and the generated tokens."""
    setup(model)
    with torch.no_grad():
        logits = step(model, prompt, torch.arange(PROMPT))
        tok = logits[:, -1:].argmax(-1)
        out = [tok]
        t0 = time.perf_counter()
        for i in range(NEW - 1):
            logits = step(model, tok, torch.tensor([PROMPT + i]))
            tok = logits[:, -1:].argmax(-1)
            out.append(tok)
        dt = time.perf_counter() - t0
    return (NEW - 1) * BATCH / dt, torch.cat(out, 1)


def cache_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for n, b in model.named_buffers()
               if n.split(".")[-1] in ("k", "v", "k_cache", "v_cache"))


def bench(name, make, rounds):
    dense, setup, step = make()
    prompt = torch.randint(0, 1024, (BATCH, PROMPT))
    cg = ecospa.auto_couple(dense, (prompt,))
    plan = _plan(cg)
    variants = {"dense": dense}
    for label, narrow in (("fallback", False), ("narrow", True)):
        m = copy.deepcopy(dense)
        ecospa.prune(m, plan, couplings=cg, narrow=narrow)
        variants[label] = m
    tps = {k: [] for k in variants}
    toks = {}
    for _ in range(2):  # warm-up: graphs built, first-call checks
        for k, m in variants.items():
            toks[k] = decode(m, setup, step, prompt)[1]
    for _ in range(rounds):
        for k, m in variants.items():
            tps[k].append(decode(m, setup, step, prompt)[0])
    rep = ecospa.execution_report(variants["narrow"])
    res = {
        "model": name, "rounds": rounds,
        "tokens_per_s": {k: statistics.median(v) for k, v in tps.items()},
        "all": tps,
        "same_tokens_fallback_narrow": bool(torch.equal(toks["fallback"], toks["narrow"])),
        "narrow_calls": sum(r.narrow_calls for r in rep), "fallback_calls": sum(r.fallback_calls for r in rep),
        "cache_bytes": {k: cache_bytes(m) for k, m in variants.items()},
        "params": {k: sum(p.numel() for p in m.parameters()) for k, m in variants.items()},
    }
    med = res["tokens_per_s"]
    res["speedup_vs_dense"] = {k: med[k] / med["dense"] for k in med}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    global WIDTH
    WIDTH = a.width
    torch.set_num_threads(1)
    out = [bench("litgpt", litgpt_models, a.rounds), bench("torchtune", torchtune_models, a.rounds)]
    for r in out:
        print(r["model"], {k: round(v, 1) for k, v in r["tokens_per_s"].items()},
              {k: round(v, 2) for k, v in r["speedup_vs_dense"].items()},
              "same tokens:", r["same_tokens_fallback_narrow"], "narrow/fallback calls:", r["narrow_calls"],
              r["fallback_calls"], "cache bytes:", r["cache_bytes"])
    with open(a.out or f"bench/results/buffer_cache_w{a.width}.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
