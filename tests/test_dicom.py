"""DICOM reading on pydicom's bundled real files: HU, windowing, MONOCHROME1, frames, codecs, bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from lungcad.dicom import deidentify, is_dicom, parse_window, read_dicom, safe_metadata, window_to_uint8  # noqa: E402
from lungcad.errors import LungcadError  # noqa: E402


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ct():
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def test_ct_small_hounsfield_and_lung_window():
    ds = _ct()
    out = read_dicom(get_testdata_file("CT_small.dcm"))
    assert len(out.frames) == 1 and out.window == (-600.0, 1500.0)
    frame = out.frames[0]
    assert frame.shape == (128, 128) and frame.dtype == np.uint8
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round(np.clip((hu - (-600 - 750)) / 1500 * 255, 0, 255)).astype(np.uint8)
    np.testing.assert_array_equal(frame, expected)
    assert float(ds.RescaleIntercept) == -1024  # the file really exercises the rescale


def test_window_override_and_parse():
    narrow = read_dicom(get_testdata_file("CT_small.dcm"), window=(40.0, 400.0)).frames[0]  # mediastinal
    lung = read_dicom(get_testdata_file("CT_small.dcm")).frames[0]
    assert not np.array_equal(narrow, lung)
    assert parse_window("-600,1500") == (-600.0, 1500.0)
    for bad in ("abc", "1", "40,0", "40,-5"):
        with pytest.raises(LungcadError, match="window"):
            parse_window(bad)
    np.testing.assert_array_equal(window_to_uint8(np.array([-2000.0, -600.0, 1000.0]), -600, 1500), [0, 128, 255])


def test_monochrome1_is_inverted():
    ds = _ct()
    plain = read_dicom(_bytes(ds)).frames[0]
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = read_dicom(_bytes(ds)).frames[0]
    np.testing.assert_array_equal(inverted, 255 - plain)


def test_multiframe_grey_and_colour():
    ds = _ct()
    first = ds.pixel_array.copy()
    second = (first + 100).astype(first.dtype)
    ds.NumberOfFrames = 2
    ds.PixelData = first.tobytes() + second.tobytes()
    out = read_dicom(_bytes(ds))
    assert len(out.frames) == 2 and all(f.shape == (128, 128) for f in out.frames)
    assert out.frames[1].mean() > out.frames[0].mean()  # +100 HU is brighter in the lung window
    rgb = read_dicom(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert len(rgb.frames) == 2 and rgb.frames[0].shape == (100, 100, 3) and rgb.frames[0].dtype == np.uint8


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_compressed_transfer_syntaxes_decode_losslessly(name):
    pytest.importorskip("pylibjpeg")
    reference = read_dicom(get_testdata_file("MR_small.dcm")).frames[0]
    np.testing.assert_array_equal(read_dicom(get_testdata_file(name)).frames[0], reference)


def test_missing_codec_plugin_is_named(monkeypatch):
    from pydicom.pixels import get_decoder

    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if neither pylibjpeg nor Pillow's J2K were installed
    with pytest.raises(LungcadError, match="pylibjpeg-openjpeg") as info:
        read_dicom(get_testdata_file("MR_small_jp2klossless.dcm"), name="scan.dcm")
    assert str(info.value).startswith("scan.dcm: compressed DICOM") and "\n" not in str(info.value)


def test_bad_dicom_files_raise_one_line_errors(tmp_path):
    with pytest.raises(LungcadError, match="without pixel data"):
        read_dicom(get_testdata_file("rtplan.dcm"))
    ds = _ct()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(LungcadError, match="unsupported photometric interpretation 'PALETTE COLOR'"):
        read_dicom(_bytes(ds))
    ds = _ct()
    ds.Rows, ds.Columns = 60000, 60000  # declared dimensions far beyond the pixel data: refuse before decoding
    with pytest.raises(LungcadError, match="too large"):
        read_dicom(_bytes(ds))
    raw = open(get_testdata_file("CT_small.dcm"), "rb").read()
    with pytest.raises(LungcadError, match="scan.dcm") as info:
        read_dicom(raw[: len(raw) // 2], name="scan.dcm")  # truncated inside the pixel data
    assert "\n" not in str(info.value)
    with pytest.raises(LungcadError, match="no DICM magic"):
        read_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)


def test_magic_detection():
    raw = open(get_testdata_file("CT_small.dcm"), "rb").read()
    assert is_dicom(raw[:132]) and not is_dicom(b"\xff\xd8\xff" + b"\0" * 200) and not is_dicom(b"")


@pytest.mark.parametrize("head, kind, predict_kind, upload_kind", [
    (b"\0" * 128 + b"DICM", "dicom", "dicom", "dicom"),  # exactly 132 bytes: the magic is all there
    (b"\0" * 127 + b"DICM", None, None, None),  # 131 bytes: DICM at byte 127 is not the magic
    (b"\0" * 128 + b"DICM" + b"\x02\x00", "dicom", "dicom", "dicom"),  # preamble + DICM + a data element
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 120 + b"DICM\x02", "dicom", "dicom", "dicom"),  # preamble looks like PNG
    (b"\0" * 128 + b"DIC", None, None, None),  # truncated magic
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, "png", "image", "png"),
    (b"\xff\xd8\xff\xe0", "jpeg", "image", "jpeg"),
    (b"BM" + b"\0" * 200, "bmp", "image", None),  # predict reads BMP; the web app takes PNG/JPEG/DICOM only
    (b"", None, None, None),
])
def test_one_sniffer_for_predict_the_dicom_reader_and_uploads(head, kind, predict_kind, upload_kind):
    from lungcad.inference.inputs import file_kind, sniff
    from lungcad.web.uploads import sniff as upload_sniff

    assert file_kind(head) == kind
    assert sniff(head) == predict_kind
    assert upload_sniff(head) == upload_kind
    assert is_dicom(head) == (kind == "dicom")


def test_a_bare_dicom_magic_is_sniffed_as_dicom_and_rejected_by_its_reader():
    from lungcad.web.uploads import check_upload

    bare = b"\0" * 128 + b"DICM"
    with pytest.raises(LungcadError, match="bare.dcm: DICOM without pixel data"):
        read_dicom(bare, name="bare.dcm")
    with pytest.raises(LungcadError, match="not a readable DICOM image"):
        check_upload(bare, "bare.dcm")


def test_only_uids_leave_and_deidentify_strips_patient():
    ds = _ct()
    assert str(ds.PatientName)  # the bundled file does carry a (fake) patient name
    meta = safe_metadata(ds)
    assert set(meta) <= {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "InstanceNumber"}
    assert meta["SOPInstanceUID"] == ds.SOPInstanceUID and meta["Modality"] == "CT"
    clean = deidentify(ds)
    assert str(ds.PatientID) and str(ds.InstitutionName)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
        assert str(clean.get(key, "")) in ("", "ANONYMOUS")
    assert clean.SOPInstanceUID == ds.SOPInstanceUID and clean.PatientIdentityRemoved == "YES"  # UIDs kept
    assert "PatientName" in ds and str(ds.PatientName) != "ANONYMOUS"  # the original is untouched
    hashed = deidentify(ds, secret="site-secret")
    assert hashed.StudyInstanceUID.startswith("2.25.") and hashed.StudyInstanceUID != ds.StudyInstanceUID
    assert hashed.StudyInstanceUID == deidentify(ds, secret="site-secret").StudyInstanceUID  # stable per site
    assert hashed.SOPClassUID == ds.SOPClassUID and hashed.PatientID not in ("", ds.PatientID)
