"""A fold ensemble: the K models of grouped cross-validation, deployed as one model.

Each member sees an image; its logits are divided by the member temperature (one temperature,
fitted on the pooled out-of-fold predictions) and turned into probabilities; the ensemble's
probabilities are their mean. The module's output is a "logit" of that mean (log-probabilities
for multiclass, log-odds for binary), so everything downstream (`logits_to_probs` with
temperature 1, the engines, ONNX/OpenVINO export, Grad-CAM) treats the ensemble exactly like a
single network.

For the engines the ensemble splits like a ResNet into a backbone (the members' pooled features,
concatenated: K x 2048) and a head (each member's classifier on its slice of the features, then
the combination above), so out-of-distribution scores can use every member's feature space.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Ensemble", "combine_member_logits"]

_EPS = 1e-7  # probabilities are clamped away from 0 and 1 before the log: finite outputs, same ranking


def combine_member_logits(logits: torch.Tensor, task: str, temperature: float) -> torch.Tensor:
    """(K, N, O) member logits -> (N, O) ensemble logits whose probabilities are the members' mean."""
    z = logits.float() / temperature
    if task == "binary":
        p = torch.sigmoid(z).mean(dim=0).clamp(_EPS, 1 - _EPS)
        return torch.log(p) - torch.log1p(-p)
    return torch.log(torch.softmax(z, dim=-1).mean(dim=0).clamp_min(_EPS))


class _Backbones(nn.Module):
    def __init__(self, backbones: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(backbones)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.parts], dim=1)


class _Heads(nn.Module):
    def __init__(self, heads: list[nn.Module], task: str, temperature: float):
        super().__init__()
        self.parts = nn.ModuleList(heads)
        self.task, self.temperature = task, float(temperature)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        chunks = features.chunk(len(self.parts), dim=1)
        logits = torch.stack([h(f) for h, f in zip(self.parts, chunks)])
        return combine_member_logits(logits, self.task, self.temperature)


class Ensemble(nn.Module):
    """K member networks of one architecture -> the mean of their calibrated probabilities."""

    def __init__(self, members: list[nn.Module], task: str, member_temperature: float = 1.0):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.task, self.member_temperature = task, float(member_temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([m(x) for m in self.members])
        return combine_member_logits(logits, self.task, self.member_temperature)

    def split(self, split_member) -> tuple[nn.Module, nn.Module]:
        """(backbone -> concatenated features, head -> ensemble logits), given a member splitter."""
        pairs = [split_member(m) for m in self.members]
        return _Backbones([b for b, _ in pairs]), _Heads([h for _, h in pairs], self.task, self.member_temperature)
