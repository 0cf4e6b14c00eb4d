"""Export and CPU engines: ONNX Runtime / OpenVINO agree with PyTorch; INT8 within its budget."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

from conftest import make_dataset  # noqa: E402

from lungcad.cli import main  # noqa: E402
from lungcad.data.images import decode_image  # noqa: E402
from lungcad.data.transforms import Preprocessing, normalise, prepare  # noqa: E402
from lungcad.errors import LungcadError  # noqa: E402
from lungcad.inference.engine_factory import make_engine  # noqa: E402
from lungcad.inference.engines import OnnxEngine, OpenVinoEngine, TorchEngine  # noqa: E402
from lungcad.inference.export import contract_path_for, default_export_path, export_model, read_exported_contract  # noqa: E402
from lungcad.models.contract import ModelContract, load_model, save_model  # noqa: E402
from lungcad.models.factory import create_model, logits_to_probs  # noqa: E402

# every test exports an ONNX / OpenVINO model or needs the module's fitted run (~25 s to build)
pytestmark = pytest.mark.slow

SIZE = 64
FP32_TOL = 1e-4  # issue 4: engines agree with torch on probabilities within 1e-4 in fp32
# INT8 budget: |p_int8 - p_torch| over the synthetic images, mean and max. Measured on this
# machine (AVX2): ONNX Runtime mean 0.009 / max 0.034, OpenVINO mean 0.012 / max 0.065; the
# budget leaves room for other CPUs' int8 kernels (VNNI / AMX round differently).
INT8_MEAN_TOL, INT8_MAX_TOL = 0.03, 0.15


def _write_run(root: Path, task: str = "multiclass", temperature: float = 1.0, seed: int = 0,
               warm: bool = True) -> Path:
    """A run folder like `lungcad train` leaves: model + contract + config.json + split.csv."""
    data = root / "data"
    if not data.exists():
        make_dataset(data, patients=5, slices=3, size=SIZE)
    run = root / f"run-{task}-{seed}"
    run.mkdir()
    pp = Preprocessing(image_size=SIZE)
    classes = ["not_malignant", "malignant"] if task == "binary" else ["normal", "benign", "malignant"]
    torch.manual_seed(seed)
    model, _ = create_model(outputs=1 if task == "binary" else 3)
    rows, images = [], []
    for path in sorted(data.rglob("*.png")):
        n = int(re.search(r"\((\d+)\)", path.name).group(1))
        patient = (n - 1) // 6  # make_dataset numbers 3 slices then leaves a gap of 3
        label = {"Normal": "normal", "Bengin": "benign", "Malignant": "malignant"}[path.name.split()[0]]
        subset = "train" if patient < 3 else ("val" if patient == 3 else "test")
        rows.append([path.relative_to(data).as_posix(), label, f"{label}-{patient}", subset])
        images.append(prepare(decode_image(path, "grey"), pp))
    # Random init leaves BatchNorm's running statistics at (0, 1), which makes activations grow
    # through 16 residual blocks; a few train-mode passes give it the statistics of real inputs,
    # like a trained network, so probabilities are not all saturated at 0/1.
    if warm:
        x = normalise(torch.stack(images), pp)
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(x)
        model.eval()
        # ...and a head fitted to the labels (ridge regression on the pooled features), so the
        # probabilities spread over 0..1 as a trained model's do: parity and the INT8 budget are
        # then measured where decisions are made, not on near-constant 1/3 outputs.
        with torch.no_grad():
            feats = torch.flatten(torch.nn.Sequential(*list(model.children())[:-1])(x), 1).double()
            y = torch.nn.functional.one_hot(torch.tensor([classes.index(r[1]) if task != "binary" else
                                                          int(r[1] == "malignant") for r in rows])).double()
            y = 6 * y - 3 if task != "binary" else 6 * y[:, 1:] - 3
            mu = feats.mean(0)
            fc = feats - mu
            gram = fc @ fc.T
            ridge = 0.1 * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype)
            alpha = torch.linalg.solve(gram + ridge, y)
            w = (fc.T @ alpha).T
            model.fc.weight.copy_(w.float())
            model.fc.bias.copy_((-(w @ mu)).float())
    model.eval()
    with open(run / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "group", "subset"])
        w.writerows(rows)
    (run / "config.json").write_text(json.dumps({"data": str(data)}))
    contract = ModelContract(arch="resnet50", task=task, classes=classes, preprocessing=pp,
                             temperature=temperature, thresholds={"malignant": 0.4},
                             ood={"method": "mahalanobis", "threshold": 12.5})
    save_model(run, model, contract)
    return run


def _copy_run(run: Path, dst: Path, split: bool = True) -> Path:
    """The run's model, contract and config (and split) without its export cache."""
    dst.mkdir()
    for name in ("model.safetensors", "model.json", "config.json") + (("split.csv",) if split else ()):
        shutil.copy(run / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def run_dir(module_tmp) -> Path:
    return _write_run(module_tmp("export"), temperature=1.5)


@pytest.fixture(scope="module")
def batch(run_dir: Path) -> np.ndarray:
    """Normalised test images of the synthetic dataset, as an engine gets them."""
    data = Path(json.loads((run_dir / "config.json").read_text())["data"])
    pp = Preprocessing(image_size=SIZE)
    paths = sorted(data.rglob("*.png"))[::3]
    return normalise(torch.stack([prepare(decode_image(p, "grey"), pp) for p in paths]), pp).numpy()


def _probs(engine, x: np.ndarray, contract: ModelContract) -> np.ndarray:
    logits, features = engine.run(x)
    assert features.shape == (len(x), 2048) and np.isfinite(features).all()
    return logits_to_probs(torch.from_numpy(logits), contract.task, contract.temperature).numpy()


@pytest.fixture(scope="module")
def torch_reference(run_dir: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model, contract = load_model(run_dir)
    logits, features = TorchEngine(model).run(batch)
    return logits_to_probs(torch.from_numpy(logits), contract.task, contract.temperature).numpy(), features


@pytest.mark.parametrize("kind", ["onnx", "openvino"])
def test_fp32_engines_match_torch(kind: str, run_dir: Path, batch: np.ndarray, torch_reference) -> None:
    model, contract = load_model(run_dir)
    engine = make_engine(kind, run_dir, model, contract)
    assert isinstance(engine, OnnxEngine if kind == "onnx" else OpenVinoEngine)
    probs = _probs(engine, batch, contract)
    ref_probs, ref_features = torch_reference
    assert probs.shape == (len(batch), 3)
    assert ref_probs.std(axis=0).max() > 1e-3, "reference probabilities are degenerate: parity would prove nothing"
    np.testing.assert_allclose(probs, ref_probs, atol=FP32_TOL, rtol=0)
    _, features = engine.run(batch)
    np.testing.assert_allclose(features, ref_features, atol=1e-3, rtol=1e-3)
    # cached in the run folder, with the contract beside it carrying everything inference needs
    exported = default_export_path(run_dir, kind)
    assert engine.path == exported and contract_path_for(exported).is_file()
    exported_contract, info = read_exported_contract(exported)
    assert exported_contract.preprocessing == contract.preprocessing
    assert exported_contract.temperature == 1.5 and exported_contract.thresholds == {"malignant": 0.4}
    assert exported_contract.ood == contract.ood and exported_contract.classes == contract.classes
    assert info["source_model_sha256"] == contract.model_sha256 and info["precision"] == "fp32"
    assert info["format"] == kind
    assert info["fp32_parity_max_abs_prob_diff"] <= FP32_TOL


def test_engine_batch_sizes_are_dynamic(run_dir: Path, batch: np.ndarray, torch_reference) -> None:
    contract = load_model(run_dir)[1]
    for kind in ("onnx", "openvino"):
        make_engine(kind, run_dir, contract=contract)
    exports = {p: p.stat().st_mtime_ns for p in (run_dir / "export").iterdir()}
    assert len(exports) == 5  # .onnx + .onnx.json, .xml + .bin + .xml.json
    for kind in ("onnx", "openvino"):
        engine = make_engine(kind, run_dir, contract=contract)  # cached: no model needed
        one = _probs(engine, batch[:1], contract)
        np.testing.assert_allclose(one, torch_reference[0][:1], atol=FP32_TOL, rtol=0)
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "export").iterdir()} == exports  # nothing re-exported


