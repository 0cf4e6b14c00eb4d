"""Patient-proxy groups, so that a train/test split never puts near-copies on both sides.

Neither shipped dataset has patient ids, and both leak badly under an image-level split:

- IQ-OTH/NCCD numbers the slices of each class in scan order (`<Class> case (N).jpg`), so N and
  N+1 are usually neighbouring slices of one patient, and some files are exact copies.
- LC25000 tiles are Augmentor copies of 250 originals per class: rotated by up to +-25 degrees
  (then cropped back to the largest axis-aligned square, i.e. zoomed in by up to ~1.5x) and
  randomly flipped. Two copies of one original differ by a flip/90-degree rotation, a rotation of
  up to ~50 degrees and a zoom ratio of up to ~1.5.

Groups are the connected components (union-find) of three kinds of link: equal sha256, near
duplicates under flips/rotations/zoom, and slice runs (consecutive file numbers with similar
thumbnails). A group id from a manifest always wins over an inferred one.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, sparse

from lungcad.data.discovery import Sample
from lungcad.data.images import ImageReadError, decode_image, read_regular_file
from lungcad.errors import first_line
from lungcad.utils import sha256_bytes

__all__ = [
    "ImageInfo", "assign_groups", "connected_components", "exact_duplicate_sets", "near_duplicate_pairs",
    "scan_images", "scan_results", "slice_run_pairs",
]

log = logging.getLogger(__name__)

# --- Thresholds, calibrated on the shared data (see the module docstring of each function). ---

# Near duplicates: Pearson correlation of the blurred central discs after the best flip/rotation/
# zoom. Measured (fine-stage similarity of candidate pairs):
# - LC25000 (900 tiles): copies pile up at 0.95-1.0; cross-class pairs (which cannot be copies)
#   reach 0.87 at most; >= 0.90: 313 pairs, 0 cross-class; >= 0.93: 276 pairs, 0 cross-class.
# - IQ-OTH/NCCD (879 slices): every CT slice shares a body outline, so different slices correlate
#   highly. At 0.90 pairs of look-alike slices chain 117-129 images of many patients into one
#   group; at 0.93 the largest group is 59 (1055 vs 757 pairs).
# 0.93 is the compromise: it loses ~40 LC25000 copy pairs between 0.90 and 0.93 but does not glue
# CT patients together. Pass a lower threshold for augmentation-only data such as LC25000.
NEAR_DUP_THRESHOLD = 0.93
# Coarse stage: pairs above this (and among an image's top_k matches) go on to the fine
# alignment. Copies of LC25000 tiles score >= 0.8 here, so 0.70 leaves margin.
NEAR_DUP_CANDIDATE = 0.70
# Slice runs: mean absolute difference (grey levels, 64x64 thumbnails) between slices N and N+1.
# IQ-OTH/NCCD consecutive pairs (814): median 5.3; histogram in steps of 2 grey levels from 0:
# 96 211 191 126 72 35 | 23 23 21 | then a second mode of ~70 pairs at 18-25 (patient
# boundaries, where numbering continues but the anatomy jumps; random pairs average ~21).
# 12 sits in the flat valley: 126 groups (largest 59) with the near-dup rule above; 10 -> 156,
# 14 -> 111. LC25000 consecutive file numbers are unrelated tiles (MAD >= 24), never linked.
SLICE_RUN_MAD = 12.0


@dataclass
class ImageInfo:
    """What the audit and the grouping need to know about one readable image."""

    index: int  # index into the samples list given to scan_images
    sha256: str
    width: int
    height: int
    mode: str  # PIL mode of the file as stored (L, RGB, I;16, ...)
    format: str  # PIL format name (JPEG, PNG, ...)
    file_size: int  # bytes
    thumb: np.ndarray  # float32 grey thumbnail (thumb_size x thumb_size), values 0..255


def scan_images(
    samples: Sequence[Sample], thumb_size: int = 64, progress: bool = False,
    known: Mapping[Path, ImageInfo | str] | None = None,
) -> tuple[list[ImageInfo], list[tuple[Path, str]]]:
    """Read every sample once: hash, header facts and a grey thumbnail.

    Returns (infos for readable images, [(path, one-line reason)] for unreadable ones); a bad file
    never raises. `known` (from `scan_results`): an earlier scan of the same files, reused instead
    of reading them again (cross-validation scans its data once for all its folds).
    """
    infos: list[ImageInfo] = []
    unreadable: list[tuple[Path, str]] = []
    iterator = enumerate(samples)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(samples), desc="scan", unit="img")
    for i, sample in iterator:
        path = Path(sample.path)
        earlier = known.get(path.resolve()) if known else None
        if isinstance(earlier, ImageInfo):
            infos.append(dataclasses.replace(earlier, index=i))
            continue
        if isinstance(earlier, str):
            unreadable.append((path, earlier))
            continue
        try:
            raw = read_regular_file(path)  # one read serves the hash, the header and the pixels
        except ImageReadError as exc:  # unreadable, a FIFO or device, or oversized
            unreadable.append((path, _reason(exc)))
            continue
        try:
            pixels = decode_image(raw, colour="grey", name=path)
            with Image.open(io.BytesIO(raw)) as im:  # header only: mode/format as stored
                width, height, mode, fmt = im.width, im.height, im.mode, im.format or "unknown"
        except ImageReadError as exc:
            unreadable.append((path, _reason(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - a scan must survive any odd file
            unreadable.append((path, f"{type(exc).__name__}: {first_line(exc, limit=None)}"))
            continue
        thumb = Image.fromarray(pixels).resize((thumb_size, thumb_size), Image.BILINEAR)
        infos.append(
            ImageInfo(
                index=i,
                sha256=sha256_bytes(raw),
                width=width,
                height=height,
                mode=mode,
                format=fmt,
                file_size=len(raw),
                thumb=np.asarray(thumb, dtype=np.float32),
            )
        )
    if unreadable:
        log.warning("%d of %d files are unreadable", len(unreadable), len(samples))
    return infos, unreadable


def scan_results(samples: Sequence[Sample], infos: list[ImageInfo],
                 unreadable: list[tuple[Path, str]]) -> dict[Path, ImageInfo | str]:
    """A scan as `scan_images(known=...)` reuses it: resolved path -> ImageInfo, or the reason it was unreadable."""
    out: dict[Path, ImageInfo | str] = {Path(p).resolve(): reason for p, reason in unreadable}
    out.update({Path(samples[i.index].path).resolve(): i for i in infos})
    return out


def _reason(exc: ImageReadError) -> str:
    # LungcadError prefixes the path; the caller already has it, so keep only the reason.
    text = first_line(exc, limit=None)
    if exc.path is not None and text.startswith(f"{exc.path}: "):
        text = text[len(f"{exc.path}: ") :]
    return text or type(exc).__name__


def exact_duplicate_sets(infos: Sequence[ImageInfo]) -> list[list[int]]:
    """Sets (size >= 2) of sample indices whose files have equal sha256, sorted."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for info in infos:
        by_hash[info.sha256].append(info.index)
    return sorted(sorted(v) for v in by_hash.values() if len(v) >= 2)


