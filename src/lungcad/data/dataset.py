"""Datasets over decoded-once images: JPEGs are decoded and geometry-normalised a single time,
then every epoch only augments cached uint8 tensors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lungcad.data.images import ImageReadError, decode_image
from lungcad.data.transforms import Preprocessing, normalise, prepare

__all__ = ["CachedImageDataset", "load_cache", "load_readable"]

log = logging.getLogger(__name__)


def load_cache(
    paths: Sequence[Path], pp: Preprocessing, progress: bool = True, desc: str = "decoding"
) -> tuple[torch.Tensor, list[tuple[Path, str]]]:
    """Decode + prepare every image once -> (uint8 tensor N x C x S x S, unreadable (path, reason)).

    Unreadable images get an all-zero slot; callers drop them using the returned list.
    """
    cache = torch.zeros((len(paths), pp.channels, pp.image_size, pp.image_size), dtype=torch.uint8)
    bad: list[tuple[Path, str]] = []
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=not progress, leave=False)):
        try:
            cache[i] = prepare(decode_image(path, pp.colour), pp)
        except ImageReadError as exc:
            bad.append((Path(path), str(exc)))
    return cache, bad


def load_readable(
    paths: Sequence[Path], pp: Preprocessing, progress: bool = True, desc: str = "decoding"
) -> tuple[torch.Tensor, list[int], list[tuple[Path, str]]]:
    """`load_cache` without the unreadable images: (cache of the readable ones, their indices in
    `paths`, unreadable (path, reason))."""
    cache, bad = load_cache(paths, pp, progress=progress, desc=desc)
    if not bad:
        return cache, list(range(len(paths))), bad
    bad_set = {Path(p) for p, _ in bad}
    keep = [i for i, p in enumerate(paths) if Path(p) not in bad_set]
    return cache[keep], keep, bad


class CachedImageDataset(Dataset):
    """(normalised image tensor, target) pairs from a pre-decoded uint8 cache."""

    def __init__(
        self,
        cache: torch.Tensor,
        targets: Sequence[int],
        pp: Preprocessing,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if len(cache) != len(targets):
            raise ValueError("cache and targets differ in length")
        self.cache, self.pp, self.augment = cache, pp, augment
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.cache[i]
        if self.augment is not None:
            x = self.augment(x)
        return normalise(x, self.pp), self.targets[i]
