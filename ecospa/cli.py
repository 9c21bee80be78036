"""The ``ecospa`` command line.

    ecospa demo                    # dense vs EcoSpa on a char GPT, about 3-5 minutes on CPU
    ecospa demo --quick --out /tmp/d   # tiny version, about 20 s
    ecospa --version
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import ecospa

__all__ = ["main", "build_parser"]

_DEMO_HELP = """\
Train a small nanoGPT-style character model on the tiny-shakespeare text shipped with ecospa,
twice from the same initial weights, on the same batches in the same order for the same number
of steps: once dense, once with EcoSpa removing coupled units until half of its prunable
parameters are gone. The two runs are trained in lockstep so their wall clocks compare fairly.
The last 10% of the text is held out for validation and never trained on.

Prints a table (validation loss and perplexity, parameters, training wall clock, peak and final
memory of weights + gradients + optimizer state, inference tokens/s) and writes demo.json and
demo.png (validation loss vs step and vs wall clock, parameter count vs step) to --out.
Works offline; needs the demo extra (tqdm, matplotlib): pip install 'ecospa[demo]'."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands: ``demo``)."""
    ap = argparse.ArgumentParser(
        prog="ecospa",
        description="Coupled structured sparse training (EcoSpa) for PyTorch transformers.",
        epilog="Run 'ecospa demo --help' for the demo's options. Library usage: see README.md.")
    ap.add_argument("--version", action="version", version=f"ecospa {ecospa.__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="train a char GPT dense and with EcoSpa, compare (CPU, minutes)",
                       description=_DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--steps", type=_positive_int, default=None,
                   help="optimizer steps of each run (default 400; 60 with --quick)")
    d.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the data order (default 0)")
    d.add_argument("--target", type=_fraction, default=0.5,
                   help="fraction of the prunable parameters EcoSpa keeps (default 0.5)")
    d.add_argument("--out", default="runs/demo", help="output directory for demo.json and demo.png (default runs/demo)")
    d.add_argument("--quick", action="store_true", help="tiny model and few steps (about 20 s), for smoke tests")
    d.add_argument("--every", type=_positive_int, default=None,
                   help="prune every N steps (default steps // 40)")
    d.add_argument("--start", type=int, default=None, help="first step that may prune (default 15%% of steps)")
    d.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the model is small, and one thread keeps timings "
                        "steady on a shared machine)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("-v", "--verbose", action="store_true", help="log every pruning event")
    return ap


_DEMO_EXTRA = "pip install 'ecospa[demo]'"


def _demo(args: argparse.Namespace) -> int:
    from ecospa.recipes import missing_requirements

    missing = missing_requirements()
    if missing:
        print(f"ecospa demo: error: the demo needs {', '.join(missing)} (the demo extra): {_DEMO_EXTRA}",
              file=sys.stderr)
        return 2
    from ecospa.recipes.demo import DemoConfig, run_demo

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = DemoConfig.preset(args.quick, steps=args.steps, seed=args.seed, target=args.target, out=args.out,
                            every=args.every, start=args.start, threads=args.threads,
                            progress=not args.no_progress)
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
          " final state: the same at the end.")
    print(f"sample from the EcoSpa model: {result['ecospa_sample']!r}")
    print(f"\nwrote {cfg.out}/demo.json and {cfg.out}/demo.png ({result['total_seconds']:.0f} s in all)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ecospa`` command; returns the exit status."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        if args.command == "demo":
            return _demo(args)
    except ecospa.EcospaError as e:
        print(f"ecospa {args.command}: error: {e}", file=sys.stderr)
        return 2
    ap.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
