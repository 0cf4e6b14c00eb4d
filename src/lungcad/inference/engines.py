"""Inference engines: one interface over eager PyTorch (here) and exported runtimes (ONNX, OpenVINO).

An engine takes a normalised float32 batch (N, 3, S, S) and returns the raw logits and the pooled
penultimate features (N, 2048); calibration, thresholds and out-of-distribution scoring happen
above it, from the model contract, so every engine is used identically.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import nn


class Engine(Protocol):
    name: str

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) float32 -> (logits (N, K), features (N, F))."""
        ...


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A torchvision ResNet as (backbone up to global pooling, classifier head)."""
    backbone = nn.Sequential(*(m for name, m in model.named_children() if name != "fc"), nn.Flatten(1))
    return backbone, model.fc


class TorchEngine:
    """Eager PyTorch on the CPU, channels_last (oneDNN's fast layout)."""

    name = "torch"

    def __init__(self, model: nn.Module):
        model = model.eval().to(memory_format=torch.channels_last)
        self.backbone, self.head = split_head(model)

    @torch.inference_mode()
    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(batch, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        return self.head(features).float().numpy(), features.float().numpy()
