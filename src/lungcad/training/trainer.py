"""`lungcad train`: data -> leakage-free split -> transfer learning -> self-describing run folder.

Run folder layout (all files written atomically):
    config.json        resolved configuration (every default filled in)
    data.json          class counts, groups, split summary, skipped files, data fingerprint
    split.csv          path,label,group,subset
    skipped.csv        unreadable images that were left out (path,reason)
    history.csv        one row per epoch
    checkpoint.pt      resumable state while training (removed when the run completes)
    best.safetensors   best weights so far (removed when the run completes)
    model.safetensors  final weights (best validation macro-F1)
    model.json         the model contract
    metrics.json       test-split metrics
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import lungcad
from lungcad.data.dataset import CachedImageDataset, load_cache
from lungcad.data.discovery import CLASSES, Sample, discover, parse_label_map
from lungcad.data.grouping import assign_groups, scan_images
from lungcad.data.split import (
    SplitRow,
    read_split,
    split_summary,
    stratified_group_split,
    write_split,
)
from lungcad.data.transforms import Preprocessing, train_augmentation
from lungcad.errors import LungcadError
from lungcad.evaluation.metrics import classification_metrics, format_metrics
from lungcad.inference.engine import infer_logits
from lungcad.models.contract import ModelContract, save_model
from lungcad.models.factory import (
    configure_finetuning,
    create_model,
    logits_to_probs,
    num_outputs,
    set_train_mode,
)
from lungcad.utils import atomic_path, atomic_write_json, atomic_write_text, seed_everything

log = logging.getLogger(__name__)

BINARY_CLASSES = ["not_malignant", "malignant"]


@dataclass
class TrainConfig:
    data: str
    out: str
    task: str = "multiclass"  # multiclass: normal/benign/malignant; binary: malignant vs. not
    pretrained: str = "imagenet"  # transfer learning from ImageNet is the point; "none" = random init
    weights: str | None = None  # local torchvision weights file (air-gapped sites); implies pretrained=file
    finetune: str = "all"  # which layers train: fc, layer4 (+fc) or all
    head_epochs: int = 0  # staged fine-tuning: train only the head for this many epochs first
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9, Nesterov)
    lr: float | None = None  # None: 1e-3 for AdamW from scratch, 3e-4 AdamW pretrained, 1e-2 SGD
    weight_decay: float = 1e-4
    epochs: int = 20  # upper bound; early stopping usually ends sooner
    patience: int = 6  # epochs without a better validation macro-F1 before stopping
    warmup_epochs: float = 1.0  # linear LR warm-up, then cosine decay to zero
    image_size: int = 224
    batch_size: int = 16  # fits comfortably in memory on a CPU; larger batches are not faster there
    seed: int = 0
    split: str | None = None  # reuse an existing split.csv instead of computing one
    label_map: list[str] = field(default_factory=list)
    colour: str = "auto"  # auto: greyscale if every image is greyscale (CT), else RGB (histopathology)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    workers: int = 0  # DataLoader workers; augmentation of cached tensors is cheap, 0 avoids fork cost
    threads: int = 0  # torch intra-op threads; 0 = all cores
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.optimizer == "sgd":
            return 1e-2
        return 1e-3 if self.pretrained == "none" and self.weights is None else 3e-4


# --------------------------------------------------------------------------------------------
# data preparation


@dataclass
class PreparedData:
    rows: list[SplitRow]
    pp: Preprocessing
    caches: dict[str, torch.Tensor]  # subset -> uint8 cache
    targets: dict[str, list[int]]
    skipped: list[tuple[Path, str]]
    summary: dict


def target_index(label: str, task: str) -> int:
    if task == "binary":
        return int(label == "malignant")
    return CLASSES.index(label)


def output_classes(task: str) -> list[str]:
    return list(BINARY_CLASSES) if task == "binary" else list(CLASSES)


def prepare_data(cfg: TrainConfig, split_file: Path | None) -> PreparedData:
    """Discover, scan, group, split and decode. Raises LungcadError before anything is written."""
    data = Path(cfg.data)
    label_map = parse_label_map(cfg.label_map)
    if split_file is not None:
        rows = read_split(split_file, root=data)
        samples = [Sample(r.path, r.label, r.group) for r in rows]
    else:
        samples = discover(data, label_map)
    infos, unreadable = scan_images(samples, progress=cfg.progress)
    bad_paths = {Path(p) for p, _ in unreadable}
    for path, reason in unreadable:
        log.warning("skipping unreadable image: %s", reason if str(path) in reason else f"{path}: {reason}")
    if split_file is not None:
        rows = [r for r in rows if r.path not in bad_paths]
    else:
        groups = assign_groups(samples, infos)
        keep = [i for i, s in enumerate(samples) if s.path not in bad_paths]
        if not keep:
            raise LungcadError("no readable images", data)
        rows = stratified_group_split(
            [samples[i] for i in keep],
            [groups[i] for i in keep],
            fractions=(1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction),
            seed=cfg.seed,
        )
    colour = cfg.colour
    if colour == "auto":
        grey_modes = {"L", "I;16", "I;16B", "I;16L", "I", "1", "LA"}
        colour = "grey" if all(info.mode in grey_modes for info in infos) else "rgb"
    pp = Preprocessing(image_size=cfg.image_size, colour=colour)
    caches, targets = {}, {}
    for subset in ("train", "val", "test"):
        sub = [r for r in rows if r.subset == subset]
        caches[subset], bad = load_cache([r.path for r in sub], pp, progress=cfg.progress, desc=f"decoding {subset}")
        if bad:  # scanned fine but failed now (changed on disk): refuse rather than train on zeros
            raise LungcadError(f"image became unreadable during loading: {bad[0][1]}")
        targets[subset] = [target_index(r.label, cfg.task) for r in sub]
        if not sub:
            raise LungcadError(f"the {subset} subset is empty", split_file or data)
    sha_of = {samples[i.index].path: i.sha256 for i in infos}
    fingerprint = hashlib.sha256()
    for r in sorted(rows, key=lambda r: str(r.path)):
        fingerprint.update(f"{r.path.name},{r.label},{r.subset},{sha_of.get(r.path, '')}\n".encode())
    summary = {
        "data": str(data),
        "images": len(rows),
        "skipped": len(unreadable),
        "colour": colour,
        "groups": len({r.group for r in rows}),
        "split": split_summary(rows),
        "fingerprint_sha256": fingerprint.hexdigest(),
    }
    return PreparedData(rows, pp, caches, targets, list(unreadable), summary)


# --------------------------------------------------------------------------------------------
# training


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    lr = cfg.resolved_lr()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    raise LungcadError(f"unknown --optimizer {cfg.optimizer!r} (sgd or adamw)")


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _loss_fn(cfg: TrainConfig, train_targets: list[int]) -> nn.Module:
    """Class-balanced loss: each class weighs as much as the others however many images it has."""
    counts = np.bincount(train_targets, minlength=len(output_classes(cfg.task))).astype(np.float64)
    if cfg.task == "binary":
        pos, neg = counts[1], counts[0]
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([neg / max(pos, 1.0)], dtype=torch.float32))
    weights = counts.sum() / (len(counts) * np.clip(counts, 1.0, None))
    return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))


def _loss(criterion: nn.Module, logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "binary":
        return criterion(logits.reshape(-1), y.float())
    return criterion(logits, y)


def _evaluate(model: nn.Module, cache: torch.Tensor, targets: list[int], cfg: TrainConfig, pp: Preprocessing,
              criterion: nn.Module) -> tuple[dict, float, torch.Tensor]:
    logits = infer_logits(model, cache, pp, batch_size=max(cfg.batch_size, 32))
    y = torch.as_tensor(targets)
    loss = float(_loss(criterion, logits, y, cfg.task))
    probs = logits_to_probs(logits, cfg.task).numpy()
    return classification_metrics(y.numpy(), probs, output_classes(cfg.task), cfg.task), loss, logits


HISTORY_FIELDS = [
    "epoch", "stage", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "val_balanced_accuracy", "val_macro_f1", "seconds", "images_per_second",
]


def _write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def _check_out(out: Path) -> None:
    if out.exists():
        raise LungcadError("run folder already exists (choose a new --out, or --resume to continue it)", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LungcadError("parent folder of --out does not exist", parent)
    try:  # a real probe: access() says yes to root even on read-only or virtual file systems
        tempfile.TemporaryDirectory(dir=parent, prefix=".lungcad-probe-").cleanup()
    except OSError as exc:
        raise LungcadError(f"cannot write here ({exc.strerror or exc})", parent) from None


def train(cfg: TrainConfig, resume: bool = False, resume_epochs: int | None = None) -> Path:
    """Train (or resume) a run; returns the run folder. See the module docstring for its layout.

    On resume the saved config.json wins; only `resume_epochs` (a new upper bound) may change it.
    """
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume:
        cfg, split_file, state = _load_resume_state(out, cfg.progress, resume_epochs)
    else:
        _check_out(out)
        split_file = Path(cfg.split) if cfg.split else None
        state = None
    seed_everything(cfg.seed)

    prepared = prepare_data(cfg, split_file)
    pp, task = prepared.pp, cfg.task
    classes = output_classes(task)
    outputs = num_outputs(task, len(classes))
    if state is None:
        model, init = create_model("resnet50", outputs=outputs, pretrained=cfg.pretrained, weights_file=cfg.weights)
        if init["pretrained"] == "none" and cfg.finetune != "all":
            log.warning("--finetune %s with random initialisation freezes random features; use 'all'", cfg.finetune)
    else:
        model, _ = create_model("resnet50", outputs=outputs, pretrained="none")
        model.load_state_dict(state["model"])
        init = state["init"]

    # Everything validated: only now does the run folder appear.
    if not resume:
        out.mkdir(parents=False)
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
        write_split(out / "split.csv", prepared.rows, Path(cfg.data))
        atomic_write_json(out / "init.json", init)
    atomic_write_json(out / "data.json", {**prepared.summary, "skipped_files": [
        {"path": str(p), "reason": r} for p, r in prepared.skipped]})
    _write_skipped(out / "skipped.csv", prepared.skipped)
    log.info("data: %s", json.dumps(prepared.summary["split"]))

    model = model.to(memory_format=torch.channels_last)  # oneDNN's fast path on CPU
    train_params = configure_finetuning(model, cfg.finetune)
    optimizer = _make_optimizer(cfg, train_params)
    loader = DataLoader(
        CachedImageDataset(prepared.caches["train"], prepared.targets["train"], pp, train_augmentation(pp)),
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(prepared.targets["train"]) > cfg.batch_size,  # no 1-image batches for BatchNorm
        num_workers=cfg.workers,
        generator=torch.Generator(),
    )
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.epochs * steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    )
    criterion = _loss_fn(cfg, prepared.targets["train"])
    history: list[dict] = []
    best_f1, best_epoch, start_epoch = -1.0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best_f1, best_epoch, start_epoch = state["history"], state["best_f1"], state["best_epoch"], state["epoch"]
        log.info("resuming after epoch %d (best val macro-F1 %.3f at epoch %d)", start_epoch, best_f1, best_epoch)

    for epoch in range(start_epoch, cfg.epochs):
        if epoch - best_epoch >= cfg.patience and best_epoch > 0:
            log.info("early stop: no better validation macro-F1 for %d epochs", cfg.patience)
            break
        stage = "fc" if epoch < cfg.head_epochs else cfg.finetune
        configure_finetuning(model, stage)
        set_train_mode(model, True)
        seed_everything(cfg.seed * 1000 + epoch)  # per-epoch seed: a resumed run replays the same batches
        loader.generator.manual_seed(cfg.seed * 1000 + epoch)
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} [{stage}]", unit="batch",
                   disable=not cfg.progress, leave=False)
        for x, y in bar:
            x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = _loss(criterion, logits, y, task)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise LungcadError(f"training diverged (loss {loss_value}) at epoch {epoch + 1}; try a lower --lr")
            seen += len(y)
            loss_sum += loss_value * len(y)
            pred = (logits.reshape(-1) > 0).long() if task == "binary" else logits.argmax(1)
            correct += int((pred == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        seconds = time.perf_counter() - t0
        val, val_loss, _ = _evaluate(model, prepared.caches["val"], prepared.targets["val"], cfg, pp, criterion)
        row = {
            "epoch": epoch + 1, "stage": stage, "lr": f"{scheduler.get_last_lr()[0]:.3g}",
            "train_loss": round(loss_sum / max(seen, 1), 5), "train_accuracy": round(correct / max(seen, 1), 5),
            "val_loss": round(val_loss, 5), "val_accuracy": round(val["accuracy"], 5),
            "val_balanced_accuracy": round(val["balanced_accuracy"] or 0.0, 5),
            "val_macro_f1": round(val["macro_f1"], 5), "seconds": round(seconds, 1),
            "images_per_second": round(seen / seconds, 2),
        }
        history.append(row)
        log.info(
            "epoch %d/%d: train loss %.3f acc %.3f | val loss %.3f acc %.3f bal-acc %.3f macro-F1 %.3f | %.1f img/s",
            epoch + 1, cfg.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"],
            row["val_accuracy"], row["val_balanced_accuracy"], row["val_macro_f1"], row["images_per_second"],
        )
        if val["macro_f1"] > best_f1:
            best_f1, best_epoch = val["macro_f1"], epoch + 1
            with atomic_path(out / "best.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        _write_history(out / "history.csv", history)
        with atomic_path(out / "checkpoint.pt") as tmp:
            torch.save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                "best_f1": best_f1, "best_epoch": best_epoch, "init": init,
            }, tmp)

    return _finish(out, cfg, prepared, init, best_epoch, best_f1, criterion)


def _finish(out: Path, cfg: TrainConfig, prepared: PreparedData, init: dict, best_epoch: int, best_f1: float,
            criterion: nn.Module) -> Path:
    """Best weights -> test metrics -> model.safetensors + model.json + metrics.json."""
    classes = output_classes(cfg.task)
    model, _ = create_model("resnet50", outputs=num_outputs(cfg.task, len(classes)), pretrained="none")
    model.load_state_dict(load_file(str(out / "best.safetensors")))
    model = model.to(memory_format=torch.channels_last).eval()
    test, test_loss, _ = _evaluate(model, prepared.caches["test"], prepared.targets["test"], cfg, prepared.pp, criterion)
    metrics = {"subset": "test", "best_epoch": best_epoch, "val_macro_f1": best_f1, "test_loss": test_loss, **test}
    contract = ModelContract(
        arch="resnet50", task=cfg.task, classes=classes, preprocessing=prepared.pp, init=init,
        training={
            "data": cfg.data, "data_fingerprint_sha256": prepared.summary["fingerprint_sha256"],
            "split": prepared.summary["split"], "finetune": cfg.finetune, "head_epochs": cfg.head_epochs,
            "optimizer": cfg.optimizer, "lr": cfg.resolved_lr(), "best_epoch": best_epoch, "seed": cfg.seed,
        },
        metrics={k: test[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc")},
        versions={"lungcad": lungcad.__version__, "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "python": platform.python_version()},
    )
    atomic_write_json(out / "metrics.json", metrics)
    save_model(out, model, contract)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    (out / "best.safetensors").unlink(missing_ok=True)
    log.info("test split (best epoch %d):\n%s", best_epoch, format_metrics(test))
    return out


def _write_skipped(path: Path, skipped: list[tuple[Path, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    w.writerows([[str(p), r] for p, r in skipped])
    atomic_write_text(path, buf.getvalue())


def _load_resume_state(out: Path, progress: bool, epochs: int | None) -> tuple[TrainConfig, Path, dict]:
    if not out.is_dir():
        raise LungcadError("cannot resume: run folder not found", out)
    if (out / "model.json").exists() and not (out / "checkpoint.pt").exists():
        raise LungcadError("run already finished; nothing to resume", out)
    try:
        cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise LungcadError(f"cannot resume: unreadable config.json ({exc})", out) from None
    ckpt = out / "checkpoint.pt"
    if not ckpt.is_file():
        raise LungcadError("cannot resume: no checkpoint.pt (did the first epoch finish?)", out)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as exc:
        raise LungcadError(f"cannot resume: corrupt checkpoint ({str(exc).splitlines()[0][:150]})", ckpt) from None
    cfg.progress = progress
    if epochs is not None:
        cfg.epochs = epochs
    return cfg, out / "split.csv", state
