"""Tensors a region writes in place and reads back (KV caches in module buffers), in a narrow graph.

Research code keeps its KV cache in module buffers written in place each step (litgpt's
``index_copy_``, torchtune's ``k_cache[:, :, pos] = k``, slice assignment). Design (issue 19,
item 2): the buffer keeps its **dense width** and the attention runs narrow.

- The model allocates the buffer and may allocate it again (``setup_caches``, ``set_kv_cache``):
  nothing to slice, nothing to keep in step, and the exact fallback (dense head width over the
  scatter adapters) and the narrow graph write the very same values into the same buffer, so the
  two paths can alternate on one cache.
- A write into such a tensor runs dense on the real storage (``ecospa.ops.inplace.store_write``):
  the narrow value written is scattered back to the dense width, zeros at the removed positions,
  which are zero in the masked dense model too (the builder's ``zero`` flags say so; otherwise the
  rewrite is refused).
- Every read of the stored tensor by an op that is not itself a view of it or a write into it is
  gathered at the kept positions of its layout (labels from ``ecospa.analysis.mutation``), so the
  scores and the value product run at the kept widths, heads whose units all went left out.

The stored tensors of a graph (:func:`stored_nodes`) are the bases of in-place writes that go
through a view (or into a placeholder, a buffer or input fed live by
``program.placeholder_feeds``: the write lands in the model's buffer) and every view of them and
every write result aliasing them. The narrow graph's first-call check runs the graph and the
fallback from the same state of the written buffers (:func:`written_inputs`).

Not chosen (measured alternatives in the report of issue 19): slicing the buffer to the kept
widths at prune time stores the cache at the kept widths (half its bytes at half of every
coupling) and saves the per-step gather, but needs the fallback to write a narrow buffer and a
model's re-allocation to be caught; left for later. The cost of this design is one gather of the
cache per read per step, a copy of the kept part of the cache.
"""
from __future__ import annotations

import os

import torch

from ecospa.analysis.mutation import base_of, is_view, written_arg
from ecospa.ops.registry import has

__all__ = ["SERVE", "REFUSED", "stored_nodes", "written_inputs", "read_stored"]

#: Whether narrow graphs serve calls that write a tensor the module keeps (off by default; the
#: environment variable ``ECOSPA_NARROW_BUFFER_CACHES=1`` turns it on). Measured
#: (bench/results/buffer_cache.md, ``bench/bench_buffer_cache.py``): with the cache at its dense
#: width, the gather of the whole cache on every read costs more than the narrow attention saves,
#: so those calls decode slower than the exact fallback (litgpt width 256: 0.79x dense against
#: 1.45x; width 1024: 1.24x against 1.39x). The fallback serves them until the cache itself is
#: stored at the kept widths; tests turn this on to keep the narrow path exact.
SERVE = os.environ.get("ECOSPA_NARROW_BUFFER_CACHES") == "1"
REFUSED = ("the module writes a tensor it keeps in place (a KV cache in a module buffer): its narrow graph "
           "would gather the whole dense cache on every call, slower than the exact fallback, which serves it")


def _roots(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    roots = set()
    for node in graph.nodes:
        k = written_arg(node)
        if k is None:
            continue
        chain, base = base_of(node.args[k])
        if not isinstance(base, torch.fx.Node):
            continue
        if chain or base.op == "placeholder" or (base.op == "call_function" and has(base.target, "fresh")):
            roots.add(base)
    return roots


def stored_nodes(graph: torch.fx.Graph) -> frozenset[torch.fx.Node]:
    """The nodes whose value is (a view of) a tensor written in place through a view or into a
    graph placeholder: they run dense in the narrow graph (see the module docstring)."""
    out = set(_roots(graph))
    if not out:
        return frozenset()
    for node in graph.nodes:  # in order: a view or a write of a stored node aliases it
        if node in out or node.op != "call_function" or not node.args:
            continue
        k = written_arg(node)
        if (k is not None and node.args[k] in out) or (is_view(node) and node.args[0] in out):
            out.add(node)
    return frozenset(out)


def written_inputs(graph: torch.fx.Graph) -> list[int]:
    """Positions among the graph's placeholders of those written in place (buffers, inputs)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    roots = _roots(graph)
    return [i for i, n in enumerate(placeholders) if n in roots]


def read_stored(b, node: torch.fx.Node, run):
    """``run()`` (the narrow rule of ``node``) with every stored operand of ``node`` gathered at
    the kept positions of its layout first (its removed positions are not known to be zero)."""
    ins = [a for a in node.all_input_nodes if a in b.stored and b.layout(a)]
    saved = {a: (b.env[a], b.zero.get(a)) for a in ins}
    try:
        for a in ins:
            new, ndim = b.env[a], len(b.shape(a))
            for dim, nar in sorted(b.layout(a).items()):
                new = b.gather(new, dim, nar.index, nar.selectors, ndim)
            b.env[a], b.zero[a] = new, False
        return run()
    finally:
        for a, (env, zero) in saved.items():
            b.env[a] = env
            if zero is None:
                b.zero.pop(a, None)
            else:
                b.zero[a] = zero
