"""Discovery, decoding, preprocessing and splitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungcad.data.discovery import Sample, canonical_label, discover, parse_label_map
from lungcad.data.images import ImageReadError, decode_image
from lungcad.data.split import check_no_leak, read_split, stratified_group_split, write_split
from lungcad.data.transforms import Preprocessing, foreground_box, normalise, prepare, preprocess, train_augmentation
from lungcad.errors import LungcadError

# --- discovery ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "folder, label",
    [("Bengin cases", "benign"), ("Malignant cases", "malignant"), ("Normal cases", "normal"),
     ("lung_n", "benign"), ("lung_aca", "malignant"), ("lung_scc", "malignant"), ("MALIGNANT", "malignant")],
)
def test_aliases_map_known_folder_names(folder, label):
    assert canonical_label(folder) == label


def test_discover_folders_labels_and_order(tiny_dataset):
    samples = discover(tiny_dataset)
    assert len(samples) == 45
    assert {s.label for s in samples} == {"normal", "benign", "malignant"}
    assert samples == sorted(samples, key=lambda s: (str(s.path.parent), str(s.path)))
    assert {s.label for s in samples if s.path.parent.name == "Bengin cases"} == {"benign"}


def test_unknown_folder_is_a_clear_error_naming_it(tiny_dataset):
    (tiny_dataset / "Mystery").mkdir()
    with pytest.raises(LungcadError, match="'Mystery'.*--label-map"):
        discover(tiny_dataset)
    samples = discover(tiny_dataset, parse_label_map(["Mystery=benign"]))
    assert len(samples) == 45  # empty folder mapped, no images added


def test_label_map_rejects_unknown_target():
    with pytest.raises(LungcadError, match="not one of"):
        parse_label_map(["x=tumour"])


def test_missing_and_empty_data(tmp_path):
    with pytest.raises(LungcadError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LungcadError, match="no class folders"):
        discover(tmp_path / "empty")
    (tmp_path / "empty" / "normal").mkdir()
    with pytest.raises(LungcadError, match="no images"):
        discover(tmp_path / "empty")


def test_manifest_with_groups(tmp_path, tiny_dataset):
    files = sorted(tiny_dataset.rglob("*.png"))[:4]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,group\n" + "".join(f"{f},Malignant cases,p{i // 2}\n" for i, f in enumerate(files)))
    samples = discover(manifest)
    assert [s.group for s in samples] == ["p0", "p0", "p1", "p1"]
    assert {s.label for s in samples} == {"malignant"}
    manifest.write_text("file,label\nx.png,normal\n")
    with pytest.raises(LungcadError, match="lacks column"):
        discover(manifest)


# --- decoding -----------------------------------------------------------------------------

def test_decode_grey_rgb_rgba_and_16bit(tmp_path):
    Image.fromarray(np.full((8, 9), 7, np.uint8), "L").save(tmp_path / "g.png")
    Image.fromarray(np.full((8, 9, 3), (255, 0, 0), np.uint8), "RGB").save(tmp_path / "c.png")
    rgba = np.zeros((8, 9, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # one transparent pixel -> black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16)).save(tmp_path / "d.png")
    assert decode_image(tmp_path / "g.png").shape == (8, 9)
    assert decode_image(tmp_path / "c.png", "rgb")[0, 0].tolist() == [255, 0, 0]
    a = decode_image(tmp_path / "a.png", "rgb")
    assert a[0, 0].tolist() == [0, 0, 0] and a[1, 1].tolist() == [200, 0, 0]
    d = decode_image(tmp_path / "d.png")
    assert d.dtype == np.uint8 and d.min() == 0 and d.max() == 255 and d[0, 1] == round(1000 / 4000 * 255)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not a recognised image"),
])
def test_decode_bad_files_name_the_file(tmp_path, content, reason):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as exc:
        decode_image(p)
    assert str(p) in str(exc.value)


def test_decode_truncated_jpeg(tmp_path):
    p = tmp_path / "t.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(p, quality=95)
    p.write_bytes(p.read_bytes()[: 400])
    with pytest.raises(ImageReadError, match="truncated|corrupt"):
        decode_image(p)


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    import lungcad.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(p)
    with pytest.raises(ImageReadError, match="too large"):
        decode_image(p)


# --- preprocessing ------------------------------------------------------------------------

def test_foreground_box_ignores_small_specks():
    img = np.zeros((100, 200), np.uint8)
    img[20:80, 50:150] = 100
    img[2, 195] = 255  # a lone speck (a text label fragment) must not stretch the box
    assert foreground_box(img, 20) == (20, 50, 80, 150)
    assert foreground_box(np.zeros((5, 7), np.uint8), 20) == (0, 0, 5, 7)


def test_frame_shape_does_not_reach_the_model():
    """The same body in a square frame and in a wide frame gives the same model input."""
    pp = Preprocessing(image_size=32)
    body = np.zeros((60, 60), np.uint8)
    body[10:50, 5:55] = 120
    wide = np.zeros((60, 94), np.uint8)
    wide[:, 17:77] = body
    a, b = prepare(body, pp), prepare(wide, pp)
    assert a.shape == b.shape == (1, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)


def test_preprocess_outputs_normalised_three_channels():
    pp = Preprocessing(image_size=16)
    x = preprocess(np.full((20, 30), 255, np.uint8), pp)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = (1.0 - torch.tensor(pp.mean)) / torch.tensor(pp.std)
    assert torch.allclose(x[:, 8, 8], expected, atol=1e-5)
    rgb = Preprocessing(image_size=16, colour="rgb", geometry="square-pad")
    assert prepare(np.zeros((10, 10, 3), np.uint8), rgb).shape == (3, 16, 16)


def test_normalise_batch_and_augment_keep_shape_and_dtype():
    pp = Preprocessing(image_size=24)
    cached = torch.randint(0, 255, (1, 24, 24), dtype=torch.uint8)
    aug = train_augmentation(pp)(cached)
    assert aug.shape == cached.shape and aug.dtype == torch.uint8
    assert normalise(torch.stack([cached, aug]), pp).shape == (2, 3, 24, 24)


def test_preprocessing_round_trips_through_dict():
    pp = Preprocessing(image_size=96, colour="rgb")
    assert Preprocessing.from_dict(pp.to_dict()) == pp


# --- split --------------------------------------------------------------------------------

def _samples(n_groups: int, per_group: int = 3) -> tuple[list[Sample], list[str]]:
    samples, groups = [], []
    for label in ("normal", "benign", "malignant"):
        for g in range(n_groups):
            for i in range(per_group):
                samples.append(Sample(Path(f"/d/{label}/{g}_{i}.png"), label))
                groups.append(f"{label}{g}")
    return samples, groups


def test_split_keeps_groups_whole_and_covers_classes():
    samples, groups = _samples(10)
    rows = stratified_group_split(samples, groups, seed=3)
    check_no_leak(rows)
    for subset in ("train", "val", "test"):
        assert {r.label for r in rows if r.subset == subset} == {"normal", "benign", "malignant"}
    n_test = sum(r.subset == "test" for r in rows)
    assert 0.08 * len(rows) <= n_test <= 0.25 * len(rows)
    assert rows == stratified_group_split(samples, groups, seed=3)  # seeded: reproducible
    assert rows != stratified_group_split(samples, groups, seed=4)


def test_split_refuses_classes_with_too_few_groups():
    samples, groups = _samples(10)
    samples = [s for s, g in zip(samples, groups) if s.label != "benign" or g in ("benign0", "benign1")]
    groups = [g for g in groups if not g.startswith("benign") or g in ("benign0", "benign1")]
    with pytest.raises(LungcadError, match="'benign'.*2 group"):
        stratified_group_split(samples, groups)


def test_split_file_round_trip_relative_paths(tmp_path):
    samples, groups = _samples(6)
    samples = [Sample(tmp_path / s.path.relative_to("/d"), s.label) for s in samples]
    rows = stratified_group_split(samples, groups)
    write_split(tmp_path / "split.csv", rows, tmp_path)
    assert "/d/" not in (tmp_path / "split.csv").read_text() and str(tmp_path) not in (tmp_path / "split.csv").read_text()
    assert read_split(tmp_path / "split.csv", root=tmp_path) == rows


def test_leaky_split_file_is_rejected(tmp_path):
    (tmp_path / "s.csv").write_text("path,label,group,subset\na.png,normal,g1,train\nb.png,normal,g1,test\n")
    with pytest.raises(LungcadError, match="leaks"):
        read_split(tmp_path / "s.csv", root=tmp_path)