def test_exported_graph_outputs_calibrated_probabilities(tmp_path: Path) -> None:
    """The ONNX file alone gives the contract's calibrated probabilities (binary: sigmoid, 2 columns)."""
    import onnxruntime as ort

    run = _write_run(tmp_path, task="binary", temperature=2.0, warm=False)
    model, contract = load_model(run)
    result = export_model(run, "onnx", tmp_path / "binary.onnx", progress=False)
    x = torch.randn(3, 3, SIZE, SIZE)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    logits, features, probs = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = logits_to_probs(model(x), "binary", 2.0).numpy()
    assert logits.shape == (3, 1) and features.shape == (3, 2048) and probs.shape == (3, 2)
    np.testing.assert_allclose(probs, expected, atol=FP32_TOL, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_int8_export_measures_accuracy_and_stays_within_budget(run_dir: Path, batch: np.ndarray,
                                                               torch_reference) -> None:
    result = export_model(run_dir, "onnx", int8=True, progress=False)
    int8 = result.contract["export"]["int8"]
    n_train = sum(1 for line in (run_dir / "split.csv").read_text().splitlines() if line.endswith(",train"))
    n_test = sum(1 for line in (run_dir / "split.csv").read_text().splitlines() if line.endswith(",test"))
    assert int8["calibration"]["subset"] == "train" and int8["calibration"]["images"] == n_train
    assert all(",train" in _split_line(run_dir, f) for f in int8["calibration"]["files"])
    measured = int8["test_split"]
    assert measured["images"] == n_test
    assert measured["accuracy_change_pp"] == pytest.approx(
        100 * (measured["accuracy_int8"] - measured["accuracy_fp32"]), abs=1e-3)
    assert 0.0 <= measured["label_agreement"] <= 1.0
    # the INT8 graph really is quantised, and much smaller
    assert result.path.stat().st_size < 0.4 * default_export_path(run_dir, "onnx").stat().st_size
    contract = load_model(run_dir)[1]
    for kind in ("onnx-int8", "openvino-int8"):  # OpenVINO runs the same QDQ graph in INT8
        engine = make_engine(kind, run_dir, contract=contract)
        diff = np.abs(_probs(engine, batch, contract) - torch_reference[0])
        assert diff.mean() <= INT8_MEAN_TOL and diff.max() <= INT8_MAX_TOL, (kind, diff.mean(), diff.max())
        assert diff.max() > 0  # it is not silently the fp32 model


def _split_line(run_dir: Path, file: str) -> str:
    name = Path(file).name
    lines = (run_dir / "split.csv").read_text().splitlines()
    return next(line for line in lines if Path(line.split(",")[0]).name == name)


def test_stale_export_is_rebuilt_and_explicit_mismatch_refused(tmp_path: Path, run_dir: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "run")
    engine = make_engine("onnx", run)
    first = contract_path_for(engine.path).read_text()
    mtime = engine.path.stat().st_mtime_ns
    make_engine("onnx", run)  # cached: not exported again
    assert engine.path.stat().st_mtime_ns == mtime
    kept = tmp_path / "kept.onnx"
    shutil.copy(engine.path, kept)
    shutil.copy(contract_path_for(engine.path), contract_path_for(kept))
    assert make_engine("onnx", run, path=kept).path == kept  # a matching explicit export is used as is
    # new weights in the run folder: the cache is rebuilt, an explicitly given export is refused
    model, contract = load_model(run)
    torch.nn.init.normal_(model.fc.weight)
    save_model(run, model, contract)
    rebuilt = make_engine("onnx", run)
    assert json.loads(contract_path_for(rebuilt.path).read_text())["export"]["source_model_sha256"] != (
        json.loads(first)["export"]["source_model_sha256"])
    with pytest.raises(LungcadError, match="other weights"):
        make_engine("onnx", run, path=kept)


def test_tampered_export_is_detected(tmp_path: Path, run_dir: Path) -> None:
    path = tmp_path / "m.onnx"
    cached = default_export_path(run_dir, "onnx")
    make_engine("onnx", run_dir)  # exported once per module; copied, not re-exported
    shutil.copy(cached, path)
    shutil.copy(contract_path_for(cached), contract_path_for(path))
    read_exported_contract(path)  # intact copy: fine
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LungcadError, match="sha256"):
        read_exported_contract(path)


def test_int8_without_split_is_a_clear_error(tmp_path: Path, run_dir: Path) -> None:
    run = _copy_run(run_dir, tmp_path / "run", split=False)
    with pytest.raises(LungcadError, match="split.csv"):
        export_model(run, "onnx", tmp_path / "q.onnx", int8=True, progress=False)
    assert not (tmp_path / "q.onnx").exists() and not contract_path_for(tmp_path / "q.onnx").exists()


def test_cli_export(tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ov" / "model.xml"
    out.parent.mkdir()
    assert main(["export", str(run_dir), "--format", "openvino", "--out", str(out), "--no-progress"]) == 0
    assert out.is_file() and out.with_suffix(".bin").is_file() and contract_path_for(out).is_file()
    assert str(out) in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run folder not found" in err
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.xml")]) == 1
    assert "writes a .onnx file" in capsys.readouterr().err


def test_unknown_engine_is_a_clear_error(run_dir: Path) -> None:
    with pytest.raises(LungcadError, match="unknown engine"):
        make_engine("tensorrt", run_dir)
