"""The window in the contract, the appearance check, and the bad-input rules shared by predict and the web app."""

from __future__ import annotations

import csv
import io
import json
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, make_run, synthetic_slice

from lungcad.cli import main
from lungcad.data.images import MIN_SIDE, ImageReadError, decode_image
from lungcad.data.transforms import PAD_LIMIT, Preprocessing, prepare
from lungcad.errors import LungcadError
from lungcad.inference.appearance import check
from lungcad.inference.predictor import Predictor
from lungcad.inference.results import Prediction
from lungcad.models.contract import CONTRACT_FILE, read_contract

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from lungcad.dicom.reader import window_to_uint8  # noqa: E402

SOFT = (40.0, 400.0)  # the declared training window of these tests
LUNG = (-600.0, 1500.0)
FAST = ["--pretrained", "none", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--no-progress"]


def _ct_small_hu() -> np.ndarray:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _dicom_bytes() -> bytes:
    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _training_renderings(window: tuple[float, float], n: int = 32, seed: int = 0) -> list[np.ndarray]:
    """CT_small as another export of the same kind would give it: rendered at `window`, with
    orientation, crop, HU offset and noise varying."""
    rng = np.random.default_rng(seed)
    hu = _ct_small_hu()
    out = []
    for i in range(n):
        h = np.rot90(hu, i % 4)
        h = h[:, ::-1] if (i // 4) % 2 else h
        top, left = rng.integers(0, 12, 2)
        h = h[top : top + 116, left : left + 116] + rng.normal(0, 8) + rng.normal(0, rng.uniform(0, 10), (116, 116))
        out.append(window_to_uint8(h, *window))
    return out


@pytest.fixture(scope="module")
def soft_run(module_tmp) -> Path:
    """A random-init run declaring the soft-tissue window, with the appearance profile of its renderings."""
    pp = Preprocessing(image_size=64).with_window("40,400")
    return make_run(module_tmp("appearance") / "run", pp=pp, appearance=_training_renderings(SOFT))


@pytest.fixture(scope="module")
def soft_predictor(soft_run) -> Predictor:
    return Predictor(soft_run)


# --- the window is part of the contract ---------------------------------------------------


@pytest.mark.slow
def test_train_window_is_declared_in_the_contract_with_the_appearance_profile(tmp_path, caplog):
    data = make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--window=40,400", *FAST]) == 0
    contract = read_contract(run)
    pp = contract.preprocessing
    assert (pp.window_level, pp.window_width, pp.window_source) == (40.0, 400.0, "declared")
    assert json.loads((run / "config.json").read_text())["window"] == "40,400"
    n_train = sum(1 for r in csv.DictReader(open(run / "split.csv")) if r["subset"] == "train")
    assert contract.appearance["images"] == n_train and contract.appearance["channels"] == 1
    assert {"dark", "fg_q50", "gradient", "saturation"} <= set(contract.appearance["features"])
    # the run's DICOM rendering is the declared window, with no warning about it
    caplog.set_level(logging.WARNING)
    predictor = Predictor(run)
    pixels, _ = predictor.load_pixels(_dicom_bytes())
    np.testing.assert_array_equal(pixels, window_to_uint8(_ct_small_hu(), *SOFT))
    assert "does not declare the window" not in caplog.text
    # a malformed window is refused before any work
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "r2"), "--window", "wide", *FAST]) == 1
    assert not (tmp_path / "r2").exists()


@pytest.mark.slow  # three Predictor loads
def test_window_round_trip(soft_predictor, soft_run, caplog):
    """A DICOM rendered at the contract's window looks like the training images; the same slice at
    the lung window (an override, warned about) is flagged as a different window."""
    good = soft_predictor.predict(_dicom_bytes(), name="ct.dcm")
    assert good.error == "" and not any("window" in r for r in good.ood_reasons), good.ood_reasons
    caplog.set_level(logging.WARNING)
    lung = Predictor(soft_run, window=LUNG)
    assert "--window -600,1500 departs from the window the model was trained at (40,400 HU)" in caplog.text
    bad = lung.predict(_dicom_bytes(), name="ct.dcm")
    assert bad.ood and any(r.startswith("rendered at a different window or contrast") for r in bad.ood_reasons)
    assert bad.to_row()["ood_reasons"] == "; ".join(bad.ood_reasons)
    caplog.clear()
    Predictor(soft_run, window=SOFT)  # the training window itself is no departure
    assert "departs" not in caplog.text


