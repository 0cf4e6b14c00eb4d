"""`lungcad export`: a run's model as ONNX or OpenVINO IR, optionally INT8, with its contract.

The exported graph takes the *normalised* float32 batch (N, 3, S, S) that `transforms.normalise`
produces and returns three outputs:

    logits (N, K)          raw head outputs (what every `Engine` returns)
    features (N, 2048)     pooled penultimate features (the out-of-distribution detector's space)
    probabilities (N, C)   calibrated: temperature applied, softmax / sigmoid, as `logits_to_probs`

A `--fusion texture` model's texture head is not in the graph (its features are computed from the
prepared uint8 image with scikit-image): its parameters travel in the contract's `fusion`, and
lungcad's engines fuse after the graph (`lungcad.models.fusion.contract_probs`). A consumer of the
graph alone gets the network's part of the probabilities.

Preprocessing, classes, thresholds and OOD parameters travel in the exported contract, a JSON
file beside the model (`<model file name>.json`): the run's model.json plus an `export` section
(format, precision, file sha256, source weights sha256 and, for INT8, the calibration set and
the accuracy change measured on the run's test split). Nothing re-declares preprocessing.

INT8 is ONNX Runtime post-training static quantisation (QDQ, per-channel int8 weights, uint8
activations, MinMax calibration on training images). OpenVINO reads the same QDQ graph and runs
it in INT8, so both runtimes share one quantised model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lungcad.errors import LungcadError, first_line
from lungcad.inference.engines import OnnxEngine, TorchEngine
from lungcad.inference.forward import cache_batches, run_engine
from lungcad.models.contract import ModelContract, load_model, parse_contract_file
from lungcad.models.factory import logits_to_probs, split_head
from lungcad.models.fusion import contract_probs
from lungcad.run import RunFolder
from lungcad.utils import atomic_path, atomic_write_json, sha256_file

__all__ = [
    "EXPORT_DIR", "FORMATS", "ExportResult", "contract_path_for", "default_export_path", "export_model",
    "onnx_to_openvino", "read_exported_contract",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino")
EXPORT_DIR = "export"  # default cache of exported models inside a run folder
CONTRACT_SUFFIX = ".json"  # model-int8.onnx -> model-int8.onnx.json (never clashes with the run's model.json)
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features", "probabilities")
OPSET = 17  # well supported by onnxruntime, OpenVINO and the quantisation tools
CALIBRATION_IMAGES = 128  # ORT's docs suggest ~100 representative inputs for MinMax calibration
CALIBRATION_BATCH = 8
# Only the convolution trunk is quantised: the head, pooling and softmax stay fp32 so features
# (used for OOD scores) and probabilities keep full precision at no measurable cost in speed.
INT8_OP_TYPES = ["Conv", "Add", "MaxPool"]
FP32_PARITY_TOLERANCE = 1e-3  # export refuses a graph whose probabilities drift more than this


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the .onnx or .xml file
    contract_path: Path
    contract: dict


class _ExportWrapper(nn.Module):
    """ResNet -> (logits, pooled features, calibrated probabilities) in one graph."""

    def __init__(self, model: nn.Module, task: str, temperature: float):
        super().__init__()
        self.backbone, self.head = split_head(model)
        self.task, self.temperature = task, float(temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        logits = self.head(features)
        return logits, features, logits_to_probs(logits, self.task, self.temperature)


def contract_path_for(model_path: str | Path) -> Path:
    """model-int8.onnx -> model-int8.onnx.json beside it (an .onnx and an .xml may share a folder)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + CONTRACT_SUFFIX)


def default_export_path(run_dir: str | Path, fmt: str, int8: bool = False) -> Path:
    """Where `make_engine` caches an export of a run: RUNDIR/export/model-{fp32,int8}.{onnx,xml}."""
    suffix = {"onnx": ".onnx", "openvino": ".xml"}[fmt]
    return Path(run_dir) / EXPORT_DIR / f"model-{'int8' if int8 else 'fp32'}{suffix}"


