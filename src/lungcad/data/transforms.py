"""The one preprocessing path shared by training and inference.

    decoded pixels --prepare()--> uint8 tensor CxSxS (cached) --[augment]--> normalise() --> model

`prepare` fixes the geometry so that the frame of the source image cannot leak into the model:
the image is cropped to its foreground (the body on a CT slice), padded to a square and resized.
On IQ-OTH/NCCD every non-square (623x512, 801x512) image is malignant, so feeding the frame shape
or the black margins through would teach the model a shortcut instead of the lung.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "AUGMENT_POLICIES", "IMAGENET_MEAN", "IMAGENET_STD", "PAD_LIMIT", "Preprocessing", "RandomIntensity",
    "batch_mixing", "foreground_box", "normalise", "prepare", "preprocess", "to_source_geometry",
    "train_augmentation",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# prepare(): a crop whose long side exceeds this is resized before it is padded to a square
PAD_LIMIT = 2048

_GEOMETRY = {"degrees": 10.0, "scale": [0.9, 1.1], "translate": 0.05, "hflip": 0.5}
# Named training augmentation policies (`lungcad train --augment-policy`); see `train_augmentation`.
# The default is the one grouped cross-validation chose (docs/ablations.md).
AUGMENT_POLICIES = {
    "geometry": _GEOMETRY,  # rotation, scaling, shift, horizontal flip
    # + window/level, gamma, noise and blur: the differences between two exports of the same slice
    "intensity": {**_GEOMETRY, "contrast": 1.35, "shift": 20.0, "gamma": 1.4, "noise": 6.0, "blur": 1.0},
    # + only small window/level and gamma changes (no noise, no blur): robustness to mild export
    # differences without hiding the fine texture that separates benign from normal
    "mild": {**_GEOMETRY, "contrast": 1.15, "shift": 8.0, "gamma": 1.1},
    # + random resized crops of 60-100 % of the body and larger rotations
    "strong": {**_GEOMETRY, "degrees": 15.0, "crop_scale": [0.6, 1.0], "contrast": 1.35, "shift": 20.0,
               "gamma": 1.4, "noise": 6.0, "blur": 1.0},
}


@dataclass(frozen=True)
class Preprocessing:
    """The preprocessing contract stored with every model (model.json `preprocessing`)."""

    image_size: int = 224  # ResNet-50's ImageNet resolution; smaller trades accuracy for speed
    colour: str = "grey"  # "grey" (CT: decoded as one channel, repeated to 3) or "rgb" (histopathology)
    geometry: str = "foreground-square"  # crop to foreground, pad to square ("square-pad": pad only)
    foreground_threshold: int = 20  # grey level above which a pixel counts as body, not air/background
    mean: tuple[float, float, float] = IMAGENET_MEAN  # ImageNet statistics: what the pretrained stem expects
    std: tuple[float, float, float] = IMAGENET_STD
    # DICOM CT: Hounsfield units are windowed to this level/width (HU) before anything else. The
    # window is part of the contract: "declared" = the training images were rendered at it
    # (`lungcad train --window L,W`), so DICOM input is rendered the same way; "default" = nobody
    # said how the training images were rendered (image runs without --window, contracts before
    # this field): lungcad's lung window is used and `predict` warns that it may not match.
    window_level: float = -600.0
    window_width: float = 1500.0
    window_source: str = "default"
    augment: dict = field(default_factory=lambda: dict(_GEOMETRY))  # training only: AUGMENT_POLICIES

    @property
    def channels(self) -> int:
        return 1 if self.colour == "grey" else 3

    @property
    def window(self) -> tuple[float, float]:
        """(level, width) in HU at which DICOM CT is rendered for this model."""
        return self.window_level, self.window_width

    def with_window(self, window: str | None) -> Preprocessing:
        """This contract with a declared training window (`"L,W"`, as `lungcad train --window`); unchanged for None."""
        if window is None:
            return self
        from lungcad.dicom.reader import parse_window

        level, width = parse_window(window)
        return replace(self, window_level=level, window_width=width, window_source="declared")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def foreground_box(grey: np.ndarray, threshold: int, min_fraction: float = 0.02) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of rows/columns that hold real foreground.

    A row or column counts only if at least `min_fraction` of it is above `threshold`, so stray
    text labels or scanner-table specks do not stretch the box. Falls back to the whole image.
    """
    mask = grey > threshold
    h, w = mask.shape
    rows = np.flatnonzero(mask.mean(axis=1) >= min_fraction)
    cols = np.flatnonzero(mask.mean(axis=0) >= min_fraction)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, h, w
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def prepare(pixels: np.ndarray, pp: Preprocessing) -> torch.Tensor:
    """Decoded uint8 pixels (HxW or HxWx3) -> uint8 tensor (C, S, S) with normalised geometry."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pp.colour == "grey" and pixels.shape[2] == 3:
        pixels = np.asarray(np.round(pixels @ np.array([0.299, 0.587, 0.114])), dtype=np.uint8)[..., None]
    elif pp.colour == "rgb" and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    if pp.geometry == "foreground-square":
        grey = pixels.mean(axis=2) if pixels.shape[2] == 3 else pixels[..., 0]
        top, left, bottom, right = foreground_box(grey, pp.foreground_threshold)
        pixels = pixels[top:bottom, left:right]
    elif pp.geometry != "square-pad":
        raise ValueError(f"unknown geometry {pp.geometry!r}")
    h, w = pixels.shape[:2]
    side = max(h, w)
    if side > max(PAD_LIMIT, pp.image_size):
        # Resize before padding: the square of a long crop's long side would cost far more memory
        # than the image itself. Smaller images keep the order pad-then-resize, bit for bit what the
        # models were trained on (the two differ only by sub-pixel edge effects).
        h, w = max(1, round(h * pp.image_size / side)), max(1, round(w * pp.image_size / side))
        small = F.resize(torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1), [h, w], antialias=True)
        pixels, side = small.permute(1, 2, 0).numpy(), pp.image_size
    square = np.zeros((side, side, pixels.shape[2]), dtype=np.uint8)  # pad with background (black)
    y, x = (side - h) // 2, (side - w) // 2
    square[y : y + h, x : x + w] = pixels
    tensor = torch.from_numpy(square).permute(2, 0, 1).contiguous()
    return F.resize(tensor, [pp.image_size, pp.image_size], antialias=True)


def to_source_geometry(values: np.ndarray, pixels: np.ndarray, pp: Preprocessing) -> np.ndarray:
    """A map over the prepared image (S, S) -> the same map over `pixels`' rows and columns.

    The inverse of `prepare`'s geometry (crop to the foreground, pad to a square, resize): the
    square is resized back to the crop's long side, the padding cut off, and the crop placed at its
    box in the source frame; outside the box (background the model never saw) the map is 0.
    """
    rows, cols = pixels.shape[:2]
    top, left, bottom, right = 0, 0, rows, cols
    if pp.geometry == "foreground-square":
        grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
        top, left, bottom, right = foreground_box(grey, pp.foreground_threshold)
    h, w = bottom - top, right - left
    side = max(h, w)
    square = F.resize(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None], [side, side],
                      antialias=True)[0].numpy()
    y, x = (side - h) // 2, (side - w) // 2
    out = np.zeros((rows, cols), dtype=np.float32)
    out[top:bottom, left:right] = square[y : y + h, x : x + w]
    return out


def normalise(x: torch.Tensor, pp: Preprocessing) -> torch.Tensor:
    """uint8 (C, S, S) or (N, C, S, S) -> float32 with 3 channels, ImageNet-normalised."""
    x = x.to(torch.float32).div_(255.0)
    if x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    mean = torch.tensor(pp.mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(pp.std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def preprocess(pixels: np.ndarray, pp: Preprocessing) -> torch.Tensor:
    """Inference path: decoded pixels -> model-ready float tensor (3, S, S)."""
    return normalise(prepare(pixels, pp), pp)


class RandomIntensity(torch.nn.Module):
    """Export-to-export appearance changes on a uint8 image: window/level, gamma, noise, blur.

    Two CT exports of the same slice differ by the window they were rendered at (a linear map of
    the grey levels with clipping), by a gamma-like tone curve, and by noise and sharpness. Each
    is drawn independently per image:
    - window: grey' = (grey - pivot) * gain + pivot + shift, gain log-uniform in 1/contrast..contrast,
      pivot uniform in the mid-grey range, shift uniform in +-shift grey levels; clipped to 0..255;
    - gamma: (grey / 255) ** g with g log-uniform in 1/gamma..gamma;
    - noise: Gaussian, sigma uniform in 0..noise grey levels, with probability 0.5;
    - blur: Gaussian, sigma uniform in 0.1..blur px, with probability 0.3.
    The result is uint8 again, so it stays on the cached path and `normalise` is unchanged.
    """

    def __init__(self, contrast: float = 1.0, shift: float = 0.0, gamma: float = 1.0, noise: float = 0.0,
                 blur: float = 0.0):
        super().__init__()
        self.contrast, self.shift, self.gamma, self.noise, self.blur = contrast, shift, gamma, noise, blur

    @staticmethod
    def _log_uniform(bound: float) -> float:
        return math.exp(float(torch.empty(1).uniform_(-math.log(bound), math.log(bound))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)
        if self.contrast > 1.0 or self.shift > 0.0:
            gain = self._log_uniform(self.contrast) if self.contrast > 1.0 else 1.0
            pivot = float(torch.empty(1).uniform_(64.0, 192.0))
            shift = float(torch.empty(1).uniform_(-self.shift, self.shift)) if self.shift > 0 else 0.0
            y = (y - pivot) * gain + pivot + shift
        if self.gamma > 1.0:
            y = (y.clamp(0.0, 255.0) / 255.0).pow(self._log_uniform(self.gamma)) * 255.0
        if self.noise > 0.0 and float(torch.rand(1)) < 0.5:
            y = y + torch.randn_like(y) * float(torch.empty(1).uniform_(0.0, self.noise))
        if self.blur > 0.0 and float(torch.rand(1)) < 0.3:
            y = F.gaussian_blur(y, kernel_size=[5, 5], sigma=[float(torch.empty(1).uniform_(0.1, self.blur))])
        return y.clamp_(0.0, 255.0).round_().to(torch.uint8)


def train_augmentation(pp: Preprocessing) -> v2.Compose:
    """Training augmentation on cached uint8 tensors, as configured in `pp.augment`:
    geometry (rotation, scaling, shift, flips, random resized crops) then intensity
    (`RandomIntensity`: window/level, gamma, noise, blur)."""
    a = pp.augment
    ops: list = []
    if a.get("crop_scale"):  # a random part of the body, resized back: scale and aspect jitter
        ops.append(v2.RandomResizedCrop(pp.image_size, scale=tuple(a["crop_scale"]), ratio=(0.85, 1.18),
                                        antialias=True))
    ops.append(
        v2.RandomAffine(
            degrees=a.get("degrees", 0.0),
            translate=(a.get("translate", 0.0),) * 2,
            scale=tuple(a.get("scale", (1.0, 1.0))),
            interpolation=v2.InterpolationMode.BILINEAR,
        )
    )
    if a.get("hflip", 0.0) > 0:
        ops.append(v2.RandomHorizontalFlip(a["hflip"]))
    if a.get("vflip", 0.0) > 0:
        ops.append(v2.RandomVerticalFlip(a["vflip"]))
    intensity = {k: a[k] for k in ("contrast", "shift", "gamma", "noise", "blur") if a.get(k)}
    if intensity:
        ops.append(RandomIntensity(**intensity))
    return v2.Compose(ops)


def batch_mixing(mixup: float, cutmix: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a normalised training batch (torchvision's), or None when both are off.

    `mixup` and `cutmix` are the alphas of their Beta(alpha, alpha) mixing weights; with both on,
    each batch gets one of the two at random. The batch's labels come back as class probabilities
    (N, num_classes), which `BalancedLoss` takes as they are. Applied after `normalise`, on the
    batch: the uint8 cache and the per-image path are untouched, and a linear mix of normalised
    images is the normalised mix of the images.
    """
    ops = [op(alpha=alpha, num_classes=num_classes)
           for op, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