def test_undeclared_window_warns_once_when_rendering_dicom(untrained_run, caplog):
    run = untrained_run  # conftest's shared run: default preprocessing, no window declared
    assert read_contract(run).preprocessing.window_source == "default"
    predictor = Predictor(run)
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        assert predictor.predict(_dicom_bytes()).error == ""
    assert caplog.text.count("does not declare the window") == 1
    caplog.clear()
    predictor.predict(_png(synthetic_slice(np.random.default_rng(0), "benign", 0, 0)))  # images: no window
    assert "does not declare the window" not in caplog.text


def test_cli_predict_window_override_warns(soft_run, tmp_path, caplog):
    dcm = tmp_path / "ct.dcm"
    dcm.write_bytes(_dicom_bytes())
    out = tmp_path / "p.csv"
    caplog.set_level(logging.WARNING)
    assert main(["predict", str(soft_run), str(dcm), "--window=-600,1500", "--out", str(out), "--no-progress"]) == 0
    assert "departs from the window the model was trained at" in caplog.text
    row = next(csv.DictReader(open(out)))
    assert row["ood"] == "True" and "rendered at a different window" in row["ood_reasons"]


@pytest.mark.slow  # two Predictor loads
def test_old_contract_without_window_or_appearance_loads(soft_run, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in soft_run.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    d = json.loads((old / CONTRACT_FILE).read_text())
    del d["appearance"], d["preprocessing"]["window_source"]
    d["preprocessing"]["window_level"], d["preprocessing"]["window_width"] = LUNG
    (old / CONTRACT_FILE).write_text(json.dumps(d))
    contract = read_contract(old)
    assert contract.appearance == {} and contract.preprocessing.window_source == "default"
    assert contract.preprocessing.window == LUNG
    pred = Predictor(old).predict(_png(synthetic_slice(np.random.default_rng(1), "normal", 1, 0)))
    assert pred.error == "" and pred.ood_reasons == []  # no profile: only the rules that need none apply
    blank = Predictor(old).predict(_png(np.zeros((64, 64), np.uint8)))
    assert blank.ood and blank.ood_reasons == ["blank or constant image (every pixel is 0)"]


# --- each appearance rule -----------------------------------------------------------------


def test_each_rule_is_flagged(soft_run):
    contract = read_contract(soft_run)
    profile, pp = contract.appearance, contract.preprocessing

    def reasons(raw: np.ndarray) -> list[str]:
        return check(raw, prepare(raw, pp), profile, pp)

    clean = window_to_uint8(_ct_small_hu(), *SOFT)
    assert reasons(clean) == []
    assert reasons(np.zeros((64, 64), np.uint8)) == ["blank or constant image (every pixel is 0)"]
    assert reasons(np.full((64, 64), 77, np.uint8)) == ["blank or constant image (every pixel is 77)"]
    assert reasons(clean[:20, :24])[0] == f"too small (24 x 20 px, the minimum is {MIN_SIDE})"
    photo = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)  # a colourful photograph
    assert any(r.startswith("colour image given to a greyscale CT model") for r in reasons(photo))
    grey_rgb = np.repeat(clean[..., None], 3, axis=2)  # colour file, grey content: fine
    assert reasons(grey_rgb) == []
    for name, raw in {
        "lung window": window_to_uint8(_ct_small_hu(), *LUNG),
        "bone window": window_to_uint8(_ct_small_hu(), 400, 1800),
        "gamma 0.4": np.round(255 * (clean / 255.0) ** 0.4).astype(np.uint8),
        "inverted": 255 - clean,
    }.items():
        found = reasons(raw)
        assert any(r.startswith("rendered at a different window or contrast than the training images (")
                   for r in found), (name, found)
        assert all(";" not in r for r in found)


