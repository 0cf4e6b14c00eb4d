"""Batched forward passes over pre-decoded images, on the CPU-friendly memory layout."""

from __future__ import annotations

import torch
from torch import nn

from lungcad.data.transforms import Preprocessing, normalise

__all__ = ["infer_logits"]


@torch.inference_mode()
def infer_logits(model: nn.Module, cache: torch.Tensor, pp: Preprocessing, batch_size: int = 32) -> torch.Tensor:
    """Logits for every image in a uint8 cache (N, C, S, S), in eval mode."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(cache), batch_size):
        x = normalise(cache[start : start + batch_size], pp).contiguous(memory_format=torch.channels_last)
        outs.append(model(x).float())
    model.train(was_training)
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)
