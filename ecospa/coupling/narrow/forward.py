"""The forward the executor installs on the scope of pruned attention: narrow graph or fallback.

:class:`RegionForward` replaces ``module.forward`` of a coupling's scope (for example every
``self_attn`` of a pruned Llama). On each call it computes the call's signature; the first call
with a new signature captures the *dense* module for it (``record.dense_view`` + ``torch.export``,
shared between structurally identical modules), rewrites the graph to the kept widths
(``layout.analyse`` + ``rewrite.rewrite``) and checks it once against the exact fallback on the
call's own inputs. Later calls with that signature run the narrow graph; everything else (a call
with a KV cache object, an op without a narrow rule, a failed check) runs the fallback: the
module's own forward over scatter adapters, exact but at the dense head width. Nothing is
silent: :meth:`RegionForward.report` says, per signature, which path runs and why.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ecospa.coupling.narrow.groups import GroupSum, head_groups, output_biases
from ecospa.coupling.narrow.kvcache import KVNarrower, find_cache
from ecospa.coupling.narrow.layout import analyse
from ecospa.coupling.narrow.program import CallNotServable, Program, Signature, export_call, signature
from ecospa.coupling.narrow.rewrite import rewrite
from ecospa.coupling.narrow.rules import NarrowError
from ecospa.coupling.record import EcospaForward, dense_view, param_records
from ecospa.graph.capture import Captured
from ecospa.graph.flow import propagate

__all__ = ["RegionForward", "ProgramCache", "Entry"]

log = logging.getLogger("ecospa")

MAX_VARIANTS = 8  # shape variants per signature before a signature stays on the fallback
_RANDOM = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "bernoulli", "rand",
           "randn", "rand_like", "randn_like", "randint", "multinomial"}


class ProgramCache:
    """Dense captures shared by structurally identical modules (same class, same dense parameter
    shapes, same call signature). Owned by the installed forwards of one model."""

    def __init__(self) -> None:
        self.programs: dict[tuple, list[Program]] = {}

    def key(self, module: nn.Module, sig: Signature) -> tuple:
        shapes = tuple((n, tuple(r.dense_shape)) for n, r in sorted(param_records(module).items()))
        own = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
        return (type(module), shapes, own, sig)


@dataclass
class Entry:
    """One shape variant of one signature: its dense program and narrow graph, or why not."""

    program: Program | None
    gm: torch.fx.GraphModule | None = None
    reason: str | None = None
    calls: int = 0
    feeds: list = field(default_factory=list)  # per placeholder before the inputs: a getter


def _random(program: Program) -> bool:
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        if name in _RANDOM:
            if name in ("dropout", "feature_dropout", "alpha_dropout") and (not n.args[2] or n.args[1] == 0):
                continue
            if name == "native_dropout" and (n.args[2] is False or n.args[1] == 0):
                continue
            return True
    return False


def _tensors(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _close(a, b) -> str | None:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return f"{len(ta)} outputs instead of {len(tb)}"
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return f"an output of shape {tuple(x.shape)} instead of {tuple(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return "an integer output differs"
            continue
        tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2
        denom = float(y.double().norm()) or 1.0
        err = float((x.double() - y.double()).norm()) / denom
        if not err <= tol:
            return f"outputs differ from the exact path (relative error {err:.1e})"
    return None


class RegionForward(EcospaForward):
    """Installed forward of a module whose couplings run narrow (see the module docstring).

    Args:
        module: the scope module; path: its name in the model (for messages).
        cache: dense captures shared with its twins.
        pad_multiple: ragged heads are padded to a multiple of this many positions.
        check: compare every new narrow graph with the fallback once (recommended).
        group_heads: run ragged heads as one graph per width group (``groups``) rather than
            padded to the widest, where the call allows it (``prune(..., narrow="grouped")``).
    """

    def __init__(self, module: nn.Module, path: str, cache: ProgramCache, *, pad_multiple: int = 8,
                 check: bool = True, fallback=None, group_heads: bool = False):
        self.module, self.path, self.cache = module, path, cache
        self.pad_multiple, self.check = pad_multiple, check
        self.group_heads = group_heads
        self.fallback = fallback
        self.entries: dict[Signature, list[Entry]] = {}
        self.refused: Counter = Counter()  # calls that could not be served, by reason
        self.couplings: frozenset[str] = frozenset()  # names of the pruned couplings it runs
        self._subtree: list[nn.Module] | None = None
        self._kv: KVNarrower | None = None

    @property
    def kv(self) -> KVNarrower:
        """Stores the KV cache of calls that run the fallback at the kept widths (``kvcache``)."""
        if self._kv is None:
            self._kv = KVNarrower(self.module, self._fallback)
        return self._kv

    @property
    def _mods(self) -> list[nn.Module]:
        """The modules of the scope's subtree (their train/eval flags are part of a signature)."""
        if self._subtree is None:
            self._subtree = list(self.module.modules())
        return self._subtree

    # ----------------------------------------------------------------- bookkeeping
    def invalidate(self) -> None:
        """Forget the narrow graphs (the pruned state changed); dense captures are kept."""
        self.entries.clear()
        self.refused.clear()
        if self._kv is not None:
            self._kv.reset()

    def __deepcopy__(self, memo):
        """A copy for the copied module, without the narrow graphs (rebuilt at its first calls)."""
        new = RegionForward.__new__(RegionForward)
        memo[id(self)] = new
        new.__dict__.update(self.__getstate__())
        new.module = copy.deepcopy(self.module, memo)
        new.fallback = copy.deepcopy(self.fallback, memo)
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(entries={}, refused=Counter(), cache=ProgramCache(), _subtree=None, _kv=None)
        return state

    def report(self) -> list[dict[str, Any]]:
        """Per signature seen: ``{"path": "narrow" | "fallback", "reason", "calls"}``."""
        rows = [{"path": "narrow" if e.gm is not None else "fallback", "reason": e.reason, "calls": e.calls}
                for es in self.entries.values() for e in es]
        rows += [{"path": "fallback", "reason": r, "calls": n} for r, n in self.refused.items()]
        return rows

    # ----------------------------------------------------------------- calls
    def _fallback(self, *args, **kwargs):
        if self.fallback is not None:
            return self.fallback(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._fallback(*args, **kwargs)
        try:
            sig, tensors = signature(self._mods, args, kwargs)
        except CallNotServable as e:
            self.refused[str(e)] += 1
            cache = find_cache(args, kwargs)
            if cache is not None:
                return self.kv(cache, args, kwargs)
            return self._fallback(*args, **kwargs)
        entry = self._entry(sig, tensors, args, kwargs)
        if entry is None or entry.gm is None:
            if entry is not None:
                entry.calls += 1
            return self._fallback(*args, **kwargs)
        entry.calls += 1
        feeds = [f() for f in entry.feeds]
        out = entry.gm(*feeds, *tensors)
        return pytree.tree_unflatten(list(out), entry.program.out_spec)

    def _entry(self, sig: Signature, tensors, args, kwargs) -> Entry | None:
        variants = self.entries.setdefault(sig, [])
        for v in variants:
            if v.program is None or v.program.guard(tensors):
                return v
        if len(variants) >= MAX_VARIANTS:
            self.refused[f"more than {MAX_VARIANTS} shape variants of one signature"] += 1
            return None
        with _outside_inference_mode(tensors, args, kwargs) as (tensors, args, kwargs):
            entry = self._build(sig, tensors, args, kwargs, shared=True)
            if entry.gm is None and entry.program is not None and entry.reason and "differ" in entry.reason:
                entry = self._build(sig, tensors, args, kwargs, shared=False)  # a twin's capture misled
        variants.append(entry)
        if entry.gm is None:
            log.info("ecospa: %s runs on the exact fallback for this call: %s", self.path or "<root>", entry.reason)
        return entry

    def _program(self, sig: Signature, tensors, shared: bool) -> Program:
        key = self.cache.key(self.module, sig)
        if shared:
            for p in self.cache.programs.get(key, ()):
                if p.guard(tensors) and not any(k[0] == "const" for k in p.kinds):
                    return p
        with dense_view(self.module):
            program = export_call(self.module, sig, tensors)
        self.cache.programs.setdefault(key, []).append(program)
        return program

    def _build(self, sig: Signature, tensors, args, kwargs, *, shared: bool) -> Entry:
        try:
            program = self._program(sig, tensors, shared)
        except CallNotServable as e:
            return Entry(None, reason=str(e))
        if not program.guard(tensors):
            return Entry(None, reason="the capture specialised a dimension these inputs do not match")
        kept = {n: dict(r.kept) for n, r in param_records(self.module).items()}
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        params, consts, feeds = {}, {}, []
        for node, kind in zip(placeholders, program.kinds):
            if kind[0] == "param":
                params[node.name] = kind[1]
                feeds.append(_getter(self.module, "_parameters", kind[1]))
            elif kind[0] == "buffer":
                consts[node.name] = self.module.get_buffer(kind[1])
                feeds.append(_getter(self.module, "_buffers", kind[1]))
            elif kind[0] == "const":
                consts[node.name] = kind[1]
                dev = tensors[0].device if tensors else None
                value = kind[1].to(dev) if dev is not None else kind[1]
                feeds.append(lambda v=value: v)
        captured = Captured(graph=program.graph, params=params, buffers=consts, shapes=program.shapes)
        flow = propagate(captured)  # the labels depend on the graph only: one analysis for every layout
        grouped = self._grouped(program, captured, flow, kept, consts, feeds, sig, tensors, args, kwargs)
        if grouped is not None:
            return grouped
        entry, dropped = None, True
        # heads whose units all went are left out where the graph allows it, and the projections
        # of ragged heads run at their exact widths (only the head views padded); if a layout
        # cannot be built or checked, the next one pads more: the weights too, then every head
        for drop, exact in ((True, True), (True, False), (False, True), (False, False)):
            if not drop and not dropped:
                break  # the first layouts left nothing out: the others would fail the same way
            if not exact and not layout.problem and layout.padded == {}:
                continue  # nothing ran at exact widths: the all-padded layout is the same one
            layout = analyse(captured, kept, pad_multiple=self.pad_multiple, drop_blocks=drop,
                             exact_flat=exact, flow=flow)
            if drop:
                dropped = layout.dropped
            try:
                gm = rewrite(program, layout, kept, consts)
            except NarrowError as e:
                entry = Entry(program, reason=str(e))
                continue
            except Exception as e:  # a bug in a narrow rule must cost speed, never the forward
                entry = Entry(program, reason=f"building the narrow graph failed: {type(e).__name__}: {e}")
                continue
            if tensors:
                gm = gm.to(tensors[0].device)
            entry = Entry(program, gm, feeds=feeds)
            if self.check:
                problem = self._check(entry, sig, tensors, args, kwargs)
                if problem:
                    entry = Entry(program, reason=f"checked against the exact path: {problem}")
                    continue
            return entry
        if entry.reason.startswith("building the narrow graph failed"):
            log.warning("ecospa: %s of %s; it runs on the exact fallback. Please report this with the model.",
                        entry.reason, self.path or "<root>")
        return entry

    def _grouped(self, program, captured, flow, kept, consts, feeds, sig, tensors, args, kwargs) -> Entry | None:
        """Ragged heads run as one narrow graph per width group, outputs added (``groups``);
        None when grouping does not apply or its graph fails to build or check."""
        if not self.group_heads:
            return None
        try:
            recs = head_groups(captured, kept, multiple=self.pad_multiple, flow=flow)
            if recs is None:
                return None
            biases = output_biases(program, kept)
            slots = tuple(i for i, kind in enumerate(program.kinds) if kind[0] == "param" and kind[1] in biases)
            graphs = []
            for rec in recs:
                layout = analyse(captured, rec, pad_multiple=self.pad_multiple, drop_blocks=True, flow=flow)
                if not layout.dropped:
                    return None
                graphs.append(rewrite(program, layout, kept, consts))
            gm = GroupSum(graphs, [()] + [slots] * (len(graphs) - 1))
        except NarrowError:
            return None
        except Exception as e:  # grouping is an optimisation: a bug in it costs speed, not the forward
            log.debug("ecospa: grouping the heads of %s failed: %s: %s", self.path or "<root>", type(e).__name__, e)
            return None
        if tensors:
            gm = gm.to(tensors[0].device)
        entry = Entry(program, gm, feeds=feeds)
        if self.check and self._check(entry, sig, tensors, args, kwargs):
            return None
        return entry

    def _check(self, entry: Entry, sig, tensors, args, kwargs) -> str | None:
        """Compare the narrow graph with the fallback on this call's inputs (no gradients). A graph
        with random ops (dropout in training) is checked through its eval-mode twin."""
        if _random(entry.program):
            modes = [m.training for m in self._mods]
            try:
                for m in self._mods:
                    m.training = False
                sig_eval, _ = signature(self._mods, args, kwargs)
                twin = self._build(sig_eval, tensors, args, kwargs, shared=True)
                self.entries.setdefault(sig_eval, []).append(twin)
                return twin.reason if twin.gm is None else None
            finally:
                for m, t in zip(self._mods, modes):
                    m.training = t
        with torch.no_grad():
            feeds = [f() for f in entry.feeds]
            try:
                got = pytree.tree_unflatten(list(entry.gm(*feeds, *tensors)), entry.program.out_spec)
            except Exception as e:  # a wrong narrow graph must cost speed, never a forward
                return f"the narrow graph failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            want = self._fallback(*args, **kwargs)
        return _close(got, want)


@contextlib.contextmanager
def _outside_inference_mode(tensors, args, kwargs):
    """Build a narrow graph outside ``torch.inference_mode`` (gradients off), on normal copies of
    the call's inference tensors: export cannot trace inference tensors, and a graph built inside
    inference mode would hold inference-tensor indices that a later call with gradients could not
    save for backward. Outside inference mode this changes nothing."""
    if not torch.is_inference_mode_enabled():
        yield tensors, args, kwargs
        return
    with torch.inference_mode(False), torch.no_grad():
        yield pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_inference() else t,
                                   (tensors, args, kwargs))


def _getter(root: nn.Module, store: str, name: str):
    """A function returning ``root``'s parameter or buffer ``name`` as it is when called."""
    path, _, attr = name.rpartition(".")
    owner = root.get_submodule(path) if path else root
    table = getattr(owner, store)
    return lambda: table[attr]

