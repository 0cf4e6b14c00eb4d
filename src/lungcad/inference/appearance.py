"""Appearance signature: does an input *look* like the training images, before any network sees it?

The feature-space detector (`lungcad.inference.ood`) catches images unlike the training set in what
the network extracts; this module catches the commonest practical causes directly, in words a
user can act on:

- blank or constant frames, images too small to mean anything;
- a colour photograph given to a greyscale CT model (or a greyscale image to a colour model);
- a CT slice rendered at another window, contrast or tone curve than the training images (a DICOM
  rendered at the lung window for a model trained on soft-tissue-window JPEGs looks nothing like
  them: see docs/window.md), or sharper, smoother or noisier than they were;
- black that is not black: air and lung, black in a windowed export, lifted to a dim grey by a
  narrower output range (video levels 16-235), a reduced contrast or added noise. Per image this
  is the one cue of a contrast x0.85 export, which costs the classifier (docs/ood.md).

`fit_profile` summarises the prepared training images (the uint8 model inputs, after `prepare`) in
a few intensity statistics, each with its spread over the training set; it is stored in the model
contract (`appearance`). `check` computes the same statistics for one input and returns a
human-readable reason for each rule it breaks (empty: it looks like the training data). A
statistic is out of range when it falls outside the training set's 1st-99th percentile range
widened by a quarter of that range (at least 10 % of the median, and at least a fixed floor per
statistic). On IQ-OTH/NCCD at 224 px, each of its 5 grouped folds checked against the profile of
the other four flags 1 of 879 images (`benchmarks/appearance_shifts.py`); slices rendered at the
lung window, at contrast x0.85 or x0.6, inverted, in a screenshot, blurred or with added noise are
flagged on 95-100 % of images, histopathology tiles and colour photographs on all (docs/ood.md).

Reasons never contain ";" (CSV/JSON joins them with "; ").
"""

from __future__ import annotations

import numpy as np
import torch

from lungcad.data.images import MIN_SIDE
from lungcad.data.transforms import Preprocessing

__all__ = ["PROFILE_VERSION", "check", "features", "fit_profile"]

PROFILE_VERSION = 1
DARK = 20  # grey level at or below which a pixel counts as near-black (air, and lung at soft-tissue windows)
BLACK = 2  # at or below: black (air below a window's lower end, padding; JPEG leaves it at 0-2)
WHITE = 235  # at or above: near-white (bone at narrow windows, saturation)
QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)
WIDEN = 0.25  # the accepted range is the 1st-99th percentile range widened by this share of it,
RELATIVE = 0.1  # by at least this share of the median (two exports of one kind differ by ~10 %)...
FLOOR = {  # ...and by at least this much (fractions, or grey levels)
    "dark": 0.05, "dim": 0.03, "bright": 0.03, "mean": 8.0, "fg_q10": 8.0, "fg_q50": 8.0, "fg_q90": 8.0,
    "gradient": 1.5, "noise": 1.5, "saturation": 6.0,
}
NAMES = {
    "dark": "near-black fraction", "dim": "dim grey fraction",
    "bright": "near-white fraction", "mean": "mean grey level",
    "fg_q10": "10th percentile of the body's grey levels", "fg_q50": "median grey level of the body",
    "fg_q90": "90th percentile of the body's grey levels", "gradient": "mean gradient", "noise": "noise level",
    "saturation": "colour saturation",
}
WINDOW = ("dark", "fg_q10", "fg_q50", "fg_q90", "bright", "mean")  # what a window / tone curve changes
BLACK_LEVEL = ("dim",)  # what an output range, a contrast or noise does to black
FRACTIONS = ("dark", "dim", "bright")  # statistics that are shares of pixels, not grey levels
TEXTURE = ("gradient", "noise")  # sharpness, noise, resampling
# raw colour test for greyscale models: share of pixels whose channels differ by more than CHROMA levels
CHROMA, CHROMA_SHARE = 24, 0.05


