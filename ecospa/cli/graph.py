"""The coupling graph as a networkx graph, and its files: GraphML, DOT and a PNG picture.

Nodes: every coupling (``type="coupling"``, kind, width, exact, reason), every parameter a
coupling slices (``type="parameter"``, shape) and every module that owns one (``type="module"``).
Edges: coupling -> parameter, one per sliced ``(parameter, dim)`` (``type="slices"``: dim, slices,
role, layout); parameter -> module (``type="owned_by"``). A directed multigraph, since one
coupling may slice one parameter along two dimensions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["coupling_graph", "write_graphml", "write_dot", "write_png"]


def coupling_graph(cg, shapes: Mapping[str, tuple[int, ...]], narrow: Mapping[str, str] | None = None):
    """A ``networkx.MultiDiGraph`` of the couplings in ``cg.all`` (``narrow``: status per name)."""
    import networkx as nx

    g = nx.MultiDiGraph(name="ecospa coupling graph")
    for c in cg.all:
        g.add_node(f"coupling:{c.name}", type="coupling", label=c.name, kind=c.kind, width=int(c.width),
                   exact=bool(c.exact), reason=c.reason or "", scope=c.scope, group=c.group,
                   narrow=(narrow or {}).get(c.name, ""))
        sites = {(s.param, s.dim): s for s in c.sites}
        for t in c.tables:
            p = f"parameter:{t.param}"
            if p not in g:
                shape = shapes.get(t.param, ())
                g.add_node(p, type="parameter", label=t.param, shape="x".join(map(str, shape)))
                owner = t.param.rsplit(".", 1)[0] if "." in t.param else ""
                m = f"module:{owner or '<root>'}"
                if m not in g:
                    g.add_node(m, type="module", label=owner or "<root>")
                g.add_edge(p, m, type="owned_by")
            s = sites.get((t.param, t.dim))
            g.add_edge(f"coupling:{c.name}", p, type="slices", dim=int(t.dim), slices=int(len(t.index)),
                       role=s.role if s else "", layout=s.layout if s else "")
    return g


def write_graphml(g, path: str | Path) -> Path:
    import networkx as nx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nx.write_graphml(g, path)
    return path


def _q(v: Any) -> str:
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


_COLORS = {"qk": "#4C72B0", "vo": "#DD8452", "ffn": "#55A868", "glu": "#8172B3", "linear": "#937860"}
_SHAPES = {"coupling": "box", "parameter": "ellipse", "module": "folder"}


def write_dot(g, path: str | Path) -> Path:
    """Graphviz DOT, written directly (no pydot/pygraphviz needed); ``dot -Tsvg`` draws it."""
    lines = ["digraph ecospa {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    for n, d in g.nodes(data=True):
        attrs = dict(d)
        attrs["shape"] = _SHAPES.get(d.get("type"), "ellipse")
        if d.get("type") == "coupling":
            attrs["style"] = "filled" if d.get("exact") else "dashed"
            attrs["fillcolor"] = _COLORS.get(d.get("kind"), "#cccccc")
        lines.append(f"  {_q(n)} [{', '.join(f'{k}={_q(v)}' for k, v in attrs.items())}];")
    for u, v, d in g.edges(data=True):
        lines.append(f"  {_q(u)} -> {_q(v)} [{', '.join(f'{k}={_q(x)}' for k, x in d.items())}];")
    lines.append("}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_png(g, path: str | Path, *, title: str = "") -> Path:
    """Couplings (coloured by kind; red edge when inexact) left, parameters middle, modules right."""
    import networkx as nx

    from ecospa.recipes.train.plot import pyplot, save_figure

    plt = pyplot()

    columns = {"coupling": 0.0, "parameter": 1.0, "module": 2.0}
    by_type: dict[str, list[str]] = {t: [] for t in columns}
    for n, d in g.nodes(data=True):  # insertion order: couplings in graph order, the rest as first used
        by_type.setdefault(d.get("type"), []).append(n)
    pos = {}
    for t, nodes in by_type.items():
        ys = np.linspace(1.0, 0.0, len(nodes)) if len(nodes) > 1 else [0.5] * len(nodes)
        pos.update({n: (columns.get(t, 1.0), y) for n, y in zip(nodes, ys)})
    n_max = max((len(v) for v in by_type.values()), default=1)
    fig, ax = plt.subplots(figsize=(15, min(80, max(5, 0.14 * n_max))))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=False, width=0.4, alpha=0.35, edge_color="#555555")
    for t, marker in (("coupling", "s"), ("parameter", "o"), ("module", "D")):
        nodes = by_type.get(t, [])
        if not nodes:
            continue
        colors = [_COLORS.get(g.nodes[n].get("kind"), "#bbbbbb") if t == "coupling" else "#dddddd" for n in nodes]
        edge = ["none" if g.nodes[n].get("exact", True) else "#cc0000" for n in nodes]
        nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_shape=marker, node_color=colors, edgecolors=edge,
                               node_size=30, ax=ax)
    if n_max <= 500:
        font = 6 if n_max <= 120 else 4
        for t, (ha, dx) in (("coupling", ("right", -0.03)), ("parameter", ("center", 0.0)),
                            ("module", ("left", 0.03))):
            for n in by_type.get(t, []):
                x, y = pos[n]
                ax.text(x + dx, y + (0.004 if t == "parameter" else 0.0), g.nodes[n].get("label", n), ha=ha,
                        va="bottom" if t == "parameter" else "center", fontsize=font)
    handles = [plt.Line2D([], [], marker="s", ls="", color=c, label=k) for k, c in _COLORS.items()]
    handles.append(plt.Line2D([], [], marker="s", ls="", mfc="white", mec="#cc0000", label="inexact"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax.set_xlim(-0.8, 2.8)
    ax.set_title(title or "couplings -> parameters -> modules", fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
