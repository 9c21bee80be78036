"""Exportable plans (``exportable=True`` of PlanConfig / CompressConfig): a tiny Llama (GQA 4/2
heads) and a GPT-2, pruned with EcoSpa and with compress, export with zero padding and load in a
process where ecospa cannot be imported with the pruned model's logits (fp32, rel err <= 1e-5)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecospa
from ecospa.schedule.exportable import exportable_rules
from tests.export.models import build, inputs

transformers = pytest.importorskip("transformers")

HERE = Path(__file__).parent


def data(n=4):
    return [torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def by_compress(arch, target):
    m, _ = ecospa.compress(build(arch), target, data(), rounds=2, exportable=True)
    return m.eval()


def by_ecospa(arch, target, steps=12):
    m = build(arch).train()
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    sp = ecospa.EcoSpa(m, opt, target=target, every=1, top_k=1.0, exportable=True, example_inputs=(inputs()[:1],))
    for i, x in enumerate(data() * (steps // 4)):
        m(x, labels=x).loss.backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    assert sp.events
    return m.eval()


CASES = {"llama-compress": lambda: by_compress("llama", 0.3), "gpt2-compress": lambda: by_compress("gpt2", 0.6),
         "llama-ecospa": lambda: by_ecospa("llama", 0.4), "gpt2-ecospa": lambda: by_ecospa("gpt2", 0.6)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("exportable")
    x = inputs()
    save_file({"input_ids": x}, root / "inputs.safetensors")
    reports, ref, specs = {}, {}, []
    for name, make in CASES.items():
        m = make()
        reports[name] = ecospa.export(m, root / name)
        with torch.no_grad():
            ref[name] = m(x).logits.float()
        specs.append(f"{name}={root / name}")
    proc = subprocess.run([sys.executable, str(HERE / "blocked_load.py"), str(root / "inputs.safetensors"),
                           str(root / "out.safetensors"), *specs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return reports, ref, load_file(root / "out.safetensors")


@pytest.mark.parametrize("name", list(CASES))
def test_exportable_plans_export_without_padding_and_load_without_ecospa(exported, name):
    reports, ref, got = exported
    r = reports[name]
    assert got["blocked"].item() == 1.0
    assert r.params == r.pruned_params < r.dense_params and r.overhead == 0.0 and not r.padded and not r.hint
    assert float((got[name] - ref[name]).norm() / ref[name].norm()) <= 1e-5


def test_llama_loses_whole_key_value_groups_the_same_in_every_layer(exported):
    cfg = json.loads((exported[0]["llama-compress"].path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 8)) == (2, 1, 8)
    assert cfg["intermediate_size"] < 48


def test_gpt2_keeps_its_heads_and_shrinks_the_ffn(exported):
    for name in ("gpt2-compress", "gpt2-ecospa"):
        changes = exported[0][name].config_changes
        assert set(changes) == {"n_inner"} and changes["n_inner"][1] < 128


def test_rules_come_from_the_couplings_and_the_config():
    m = build("llama")
    cg = ecospa.auto_couple(m, (inputs()[:1],))
    r = exportable_rules(cg, m)
    assert r.head["model.layers.0.self_attn.qk.head1"] == r.head["model.layers.0.self_attn.vo.head1"]
    assert r.head["model.layers.0.self_attn.qk.head0"] != r.head["model.layers.0.self_attn.qk.head1"]
    assert not r.frozen
    g = build("gpt2")
    r = exportable_rules(ecospa.auto_couple(g, (inputs()[:1],)), g)
    assert set(r.frozen) == set(r.head) and all("n_embd" in why for why in r.frozen.values())
    assert not any("mlp" in n for n in r.frozen)


def test_the_option_is_off_by_default_and_checked():
    assert ecospa.PlanConfig().exportable is False and ecospa.CompressConfig().exportable is False
    with pytest.raises(ecospa.ConfigError, match="exportable"):
        ecospa.PlanConfig(exportable="yes")
    with pytest.raises(ecospa.CompressError, match="exportable"):
        ecospa.CompressConfig(exportable=1)


def test_an_unreachable_exportable_target_is_refused_before_anything_changes():
    m = build("gpt2")
    before = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ecospa.ConfigError, match="exportable=True"):
        ecospa.compress(m, 0.3, data(), exportable=True)  # its heads cannot go: the FFN alone is too little
    assert all(torch.equal(before[n], p) for n, p in m.named_parameters())
