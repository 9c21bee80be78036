"""``ecospa inspect MODEL``: the couplings of a model, whether they run narrow, and its coupling graph."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import torch

import ecospa
from ecospa.cli._common import CliError, add_command, console, need
from ecospa.cli.models import MODEL_HELP, load_model

__all__ = ["add_parser", "run", "narrow_status"]

DESCRIPTION = """\
Find the couplings of a model (ecospa.auto_couple) and show them as a table: name, kind, width,
exact or the reason it is not, and how the model would run once they are pruned. The last column
is measured, not guessed: a copy of the model loses one unit of every exact coupling
(ecospa.prune), runs once on the example inputs, and ecospa.execution_report says which attention
regions ran narrow (at the kept widths) and which fell back (and why). Couplings whose channels
simply vanish downstream (FFN, GLU) need no region: "compact".

MODEL: """ + MODEL_HELP + """.
Nothing is downloaded. Needs the cli extra (rich; networkx and matplotlib for the graph files)."""

EXAMPLES = """\
ecospa inspect gpt2
ecospa inspect llama --set num_hidden_layers=4 --graphml llama.graphml --dot llama.dot --png llama.png
ecospa inspect path/to/config.json --json > couplings.json
ecospa inspect ./my_models.py:build_model
ecospa inspect ./SmolLM2-135M --no-narrow"""


def add_parser(sub) -> None:
    p = add_command(sub, "inspect", help="show the couplings of a model and whether they run narrow",
                    description=DESCRIPTION, examples=EXAMPLES)
    p.add_argument("model", metavar="MODEL", help="the model (see above)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (transformers models; repeatable), e.g. --set num_hidden_layers=4")
    p.add_argument("--full-size", action="store_true",
                   help="use the library's default sizes for a model type name instead of small ones")
    p.add_argument("--model", dest="factory", metavar="MODULE:FACTORY",
                   help="for an ecospa checkpoint of a plain module: the code that builds the dense model")
    p.add_argument("--no-narrow", action="store_true", help="skip the narrow-execution check (no pruned copy, no run)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--graphml", metavar="FILE", help="write the coupling graph as GraphML (networkx)")
    p.add_argument("--dot", metavar="FILE", help="write the coupling graph as Graphviz DOT")
    p.add_argument("--png", metavar="FILE", help="write a picture of the coupling graph (matplotlib)")


def _call(model, inputs) -> None:
    args, kwargs = inputs
    with torch.no_grad():
        model(*args, **kwargs)


def narrow_status(model, cg) -> tuple[dict[str, str], list[Any]]:
    """``({coupling name: status}, execution_report)`` of a copy of ``model`` that lost one unit of
    every exact coupling and ran once on ``cg.inputs``. Status: ``narrow``, ``fallback: why``,
    ``compact`` (needs no region), ``scatter`` (scattered, in no region), ``-`` (inexact)."""
    status = {c.name: "-" for c in cg.all}
    removal = {c.name: [c.width - 1] for c in cg if c.width >= 2}
    if not removal:
        return status, []
    if cg.inputs is None:
        raise CliError("the couplings carry no example inputs to run the pruned copy with")
    twin = copy.deepcopy(model)
    ecospa.prune(twin, removal, couplings=cg)
    _call(twin, cg.inputs)
    report = ecospa.execution_report(twin)
    where = {name: r for r in report for name in r.couplings}
    for c in cg:
        r = where.get(c.name)
        if c.name not in removal:
            status[c.name] = "not checked (width 1)"
        elif r is not None:
            status[c.name] = "narrow" if r.narrow else f"fallback: {'; '.join(r.reasons) or 'not run'}"
        elif all(s.layout == "compact" for s in c.sites):
            status[c.name] = "compact"
        else:
            status[c.name] = "scatter"
    return status, report


def _summary(loaded, cg, params: int) -> dict[str, Any]:
    prunable = 0
    shapes = cg.shapes or {n: tuple(p.shape) for n, p in loaded.model.named_parameters()}
    for c in cg:
        prunable += int(c.unit_numel(shapes).sum())
    return {"model": loaded.label, "params": params, "couplings": len(cg.all), "exact": len(cg),
            "inexact": len(cg.inexact), "prunable_params": prunable}


def _render(loaded, cg, status, report, summary: dict[str, Any], checked: bool) -> None:
    from rich.table import Table

    con = console()
    t = Table(title=f"couplings of {loaded.label}", title_justify="left", show_lines=False)
    for col, just in (("name", "left"), ("kind", "left"), ("width", "right"), ("exact", "left"),
                      ("narrow", "left")):
        t.add_column(col, justify=just, overflow="fold")
    style = {"narrow": "green", "compact": "cyan", "-": "dim"}
    for c in cg.all:
        s = status.get(c.name, "-") if checked else "not checked"
        exact = "exact" if c.exact else f"no: {c.reason}"
        t.add_row(c.name, c.kind, str(c.width), exact if c.exact else f"[yellow]{exact}[/]",
                  f"[{style.get(s, 'red')}]{s}[/]" if checked else "[dim]not checked[/]")
    con.print(t)
    line = (f"{summary['params']:,} params; {summary['couplings']} couplings: {summary['exact']} exact, "
            f"{summary['inexact']} inexact")
    if checked:
        narrow = sum(1 for r in report if r.narrow)
        line += f"; {narrow}/{len(report)} attention regions ran narrow after a small prune"
    con.print(line)


def run(args: argparse.Namespace) -> int:
    need("rich", why="the table")
    if args.graphml or args.dot or args.png:
        need("networkx", why="the coupling graph")
    if args.png:
        need("matplotlib", why="the graph picture")
    loaded = load_model(args.model, overrides=args.overrides, full_size=args.full_size, factory=args.factory)
    model = loaded.model.eval()
    cg = ecospa.auto_couple(model, loaded.example_inputs)
    params = sum(p.numel() for p in model.parameters())
    status, report, checked = {c.name: "-" for c in cg.all}, [], not args.no_narrow
    if checked:
        try:
            status, report = narrow_status(model, cg)
        except CliError:
            raise
        except Exception as e:  # noqa: BLE001 - report it, still show the couplings
            print(f"ecospa inspect: warning: the narrow check failed: {type(e).__name__}: {e}", file=sys.stderr)
            checked = False
    summary = _summary(loaded, cg, params)
    written = []
    if args.graphml or args.dot or args.png:
        from ecospa.cli import graph

        g = graph.coupling_graph(cg, {n: tuple(p.shape) for n, p in model.named_parameters()},
                                 status if checked else None)
        if args.graphml:
            written.append(graph.write_graphml(g, args.graphml))
        if args.dot:
            written.append(graph.write_dot(g, args.dot))
        if args.png:
            written.append(graph.write_png(g, args.png, title=f"coupling graph of {loaded.label}"))
    if args.json:
        data = {**summary, "narrow_checked": checked,
                "coupling_list": [{"name": c.name, "kind": c.kind, "width": c.width, "exact": c.exact,
                                   "reason": c.reason, "scope": c.scope, "group": c.group,
                                   "params": list(c.params), "narrow": status.get(c.name) if checked else None}
                                  for c in cg.all],
                "regions": [{"path": r.path, "narrow": r.narrow, "narrow_calls": r.narrow_calls,
                             "fallback_calls": r.fallback_calls, "reasons": list(r.reasons),
                             "couplings": list(r.couplings)} for r in report],
                "written": [str(p) for p in written]}
        print(json.dumps(data, indent=1))
        return 0
    _render(loaded, cg, status, report, summary, checked)
    for p in written:
        print(f"wrote {p}")
    return 0
