"""The model contract: everything inference needs to use a model exactly as it was trained.

A run folder holds `model.safetensors` (weights only: loading never unpickles) beside
`model.json` (this contract). `predict`, the web app and `evaluate` read preprocessing, classes,
calibration and thresholds from here; they never re-declare them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lungcad.data.transforms import Preprocessing
from lungcad.errors import LungcadError, first_line
from lungcad.models.factory import create_model, num_outputs
from lungcad.utils import atomic_path, atomic_write_json, sha256_file

__all__ = [
    "CONTRACT_FILE", "CONTRACT_VERSION", "MODEL_FILE", "ModelContract", "canonical_safetensors", "ensemble_members",
    "ensemble_sha256", "load_model",
    "parse_contract_file", "read_contract", "save_model",
]

CONTRACT_VERSION = 2  # 2: `fusion` (a lungcad that ignored it would decide on the network alone)
MODEL_FILE = "model.safetensors"
CONTRACT_FILE = "model.json"


@dataclass
class ModelContract:
    arch: str
    task: str  # "multiclass" or "binary"
    classes: list[str]  # output classes in probability-column order
    preprocessing: Preprocessing
    temperature: float = 1.0  # calibration: logits are divided by this before softmax/sigmoid
    thresholds: dict = field(default_factory=lambda: {"malignant": 0.5})  # decision threshold(s)
    init: dict = field(default_factory=dict)  # what the backbone started from (+ sha256)
    training: dict = field(default_factory=dict)  # data fingerprint, split, strategy, seed, epochs
    metrics: dict = field(default_factory=dict)  # headline test-split metrics
    versions: dict = field(default_factory=dict)
    ood: dict = field(default_factory=dict)  # out-of-distribution detector parameters (if fitted)
    # intensity profile of the training images (lungcad.inference.appearance; empty before it existed)
    appearance: dict = field(default_factory=dict)
    # fold ensemble (`lungcad train --folds K`): {"members": [{"path", "model_sha256"}, ...],
    # "member_temperature": T}; empty for a single network. See lungcad.models.ensemble.
    ensemble: dict = field(default_factory=dict)
    # a texture head fused with the network (`train --folds K --fusion texture`; lungcad.models.fusion);
    # empty: the network alone
    fusion: dict = field(default_factory=dict)
    model_sha256: str = ""
    format_version: int = CONTRACT_VERSION

    @property
    def outputs(self) -> int:
        return num_outputs(self.task, len(self.classes))

    def decision_threshold(self) -> float | None:
        """The malignant threshold of the decision rule (`lungcad.evaluation.metrics.predict_labels`).

        Binary: the stored threshold (0.5 unless one was fitted). Multiclass: the operating point
        when one was fitted (on validation, or on the pooled out-of-fold predictions of an
        ensemble), otherwise None, i.e. argmax: the 0.5 in `thresholds` is then a placeholder that
        no one fitted and no one applies.
        """
        if self.task == "binary":
            return float(self.thresholds.get("malignant", 0.5))
        if "operating_point" not in self.training:
            return None
        return float(self.thresholds.get("malignant", 0.5))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelContract:
        d = dict(d)
        d["preprocessing"] = Preprocessing.from_dict(d.get("preprocessing", {}))
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def canonical_safetensors(blob: bytes) -> tuple[bytes, memoryview]:
    """(header, tensor data) of the same safetensors file, its header metadata in sorted key order.

    safetensors serialises `metadata` from a Rust HashMap, whose order changes from one process to
    the next: the same weights would get a different sha256 (`model_sha256`) on every save.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta is not None:
        header = {"__metadata__": dict(sorted(meta.items())), **header}  # tensors keep their (sorted) order
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(text).to_bytes(8, "little") + text, memoryview(blob)[8 + n :]


