"""Batched forward passes over pre-decoded images: a uint8 cache (N, C, S, S) in, outputs in order.

Training, evaluation, cross-validation, the out-of-distribution detector and export's checks all
run a model or an inference engine (`lungcad.inference.engines`) over such a cache; they batch it
here, through the one `normalise`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lungcad.data.transforms import Preprocessing, normalise

__all__ = ["cache_batches", "infer_logits", "run_engine"]


def cache_batches(cache: torch.Tensor, pp: Preprocessing, batch_size: int = 32, progress: bool = False,
                  desc: str = "batches") -> Iterator[torch.Tensor]:
    """Normalised float32 batches (n, C, S, S) of a uint8 cache, in order."""
    starts = range(0, len(cache), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        yield normalise(cache[start : start + batch_size], pp)


@torch.inference_mode()
def infer_logits(model: nn.Module, cache: torch.Tensor, pp: Preprocessing, batch_size: int = 32) -> torch.Tensor:
    """Logits for every image in a uint8 cache (N, C, S, S), in eval mode, on the CPU-friendly layout."""
    was_training = model.training
    model.eval()
    outs = [model(x.contiguous(memory_format=torch.channels_last)).float()
            for x in cache_batches(cache, pp, batch_size)]
    model.train(was_training)
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)


def run_engine(engine, cache: torch.Tensor, pp: Preprocessing, batch_size: int = 32, progress: bool = False,
               desc: str = "batches") -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), pooled features (N, F)) of an inference engine over every image of a uint8 cache.

    An empty cache gives two (0, 0) arrays.
    """
    logits, features = [], []
    for x in cache_batches(cache, pp, batch_size, progress, desc):
        z, f = engine.run(x)
        logits.append(z)
        features.append(f)
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(logits), np.concatenate(features)