# --- Near duplicates -----------------------------------------------------------------------


def _normalise(a: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm along the last axis, so a dot product is a Pearson correlation.

    This also cancels brightness/contrast changes from re-encoding. A flat patch stays all-zero
    and therefore matches nothing (flat exact copies are still caught by sha256).
    """
    a = a - a.mean(axis=-1, keepdims=True)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return (a / np.maximum(norm, 1e-6)).astype(np.float32)


def _gather(
    flat: np.ndarray, size: int, ys: np.ndarray, xs: np.ndarray, paired: bool = False
) -> np.ndarray:
    """Bilinear samples of images `flat` (N, size*size) at points (ys, xs) of shape (..., P).

    Unpaired: every image at every point set -> (N, ..., P). Paired: image k at point set k.
    """
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, size - 2)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, size - 2)
    wy = np.clip(ys - y0, 0.0, 1.0).astype(np.float32)
    wx = np.clip(xs - x0, 0.0, 1.0).astype(np.float32)
    i00 = y0 * size + x0
    if not paired:
        f = lambda idx: flat[:, idx]  # noqa: E731
    else:
        rows = np.arange(len(flat)).reshape((-1,) + (1,) * (ys.ndim - 1))
        f = lambda idx: flat[rows, idx]  # noqa: E731
    return (
        f(i00) * (1 - wy) * (1 - wx)
        + f(i00 + 1) * (1 - wy) * wx
        + f(i00 + size) * wy * (1 - wx)
        + f(i00 + size + 1) * wy * wx
    )


def _bilinear_matrix(size: int, ys: np.ndarray, xs: np.ndarray) -> sparse.csr_matrix:
    """Sparse (len(ys), size*size) matrix whose product with a flat image samples it bilinearly."""
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, size - 2)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, size - 2)
    wy = np.clip(ys - y0, 0.0, 1.0)
    wx = np.clip(xs - x0, 0.0, 1.0)
    i00 = y0 * size + x0
    cols = np.stack([i00, i00 + 1, i00 + size, i00 + size + 1], axis=1).ravel()
    vals = np.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], axis=1).ravel()
    rows = np.repeat(np.arange(len(ys)), 4)
    return sparse.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(len(ys), size * size))


def _disc(size: int, radius: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample offsets (dy, dx) on a square lattice inside a disc: rotation keeps a disc in place."""
    r = np.arange(-radius, radius + 1e-6, step)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    inside = yy**2 + xx**2 <= radius**2 + 1e-6
    return yy[inside], xx[inside]


def _warp(params: np.ndarray, dy: np.ndarray, dx: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates of disc offsets under (flip, degrees, zoom) rows of `params`."""
    flip, deg, zoom = (params[..., k : k + 1] for k in range(3))
    th = np.deg2rad(deg)
    c, s = np.cos(th), np.sin(th)
    x = dx * flip
    centre = (size - 1) / 2
    return centre + zoom * (c * dy - s * x), centre + zoom * (s * dy + c * x)


def near_duplicate_pairs(
    infos: Sequence[ImageInfo],
    threshold: float = NEAR_DUP_THRESHOLD,
    candidate_threshold: float = NEAR_DUP_CANDIDATE,
    angle_step: float = 10.0,
    top_k: int = 5,
    zooms: Sequence[float] = (0.67, 0.77, 0.88, 1.0, 1.14, 1.3, 1.5),
    chunk: int = 32,
) -> list[tuple[int, int, float]]:
    """Pairs (i, j, similarity) of sample indices, i < j, that are copies up to flip/rotation/zoom.

    Two stages. Coarse: every image is resampled under 2 flips x 36 rotations (10 degree steps,
    so at most 5 degrees off) x 7 zooms (0.67-1.5, covering LC25000's rotate-and-crop zoom) on a
    small blurred disc, and all variants are compared with all other images' plain disc in one
    matrix product per chunk (correlations). Fine: each candidate pair is re-aligned around its
    best coarse transform (2 degree / 3.5 % steps) on a sharper, larger disc, and that
    correlation is the similarity returned. Only the centre disc is compared because rotated
    corners hold no shared content.
    """
    n = len(infos)
    if n < 2:
        return []
    size = infos[0].thumb.shape[0]
    if any(info.thumb.shape != (size, size) for info in infos):
        raise ValueError("all thumbnails must be square and of one size")
    scale = size / 64.0  # geometry below was tuned on 64x64 thumbnails
    thumbs = np.stack([info.thumb for info in infos]).astype(np.float32)

    # Coarse stage. The disc radius (20 px at 64) times the largest zoom stays inside the thumb.
    blur1 = ndimage.gaussian_filter(thumbs, sigma=(0, 1.5 * scale, 1.5 * scale)).reshape(n, -1)
    dy, dx = _disc(size, 20 * scale, 3.3 * scale)
    base_angles = np.arange(-40, 41, angle_step)
    params = np.array(
        [
            (flip, a + 90 * k, z)
            for flip in (1.0, -1.0)
            for k in range(4)
            for a in base_angles
            for z in zooms
        ],
        dtype=np.float64,
    )
    ys, xs = _warp(params, dy, dx, size)  # (V, P)
    # Bilinear resampling is linear and the same for every image, so all variants of a chunk of
    # images are one sparse matrix product (4 taps per sample point).
    warp = _bilinear_matrix(size, ys.ravel(), xs.ravel())  # (V*P, size*size)
    centre = (size - 1) / 2
    plain = _normalise(_gather(blur1, size, centre + dy[None], centre + dx[None])[:, 0])  # (N, P)
    best = np.full((n, n), -1.0, dtype=np.float32)
    arg = np.zeros((n, n), dtype=np.int32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        variants = np.asarray((warp @ blur1[start:stop].T).T, dtype=np.float32)
        variants = _normalise(variants.reshape(stop - start, len(params), -1))  # (c, V, P)
        # Only j >= i is needed: compare the chunk against itself and everything after it.
        sim = variants.reshape(-1, variants.shape[-1]) @ plain[start:].T
        sim = sim.reshape(stop - start, len(params), n - start)
        best[start:stop, start:] = sim.max(axis=1)
        arg[start:stop, start:] = sim.argmax(axis=1)
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    best = np.where(upper, best, -1.0)
    sym = np.maximum(best, best.T)
    # Keep a pair if it is among the top_k coarse matches of either image: CT slices all share a
    # body outline, so a threshold alone would send tens of thousands of pairs to the fine stage,
    # while a copy is always near the top of its partner's list.
    k = min(top_k, n - 1)
    top = np.argpartition(-sym, k - 1, axis=1)[:, :k]
    in_top = np.zeros((n, n), dtype=bool)
    np.put_along_axis(in_top, top, True, axis=1)
    ci, cj = np.nonzero(upper & (in_top | in_top.T) & (best > candidate_threshold))
    cv = arg[ci, cj]
    # Fine stage around the best coarse transform of each candidate pair.
    blur2 = ndimage.gaussian_filter(thumbs, sigma=(0, 0.8 * scale, 0.8 * scale)).reshape(n, -1)
    fy, fx = _disc(size, 21 * scale, 2.5 * scale)
    plain2 = _normalise(_gather(blur2, size, centre + fy[None], centre + fx[None])[:, 0])
    # The coarse grid is at most 5 degrees and 7 % off; these steps cover that with slack.
    d_angle = np.arange(-6, 7, 2.0)
    d_zoom = np.array([0.94, 0.97, 1.0, 1.03, 1.06])
    offsets = np.array([(0.0, a, z) for a in d_angle for z in d_zoom], dtype=np.float32)
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(ci), 256):
        sl = slice(start, start + 256)
        p = params[cv[sl]].astype(np.float32)[:, None, :].repeat(len(offsets), axis=1)  # (K, F, 3)
        p[..., 1] += offsets[:, 1]
        p[..., 2] *= offsets[:, 2]
        yy, xx = _warp(p, fy, fx, size)  # (K, F, P)
        v = _normalise(_gather(blur2[ci[sl]], size, yy, xx, paired=True))
        sim = np.einsum("kfp,kp->kf", v, plain2[cj[sl]]).max(axis=1)
        for a, b, s in zip(ci[sl], cj[sl], sim):
            if s >= threshold:
                ia, ib = infos[a].index, infos[b].index
                pairs.append((min(ia, ib), max(ia, ib), round(float(s), 4)))
    pairs.sort()
    log.info("near duplicates: %d pairs among %d images", len(pairs), n)
    return pairs


# --- Slice runs ----------------------------------------------------------------------------

# The last integer in a file stem is the slice number: "Malignant case (12).jpg" -> 12.
_NUMBER = re.compile(r"^(.*?)(\d+)(\D*)$")


def _name_key(path: Path) -> tuple[str, int, str] | None:
    m = _NUMBER.match(path.name)
    if m is None:
        return None
    return m.group(1), int(m.group(2)), m.group(3)


def slice_run_pairs(
    samples: Sequence[Sample],
    infos: Sequence[ImageInfo],
    max_mad: float = SLICE_RUN_MAD,
    max_gap: int = 1,
) -> list[tuple[int, int]]:
    """Pairs (i, j) of sample indices that look like neighbouring slices of one scan.

    Linked when: same label and folder, file names equal except the last number, numbers
    consecutive (difference <= max_gap; 1 = strictly N, N+1) and thumbnails differ by less than
    `max_mad` grey levels on average. The image check splits runs at patient boundaries, where
    numbering continues but the anatomy jumps.
    """
    by_index = {info.index: info for info in infos}
    runs: dict[tuple, dict[int, int]] = defaultdict(dict)
    for i, sample in enumerate(samples):
        key = _name_key(Path(sample.path))
        if key is None or i not in by_index:
            continue
        prefix, number, suffix = key
        runs[(sample.label, str(Path(sample.path).parent), prefix, suffix)][number] = i
    pairs: list[tuple[int, int]] = []
    for numbers in runs.values():
        for number, i in numbers.items():
            for gap in range(1, max_gap + 1):
                j = numbers.get(number + gap)
                if j is None:
                    continue
                mad = float(np.mean(np.abs(by_index[i].thumb - by_index[j].thumb)))
                if mad < max_mad:
                    pairs.append((min(i, j), max(i, j)))
                break  # link only to the nearest existing number
    return sorted(set(pairs))


# --- Groups --------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]  # path halving keeps trees shallow
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # the smaller index becomes the root, so components are named by their first sample
            self.parent[max(ra, rb)] = min(ra, rb)


def connected_components(edges: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components of an undirected edge list (the nodes on some edge), each sorted, in
    order of their smallest node."""
    if not edges:
        return []
    uf = _UnionFind(max(max(a, b) for a, b in edges) + 1)
    for a, b in edges:
        uf.union(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for node in sorted({n for edge in edges for n in edge}):
        members[uf.find(node)].append(node)
    return sorted(members.values())


def assign_groups(
    samples: Sequence[Sample],
    infos: Sequence[ImageInfo],
    near_pairs: Sequence[tuple[int, int, float]] | None = None,
    run_pairs: Sequence[tuple[int, int]] | None = None,
) -> list[str]:
    """One group id per sample: the manifest's `group` if given, else an inferred "gNNNN".

    Inferred groups are connected components of exact duplicates, near duplicates and slice runs
    (pass `near_pairs` / `run_pairs` to reuse ones already computed). A component touching samples
    with a manifest group adopts the first of those groups (manifest groups are never merged with
    each other). Unreadable samples (no info) get singleton groups. Ids are numbered in sample
    order (samples from `discover` are sorted by path), so the same data gives the same ids.
    """
    n = len(samples)
    if near_pairs is None:
        near_pairs = near_duplicate_pairs(infos)
    if run_pairs is None:
        run_pairs = slice_run_pairs(samples, infos)
    uf = _UnionFind(n)
    for dup_set in exact_duplicate_sets(infos):
        for j in dup_set[1:]:
            uf.union(dup_set[0], j)
    for i, j, _ in near_pairs:
        uf.union(i, j)
    for i, j in run_pairs:
        uf.union(i, j)

    manifest = {i: s.group for i, s in enumerate(samples) if s.group}
    adopted: dict[int, str] = {}  # component root -> manifest group it adopts
    for i in range(n):
        if i in manifest:
            root = uf.find(i)
            if root in adopted and adopted[root] != manifest[i]:
                log.warning(
                    "%s: image links groups %r and %r of the manifest (copies across patients?)",
                    samples[i].path, adopted[root], manifest[i],
                )
            adopted.setdefault(root, manifest[i])

    taken = set(manifest.values())
    names: dict[int, str] = {}
    counter = 0
    width = max(4, len(str(n)))
    groups: list[str] = []
    for i in range(n):
        if i in manifest:
            groups.append(manifest[i])
            continue
        root = uf.find(i)
        if root in adopted:
            groups.append(adopted[root])
            continue
        if root not in names:
            while True:  # skip ids a manifest already uses, so no two groups share a name
                counter += 1
                name = f"g{counter:0{width}d}"
                if name not in taken:
                    break
            names[root] = name
        groups.append(names[root])
    return groups
