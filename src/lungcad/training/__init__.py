"""Training: transfer learning loop, checkpoints, resume."""