def read_exported_contract(model_path: str | Path, verify: bool = True) -> tuple[ModelContract, dict]:
    """(ModelContract, export section) of an exported model; checks the file's sha256."""
    model_path = Path(model_path)
    cpath = contract_path_for(model_path)
    if not model_path.is_file():
        raise LungcadError("exported model not found", model_path)
    if not cpath.is_file():
        raise LungcadError(f"no {cpath.name} beside the exported model (export incomplete?)", model_path)
    contract, data = parse_contract_file(cpath, what="exported contract")
    if not isinstance(data.get("export"), dict):
        raise LungcadError("corrupt exported contract (no 'export' section)", cpath)
    info = dict(data["export"])
    if verify and info.get("sha256") and sha256_file(model_path) != info["sha256"]:
        raise LungcadError("exported model does not match the sha256 in its contract", model_path)
    return contract, info


def export_model(
    run_dir: str | Path,
    fmt: str = "onnx",
    out: str | Path | None = None,
    int8: bool = False,
    model: nn.Module | None = None,
    contract: ModelContract | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    progress: bool = True,
) -> ExportResult:
    """Export a run's model (loaded from `run_dir` unless given) to ONNX or OpenVINO IR.

    `out` is the model file (.onnx / .xml) or a folder; default RUNDIR/export/. INT8 needs the
    run's split.csv and data folder: calibration uses training images, and the accuracy change
    is measured on the test split and written into the exported contract.
    """
    if fmt not in FORMATS:
        raise LungcadError(f"unknown export format {fmt!r} (choose {', '.join(FORMATS)})")
    run_dir = Path(run_dir)
    if model is None or contract is None:
        model, contract = load_model(run_dir)
    out_path = _resolve_out(run_dir, fmt, out, int8)
    if int8:  # find the images first: fail before minutes of work, not after
        calib_paths = _spread(_split_paths(run_dir, "train")[0], calibration_images)
        _split_paths(run_dir, "test")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_path.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        onnx_fp32 = tmp / "fp32.onnx"
        _export_onnx(model, contract, onnx_fp32)
        parity = _check_fp32_parity(model, contract, onnx_fp32)
        section: dict = {
            "format": fmt,
            "precision": "int8" if int8 else "fp32",
            "input": {"name": INPUT_NAME, "shape": ["batch", 3, contract.preprocessing.image_size,
                                                    contract.preprocessing.image_size],
                      "dtype": "float32", "layout": "NCHW", "expects": "transforms.normalise output"},
            "outputs": list(OUTPUT_NAMES),
            "opset": OPSET,
            "source_model_sha256": contract.model_sha256,
            "fp32_parity_max_abs_prob_diff": parity,
            "versions": _versions(fmt),
        }
        onnx_final = onnx_fp32
        if int8:
            onnx_final = tmp / "int8.onnx"
            _quantise(onnx_fp32, onnx_final, calib_paths, contract, progress)
            section["int8"] = {
                "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax; "
                          "stem convolution kept fp32",
                "quantised_ops": INT8_OP_TYPES,
                "calibration": {"subset": "train", "images": len(calib_paths),
                                "files": [str(p) for p in calib_paths]},
                **_measure_int8(run_dir, model, contract, onnx_final, progress),
            }
        if fmt == "onnx":
            _replace(onnx_final, out_path)
        else:
            _to_openvino(onnx_final, out_path, tmp)
    section["sha256"] = sha256_file(out_path)
    section["file"] = out_path.name
    section["seconds"] = round(time.perf_counter() - started, 1)
    data = {**contract.to_dict(), "export": section}
    cpath = contract_path_for(out_path)
    atomic_write_json(cpath, data)  # written last: a contract means a complete export
    log.info("exported %s %s model to %s", fmt, section["precision"], out_path)
    return ExportResult(out_path, cpath, data)


def onnx_to_openvino(onnx_path: str | Path, xml_path: str | Path) -> ExportResult:
    """Convert an existing lungcad ONNX export (fp32 or INT8) to OpenVINO IR, contract carried over.

    INT8 keeps the calibration and the accuracy measured for the ONNX graph: OpenVINO executes
    the same quantise/dequantise points, so it is the same quantised model.
    """
    import openvino

    onnx_path, xml_path = Path(onnx_path), Path(xml_path)
    contract, info = read_exported_contract(onnx_path)
    if info.get("format") != "onnx":
        raise LungcadError("not an ONNX export", onnx_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=xml_path.parent) as tmp_dir:
        _to_openvino(onnx_path, xml_path, Path(tmp_dir))
    section = {**info, "format": "openvino", "file": xml_path.name, "sha256": sha256_file(xml_path),
               "converted_from": {"file": onnx_path.name, "sha256": info.get("sha256")},
               "versions": {**info.get("versions", {}), "openvino": openvino.__version__}}
    data = {**contract.to_dict(), "export": section}
    cpath = contract_path_for(xml_path)
    atomic_write_json(cpath, data)
    return ExportResult(xml_path, cpath, data)


