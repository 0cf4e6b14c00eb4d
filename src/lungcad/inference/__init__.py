"""Inference: running a model under its contract (no training code here)."""
