"""The training benchmark's runs: command line, one seed (phase 0 then phase 1), main.

Every variant is a :class:`ecospa.recipes.train.Run` with a step hook: ``ecospa.EcoSpa`` (through
``ecospa_hook``) or a baseline of :mod:`bench.training.baselines` / :mod:`bench.training.tp_l1`.
Training, evaluation and throughput are the recipes' (``train_interleaved``, ``throughput``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import ecospa
from bench.training import VARIANTS
from bench.training.baselines import SvdAtEvents, UncoupledMasks
from bench.training.llama import CharLlama, LlamaSize
from bench.training.report import aggregate, markdown_table, report
from bench.training.tp_l1 import TorchPruningL1, make_tp_compatible
from ecospa.recipes.nanogpt import GPT, GPTConfig
from ecospa.recipes.train import CharCorpus, Run, TrainConfig, ecospa_hook, throughput, train_interleaved

__all__ = ["parse_args", "ecospa_knobs", "run_seed", "main"]

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target", type=float, default=0.5, help="fraction of prunable parameters kept")
    ap.add_argument("--model", choices=("gpt", "llama"), default="gpt",
                    help="gpt: the nanoGPT char model (default); llama: transformers' LlamaForCausalLM "
                         "(GQA, rotary, SwiGLU) built from its config, see bench/training/llama.py")
    ap.add_argument("--kv-heads", type=int, default=2, help="llama: key/value heads (default 2)")
    ap.add_argument("--ffn", type=int, default=None, help="llama: intermediate size (default 2.6875 x width)")
    ap.add_argument("--text", choices=("shakespeare", "wikitext2"), default="shakespeare",
                    help="shakespeare: tiny-shakespeare, last 10%% held out (default); wikitext2: "
                         "../shared/data/wikitext2_valid.txt, last 20%% held out")
    ap.add_argument("--start", type=float, default=0.15,
                    help="fraction of the steps before the first pruning round (default 0.15)")
    ap.add_argument("--end", type=float, default=None,
                    help="fraction of the steps by which EcoSpa reaches its target, on the cubic schedule "
                         "(default: none, Algorithm 1's own pace)")
    ap.add_argument("--every", type=int, default=None, help="steps between pruning rounds (default steps // 50)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--throughput-rounds", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"),
                    help="results directory: training.json, training.md, plots (default bench/results)")
    ap.add_argument("--write-benchmarks-md", action="store_true",
                    help="also write the Markdown report to the repository's BENCHMARKS.md (off by default)")
    ap.add_argument("--analysis", default=None, help="a Markdown file whose text goes under 'Where EcoSpa "
                    "loses, and why' (default: OUT/training_analysis.md if present)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rebuild the plots and the Markdown report from OUT/training.json")
    args = ap.parse_args(argv)
    if args.steps < 40:
        ap.error(f"--steps should be at least 40, got {args.steps}")
    if "ecospa" not in args.variants:
        args.variants.append("ecospa")
    return args


def ecospa_knobs(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """EcoSpa's schedule knobs: every ``--every`` (default ``steps // 50``) steps from ``--start``
    of the steps (default 15%), top_k 0.3, theta 0.9; with ``--end``, the cubic schedule reaching
    the target at that fraction of the steps."""
    knobs = dict(every=args.every or max(1, args.steps // 50), start=int(round(args.start * args.steps)),
                 top_k=0.3, theta=0.9, seed=seed)
    if args.end is not None:
        knobs.update(end=float(args.end), total_steps=args.steps)
    return knobs


def model_factory(args: argparse.Namespace, vocab_size: int) -> tuple[Callable[[], nn.Module], dict[str, Any]]:
    """``(build, description)``: ``build()`` makes the model of ``--model`` (seed it first)."""
    if args.model == "llama":
        size = LlamaSize(vocab_size=vocab_size, hidden_size=args.width,
                         intermediate_size=args.ffn or int(round(2.6875 * args.width)),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(256, args.block))
        return (lambda: CharLlama(size)), {"kind": "transformers LlamaForCausalLM (default config)", **asdict(size)}
    gcfg = GPTConfig(block_size=args.block, vocab_size=vocab_size, n_layer=args.layers, n_head=args.heads,
                     n_embd=args.width)
    return (lambda: GPT(gcfg)), {"kind": "nanoGPT", **asdict(gcfg)}


def run_seed(seed: int, args: argparse.Namespace, corpus: CharCorpus, build: Callable[[], nn.Module],
             tcfg: TrainConfig) -> dict[str, Any]:
    """Phase 0 (EcoSpa alone, to its target) then phase 1 (every variant in lockstep)."""
    example = (torch.zeros(1, tcfg.block_size, dtype=torch.long),)

    def fresh() -> nn.Module:
        torch.manual_seed(seed)
        return build()

    knobs = ecospa_knobs(args, seed)
    # phase 0: EcoSpa alone until its target, for the schedule the baselines follow ----------
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
        raise ecospa.ConfigError(f"EcoSpa did not reach its target within {tcfg.steps} steps (seed {seed}); "
                                 "give more steps")
    plan = sp0.plan
    counts = {e.step: {n: len(v) for n, v in e.removals.items()} for e in sp0.events}
    sizes = {e.step: e.params_after for e in sp0.events}
    print(f"[seed {seed}] phase 0: EcoSpa reached {sp0.num_params:,} params in {len(sp0.events)} rounds "
          f"(steps {sp0.events[0].step}-{sp0.events[-1].step}), {phase0_seconds:.0f} s", flush=True)

    # phase 1: every variant in lockstep ------------------------------------------------------
    hooks = {
        "dense": None,
        "ecospa": ecospa_hook(args.target, example, **knobs),
        "uncoupled": lambda m, o: UncoupledMasks(m, o, counts, example),
        "random": ecospa_hook(args.target, example, coupling_score="random", unit_score="random", **knobs),
        "ecospa-l1": ecospa_hook(args.target, example, coupling_score="magnitude", unit_score="magnitude",
                                 **knobs),
        "tp-l1": lambda m, o: TorchPruningL1(m, o, sizes, example),
        "svd": lambda m, o: SvdAtEvents(m, o, counts, example),
    }
    runs: list[Run] = []
    for name in (n for n in VARIANTS if n in args.variants):
        if name == "small-dense":
            runs.append(Run(name, plan.replay(fresh(), example_inputs=example), tcfg))
        elif name == "tp-l1":
            runs.append(Run(name, make_tp_compatible(fresh()), tcfg, hooks[name]))
        else:
            runs.append(Run(name, fresh(), tcfg, hooks[name]))
    train_interleaved(runs, corpus, tcfg, progress=not args.no_progress, desc=f"seed {seed}")

    speed = throughput({r.name: r.model for r in runs}, corpus, tcfg.block_size, rounds=args.throughput_rounds,
                       new_tokens=48, seed=seed)
    out: dict[str, Any] = {"seed": seed, "phase0_seconds": phase0_seconds, "plan_rounds": len(plan),
                           "events": [{"step": e.step, "params_after": e.params_after} for e in sp0.events],
                           "variants": {}}
    for r in runs:
        s = {**r.summary(), **speed[r.name]}
        if r.name == "ecospa":
            s["plan_identical_to_phase0"] = r.hook.sp.plan == plan
        out["variants"][r.name] = s
    print(f"[seed {seed}] " + ", ".join(f"{n} {v['val_loss']:.4f} ({v['train_seconds']:.0f} s)"
                                       for n, v in out["variants"].items()), flush=True)
    return out


def main(argv: list[str] | None = None, description: str = "") -> int:
    """Run (or, with ``--report-only``, re-report) the benchmark; returns the exit status."""
    args = parse_args(argv, description)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    also_md = ROOT / "BENCHMARKS.md" if args.write_benchmarks_md else None
    analysis = Path(args.analysis) if args.analysis else None
    if args.report_only:
        result = json.loads((out_dir / "training.json").read_text())
        written = report(result, out_dir, analysis=analysis, also_md=also_md)
        print(markdown_table(result["aggregate"]))
        print(f"\nwrote {', '.join(map(str, written))}")
        return 0
    if args.text == "wikitext2":
        corpus = CharCorpus.from_text((ROOT.parent / "shared" / "data" / "wikitext2_valid.txt").read_text("utf-8"),
                                      val_fraction=0.2)
    else:
        corpus = CharCorpus.tinyshakespeare()
    build, model_desc = model_factory(args, corpus.vocab_size)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    seeds = []
    for seed in args.seeds:
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch, block_size=args.block, lr=args.lr,
                           warmup=max(1, args.steps // 20), eval_every=max(1, args.steps // 12),
                           eval_windows=192, final_eval_windows=None, seed=seed)
        seeds.append(run_seed(seed, args, corpus, build, tcfg))
    agg = aggregate(seeds)
    agg = {n: agg[n] for n in VARIANTS if n in agg}
    result: dict[str, Any] = {
        "command": "python bench/bench_training.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"seeds": args.seeds, "target": args.target, "threads": args.threads,
                   "model": model_desc, "text": args.text, "train": asdict(tcfg), "ecospa": ecospa_knobs(args, 0) | {"seed": "= seed"},
                   "variants": list(agg)},
        "variants": {n: VARIANTS[n] for n in agg},
        "host": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                 "cpu_count": os.cpu_count(), "device": "cpu", "loadavg_before": load_before,
                 "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "total_seconds": time.perf_counter() - t0,
        "aggregate": agg,
        "seeds": seeds,
    }
    written = report(result, out_dir, analysis=analysis, also_md=also_md)
    print()
    print(markdown_table(agg))
    print()
    for f in result["findings"]:
        print("-", f)
    print(f"\n{result['total_seconds'] / 60:.1f} min; wrote {out_dir / 'training.json'}, "
          f"{', '.join(map(str, written))} and the plots")
    return 0

