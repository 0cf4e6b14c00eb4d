"""Site adaptation: `lungcad train --init-from RUNDIR --data LOCAL` fine-tunes an existing lungcad model.

- **Weights**: the source run's `model.safetensors`, loaded through `load_model` (sha256 checked
  against its model.json), head included: nothing is re-initialised. A fold ensemble has no
  single set of weights: fine-tuning starts from its first member (fold-1), and the log says so;
  every member of `--folds K` starts from that same source.
- **Preprocessing**: image size, colour and CT window are the source contract's unless the command
  line sets them (`inherit`, called by the CLI, which knows what was typed); overriding one is
  allowed and logged, since the fine-tuned model then sees its input differently from how its
  starting weights were trained. The rest of the preprocessing (geometry, foreground threshold,
  normalisation) is what `lungcad train` always uses; a source that differs there is refused.
- **Task and classes** must be the source's (a clear error otherwise): the head is kept.
- **AdaBN** (`--adapt-bn`, Li et al., "Revisiting batch normalization for practical domain
  adaptation", 2016): before the first epoch, every BatchNorm layer's running mean and variance are
  re-estimated on the site's training images (no augmentation, no labels used;
  `torch.optim.swa_utils.update_bn`). A scanner or export that shifts intensities shifts every
  layer's activation statistics; re-estimating them needs no labels, and with `--finetune fc` or
  `layer4` the frozen layers then keep the site's statistics instead of the source's.
- **Lineage**: the new contract's `init` (and init.json) records the source run, the member, the
  source's weights sha256, its training-data fingerprint and what the source itself started from.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from lungcad.data.dataset import CachedImageDataset
from lungcad.data.transforms import Preprocessing
from lungcad.errors import LungcadError
from lungcad.models.contract import ModelContract, ensemble_members, load_model, read_contract
from lungcad.models.factory import ARCHITECTURES
from lungcad.training.config import TrainConfig
from lungcad.training.data import output_classes

__all__ = ["SOURCE_KIND", "Source", "adapt_batchnorm", "inherit", "load_source", "open_source"]

log = logging.getLogger(__name__)

SOURCE_KIND = "lungcad-run"  # init["pretrained"] (and the resolved config's `pretrained`) of a fine-tuned run
INHERITED = ("image_size", "colour", "window")  # TrainConfig fields taken from the source unless set
FIXED = ("geometry", "foreground_threshold", "mean", "std")  # preprocessing lungcad train cannot change


@dataclass
class Source:
    run_dir: Path  # the run folder given to --init-from
    model_dir: Path  # the run folder whose weights are loaded (the ensemble's fold-1, or run_dir)
    contract: ModelContract  # model_dir's contract
    member: str | None = None  # "fold-1" when run_dir is a fold ensemble
    ensemble_sha256: str | None = None

    def window(self) -> str | None:
        """The source's declared training window as `train --window` takes it (None: undeclared)."""
        pp = self.contract.preprocessing
        return f"{pp.window_level:g},{pp.window_width:g}" if pp.window_source == "declared" else None


def open_source(run_dir: str | Path) -> Source:
    """The model `--init-from` starts from; raises LungcadError for anything that is not a finished run."""
    run_dir = Path(run_dir)
    contract = read_contract(run_dir)
    if not contract.ensemble:
        return Source(run_dir, run_dir, contract)
    try:
        member_dir, member = ensemble_members(run_dir, contract)[0]
    except LungcadError as exc:
        raise LungcadError(f"--init-from: {exc}") from None
    return Source(run_dir, member_dir, member, member_dir.relative_to(run_dir).as_posix(), contract.model_sha256)


