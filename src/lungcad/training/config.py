"""Training parameters: `TrainConfig`, every default stated and explained once, here.

A light module (no torch): the command line builds its options from these defaults, and the
trainer, the data planning and cross-validation all take a `TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RECIPE_KEYS", "TrainConfig"]


@dataclass
class TrainConfig:
    data: str
    out: str
    task: str = "multiclass"  # multiclass: normal/benign/malignant; binary: malignant vs. not
    pretrained: str = "imagenet"  # transfer learning from ImageNet is the point; "none" = random init
    weights: str | None = None  # local torchvision weights file (air-gapped sites); implies pretrained=file
    # site adaptation: fine-tune this lungcad run's model (lungcad.training.init_from); pretrained="lungcad-run"
    init_from: str | None = None
    finetune: str = "all"  # which layers train: fc, layer4 (+fc) or all
    head_epochs: int = 0  # staged fine-tuning: train only the head for this many epochs first
    adapt_bn: bool = False  # with init_from: re-estimate BatchNorm statistics on the site's images first (AdaBN)
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9, Nesterov)
    lr: float | None = None  # None: 1e-3 for AdamW from scratch, 3e-4 AdamW pretrained, 1e-2 SGD
    weight_decay: float = 1e-4
    epochs: int = 20  # upper bound with a validation split (early stopping); the exact count without one
    patience: int = 6  # epochs without a better validation macro-F1 before stopping (0: never stop early)
    warmup_epochs: float = 1.0  # linear LR warm-up, then cosine decay to zero
    image_size: int = 224
    # 16 fits comfortably in memory on any CPU. With bf16 on AMX, 32 trains ~1.5x faster per image at
    # no measured cost (docs/ablations.md, with lr 1.5e-3); the main job uses it (Makefile)
    batch_size: int = 16
    seed: int = 0
    # --folds: the seed of the fold assignment (None: `seed`). Another training seed on the same folds
    # is a replicate that a paired comparison can score (benchmarks/ablation_table.py --average)
    fold_seed: int | None = None
    split: str | None = None  # reuse an existing split.csv instead of computing one
    label_map: list[str] = field(default_factory=list)
    colour: str = "auto"  # auto: greyscale if every image is greyscale (CT), else RGB (histopathology)
    window: str | None = None  # "L,W" in HU the training images were rendered at (contract; DICOM rendered so)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    # DataLoader workers. One worker process (1 torch thread) keeps augmentation off the training
    # threads: with the CPU busy, the main process's 2-thread small ops fell to ~15 img/s against
    # ~190 in a worker (measured on 2 cores); on a quiet machine both are far above the training rate.
    workers: int = 1
    threads: int = 0  # torch intra-op threads; 0 = all cores
    # malignant operating point: the threshold on p(malignant) is the highest that still reaches this
    # sensitivity on validation (a missed cancer costs more than a false alarm)
    target_sensitivity: float = 0.95
    extra_data: str | None = None  # training-only extra images (e.g. clinician feedback export)
    augment: bool = True  # training augmentation on (the policy below) or off
    # named augmentation policy (lungcad.data.transforms.AUGMENT_POLICIES); chosen by grouped CV:
    # geometry beat intensity by +0.087 [+0.015, +0.153] balanced accuracy (docs/ablations.md)
    augment_policy: str = "geometry"
    # class imbalance: "loss" weights the loss by inverse class frequency, "sampler" draws class-balanced
    # batches (every class equally often) with the plain loss
    balance: str = "loss"
    label_smoothing: float = 0.0  # cross-entropy label smoothing (multiclass only)
    # exponential moving average of the weights (decay per step; 0 = off): the averaged weights are
    # the ones evaluated and saved
    ema_decay: float = 0.0
    # batch mixing (lungcad.data.transforms.batch_mixing): alpha of MixUp's / CutMix's Beta(alpha, alpha)
    # mixing weight, 0 = off; with both on, each batch gets one of the two
    mixup: float = 0.0
    cutmix: float = 0.0
    # fold ensembles only: "texture" fuses a texture head with the network (lungcad.models.fusion;
    # chosen in docs/ablations.md), "none" the network alone
    fusion: str = "none"
    device: str = "auto"  # auto: this rank's GPU if any, else CPU
    # mixed precision: auto = bf16 on GPUs that have it (else fp16) and on CPUs with native bf16
    # (AVX512-BF16 or AMX, detected at run time; about 2x a fp32 step there), off on other CPUs
    amp: str = "auto"
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def resolved_fold_seed(self) -> int:
        """The seed of the fold assignment (`--fold-seed`, else `--seed`)."""
        return self.seed if self.fold_seed is None else self.fold_seed

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "sgd":
            return 1e-2
        return 1e-3 if self.pretrained == "none" and self.weights is None else 3e-4


# TrainConfig fields that make up the training recipe (recorded in the contract, compared in ablations)
RECIPE_KEYS = ("image_size", "epochs", "batch_size", "optimizer", "weight_decay", "augment", "augment_policy",
               "balance", "label_smoothing", "ema_decay", "mixup", "cutmix", "amp", "finetune", "head_epochs",
               "adapt_bn", "fusion")
