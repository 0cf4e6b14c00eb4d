"""`lungcad adapt RUNDIR DATA --out RUNDIR2`: label-free site adaptation (lungcad.training.adapt).

The site is make_dataset's synthetic patients with inverted intensities (white background, dark
body): rendered nothing like the training images, so the source's appearance profile flags every
one, and the adapted run's (re-fitted on the site) flags none. Single runs are random-init
`make_run` models at 32 px; the fold ensemble is one real `lungcad train --folds 2` (marked slow).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import make_dataset, make_run

from lungcad.cli import main
from lungcad.data.dataset import load_cache
from lungcad.data.transforms import Preprocessing
from lungcad.errors import LungcadError
from lungcad.inference.appearance import fit_profile
from lungcad.inference.inputs import iter_inputs
from lungcad.inference.predictor import Predictor
from lungcad.models.contract import ensemble_sha256, load_model, read_contract
from lungcad.training.adapt import METHOD, MIN_IMAGES, site_fingerprint

FAST = ["--batch-size", "8", "--no-progress"]
PP = Preprocessing(image_size=32, colour="grey", window_level=40.0, window_width=400.0, window_source="declared")
WINDOW_REASON = "rendered at a different window or contrast than the training images"


def _decoded(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))]


@pytest.fixture(scope="module")
def site(module_tmp) -> Path:
    """36 inverted synthetic slices in class folders, one corrupt file and a README (not an input)."""
    root = module_tmp("adapt")
    data = make_dataset(root / "site-src", patients=4, slices=3, size=48, seed=3)
    site = root / "site"
    for p in sorted(data.rglob("*.png")):
        dst = site / p.relative_to(data)
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - np.asarray(Image.open(p)), "L").save(dst)
    (site / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (site / "README.txt").write_text("site notes")
    return site


@pytest.fixture(scope="module")
def source(module_tmp) -> Path:
    """A random-init single run with an OOD detector and the appearance profile of normal slices,
    plus a site-check report of its own (a result of its weights, not to be copied)."""
    root = module_tmp("adapt-source")
    training = make_dataset(root / "training", patients=4, slices=3, size=48)
    run = make_run(root / "source", pp=PP, ood=(24, 8), appearance=_decoded(training), temperature=1.5,
                   thresholds={"malignant": 0.4})
    (run / "check-old").mkdir()
    (run / "check-old" / "check.json").write_text("{}")
    return run


def _site_files(site: Path) -> list[Path]:
    return [p for p, problem in iter_inputs([site]) if not problem and p.name != "broken.png"]


def _only_batchnorm_statistics_changed(new_dir: Path, old_dir: Path) -> None:
    new, old = load_file(str(new_dir / "model.safetensors")), load_file(str(old_dir / "model.safetensors"))
    stats = [k for k in new if k.endswith(("running_mean", "running_var"))]
    assert new.keys() == old.keys() and stats
    assert all(not new[k].equal(old[k]) for k in stats)
    assert all(new[k].equal(old[k]) for k in new if k not in stats and not k.endswith("num_batches_tracked"))


def _appearance_reasons(run: Path, files: list[Path]) -> list[list[str]]:
    predictor = Predictor(run)
    return [[r for r in predictor.predict(f).ood_reasons if r.startswith(WINDOW_REASON)] for f in files]


def _lineage(contract, source: Path, source_sha: str, n: int) -> None:
    init = contract.init
    assert init["adapted_from"] == str(source.resolve()) and init["source_model_sha256"] == source_sha
    assert init["method"] == METHOD and init["site_images"] == n
    assert len(init["site_data_fingerprint_sha256"]) == 64
    assert init["operating_point"] == "inherited from the source, not validated at the site"


def test_single_run_adapted_copy_loads_predicts_and_records_lineage(source, site, tmp_path, caplog):
    out = tmp_path / "adapted"
    old = read_contract(source)
    files = _site_files(site)
    assert len(files) == 36
    caplog.set_level(logging.INFO)
    assert main(["adapt", str(source), str(site), "--out", str(out), *FAST]) == 0
    assert "unreadable: " in caplog.text and "broken.png" in caplog.text
    assert "were not validated at the site" in caplog.text
    model, new = load_model(out)  # sha256 checked
    assert new.model_sha256 != old.model_sha256 and read_contract(source).model_sha256 == old.model_sha256
    _only_batchnorm_statistics_changed(out, source)
    _lineage(new, source, old.model_sha256, len(files))
    assert new.init["source_init"] == old.init
    # the source's calibration, detector and preprocessing are kept
    assert (new.temperature, new.thresholds, new.ood, new.preprocessing) == (
        old.temperature, old.thresholds, old.ood, old.preprocessing)
    cache, bad = load_cache(files, PP, progress=False)  # the training loader's path gives the same images
    assert not bad and new.appearance == fit_profile(cache)
    assert not (out / "check-old").exists() and (out / "ood.safetensors").is_file()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left
    # the source flags every site image as rendered differently; the adapted run none
    assert all(_appearance_reasons(source, files[:6]))
    assert not any(_appearance_reasons(out, files[:6]))
    assert main(["predict", str(out), str(files[0]), "--no-progress"]) == 0


def test_max_images_takes_a_fixed_random_sample(source, site, tmp_path, capsys):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["adapt", str(source), str(site), "--out", str(out), "--max-images", str(MIN_IMAGES), *FAST]) == 0
    a, b = (read_contract(o).init for o in outs)
    assert a["site_images"] == MIN_IMAGES and a["site_data_fingerprint_sha256"] == b["site_data_fingerprint_sha256"]
    assert a["site_data_fingerprint_sha256"] != site_fingerprint(_site_files(site)[:MIN_IMAGES])  # not the first N
    skipped = int(re.search(r"site images; (\d+) unreadable", capsys.readouterr().out).group(1))
    assert skipped <= 1  # reading stopped at N readable images: at most broken.png was tried besides
    assert load_file(str(outs[0] / "model.safetensors"))["bn1.running_mean"].equal(
        load_file(str(outs[1] / "model.safetensors"))["bn1.running_mean"])


def test_bad_input_is_refused_in_one_line_leaving_nothing(source, site, tmp_path, capsys, monkeypatch):
    few = tmp_path / "few"
    few.mkdir()
    for p in _site_files(site)[:5]:
        (few / p.name).write_bytes(p.read_bytes())
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        ([str(source), str(few), "--out", str(tmp_path / "o1")], f"only 5 readable image(s) (0 unreadable); adapt "
                                                                 f"needs at least {MIN_IMAGES}"),
        ([str(source), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o2")], "site folder not found"),
        ([str(source), str(site), "--out", str(existing)], "--out already exists and is not empty"),
        ([str(tmp_path / "no-run"), str(site), "--out", str(tmp_path / "o3")], "run folder not found"),
        ([str(source), str(site), "--out", str(source / "inside")], "--out must be outside the source run folder"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["adapt", *argv, *FAST]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert err.startswith("lungcad adapt: error: ")
    assert (existing / "keep.txt").read_text() == "mine"
    # an error or an interruption once the copy is under way leaves no copy behind
    for exc, status in ((LungcadError("no memory left for the statistics"), 1), (KeyboardInterrupt(), 130)):
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr("lungcad.training.adapt.adapt_batchnorm", fail)
        assert main(["adapt", str(source), str(site), "--out", str(tmp_path / "o4"), *FAST]) == status
    monkeypatch.undo()
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4", ".")) for p in tmp_path.iterdir())
    assert not (source / "inside").exists() and not list(source.glob(".inside*"))
    # the too-few-images error names DATA
    assert main(["adapt", str(source), str(few), "--out", str(tmp_path / "o1"), *FAST]) == 1
    assert str(few) in capsys.readouterr().err


@pytest.mark.slow
def test_fold_ensemble_every_member_adapted_and_the_ensemble_record_follows(site, tmp_path):
    root = tmp_path
    data = make_dataset(root / "data", patients=4, slices=3, size=48)
    cv = root / "cv"
    assert main(["train", "--data", str(data), "--out", str(cv), "--pretrained", "none", "--image-size", "32",
                 "--window=40,400", "--folds", "2", "--epochs", "1", *FAST]) == 0
    out = root / "cv-adapted"
    assert main(["adapt", str(cv), str(site), "--out", str(out), *FAST]) == 0
    load_model(out)  # every member's sha256 against its contract and the ensemble's record
    old, new = read_contract(cv), read_contract(out)
    files = _site_files(site)
    cache, _ = load_cache(files, new.preprocessing, progress=False)
    shas = []
    for k, entry in enumerate(new.ensemble["members"], start=1):
        member = read_contract(out / f"fold-{k}")
        _only_batchnorm_statistics_changed(out / f"fold-{k}", cv / f"fold-{k}")
        _lineage(member, cv / f"fold-{k}", read_contract(cv / f"fold-{k}").model_sha256, len(files))
        assert entry["model_sha256"] == member.model_sha256 and member.appearance == fit_profile(cache)
        assert json.loads((out / f"fold-{k}" / "init.json").read_text()) == member.init
        shas.append(member.model_sha256)
    assert new.model_sha256 == ensemble_sha256(shas) != old.model_sha256
    _lineage(new, cv, old.model_sha256, len(files))
    assert new.appearance == fit_profile(cache) and new.ood == old.ood
    assert new.ensemble["member_temperature"] == old.ensemble["member_temperature"]
    assert new.thresholds == old.thresholds
    for name in ("oof.csv", "crossval.json", "split.csv", "fold-1.split.csv", "fold-2/ood.safetensors"):
        assert (out / name).is_file(), name
    assert all(_appearance_reasons(cv, files[:4])) and not any(_appearance_reasons(out, files[:4]))
    assert main(["predict", str(out), str(files[0]), "--no-progress"]) == 0
