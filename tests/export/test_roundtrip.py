"""``ecospa.export`` round trip: pruned tiny Llama, Qwen2, Mistral and GPT-2 models (uniform and
ragged plans) are exported, then loaded by transformers in ONE fresh process where ``ecospa``
cannot be imported (tests/export/blocked_load.py); their logits must equal the pruned model's
(fp32, rel err <= 1e-5). Uniform plans export exactly as small as the pruned model; ragged ones
are padded (zero units) and still exact. The Llama is also written as GGUF (f32 and f16) and
read back by transformers' GGUF reader in the same process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ecospa
from tests.export.models import ARCHS, inputs, pruned

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

HERE = Path(__file__).parent
CASES = [(a, k) for a in ARCHS for k in ("uniform", "ragged")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export every case, load them all in one blocked subprocess; per case (report, pruned
    model's logits, reloaded logits) and the GGUF logits."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("export")
    x = inputs()
    save_file({"input_ids": x}, root / "inputs.safetensors")
    reports, ref, specs = {}, {}, []
    for arch, kind in CASES:
        m = pruned(arch, kind)
        name = f"{arch}-{kind}"
        gguf = "f32" if name == "llama-uniform" else False
        reports[name] = ecospa.export(m, root / name, gguf=gguf)
        with torch.no_grad():
            ref[name] = m(x).logits.float()
        specs.append(f"{name}={root / name}")
    ecospa.export(pruned("llama", "ragged"), root / "llama-f16", gguf="f16")
    specs += [f"gguf-f32={root / 'llama-uniform'}::model.gguf", f"gguf-f16={root / 'llama-f16'}::model.gguf"]
    proc = subprocess.run([sys.executable, str(HERE / "blocked_load.py"), str(root / "inputs.safetensors"),
                           str(root / "out.safetensors"), *specs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return reports, ref, load_file(root / "out.safetensors"), root


def test_the_subprocess_could_not_import_ecospa(exported):
    assert exported[2]["blocked"].item() == 1.0


@pytest.mark.parametrize("arch,kind", CASES)
def test_exported_checkpoint_loads_without_ecospa_with_the_pruned_logits(exported, arch, kind):
    reports, ref, got, _ = exported
    name = f"{arch}-{kind}"
    assert rel(got[name], ref[name]) <= 1e-5
    assert reports[name].rel_err <= 1e-5


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gpt2"])
def test_uniform_plans_export_exactly_as_small_with_the_pruned_sizes_in_the_config(exported, arch):
    r = exported[0][f"{arch}-uniform"]
    assert r.params == r.pruned_params < r.dense_params and r.overhead == 0.0 and not r.padded
    cfg = json.loads((r.path / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (2, 1, 32)
    assert r.config_changes["intermediate_size"] == (48, 32)
    assert (r.path / "model.safetensors").is_file()


def test_gpt2_heads_cannot_shrink_the_ffn_can(exported):
    r = exported[0]["gpt2-uniform"]
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["n_inner"] == 85 and cfg["n_head"] == 4  # 128 - 43 FFN units; heads keep n_embd / n_head
    assert r.params == r.pruned_params  # the FFN-only uniform plan is expressible: no padding
    r = exported[0]["gpt2-ragged"]
    assert r.params > r.pruned_params and any("c_attn" in k for k in r.padded)


@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_plans_are_padded_and_say_so(exported, arch):
    r = exported[0][f"{arch}-ragged"]
    assert r.pruned_params < r.params <= r.dense_params
    assert r.overhead > 0 and r.padded and r.hint
    assert f"{r.overhead:.2%}" in r.summary()


def test_gguf_llama_loads_in_transformers_reader_with_the_same_logits(exported):
    reports, ref, got, root = exported
    assert reports["llama-uniform"].gguf == root / "llama-uniform" / "model.gguf"
    assert rel(got["gguf-f32"], ref["llama-uniform"]) <= 1e-5
    # f16 matrices: within f16 rounding of the pruned model (and not equal: it is really f16)
    f16 = got["gguf-f16"]
    with torch.no_grad():
        ref16 = pruned("llama", "ragged")(inputs()).logits
    assert 1e-6 < rel(f16, ref16) <= 2e-3