def test_black_lifted_to_dim_grey_is_flagged_by_the_dim_share(soft_run):
    """Black lifted to a dim grey (a pedestal; video levels 16-235; a contrast x0.85 export maps 0 to
    19) stays under the near-black limit, so the near-black fraction cannot see it. The share of dim
    but not black pixels does; a profile without that statistic (a contract written before it) does
    not, and still loads."""
    contract = read_contract(soft_run)
    profile, pp = contract.appearance, contract.preprocessing
    clean = window_to_uint8(_ct_small_hu(), *SOFT)
    assert check(clean, prepare(clean, pp), profile, pp) == []
    pedestal = np.where(clean <= 2, 16, clean).astype(np.uint8)  # only black changes
    found = check(pedestal, prepare(pedestal, pp), profile, pp)
    assert len(found) == 1 and found[0].startswith("black level unlike the training images (dim grey fraction ")
    older = {**profile, "features": {k: v for k, v in profile["features"].items() if k != "dim"}}
    assert check(pedestal, prepare(pedestal, pp), older, pp) == []
    video = np.round(16 + clean * (219 / 255)).astype(np.uint8)
    assert any(r.startswith("black level unlike") for r in check(video, prepare(video, pp), profile, pp))


def test_feature_space_flag_has_its_own_reason(untrained_run):
    predictor = Predictor(untrained_run)
    predictor.ood_detector.threshold = -1e9
    pred = predictor.predict(_png(synthetic_slice(np.random.default_rng(2), "malignant", 2, 0)))
    assert pred.ood and pred.ood_reasons[-1].startswith("feature-space score ")
    assert "above threshold -1e+09" in pred.ood_reasons[-1]
    back = Prediction.from_row(pred.to_row(), predictor.classes)
    assert back.ood_reasons == pred.ood_reasons


# --- bad input: the same rules in predict and the web app -----------------------------------


def test_small_and_blank_inputs_same_in_predict_and_web(soft_predictor):
    from lungcad.web.uploads import check_upload

    tiny = _png(np.full((20, 40), 128, np.uint8))
    pred = soft_predictor.predict(tiny, name="tiny.png")
    assert pred.error == f"image too small (40x20 px; the minimum is {MIN_SIDE})" and pred.label == ""
    with pytest.raises(LungcadError, match=r"^tiny.png: image too small \(40x20 px; the minimum is 32\)$"):
        check_upload(tiny, "tiny.png")
    # a blank frame: a result flagged out of distribution with its reason, never a silent class;
    # the web app's path (decode once, predict_prepared with the pixels) gives the same reasons
    blank = np.zeros((64, 64), np.uint8)
    cli = soft_predictor.predict(_png(blank), name="blank.png")
    pixels, _ = soft_predictor.load_pixels(_png(blank))
    web = soft_predictor.predict_prepared([soft_predictor.prepare(pixels)], ["blank.png"], pixels=[pixels])[0]
    assert cli.ood and web.ood and cli.ood_reasons == web.ood_reasons == ["blank or constant image (every pixel is 0)"]
    assert check_upload(_png(blank), "blank.png")[0] == "png"  # accepted, then flagged like in predict


def test_colour_photo_is_decoded_in_colour_for_the_check(soft_predictor):
    photo = np.random.default_rng(1).integers(0, 256, (80, 80, 3), dtype=np.uint8)
    pred = soft_predictor.predict(_png(photo))
    assert pred.error == "" and pred.ood
    assert pred.ood_reasons[0].startswith("colour image given to a greyscale CT model")
    assert decode_image(_png(photo), "auto").shape == (80, 80, 3)
    assert decode_image(_png(photo[..., 0]), "auto").shape == (80, 80)


