"""EcoSpa: coupled sparse training in a plain PyTorch loop (and its distributed and first-forward helpers)."""
