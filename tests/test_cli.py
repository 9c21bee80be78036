"""The ``ecospa`` command line: help texts, argument errors, and the quick demo end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ecospa.cli import build_parser, main
from ecospa import ConfigError
from ecospa.recipes.demo import DemoConfig


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m ecospa.cli ARGS`` in a subprocess (what the ``ecospa`` script runs)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "ecospa.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_the_demo():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "usage: ecospa" in r.stdout and "demo" in r.stdout


def test_installed_script_runs():
    script = Path(sys.executable).with_name("ecospa")
    if not script.exists():
        pytest.skip("the ecospa console script is not installed next to this interpreter")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "demo" in r.stdout


def test_demo_help_describes_the_options():
    r = _run("demo", "--help")
    assert r.returncode == 0, r.stderr
    for opt in ("--steps", "--seed", "--target", "--out", "--quick"):
        assert opt in r.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: ecospa" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["demo", "--target", "1.5"], ["demo", "--steps", "0"], ["demo", "--target", "x"]])
def test_bad_arguments_are_rejected_with_the_value(args, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args)
    assert e.value.code == 2
    assert repr(args[-1]) in capsys.readouterr().err


def test_demo_without_its_extra_says_how_to_install_it(tmp_path: Path):
    # matplotlib made unimportable: the demo stops before training, with one line and exit 2
    code = ("import sys; sys.modules['matplotlib'] = None; from ecospa.cli import main; "
            f"sys.exit(main(['demo', '--quick', '--no-progress', '--out', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0] and "pip install 'ecospa[demo]'" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_demo_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="0.0"):
        DemoConfig(target=0.0)
    with pytest.raises(ConfigError, match="-3"):
        DemoConfig(steps=-3)


def test_quick_demo_writes_sane_json_and_png(tmp_path: Path):
    out = tmp_path / "demo"
    r = _run("demo", "--quick", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ecospa/dense" in r.stdout  # the printed table
    png = out / "demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "demo.json").read_text())
    runs = {x["name"]: x for x in data["runs"]}
    dense, sparse = runs["dense"], runs["ecospa"]
    assert sparse["params"] < dense["params"]
    assert sparse["params"] <= sparse["hook"]["target_params"]
    assert dense["steps"] == sparse["steps"] == data["train"]["steps"]
    for x in (dense, sparse):
        assert math.isfinite(x["val_loss"]) and 0 < x["val_loss"] < 10
        assert x["val_ppl"] == pytest.approx(math.exp(x["val_loss"]))
        assert x["train_seconds"] > 0 and x["forward_tokens_per_s"] > 0 and x["generate_tokens_per_s"] > 0
        assert x["peak_state_bytes"] >= x["final_state_bytes"] > 0
        assert x["history"][0]["step"] == 0 and x["history"][-1]["step"] == x["steps"]
    # weights + grads + two AdamW moments, fp32: 16 bytes per parameter at the end
    assert dense["final_state_bytes"] >= 16 * dense["params"]
    assert sparse["final_state_bytes"] < dense["final_state_bytes"]
    assert sparse["hook"]["rounds"] >= 1 and sparse["hook"]["reached"]
