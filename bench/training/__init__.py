"""The training benchmark (EcoSpa against the alternatives at equal final size), in parts.

    baselines.py   ``uncoupled`` masks and ``svd`` at EcoSpa's events
    tp_l1.py       ``tp-l1``: torch_pruning's group L1 pruner, wrapped as a step hook
    run.py         command line, one seed (phase 0 then phase 1), main
    report.py      aggregation over seeds, findings, Markdown, plots

Run it with ``python bench/bench_training.py`` (its docstring defines every variant exactly).
"""

__all__ = ["VARIANTS"]

# name -> one line; the docstring of bench/bench_training.py defines each exactly

VARIANTS: dict[str, str] = {
    "dense": "full model, no pruning",
    "small-dense": "EcoSpa's final widths, trained from scratch (plan replayed on the initial weights)",
    "ecospa": "EcoSpa: Eq. 6 coupled Fisher + Eq. 9 coupled removal (physical)",
    "uncoupled": "same schedule/budget, rows and columns of each matrix scored and removed independently (masks)",
    "random": "EcoSpa engine, random couplings and random units (coupled, physical)",
    "ecospa-l1": "EcoSpa engine, L1 group magnitude for couplings and units (coupled, physical)",
    "tp-l1": "torch_pruning MetaPruner, GroupMagnitudeImportance(p=1), global, same steps and sizes",
    "svd": "Fig. 5 ablation: rank-r truncated SVD of each q·k / v·o product at EcoSpa's events",
}
