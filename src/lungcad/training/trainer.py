"""`lungcad train`: data -> leakage-free split -> transfer learning -> self-describing run folder.

The run folder's layout is `lungcad.run.RunFolder`'s (every file written atomically). Without a
validation subset (cross-validation members) the epochs are fixed, the last weights are kept and
calibration is left to the ensemble (`lungcad.training.crossval`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import lungcad
from lungcad.data.dataset import CachedImageDataset
from lungcad.data.grouping import ImageInfo
from lungcad.data.split import write_split
from lungcad.data.transforms import Preprocessing, batch_mixing, train_augmentation
from lungcad.distributed import (
    DistContext,
    all_reduce_sum,
    all_reduce_sum_tensor,
    barrier,
    broadcast_from_main,
    init_distributed,
    shutdown,
)
from lungcad.errors import LungcadError, first_line
from lungcad.evaluation.calibration import fit_operating_point
from lungcad.evaluation.metrics import classification_metrics, format_metrics
from lungcad.inference.appearance import fit_profile
from lungcad.inference.forward import infer_logits
from lungcad.inference.ood import fit_ood
from lungcad.models.bn_folding import FrozenTrunkView
from lungcad.models.contract import CONTRACT_FILE, ModelContract, save_model
from lungcad.models.factory import (
    configure_finetuning,
    create_model,
    logits_to_probs,
    num_outputs,
    set_train_mode,
)
from lungcad.run import RunFolder
from lungcad.training.config import RECIPE_KEYS, TrainConfig
from lungcad.training.data import DataPlan, PreparedData, load_data, output_classes, plan_data
from lungcad.utils import atomic_path, atomic_write_json, atomic_write_text, cpu_has_native_bf16, seed_everything

__all__ = ["ARCH", "HISTORY_FIELDS", "BalancedLoss", "ClassBalancedSampler", "check_out_dir", "train"]

log = logging.getLogger(__name__)

ARCH = "resnet50"  # what `lungcad train` builds (lungcad.models.factory.ARCHITECTURES)


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


class BalancedLoss(nn.Module):
    """Class-balanced loss: each class weighs as much as the others however many images it has.

    Returns (weighted sum, normaliser) rather than a mean, so that under DDP the mean can be taken
    over the *global* batch (normaliser all-reduced): the gradient is then exactly the
    single-process one, class weights included.
    """

    def __init__(self, task: str, train_targets: list[int], weighted: bool = True, label_smoothing: float = 0.0):
        super().__init__()
        self.task, self.label_smoothing = task, label_smoothing
        counts = np.bincount(train_targets, minlength=len(output_classes(task))).astype(np.float64)
        if not weighted:  # batches are class-balanced already (balance="sampler")
            weight = [1.0] * len(counts)
        elif task == "binary":  # positives up-weighted by neg/pos, as BCEWithLogitsLoss(pos_weight)
            weight = [1.0, counts[0] / max(counts[1], 1.0)]
        else:
            weight = counts.sum() / (len(counts) * np.clip(counts, 1.0, None))
        self.register_buffer("weight", torch.tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`y`: class indices (N,), or class probabilities (N, classes) from MixUp / CutMix, where a
        one-hot row gives exactly the loss of its index."""
        soft = y.is_floating_point()
        if self.task == "binary":
            per = nn.functional.binary_cross_entropy_with_logits(
                logits.reshape(-1), y[:, 1] if soft else y.float(), pos_weight=self.weight[1], reduction="none")
            return per.sum(), torch.tensor(float(len(y)), device=per.device)  # BCE means over samples
        per = nn.functional.cross_entropy(logits, y, weight=self.weight, reduction="none",
                                          label_smoothing=self.label_smoothing if self.training else 0.0)
        # weighted CE means over the sample weights (a mixed sample's: its classes' weights, mixed alike)
        return per.sum(), (y @ self.weight).sum() if soft else self.weight[y].sum()


