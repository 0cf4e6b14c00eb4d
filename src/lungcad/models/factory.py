"""The one model factory. Every place that needs a network calls `create_model`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from lungcad.errors import LungcadError, first_line
from lungcad.utils import sha256_file

__all__ = [
    "ARCHITECTURES", "ARCH_SPECS", "FINETUNE_STRATEGIES", "ArchSpec", "cam_target_layers", "configure_finetuning",
    "create_model", "logits_to_probs", "num_outputs", "read_state_dict", "set_train_mode", "split_head",
    "target_index",
]

log = logging.getLogger(__name__)

# Architecture name -> (torchvision builder, default ImageNet weights enum)
ARCHITECTURES = {
    "resnet50": (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2),
}
FINETUNE_STRATEGIES = ("fc", "layer4", "all")


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in an architecture (timm's pretrained cfg idea): nothing outside this module
    reaches into `model.fc` or `model.layer4` by name."""

    classifier: str  # the head replaced for our classes
    cam_layer: str  # Grad-CAM target: the last block of the last stage (dotted path, ints index)
    # fine-tuning strategy -> parameter-name prefixes that train
    finetune_prefixes: dict[str, tuple[str, ...]]


ARCH_SPECS = {
    "resnet50": ArchSpec(classifier="fc", cam_layer="layer4.-1",
                         finetune_prefixes={"fc": ("fc.",), "layer4": ("layer4.", "fc."), "all": ("",)}),
}


def _spec(model: nn.Module) -> ArchSpec:
    return ARCH_SPECS["resnet50"]  # the one architecture; a second one would be looked up by class here


def _get(model: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        model = model[int(part)] if part.lstrip("-").isdigit() else getattr(model, part)
    return model


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone up to global pooling -> features (N, F), classifier head -> logits); an Ensemble
    splits into its members' concatenated features and its combining head."""
    from lungcad.models.ensemble import Ensemble

    if isinstance(model, Ensemble):
        return model.split(split_head)
    name = _spec(model).classifier
    backbone = nn.Sequential(*(m for n, m in model.named_children() if n != name), nn.Flatten(1))
    return backbone, getattr(model, name)


def cam_target_layers(model: nn.Module) -> list[nn.Module]:
    """Grad-CAM target layers: one per network (an Ensemble's maps are averaged over its members)."""
    from lungcad.models.ensemble import Ensemble

    members = list(model.members) if isinstance(model, Ensemble) else [model]
    return [_get(m, _spec(m).cam_layer) for m in members]


def num_outputs(task: str, num_classes: int) -> int:
    """Binary (malignant vs. not) uses one logit with a sigmoid; multiclass one logit per class."""
    return 1 if task == "binary" else num_classes


def create_model(
    arch: str = "resnet50",
    *,
    outputs: int,
    pretrained: str = "none",
    weights_file: str | Path | None = None,
) -> tuple[nn.Module, dict]:
    """Build `arch` with a fresh `outputs`-way head; returns (model, init record).

    pretrained: "imagenet" (torchvision weights API: cached download, hash checked on download),
    "file" (a local torchvision state dict, `.pth` or `.safetensors`, for air-gapped sites) or
    "none" (random initialisation). Never falls back silently: unavailable weights raise.
    The init record (what the backbone started from, with sha256) goes into the model contract.
    """
    if arch not in ARCHITECTURES:
        raise LungcadError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    builder, imagenet = ARCHITECTURES[arch]
    model = builder(weights=None)  # ImageNet-shaped (1000-way head) so ImageNet state dicts load as-is
    if weights_file is not None:
        pretrained = "file"
    if pretrained == "imagenet":
        state = _imagenet_state_dict(arch, imagenet)
        init = {"pretrained": "imagenet", "weights": str(imagenet), "url": imagenet.url}
    elif pretrained == "file":
        if weights_file is None:
            raise LungcadError("--pretrained file needs --weights FILE")
        state = read_state_dict(weights_file)
        init = {"pretrained": "file", "weights": str(weights_file), "sha256": sha256_file(weights_file)}
    elif pretrained == "none":
        state, init = None, {"pretrained": "none"}
    else:
        raise LungcadError(f"unknown --pretrained {pretrained!r} (imagenet, none, or --weights FILE)")
    if state is not None:
        _load_backbone(model, state, source=init.get("weights", arch), arch=arch)
    head = _spec(model).classifier
    setattr(model, head, nn.Linear(getattr(model, head).in_features, outputs))
    return model, init


def _imagenet_state_dict(arch: str, weights: tvm.WeightsEnum) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, OSError, HTTPError, hash mismatch: all mean "not available"
        raise LungcadError(
            f"cannot obtain ImageNet weights for {arch} from {weights.url} ({first_line(exc)}); "
            "pass --weights FILE with a local copy of the torchvision weights, "
            "or --pretrained none to train from random initialisation"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise LungcadError("weights file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LungcadError(f"unreadable weights file ({first_line(exc)})", path) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LungcadError("weights file does not hold a state dict of tensors", path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str, arch: str) -> None:
    """Load everything but the classifier head; any other mismatch means the wrong architecture."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(k for k in own if k not in state and not k.startswith("fc."))
    unexpected = sorted(k for k in state if k not in own)
    wrong_shape = sorted(k for k in state if k in own and state[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        detail = (
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape keys"
            f" (e.g. {(missing + unexpected + wrong_shape)[0]!r})"
        )
        raise LungcadError(f"weights do not fit {arch}: {detail}", source)
    model.load_state_dict(state, strict=False)


def configure_finetuning(model: nn.Module, strategy: str) -> list[nn.Parameter]:
    """Freeze all but the parts `strategy` trains; returns the trainable parameters.

    fc: only the new head; layer4: the last residual stage and the head; all: everything.
    """
    if strategy not in FINETUNE_STRATEGIES:
        raise LungcadError(f"unknown --finetune {strategy!r} (choose {', '.join(FINETUNE_STRATEGIES)})")
    trainable = _spec(model).finetune_prefixes[strategy]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
        if p.requires_grad:
            params.append(p)
    return params


def set_train_mode(model: nn.Module, training: bool = True) -> None:
    """model.train(), but BatchNorm layers whose parameters are frozen stay in eval mode.

    Frozen stages must keep their (pretrained) running statistics; updating them from small
    batches of CT slices would silently shift the features the trainable layers rely on.
    """
    model.train(training)
    if training:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()


def target_index(label: str, classes: list[str], task: str, source: str | Path | None = None) -> int:
    """The output column a true label is scored against: binary -> 1 for malignant, 0 otherwise;
    multiclass -> the label's class column (a label the model does not know is an error)."""
    if task == "binary":
        return int(label == "malignant")
    if label not in classes:
        raise LungcadError(
            f"label {label!r} is not one of the model's classes ({', '.join(classes)}); use --label-map", source)
    return classes.index(label)


def logits_to_probs(logits: torch.Tensor, task: str, temperature: float = 1.0) -> torch.Tensor:
    """Model outputs -> class probabilities (N, C); binary gives [p(not malignant), p(malignant)]."""
    logits = logits / temperature
    if task == "binary":
        p = torch.sigmoid(logits.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)
