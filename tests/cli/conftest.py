"""Fixtures of the CLI tests: a tiny text, a tiny pretrained Llama folder with a tokenizer, the same
model as a GGUF file, a module:factory file, one ``ecospa compress`` run, and ``cli(...)``: run
``ecospa ARGS`` in this process. Everything is built here; nothing is downloaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ecospa.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """``cli("inspect", "gpt2")`` -> Result(code, stdout, stderr); SystemExit (argparse) is caught."""

    def run(*args: str) -> Result:
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        cap = capsys.readouterr()
        return Result(code, cap.out, cap.err)

    return run


def tiny_text() -> str:
    """About 6000 characters of the embedded tiny-shakespeare."""
    from ecospa.recipes.data import load_tinyshakespeare

    return load_tinyshakespeare()[:6000]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "tiny.txt"
    p.write_text(tiny_text(), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer GQA Llama and a byte-level BPE tokenizer trained on the tiny text,
    written with save_pretrained (what a user's pretrained folder holds)."""
    import torch
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([tiny_text()], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("llama") / "tiny-llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    fast.save_pretrained(d)
    return d


# transformers name -> GGUF name of a Llama's tensors (llama.cpp's names)
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path: Path, llama_dir: Path, tokenizer: bool = False) -> Path:
    """The tiny Llama of ``llama_dir`` written as an F32 GGUF file with the gguf package (metadata
    and tensors, and with ``tokenizer`` its byte-level BPE tokenizer as llama.cpp stores a GPT-2
    style one: tokenizer.ggml.model "gpt2", tokens, token types, merges). transformers reads the
    config (and the tokenizer) from the metadata; q/k are stored unpermuted, which does not
    matter for the couplings."""
    gguf = pytest.importorskip("gguf")
    import json

    import transformers

    cfg = transformers.AutoConfig.from_pretrained(llama_dir)
    sd = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        model = json.loads((llama_dir / "tokenizer.json").read_text())["model"]
        tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
        w.add_token_merges(merges)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in GGUF_NAMES.items()})
    for hf, gg in names.items():
        w.add_tensor(gg, sd[hf].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def gguf_file(llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama as a GGUF file without a tokenizer (:func:`write_gguf`)."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", llama_dir)


@pytest.fixture(scope="session")
def gguf_with_tokenizer(llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama and its tokenizer as one GGUF file (what llama.cpp's files hold)."""
    return write_gguf(tmp_path_factory.mktemp("gguf-tok") / "tiny-llama-tok.gguf", llama_dir, tokenizer=True)


FACTORY = '''
import torch
from ecospa.recipes.nanogpt import GPT, GPTConfig


def build():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16))
    return model, (torch.zeros(1, 16, dtype=torch.long),)


def model_only():
    return torch.nn.Linear(4, 4)


def not_a_model():
    return 3
'''


@pytest.fixture(scope="session")
def factory_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("user") / "my_models.py"
    p.write_text(FACTORY)
    return p


@dataclass
class Compressed:
    code: int
    out: str
    err: str
    model: object  # the in-memory compressed model (the object ecospa.save was given)
    directory: Path


@pytest.fixture(scope="session")
def compressed(llama_dir, text_file, tmp_path_factory) -> Compressed:
    """``ecospa compress`` run once on the tiny Llama (target 0.7), with ecospa.save spied on."""
    import contextlib
    import io

    import ecospa

    out = tmp_path_factory.mktemp("compressed") / "tiny-llama-70"
    seen = []
    real_save = ecospa.save

    def spy(model, directory, **kw):
        seen.append(model)
        return real_save(model, directory, **kw)

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(ecospa, "save", spy)
        code = main(["compress", str(llama_dir), "--text", str(text_file), "--target", "0.7", "--out", str(out),
                     "--seq", "32", "--batches", "4", "--rounds", "1", "--eval-windows", "2"])  # with progress bars
    return Compressed(code, stdout.getvalue(), stderr.getvalue(), seen[0] if seen else None, out)