def _mean_loss(criterion: BalancedLoss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    total, norm = criterion(logits, y)
    return total / norm


def _evaluate(model: nn.Module, cache: torch.Tensor, targets: list[int], cfg: TrainConfig, pp: Preprocessing,
              criterion: nn.Module) -> tuple[dict, float, torch.Tensor]:
    criterion.eval()  # (label smoothing is a training-time regulariser; reported losses are plain)
    logits = infer_logits(model, cache, pp, batch_size=max(cfg.batch_size, 32))
    y = torch.as_tensor(targets)
    loss = float(_mean_loss(criterion, logits, y))
    probs = logits_to_probs(logits, cfg.task).numpy()
    return classification_metrics(y.numpy(), probs, output_classes(cfg.task), cfg.task), loss, logits


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """Indices drawn with replacement so that every class is equally likely, sharded over ranks.

    The alternative to loss weighting: with 15 benign patients, a weighted loss sees each benign
    image rarely but with a large weight; balanced batches show them often, augmented differently
    each time. Seeded per epoch like DistributedSampler (`set_epoch`), same length per epoch.
    """

    def __init__(self, targets: list[int], num_replicas: int = 1, rank: int = 0, seed: int = 0):
        counts = np.bincount(targets)
        self.weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.float64)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.per_rank = len(targets) // num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.per_rank * self.num_replicas, replacement=True, generator=g)
        return iter(idx[self.rank :: self.num_replicas].tolist())


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


def check_out_dir(out: Path) -> None:
    """--out must not exist; missing parent folders are fine (created later) if we can write there."""
    if out.exists():
        raise LungcadError("run folder already exists (choose a new --out, or --resume to continue it)", out)
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LungcadError("not a folder", ancestor)
    try:  # a real probe: access() says yes to root even on read-only or virtual file systems
        tempfile.TemporaryDirectory(dir=ancestor, prefix=".lungcad-probe-").cleanup()
    except OSError as exc:
        raise LungcadError(f"cannot write here ({exc.strerror or exc})", ancestor) from None


