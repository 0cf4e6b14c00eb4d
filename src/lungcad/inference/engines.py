"""Inference engines: one interface over eager PyTorch (here) and exported runtimes (ONNX, OpenVINO).

An engine takes a normalised float32 batch (N, 3, S, S) and returns the raw logits and the pooled
penultimate features (N, 2048); calibration, thresholds and out-of-distribution scoring happen
above it, from the model contract, so every engine is used identically.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from lungcad.errors import LungcadError
from lungcad.models.factory import split_head

if TYPE_CHECKING:
    from lungcad.models.contract import ModelContract

log = logging.getLogger(__name__)

ENGINE_KINDS = ("torch", "onnx", "openvino", "onnx-int8", "openvino-int8")


class Engine(Protocol):
    name: str

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, S, S) float32 -> (logits (N, K), features (N, F))."""
        ...


class TorchEngine:
    """Eager PyTorch on the CPU: channels_last (oneDNN's fast layout) and BatchNorm folded into the
    convolutions of a private copy (the caller's model, used for Grad-CAM, is left as it is)."""

    name = "torch"

    def __init__(self, model: nn.Module):
        from lungcad.models.fusion import fuse_conv_bn

        model = fuse_conv_bn(model).to(memory_format=torch.channels_last)
        self.backbone, self.head = split_head(model)

    @torch.inference_mode()
    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(batch, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        return self.head(features).float().numpy(), features.float().numpy()


def default_threads() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


class OnnxEngine:
    """ONNX Runtime on the CPU, for a graph exported by `lungcad.inference.export`."""

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise LungcadError("the onnx engine needs onnxruntime: pip install 'lungcad[export]'") from None
        opts = ort.SessionOptions()
        # One op at a time, each spread over all cores: on 2 cores inter-op parallelism only adds
        # contention; intra-op threads = cores is where ResNet-50's convolutions scale.
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise LungcadError(f"cannot load ONNX model ({_first_line(exc)})", path) from None
        self.path = Path(path)

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        logits, features = self.session.run(["logits", "features"], {"input": x})
        return logits, features


class OpenVinoEngine:
    """OpenVINO on the CPU, from an IR (.xml + .bin) or directly from an .onnx file."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None, int8: bool = False):
        try:
            import openvino as ov
        except ImportError:
            raise LungcadError("the openvino engine needs openvino: pip install 'lungcad[export]'") from None
        config = {
            # single stream, all cores on one request: the batch / single-image use of predict
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads or default_threads(),
        }
        if not int8:
            # OpenVINO may run fp32 graphs in bf16/fp16 on CPUs that support it; keep fp32 parity
            config["INFERENCE_PRECISION_HINT"] = "f32"
        try:
            core = ov.Core()
            self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as exc:
            raise LungcadError(f"cannot load OpenVINO model ({_first_line(exc)})", path) from None
        self.request = self.compiled.create_infer_request()
        self.outputs = {o.get_any_name(): o for o in self.compiled.outputs}
        self.lock = threading.Lock()  # one infer request: serialise callers (the web app is threaded)
        self.path = Path(path)

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(batch, dtype=np.float32))
        with self.lock:
            result = self.request.infer({0: x})
            return (np.array(result[self.outputs["logits"]], copy=True),
                    np.array(result[self.outputs["features"]], copy=True))


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
    from lungcad.inference import export as ex
    from lungcad.models.contract import load_model, read_contract

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
    from lungcad.inference import export as ex

    if not target.is_file() or not ex.contract_path_for(target).is_file():
        return False
    try:
        _, info = ex.read_exported_contract(target)
    except LungcadError as exc:
        log.warning("ignoring unusable export: %s", exc)
        return False
    return info.get("source_model_sha256") == contract.model_sha256 and info.get("precision") == (
        "int8" if int8 else "fp32")
