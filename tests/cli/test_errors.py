"""Help texts, ``--version``, and exit code 2 with one line on bad input or a missing package."""
from __future__ import annotations

import subprocess
import sys

import pytest

import ecospa

COMMANDS = ("inspect", "compress", "train", "plot", "demo")


def one_line_error(r, command: str, *fragments: str) -> None:
    assert r.code == 2, (r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith(f"ecospa {command}: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(cli, command):
    r = cli(command, "--help")
    assert r.code == 0
    assert f"usage: ecospa {command}" in r.out and "examples:" in r.out
    examples = r.out.split("examples:")[1]
    assert f"ecospa {command}" in examples


def test_top_level_help_and_version(cli):
    r = cli("--help")
    assert r.code == 0 and all(c in r.out for c in COMMANDS) and "examples:" in r.out
    r = cli("--version")
    assert r.code == 0 and r.out.strip() == f"ecospa {ecospa.__version__}"


@pytest.mark.parametrize("args, fragments", [
    (["inspect", "no_such_model_xyz"], ["unknown model 'no_such_model_xyz'"]),
    (["inspect", "gpt"], ["unknown model 'gpt'", "gpt2"]),  # suggests the close transformers types
    (["inspect", "missing/config.json"], ["no such file or directory"]),
    (["inspect", "no_such_module_xyz:build"], ["no module named 'no_such_module_xyz'"]),
    (["inspect", "gpt2", "--set", "oops"], ["KEY=VALUE"]),
    (["inspect", "gpt2", "--set", "n_embd=-4", "--no-narrow"], ["gpt2"]),  # the model cannot be built
    (["inspect", "./no/such/dir"], ["no such file or directory: './no/such/dir'"]),
    (["plot", "missing.json"], ["no such file or directory"]),
    (["train", "missing.txt"], ["no such file"]),
])
def test_bad_input_exits_2_with_one_line(cli, args, fragments):
    one_line_error(cli(*args), args[0], *fragments)


@pytest.mark.parametrize("target", ["1.5", "0", "-3", "x", "12.5"])
def test_bad_target(cli, target, tmp_path):
    r = cli("compress", tmp_path, "--text", tmp_path / "t.txt", "--out", tmp_path / "o", "--target", target)
    one_line_error(r, "compress", "--target", repr(target))


def test_timm_names_without_timm(cli):
    try:
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or does not import beside this torch
        one_line_error(cli("inspect", "timm:resnet18"), "inspect", "timm", "pip install timm")
    else:
        pytest.skip("timm imports here")


def test_files_that_are_not_what_they_should_be(cli, tmp_path):
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    one_line_error(cli("plot", tmp_path / "notes.json"), "plot", "not a run log")
    one_line_error(cli("inspect", tmp_path / "notes.json"), "inspect", "model_type")
    (tmp_path / "short.txt").write_text("to be or not to be")
    one_line_error(cli("train", tmp_path / "short.txt"), "train", "at least 1000")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("plot", tmp_path / "empty"), "plot", "neither an ecospa checkpoint nor a run folder")


def test_library_errors_and_unwritable_outputs_are_one_line(cli, tmp_path, factory_file):
    (tmp_path / "plan.json").write_text('{"version": 99, "steps": []}')  # ecospa.PlanError
    one_line_error(cli("plot", tmp_path / "plan.json"), "plot", "version 99")
    (tmp_path / "a_file").write_text("")
    r = cli("inspect", f"{factory_file}:build", "--no-narrow", "--graphml", tmp_path / "a_file" / "g.graphml")
    one_line_error(r, "inspect", "a_file")  # an OSError, said as Python says it


@pytest.mark.parametrize("module, argv", [
    ("rich", ["inspect", "gpt2"]),
    ("networkx", ["inspect", "gpt2", "--dot", "g.dot"]),
    ("matplotlib", ["plot", "x.json"]),
    ("tqdm", ["compress", ".", "--text", "t", "--out", "o", "--target", "0.5"]),
])
def test_a_missing_optional_package_is_named_with_the_extra(cli, module, argv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    monkeypatch.chdir(tmp_path)
    one_line_error(cli(*argv), argv[0], module, "pip install 'ecospa[cli]'")
    assert not any(tmp_path.iterdir())  # stopped before doing anything


def test_a_missing_package_in_a_fresh_process():
    """The same through ``python -m ecospa.cli`` (the installed script runs the same ``main``)."""
    code = "import sys; sys.modules['rich'] = None; import runpy; runpy.run_module('ecospa.cli', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", code, "inspect", "gpt2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == ("ecospa inspect: error: this command needs rich (the table), which is not installed: "
                                "pip install 'ecospa[cli]'")