def test_extreme_aspect_png_is_one_line_error_without_large_memory(soft_predictor):
    from lungcad.web.uploads import check_upload

    im = Image.new("L", (50000, 2))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    raw = buf.getvalue()
    assert len(raw) < 1000
    tracemalloc.start()
    pred = soft_predictor.predict(raw, name="long.png")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pred.error == "extreme aspect ratio (50000x2 pixels; at most 8:1 is accepted)"
    assert "\n" not in pred.error and peak < 20_000_000
    with pytest.raises(LungcadError, match="long.png: extreme aspect ratio"):
        check_upload(raw, "long.png")
    with pytest.raises(ImageReadError, match="extreme aspect ratio"):
        decode_image(raw)


def test_prepare_resizes_before_padding_large_crops():
    pp = Preprocessing(image_size=64)
    rng = np.random.default_rng(0)
    wide = rng.integers(40, 255, (PAD_LIMIT // 4, PAD_LIMIT * 2), dtype=np.uint8)  # 8:1, long side over the limit
    tracemalloc.start()
    out = prepare(wide, pp)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (1, 64, 64) and out.dtype == torch.uint8
    assert peak < 4 * wide.nbytes  # never the (4096 x 4096) square
    assert out[0, :24].float().mean() < 1 and out[0, 36:].float().mean() < 1  # padding above and below
    assert out[0, 30:34].float().mean() > 100
    # below the limit the order is unchanged (pad, then resize): bit-identical to the trained path
    small = rng.integers(40, 255, (300, 500), dtype=np.uint8)
    square = np.zeros((500, 500), np.uint8)
    square[100:400] = small
    from torchvision.transforms.v2 import functional as F

    reference = F.resize(torch.from_numpy(square)[None], [64, 64], antialias=True)
    torch.testing.assert_close(prepare(small, pp), reference)


def test_web_upload_reports_the_same_reasons(soft_run, soft_predictor, tmp_path):
    """The web app with the real Predictor: a blank upload is stored flagged, with its reasons shown."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from test_web import PASSWORD, login, upload

    from lungcad.web.app import create_app
    from lungcad.web.db import Study, open_database
    from lungcad.web.security import add_user

    data = tmp_path / "web"
    _, sessions = open_database(None, data)
    with sessions() as s:
        add_user(s, "alice", PASSWORD, "clinician")
        s.commit()
    blank = _png(np.zeros((64, 64), np.uint8))
    with TestClient(create_app(soft_run, data_dir=data, predictor=soft_predictor)) as client:
        login(client)
        r = upload(client, [("blank.png", blank), ("tiny.png", _png(np.full((20, 40), 9, np.uint8)))])
        assert r.status_code == 200 and "file 2: image too small (40x20 px; the minimum is 32)" in r.text
        with sessions() as s:
            study = s.scalar(select(Study))
            assert study.ood and study.ood_reasons == soft_predictor.predict(blank).ood_reasons
        page = client.get(f"/studies/{study.id}").text
        assert "Out of distribution" in page and "blank or constant image (every pixel is 0)" in page


def test_colour_model_check_without_raw_pixels_reads_colour_from_the_model_input():
    """Cross-validation and the OOD benchmarks check the prepared model input only (raw pixels
    None): a colour model's own tiles must pass there too, and a grey one must still be caught."""
    from lungcad.inference.appearance import fit_profile

    rng = np.random.default_rng(0)
    pink = np.stack([rng.integers(150, 230, (32, 32)), rng.integers(60, 140, (32, 32)),
                     rng.integers(120, 200, (32, 32))]).astype(np.uint8)  # H&E-like: every pixel coloured
    tiles = torch.as_tensor(np.stack([np.clip(pink.astype(int) + rng.integers(-15, 16, pink.shape), 0, 255)
                                      for _ in range(40)]).astype(np.uint8))
    pp = Preprocessing(image_size=32, colour="rgb")
    profile = fit_profile(tiles)
    assert not any(r.startswith("greyscale image given to a colour model") for r in check(None, tiles[0], profile, pp))
    grey = tiles[0].float().mean(dim=0, keepdim=True).repeat(3, 1, 1).to(torch.uint8)
    assert any(r.startswith("greyscale image given to a colour model") for r in check(None, grey, profile, pp))
