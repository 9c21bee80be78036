"""The forward the executor installs on the scope of pruned attention: narrow graph or fallback.

:class:`RegionForward` replaces ``module.forward`` of a coupling's scope (for example every
``self_attn`` of a pruned Llama). On each call it computes the call's signature; the first call
with a new signature captures the *dense* module for it (``record.dense_view`` + ``torch.export``,
shared between structurally identical modules), rewrites the graph to the kept widths
(``layout.analyse`` + ``rewrite.rewrite``) and checks it once against the exact fallback on the
call's own inputs. Later calls with that signature (and the module state the capture read, see
program.py's table of guards) run the narrow graph. A call with a KV cache object runs a graph
that reads and writes the cache at the kept widths (``cached``), else the fallback with the cache
stored narrow (``kvcache``). Everything else (an op without a narrow rule, a failed check, a
graph that fails later) runs the fallback: the module's own forward over scatter adapters, exact
but at the dense head width. Layouts are tried as a ladder (:data:`LADDER`); each refusal has a
kind (:class:`Refusal`). Nothing is silent: :meth:`RegionForward.report` says, per signature,
which path runs, which rung built it and why.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import warnings
from collections import Counter
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from ecospa.narrow.groups import GroupSum, head_groups, output_biases
from ecospa.narrow.kvcache import KVNarrower, find_cache
from ecospa.narrow.cached import CachedGraphs, NotServed, RegionParts
from ecospa.narrow.lane import MISS, NO_CACHE, Lane, fingerprint
from ecospa.narrow.positions import analyse
from ecospa.narrow.program import (CallNotServable, Program, Signature, export_call, held_modules, leaf_name,
                                  placeholder_feeds, signature, value_free)
from ecospa.ops.observe import observed, unobserved
from ecospa.narrow.entry import LADDER, MAX_VALUES, MAX_VARIANTS, Entry, Refusal, is_random, outputs_close
from ecospa.narrow.rewrite import rewrite
from ecospa.narrow import stored
from ecospa.narrow.stored import written_inputs
from ecospa.ops.registry import NarrowError
from ecospa.ir.record import EcospaForward, dense_view, installed_forward, param_records
from ecospa.errors import EcospaWarning
from ecospa.capture.export import Captured
from ecospa.analysis.flow import propagate

__all__ = ["RegionForward", "ProgramCache", "verify_narrow_calls"]

log = logging.getLogger("ecospa")

class ProgramCache:
    """Dense captures shared by structurally identical modules (same class, same dense parameter
    shapes, same call signature). Owned by the installed forwards of one model."""

    def __init__(self) -> None:
        self.programs: dict[tuple, list[Program]] = {}
        # per key: attributes (path, name) seen to differ between twins whose captures were the
        # same graph (an HF attention's layer_idx, which only picks the cache layer): ignored
        # when a twin looks for a capture to share
        self.irrelevant: dict[tuple, set] = {}

    def get(self, module: nn.Module, key: tuple, tensors, export, *, shared: bool = True) -> tuple[Program, bool]:
        """A capture for ``module``'s call: a twin's (``(program, True)``) where one fits the
        call's shapes and the module's read attributes, else ``export()``'s, run on the dense
        view (``(program, False)``)."""
        found = [p for p in self.programs.get(key, ())
                 if p.guard(tensors) and not any(k[0] == "const" for k in p.kinds)] if shared else []
        ignore = self.irrelevant.setdefault(key, set())
        if found:
            with dense_view(module):
                for p in found:
                    if p.fits_module(module, ignore):
                        return p, True
        with dense_view(module):
            program = export()
        for p in found:
            diff = p.differing_reads(program)
            if diff:
                ignore |= diff
        self.programs.setdefault(key, []).append(program)
        return program, False

    def key(self, module: nn.Module, sig: Signature) -> tuple:
        """Class, *dense* parameter shapes and signature: a capture of the dense view does not
        depend on the widths kept, so pruning again never exports again."""
        records = param_records(module)
        dense = tuple((n, tuple(records[n].dense_shape) if n in records else tuple(p.shape))
                      for n, p in module.named_parameters())
        return (type(module), dense, sig)


class RegionForward(EcospaForward):
    """Installed forward of a module whose couplings run narrow (see the module docstring).

    Args:
        module: the scope module; path: its name in the model (for messages).
        cache: dense captures shared with its twins.
        pad_multiple: ragged heads are padded to a multiple of this many positions.
        check: compare every new narrow graph with the fallback once (recommended).
        group_heads: run ragged heads as one graph per width group (``groups``) rather than
            padded to the widest, where the call allows it (``prune(..., narrow="grouped")``).
        root: the model the module belongs to: a call that passes one of its modules as an
            argument (a position-bias module) is served with that module held by identity
            (``program.HeldModule``); without a root such calls run the fallback.
    """

    _lane: Lane | None = None  # (a class default: forwards unpickled from older states have none)

    def __init__(self, module: nn.Module, path: str, cache: ProgramCache, *, pad_multiple: int = 8,
                 check: bool = True, fallback=None, group_heads: bool = False, root: nn.Module | None = None):
        self.module, self.path, self.cache, self.root = module, path, cache, root
        self.pad_multiple, self.check = pad_multiple, check
        self.group_heads = group_heads
        self.fallback = fallback
        self.entries: dict[Signature, list[Entry]] = {}
        self.refused: Counter = Counter()  # calls that could not be served, by reason
        self.cache_refused: Counter = Counter()  # calls with a cache that ran the fallback, by kind
        self.kv_bytes: tuple[int, int] | None = None  # (dense, stored) bytes of its cache layer
        self.couplings: frozenset[str] = frozenset()  # names of the pruned couplings it runs
        self._subtree: list[nn.Module] | None = None
        self._kv: KVNarrower | None = None
        self.verify_calls = False  # prune(..., verify=True): check every new input shape once
        self._flows: dict[int, tuple] = {}  # id(dense graph) -> (graph, its label flow)
        self._lane: Lane | None = None  # the last plain call served narrow, for the next (``narrow.lane``)
        self._values: dict[tuple, list] = {}  # value-free signature -> the signatures seen (``_check_values``)
        self.stores_narrow = False  # a narrow graph stored a module buffer at the kept widths

    @property
    def kv(self) -> KVNarrower:
        """Stores the KV cache of calls that run the fallback at the kept widths (``kvcache``)."""
        if self._kv is None:
            self._kv = KVNarrower(self.module, self.run_fallback)
        return self._kv

    @property
    def _mods(self) -> list[nn.Module]:
        """The modules of the scope's subtree (their train/eval flags are part of a signature)."""
        if self._subtree is None:
            self._subtree = list(self.module.modules())
        return self._subtree

    # ----------------------------------------------------------------- bookkeeping
    def invalidate(self) -> Callable[[], None]:
        """Forget the narrow graphs (the pruned state changed); dense captures are kept.

        Returns:
            a function that gives back what was forgotten (the graphs, the call counts and the KV
            layouts): :meth:`Transaction.invalidate <ecospa.pruning.transaction.Transaction.invalidate>`
            logs it, so that a rollback to the old widths finds the graphs built for them.
        """
        self.store_dense()  # buffers stored at the old kept widths (sliced anew later)
        self._lane = None  # (its entries dict is replaced below: it could not serve again anyway)
        entries, refused, cache_refused = self.entries, self.refused, self.cache_refused
        self.entries, self.refused, self.cache_refused = {}, Counter(), Counter()
        self._values = {}
        kv = self._kv
        layouts = dict(kv.layouts) if kv is not None else None
        if kv is not None:
            kv.reset()

        def restore() -> None:
            self.entries, self.refused, self.cache_refused, self._kv = entries, refused, cache_refused, kv
            if kv is not None:
                kv.layouts.clear()
                kv.layouts.update(layouts)
        return restore

    def kv_summary(self) -> str | None:
        """How calls with a KV cache stored it (one line for ``execution_report``), or None
        before any such call."""
        return self._kv.describe() if self._kv is not None else None

    def __deepcopy__(self, memo):
        """A copy for the copied module, without the narrow graphs (rebuilt at its first calls)."""
        new = RegionForward.__new__(RegionForward)
        memo[id(self)] = new
        new.__dict__.update(self.__getstate__())
        new.module = copy.deepcopy(self.module, memo)
        new.fallback = copy.deepcopy(self.fallback, memo)
        # the copied model's root when the whole model is copied; else none (module arguments
        # then run the fallback): copying the root here would copy the whole model
        new.root = memo.get(id(self.root)) if self.root is not None else None
        return new

    def __getstate__(self):
        state = dict(self.__dict__)
        # root left out: pickling one module must not take the whole model along (a copy gets its
        # own in __deepcopy__; an unpickled one serves module arguments on the fallback)
        state.update(entries={}, refused=Counter(), cache_refused=Counter(), _kv_bytes=None, _kv_sizes=None,
                     cache=ProgramCache(),
                     _subtree=None, _kv=None, _flows={}, root=None, _lane=None, _values={})
        return state

    def report(self) -> list[dict[str, Any]]:
        """Per signature seen: ``{"path": "narrow" | "fallback", "reason", "calls", "call"}``
        (``call``: ``"plain"``, or for calls with a KV cache ``"prefill"`` / ``"decode"``)."""
        rows = [{"path": "narrow" if e.gm is not None else "fallback", "reason": e.reason, "calls": e.calls,
                 "kind": e.refusal, "strategy": e.strategy, "tried": e.tried, "call": _call_kind(key)}
                for key, es in self.entries.items() for e in es]
        rows += [{"path": "fallback", "reason": r, "calls": n, "kind": Refusal.UNSERVABLE}
                 for r, n in self.refused.items()]
        return rows

    # ----------------------------------------------------------------- calls
    def exact_path(self) -> Callable:
        """The exact fallback (see :class:`~ecospa.ir.record.EcospaForward`)."""
        return self.run_fallback

    def store_dense(self) -> None:
        """Buffers a narrow graph stores at the kept widths take their dense width back
        (``narrow.stored``): ``record.dense_view`` calls it before a capture."""
        if getattr(self, "stores_narrow", False):
            stored.make_dense(self.module)

    def run_fallback(self, *args, **kwargs):
        """The exact path: the module's own forward over the scatter adapters (dense head width),
        on its buffers at their dense width (``narrow.stored``)."""
        self.store_dense()
        if self.fallback is not None:
            return self.fallback(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.run_fallback(*args, **kwargs)
        kv = self._kv
        if kv is not None and kv.graphs is not None:  # a decode step repeating the last call
            out = kv.graphs.lane(args, kwargs)
            if out is not MISS:
                self._kv_sizes = kv.graphs.last_bytes
                return out
        found = fingerprint(args, kwargs, NO_CACHE, self._mods)
        lane = self._lane
        if (lane is not None and not self.verify_calls and lane.serves(found, self.entries, self._mods[1:])
                and lane.entry.fits(found[1]) and lane.entry.state_ok()):
            return self._serve(lane.entry, found[1], args, kwargs)  # the call repeats the last one's entry
        cache = find_cache(args, kwargs)
        if cache is not None:  # (checked first: a decode step computes its signature once)
            return self._cached_call(cache, args, kwargs)
        try:
            sig, tensors = signature(self._mods, args, kwargs, hooks=self._mods[1:], hold_modules=True)
            if sig not in self.entries:
                self._check_held(sig)
                self._check_values(sig)
        except CallNotServable as e:
            self.refused[str(e)] += 1
            return self.run_fallback(*args, **kwargs)
        entry = self._entry(sig, tensors, args, kwargs)
        if entry is None or entry.gm is None:
            if entry is not None:
                entry.calls += 1
            return self.run_fallback(*args, **kwargs)
        if self.verify_calls and not self._verified(entry, sig, tensors, args, kwargs):
            entry.calls += 1
            return self.run_fallback(*args, **kwargs)
        out = self._serve(entry, tensors, args, kwargs)
        self._lane = None
        if found is not None and entry.gm is not None and not self.verify_calls:
            self._lane = Lane(found[0], self.entries, entry, *Lane.hooks_now(self._mods[1:]))
        return out

    def _serve(self, entry: Entry, tensors: list, args, kwargs):
        """The output of ``entry``'s narrow graph for a call with ``tensors`` (module buffers it
        stores at the kept widths sliced at the first such call), or of the fallback where that
        slicing or the graph fails (the entry then retired, with a warning)."""
        feeds = entry.feed()
        slots = stored.slots(entry.gm)
        if slots:  # module buffers stored at the kept widths (sliced at the first such call)
            sliced = stored.make_narrow(self.module, slots, feeds)
            if isinstance(sliced, str):
                self.refused[sliced] += 1
                return self.run_fallback(*args, **kwargs)
            if sliced:
                self.stores_narrow = True
                self.kv_bytes = stored.buffer_bytes(self.module, slots)
        try:
            out = entry.gm.forward(*feeds, *tensors)  # (ecospa's own graph: no module hooks to run)
        except Exception as e:  # a graph that cannot run this call must cost speed, never the forward
            entry.gm, entry.refusal = None, Refusal.BUG
            entry.reason = f"the narrow graph failed on a later call: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log.warning("ecospa: %s: %s; it runs on the exact fallback from now on. Please report this with "
                        "the model.", self.path or "<root>", entry.reason)
            entry.calls += 1
            return self.run_fallback(*args, **kwargs)
        entry.calls += 1
        return entry.program.output(out)

    def _verified(self, entry: Entry, sig: Signature, tensors, args, kwargs) -> bool:
        """Under ``verify``: the first call of every new input shape served by ``entry`` is
        compared with the exact path; a mismatch sends the entry to the fallback for good (with
        a warning) instead of returning a wrong result."""
        key = tuple(tuple(t.shape) for t in tensors)
        if key in entry.verified:
            return True
        problem = self._compare(entry, tensors, args, kwargs)
        if problem is None:
            entry.verified.add(key)
            return True
        entry.gm, entry.refusal = None, Refusal.VERIFY
        entry.reason = f"verify: a call of shapes {list(key)} differed from the exact path: {problem}"
        warnings.warn(f"ecospa: {self.path or '<root>'}: {entry.reason}; it runs on the exact fallback from now "
                      "on. Please report this with the model.", EcospaWarning, stacklevel=3)
        return False

    def _cached_call(self, cache, args, kwargs):
        """A call with a KV cache object: a narrow graph that reads and writes the cache at the
        kept widths (``cached``), else the fallback with the cache stored narrow (``kvcache``)."""
        kv = self.kv
        if kv.graphs is None:
            kv.graphs = CachedGraphs(self, kv, RegionParts(self.run_fallback, self._mods, self._state, outputs_close, is_random,
                                                           _outside_inference_mode))
        try:
            out = kv.graphs(cache, args, kwargs)
        except NotServed as e:
            self.refused[str(e)] += 1
            self.cache_refused[self._cache_kind(cache)] += 1
            out = kv(cache, args, kwargs)
            self._count_bytes(cache)
            return out
        self._kv_sizes = kv.graphs.last_bytes  # kv_bytes from these when read
        return out

    @property
    def kv_bytes(self) -> tuple[int, int] | None:
        """``(dense, stored)`` bytes of this module's cache layer after its last call with a cache
        (or of the buffers its narrow graph stores at the kept widths)."""
        sizes = self.__dict__.get("_kv_sizes")
        if sizes is not None:
            self.__dict__["_kv_bytes"] = _layer_bytes(*sizes)
            self._kv_sizes = None
        return self.__dict__.get("_kv_bytes")

    @kv_bytes.setter
    def kv_bytes(self, value: tuple[int, int] | None) -> None:
        self._kv_sizes = None
        self.__dict__["_kv_bytes"] = value

    def _layer(self, cache):
        """This module's layer of ``cache`` (its index learnt by the first narrow call), or None."""
        graphs = self._kv.graphs if self._kv is not None else None
        idx = graphs.layer_idx if graphs is not None else None
        layers = getattr(cache, "layers", None)
        if idx is None or not isinstance(layers, list) or len(layers) <= idx:
            return None, idx
        return layers[idx], idx

    def _cache_kind(self, cache) -> str:
        """``"prefill"`` (the module's cache layer is empty), ``"decode"``, or ``"cache"`` (not known)."""
        layer, idx = self._layer(cache)
        if idx is None:
            return "cache"
        return "decode" if layer is not None and layer.get_seq_length() else "prefill"

    def _count_bytes(self, cache) -> None:
        """``kv_bytes``: the bytes of this module's cache layer after the call, and what they would
        be at the dense widths."""
        layer, idx = self._layer(cache)
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            return
        lay = self.kv.narrow_layers.get(cache, {}).get(idx, ("dense", "dense"))
        self.kv_bytes = _layer_bytes(keys.numel() * keys.element_size(), values.numel() * values.element_size(), lay)

    def _check_held(self, sig: Signature) -> None:
        """Raise :class:`CallNotServable` unless every module ``sig`` holds is a submodule of the
        model (a module made per call would be a new signature per call) whose parameters are
        dense and whose forward is its own (a capture traces it as it is)."""
        held = held_modules(sig)
        if not held:
            return
        owned = {id(m) for m in self.root.modules()} if self.root is not None else set()
        for m in held:
            name = type(m).__name__
            if id(m) not in owned:
                raise CallNotServable(f"an argument of type {name} that is not a submodule of the model (a module "
                                      "made per call would need a capture per call)")
            if param_records(m) or any(installed_forward(x) is not None for x in m.modules()):
                raise CallNotServable(f"an argument of type {name} holding pruned parameters or an ecospa "
                                      "forward (a capture of this module would not see them dense)")

    def _check_values(self, sig: Signature) -> None:
        """Raise :class:`CallNotServable` for a new signature that differs from
        :data:`~ecospa.narrow.entry.MAX_VALUES` earlier ones only in the values of plain
        arguments (a position passed as a Python int, new at every decode step): each value
        would need a capture of its own, so such calls run the fallback, and the reason names
        the argument."""
        seen = self.__dict__.setdefault("_values", {}).setdefault(value_free(sig), [])
        if len(seen) < MAX_VALUES:
            seen.append(sig)
            return
        differ = [i for i, (c, d) in enumerate(zip(sig.constants, seen[-1].constants)) if c[2] != d[2]]
        name = leaf_name(sig, sig.constants[differ[0]][0]) if differ else "a plain argument"
        raise CallNotServable(f"{name!s} took more than {MAX_VALUES} values (each a capture of its own: a Python "
                              "number is a constant of the graph); pass it as a tensor to run narrow")

    def _entry(self, sig: Signature, tensors, args, kwargs) -> Entry | None:
        variants = self.entries.setdefault(sig, [])
        for i, v in enumerate(variants):
            if v.program is None or (v.fits(tensors) and v.state_ok()):
                if i and v.program is not None:  # the last call's variant first (decode after prefill); an
                    # unservable entry (no program) stays where it is: it would answer every call
                    variants.insert(0, variants.pop(i))
                return v
        if len(variants) >= MAX_VARIANTS:
            self.refused[f"more than {MAX_VARIANTS} shape variants or module states of one signature"] += 1
            return None
        with _outside_inference_mode(tensors, args, kwargs) as (tensors, args, kwargs):
            entry = self._build(sig, tensors, args, kwargs, shared=True)
            if entry.refusal == Refusal.MISMATCH and entry.program is not None and entry.program.shared:
                entry = self._build(sig, tensors, args, kwargs, shared=False)  # a twin's capture misled
        variants.append(entry)
        if entry.gm is not None and self.check:
            entry.verified.add(tuple(tuple(t.shape) for t in tensors))  # checked while it was built
        if entry.gm is None:
            log.info("ecospa: %s runs on the exact fallback for this call: %s", self.path or "<root>", entry.reason)
        return entry

    def _program(self, sig: Signature, tensors, shared: bool) -> Program:
        program, twin = self.cache.get(self.module, self.cache.key(self.module, sig), tensors,
                                       lambda: export_call(self.module, sig, tensors), shared=shared)
        return dataclasses.replace(program, shared=True) if twin else program

    def _build(self, sig: Signature, tensors, args, kwargs, *, shared: bool) -> Entry:
        try:
            program = self._program(sig, tensors, shared)
        except CallNotServable as e:
            return Entry(None, reason=str(e), refusal=Refusal.UNSERVABLE)
        if not program.guard(tensors):
            return Entry(None, reason="the capture specialised a dimension these inputs do not match",
                         refusal=Refusal.SPECIALISED)
        state, buffers = self._state(program)
        kept = {n: dict(r.kept) for n, r in param_records(self.module).items()}
        params, consts, feeds = placeholder_feeds(program, self.module, tensors[0].device if tensors else None)
        captured = Captured(graph=program.graph, params=params, buffers=consts, shapes=program.shapes)
        # the labels depend on the dense graph only: one analysis for every layout and every later
        # round of pruning (a new set of widths rewrites the same graph)
        flow = self._flows.get(id(program.graph))
        if flow is None or flow[0] is not program.graph:
            flow = self._flows[id(program.graph)] = (program.graph, propagate(captured))
        flow = flow[1]
        grouped = self._grouped(program, captured, flow, kept, consts, feeds, sig, tensors, args, kwargs)
        if grouped is not None:
            return grouped
        entry, prev, tried = None, None, []
        for strategy in LADDER:
            skip = strategy.redundant(prev)
            if skip:
                tried.append((strategy.name, skip))
                continue
            layout = analyse(captured, kept, pad_multiple=self.pad_multiple, drop_blocks=strategy.drop,
                             exact_flat=strategy.exact, flow=flow)
            prev = (strategy, layout)
            try:
                gm = rewrite(program, layout, kept, consts)
            except NarrowError as e:
                entry = Entry(program, reason=str(e), refusal=Refusal.NO_RULE)
                tried.append((strategy.name, Refusal.NO_RULE))
                continue
            except Exception as e:  # a bug in a narrow rule must cost speed, never the forward
                entry = Entry(program, reason=f"building the narrow graph failed: {type(e).__name__}: {e}",
                              refusal=Refusal.BUG)
                tried.append((strategy.name, Refusal.BUG))
                continue
            if tensors:
                gm = gm.to(tensors[0].device)
            entry = Entry(program, gm, feeds=feeds, state=state, buffers=buffers, strategy=strategy.name,
                          tried=tuple(tried))
            if self.check:
                problem = self._check(entry, sig, tensors, args, kwargs)
                if problem:
                    entry = Entry(program, reason=f"checked against the exact path: {problem}",
                                  refusal=Refusal.MISMATCH, state=state, buffers=buffers)
                    tried.append((strategy.name, Refusal.MISMATCH))
                    continue
            return entry
        entry = dataclasses.replace(entry, tried=tuple(tried))
        if entry.refusal == Refusal.BUG:
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
            if any(stored.slots(g) for g in graphs):
                return None  # one buffer cannot be stored at each group's widths
            if any(n.target is observed for g in graphs for n in g.graph.nodes):
                return None  # an observer must see the whole input of a module, not one group's
            gm = GroupSum(graphs, [()] + [slots] * (len(graphs) - 1))
        except NarrowError:
            return None
        except Exception as e:  # grouping is an optimisation: a bug in it costs speed, not the forward
            log.debug("ecospa: grouping the heads of %s failed: %s: %s", self.path or "<root>", type(e).__name__, e)
            return None
        if tensors:
            gm = gm.to(tensors[0].device)
        state, buffers = self._state(program)
        entry = Entry(program, gm, feeds=feeds, state=state, buffers=buffers, strategy="grouped")
        if self.check and self._check(entry, sig, tensors, args, kwargs):
            return None
        return entry

    def _state(self, program: Program) -> tuple[tuple, tuple]:
        """What an entry of ``program`` on this module guards: the live values of the attributes
        the capture read and the shapes of the buffers the graph reads."""
        buffers = tuple((stored.logical(self.module, n), torch.Size(shape))  # a narrow-stored one: its dense shape
                        for n, shape in program.buffer_shapes.items())
        buffers += tuple((lambda table=owner._buffers, name=name: table.get(name), torch.Size(shape))
                         for owner, name, shape in program.held_buffers)
        if program.reads is None:
            return (), buffers
        mods = dict(self.module.named_modules(remove_duplicate=False))
        state = []
        for path, name, kind, value, version in program.reads.values(self.module):
            state.append((mods[path].__dict__, name, kind, value, version))
        return tuple(state), buffers

    def _check(self, entry: Entry, sig, tensors, args, kwargs) -> str | None:
        """Compare the narrow graph with the fallback on this call's inputs (no gradients). A graph
        with random ops (dropout in training) is checked through its eval-mode twin."""
        if is_random(entry.program):
            modes = [m.training for m in self._mods]
            try:
                for m in self._mods:
                    m.training = False
                sig_eval, _ = signature(self._mods, args, kwargs, hooks=self._mods[1:], hold_modules=True)
                twin = self._build(sig_eval, tensors, args, kwargs, shared=True)
                self.entries.setdefault(sig_eval, []).append(twin)
                return twin.reason if twin.gm is None else None
            finally:
                for m, t in zip(self._mods, modes):
                    m.training = t
        return self._compare(entry, tensors, args, kwargs)

    def _compare(self, entry: Entry, tensors, args, kwargs) -> str | None:
        """The narrow graph against the fallback on this call's inputs (no gradients); None when
        they agree."""
        with torch.no_grad(), unobserved():  # a check, not a call: statistics hooks skip it
            feeds = entry.feed()
            slots = stored.slots(entry.gm)
            if slots:  # buffers stored at the kept widths: the graph runs on them narrow
                problem = stored.make_narrow(self.module, slots, feeds)
                if isinstance(problem, str):
                    return problem
                self.stores_narrow = True
            # buffers (a KV cache) and inputs the graph writes in place: both paths start from
            # the state before the call, their writes are compared, and the state is put back
            # (the call itself runs after the check)
            values = list(feeds) + list(tensors)  # the graph's placeholders, in order
            where = [i for i in written_inputs(entry.program.graph)
                     if i < len(values) and isinstance(values[i], torch.Tensor)]
            written = [values[i] for i in where]
            saved = [t.clone() for t in written]
            try:
                got = entry.program.output(entry.gm(*feeds, *tensors))
            except Exception as e:  # a wrong narrow graph must cost speed, never a forward
                _restore(written, saved)
                return f"the narrow graph failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            after = [t.clone() for t in written]
            _restore(written, saved)
            # the fallback runs on the buffers at their dense width (run_fallback scatters the
            # narrow ones back); its writes are compared at the kept widths
            narrow = {s.position: s for s in slots}
            self.store_dense()
            live_written = [stored.live(self.module, narrow[i]) if i in narrow else t for i, t in zip(where, written)]
            live_saved = [t.clone() for t in live_written]
            try:
                want = self.run_fallback(*args, **kwargs)
                problem = outputs_close(got, want) or next(
                    (f"a buffer written in place differs: {p}" for i, a, t in zip(where, after, live_written)
                     if (p := outputs_close(a, narrow[i].to_narrow(t) if i in narrow else t))), None)
            finally:
                _restore(live_written, live_saved)
        return problem


