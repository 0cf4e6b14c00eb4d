"""Shared fixtures: tiny synthetic lung-like datasets written to tmp folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(os.environ.get("LUNGCAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IQOTH = SHARED_DATA / "iqothnccd"
LC25000 = SHARED_DATA / "lc25000_lung_sample"

FOLDERS = {"normal": "Normal cases", "benign": "Bengin cases", "malignant": "Malignant cases"}


def synthetic_slice(rng: np.random.Generator, label: str, patient_seed: int, slice_no: int, size: int = 64) -> np.ndarray:
    """A grey 'CT slice': a bright ellipse (body) on black, with a class-dependent blob.

    Slices of one patient differ only slightly (neighbouring slices), different patients a lot.
    """
    prng = np.random.default_rng(patient_seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + prng.uniform(-4, 4), size / 2 + prng.uniform(-4, 4)
    ry, rx = size * prng.uniform(0.28, 0.36), size * prng.uniform(0.38, 0.45)
    body = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1
    img = np.where(body, 90 + prng.uniform(-20, 20), 0).astype(np.float64)
    texture = prng.normal(0, 25, (size, size))
    img += np.where(body, texture, 0) + rng.normal(0, 2, (size, size)) + slice_no * 0.5
    blob = {"normal": 0, "benign": 60, "malignant": 140}[label]
    if blob:
        by, bx = cy + prng.uniform(-6, 6), cx + prng.uniform(-8, 8)
        r = 4 if label == "benign" else 7
        img += np.where(((yy - by) ** 2 + (xx - bx) ** 2) <= r * r, blob, 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, patients: int = 5, slices: int = 3, size: int = 64, seed: int = 0) -> Path:
    """IQ-OTH/NCCD-like layout: `<Class> cases/<Class> case (N).jpg`, N in slice order per patient."""
    rng = np.random.default_rng(seed)
    for ci, (label, folder) in enumerate(FOLDERS.items()):
        d = root / folder
        d.mkdir(parents=True)
        n = 1
        stem = folder.split()[0]
        for p in range(patients):
            for s in range(slices):
                arr = synthetic_slice(rng, label, seed * 1000 + ci * 100 + p, s, size)
                Image.fromarray(arr, "L").save(d / f"{stem} case ({n}).png")
                n += 1
            n += 3  # a gap in numbering between patients, like withheld slices
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")
