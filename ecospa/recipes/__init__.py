"""Workflows built on ecospa's public API: the demo, a training harness, a test-subject model.

Not part of the library: ``import ecospa`` never imports this package, and nothing here is used
by the engine (``ecospa/analysis``, ``ecospa/pruning``, ...). Everything below calls only what ``ecospa`` exports
(``ecospa.EcoSpa``, ``ecospa.auto_couple``, ``ecospa.prune``, ``ecospa.Plan``, its errors), the
way torchtune keeps its recipes apart from its modules.

    ecospa.recipes.nanogpt     GPT, GPTConfig: nanoGPT, the model the demo and benchmarks train
    ecospa.recipes.data        load_tinyshakespeare(): the text shipped with ecospa
    ecospa.recipes.train       CharCorpus, TrainConfig, Run, train_interleaved, measurements, plots
    ecospa.recipes.demo        ``ecospa demo``: dense vs EcoSpa on a char GPT

The training harness and the demo need the ``demo`` extra (tqdm, matplotlib):
``pip install 'ecospa[demo]'``. The model and the data need only torch.
"""
from __future__ import annotations

import importlib

__all__ = ["DEMO_REQUIREMENTS", "missing_requirements"]

DEMO_REQUIREMENTS: tuple[str, ...] = ("tqdm", "matplotlib")
"""Modules of the ``demo`` extra that :mod:`ecospa.recipes.train` and the demo import."""


def missing_requirements(modules: tuple[str, ...] = DEMO_REQUIREMENTS) -> list[str]:
    """The modules among ``modules`` that cannot be imported (empty when all are there)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing
