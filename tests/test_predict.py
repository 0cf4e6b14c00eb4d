"""Predictor and `lungcad predict`: formats by content, calibrated rows, per-file errors, series, CLI."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, synthetic_slice

from lungcad.cli import main
from lungcad.data.transforms import prepare
from lungcad.errors import LungcadError
from lungcad.inference.predictor import SERIES_TOP_K, Predictor
from lungcad.inference.results import Prediction


@pytest.fixture(scope="module")
def run_dir(untrained_run) -> Path:
    """conftest's shared prediction run (random init, OOD detector, temperature 1.5)."""
    return untrained_run


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor(run_dir)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _ct_png(seed: int = 1, label: str = "malignant") -> bytes:
    return _png(synthetic_slice(np.random.default_rng(seed), label, seed, 0))


def _dicom(uid_series: str, sop: str, shift: int = 0) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = ds.pixel_array.astype(np.int16) + shift
    ds.PixelData = arr.tobytes()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = uid_series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_prediction_row_is_calibrated_and_consistent(predictor, run_dir):
    pred = predictor.predict(_ct_png(), name="upload.png")
    assert isinstance(pred, Prediction) and pred.error == "" and pred.source == "upload.png"
    assert list(pred.probabilities) == CLASSES
    assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # calibrated: the contract's temperature (1.5) is applied to the model's logits
    x = prepare(predictor.load_pixels(_ct_png())[0], predictor.pp)
    from lungcad.data.transforms import normalise

    with torch.no_grad():
        logits = predictor.model(normalise(x, predictor.pp)[None])
    expected = torch.softmax(logits / 1.5, 1)[0].numpy()
    np.testing.assert_allclose([pred.probabilities[c] for c in CLASSES], expected, atol=1e-4)
    assert pred.malignant_probability == pred.probabilities["malignant"]
    # multiclass without a fitted operating point: argmax (the 0.5 in `thresholds` is a placeholder)
    assert pred.decision == ("malignant" if int(np.argmax(expected)) == 2 else "not malignant")
    assert (pred.label == "malignant") == (pred.decision == "malignant")
    assert pred.model_sha256 == predictor.contract.model_sha256 and len(pred.model_sha256) == 64
    assert pred.ood_score is not None and isinstance(pred.ood, bool)
    row = pred.to_row()
    assert set(row) <= set(predictor.columns) and row["p_malignant"] == pytest.approx(expected[2], abs=1e-4)


def test_operating_threshold_drives_label_and_decision(predictor, monkeypatch):
    p = predictor
    monkeypatch.setattr(p, "threshold", 0.0)
    low = p.predict(_ct_png())
    assert low.decision == "malignant" and low.label == "malignant"
    monkeypatch.setattr(p, "threshold", 1.01)
    high = p.predict(_ct_png())
    assert high.decision == "not malignant" and high.label in ("normal", "benign")
    assert high.probabilities[high.label] == max(high.probabilities["normal"], high.probabilities["benign"])


def test_image_variants_decode(predictor):
    grey = synthetic_slice(np.random.default_rng(3), "benign", 3, 0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 255, np.uint8)], axis=2)
    wide = (grey.astype(np.uint16) * 257)  # 16-bit PNG
    results = [predictor.predict(data) for data in (_png(grey), _png(rgb), _png(rgba), _png(wide))]
    assert all(r.error == "" for r in results)
    # the same picture as grey, RGB, RGBA or 16-bit gives the same prediction
    for r in results[1:]:
        assert r.probabilities == pytest.approx(results[0].probabilities, abs=2e-3)


def test_type_comes_from_content_not_extension(predictor, tmp_path):
    lying_png = tmp_path / "scan.dcm"
    lying_png.write_bytes(_ct_png())
    lying_dcm = tmp_path / "photo.jpg"
    lying_dcm.write_bytes(_dicom("1.2.3.4", "1.2.3.4.1"))
    assert predictor.predict(lying_png).error == ""
    dcm = predictor.predict(lying_dcm)
    assert dcm.error == "" and dcm.dicom["SeriesInstanceUID"] == "1.2.3.4" and dcm.dicom["SOPInstanceUID"] == "1.2.3.4.1"
    assert "PatientName" not in dcm.dicom and "PatientID" not in dcm.dicom
    pixels, meta = predictor.load_pixels(lying_dcm)
    assert pixels.dtype == np.uint8 and pixels.shape == (128, 128) and meta["StudyInstanceUID"]


