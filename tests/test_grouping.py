"""Grouping: exact and near duplicates, slice runs, manifest groups, unreadable files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lungcad.data.discovery import Sample
from lungcad.data.grouping import (
    assign_groups,
    connected_components,
    exact_duplicate_sets,
    near_duplicate_pairs,
    scan_images,
    slice_run_pairs,
)


def _texture(seed: int, size: int = 96) -> Image.Image:
    """Blobby random texture: enough structure that unrelated seeds look unrelated."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=(size, size)), 3.0)
    a = (a - a.min()) / (a.max() - a.min()) * 255
    return Image.fromarray(a.astype(np.uint8))


def _rotate_crop(im: Image.Image, deg: float) -> Image.Image:
    """Augmentor-style rotation: rotate, crop the largest square free of padding, resize back."""
    w = im.width
    r = im.rotate(deg, resample=Image.BICUBIC, expand=True)
    t = np.deg2rad(abs(deg))
    side = w / (np.cos(t) + np.sin(t))
    c = r.width / 2
    box = (int(c - side / 2), int(c - side / 2), int(c + side / 2), int(c + side / 2))
    return r.crop(box).resize((w, w), Image.BICUBIC)


def _save(im: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def test_scan_reads_metadata(tmp_path):
    p = _save(_texture(0).convert("RGB").resize((80, 60)), tmp_path / "a.png")
    infos, bad = scan_images([Sample(p, "benign")], thumb_size=32)
    assert bad == []
    (info,) = infos
    assert (info.width, info.height, info.mode, info.format) == (80, 60, "RGB", "PNG")
    assert info.file_size == p.stat().st_size and len(info.sha256) == 64
    assert info.thumb.shape == (32, 32) and info.thumb.dtype == np.float32
    assert 0 <= info.thumb.min() <= info.thumb.max() <= 255


def test_exact_duplicates_found(tmp_path):
    a = _save(_texture(1), tmp_path / "a.png")
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    c = _save(_texture(2), tmp_path / "c.png")
    infos, _ = scan_images([Sample(a, "benign"), Sample(c, "benign"), Sample(b, "malignant")])
    assert exact_duplicate_sets(infos) == [[0, 2]]


def test_rotated_and_flipped_copies_grouped_unrelated_not(tmp_path):
    base = _texture(3)
    copies = [
        base,
        base.transpose(Image.FLIP_LEFT_RIGHT),
        base.transpose(Image.ROTATE_90),
        _rotate_crop(base, 17).transpose(Image.FLIP_TOP_BOTTOM),
        _rotate_crop(base, -8),
    ]
    paths = [_save(im, tmp_path / "x" / f"copy{k}.jpg") for k, im in enumerate(copies)]
    paths += [_save(_texture(s), tmp_path / "y" / f"other{s}.jpg") for s in (10, 11, 12)]
    samples = [Sample(p, "malignant") for p in paths]
    infos, _ = scan_images(samples)
    pairs = near_duplicate_pairs(infos)
    linked = {(i, j) for i, j, _ in pairs}
    for k in range(1, 5):
        assert (0, k) in linked, f"copy {k} not matched to the original"
    assert all(i < 5 and j < 5 for i, j in linked), f"unrelated images matched: {linked}"
    groups = assign_groups(samples, infos, near_pairs=pairs, run_pairs=[])
    assert len(set(groups[:5])) == 1
    assert len(set(groups[5:])) == 3 and groups[0] not in groups[5:]


def test_slice_runs_only_consecutive_alike_names(tmp_path):
    rng = np.random.default_rng(0)
    base = np.asarray(_texture(4), dtype=np.float64)

    def slice_like(k: int) -> Image.Image:  # neighbouring slices: small changes only
        return Image.fromarray(np.clip(base + rng.normal(0, 2, base.shape) + k, 0, 255).astype(np.uint8))

    d = tmp_path / "Normal cases"
    names = ["Normal case (1).png", "Normal case (2).png", "Normal case (4).png", "Other scan (3).png"]
    samples = [Sample(_save(slice_like(k), d / n), "normal") for k, n in enumerate(names)]
    # same number pattern in another class, and a consecutive but unrelated image
    samples.append(Sample(_save(slice_like(9), tmp_path / "Bengin cases" / "Normal case (3).png"), "benign"))
    samples.append(Sample(_save(_texture(99), d / "Normal case (5).png"), "normal"))
    infos, _ = scan_images(samples)
    assert slice_run_pairs(samples, infos) == [(0, 1)]
    # allowing gaps links 2 -> 4, still not the unrelated 5 or the other class/name
    assert slice_run_pairs(samples, infos, max_gap=2) == [(0, 1), (1, 2)]


def test_manifest_groups_win_and_ids_do_not_collide(tmp_path):
    a = _save(_texture(5), tmp_path / "a.png")
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    c = _save(_texture(6), tmp_path / "c.png")
    d = _save(_texture(7), tmp_path / "d.png")
    samples = [
        Sample(a, "benign", "g0001"),  # a manifest id that looks like an inferred one
        Sample(b, "benign"),  # exact copy of a: joins the manifest group
        Sample(c, "benign"),
        Sample(d, "benign", "patient-9"),
    ]
    infos, _ = scan_images(samples)
    groups = assign_groups(samples, infos)
    assert groups[0] == "g0001" and groups[1] == "g0001" and groups[3] == "patient-9"
    assert groups[2] not in ("g0001", "patient-9")
    assert assign_groups(samples, infos) == groups  # deterministic


def test_unreadable_files_listed_not_raised(tmp_path):
    good = _save(_texture(8), tmp_path / "good.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "trunc.jpg"
    _texture(9).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    missing = tmp_path / "missing.png"
    samples = [Sample(p, "normal") for p in (good, empty, garbage, truncated, missing)]
    infos, bad = scan_images(samples)
    assert [i.index for i in infos] == [0]
    assert [p for p, _ in bad] == [empty, garbage, truncated, missing]
    reasons = dict(bad)
    assert "empty" in reasons[empty] and "\n" not in "".join(reasons.values())
    assert all(str(p) not in r for p, r in bad)  # reason only; the path is alongside
    groups = assign_groups(samples, infos)
    assert len(groups) == 5 and len(set(groups)) == 5


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs(tmp_path, n):
    samples = [Sample(_save(_texture(k), tmp_path / f"{k}.png"), "normal") for k in range(n)]
    infos, _ = scan_images(samples)
    assert near_duplicate_pairs(infos) == []
    assert assign_groups(samples, infos) == ["g0001"] * n


def test_connected_components_of_an_edge_list():
    # what the audit counts as near-duplicate groups, with the union-find assign_groups uses
    assert connected_components([]) == []
    assert connected_components([(5, 6), (3, 1), (0, 3), (8, 6), (10, 11)]) == [[0, 1, 3], [5, 6, 8], [10, 11]]
    assert connected_components([(2, 4), (4, 2), (2, 4)]) == [[2, 4]]  # repeated edges count once
