"""Greedy generation after a long context: KV-cache bytes and tokens/s, dense vs pruned.

Two loops over the same HF GPT-2 models (eval mode, ``torch.inference_mode``, batch 1):

- ``cached``: ``model.generate(x, max_new_tokens=n, do_sample=False, use_cache=True)``. HF passes
  its ``DynamicCache`` (Python-side state) to every attention call; a narrow graph cannot update
  it, so pruned attention runs on ecospa's exact scatter fallback at the dense head width, while
  the cache stores keys and values at the kept widths (``ecospa.narrow.kvcache``; ragged
  heads padded to the layer's widest kept head). ``execution_report`` says so. The prefill alone
  (``max_new_tokens=1``) is timed too, so the decode rate is ``(n - 1) / (t(n) - t(1))``.
- ``no_cache``: nanoGPT-style: every new token recomputes the whole sequence
  (``model(ids, use_cache=False)``), where the narrow path applies.

KV-cache bytes are read from the cache ``generate`` returns (keys + values of every layer). The
bytes a cache at exactly the kept head widths (no padding) would hold are derived from the
attention FLOP ratio (GPT-2 is multi-head: K and V widths per head are the qk and vo widths).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from bench.speed import flops
from bench.speed.compare import Variant, regions, tokens
from bench.speed.timing import interleaved, summarise


def cached(model: nn.Module, x: torch.Tensor, n: int, pad: int) -> Callable[[], torch.Tensor]:
    mask = torch.ones_like(x)

    def run():
        with torch.inference_mode():
            return model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, use_cache=True, pad_token_id=pad)
    return run


def no_cache(model: nn.Module, x: torch.Tensor, n: int) -> Callable[[], torch.Tensor]:
    def run():
        ids = x
        with torch.inference_mode():
            for _ in range(n):
                logits = model(ids, use_cache=False).logits[:, -1]
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return ids
    return run


def kv_bytes(model: nn.Module, x: torch.Tensor, n: int, pad: int) -> tuple[int, torch.Tensor]:
    """Bytes of keys and values in the cache after generating ``n`` tokens, and the tokens."""
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, pad_token_id=pad, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total, out.sequences


def _snapshot(variants) -> dict:
    return {k: {r["path"]: r for r in regions(v.model)} for k, v in variants.items() if v.ecospa}


def _delta(before: dict, after: dict) -> dict:
    out = {}
    for k, rows in after.items():
        n = f = 0
        reasons: set[str] = set()
        kv = sorted({r.get("kv_cache") for r in rows.values() if r.get("kv_cache")})
        for path, r in rows.items():
            b = before.get(k, {}).get(path, dict(narrow_calls=0, fallback_calls=0))
            n += r["narrow_calls"] - b["narrow_calls"]
            f += r["fallback_calls"] - b["fallback_calls"]
            if r["fallback_calls"] > b["fallback_calls"]:
                reasons.update(r["reasons"])
        out[k] = dict(narrow_calls=n, fallback_calls=f, reasons=sorted(reasons), kv_cache=kv)
    return out


def section(a, variants: dict[str, Variant], cfg: dict) -> dict:
    """Cached and no-cache generation with every variant (see the module docstring)."""
    vocab, pad = cfg["vocab"], cfg["vocab"] - 1
    x = tokens(vocab, 1, a.gen_context, 99)
    for v in variants.values():
        v.model.eval()
        with torch.no_grad():  # capture the no-cache signature outside inference_mode
            v.model(x[:, :8], use_cache=False)
    res: dict = dict(context=a.gen_context, new_tokens=a.gen_new, no_cache_new_tokens=a.gen_nocache_new, variants={})
    dense_attn = flops.attention(variants["dense"].spec, 1, 1)[0]
    s0 = _snapshot(variants)
    dense_bytes, _ = kv_bytes(variants["dense"].model, x, a.gen_new, pad)
    for k, v in variants.items():
        nbytes, seq = kv_bytes(v.model, x, a.gen_new, pad)
        attn = flops.attention(v.spec, 1, 1, v.cg, v.plan)[0] / dense_attn
        attn_pad = flops.attention(v.spec, 1, 1, v.cg, v.plan, padded=True)[0] / dense_attn
        res["variants"][k] = dict(kv_bytes=nbytes, kv_bytes_at_kept_widths=int(dense_bytes * attn) if v.ecospa else nbytes,
                                  kv_bytes_at_padded_widths=int(dense_bytes * attn_pad) if v.ecospa else nbytes,
                                  tokens=seq[0, a.gen_context:].tolist())
    fns = {k: cached(v.model, x, a.gen_new, pad) for k, v in variants.items()}
    res["cached"] = summarise(interleaved(fns, a.gen_rounds, 1))
    res["prefill"] = summarise(interleaved({k: cached(v.model, x, 1, pad) for k, v in variants.items()},
                                           a.gen_rounds, 1))
    s1 = _snapshot(variants)
    res["cached_execution"] = _delta(s0, s1)
    fns = {k: no_cache(v.model, x, a.gen_nocache_new) for k, v in variants.items()}
    res["no_cache"] = summarise(interleaved(fns, a.gen_rounds, 1))
    res["no_cache_execution"] = _delta(s1, _snapshot(variants))
    for k, r in res["variants"].items():
        c, p = res["cached"][k]["median_s"], res["prefill"][k]["median_s"]
        r.update(tokens_per_s=a.gen_new / c, prefill_s=p,
                 decode_tokens_per_s=(a.gen_new - 1) / (c - p) if c > p else None,
                 no_cache_tokens_per_s=a.gen_nocache_new / res["no_cache"][k]["median_s"])
    return res