def test_bad_inputs_give_error_rows_not_exceptions(predictor, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 Mpx declared, a few kB on disk
    cases = {
        b"": "empty",
        _ct_png()[:80]: "truncated",
        b"hello, not an image" * 10: "not a recognised image",
        bomb.read_bytes(): "too large",
    }
    for data, reason in cases.items():
        pred = predictor.predict(data, name="x")
        assert reason in pred.error and "\n" not in pred.error and pred.label == "" and pred.source == "x"
        assert pred.to_row()["malignant_probability"] is None
    with pytest.raises(LungcadError, match="x: empty file"):
        predictor.load_pixels(b"", name="x")


def test_predict_paths_streams_folders_series_and_errors(predictor, tmp_path):
    folder = tmp_path / "study"
    (folder / "series").mkdir(parents=True)
    (folder / "a.png").write_bytes(_ct_png(1))
    (folder / "b.jpg").write_bytes(b"")  # named like an image: reported, not skipped
    (folder / "README.txt").write_text("notes")  # neither named nor shaped like an image: skipped
    for i in range(4):
        (folder / "series" / f"{i:03d}").write_bytes(_dicom("9.9.9", f"9.9.9.{i}", shift=40 * i))  # no extension
    batch16 = list(predictor.predict_paths([folder, tmp_path / "missing.png"], batch_size=16, progress=False))
    sources = [Path(p.source).name for p in batch16]
    assert sources == ["a.png", "b.jpg", "000", "001", "002", "003", "missing.png", "series"]
    assert [bool(p.error) for p in batch16] == [False, True, False, False, False, False, True, False]
    assert "file not found" in batch16[6].error
    slices, series = batch16[2:6], batch16[-1]
    assert series.level == "series" and series.slices == 4 and series.dicom["SeriesInstanceUID"] == "9.9.9"
    # documented rule: mean of the top-k slices by malignant probability among non-OOD slices
    use = [s for s in slices if not s.ood] or slices
    top = sorted(use, key=lambda s: -s.malignant_probability)[:SERIES_TOP_K]
    expected = np.mean([[s.probabilities[c] for c in CLASSES] for s in top], axis=0)
    np.testing.assert_allclose([series.probabilities[c] for c in CLASSES], expected, atol=1e-6)
    assert series.ood == (np.mean([s.ood for s in slices]) > 0.5)
    # batching does not change results
    batch1 = list(predictor.predict_paths([folder, tmp_path / "missing.png"], batch_size=1, progress=False))
    assert len(batch1) == len(batch16)
    for a, b in zip(batch16, batch1):
        assert a.source == b.source and a.probabilities == pytest.approx(b.probabilities, abs=1e-4)


def test_unknown_engine_and_missing_model(run_dir, tmp_path):
    with pytest.raises(LungcadError, match="engine"):
        Predictor(run_dir, engine="tpu")
    empty = tmp_path / "norun"
    empty.mkdir()
    with pytest.raises(LungcadError, match="model.json"):
        Predictor(empty)


@pytest.mark.slow
def test_cli_predict_csv_json_cam_and_exit_codes(run_dir, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    (good / "one.png").write_bytes(_ct_png(1))
    (good / "two.png").write_bytes(_ct_png(2, "normal"))
    out_csv = tmp_path / "res.csv"
    assert main(["predict", str(run_dir), str(good), "--out", str(out_csv), "--no-progress",
                 "--cam", str(tmp_path / "cams")]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [Path(r["source"]).name for r in rows] == ["one.png", "two.png"]
    assert all(r["error"] == "" and r["ood"] in ("True", "False") and r["model_sha256"] for r in rows)
    cams = sorted((tmp_path / "cams").glob("*.png"))
    assert len(cams) == 2 and Image.open(cams[0]).size == (64, 64) and rows[0]["cam_path"] == str(cams[0])

    (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out_json = tmp_path / "res.json"
    assert main(["predict", str(run_dir), str(good), "--out", str(out_json), "--no-progress",
                 "--window=-600,1500"]) == 1  # one bad file: reported, and a non-zero exit
    rows = json.loads(out_json.read_text())
    assert len(rows) == 3 and [bool(r["error"]) for r in rows] == [True, False, False]
    assert rows[1]["p_malignant"] is not None and rows[0]["p_malignant"] is None
    err = capsys.readouterr().err
    assert "3 result(s), 1 failed" in err and "Traceback" not in err

    for argv, message in ((["predict", str(tmp_path), str(good)], "model.json"),
                          (["predict", str(run_dir), str(good), "--out", str(tmp_path / "r.txt")], ".csv or .json"),
                          (["predict", str(run_dir), str(good), "--window", "wide"], "LEVEL,WIDTH")):
        assert main(argv + ["--no-progress"]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r.txt").exists()


def test_stdout_csv_when_no_out(run_dir, tmp_path, capsys):
    img = tmp_path / "one.png"
    img.write_bytes(_ct_png(1))
    assert main(["predict", str(run_dir), str(img), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("source,level,label,decision,malignant_probability,p_normal") and len(lines) == 2


def test_multiframe_dicom_predict_gives_series_result(predictor, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    pred = predictor.predict(Path(path))
    assert pred.error == "" and pred.level == "series" and pred.slices == 2
    rows = list(predictor.predict_paths([path], progress=False))
    assert [r.level for r in rows] == ["frame", "frame", "series"] and rows[1].dicom["frame"] == 1
    shutil.copy(path, tmp_path / "copy.dcm")  # same instance twice counts once in its series
    rows = list(predictor.predict_paths([path, tmp_path / "copy.dcm"], progress=False))
    assert rows[-1].level == "series" and rows[-1].slices == 2
    assert pydicom  # imported for the skip only


def test_predict_prepared_batch_equals_one_by_one(predictor):
    inputs = [(_ct_png(1), "a.png"), (_ct_png(2, "normal"), "b.png"), (_ct_png(3), "c.png")]
    tensors = [predictor.prepare(predictor.load_pixels(data)[0]) for data, _ in inputs]
    batched = predictor.predict_prepared(tensors, [name for _, name in inputs])
    single = [predictor.predict(data, name) for data, name in inputs]
    assert [p.source for p in batched] == ["a.png", "b.png", "c.png"]
    for b, s in zip(batched, single):
        assert b.label == s.label
        assert b.malignant_probability == pytest.approx(s.malignant_probability, abs=1e-5)
        assert b.ood_score == pytest.approx(s.ood_score, rel=1e-4)


def test_web_micro_batcher_shares_forward_passes():
    import threading
    import time

    from lungcad.web.batcher import MicroBatcher

    sizes: list[int] = []

    def run_batch(items):
        sizes.append(len(items))
        time.sleep(0.05)  # a forward pass: requests arriving meanwhile queue up for the next batch
        return [f"result-{item}" for item in items]

    batcher = MicroBatcher(run_batch, max_batch=4, max_wait=0.02)
    results = {}

    def client(i):
        results[i] = batcher.submit(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == {i: f"result-{i}" for i in range(12)}  # every caller gets its own result
    assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) < 12  # batched, bounded


def test_web_batcher_workers_run_in_parallel_with_their_own_setup():
    import threading
    import time

    from lungcad.web.batcher import MicroBatcher
    from lungcad.web.service import inference_workers

    assert inference_workers(1) == (1, 1) and inference_workers(2) == (2, 1) and inference_workers(16) == (2, 8)
    setup, running, overlap = set(), [0], [0]
    lock = threading.Lock()

    def run_batch(items):
        assert threading.get_ident() in setup  # init_worker ran first in this thread
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return [x * 2 for x in items]

    batcher = MicroBatcher(run_batch, max_batch=1, max_wait=0, workers=2,
                           init_worker=lambda: setup.add(threading.get_ident()))
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, batcher.submit(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == {i: 2 * i for i in range(4)}
    assert len(setup) == 2 and overlap[0] == 2  # two batches ran at the same time


def test_web_batcher_failure_reaches_every_caller():
    from lungcad.web.batcher import MicroBatcher

    def run_batch(items):
        raise RuntimeError("engine died")

    batcher = MicroBatcher(run_batch)
    with pytest.raises(RuntimeError, match="engine died"):
        batcher.submit(1)
    with pytest.raises(RuntimeError, match="engine died"):  # the worker survives to fail the next one too
        batcher.submit(2)
    short = MicroBatcher(lambda items: [], init_worker=lambda: 1 / 0)  # set-up fails, worker still serves
    with pytest.raises(RuntimeError, match="batch of 1 gave 0 results"):
        short.submit(1)


@pytest.mark.slow
def test_cli_dicom_out_writes_secondary_captures_for_dicom_inputs(run_dir, tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import SecondaryCaptureImageStorage

    src_path = get_testdata_file("CT_small.dcm")
    source = pydicom.dcmread(src_path)
    png = tmp_path / "slice.png"
    png.write_bytes(_png(synthetic_slice(np.random.default_rng(0), "malignant", 1, 0)))
    out = tmp_path / "pacs"
    assert main(["predict", str(run_dir), src_path, str(png), "--dicom-out", str(out), "--no-progress"]) == 0
    written = sorted(out.iterdir())
    assert len(written) == 1  # the PNG input has no DICOM context to return to
    sc = pydicom.dcmread(written[0])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage and sc.Modality == "OT"
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == source.PatientID  # files beside the scan
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
    assert "decision support, not a diagnosis" in sc.ImageComments and "decision support" in sc.SeriesDescription
    assert sc.pixel_array.shape == (source.Rows, source.Columns, 3) and sc.PhotometricInterpretation == "RGB"
    first_uid = sc.SOPInstanceUID
    assert main(["predict", str(run_dir), src_path, "--dicom-out", str(out), "--no-progress"]) == 0
    assert pydicom.dcmread(written[0]).SOPInstanceUID == first_uid  # same result, same object
    assert main(["predict", str(run_dir), src_path, "--dicom-out", str(png), "--no-progress"]) == 1
    assert "--dicom-out must be a folder" in capsys.readouterr().err