def _resolve_out(run_dir: Path, fmt: str, out: str | Path | None, int8: bool) -> Path:
    if out is None:
        return default_export_path(run_dir, fmt, int8)
    out = Path(out)
    suffix = {"onnx": ".onnx", "openvino": ".xml"}[fmt]
    if out.is_dir() or out.suffix == "":
        return out / default_export_path(run_dir, fmt, int8).name
    if out.suffix != suffix:
        raise LungcadError(f"--format {fmt} writes a {suffix} file", out)
    return out


def _versions(fmt: str) -> dict:
    import onnx
    import onnxruntime

    import lungcad

    v = {"lungcad": lungcad.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__}
    if fmt == "openvino":
        import openvino

        v["openvino"] = openvino.__version__
    return v


def _export_onnx(model: nn.Module, contract: ModelContract, path: Path) -> None:
    size = contract.preprocessing.image_size
    wrapper = _ExportWrapper(model.eval().to(memory_format=torch.contiguous_format), contract.task,
                             contract.temperature).eval()
    example = torch.zeros(1, 3, size, size)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    # The TorchScript exporter (dynamo=False): a plain static CNN needs nothing from the dynamo
    # path, and this one needs no onnxscript and gives a graph that folds BatchNorm into Conv.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, opset_version=OPSET,
                do_constant_folding=True,
            )
        except Exception as exc:  # exporter errors are long; keep the first line
            raise LungcadError(f"ONNX export failed ({first_line(exc)})") from None


def _check_fp32_parity(model: nn.Module, contract: ModelContract, onnx_path: Path) -> float:
    """Max |p_onnx - p_torch| on a few random inputs; refuses a graph that does not match."""
    size = contract.preprocessing.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = logits_to_probs(model(x), contract.task, contract.temperature).numpy()
    logits, _ = OnnxEngine(onnx_path).run(x.numpy())
    got = logits_to_probs(torch.from_numpy(logits), contract.task, contract.temperature).numpy()
    diff = float(np.abs(got - expected).max())
    if diff > FP32_PARITY_TOLERANCE:
        raise LungcadError(f"exported ONNX graph disagrees with PyTorch (max probability difference {diff:.2e})")
    return diff


def _split_paths(run_dir: Path, subset: str) -> tuple[list[Path], list[str]]:
    """(paths, labels) of one subset of the run's split.csv, resolved as `lungcad evaluate` does.

    A fold ensemble has no test split of its own (every development image trained 4 of 5 members):
    "test" is then every development image, which measures quantisation drift, not accuracy on new
    patients (`_measure_int8` says so in the exported contract).
    """
    run = RunFolder(run_dir)
    try:
        rows = run.split() if (subset == "test" and run.is_ensemble) else run.split(subset)
    except LungcadError as exc:
        raise LungcadError(f"INT8 export needs the run's config.json and split.csv ({exc})", run_dir) from None
    rows = [r for r in rows if r.path.is_file()]
    if not rows:
        raise LungcadError(f"no {subset} images of split.csv found under the data folder {run.data_root}", run_dir)
    return [r.path for r in rows], [r.label for r in rows]


def _spread(paths: Sequence[Path], n: int) -> list[Path]:
    """Up to n paths evenly spaced over the (class-sorted) list: every class and patient range shows."""
    if len(paths) <= n:
        return list(paths)
    idx = np.linspace(0, len(paths) - 1, n).round().astype(int)
    return [paths[i] for i in idx]


def _normalised_batches(paths: Sequence[Path], contract: ModelContract, progress: bool,
                        desc: str) -> Iterator[np.ndarray]:
    """Decode with the shared preprocessing path and yield normalised float32 batches."""
    from lungcad.data.dataset import load_readable

    cache, _, _ = load_readable(paths, contract.preprocessing, progress=progress, desc=desc)
    # ORT runs the instrumented graph batch by batch as it pulls them: this bar is calibration's
    for x in cache_batches(cache, contract.preprocessing, CALIBRATION_BATCH, progress, desc="calibrating"):
        yield x.numpy()


