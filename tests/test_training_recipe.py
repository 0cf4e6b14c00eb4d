"""Training-recipe pieces chosen by cross-validation: augmentation on the uint8 cache, class-balanced
sampling, label smoothing, MixUp / CutMix, weight EMA and bf16 autocast on CPUs that have it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_slice

from lungcad.data.dataset import CachedImageDataset
from lungcad.data.transforms import (
    AUGMENT_POLICIES,
    Preprocessing,
    RandomIntensity,
    batch_mixing,
    prepare,
    train_augmentation,
)
from lungcad.training.trainer import BalancedLoss, ClassBalancedSampler, _amp_dtype
from lungcad.utils import cpu_has_native_bf16


def _cache(n=6, size=48):
    pp = Preprocessing(image_size=size)
    rng = np.random.default_rng(0)
    return torch.stack([prepare(synthetic_slice(rng, "malignant", i, 0, 64), pp) for i in range(n)]), pp


@pytest.mark.parametrize("policy", sorted(AUGMENT_POLICIES))
def test_every_policy_keeps_the_uint8_cache_and_the_shared_normalisation(policy):
    cache, pp = _cache()
    pp = Preprocessing(image_size=pp.image_size, augment=AUGMENT_POLICIES[policy])
    torch.manual_seed(0)
    aug = train_augmentation(pp)
    out = aug(cache[0])
    assert out.dtype == torch.uint8 and out.shape == cache[0].shape
    x, _ = CachedImageDataset(cache, [2] * len(cache), pp, aug)[0]
    assert x.dtype == torch.float32 and x.shape == (3, 48, 48)  # normalise() is the same path as inference


def test_intensity_augmentation_changes_contrast_but_not_geometry():
    cache, _ = _cache()
    torch.manual_seed(1)
    aug = RandomIntensity(contrast=1.35, shift=20.0, gamma=1.4)
    img = cache[0]
    outs = torch.stack([aug(img) for _ in range(20)]).float()
    assert (outs.mean(dim=(1, 2, 3)) - img.float().mean()).abs().max() > 3  # the grey levels move
    body, air = img[0] > 40, img[0] == 0
    # a monotone grey-level map: brighter pixels stay brighter, so anatomy stays where it was
    assert (outs[:, 0][:, body].mean(1) >= outs[:, 0][:, air].mean(1)).all()


def test_noise_and_blur_stay_in_range():
    cache, _ = _cache()
    torch.manual_seed(2)
    aug = RandomIntensity(noise=20.0, blur=2.0)
    for _ in range(10):
        out = aug(cache[1])
        assert out.dtype == torch.uint8 and out.shape == cache[1].shape


def test_class_balanced_sampler_draws_classes_equally_and_shards_ranks():
    targets = [0] * 90 + [1] * 10
    s = ClassBalancedSampler(targets, seed=0)
    s.set_epoch(3)
    drawn = np.array(targets)[list(s)]
    assert len(drawn) == 100 and 0.35 < drawn.mean() < 0.65  # the 10 % class makes up about half
    a, b = ClassBalancedSampler(targets, 2, 0, seed=0), ClassBalancedSampler(targets, 2, 1, seed=0)
    assert len(list(a)) == len(list(b)) == 50
    s2 = ClassBalancedSampler(targets, seed=0)
    s2.set_epoch(4)
    assert list(s2) != list(s)  # a new draw every epoch


def test_label_smoothing_applies_in_training_only_and_unweighted_loss_for_the_sampler():
    logits, y = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    loss = BalancedLoss("multiclass", [0, 1, 2, 2], weighted=False, label_smoothing=0.2)
    assert torch.equal(loss.weight, torch.ones(3))
    train_value = float(loss(logits, y)[0])
    loss.eval()
    assert float(loss(logits, y)[0]) < train_value  # smoothing penalises a confident right answer


@pytest.mark.parametrize("task, weighted, smoothing", [("multiclass", True, 0.0), ("multiclass", True, 0.1),
                                                      ("multiclass", False, 0.0), ("binary", True, 0.0)])
def test_one_hot_soft_labels_give_exactly_the_class_index_loss(task, weighted, smoothing):
    targets = [0, 0, 0, 1, 2, 2] if task == "multiclass" else [0, 0, 0, 1]
    loss = BalancedLoss(task, targets, weighted=weighted, label_smoothing=smoothing)
    y = torch.tensor([0, 1, 1, 0])
    classes = 3 if task == "multiclass" else 2
    logits = torch.randn(4, classes if task == "multiclass" else 1, generator=torch.Generator().manual_seed(0))
    hard = loss(logits, y)
    soft = loss(logits, torch.nn.functional.one_hot(y, classes).float())
    assert torch.allclose(hard[0], soft[0]) and torch.allclose(hard[1], soft[1])
    if weighted:  # the class weights apply to a mixed sample as to its classes: half of each
        half = torch.tensor([[0.5, 0.5] + [0.0] * (classes - 2)])
        total, norm = loss(logits[:1], half)
        a, b = loss(logits[:1], torch.tensor([0])), loss(logits[:1], torch.tensor([1]))
        assert torch.isclose(norm, (a[1] + b[1]) / 2)
        if task == "multiclass" and smoothing == 0.0:
            assert torch.isclose(total, (a[0] + b[0]) / 2)


def test_mixup_mixes_images_and_labels_with_the_same_weight():
    assert batch_mixing(0.0, 0.0, 3) is None
    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.manual_seed(0)
    mx, my = batch_mixing(0.4, 0.0, 3)(x, y)
    assert my.shape == (8, 3) and torch.allclose(my.sum(1), torch.ones(8))
    lam = float(my[1, 1])  # torchvision mixes each image with the one before it: image 1 (benign) with 0 (normal)
    assert torch.allclose(mx, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-6)
    assert torch.allclose(my, lam * torch.nn.functional.one_hot(y, 3) + (1 - lam) * torch.nn.functional.one_hot(
        y.roll(1, 0), 3), atol=1e-6)


def test_cutmix_label_weight_is_the_share_of_pixels_kept():
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 32, 32).clone()  # image i is all i
    y = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(3)
    mx, my = batch_mixing(0.0, 1.0, 3)(x, y)
    kept = (mx[1] == 1).float().mean()  # image 1's own pixels; the pasted box comes from image 0
    assert 0 < kept <= 1 and torch.isclose(my[1, 1], kept, atol=1e-6) and torch.isclose(my[1, 0], 1 - kept)
    both, kinds = batch_mixing(0.4, 1.0, 3), set()
    for _ in range(30):  # each batch gets one of the two: a blend (MixUp) or a pasted box (CutMix)
        img = both(x, y)[0][1]
        kinds.add("cutmix" if bool(((img == 0) | (img == 1)).all()) else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_amp_auto_picks_bf16_exactly_where_the_cpu_has_it():
    cpu = torch.device("cpu")
    assert _amp_dtype("auto", cpu) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert _amp_dtype("off", cpu) is None and _amp_dtype("bf16", cpu) == torch.bfloat16


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 / AMX)")
def test_bf16_autocast_training_step_on_cpu():
    from lungcad.models.factory import create_model

    torch.manual_seed(0)
    model, _ = create_model("resnet50", outputs=3, pretrained="none")
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
