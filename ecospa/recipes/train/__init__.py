"""Small training utilities for the demo and the benchmarks: a character corpus with a held-out
split, a lockstep training loop for fair comparisons, cost measurements and plots.

Needs the ``demo`` extra (tqdm for the progress bar, matplotlib for :mod:`.plot`)."""
from ecospa.recipes.train.corpus import CharCorpus
from ecospa.recipes.train.loop import EcoSpaHook, Point, Run, StepHook, TrainConfig, ecospa_hook, train_interleaved
from ecospa.recipes.train.measure import (count_params, evaluate, forward_throughput, generate_throughput,
                                          state_bytes, throughput)

__all__ = [
    "CharCorpus",
    "TrainConfig",
    "Run",
    "Point",
    "StepHook",
    "EcoSpaHook",
    "ecospa_hook",
    "train_interleaved",
    "count_params",
    "evaluate",
    "state_bytes",
    "forward_throughput",
    "generate_throughput",
    "throughput",
]
