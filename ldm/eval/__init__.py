"""Judging a model: the held-out validation loss (validation_loss.py)."""
