"""DICOM results: Secondary Captures aligned with the source, the TID 1500 SR, both checked by dciodvfy;
and the PS3.15 gaps closed in de-identification (one test per attribute class)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from conftest import make_run  # noqa: E402

from lungcad.cli import main  # noqa: E402
from lungcad.data.transforms import Preprocessing, prepare, to_source_geometry  # noqa: E402
from lungcad.dicom.deid import deidentify  # noqa: E402
from lungcad.dicom.sr import read_series_probability  # noqa: E402

DCIODVFY = shutil.which("dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dicom3tools' validator prints for a file (it prints everything on stderr)."""
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def ct_series(folder: Path, n: int = 4, series_uid: str = "1.2.826.0.1.3680043.8.498.1", shift: int = 0) -> list[Path]:
    """`n` slices of pydicom's CT_small.dcm as one series with distinct UIDs and contents."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.PixelData = (ds.pixel_array.astype(np.int16) + shift + 15 * i).tobytes()
        paths.append(folder / f"slice{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def run_dir(module_tmp) -> Path:
    return make_run(module_tmp("results") / "run", ood=(24, 8))


@pytest.fixture(scope="module")
def written(run_dir, module_tmp) -> tuple[list[Path], Path]:
    root = module_tmp("dicom-out")
    sources = ct_series(root / "series")
    out = root / "out"
    assert main(["predict", str(run_dir), str(root / "series"), "--dicom-out", str(out), "--no-progress"]) == 0
    return sources, out


def test_heatmap_maps_back_onto_the_source_geometry():
    pp = Preprocessing(image_size=32)
    pixels = np.zeros((60, 100), dtype=np.uint8)
    pixels[10:50, 20:60] = 200  # the "body": a 40 x 40 box off-centre in a wide frame
    assert prepare(pixels, pp).shape == (1, 32, 32)
    heat = np.ones((32, 32), dtype=np.float32)
    back = to_source_geometry(heat, pixels, pp)
    assert back.shape == (60, 100)
    assert np.allclose(back[10:50, 20:60], 1.0) and back[:10].max() == 0 and back[:, 60:].max() == 0
    left = np.zeros((32, 32), dtype=np.float32)
    left[:, :16] = 1.0  # the left half of the model's input is the left half of the body box
    back = to_source_geometry(left, pixels, pp)
    assert back[30, 25] > 0.9 and back[30, 55] < 0.1


def test_secondary_captures_are_aligned_explicit_vr_and_reference_their_source(written):
    sources, out = written
    scs = sorted(out.glob("*_lungcad.dcm"))
    assert len(scs) == len(sources)
    for src_path, sc_path in zip(sources, scs):
        src, sc = pydicom.dcmread(src_path), pydicom.dcmread(sc_path)
        assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns) and sc.pixel_array.shape == (src.Rows, src.Columns, 3)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
        assert "Laterality" in sc and sc.BurnedInAnnotation == "YES"
        assert "decision support, not a diagnosis" in sc.ImageComments
        # the caption band is burnt in at the bottom; above it, the anatomy is still the source's
        rgb = sc.pixel_array.astype(int)
        band = rgb[-20:]
        assert (band.max(axis=2) == 0).mean() > 0.5 and (band.min(axis=2) > 200).any() and rgb[:100].std() > 10


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_secondary_captures_and_the_report_pass_dciodvfy(written):
    _, out = written
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 5  # 4 overlays + 1 SR
    for path in files:
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_finds_errors_where_there_are_some(tmp_path):
    """The validator check above could pass vacuously; a broken object must fail it."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.Modality, ds.SeriesInstanceUID  # Type 1 attributes
    ds.save_as(tmp_path / "broken.dcm")
    assert dciodvfy_errors(tmp_path / "broken.dcm")


