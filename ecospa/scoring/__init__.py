"""Importance of couplings (Eq. 6) and of their units (Eq. 9), and the registries of score functions."""