def features(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics of prepared uint8 images (N, C, S, S) or one (C, S, S)."""
    x = batch if batch.ndim == 4 else batch[None]
    x = x.to(torch.float32)
    grey = x.mean(dim=1)  # (N, S, S)
    n = grey.shape[0]
    flat = grey.reshape(n, -1)
    dark = (flat <= DARK).float().mean(1)
    # Air and lung below the window's lower end are black in a windowed export; a narrower output
    # range (video levels 16-235, a reduced-contrast export) lifts them to a dim grey, which the
    # near-black fraction and the body's percentiles cannot see. The square padding added by
    # `prepare` is black whatever the input, so it never counts as dim.
    dim = ((flat > BLACK) & (flat <= DARK)).float().mean(1)
    bright = (flat >= WHITE).float().mean(1)
    mean = flat.mean(1)
    fg_q = np.zeros((n, 3), dtype=np.float64)
    qs = torch.tensor([0.1, 0.5, 0.9])
    for i in range(n):
        fg = flat[i][flat[i] > DARK]
        if fg.numel() >= max(16, flat.shape[1] // 100):
            fg_q[i] = torch.quantile(fg, qs).numpy()
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean(dim=(1, 2))
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean(dim=(1, 2))
    # noise: median absolute Laplacian over the body (robust to edges, which are a minority of pixels)
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:])
    body = grey[:, 1:-1, 1:-1] > DARK
    noise = torch.zeros(n)
    for i in range(n):
        if body[i].sum() >= 16:
            noise[i] = lap[i][body[i]].abs().median()
    if x.shape[1] == 3:
        saturation = (x.max(dim=1).values - x.min(dim=1).values).reshape(n, -1).mean(1)
    else:
        saturation = torch.zeros(n)
    return {
        "dark": dark.numpy().astype(np.float64), "dim": dim.numpy().astype(np.float64),
        "bright": bright.numpy().astype(np.float64),
        "mean": mean.numpy().astype(np.float64), "fg_q10": fg_q[:, 0], "fg_q50": fg_q[:, 1], "fg_q90": fg_q[:, 2],
        "gradient": ((dx + dy) / 2).numpy().astype(np.float64), "noise": noise.numpy().astype(np.float64),
        "saturation": saturation.numpy().astype(np.float64),
    }


def fit_profile(cache: torch.Tensor, chunk: int = 256) -> dict:
    """The appearance profile of prepared training images (uint8 (N, C, S, S)): JSON-able."""
    if cache.ndim != 4 or len(cache) == 0:
        return {}
    parts = [features(cache[i : i + chunk]) for i in range(0, len(cache), chunk)]
    stats = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out: dict = {}
    for name, values in stats.items():
        q = np.quantile(values, QUANTILES)
        margin = max(WIDEN * (q[-1] - q[0]), RELATIVE * abs(q[2]), FLOOR[name])
        out[name] = {
            "q01": round(float(q[0]), 4), "q05": round(float(q[1]), 4), "median": round(float(q[2]), 4),
            "q95": round(float(q[3]), 4), "q99": round(float(q[4]), 4),
            "lo": round(float(q[0] - margin), 4), "hi": round(float(q[-1] + margin), 4),
        }
    return {"version": PROFILE_VERSION, "images": int(len(cache)), "channels": int(cache.shape[1]),
            "image_size": int(cache.shape[-1]), "dark_level": DARK, "white_level": WHITE, "features": out}


def _fmt(name: str, value: float) -> str:
    return f"{value:.2f}" if name in FRACTIONS else f"{value:.1f}"


def _describe(found: dict[str, float], profile: dict, names: tuple[str, ...]) -> str:
    parts = []
    for name in names:
        if name in found:
            f = profile["features"][name]
            parts.append(f"{NAMES[name]} {_fmt(name, found[name])}, training {_fmt(name, f['q01'])}-"
                         f"{_fmt(name, f['q99'])}")
    return ", ".join(parts[:3])


def check(raw_pixels: np.ndarray | None, prepared: torch.Tensor, profile: dict, pp: Preprocessing) -> list[str]:
    """Reasons this input does not look like the training images (empty when it does).

    `raw_pixels`: the decoded (DICOM: windowed) uint8 pixels, HxW or HxWx3, or None when only the
    prepared model input (C, S, S) is at hand; `profile`: the contract's `appearance` (rules that
    need none - blank, size, colour - apply without it).
    """
    reasons: list[str] = []
    src = raw_pixels if raw_pixels is not None else prepared.numpy()
    if raw_pixels is not None:
        h, w = raw_pixels.shape[:2]
        if min(h, w) < MIN_SIDE:
            reasons.append(f"too small ({w} x {h} px, the minimum is {MIN_SIDE})")
    lo, hi = int(src.min()), int(src.max())
    if hi - lo <= 2:
        reasons.append("blank or constant image " + (f"(every pixel is {lo})" if lo == hi else f"(grey levels {lo}-{hi} only)"))
        return reasons  # nothing else is meaningful about an empty frame

    if raw_pixels is not None:  # HxWx3 (or more channels), or HxW
        rgb = raw_pixels[..., :3] if raw_pixels.ndim == 3 and raw_pixels.shape[2] >= 3 else None
    else:  # only the model input: its colour is what is left of the image's (C, S, S)
        rgb = prepared.numpy().transpose(1, 2, 0) if prepared.shape[0] == 3 else None
    if rgb is not None:
        chroma = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
        share = float((chroma > CHROMA).mean())
    else:
        share = 0.0
    if pp.colour == "grey" and share > CHROMA_SHARE:
        reasons.append(f"colour image given to a greyscale CT model ({share:.0%} of its pixels are coloured)")
    feats = profile.get("features") if profile.get("version") == PROFILE_VERSION else None
    if not feats:
        return reasons
    sat = feats.get("saturation", {})
    if pp.colour == "rgb" and sat.get("q05", 0.0) > 2 * FLOOR["saturation"] and share <= 0.01:
        reasons.append(f"greyscale image given to a colour model (training images' colour saturation "
                       f"{sat['q01']:.1f}-{sat['q99']:.1f})")
    if profile.get("channels") != prepared.shape[0]:
        return reasons
    values = {k: float(v[0]) for k, v in features(prepared).items()}
    out = {k: v for k, v in values.items() if k in feats and not feats[k]["lo"] <= v <= feats[k]["hi"]}
    if pp.colour == "grey" and any(k in out for k in WINDOW):
        reasons.append(f"rendered at a different window or contrast than the training images "
                       f"({_describe(out, profile, WINDOW)})")
    if pp.colour == "grey" and any(k in out for k in BLACK_LEVEL):
        reasons.append(f"black level unlike the training images ({_describe(out, profile, BLACK_LEVEL)}): another "
                       f"output range, contrast or window, or added noise")
    if any(k in out for k in TEXTURE):
        reasons.append(f"sharpness or noise unlike the training images ({_describe(out, profile, TEXTURE)})")
    if pp.colour == "rgb" and any(k in out for k in WINDOW + ("saturation",)):
        reasons.append(f"brightness, contrast or colour unlike the training images "
                       f"({_describe(out, profile, ('saturation', *WINDOW))})")
    return reasons
