"""Small reference models used by the examples, the demo and the benchmarks."""
from ecospa.models.nanogpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
