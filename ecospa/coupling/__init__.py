"""Coupling side of ecospa: importance scores, planner, executor and training integration."""
