"""``ecospa inspect``: the coupling table with its narrow column, JSON, and the graph files."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def table_rows(out: str) -> dict[str, list[str]]:
    """``{name: [kind, width, exact, narrow]}`` from the rich table (continuation lines skipped)."""
    rows = {}
    for line in out.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0]:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def gpt2_config(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    p = tmp_path_factory.mktemp("cfg") / "config.json"
    transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32).to_json_file(p)
    return p


def test_inspect_a_config_file_shows_couplings_and_how_they_run(cli, gpt2_config, tmp_path):
    files = {ext: tmp_path / f"g.{ext}" for ext in ("graphml", "dot", "png")}
    r = cli("inspect", gpt2_config, "--graphml", files["graphml"], "--dot", files["dot"], "--png", files["png"])
    assert r.code == 0, r.err
    rows = table_rows(r.out)
    for layer in (0, 1):
        for head in (0, 1):
            assert rows[f"transformer.h.{layer}.attn.qk.head{head}"] == ["qk", "16", "exact", "narrow"], rows
            assert rows[f"transformer.h.{layer}.attn.vo.head{head}"] == ["vo", "16", "exact", "narrow"], rows
        assert rows[f"transformer.h.{layer}.mlp.ffn"] == ["ffn", "128", "exact", "compact"], rows
    inexact = [v for v in rows.values() if v[2].startswith("no:")]
    assert inexact and all(v[3] == "-" for v in inexact)  # the residual stream, with its reason
    assert "2/2 attention regions ran narrow" in r.out
    # the graph files: GraphML and DOT read back by networkx, the picture is a PNG
    nx = pytest.importorskip("networkx")
    g = nx.read_graphml(files["graphml"])
    couplings = {d["label"]: d for _, d in g.nodes(data=True) if d["type"] == "coupling"}
    assert set(couplings) == set(rows)
    assert couplings["transformer.h.0.attn.vo.head1"]["narrow"] == "narrow"
    vo = "coupling:transformer.h.0.attn.vo.head1"
    assert {v for _, v in g.out_edges(vo)} == {"parameter:transformer.h.0.attn.c_attn.weight",
                                                "parameter:transformer.h.0.attn.c_attn.bias",
                                                "parameter:transformer.h.0.attn.c_proj.weight"}
    assert g.nodes["parameter:transformer.h.0.attn.c_attn.weight"]["shape"] == "32x96"
    pytest.importorskip("pydot")
    with warnings.catch_warnings():  # pydot's own pyparsing deprecations
        warnings.simplefilter("ignore")
        d = nx.nx_pydot.read_dot(files["dot"])
    assert d.number_of_nodes() == g.number_of_nodes() and d.number_of_edges() == g.number_of_edges()
    assert files["png"].read_bytes()[:8] == PNG


def test_inspect_json(cli, gpt2_config):
    r = cli("inspect", gpt2_config, "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["couplings"] == len(data["coupling_list"]) == data["exact"] + data["inexact"]
    status = {c["name"]: c["narrow"] for c in data["coupling_list"]}
    assert status["transformer.h.1.attn.qk.head0"] == "narrow" and status["transformer.h.1.mlp.ffn"] == "compact"
    assert all(reg["narrow"] and reg["fallback_calls"] == 0 for reg in data["regions"]) and len(data["regions"]) == 2


def test_inspect_module_factory_from_a_file(cli, factory_file):
    r = cli("inspect", f"{factory_file}:build")
    assert r.code == 0, r.err
    rows = table_rows(r.out)
    assert rows["transformer.h.0.attn.qk.head1"] == ["qk", "8", "exact", "narrow"]
    assert rows["transformer.h.1.mlp.ffn"] == ["ffn", "64", "exact", "compact"]
    assert "my_models.py:build (GPT)" in r.out


@pytest.mark.parametrize("factory, message", [("not_a_model", "should return a torch.nn.Module"),
                                              ("missing", "has no 'missing'")])
def test_inspect_bad_factory(cli, factory_file, factory, message):
    r = cli("inspect", f"{factory_file}:{factory}")
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 1 and message in r.err, r.err


def test_inspect_an_ecospa_checkpoint_shows_the_kept_widths(cli, compressed):
    assert compressed.code == 0, compressed.err
    r = cli("inspect", compressed.directory, "--json", "--no-narrow")
    assert r.code == 0, r.err
    widths = {c["name"]: c["width"] for c in json.loads(r.out)["coupling_list"] if c["exact"]}
    report = json.loads((compressed.directory / "compress.json").read_text())["report"]
    assert widths == {name: kept for name, (dense, kept) in report["widths"].items()}


def test_inspect_a_model_type_name_builds_a_small_model(cli):
    r = cli("inspect", "gpt2", "--set", "n_layer=1", "--json", "--no-narrow")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["model"].startswith("gpt2 (small) (GPT2LMHeadModel")
    names = {c["name"] for c in data["coupling_list"]}
    assert "transformer.h.0.mlp.ffn" in names and not any(n.startswith("transformer.h.1.") for n in names)
    assert data["narrow_checked"] is False and all(c["narrow"] is None for c in data["coupling_list"])


def _couplings(r) -> dict[str, tuple[str, int, bool]]:
    assert r.code == 0, r.err
    return {c["name"]: (c["kind"], c["width"], c["exact"]) for c in json.loads(r.out)["coupling_list"]}


def test_inspect_a_pretrained_folder_and_the_same_model_as_gguf(cli, llama_dir, gguf_file):
    folder = _couplings(cli("inspect", llama_dir, "--json", "--no-narrow"))
    # GQA: 2 KV heads, so 2 q.k and 2 v.o couplings per layer; SwiGLU: one glu coupling per layer
    assert folder["model.layers.1.self_attn.vo.head1"] == ("vo", 8, True)
    assert folder["model.layers.0.mlp.glu"] == ("glu", 64, True)
    assert sum(k == "qk" for k, _, _ in folder.values()) == 4
    assert _couplings(cli("inspect", gguf_file, "--json", "--no-narrow")) == folder
    assert _couplings(cli("inspect", gguf_file.parent, "--json", "--no-narrow")) == folder  # its folder


def test_a_hub_id_is_read_from_the_local_cache_only(cli, llama_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    r = cli("inspect", "someone/tiny-llama", "--no-narrow")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "'someone/tiny-llama'" in r.err and "never downloads" in r.err
    repo = tmp_path / "models--someone--tiny-llama"  # the cache's layout, as a download leaves it
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in llama_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    assert _couplings(cli("inspect", "someone/tiny-llama", "--json", "--no-narrow")) == \
        _couplings(cli("inspect", llama_dir, "--json", "--no-narrow"))
