"""Narrow execution: pruned attention runs at the widths it kept.

The scope module of pruned attention couplings gets a :class:`RegionForward`: per call signature,
the dense module is captured once (``program``), the positions every tensor keeps are derived from
the channel labels (``layout``), and the graph is rewritten op by op with small rules (``rules``,
``rewrite``) into a narrow ``GraphModule`` that runs in place of the module's forward, checked once
against the exact scatter path, which stays the fallback.
"""
from ecospa.narrow.forward import ProgramCache, RegionForward

__all__ = ["RegionForward", "ProgramCache"]