def train(cfg: TrainConfig, resume: bool = False, resume_epochs: int | None = None,
          known: Mapping[Path, ImageInfo | str] | None = None) -> Path:
    """Train (or resume) a run; returns the run folder. See the module docstring for its layout.

    On resume the saved config.json wins; only `resume_epochs` (a new upper bound) may change it.
    Under torchrun every rank calls this; rank 0 alone validates input and writes the run folder.
    `known`: a scan of the data already made (`grouping.scan_results`; cross-validation's folds).
    """
    ctx = init_distributed(cfg.device)
    out = Path(cfg.out)
    started_here = not resume and not out.exists()
    try:
        return _train(ctx, cfg, resume, resume_epochs, known)
    except BaseException:
        # A run that failed (disk full, Ctrl-C, a crash) before its first checkpoint could neither be
        # resumed nor rerun with the same --out: leave nothing behind. With a checkpoint, keep it for --resume.
        if started_here and ctx.is_main and out.is_dir() and not (out / "checkpoint.pt").exists() \
                and not (out / CONTRACT_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutdown(ctx)


def _new_model(cfg: TrainConfig, pretrained: str = "none", weights_file: str | None = None) -> tuple[nn.Module, dict]:
    return create_model(ARCH, outputs=num_outputs(cfg.task, len(output_classes(cfg.task))), pretrained=pretrained,
                        weights_file=weights_file)


def _setup(
    ctx: DistContext, cfg: TrainConfig, resume: bool, resume_epochs: int | None,
    known: Mapping[Path, ImageInfo | str] | None = None,
) -> tuple[TrainConfig, DataPlan, dict, nn.Module | None, dict | None]:
    """Rank 0: validate everything, plan the data, build the model; nothing is written yet.

    Returns (config, plan, init record, model or None when resuming, checkpoint state or None).
    """
    out = Path(cfg.out)
    seed_everything(cfg.seed)  # the head's (and, with --pretrained none, every layer's) initial weights
    if resume:
        cfg, split_file, state = _load_resume_state(out, cfg.progress, resume_epochs)
    else:
        check_out_dir(out)
        split_file, state = (Path(cfg.split) if cfg.split else None), None
    if cfg.batch_size % ctx.world_size:
        raise LungcadError(f"--batch-size {cfg.batch_size} (global) must be divisible by the {ctx.world_size} ranks")
    plan = plan_data(cfg, split_file, known)
    if state is None and cfg.init_from:  # site adaptation: the source run's weights, head included
        from lungcad.training.init_from import load_source

        model, init = load_source(cfg)
    elif state is None:
        model, init = _new_model(cfg, cfg.pretrained, cfg.weights)
        if init["pretrained"] == "none" and cfg.finetune != "all":
            log.warning("--finetune %s with random initialisation freezes random features; use 'all'", cfg.finetune)
    else:
        model, init = None, state["init"]
    return cfg, plan, init, model, state


@dataclass
class _Loop:
    """Everything an epoch works with (`_build_loop`)."""

    model: nn.Module  # what the batches go through: the module, a FrozenTrunkView and/or DDP around it
    core: nn.Module  # the unwrapped module: what gets saved and evaluated
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    criterion: BalancedLoss
    ema: torch.optim.swa_utils.AveragedModel | None
    scaler: torch.amp.GradScaler
    sampler: torch.utils.data.Sampler
    loader: DataLoader
    amp_dtype: torch.dtype | None
    has_val: bool
    mix: nn.Module | None  # MixUp / CutMix on each batch (`batch_mixing`), or None

    @property
    def kept(self) -> nn.Module:
        """The weights that would be saved now (the EMA copy when there is one)."""
        return self.ema.module if self.ema is not None else self.core


@dataclass
class _Progress:
    """What a checkpoint carries over between epochs (and across a resume)."""

    history: list[dict]
    best_f1: float = -1.0
    best_epoch: int = 0
    start_epoch: int = 0


def _train(ctx: DistContext, cfg: TrainConfig, resume: bool, resume_epochs: int | None,
           known: Mapping[Path, ImageInfo | str] | None = None) -> Path:
    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    shared, model, state = None, None, None
    if ctx.is_main:
        try:
            cfg, plan, init, model, state = _setup(ctx, cfg, resume, resume_epochs, known)
            shared = (cfg, plan, init)
        except LungcadError as exc:
            shared = exc
    # Other ranks get rank 0's plan (or its error); the model's weights reach them through DDP.
    cfg, plan, init = broadcast_from_main(ctx, shared)
    if resume and not ctx.is_main:  # rank 0 read it in _setup (the run folder is on shared storage for multi-node)
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    seed_everything(cfg.seed)
    if model is None:
        model, _ = _new_model(cfg)
    if state is not None:
        model.load_state_dict(state["model"])
    if ctx.is_main:  # everything validated: only now does the run folder appear (the other ranks wait)
        _write_run_start(out, cfg, plan, init, resume)
    prepared = load_data(plan, cfg, progress=cfg.progress and ctx.is_main)
    if cfg.adapt_bn and state is None:  # before the trunk is folded; a resumed run has them in its checkpoint
        from lungcad.training.init_from import adapt_batchnorm

        init["adapt_bn_images"] = adapt_batchnorm(model.to(ctx.device), prepared.caches["train"], prepared.pp,
                                                  cfg.batch_size, ctx.device)
    loop = _build_loop(ctx, cfg, model, prepared)
    progress = _restore(ctx, loop, state)
    del state

    for epoch in range(progress.start_epoch, cfg.epochs):
        best = progress.best_epoch
        if loop.has_val and cfg.patience > 0 and epoch - best >= cfg.patience and best > 0:
            if ctx.is_main:
                log.info("early stop: no better validation macro-F1 for %d epochs", cfg.patience)
            break
        _fault_injection(ctx, epoch)
        row = _train_epoch(ctx, cfg, loop, epoch)
        if ctx.is_main:
            _validate(cfg, loop, prepared, ctx.device, row)
        # every rank takes the same early-stopping decision, on rank 0's row
        row = broadcast_from_main(ctx, row if ctx.is_main else None)
        progress.history.append(row)
        _keep(ctx, out, loop, progress, row, epoch, init)
        barrier(ctx)  # nobody races ahead of a checkpoint that a resume would need

    if not ctx.is_main:
        return out
    return _finish(out, cfg, prepared, init, progress.best_epoch, progress.best_f1, loop.criterion.cpu())


def _write_run_start(out: Path, cfg: TrainConfig, plan: DataPlan, init: dict, resume: bool) -> None:
    """Rank 0, before the first epoch: config, split and init (a new run), data summary and skipped files."""
    if not resume:
        out.mkdir(parents=True)
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
        write_split(out / "split.csv", plan.rows, Path(cfg.data))
        atomic_write_json(out / "init.json", init)
    atomic_write_json(out / "data.json", {**plan.summary, "skipped_files": [
        {"path": str(p), "reason": r} for p, r in plan.skipped]})
    _write_skipped(out / "skipped.csv", plan.skipped)
    log.info("data: %s", json.dumps(plan.summary["split"]))


def _build_loop(ctx: DistContext, cfg: TrainConfig, model: nn.Module, prepared: PreparedData) -> _Loop:
    """The model on its device (frozen trunk folded, DDP-wrapped), optimiser, schedule, loss, EMA, batches."""
    device = ctx.device
    train_params = configure_finetuning(model, cfg.finetune)
    model = model.to(device, memory_format=torch.channels_last)  # oneDNN / cuDNN fast path
    core = model
    if cfg.finetune != "all" and cfg.head_epochs == 0:
        # frozen stages folded (conv+BN) and run without autograd: same outputs, less work
        model = FrozenTrunkView(core, cfg.finetune)
    if ctx.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=cfg.head_epochs > 0)  # head stage leaves the trunk without grads
    optimizer = _make_optimizer(cfg, train_params)
    dataset = CachedImageDataset(prepared.caches["train"], prepared.targets["train"], prepared.pp,
                                 train_augmentation(prepared.pp) if cfg.augment else None)
    # DistributedSampler also in a single process: with the same seed and global batch, the union
    # of the ranks' batches is the single-process batch, so runs are comparable across world sizes.
    if cfg.balance == "sampler":
        sampler = ClassBalancedSampler(prepared.targets["train"], ctx.world_size, ctx.rank, cfg.seed)
    elif cfg.balance == "loss":
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    else:
        raise LungcadError(f"unknown --balance {cfg.balance!r} (loss or sampler)")
    per_rank = cfg.batch_size // ctx.world_size
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                        drop_last=len(sampler) > per_rank,  # no 1-image batches for BatchNorm
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        worker_init_fn=_worker_stops_quietly)
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(cfg.epochs * steps_per_epoch, max(1, int(cfg.warmup_epochs * steps_per_epoch)))
    )
    criterion = BalancedLoss(cfg.task, prepared.targets["train"], weighted=cfg.balance == "loss",
                             label_smoothing=cfg.label_smoothing).to(device)
    # weight EMA: a smoothed copy of the weights (BatchNorm statistics included) is the model kept
    ema = (torch.optim.swa_utils.AveragedModel(
        core, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0 else None)
    has_val = len(prepared.targets["val"]) > 0
    amp_dtype = _amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    mix = batch_mixing(cfg.mixup, cfg.cutmix, len(output_classes(cfg.task)))
    return _Loop(model, core, optimizer, scheduler, criterion, ema, scaler, sampler, loader, amp_dtype, has_val, mix)


def _worker_stops_quietly(worker_id: int) -> None:
    """A DataLoader worker treats every SIGTERM as a stop: it exits with status 0, as torch's own
    handler does when the SIGTERM comes from its trainer. A stop sent to the whole process group
    (`kill -- -PGID`, systemd, docker) would otherwise kill the worker by signal, and the trainer,
    stopping cleanly on its own SIGTERM, would die instead with "DataLoader worker ... killed by
    signal" and a traceback."""
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum, frame) -> None:
    os._exit(0)