def save_model(run_dir: str | Path, model: nn.Module, contract: ModelContract) -> None:
    """Write model.safetensors then model.json (with the weights' sha256), each atomically.

    The same weights always give the same bytes, hence the same sha256 (see canonical_safetensors).
    """
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    blob = safetensors_bytes(state, metadata={"arch": contract.arch, "task": contract.task})
    header, data = canonical_safetensors(blob)
    with atomic_path(run_dir / MODEL_FILE) as tmp, open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(data)
    contract.model_sha256 = sha256_file(run_dir / MODEL_FILE)
    atomic_write_json(run_dir / CONTRACT_FILE, contract.to_dict())


def parse_contract_file(path: Path, what: str = "model contract") -> tuple[ModelContract, dict]:
    """(contract, the file's raw JSON) from a contract file, refusing corrupt or too-new ones."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        contract = ModelContract.from_dict(data)
    except (OSError, ValueError, TypeError) as exc:
        raise LungcadError(f"corrupt {what} ({exc})", path) from None
    if contract.format_version > CONTRACT_VERSION:
        raise LungcadError(
            f"{what} version {contract.format_version} is newer than this lungcad understands", path
        )
    return contract, data


def read_contract(run_dir: str | Path) -> ModelContract:
    path = Path(run_dir) / CONTRACT_FILE
    if not Path(run_dir).is_dir():
        raise LungcadError("run folder not found", run_dir)
    if not path.is_file():
        raise LungcadError(f"no {CONTRACT_FILE} in the run folder (training not finished?)", run_dir)
    return parse_contract_file(path)[0]


def load_model(run_dir: str | Path, verify: bool = True) -> tuple[nn.Module, ModelContract]:
    """Load (model in eval mode, contract) from a run folder; checks the weights' sha256.

    A fold ensemble's run folder loads its members from their subfolders (each checked against
    the sha256 its own contract and the ensemble's contract record) into one `Ensemble`.
    """
    run_dir = Path(run_dir)
    contract = read_contract(run_dir)
    if contract.ensemble:
        return _load_ensemble(run_dir, contract, verify), contract
    weights = run_dir / MODEL_FILE
    if not weights.is_file():
        raise LungcadError(f"no {MODEL_FILE} in the run folder", run_dir)
    if verify and contract.model_sha256 and sha256_file(weights) != contract.model_sha256:
        raise LungcadError("weights do not match the sha256 recorded in model.json", weights)
    model, _ = create_model(contract.arch, outputs=contract.outputs, pretrained="none")
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:
        raise LungcadError(f"cannot load weights ({first_line(exc)})", weights) from None
    model.eval()
    return model, contract


def ensemble_members(run_dir: Path, contract: ModelContract, verify: bool = True) -> list[tuple[Path, ModelContract]]:
    """(folder, contract) of each member of a fold ensemble, checked against the ensemble's contract
    (task, classes and, with `verify`, the sha256 it records) without loading any weights."""
    members = []
    for entry in contract.ensemble.get("members", []):
        member_dir = run_dir / entry["path"]
        member = read_contract(member_dir)
        if verify and entry.get("model_sha256") and member.model_sha256 != entry["model_sha256"]:
            raise LungcadError("ensemble member does not match the sha256 in the ensemble's model.json", member_dir)
        if member.classes != contract.classes or member.task != contract.task:
            raise LungcadError(f"ensemble member predicts {member.task} {member.classes}, not {contract.task} "
                               f"{contract.classes}", member_dir)
        members.append((member_dir, member))
    if not members:
        raise LungcadError("ensemble model.json lists no members", run_dir / CONTRACT_FILE)
    return members


def _load_ensemble(run_dir: Path, contract: ModelContract, verify: bool) -> nn.Module:
    from lungcad.models.ensemble import Ensemble

    members = [load_model(member_dir, verify)[0] for member_dir, _ in ensemble_members(run_dir, contract, verify)]
    return Ensemble(members, contract.task, contract.ensemble.get("member_temperature", 1.0)).eval()


def ensemble_sha256(member_shas: list[str]) -> str:
    """The identity of an ensemble: the sha256 of its members' weight hashes, in order."""
    import hashlib

    return hashlib.sha256("\n".join(member_shas).encode()).hexdigest()