def test_series_report_carries_the_series_result_and_key_slices(written, run_dir, tmp_path):
    sources, out = written
    rows = tmp_path / "rows.json"
    assert main(["predict", str(run_dir), str(sources[0].parent), "--out", str(rows), "--no-progress"]) == 0
    import json

    series_row = [r for r in json.loads(rows.read_text()) if r["level"] == "series"][0]
    (sr_path,) = out.glob("*_sr.dcm")
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.StudyInstanceUID == pydicom.dcmread(sources[0]).StudyInstanceUID
    assert read_series_probability(sr_path) == pytest.approx(series_row["malignant_probability"], abs=1e-6)
    import highdicom as hd

    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    (group,) = report.get_image_measurement_groups()
    decision = [e for e in group.get_qualitative_evaluations() if e.name.value == "decision"][0]
    assert decision.value.meaning.lower().startswith(series_row["decision"])
    refs = {str(s.referenced_sop_instance_uid) for s in group.source_images}
    assert 1 <= len(refs) <= 3 and refs <= {pydicom.dcmread(p).SOPInstanceUID for p in sources}  # key slices
    text = " ".join(str(e.value) for e in sr.iterall() if e.VR in ("UT", "LO", "ST", "LT", "SH"))
    assert "not a diagnosis" in text and series_row["model_sha256"] in text and "lungcad" in text
    assert sr.SeriesInstanceUID not in {pydicom.dcmread(p).SeriesInstanceUID for p in out.glob("*_lungcad.dcm")}


# ------------------------------------------------------------------------- de-identification gaps


def _with_phi():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.ContrastBolusAgent = "Iomeron for Mr Smith"
    ds.file_meta.SourceApplicationEntityTitle = "ST_MARYS_CT2"
    ds.file_meta.SendingApplicationEntityTitle = "ST_MARYS_PACS"
    return ds


def test_deid_removes_timezone_offset():  # action X: removed outright
    clean = deidentify(_with_phi())
    assert "TimezoneOffsetFromUTC" not in clean


def test_deid_empties_contrast_bolus_agent():  # action Z/D: a Type 2 attribute stays, emptied
    clean = deidentify(_with_phi())
    assert "ContrastBolusAgent" in clean and clean.ContrastBolusAgent == ""


def test_deid_drops_application_entity_titles_from_the_file_meta():
    clean = deidentify(_with_phi(), secret="site")
    for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle"):
        assert keyword not in clean.file_meta
    buf = io.BytesIO()
    clean.save_as(buf, enforce_file_format=True)
    assert b"ST_MARYS" not in buf.getvalue() and b"Smith" not in buf.getvalue()
    assert _with_phi().file_meta.SourceApplicationEntityTitle == "ST_MARYS_CT2"  # the original is untouched


def test_web_upload_copy_has_no_timezone_contrast_or_ae_title():
    pytest.importorskip("sqlalchemy")
    from lungcad.web.uploads import deidentify_upload

    buf = io.BytesIO()
    _with_phi().save_as(buf, enforce_file_format=True)
    data, _ = deidentify_upload(buf.getvalue(), "site-secret")
    stored = pydicom.dcmread(io.BytesIO(data))
    assert "TimezoneOffsetFromUTC" not in stored and stored.ContrastBolusAgent == ""
    assert "SourceApplicationEntityTitle" not in stored.file_meta and b"ST_MARYS" not in data


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_frames_of_a_single_frame_class_file_are_referenced_as_the_file(run_dir, tmp_path):
    """A multi-frame file in CT Image Storage (a single-frame IOD) may not be referenced by frame number."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    arr = ds.pixel_array.astype(np.int16)
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([arr, arr + 30, arr + 60]).tobytes()
    ds.save_as(tmp_path / "frames.dcm", enforce_file_format=True)
    out = tmp_path / "out"
    assert main(["predict", str(run_dir), str(tmp_path / "frames.dcm"), "--dicom-out", str(out), "--no-progress"]) == 0
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 4  # one overlay per frame, one report
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
    sc = pydicom.dcmread(files[0])
    assert "ReferencedFrameNumber" not in sc.SourceImageSequence[0]
    import highdicom as hd

    (group,) = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(out.glob("*_sr.dcm").__next__())).content \
        .get_image_measurement_groups()
    assert len(group.source_images) == 1  # the file, once
