"""``ecospa demo``: dense vs EcoSpa on a char GPT, on the embedded tiny-shakespeare text."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ecospa.cli._common import CliError, add_command, fraction, need, positive_int

__all__ = ["add_parser", "run", "add_training_options", "run_training"]

DESCRIPTION = """\
Train a small nanoGPT-style character model on the tiny-shakespeare text shipped with ecospa,
twice from the same initial weights, on the same batches in the same order for the same number
of steps: once dense, once with EcoSpa removing coupled units until half of its prunable
parameters are gone (from 5% of the steps, on a cubic schedule that reaches the target at 40%,
so most steps run on the small model). The two runs are trained in lockstep so their wall
clocks compare fairly.
The last 10% of the text is held out for validation and never trained on.

Prints a table (validation loss and perplexity, parameters, training wall clock, peak and final
memory of weights + gradients + optimizer state, inference tokens/s) and writes demo.json and
demo.png (validation loss vs step and vs wall clock, parameter count and training memory vs
step) to --out.
Works offline; needs the demo extra (tqdm, matplotlib): pip install 'ecospa[demo]'."""

EXAMPLES = """\
ecospa demo                          # about 3-5 minutes on CPU
ecospa demo --quick --out /tmp/d     # tiny version, about 20 s
ecospa demo --steps 800 --target 0.3
ecospa plot runs/demo/demo.json      # kept widths and parameters over training"""

DEMO_EXTRA = "pip install 'ecospa[demo]'"


def add_training_options(p: argparse.ArgumentParser, out_default: str) -> None:
    """The options ``demo`` and ``train`` share."""
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps of each run (default 400; 60 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the data order (default 0)")
    p.add_argument("--target", type=fraction, default=0.5,
                   help="fraction of the prunable parameters EcoSpa keeps (default 0.5)")
    p.add_argument("--out", default=out_default,
                   help=f"output directory for demo.json and demo.png (default {out_default})")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (about 20 s), for smoke tests")
    p.add_argument("--every", type=positive_int, default=None, help="prune every N steps (default steps // 40)")
    p.add_argument("--start", type=int, default=None, help="first step that may prune (default 5%% of steps)")
    p.add_argument("--end", type=fraction, default=None,
                   help="fraction of the steps by which EcoSpa reaches its target, on the cubic schedule "
                        "(default 0.4: most steps then run on the small model)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: the model is small, and one thread keeps timings "
                        "steady on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="log every pruning event")


def add_parser(sub) -> None:
    p = add_command(sub, "demo", help="train a char GPT dense and with EcoSpa, compare (CPU, minutes)",
                    description=DESCRIPTION, examples=EXAMPLES)
    add_training_options(p, "runs/demo")


def run_training(args: argparse.Namespace, command: str, **overrides) -> int:
    """Run the demo trainer with the shared options (and ``overrides`` of :class:`DemoConfig`)."""
    from ecospa.recipes import DEMO_REQUIREMENTS

    need(*DEMO_REQUIREMENTS, why="the demo extra", install=DEMO_EXTRA)
    from ecospa.recipes.demo import DemoConfig, run_demo

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = DemoConfig.preset(args.quick, steps=args.steps, seed=args.seed, target=args.target, out=args.out,
                            every=args.every, start=args.start, end=args.end, threads=args.threads,
                            progress=not args.no_progress, **overrides)
    try:  # before any training: a folder that cannot be created fails now, not after the runs
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"--out {args.out!r}: cannot create this folder ({e.strerror or type(e).__name__}); "
                       "choose one you can write to") from None
    result = run_demo(cfg)
    print()
    print(result["table"])
    e = next(r for r in result["runs"] if r["name"] == "ecospa")
    if e["hook"]:
        h = e["hook"]
        print(f"\nEcoSpa: {h['rounds']} pruning rounds (steps {h['events'][0]['step'] if h['events'] else '-'}"
              f"-{h['events'][-1]['step'] if h['events'] else '-'}), {h['dense_params']:,} -> {e['params']:,} "
              f"params (target {h['target_params']:,}), {h['prune_seconds']:.2f} s spent pruning")
    print("peak state: weights + grads + AdamW state at the largest point of training (EcoSpa starts dense);"
          " mean state: the same averaged over the steps; final state: the same at the end.")
    print(f"sample from the EcoSpa model: {result['ecospa_sample']!r}")
    print(f"\nwrote {cfg.out}/demo.json and {cfg.out}/demo.png ({result['total_seconds']:.0f} s in all)")
    return 0


def run(args: argparse.Namespace) -> int:
    return run_training(args, "demo")