def _restore(ctx: DistContext, loop: _Loop, state: dict | None) -> _Progress:
    """A resumed run's optimiser, schedule, EMA and progress from its checkpoint (a new run: a fresh start)."""
    if state is None:
        return _Progress(history=[])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    if loop.ema is not None and "ema" in state:
        loop.ema.load_state_dict(state["ema"])
    progress = _Progress(state["history"], state["best_f1"], state["best_epoch"], state["epoch"])
    if ctx.is_main:
        log.info("resuming after epoch %d (best epoch so far: %d)", progress.start_epoch, progress.best_epoch)
    return progress


def _train_epoch(ctx: DistContext, cfg: TrainConfig, loop: _Loop, epoch: int) -> dict:
    """One pass over the training batches; returns the epoch's history row (training columns, all ranks)."""
    device, task = ctx.device, cfg.task
    stage = "fc" if epoch < cfg.head_epochs else cfg.finetune
    configure_finetuning(loop.core, stage)
    set_train_mode(loop.core, True)  # (a FrozenTrunkView's folded trunk is a copy and stays in eval)
    loop.criterion.train()
    seed_everything(cfg.seed * 1000 + epoch + 100_003 * ctx.rank)  # augmentation differs per rank
    loop.sampler.set_epoch(epoch)
    t0, seen, loss_sum, norm_sum, correct = time.perf_counter(), 0, 0.0, 0.0, 0
    bar = tqdm(loop.loader, desc=f"epoch {epoch + 1}/{cfg.epochs} [{stage}]", unit="batch",
               disable=not (cfg.progress and ctx.is_main), leave=False)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if loop.mix is not None:  # (after seed_everything: the mixing draws are seeded too)
            x, y = loop.mix(x, y)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=loop.amp_dtype, enabled=loop.amp_dtype is not None):
            logits = loop.model(x)
            total, norm = loop.criterion(logits.float(), y)
            # DDP averages gradients over ranks: scale so the result is the global-batch mean
            loss = total * ctx.world_size / all_reduce_sum_tensor(ctx, norm.detach())
        loop.optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
        loop.scheduler.step()
        if loop.ema is not None:
            loop.ema.update_parameters(loop.core)
        total_value = total.item()
        if not math.isfinite(total_value):
            raise LungcadError(f"training diverged (loss {total_value}) at epoch {epoch + 1}; try a lower --lr")
        seen += len(y)
        loss_sum += total_value
        norm_sum += norm.item()
        pred = (logits.reshape(-1) > 0).long() if task == "binary" else logits.argmax(1)
        correct += int((pred == (y.argmax(1) if y.is_floating_point() else y)).sum())  # a mix: its main class
        bar.set_postfix(loss=f"{loss_sum / norm_sum:.3f}")
    seconds = time.perf_counter() - t0
    loss_sum, norm_sum, correct, seen = all_reduce_sum(ctx, [loss_sum, norm_sum, correct, seen])  # all ranks
    return {
        "epoch": epoch + 1, "stage": stage, "lr": f"{loop.scheduler.get_last_lr()[0]:.3g}",
        "train_loss": round(loss_sum / max(norm_sum, 1e-12), 5), "train_accuracy": round(correct / max(seen, 1), 5),
        "seconds": round(seconds, 1), "images_per_second": round(seen / seconds, 2),
    }


