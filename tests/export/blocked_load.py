"""Run in a fresh process: load exported folders with transformers while ``ecospa`` cannot be
imported, and write their logits.

    python blocked_load.py INPUTS.safetensors OUT.safetensors NAME=FOLDER[::GGUF_FILE] ...

A ``sys.meta_path`` finder raises ImportError for ``ecospa`` and every ``ecospa.*`` module, so a
checkpoint that needs ecospa fails here. ``OUT`` gets one logits tensor per NAME and the tensor
``blocked`` = 1 when ``import ecospa`` failed as it should.
"""
import sys


class BlockEcospa:
    def find_spec(self, name, path=None, target=None):
        if name == "ecospa" or name.startswith("ecospa."):
            raise ImportError(f"{name} is blocked in this process")
        return None


sys.meta_path.insert(0, BlockEcospa())

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main(argv):
    inputs = load_file(argv[0])["input_ids"]
    out = {}
    try:
        import ecospa  # noqa: F401
        out["blocked"] = torch.zeros(1)
    except ImportError:
        out["blocked"] = torch.ones(1)
    for spec in argv[2:]:
        name, folder = spec.split("=", 1)
        folder, _, gguf_file = folder.partition("::")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
        with torch.no_grad():
            out[name] = model(inputs).logits.contiguous()
    save_file(out, argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
