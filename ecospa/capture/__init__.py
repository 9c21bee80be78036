"""Capture of a model (or one call of a module) as an ATen graph with torch.export, leaving the model exactly as it was."""
