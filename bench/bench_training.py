"""Sparse training at equal final size: EcoSpa against the alternatives (CPU, char GPT).

    python bench/bench_training.py                                # the full run (3 seeds), ~30-40 min here
    python bench/bench_training.py --write-benchmarks-md          # the same, and rewrite BENCHMARKS.md
    python bench/bench_training.py --seeds 0 --steps 60 --out /tmp/bt   # a quick look (a few minutes)
    python bench/bench_training.py --report-only                  # rebuild report and plots from OUT

Writes ``training.json``, ``training.md`` and ``training_*.png`` to ``--out`` (default
``bench/results/``); the root ``BENCHMARKS.md`` only with ``--write-benchmarks-md``. Needs the
``bench`` extra (torch_pruning, matplotlib, tqdm): ``pip install -e '.[bench]'``.

The code is in ``bench/training/``: ``baselines.py`` (``uncoupled``, ``svd``), ``tp_l1.py``
(``tp-l1``), ``run.py`` (command line, phases, main), ``report.py`` (aggregation, Markdown,
plots). Training, evaluation and throughput are ``ecospa.recipes.train``'s; coupling sides,
slice norms, scores and pruning are the library's (``SliceTable.side``, ``ecospa.Importance``,
``ecospa.prune``).

Setup. A nanoGPT-style character model (``ecospa.recipes.nanogpt.GPT``: 3 layers, width 96, 4 heads,
FFN 384, context 64, tied embeddings; 348k parameters, 65-character vocabulary) trained on the
tiny-shakespeare text shipped with ecospa. The first 90% of the text is the training text, the
last 10% the validation text, never trained on. AdamW (lr 3e-3, betas 0.9/0.95, weight decay
0.1 on matrices, 5% warm-up then cosine to 10%), batch 32 x 64, gradient clipping at 1, fp32,
1 CPU thread. Every variant of a seed starts from the same initial weights (``torch.manual_seed
(seed)`` before building the model), sees the same batches in the same order and takes the same
number of optimizer steps.

Variants (all pruned ones end at the same parameter count, up to one unit; see below):

- ``dense``: the full model.
- ``small-dense``: the same architecture at the *final widths* of EcoSpa, trained from scratch:
  a fresh model (same initial weights) pruned with EcoSpa's final plan (``Plan.replay``) before
  the first step.
- ``ecospa``: ``ecospa.EcoSpa`` with Eq. 6 (``coupling_score="fisher"``) and Eq. 9
  (``unit_score="eq9"``), top_k 0.3, theta 0.9, pruning every ``steps // 50`` steps from 15% of
  the steps until 50% of the prunable parameters are gone (``target=0.5``).
- ``uncoupled``: the same schedule and the same number of removed parameters in the same
  couplings at the same steps as ``ecospa``, but each matrix's rows/columns are scored and
  removed independently: in each coupling that ``ecospa`` cut by k units, the k producer slices
  with the smallest L1 norm (q rows, k rows, v rows, FFN input rows, each with its bias entry)
  and, independently, the k reader slices with the smallest L1 norm (output-projection columns;
  for q·k the k rows) are zeroed. Implemented as masks re-applied after every optimizer step:
  the model keeps its dense shapes (dense compute and memory, plus the masks).
- ``random``: ``EcoSpa`` with ``coupling_score="random"``, ``unit_score="random"`` (coupled
  removal of random units in random couplings, same schedule knobs and target).
- ``ecospa-l1``: ``EcoSpa`` with ``coupling_score="magnitude"``, ``unit_score="magnitude"``:
  L1 group magnitude (sum of |w| over every slice of a unit) on ecospa's couplings.
- ``tp-l1``: torch_pruning 1.6 ``MetaPruner`` with ``GroupMagnitudeImportance(p=1)``, global
  ranking, at the same steps as ``ecospa`` and to the same parameter count after each event
  (the pruning ratio is searched so the removed count is closest; the search is left out of its
  wall clock, one pruner build and one pruning step per event are counted). torch_pruning cannot follow
  nanoGPT's ``split``/``view`` head layout (its importance indexing fails), so this variant's
  attention forward is rewritten in the timm layout (``reshape(B, T, 3, H, -1)``, same function,
  checked equal) and gets ``num_heads`` with ``prune_head_dims=True``: it removes the same
  head-dimension in q, k and v of every head at once, and FFN hidden units. The residual width
  is left alone (lm_head and output projections ignored) like ecospa. torch_pruning does not
  touch optimizer state; the AdamW moments of the surviving rows/columns are carried over by
  this benchmark (indices recorded from its pruning groups).
- ``svd``: the paper's Fig. 5 ablation. At ``ecospa``'s pruning events, every q·k and v·o
  coupling that ``ecospa`` cut from width w to r is replaced by the rank-r truncated SVD of its
  product instead: M = sum_j p_j r_j^T over units j, where p_j is the unit's producer vector
  (weight row plus bias entry) and r_j its reader vector (the k row plus bias for q·k, the
  output column for v·o), so scores x~^T M y~ (q·k) and outputs M^T x~ (v·o) are the products
  being truncated; the kept units get p_j = sqrt(s_j) u_j, r_j = sqrt(s_j) v_j (same parameter
  count as keeping r units) and their AdamW moments are reset. FFN couplings pass through a GELU,
  so there is no product to truncate: there ``svd`` removes the same number of units by Eq. 9,
  exactly as ``ecospa`` does.

How the runs are scheduled. Per seed: first ``ecospa`` is trained alone until it reaches its
target (phase 0), which yields the plan and the events (step, per-coupling counts, parameter
count after) that ``small-dense``, ``uncoupled``, ``svd`` and ``tp-l1`` follow. Then all variants,
``ecospa`` again included, are trained in lockstep (phase 1): every step, each takes one
optimizer step on the same batch, in an order rotating from step to step, so that load from
other processes falls on all alike and their wall clocks compare. Phase 1's ``ecospa`` is checked
to repeat phase 0's plan exactly. Wall clock is the sum of per-step times (forward, backward,
clipping, AdamW, pruning) plus a hook's setup (coupling discovery); evaluation is excluded.
Memory is computed from tensor sizes: weights + gradients + AdamW state (+ masks). Throughput
(forward of 8 x 64 tokens, and sampling 4 x 48 new tokens with ``GPT.generate``) is measured
after training, interleaved over all final models of the seed, median of rounds. Validation loss
is the mean next-character cross-entropy over all non-overlapping 64-character windows of the
validation text (1,742 windows).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for ``bench.training``
    from bench.training.run import main

    sys.exit(main(description=__doc__.split("\n\n")[0]))
