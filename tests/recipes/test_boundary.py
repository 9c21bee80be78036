"""The recipes are outside the library: ``import ecospa`` never loads them or their extras, and
they, the CLI, the examples and the benchmarks reach ecospa only through its public API."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ecospa

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = sorted([*(ROOT / "ecospa" / "recipes").rglob("*.py"), *(ROOT / "ecospa" / "cli").rglob("*.py"),
                  *(ROOT / "examples").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
PUBLIC = set(ecospa.__all__) | {"recipes", "cli"}
CLIENT_PACKAGES = ("ecospa.recipes", "ecospa.cli")  # clients themselves: they may import each other


def _violations(path: Path) -> list[str]:
    """Every use of ``ecospa`` in ``path`` that is neither public API nor a client package."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            bad += [f"{where} import {a.name}" for a in node.names
                    if a.name.startswith("ecospa.") and not a.name.startswith(CLIENT_PACKAGES)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = node.module
            if mod == "ecospa":
                bad += [f"{where} from ecospa import {a.name}" for a in node.names if a.name not in PUBLIC]
            elif mod.startswith("ecospa.") and not mod.startswith(CLIENT_PACKAGES):
                bad.append(f"{where} from {mod} import ...")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "ecospa" and node.attr not in PUBLIC):
            bad.append(f"{where} ecospa.{node.attr}")
    return bad


def test_the_scan_sees_the_clients_and_catches_an_internal_import(tmp_path: Path):
    assert ROOT / "ecospa" / "recipes" / "demo.py" in CLIENTS and ROOT / "bench" / "bench_training.py" in CLIENTS
    probe = tmp_path / "probe.py"
    probe.write_text("import ecospa\nfrom ecospa.ir.coupling import SliceTable\nfrom ecospa import prune, _x\n"
                     "ecospa.pruning.apply\n")
    found = _violations(probe)
    assert len(found) == 3 and "from ecospa.ir.coupling" in found[0] and "_x" in found[1], found


@pytest.mark.parametrize("path", CLIENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_clients_use_only_the_public_api(path: Path):
    assert _violations(path) == []


def test_import_ecospa_loads_no_recipes_and_no_extras():
    """``import ecospa`` adds ecospa itself and standard-library modules to what torch and numpy
    load, nothing else (no recipes, no transformers, tqdm, matplotlib, scipy, safetensors)."""
    # torch itself imports tqdm when it is installed (torch.hub), so compare with torch loaded
    code = ("import sys, torch, numpy; before = set(sys.modules); import ecospa; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before "
            "if m.split('.')[0] not in sys.stdlib_module_names} | "
            "{m for m in sys.modules if m.startswith('ecospa.recipes')}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['ecospa']"
