"""Which path each pruned part of a model runs, and why: ``ecospa.execution_report(model)``."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ecospa.ir.record import installed_forward

__all__ = ["RegionReport", "execution_report", "format_report"]


@dataclass(frozen=True)
class RegionReport:
    """One module whose pruned attention can run narrow.

    Attributes:
        path: the module (the scope of its couplings).
        narrow_calls / fallback_calls: calls served by a narrow graph / by the exact fallback
            (the model's own code over scatter adapters, at the dense head width).
        reasons: why calls fell back, most frequent first (empty when none did).
        signatures: how many distinct call signatures (argument structure, shapes, modes) it saw.
        couplings: names of the pruned couplings whose channels this module's calls carry (the
            other pruned couplings are compact: they always run at their kept widths).
        kv_cache: for calls with a KV cache object (``generate()``), how the cache was stored:
            at the kept widths, or dense and why (None: no such call yet).
        strategies: how the narrow graphs that served calls were built (rungs of the layout
            ladder, ``narrow/forward.py``'s ``LADDER``, or ``"grouped"``), most calls first.
        refusals: the kinds of the reasons calls fell back (``Refusal``: ``"unservable"``,
            ``"specialised"``, ``"no-rule"``, ``"bug"``, ``"mismatch"``, ``"verify"``), most calls
            first: tests and tools read these, not the text of ``reasons``.
        calls: ``((kind, narrow calls, fallback calls), ...)`` per kind of call: ``"plain"`` (no
            cache object), ``"prefill"`` (a KV cache whose layer for this module was empty),
            ``"decode"`` (continuing a cache), ``"cache"`` (a call with a cache that ran the
            fallback before its layer was known); :attr:`by_kind` gives them as a dict.
        kv_bytes: ``(dense, stored)``: the bytes of this module's KV-cache layer after its last
            call with a cache, and what they would be at the dense widths (None: no such call).
    """

    path: str
    narrow_calls: int
    fallback_calls: int
    reasons: tuple[str, ...]
    signatures: int
    couplings: tuple[str, ...] = ()
    kv_cache: str | None = None
    strategies: tuple[str, ...] = ()
    refusals: tuple[str, ...] = ()
    calls: tuple[tuple[str, int, int], ...] = ()
    kv_bytes: tuple[int, int] | None = None

    @property
    def by_kind(self) -> dict[str, tuple[int, int]]:
        """``{kind of call: (narrow calls, fallback calls)}`` (see :attr:`calls`)."""
        return {k: (n, f) for k, n, f in self.calls}

    @property
    def narrow(self) -> bool:
        """True when every call so far ran narrow (and there was at least one)."""
        return self.narrow_calls > 0 and self.fallback_calls == 0


def execution_report(model: nn.Module) -> list[RegionReport]:
    """Per module whose couplings may run narrow, what its calls so far ran. Empty for a dense
    model or one pruned with ``narrow=False``. Narrow graphs are built at the first call of each
    signature: run the model once before asking."""
    from ecospa.narrow import RegionForward

    out = []
    for path, mod in model.named_modules():
        fwd = installed_forward(mod)
        if not isinstance(fwd, RegionForward):
            continue
        rows = fwd.report()
        narrow = sum(r["calls"] for r in rows if r["path"] == "narrow")
        fallback = [r for r in rows if r["path"] == "fallback"]
        reasons: dict[str, int] = {}
        kinds: dict[str, int] = {}
        for r in fallback:
            if r["calls"]:
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + r["calls"]
                if r.get("kind"):
                    kinds[r["kind"]] = kinds.get(r["kind"], 0) + r["calls"]
        strategies: dict[str, int] = {}
        for r in rows:
            if r["path"] == "narrow" and r.get("strategy") and r["calls"]:
                strategies[r["strategy"]] = strategies.get(r["strategy"], 0) + r["calls"]
        calls: dict[str, list[int]] = {}
        for r in rows:
            if r.get("call"):
                calls.setdefault(r["call"], [0, 0])[r["path"] == "fallback"] += r["calls"]
        cached = sum(fwd.cache_refused.values())
        for kind, n in fwd.cache_refused.items():
            calls.setdefault(kind, [0, 0])[1] += n
        plain_refused = sum(fwd.refused.values()) - cached
        if plain_refused:
            calls.setdefault("plain", [0, 0])[1] += plain_refused
        out.append(RegionReport(path, narrow, sum(r["calls"] for r in fallback),
                                tuple(sorted(reasons, key=reasons.get, reverse=True)), len(fwd.entries),
                                tuple(sorted(getattr(fwd, "couplings", ()))),
                                fwd.kv_summary(),
                                tuple(sorted(strategies, key=strategies.get, reverse=True)),
                                tuple(sorted(kinds, key=kinds.get, reverse=True)),
                                tuple((k, *v) for k, v in sorted(calls.items()) if any(v)), fwd.kv_bytes))
    return out


def format_report(reports: list[RegionReport]) -> str:
    """A plain-text table of :func:`execution_report`."""
    if not reports:
        return "no narrow regions (dense model, compact couplings only, or pruned with narrow=False)"
    lines = [f"{'module':40s} {'couplings':>9s} {'narrow':>7s} {'fallback':>8s}  why it fell back"]
    for r in reports:
        why = "; ".join(r.reasons + ((r.kv_cache,) if r.kv_cache else ())) if r.reasons else "-"
        lines.append(f"{r.path or '<root>':40s} {len(r.couplings):9d} {r.narrow_calls:7d} "
                     f"{r.fallback_calls:8d}  {why}")
    return "\n".join(lines)