def _layer_bytes(keys: int, values: int, lay: tuple) -> tuple[int, int]:
    """``(dense, stored)`` bytes of a cache layer holding ``keys`` and ``values`` bytes at the
    ``(keys, values)`` layout ``lay`` (``KVIndex`` or a string: stored dense)."""
    stored = dense = 0
    for n, ix in zip((keys, values), lay):
        stored += n
        dense += round(n / ix.fraction) if hasattr(ix, "fraction") and ix.fraction else n
    return dense, stored


def _restore(tensors, saved) -> None:
    for t, v in zip(tensors, saved):
        t.copy_(v)


def _call_kind(key) -> str:
    """The kind of call an entry key stands for: ``"plain"``, ``"prefill"`` or ``"decode"``."""
    if isinstance(key, tuple) and key and key[0] == "kv":
        return "prefill" if key[2] else "decode"
    return "plain"


def verify_narrow_calls(model: nn.Module, on: bool = True) -> None:
    """Make every installed :class:`RegionForward` of ``model`` compare the first call of each new
    input shape it serves with the exact path (``prune(..., verify=True)``)."""
    from ecospa.ir.record import installed_forward

    for m in model.modules():
        fwd = installed_forward(m)
        if isinstance(fwd, RegionForward):
            fwd.verify_calls = on


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