def _quantise(src: Path, dst: Path, calib_paths: list[Path], contract: ModelContract, progress: bool) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _normalised_batches(calib_paths, contract, progress, "calibration images")

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepped = src.with_name("fp32-prepped.onnx")
    # Shape inference + graph optimisation first, as ORT's quantisation guide recommends.
    quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
    log.info("calibrating INT8 on %d training images", len(calib_paths))
    # The stem convolution stays fp32: it sees the raw normalised pixels, whose range on CT is
    # dominated by black background, so 8-bit input steps lose the tissue contrast. Measured on the
    # main job's test split: all convs INT8 -4.8 pp accuracy (93.7 % label agreement), stem kept
    # fp32 +0.8 pp (97.6 %), for ~3 % of the FLOPs left in fp32.
    import onnx

    stem = next(n.name for n in onnx.load(str(prepped)).graph.node if n.op_type == "Conv")
    with _quiet_logging():
        quantize_static(
            str(prepped), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            op_types_to_quantize=INT8_OP_TYPES, calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True}, nodes_to_exclude=[stem],
        )


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """ORT's quantiser logs every node at INFO through the root logger; keep that out of the CLI."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def _measure_int8(run_dir: Path, model: nn.Module, contract: ModelContract, int8_path: Path,
                  progress: bool) -> dict:
    """Accuracy of fp32 (PyTorch) and INT8 (ONNX Runtime) on the run's test split."""
    from lungcad.data.dataset import load_readable
    from lungcad.evaluation.metrics import classification_metrics, predict_labels
    from lungcad.models.factory import target_index

    paths, labels = _split_paths(run_dir, "test")

    cache, keep, _ = load_readable(paths, contract.preprocessing, progress=progress, desc="test images")
    targets = [target_index(labels[i], contract.classes, contract.task, run_dir / "split.csv") for i in keep]
    engines = {"fp32": TorchEngine(model), "int8": OnnxEngine(int8_path)}
    probs = {}
    for name, engine in engines.items():
        logits, _ = run_engine(engine, cache, contract.preprocessing, 16, progress, desc=f"test split {name}")
        probs[name] = contract_probs(logits, cache, contract)
    threshold = contract.decision_threshold()  # the one decision rule, as `evaluate` and `predict` use it
    metrics = {k: classification_metrics(targets, p, contract.classes, contract.task, threshold)
               for k, p in probs.items()}
    diff = np.abs(probs["int8"] - probs["fp32"])
    labels_fp32, labels_int8 = (predict_labels(probs[k], contract.task, threshold, contract.classes)
                                for k in ("fp32", "int8"))
    agree = labels_int8 == labels_fp32
    result = {
        "test_split": {
            "images": len(targets),
            "accuracy_fp32": metrics["fp32"]["accuracy"],
            "accuracy_int8": metrics["int8"]["accuracy"],
            # percentage points, int8 minus fp32: negative means INT8 lost accuracy
            "accuracy_change_pp": round(100 * (metrics["int8"]["accuracy"] - metrics["fp32"]["accuracy"]), 3),
            "macro_f1_fp32": metrics["fp32"]["macro_f1"],
            "macro_f1_int8": metrics["int8"]["macro_f1"],
            "label_agreement": float(agree.mean()),
            "max_abs_prob_diff": float(diff.max()),
            "mean_abs_prob_diff": float(diff.mean()),
            **({"note": "a fold ensemble has no test split: measured on every development image, which the "
                        "members trained on; this is quantisation drift, not accuracy on new patients"}
               if RunFolder(run_dir).is_ensemble else {}),
        }
    }
    log.info("INT8 on the test split: accuracy %.3f -> %.3f (%+.2f pp), labels agree on %.1f%%",
             metrics["fp32"]["accuracy"], metrics["int8"]["accuracy"],
             result["test_split"]["accuracy_change_pp"], 100 * agree.mean())
    return result


def _to_openvino(onnx_path: Path, xml_path: Path, tmp: Path) -> None:
    import openvino as ov

    try:
        ov_model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise LungcadError(f"OpenVINO conversion failed ({first_line(exc)})") from None
    tmp_xml = tmp / "model.xml"
    # fp16 weight compression is OpenVINO's default; keep fp32 so parity with PyTorch holds
    ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
    _replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
    _replace(tmp_xml, xml_path)


def _replace(src: Path, dst: Path) -> None:
    """Move a finished file into place atomically (same folder, so os.replace is a rename)."""
    with atomic_path(dst) as target:
        os.replace(src, target)
