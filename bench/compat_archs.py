"""The architectures of the compatibility matrix (bench/compat.py): each built from a small config
with random weights (transformers config classes, timm's own configs), with example inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

# one small shape for every architecture
D, H, KV, HD, L, FF, V, POS = 64, 4, 2, 16, 2, 96, 128, 64


@dataclass
class Arch:
    name: str
    family: str  # decoder, encoder, encoder-decoder, vision
    build: Callable[[], tuple[torch.nn.Module, dict]]
    needs: str = "transformers"  # the library the row needs


def _tf():
    import transformers

    return transformers


def _make(cfg_name: str, model_name: str, **cfg: Any) -> torch.nn.Module:
    """A transformers model from a config, sdpa attention where supported, eval mode. The config's
    own defaults otherwise (``use_cache`` on, as users build it: every forward carries a cache)."""
    tf = _tf()
    for impl in ("sdpa", "eager"):
        try:
            config = getattr(tf, cfg_name)(**cfg, attn_implementation=impl)
            return getattr(tf, model_name)(config).eval()
        except (ValueError, ImportError) as exc:
            if impl == "eager" or "attention" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")


def _ids(b: int = 2, t: int = 8) -> dict:
    return {"input_ids": torch.randint(3, V, (b, t))}


def _pix(size: int = 32) -> dict:
    return {"pixel_values": torch.randn(2, 3, size, size)}


LLAMA_LIKE = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                  num_attention_heads=H, num_key_value_heads=KV, head_dim=HD,
                  max_position_embeddings=POS)
BERT_LIKE = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                 intermediate_size=FF, max_position_embeddings=POS)


def _dec(cfg: str, model: str, **kw) -> Callable:
    return lambda: (_make(cfg, model, **kw), _ids())


def _enc(cfg: str, model: str, **kw) -> Callable:
    return lambda: (_make(cfg, model, **{**BERT_LIKE, **kw}), _ids())


def _seq2seq(cfg: str, model: str, **kw) -> Callable:
    return lambda: (_make(cfg, model, **kw), {**_ids(), "decoder_input_ids": torch.randint(3, V, (2, 5))})


def _whisper():
    m = _make("WhisperConfig", "WhisperModel", vocab_size=V, num_mel_bins=16, d_model=D,
              encoder_layers=L, decoder_layers=L, encoder_attention_heads=H,
              decoder_attention_heads=H, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
              max_source_positions=16, max_target_positions=POS, pad_token_id=0,
              decoder_start_token_id=1)
    return m, {"input_features": torch.randn(2, 16, 32), "decoder_input_ids": torch.randint(3, V, (2, 5))}


def _clip():
    tf = _tf()
    text = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                num_attention_heads=H, max_position_embeddings=POS)
    vision = dict(hidden_size=D, intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H,
                  image_size=32, patch_size=8)
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32,
                        attn_implementation="sdpa")
    return tf.CLIPModel(cfg).eval(), {**_ids(), **_pix()}


def _timm(name: str, **kw) -> Callable:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kw).eval(), {"x": torch.randn(2, 3, 32, 32)}

    return build


MOE = dict(num_local_experts=4, num_experts_per_tok=2)
ARCHS = [
    # decoders
    Arch("gpt2", "decoder", _dec("GPT2Config", "GPT2LMHeadModel", vocab_size=V, n_embd=D, n_layer=L,
                                 n_head=H, n_positions=POS, n_inner=FF, bos_token_id=0,
                                 eos_token_id=0)),
    Arch("gpt_neo", "decoder", _dec("GPTNeoConfig", "GPTNeoForCausalLM", vocab_size=V, hidden_size=D,
                                    num_layers=L, num_heads=H, intermediate_size=FF, window_size=4,
                                    attention_types=[[["global", "local"], 1]],
                                    max_position_embeddings=POS)),
    Arch("gptj", "decoder", _dec("GPTJConfig", "GPTJForCausalLM", vocab_size=V, n_embd=D, n_layer=L,
                                 n_head=H, n_positions=POS, rotary_dim=8, n_inner=FF)),
    Arch("gpt_neox", "decoder", _dec("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=V, hidden_size=D,
                                     num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
                                     max_position_embeddings=POS, partial_rotary_factor=0.5)),
    Arch("opt", "decoder", _dec("OPTConfig", "OPTForCausalLM", vocab_size=V, hidden_size=D,
                                num_hidden_layers=L, num_attention_heads=H, ffn_dim=FF,
                                max_position_embeddings=POS, word_embed_proj_dim=D)),
    Arch("bloom", "decoder", _dec("BloomConfig", "BloomForCausalLM", vocab_size=V, hidden_size=D,
                                  n_layer=L, n_head=H)),
    Arch("falcon", "decoder", _dec("FalconConfig", "FalconForCausalLM", vocab_size=V, hidden_size=D,
                                   num_hidden_layers=L, num_attention_heads=H, num_kv_heads=KV,
                                   new_decoder_architecture=True, max_position_embeddings=POS)),
    Arch("llama", "decoder", _dec("LlamaConfig", "LlamaForCausalLM", **LLAMA_LIKE)),
    Arch("mistral", "decoder", _dec("MistralConfig", "MistralForCausalLM", **LLAMA_LIKE)),
    Arch("mixtral", "decoder", _dec("MixtralConfig", "MixtralForCausalLM", **LLAMA_LIKE, **MOE)),
    Arch("qwen2", "decoder", _dec("Qwen2Config", "Qwen2ForCausalLM", **LLAMA_LIKE)),
    Arch("qwen2_moe", "decoder", _dec("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **LLAMA_LIKE,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=FF)),
    Arch("qwen3", "decoder", _dec("Qwen3Config", "Qwen3ForCausalLM", **LLAMA_LIKE)),
    Arch("qwen3_moe", "decoder", _dec("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **LLAMA_LIKE,
                                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    Arch("gemma", "decoder", _dec("GemmaConfig", "GemmaForCausalLM", **LLAMA_LIKE)),
    Arch("gemma2", "decoder", _dec("Gemma2Config", "Gemma2ForCausalLM", **LLAMA_LIKE, sliding_window=4)),
    Arch("phi", "decoder", _dec("PhiConfig", "PhiForCausalLM", vocab_size=V, hidden_size=D,
                                intermediate_size=FF, num_hidden_layers=L, num_attention_heads=H,
                                max_position_embeddings=POS, partial_rotary_factor=0.5)),
    Arch("phi3", "decoder", _dec("Phi3Config", "Phi3ForCausalLM", **LLAMA_LIKE, pad_token_id=0)),
    Arch("stablelm", "decoder", _dec("StableLmConfig", "StableLmForCausalLM", **LLAMA_LIKE,
                                     partial_rotary_factor=0.25)),
    Arch("olmo", "decoder", _dec("OlmoConfig", "OlmoForCausalLM", **LLAMA_LIKE, pad_token_id=0)),
    Arch("starcoder2", "decoder", _dec("Starcoder2Config", "Starcoder2ForCausalLM", **LLAMA_LIKE)),
    Arch("gpt_bigcode", "decoder", _dec("GPTBigCodeConfig", "GPTBigCodeForCausalLM", vocab_size=V,
                                        n_embd=D, n_layer=L, n_head=H, n_positions=POS, n_inner=FF)),
    # encoders
    Arch("bert", "encoder", _enc("BertConfig", "BertModel")),
    Arch("roberta", "encoder", _enc("RobertaConfig", "RobertaModel", pad_token_id=1)),
    Arch("distilbert", "encoder", _enc("DistilBertConfig", "DistilBertModel", dim=D, n_layers=L, n_heads=H,
                                       hidden_dim=FF)),
    Arch("albert", "encoder", _enc("AlbertConfig", "AlbertModel", embedding_size=32)),
    Arch("deberta_v2", "encoder", _enc("DebertaV2Config", "DebertaV2Model", relative_attention=True,
                                       position_buckets=8, pos_att_type=["p2c", "c2p"])),
    Arch("electra", "encoder", _enc("ElectraConfig", "ElectraModel", embedding_size=32)),
    Arch("xlm_roberta", "encoder", _enc("XLMRobertaConfig", "XLMRobertaModel", pad_token_id=1)),
    # encoder-decoders
    Arch("t5", "encoder-decoder", _seq2seq("T5Config", "T5Model", vocab_size=V, d_model=D, d_kv=HD,
                                           d_ff=FF, num_layers=L, num_heads=H, decoder_start_token_id=0)),
    Arch("bart", "encoder-decoder", _seq2seq("BartConfig", "BartModel", vocab_size=V, d_model=D,
                                             encoder_layers=L, decoder_layers=L,
                                             encoder_attention_heads=H, decoder_attention_heads=H,
                                             encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                                             max_position_embeddings=POS)),
    Arch("whisper", "encoder-decoder", _whisper),
    # vision
    Arch("vit", "vision", lambda: (_make("ViTConfig", "ViTModel", **BERT_LIKE, image_size=32, patch_size=8), _pix())),
    Arch("deit", "vision", lambda: (_make("DeiTConfig", "DeiTModel", **BERT_LIKE, image_size=32, patch_size=8), _pix())),
    Arch("swin", "vision", lambda: (_make("SwinConfig", "SwinModel", image_size=32, patch_size=4, embed_dim=32,
                                          depths=[2, 2], num_heads=[2, 4], window_size=4), _pix())),
    Arch("clip", "vision", _clip),
    Arch("timm_vit", "vision", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), "timm"),
    Arch("timm_deit", "vision", _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), "timm"),
    Arch("timm_swin", "vision", _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4,
                                      depths=(2, 2), num_heads=(3, 6), embed_dim=48), "timm"),
]


# -- measuring one row --------------------------------------------------------------------------
