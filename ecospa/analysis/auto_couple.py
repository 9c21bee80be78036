"""``auto_couple``: every coupling of a model, dense or already pruned.

A dense model is analysed as it is (``ecospa.analysis.discover``). A pruned model is analysed as the
dense model its removal record describes (``record.dense_view``: same graph, removed slices
zero, none of ecospa's forwards installed), and the couplings are renumbered to what the model
kept. Either way every coupling carries stamps of the model's state, which the executor checks,
and the model is left exactly as it was (``ecospa.capture.state.preserved``).
"""
from __future__ import annotations

import numpy as np
import torch.nn as nn

from ecospa.ir.record import dense_view, param_records
from ecospa.analysis.renumber import renumber
from ecospa.analysis.discover import discover
from ecospa.capture.sharded import refuse_sharded
from ecospa.ir.coupling import CouplingGraph
from ecospa.capture.state import preserved

__all__ = ["auto_couple"]


def auto_couple(model: nn.Module, example_inputs=None, *, include_inexact: bool = False) -> CouplingGraph:
    """Find every coupling of ``model``.

    Args:
        model: any ``torch.nn.Module``, dense or pruned by ecospa (left unchanged; it is run once,
            in eval mode, to capture its graph, and put back in its previous mode).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs that
            run the forward. Optional for Hugging Face models (their ``dummy_inputs`` are used).
        include_inexact: also offer inexact couplings when iterating (they are always listed in
            ``cg.inexact`` with the reason).

    Returns:
        A :class:`~ecospa.CouplingGraph`; iterate it for the exact couplings, in graph order.

    Raises:
        CaptureError: the forward could not be captured (the message names the module at fault).
    """
    refuse_sharded(model, "ecospa.auto_couple")
    with preserved(model, values=False):  # each capture restores values; this, the rest
        return _auto_couple(model, example_inputs, include_inexact)


def _auto_couple(model: nn.Module, example_inputs, include_inexact: bool) -> CouplingGraph:
    records = param_records(model)
    if not records:
        return renumber(discover(model, example_inputs, include_inexact=include_inexact), {}, {})
    with dense_view(model):
        dense = discover(model, example_inputs, include_inexact=include_inexact)
    removed, kept = {}, {}
    for name, rec in records.items():
        for dim, k in rec.kept.items():
            mask = np.ones(rec.dense_shape[dim], dtype=bool)
            mask[k] = False
            removed[(name, dim)] = np.nonzero(mask)[0]
            kept[(name, dim)] = k
    return renumber(dense, removed, kept)
