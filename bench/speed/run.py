"""CPU speed of pruned transformers: ecospa (narrow execution) against the FLOP ideal, Torch-Pruning,
the physical reference and the dense model.

    python -m bench.speed.run                   # full run (1.5-2 hours on 2 shared cores), bench/results/speed.*
    python -m bench.speed.run --standard        # the same at batch 1 and fewer rounds (about 25 min)
    python -m bench.speed.run --quick --out /tmp/speed     # smoke test: small shapes, < 1 minute
    python -m bench.speed.run --report-only     # rebuild speed.md / speed.png from speed.json

Sections (each timed interleaved in this one process; see timing.py, flops.py, subjects.py):

- ``gpt2``: HF ``GPT2LMHeadModel`` (SDPA), GPT-2-small shape: dense, ``uniform`` and ``ragged``
  (plans.py), at 8x256, 2x1024, 1x2048 tokens: whole-model forward, body forward (no lm_head),
  train step (forward + backward + AdamW, each variant its own optimizer, sliced by
  ``ecospa.prune(..., optimizer=opt)``), against the FLOP ideal with the attention core counted.
- ``layouts``: ragged heads run padded (ecospa's layout), grouped by width or one head at a time,
  plain PyTorch blocks at the ragged plan's widths (layouts.py).
- ``generate``: the same HF models, greedy decoding after 1024 tokens of context (generate.py).
- ``linear_gpt``: a GPT-2-small-shaped model of nn.Linear layers (timm attention): dense, ecospa
  uniform and ragged, Torch-Pruning (head dims, and whole heads) at the same parameter count, and the
  physical reference (head width 32, FFN 1536, fresh weights).
- ``tiny``: a small research-style LM (GQA 6/2, interleaved rotary, fused SwiGLU): dense, ecospa
  uniform and ragged, physical reference (head width 16, FFN 256).

Before timing, every pruned ecospa model is compared with the masked dense model (eval and train
mode, relative error of the logits), and afterwards ``ecospa.execution_report`` says which regions
ran narrow. fp32, ``torch.set_num_threads(--threads)``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: the repository root, for ``bench.speed``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ecospa  # noqa: E402
from bench.speed import baselines, flops, generate, layouts, plans, report, subjects  # noqa: E402
from bench.speed.compare import (Variant, dense_variant, ecospa_variant, execution, load, probe_inference_mode,  # noqa: E402
                                 profile_gpt2, step, time_lengths, tokens)
from bench.speed.timing import profile_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


def section_gpt2(a, cfg: dict, lengths) -> tuple[dict, dict[str, Variant]]:
    dense = subjects.hf_gpt2(**cfg)
    spec = flops.Spec(cfg["n_layer"], cfg["n_head"], cfg["n_head"], cfg["n_embd"] // cfg["n_head"], cfg["n_embd"], "lm_head")
    t0 = time.perf_counter()
    cg = ecospa.auto_couple(dense)
    res: dict = dict(config=cfg, auto_couple_s=time.perf_counter() - t0, couplings=_couplings(cg), variants={})
    variants = {"dense": dense_variant(dense, spec, a.lr)}
    res["variants"]["dense"] = dict(params=flops.param_count(dense))
    for name, plan, narrow in (("uniform", plans.uniform_plan(cg), True), ("ragged", plans.ragged_plan(cg, a.seed), True),
                               ("ragged-grouped", plans.ragged_plan(cg, a.seed), "grouped")):
        variants[name], res["variants"][name] = ecospa_variant(dense, spec, cg, plan, cfg["vocab"], a.lr, narrow)
    res["lengths"] = time_lengths(variants, lengths, cfg["vocab"], a.rounds, a.warmup, a.train_rounds, a.train_warmup)
    res["execution"] = execution(variants)
    return res, variants


def _couplings(cg) -> dict:
    kinds: dict[str, int] = {}
    for c in cg:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    return dict(count=len(cg), kinds=kinds, inexact=[f"{c.name}: {c.reason}" for c in cg.inexact][:4])


def section_linear_gpt(a, cfg: dict) -> dict:
    torch.manual_seed(a.seed)
    dense = subjects.LinearGPT(**cfg)
    spec = flops.Spec(cfg["n_layer"], cfg["n_head"], cfg["n_head"], cfg["head_dim"], cfg["n_embd"], "lm_head")
    x = tokens(cfg["vocab"], 2, 64, 5)
    t0 = time.perf_counter()
    cg = ecospa.auto_couple(dense, (x,))
    res: dict = dict(config=cfg, auto_couple_s=time.perf_counter() - t0, couplings=_couplings(cg), variants={})
    variants = {"dense": dense_variant(dense, spec, a.lr)}
    res["variants"]["dense"] = dict(params=flops.param_count(dense))
    for name, plan in (("ecospa-uniform", plans.uniform_plan(cg)), ("ecospa-ragged", plans.ragged_plan(cg, a.seed))):
        variants[name], res["variants"][name] = ecospa_variant(dense, spec, cg, plan, cfg["vocab"], a.lr)
    for mode in ("head_dims", "num_heads"):
        m = baselines.tp_prune(dense, x, mode)
        h, hd = baselines.head_config(m)
        variants[f"tp-{mode.replace('_', '-')}"] = dense_variant(m, flops.Spec(cfg["n_layer"], h, h, hd, cfg["n_embd"], "lm_head"), a.lr)
        res["variants"][f"tp-{mode.replace('_', '-')}"] = dict(params=flops.param_count(m), heads=h, head_dim=hd,
                                                                 ffn=m.h[0].mlp.fc.out_features)
    torch.manual_seed(a.seed + 1)
    ref_cfg = dict(cfg, head_dim=cfg["head_dim"] // 2, ffn=cfg["ffn"] // 2)
    ref = subjects.LinearGPT(**ref_cfg)
    variants["reference"] = dense_variant(ref, flops.Spec(cfg["n_layer"], cfg["n_head"], cfg["n_head"], ref_cfg["head_dim"],
                                                          cfg["n_embd"], "lm_head"), a.lr)
    res["variants"]["reference"] = dict(params=flops.param_count(ref), config=ref_cfg)
    res["lengths"] = time_lengths(variants, a.class_lengths, cfg["vocab"], a.rounds, a.warmup, a.train_rounds, a.train_warmup)
    res["execution"] = execution(variants)
    return res


def section_tiny(a, cfg: dict) -> dict:
    torch.manual_seed(a.seed)
    dense = subjects.TinyLM(**cfg)
    c = dense.cfg
    spec = flops.Spec(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.dim, "out")
    x = tokens(c.vocab, 2, 64, 5)
    t0 = time.perf_counter()
    cg = ecospa.auto_couple(dense, (x,))
    res: dict = dict(config=vars(c), auto_couple_s=time.perf_counter() - t0, couplings=_couplings(cg), variants={})
    variants = {"dense": dense_variant(dense, spec, a.lr)}
    res["variants"]["dense"] = dict(params=flops.param_count(dense))
    for name, plan in (("uniform", plans.uniform_plan(cg)), ("ragged", plans.ragged_plan(cg, a.seed))):
        variants[name], res["variants"][name] = ecospa_variant(dense, spec, cg, plan, c.vocab, a.lr)
    torch.manual_seed(a.seed + 1)
    ref = subjects.TinyLM(**dict(cfg, head_dim=c.head_dim // 2, ffn=c.ffn // 2))
    variants["reference"] = dense_variant(ref, flops.Spec(c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim // 2, c.dim, "out"), a.lr)
    res["variants"]["reference"] = dict(params=flops.param_count(ref), head_dim=c.head_dim // 2, ffn=c.ffn // 2)
    res["lengths"] = time_lengths(variants, a.tiny_lengths, c.vocab, a.tiny_rounds, a.warmup, a.tiny_rounds, a.warmup)
    res["execution"] = execution(variants)
    if a.profile:
        batch, seq = a.tiny_lengths[0]
        xp = tokens(c.vocab, batch, seq, 7)
        res["profiles"] = {}
        for k, v in variants.items():
            def fwd(m=v.model):
                with torch.inference_mode():
                    m(xp)
            v.model.eval()
            prof = dict(forward=profile_ops(fwd, runs=3))
            v.model.train()
            prof["train"] = profile_ops(lambda v=v: step(v.model, v.opt, xp), runs=2)
            v.model.eval()
            res["profiles"][k] = prof
    return res


def _lengths(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",") if p]


PRESETS = {  # defaults of --quick and --standard; an option given explicitly still wins
    "quick": dict(rounds=1, train_rounds=1, tiny_rounds=1, gen_rounds=1, profile=False, gpt2_lengths="2x64",
                  class_lengths="2x64", tiny_lengths="2x64", layout_lengths="2x64", gen_context=32, gen_new=4,
                  gen_nocache_new=2),
    # about 25 minutes on 2 shared cores: batch 1 at every length, the Torch-Pruning / reference
    # comparison at 1024 tokens, fewer rounds; the train step's warm-up is the untimed call that
    # builds the narrow graph for the shape (time_lengths), not a whole round
    "standard": dict(rounds=3, train_rounds=2, train_warmup=0, tiny_rounds=10, gen_rounds=3,
                     gpt2_lengths="1x256,1x1024,1x2048", class_lengths="1x1024", tiny_lengths="8x256,2x1024",
                     layout_lengths="1x1024", gen_new=16, gen_nocache_new=2),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, 1 round (a smoke test, < 1 minute)")
    ap.add_argument("--standard", action="store_true", help="GPT-2 shapes at batch 1, fewer rounds (about 25 min)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared machine, a second thread waits at every op for a core "
                         "another process holds; measured 3.7x slower than 1 thread beside one busy process)")
    ap.add_argument("--rounds", type=int, default=3, help="timed forward rounds (gpt2, linear_gpt)")
    ap.add_argument("--train-rounds", type=int, default=3, help="timed train-step rounds (gpt2, linear_gpt)")
    ap.add_argument("--tiny-rounds", type=int, default=15, help="timed rounds of the tiny model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the forward rounds")
    ap.add_argument("--train-warmup", type=int, default=1, help="untimed rounds before the train-step rounds")
    ap.add_argument("--gpt2-lengths", type=_lengths, default=_lengths("8x256,2x1024,1x2048"))
    ap.add_argument("--class-lengths", type=_lengths, default=_lengths("8x256,2x1024"))
    ap.add_argument("--tiny-lengths", type=_lengths, default=_lengths("8x256,2x1024"))
    ap.add_argument("--layout-lengths", type=_lengths, default=_lengths("8x256,1x1024"))
    ap.add_argument("--gen-context", type=int, default=1024)
    ap.add_argument("--gen-new", type=int, default=32)
    ap.add_argument("--gen-nocache-new", type=int, default=8)
    ap.add_argument("--gen-rounds", type=int, default=3)
    ap.add_argument("--sections", default="gpt2,layouts,generate,linear_gpt,tiny")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--update", action="store_true",
                    help="replace only --sections in the existing speed.json of --out (the run is noted in meta.updates)")
    ap.add_argument("--notes", type=Path, help="with --report-only: a Markdown file of findings to include")
    first, _ = ap.parse_known_args(argv)
    for name in ("quick", "standard"):
        if getattr(first, name):
            ap.set_defaults(**{k: _lengths(v) if k.endswith("lengths") else v for k, v in PRESETS[name].items()})
    return ap.parse_args(argv)


GPT2_QUICK = dict(n_layer=2, n_embd=128, n_head=4, ffn=512, vocab=1000, n_positions=256)
TINY_QUICK = dict(n_layers=2, vocab=512)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        r = json.loads((a.out / "speed.json").read_text())
        if a.notes:  # the findings written after looking at a run, kept in the JSON
            r["notes"] = a.notes.read_text().strip()
            (a.out / "speed.json").write_text(json.dumps(r, indent=1) + "\n")
        written = report.write(r, a.out)
        print("wrote", ", ".join(map(str, written)))
        return 0
    torch.set_num_threads(a.threads)
    import torch_pruning
    import transformers

    sections = a.sections.split(",")
    t0 = time.perf_counter()
    took: dict[str, float] = {}

    old = json.loads((a.out / "speed.json").read_text()) if a.update else None

    def save() -> dict:
        if old is None:
            out = r
        else:  # the sections of this run replace the old ones; the rest stays as it was
            out = dict(old, **{k: v for k, v in r.items() if k in sections})
            out["meta"] = dict(old["meta"], updates=[u for u in old["meta"].get("updates", []) if set(u["sections"]) - set(sections)]
                               + [dict(r["meta"], sections=sections)])
        (a.out / "speed.json").write_text(json.dumps(out, indent=1) + "\n")
        return out

    def done(name: str, since: float) -> float:
        took[name] = round(time.perf_counter() - since, 1)
        print(f"{name}: {took[name]:.0f} s, load {load()}", flush=True)
        save()  # partial, until the end
        return time.perf_counter()
    r: dict = dict(meta=dict(command="python -m bench.speed.run" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
                             quick=a.quick, standard=a.standard, threads=torch.get_num_threads(), torch=torch.__version__,
                             transformers=transformers.__version__, torch_pruning=torch_pruning.__version__,
                             python=platform.python_version(), cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"),
                             rounds=a.rounds, train_rounds=a.train_rounds, tiny_rounds=a.tiny_rounds,
                             warmup=a.warmup, train_warmup=a.train_warmup, load_before=load()))
    r["probes"] = dict(inference_mode=probe_inference_mode(a))
    ts = done("probes", t0)
    gcfg = GPT2_QUICK if a.quick else dict(n_layer=12, n_embd=768, n_head=12, ffn=3072, vocab=50257, n_positions=2048)
    if {"gpt2", "generate", "layouts"} & set(sections):
        r["gpt2"], variants = section_gpt2(a, gcfg, a.gpt2_lengths if "gpt2" in sections else [])
        ts = done("gpt2", ts)
        if "layouts" in sections:
            r["layouts"] = layouts.section(a, variants["ragged"].cg, variants["ragged"].plan, gcfg, a.layout_lengths)
            ts = done("layouts", ts)
        if a.profile and "gpt2" in sections:
            r["gpt2"]["profiles"] = profile_gpt2(a, variants, gcfg)
            ts = done("gpt2 profiles", ts)
        if "generate" in sections:
            r["generate"] = generate.section(a, {k: v for k, v in variants.items() if k != "ragged-grouped"}, gcfg)
            ts = done("generate", ts)
        del variants
    if "linear_gpt" in sections:
        lcfg = dict(n_layer=GPT2_QUICK["n_layer"], n_embd=GPT2_QUICK["n_embd"], n_head=GPT2_QUICK["n_head"], head_dim=32,
                    ffn=GPT2_QUICK["ffn"], vocab=GPT2_QUICK["vocab"], n_positions=256) if a.quick else \
            dict(n_layer=12, n_embd=768, n_head=12, head_dim=64, ffn=3072, vocab=50257, n_positions=2048)
        r["linear_gpt"] = section_linear_gpt(a, lcfg)
        ts = done("linear_gpt", ts)
    if "tiny" in sections:
        r["tiny"] = section_tiny(a, TINY_QUICK if a.quick else {})
        ts = done("tiny", ts)
    r["meta"].update(load_after=load(), duration_s=time.perf_counter() - t0, sections_s=took)
    written = report.write(save(), a.out)
    print("wrote", ", ".join(map(str, [a.out / "speed.json", *written])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
