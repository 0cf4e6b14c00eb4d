"""`make_engine`: the engine a run asks for, exporting the model for ONNX Runtime / OpenVINO on demand.

Apart from `lungcad.inference.engines` (the runtimes) and `lungcad.inference.export` (the
exporters, which run their parity and INT8 checks on those runtimes), so that both are plain
imports of this module and neither has to import the other lazily.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lungcad.errors import LungcadError
from lungcad.inference import export as ex
from lungcad.inference.engines import ENGINE_KINDS, Engine, OnnxEngine, OpenVinoEngine, TorchEngine
from lungcad.models.contract import ModelContract, load_model, read_contract

__all__ = ["make_engine"]

log = logging.getLogger(__name__)


def make_engine(
    kind: str,
    run_dir: str | Path,
    model: nn.Module | None = None,
    contract: ModelContract | None = None,
    *,
    int8: bool = False,
    path: str | Path | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> Engine:
    """An engine of `kind` (torch | onnx | openvino, or onnx-int8 / openvino-int8) for a run.

    torch uses `model` (loaded from `run_dir` if not given). onnx / openvino use the exported
    model at `path` (a .onnx / .xml file or a folder) or the run's cache RUNDIR/export/; a missing
    export, or one made from other weights than the run's, is (re)built there first. An explicit
    `path` is never overwritten: if it does not match the run's weights that is an error.
    """
    if kind not in ENGINE_KINDS:
        raise LungcadError(f"unknown engine {kind!r} (choose {', '.join(ENGINE_KINDS)})")
    if kind.endswith("-int8"):
        kind, int8 = kind.removesuffix("-int8"), True
    run_dir = Path(run_dir)
    if kind == "torch":
        if int8:
            raise LungcadError("INT8 needs the onnx or openvino engine")
        if model is None:
            model, contract = load_model(run_dir)
        if threads:
            torch.set_num_threads(threads)
        return TorchEngine(model)
    if contract is None:
        contract = read_contract(run_dir)
    explicit = path is not None
    target = Path(path) if explicit else ex.default_export_path(run_dir, kind, int8)
    if explicit and (target.is_dir() or target.suffix == ""):
        target = target / ex.default_export_path(run_dir, kind, int8).name
    if not _export_is_current(target, contract, int8):
        if explicit and target.exists():
            raise LungcadError("exported model was made from other weights or precision than this run's model", target)
        log.info("exporting %s model for the %s engine (one-off, cached in %s)", "INT8" if int8 else "fp32",
                 kind, target.parent)
        onnx_cache = ex.default_export_path(run_dir, "onnx", int8)
        if kind == "openvino" and _export_is_current(onnx_cache, contract, int8):
            ex.onnx_to_openvino(onnx_cache, target)  # same graph (and INT8 calibration): convert only
        else:
            if model is None:
                model, contract = load_model(run_dir)
            ex.export_model(run_dir, kind, target, int8=int8, model=model, contract=contract, progress=progress)
    if kind == "onnx":
        return OnnxEngine(target, threads)
    return OpenVinoEngine(target, threads, int8=int8)


def _export_is_current(target: Path, contract: ModelContract, int8: bool) -> bool:
    """Does `target` exist, complete, exported from the weights this contract describes?"""
    if not target.is_file() or not ex.contract_path_for(target).is_file():
        return False
    try:
        _, info = ex.read_exported_contract(target)
    except LungcadError as exc:
        log.warning("ignoring unusable export: %s", exc)
        return False
    return info.get("source_model_sha256") == contract.model_sha256 and info.get("precision") == (
        "int8" if int8 else "fp32")