def _validate(cfg: TrainConfig, loop: _Loop, prepared: PreparedData, device: torch.device, row: dict) -> None:
    """Rank 0: the validation columns of the epoch's row (when there is a validation subset), and its log line."""
    epochs = cfg.epochs
    if not loop.has_val:
        log.info("epoch %d/%d: train loss %.3f acc %.3f | %.1f img/s", row["epoch"], epochs,
                 row["train_loss"], row["train_accuracy"], row["images_per_second"])
        return
    val, val_loss, _ = _evaluate(loop.kept, prepared.caches["val"], prepared.targets["val"], cfg, prepared.pp,
                                 loop.criterion.cpu())
    loop.criterion.to(device)
    row.update({"val_loss": round(val_loss, 5), "val_accuracy": round(val["accuracy"], 5),
                "val_balanced_accuracy": round(val["balanced_accuracy"] or 0.0, 5),
                "val_macro_f1": round(val["macro_f1"], 5)})
    log.info("epoch %d/%d: train loss %.3f acc %.3f | val loss %.3f acc %.3f bal-acc %.3f macro-F1 %.3f "
             "| %.1f img/s", row["epoch"], epochs, row["train_loss"], row["train_accuracy"],
             row["val_loss"], row["val_accuracy"], row["val_balanced_accuracy"], row["val_macro_f1"],
             row["images_per_second"])


