"""``ecospa.export``: a pruned model leaves ecospa as a standard transformers checkpoint (and a
GGUF file for Llama-family models) that loads without ecospa.

    report = ecospa.export(model, "deploy/", tokenizer)   # config.json + model.safetensors
    AutoModelForCausalLM.from_pretrained("deploy/")       # anywhere, ecospa not needed

``ecospa.save`` keeps a model to go on training (removal record, optimizer, EcoSpa state);
``ecospa.export`` hands it to the rest of the world. See docs/checkpoints.md.
"""
from __future__ import annotations

from ecospa.export.report import ExportError, ExportReport
from ecospa.export.write import export

__all__ = ["export", "ExportReport", "ExportError"]
