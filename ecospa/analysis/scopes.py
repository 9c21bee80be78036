"""Where each coupling lives in the module tree, and which couplings share one head layout.

- The *scope* of a coupling is the smallest module whose forward contains every op its channels
  flow through (its producers, the head reshapes, the attention core, its readers): for an HF
  Llama attention coupling ``model.layers.3.self_attn``. Rewriting that module's graph is enough
  to run the coupling at its kept width (``ecospa.narrow``).
- A *width group* is a set of couplings whose channels sit side by side in one batched tensor
  (the heads of one ``view(B, T, H, D)``): they run fastest when they keep equal widths, which is
  what the planner's ``head_widths="uniform"`` asks for. Couplings alone in their tensors form a
  group of one.
"""
from __future__ import annotations

import numpy as np

from ecospa.capture.export import module_of
from ecospa.analysis.flow import FlowResult, coupled_factors
from ecospa.ir.labels import connected_components, varying

__all__ = ["scopes_and_groups", "common_prefix"]


def common_prefix(paths) -> str:
    """The longest dotted module path that starts every path of ``paths`` ("" for none)."""
    parts = [p.split(".") if p else [] for p in paths]
    if not parts:
        return ""
    out = []
    for level in zip(*parts):
        if all(x == level[0] for x in level):
            out.append(level[0])
        else:
            break
    return ".".join(out)


def scopes_and_groups(flow: FlowResult, n_couplings: int, comp: np.ndarray, gid_of: np.ndarray,
                      site_modules: list[set[str]]) -> tuple[list[str], list[int]]:
    """``(scope module path per coupling, width-group id per coupling)``.

    Args:
        flow: the labelled graph; comp: component id per label; gid_of: coupling index per
            component (-1: none); site_modules: per coupling, the modules owning its parameters.
    """
    paths: list[set[str]] = [set(m) for m in site_modules]
    a_edges: list[int] = []
    b_edges: list[int] = []
    for node, items in coupled_factors(flow, np.where(comp >= 0, gid_of[comp], -1)):
        mod = module_of(node)
        for f, gs in items:
            for g in gs.tolist():
                paths[g].add(mod)
            if gs.size > 1 and len(varying(f)) >= 2:  # several couplings batched in one tensor
                a_edges += [int(gs[0])] * (gs.size - 1)
                b_edges += gs[1:].tolist()
    scopes = [common_prefix(p) for p in paths]
    _, group = connected_components(n_couplings, np.asarray(a_edges, np.int64), np.asarray(b_edges, np.int64))
    return scopes, group.tolist()

