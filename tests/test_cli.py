"""The ``ecospa`` command line: the installed script, the demo's help and errors, and the quick demo
end to end. The other commands are tested in tests/cli/. Everything runs in this process except the
test of the installed script."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ecospa.cli import build_parser, main
from ecospa import ConfigError
from ecospa.recipes.demo import DemoConfig


def test_installed_script_lists_the_commands():
    """The ``ecospa`` console script of ``pip install`` (``python -m ecospa.cli`` is run by
    tests/cli/test_errors.py::test_a_missing_package_in_a_fresh_process)."""
    script = Path(sys.executable).with_name("ecospa")
    if not script.exists():
        pytest.skip("the ecospa console script is not installed next to this interpreter")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: ecospa" in r.stdout
    for command in ("inspect", "compress", "train", "plot", "demo"):
        assert command in r.stdout


def test_demo_help_describes_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--steps", "--seed", "--target", "--out", "--quick"):
        assert opt in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: ecospa" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["demo", "--target", "1.5"], ["demo", "--steps", "0"], ["demo", "--target", "x"]])
def test_bad_arguments_are_rejected_with_the_value(args, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args)
    assert e.value.code == 2
    assert repr(args[-1]) in capsys.readouterr().err


def test_demo_without_its_extra_says_how_to_install_it(tmp_path: Path, capsys, monkeypatch):
    # matplotlib made unimportable: the demo stops before training, with one line and exit 2
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "matplotlib" in lines[0] and "pip install 'ecospa[demo]'" in lines[0], lines
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


def test_demo_config_errors_name_the_value():
    with pytest.raises(ConfigError, match="0.0"):
        DemoConfig(target=0.0)
    with pytest.raises(ConfigError, match="-3"):
        DemoConfig(steps=-3)


@pytest.mark.slow
def test_quick_demo_writes_sane_json_and_png(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    assert "ecospa/dense" in capsys.readouterr().out  # the printed table
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
