"""Inference engines: one interface over eager PyTorch (here) and exported runtimes (ONNX, OpenVINO).

An engine takes a normalised float32 batch (N, 3, S, S) and returns the raw logits and the pooled
penultimate features (N, 2048); calibration, thresholds and out-of-distribution scoring happen
above it, from the model contract, so every engine is used identically. `make_engine`
(`lungcad.inference.engine_factory`) picks one for a run and exports the model on demand.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from lungcad.errors import LungcadError, first_line
from lungcad.models.factory import split_head

__all__ = ["ENGINE_KINDS", "Engine", "OnnxEngine", "OpenVinoEngine", "TorchEngine", "default_threads"]

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
        from lungcad.models.bn_folding import fuse_conv_bn

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
            raise LungcadError(f"cannot load ONNX model ({first_line(exc)})", path) from None
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
            raise LungcadError(f"cannot load OpenVINO model ({first_line(exc)})", path) from None
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
