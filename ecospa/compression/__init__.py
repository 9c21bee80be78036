"""ecospa.compress: one-shot compression of a trained model (calibration, allocation, refit, recovery)."""