def _keep(ctx: DistContext, out: Path, loop: _Loop, progress: _Progress, row: dict, epoch: int, init: dict) -> None:
    """After an epoch: the best weights so far (rank 0 writes them), history.csv and the resume checkpoint."""
    # without validation the last epoch is kept (the epoch count is part of the CV-chosen recipe)
    score = row["val_macro_f1"] if loop.has_val else float(epoch + 1)
    if score > progress.best_f1:
        progress.best_f1, progress.best_epoch = score, epoch + 1
        if ctx.is_main:
            with atomic_path(out / "best.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in loop.kept.state_dict().items()}, str(tmp))
    if ctx.is_main:
        _write_history(out / "history.csv", progress.history)
        with atomic_path(out / "checkpoint.pt") as tmp:
            torch.save({
                "model": {k: v.cpu() for k, v in loop.core.state_dict().items()},
                "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
                "epoch": epoch + 1, "history": progress.history, "best_f1": progress.best_f1,
                "best_epoch": progress.best_epoch, "init": init, "world_size": ctx.world_size,
                **({"ema": loop.ema.state_dict()} if loop.ema is not None else {}),
            }, tmp)


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on this device (None: full fp32).

    auto: bf16 on a CPU with native bf16 arithmetic (emulated bf16 is slower than fp32), bf16 or
    fp16 on a GPU, fp32 anywhere else.
    """
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _fault_injection(ctx: DistContext, epoch: int) -> None:
    """Test hook: LUNGCAD_FAULT_KILL_RANK=R:E kills rank R at the start of epoch E (0-based) the way
    an OOM killer or a lost node would, to check that torchrun fails cleanly and --resume recovers."""
    spec = os.environ.get("LUNGCAD_FAULT_KILL_RANK")
    if spec and spec == f"{ctx.rank}:{epoch}":
        log.error("fault injection: killing rank %d at epoch %d", ctx.rank, epoch)
        os.kill(os.getpid(), signal.SIGKILL)


def _finish(out: Path, cfg: TrainConfig, prepared: PreparedData, init: dict, best_epoch: int, best_f1: float,
            criterion: nn.Module) -> Path:
    """Best weights -> test metrics -> model.safetensors + model.json + metrics.json."""
    classes = output_classes(cfg.task)
    model, _ = _new_model(cfg)
    model.load_state_dict(load_file(str(out / "best.safetensors")))
    model = model.to(memory_format=torch.channels_last).eval()
    test, test_loss, test_logits = _evaluate(model, prepared.caches["test"], prepared.targets["test"], cfg,
                                             prepared.pp, criterion)
    has_val = len(prepared.targets["val"]) > 0
    if has_val:
        # Calibration and the malignant operating point, fitted on validation only; test metrics use both.
        _, _, val_logits = _evaluate(model, prepared.caches["val"], prepared.targets["val"], cfg, prepared.pp,
                                     criterion)
        op = fit_operating_point(val_logits, prepared.targets["val"], cfg.task, classes, cfg.target_sensitivity)
        test = classification_metrics(prepared.targets["test"], logits_to_probs(test_logits, cfg.task,
                                      op["temperature"]).numpy(), classes, cfg.task, op["threshold"])
    else:  # a cross-validation member: the ensemble is calibrated on the pooled out-of-fold predictions
        op = None
    metrics = {"subset": "test", "best_epoch": best_epoch, "val_macro_f1": best_f1 if has_val else None,
               "test_loss": test_loss, **test}
    contract = ModelContract(
        arch=ARCH, task=cfg.task, classes=classes, preprocessing=prepared.pp, init=init,
        training={
            "data": cfg.data, "data_fingerprint_sha256": prepared.summary["fingerprint_sha256"],
            "split": prepared.summary["split"], "finetune": cfg.finetune, "head_epochs": cfg.head_epochs,
            "optimizer": cfg.optimizer, "lr": cfg.resolved_lr(), "best_epoch": best_epoch, "seed": cfg.seed,
            "recipe": {k: getattr(cfg, k) for k in RECIPE_KEYS},
            **({"operating_point": op} if op is not None else {}),
        },
        temperature=op["temperature"] if op is not None else 1.0,
        thresholds={"malignant": op["threshold"]} if op is not None else {"malignant": 0.5},
        metrics={k: test[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "roc_auc")},
        versions={"lungcad": lungcad.__version__, "torch": torch.__version__,
                  "torchvision": torchvision.__version__, "python": platform.python_version()},
    )
    # Out-of-distribution detector: fitted on training features, thresholded on validation ones.
    # Without validation (a CV member) the threshold comes from the held-out fold: unseen images too.
    contract.ood = fit_ood(out, model, prepared.caches["train"], prepared.caches["val" if has_val else "test"],
                           prepared.pp, seed=cfg.seed, progress=cfg.progress)
    contract.appearance = fit_profile(prepared.caches["train"])
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
    """(the saved config, its split.csv, the checkpoint) of an interrupted run, or a one-line error."""
    if not out.is_dir():
        raise LungcadError("cannot resume: run folder not found", out)
    if (out / "model.json").exists() and not (out / "checkpoint.pt").exists():
        raise LungcadError("run already finished; nothing to resume", out)
    run = RunFolder(out)
    try:
        cfg = run.train_config()
    except LungcadError as exc:
        raise LungcadError(f"cannot resume: {exc}") from None
    ckpt = run.file("checkpoint.pt")
    if not ckpt.is_file():
        raise LungcadError("cannot resume: no checkpoint.pt (did the first epoch finish?)", out)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as exc:
        raise LungcadError(f"cannot resume: corrupt checkpoint ({first_line(exc, 150)})", ckpt) from None
    cfg.progress = progress
    if epochs is not None:
        cfg.epochs = epochs
    return cfg, run.file("split.csv"), state