def check_compatible(source: Source, cfg: TrainConfig) -> None:
    """Refuse a source whose task, classes, architecture or fixed preprocessing this run cannot keep."""
    c = source.contract
    classes = output_classes(cfg.task)
    if c.task != cfg.task or list(c.classes) != classes:
        raise LungcadError(f"--init-from: the source model is {c.task} ({', '.join(c.classes)}), this run would train "
                           f"{cfg.task} ({', '.join(classes)}); fine-tuning keeps the source's head: use --task {c.task}",
                           source.run_dir)
    if c.arch not in ARCHITECTURES:
        raise LungcadError(f"--init-from: the source is a {c.arch}; lungcad train builds {', '.join(ARCHITECTURES)}",
                           source.run_dir)
    if cfg.weights:
        raise LungcadError("--init-from and --weights are alternatives: the weights come from the source run")
    default = Preprocessing()
    for name in FIXED:
        if getattr(c.preprocessing, name) != getattr(default, name):
            raise LungcadError(f"--init-from: the source preprocesses with {name}={getattr(c.preprocessing, name)!r}, "
                               f"which lungcad train cannot reproduce ({getattr(default, name)!r})", source.run_dir)


def inherit(cfg: TrainConfig, explicit: set[str]) -> TrainConfig:
    """`cfg` with the source's image size, colour and window where `explicit` (the options the
    command line set) does not name them, `pretrained` = SOURCE_KIND; checked against the source."""
    if "pretrained" in explicit:
        raise LungcadError("--init-from replaces --pretrained: the weights come from the source run")
    source = open_source(cfg.init_from)
    pp = source.contract.preprocessing
    taken = {"image_size": pp.image_size, "colour": pp.colour, "window": source.window()}
    cfg = dataclasses.replace(cfg, pretrained=SOURCE_KIND,
                              **{k: v for k, v in taken.items() if k not in explicit})
    check_compatible(source, cfg)
    return cfg


def load_source(cfg: TrainConfig) -> tuple[nn.Module, dict]:
    """(the source's model, the init record with its lineage) for the trainer's `_setup`."""
    source = open_source(cfg.init_from)
    check_compatible(source, cfg)
    pp = source.contract.preprocessing
    mine = {"image_size": cfg.image_size, "colour": cfg.colour, "window": cfg.window}
    theirs = {"image_size": pp.image_size, "colour": pp.colour, "window": source.window()}
    differ = [f"{k} {mine[k]} (source {theirs[k]})" for k in INHERITED
              if mine[k] != theirs[k] and not (k == "colour" and mine[k] == "auto")]
    if differ:
        log.warning("--init-from: %s: the fine-tuned model sees its input differently from how its starting "
                    "weights were trained", "; ".join(differ))
    if source.member:
        log.warning("--init-from %s is a fold ensemble: fine-tuning starts from its member %s alone",
                    source.run_dir, source.member)
    model, contract = load_model(source.model_dir)  # sha256 of model.safetensors checked
    init = {"pretrained": SOURCE_KIND, "source": str(source.run_dir.resolve()),
            **({"source_member": source.member, "source_ensemble_sha256": source.ensemble_sha256}
               if source.member else {}),
            "source_model_sha256": contract.model_sha256,
            "source_data_fingerprint_sha256": contract.training.get("data_fingerprint_sha256"),
            "source_init": contract.init}
    log.info("fine-tuning from %s (weights sha256 %s)", source.model_dir, contract.model_sha256[:16])
    return model, init


def adapt_batchnorm(model: nn.Module, cache: torch.Tensor, pp: Preprocessing, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> int:
    """AdaBN: re-estimate every BatchNorm layer's running statistics on `cache` (uint8 images of the
    new site, preprocessed as the model expects, no augmentation); returns the number of images.

    Running statistics are reset and replaced by the cumulative average over all images
    (`update_bn` sets momentum None for the pass), so the order and batch size barely matter; the
    learnt scale and shift stay. The model comes back in the mode it was in.
    """
    if len(cache) < 2:
        raise LungcadError(f"--adapt-bn needs at least 2 training images to estimate statistics (got {len(cache)})")
    dataset = CachedImageDataset(cache, [0] * len(cache), pp)
    loader = DataLoader(dataset, batch_size=batch_size, drop_last=len(cache) > batch_size)
    with torch.no_grad():
        torch.optim.swa_utils.update_bn(loader, model, device=torch.device(device))
    log.info("AdaBN: BatchNorm statistics re-estimated on %d site image(s)", len(cache))
    return len(cache)
