"""Training-recipe pieces chosen by cross-validation: augmentation on the uint8 cache, class-balanced
sampling, label smoothing, weight EMA and bf16 autocast on CPUs that have it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_slice

from lungcad.data.dataset import CachedImageDataset
from lungcad.data.transforms import AUGMENT_POLICIES, Preprocessing, RandomIntensity, prepare, train_augmentation
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
