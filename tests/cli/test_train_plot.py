"""``ecospa train`` on a tiny text, and ``ecospa plot`` from its run log, from a plan and from a
saved pruned model."""
from __future__ import annotations

import json
from pathlib import Path

import ecospa
from ecospa.cli.plot import from_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == PNG


def test_train_on_a_text_file_then_plot_the_run(cli, text_file, tmp_path):
    out = tmp_path / "run"
    r = cli("train", text_file, "--quick", "--steps", "4", "--no-progress", "--out", out)
    assert r.code == 0, r.err
    assert "ecospa/dense" in r.out  # the demo's table
    data = json.loads((out / "demo.json").read_text())
    assert data["data"]["corpus"] == str(text_file) and data["train"]["steps"] == 4
    assert data["data"]["train_chars"] + data["data"]["val_chars"] == len(text_file.read_text())
    assert is_png(out / "demo.png")
    sparse = next(x for x in data["runs"] if x["name"] == "ecospa")
    assert sparse["hook"]["rounds"] >= 1 and sparse["params"] < sparse["params_initial"]

    r = cli("plot", out / "demo.json", "--out", tmp_path / "plots")
    assert r.code == 0, r.err
    for name in ("demo.widths.png", "demo.params.png"):
        assert is_png(tmp_path / "plots" / name) and str(tmp_path / "plots" / name) in r.out
    r = cli("plot", out)  # the run folder: PNGs next to demo.json
    assert r.code == 0, r.err
    assert is_png(out / "demo.widths.png") and is_png(out / "demo.params.png")


def test_plot_a_plan(cli, tmp_path):
    plan = ecospa.Plan.from_dict({"version": 2, "steps": [
        {"step": 10, "removals": {"h.0.attn.qk.head0": [0, 1], "h.0.mlp.ffn": [3]},
         "widths": {"h.0.attn.qk.head0": 8, "h.0.mlp.ffn": 32}, "params_before": 1000, "params_after": 900},
        {"step": 20, "removals": {"h.0.attn.qk.head0": [5], "h.1.attn.vo.head1": [0]},
         "widths": {"h.0.attn.qk.head0": 6, "h.1.attn.vo.head1": 8}, "params_before": 900, "params_after": 850}]})
    (tmp_path / "plan.json").write_text(plan.to_json())
    r = cli("plot", tmp_path / "plan.json")
    assert r.code == 0, r.err
    assert is_png(tmp_path / "plan.widths.png") and is_png(tmp_path / "plan.params.png")


def test_plot_a_saved_pruned_model(cli, compressed, tmp_path):
    assert compressed.code == 0, compressed.err
    r = cli("plot", compressed.directory, "--out", tmp_path)
    assert r.code == 0, r.err
    png = tmp_path / f"{compressed.directory.name}.widths.png"
    assert is_png(png) and str(png) in r.out
    assert not list(tmp_path.glob("*.params.png"))  # no training log, no parameter curve
    # the widths drawn are those compress reported
    widths = from_checkpoint(compressed.directory, None).widths
    report = json.loads((compressed.directory / "compress.json").read_text())["report"]
    assert widths == {name: tuple(w) for name, w in report["widths"].items()}
