"""`lungcad check RUNDIR DATA`: a new site's unlabelled images against the model (lungcad.inference.site_check).

Most tests use a run folder built without training (a random-init ResNet-50 at 32 px with its OOD
detector and appearance profile fitted on synthetic slices, config.json and split.csv written by
hand); one slow test checks a trained 2-fold ensemble.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, synthetic_slice

from lungcad.cli import main
from lungcad.data.dataset import load_cache
from lungcad.data.split import SplitRow, write_split
from lungcad.data.transforms import Preprocessing
from lungcad.inference.appearance import fit_profile
from lungcad.inference.ood import fit_ood
from lungcad.inference.site_check import (
    REFERENCE_CACHE,
    compare_appearance,
    design_effect,
    flagged_share,
    patient_shift_test,
    wilson,
)
from lungcad.models.contract import ModelContract, save_model
from lungcad.models.factory import create_model
from lungcad.run import RunFolder

CLASSES = ["normal", "benign", "malignant"]
FOLDERS = ["Normal cases", "Bengin cases", "Malignant cases"]
# The fixture's OOD threshold is the 99th percentile of 36 validation slices of 12 synthetic patients,
# i.e. about their maximum: whole new patients exceed it now and then. The in-distribution tests allow
# for that; the out-of-distribution sites are flagged whole.
LENIENT = ["--max-flagged", "0.25"]


def make_check_run(root: Path, patients: int = 16) -> tuple[Path, Path]:
    """(run folder, its data folder): patients 0-3 of each class train, 4-7 validate, the rest test (the
    shift test's reference: by default 24 patients, enough for a patient-level null)."""
    data = make_dataset(root / "data", patients=patients, slices=3, size=48, seed=0)
    rows = []
    for label, folder in zip(CLASSES, FOLDERS):
        for f in sorted((data / folder).iterdir()):
            p = (int(f.stem.split("(")[1].rstrip(")")) - 1) // 6  # 3 slices + a gap of 3 per patient
            rows.append(SplitRow(f, label, f"{label}-{p}", "train" if p < 4 else "val" if p < 8 else "test"))
    torch.manual_seed(0)
    model, _ = create_model("resnet50", outputs=3, pretrained="none")
    model.eval()
    pp = Preprocessing(image_size=32)
    cache = {s: load_cache([r.path for r in rows if r.subset == s], pp, progress=False)[0] for s in ("train", "val")}
    run = root / "run"
    run.mkdir()
    contract = ModelContract(arch="resnet50", task="multiclass", classes=CLASSES, preprocessing=pp)
    contract.ood = fit_ood(run, model, cache["train"], cache["val"], pp)
    contract.appearance = fit_profile(cache["train"])
    save_model(run, model, contract)
    (run / "config.json").write_text(json.dumps({"data": str(data)}))
    write_split(run / "split.csv", rows, data)
    return run, data


def colour_tiles(folder: Path, n: int = 12) -> Path:
    """LC25000-like RGB tiles: pink and purple texture."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(n):
        tile = np.array([200, 120, 190]) + rng.normal(0, 25, (64, 64, 3))
        tile[rng.random((64, 64)) < 0.2] = (90, 40, 140)  # nuclei
        Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8), "RGB").save(folder / f"lung_aca{i}.jpeg")
    return folder


@pytest.fixture(scope="module")
def check_run(module_tmp) -> tuple[Path, Path]:
    return make_check_run(module_tmp("check"))


@pytest.fixture(scope="module")
def site_ok(module_tmp) -> Path:
    """New patients from the generator the model's data came from."""
    return make_dataset(module_tmp("sites") / "hospital-b", patients=4, slices=3, size=48, seed=7)


@pytest.fixture(scope="module")
def first_check(check_run, site_ok) -> dict:
    """`lungcad check` of site_ok against check_run, once for the module (it computes and caches the
    reference scores, unless a test before it did): its exit status, output, check.json, check.html and the
    files it wrote."""
    run, _ = check_run
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["check", str(run), str(site_ok), "--no-progress", *LENIENT])
    out = run / "check-hospital-b"
    return {"status": status, "stdout": stdout.getvalue(), "report": json.loads((out / "check.json").read_text()),
            "page": (out / "check.html").read_text(), "files": sorted(p.name for p in out.iterdir())}


def test_in_distribution_site_matches_and_writes_check_json_and_html(check_run, first_check):
    run, _ = check_run
    assert first_check["status"] == 0
    assert "verdict: matches" in first_check["stdout"]
    report = first_check["report"]
    assert report["verdict"] == "matches" and report["reasons"] == []
    assert report["site"] == "hospital-b" and report["images"] == 36 and report["unreadable"] == 0
    f = report["flagged"]
    assert f["count"] / f["images"] == pytest.approx(f["share"]) and f["share"] <= 0.25
    assert f["ci95"][0] <= f["share"] <= f["ci95"][1] and f["max"] == 0.25
    # the interval counts the site's patients (inferred from the PNGs as training would) as clusters
    assert f["patients"] == report["appearance"]["patients"] and f["patients_from"].startswith("inferred")
    assert f["design_effect"] >= 1.0 and f["effective_images"] <= f["images"]
    s = report["shift"]
    assert s["tested"] and s["p_value"] >= 0.01 and 0.0 <= s["auc"] <= 1.0 and s["pseudo_sites"] == 9999
    # the site's patients for the null: the proxies inferred from its PNGs, as the reference's were
    assert s["reference_patients"] == 24 and s["site_patients"] == report["appearance"]["patients"]
    assert "inferred as for training" in s["site_patients_from"]
    assert s["pseudo_site_patients"] == min(s["site_patients"], 12)
    assert report["reference"]["kind"] == "test split" and report["reference"]["images"] == 72
    assert report["appearance"]["compared"] and report["appearance"]["differs"] == []
    assert report["model_sha256"] == RunFolder(run).contract().model_sha256 and report["date"].endswith("+00:00")
    page = first_check["page"]
    assert page.count('src="data:image/png;base64,') == 2  # score histograms, flagged share
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert 'id="verdict"' in page and "matches" in page
    assert first_check["files"] == ["check.html", "check.json"]  # no temporary files left


def test_colour_tiles_and_blank_frames_do_not_match(check_run, tmp_path, capsys):
    run, _ = check_run
    site = colour_tiles(tmp_path / "lc25000-like")
    for i in range(4):
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8), "L").save(site / f"blank{i}.png")
    assert main(["check", str(run), str(site), "--no-progress"]) == 3
    text = capsys.readouterr().out
    assert "verdict: does not match" in text
    report = json.loads((run / "check-lc25000-like" / "check.json").read_text())
    assert report["verdict"] == "does not match" and report["flagged"]["share"] == 1.0
    tally = report["flagged"]["reasons"]
    assert tally["colour image given to a greyscale CT model"] == 12
    assert tally["blank or constant image"] == 4
    assert any("flagged out of distribution" in r for r in report["reasons"])
    assert report["shift"]["p_value"] < 0.01 and report["shift"]["auc"] > 0.9
    assert any("OOD scores are higher" in r for r in report["reasons"])
    assert report["appearance"]["differs"]


def test_a_site_rendered_differently_does_not_match_on_appearance(check_run, tmp_path):
    run, _ = check_run
    site = tmp_path / "other-window"
    site.mkdir()
    rng = np.random.default_rng(5)
    for i in range(24):  # the same anatomy at lower contrast and higher brightness
        a = synthetic_slice(rng, CLASSES[i % 3], 5000 + i, i % 3, 48).astype(float)
        Image.fromarray(np.clip(a * 0.55 + 70, 0, 255).astype(np.uint8), "L").save(site / f"s{i}.png")
    out = tmp_path / "result"
    assert main(["check", str(run), str(site), "--out", str(out), "--no-progress", *LENIENT]) == 3
    report = json.loads((out / "check.json").read_text())
    assert "mean" in report["appearance"]["differs"]
    assert any("looks unlike the training images" in r for r in report["reasons"])
    assert not (run / "check-other-window").exists()  # --out was used


def test_unreadable_files_are_reported_and_the_rest_is_checked(check_run, site_ok, tmp_path):
    run, _ = check_run
    site = tmp_path / "mixed"
    shutil.copytree(site_ok, site)
    (site / "Normal cases" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "o"
    assert main(["check", str(run), str(site), "--out", str(out), "--no-progress", *LENIENT]) == 0
    report = json.loads((out / "check.json").read_text())
    assert report["files"] == 37 and report["images"] == 36 and report["unreadable"] == 1
    assert report["unreadable_files"][0]["source"].endswith("broken.png")


def test_bad_input_is_one_line_errors(check_run, tmp_path, capsys):
    run, _ = check_run
    (tmp_path / "empty").mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"")
    (unreadable / "b.jpg").write_bytes(b"\xff\xd8\xffgarbage")
    cases = [
        ([str(run), str(tmp_path / "nope")], "folder not found"),
        ([str(run), str(tmp_path / "empty")], "folder holds no image or DICOM files"),
        ([str(run), str(unreadable)], "none of the 2 files could be read"),
        ([str(run), str(run / "model.json")], "not a folder"),
        ([str(tmp_path / "norun"), str(tmp_path / "empty")], "run folder not found"),
        ([str(run), str(tmp_path / "empty"), "--alpha", "2"], "--alpha must be in (0, 1)"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(["check", *argv, "--no-progress"]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("lungcad check: error: ") and message in err and "\n" not in err, err
    assert not list(run.glob("check-empty")) and not list(run.glob("check-unreadable"))


def test_reference_scores_are_cached_for_checks_away_from_the_training_data(check_run, site_ok, first_check, capsys):
    run, data = check_run
    # this test is about the cache, not the verdict (test_in_distribution_site_matches_... checks that)
    assert first_check["status"] in (0, 3)  # computed the reference cache (or reused it)
    cache = json.loads((run / REFERENCE_CACHE).read_text())
    assert cache["model_sha256"] == RunFolder(run).contract().model_sha256 and len(cache["strata"][0]["scores"]) == 72
    assert len(set(cache["strata"][0]["groups"])) == 24  # each score's patient, for the patient-level null
    moved = data.with_name("moved")
    data.rename(moved)  # the run folder copied to a site without the training data
    try:
        assert main(["check", str(run), str(site_ok), "--no-progress", *LENIENT]) in (0, 3)
        report = json.loads((run / "check-hospital-b" / "check.json").read_text())
        assert report["reference"]["scores"].startswith("cached in") and report["reference"]["images"] == 72
        (run / REFERENCE_CACHE).rename(run / "kept.json")
        capsys.readouterr()
        assert main(["check", str(run), str(site_ok), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "reference images not found" in err and REFERENCE_CACHE in err
        older = {k: v for k, v in cache.items() if k != "version"}  # scores without their patients (stop 13)
        older["strata"] = [{k: v for k, v in s.items() if k != "groups"} for s in cache["strata"]]
        (run / REFERENCE_CACHE).write_text(json.dumps(older))
        assert main(["check", str(run), str(site_ok), "--no-progress"]) == 1
        assert "from an older lungcad, without their patients" in capsys.readouterr().err
    finally:
        moved.rename(data)
        if (run / "kept.json").exists():
            (run / "kept.json").rename(run / REFERENCE_CACHE)


def _clustered(rng, patients: int, slices: int, shift: float = 0.0, name: str = "p") -> tuple[np.ndarray, np.ndarray]:
    """Scores of patients whose slices are alike: a patient effect (sd 1) plus slice noise (sd 0.3)."""
    means = rng.normal(shift, 1.0, patients)
    scores = (means[:, None] + rng.normal(0, 0.3, (patients, slices))).ravel()
    return scores, np.repeat([f"{name}{i}" for i in range(patients)], slices)


def test_shift_test_null_is_new_patients_not_shuffled_slices():
    """Clean sites of 5 new patients: slices of one patient are alike, so shuffling single images would
    call about a quarter of them shifted at alpha 0.05 (26 % here); pseudo-sites of whole patients keep near 5 %."""
    rng = np.random.default_rng(0)
    ref = _clustered(rng, 60, 8)
    clean = [patient_shift_test([_clustered(rng, 5, 8)[0]], [ref], 5, pseudo_sites=199, seed=d)["p_value"]
             for d in range(200)]
    shifted = [patient_shift_test([_clustered(rng, 5, 8, shift=2.0)[0]], [ref], 5, pseudo_sites=199, seed=d)["p_value"]
               for d in range(50)]
    assert np.mean(np.array(clean) < 0.05) <= 0.10
    assert np.mean(np.array(shifted) < 0.05) >= 0.8
    lower = patient_shift_test([_clustered(rng, 5, 8, shift=-2.0)[0]], [ref], 5, pseudo_sites=199)
    assert lower["p_value"] > 0.5  # one-sided: a site more typical than the reference is no reason to stop


def test_shift_test_sizes_strata_and_small_references():
    rng = np.random.default_rng(1)
    ref = _clustered(rng, 6, 4)
    far = patient_shift_test([np.full(12, 99.0)], [ref])  # 12 images / 4 per patient: 3 patients
    assert far["site_patients"] == 3 and far["site_patients_from"].startswith("estimated")
    assert far["exhaustive"] and far["pseudo_sites"] == 20 and far["p_value"] == pytest.approx(1 / 21)  # C(6, 3)
    assert far["auc"] == 1.0 and far["min_p_value"] == pytest.approx(1 / 21)
    big = patient_shift_test([np.full(12, 99.0)], [ref], site_patients=10)
    assert big["pseudo_site_patients"] == 3 and "conservative" in big["note"]  # at most half the reference
    # two members: a shift between them is no shift of the site (each side is compared within its member)
    a, b = _clustered(rng, 30, 4, name="a"), _clustered(rng, 30, 4, shift=3.0, name="b")
    strata = patient_shift_test([_clustered(rng, 3, 4)[0], _clustered(rng, 3, 4, shift=3.0)[0]], [a, b], 6,
                                pseudo_sites=999)
    assert strata["p_value"] > 0.05 and len(strata["strata"]) == 2 and strata["reference_patients"] == 60
    assert not patient_shift_test([np.zeros(3)], [(np.zeros(0), np.zeros(0))])["tested"]
    assert not patient_shift_test([np.zeros(3)], [(np.zeros(4), np.array(["p0"] * 4))])["tested"]  # one patient


def test_the_flagged_share_exceeds_the_maximum_only_when_its_whole_interval_does():
    # 2 of 20 flagged: 10 % > 5 %, but a small site's share is noisy (95 % CI 2.8-30.1 %): no mismatch
    small = flagged_share(2, 20, 0.05)
    assert small["share"] == 0.1 and small["ci95"][0] < 0.05 and not small["exceeds"]
    assert flagged_share(20, 200, 0.05)["exceeds"]  # the same 10 % of 200 images: CI 6.6-15.0 %
    assert not flagged_share(0, 20, 0.0)["exceeds"] and flagged_share(1, 20, 0.0)["exceeds"]


def test_flags_of_one_patient_weigh_as_one_patient_in_the_flagged_share():
    # a clean site of 25 patients as a 128 px model saw it (docs/ood.md): all 30 flags are slices of one
    # noisier patient with 59 slices; the other 24 patients have 117 slices
    site = [(30, 59)] + [(0, 5)] * 21 + [(0, 34)] * 3
    k, n = sum(f for f, _ in site), sum(m for _, m in site)
    assert (k, n) == (30, 266)
    independent = flagged_share(k, n, 0.05)
    assert independent["exceeds"]  # slices counted as independent: CI 8.0-15.6 %, wholly above 5 %
    clustered = flagged_share(k, n, 0.05, site)
    assert not clustered["exceeds"] and clustered["ci95"][0] < 0.05 < independent["ci95"][0]
    assert clustered["share"] == independent["share"] and clustered["patients"] == 25
    assert clustered["patients_flagged"] == 1 and clustered["design_effect"] > 10
    assert clustered["effective_images"] == pytest.approx(n / clustered["design_effect"], abs=0.1)
    # the same share spread over most patients is the site, not one patient: too many
    spread = [(2, 10)] * 15 + [(0, 10)] * 10
    assert flagged_share(30, 250, 0.05, spread)["exceeds"]
    # a shifted site is flagged on every patient: still too many, whatever the clustering
    assert flagged_share(n, n, 0.05, [(m, m) for _, m in site])["exceeds"]
    # 5 of 10 patients flagged on every slice: a real finding, not one odd patient
    half = [(6, 6)] * 5 + [(0, 6)] * 5
    assert flagged_share(30, 60, 0.05, half)["exceeds"]


def test_design_effect():
    # flags spread evenly over patients: as informative as independent images
    assert design_effect([(1, 10)] * 20) == 1.0
    # by hand: p = 4/20, cluster-robust variance m/(m-1) * sum((k - p n)^2) / n^2, binomial p(1-p)/n
    per = [(4, 10), (0, 5), (0, 5)]
    p, n, m = 0.2, 20, 3
    robust = m / (m - 1) * ((4 - p * 10) ** 2 + 2 * (0 - p * 5) ** 2) / n**2
    assert design_effect(per) == pytest.approx(robust / (p * (1 - p) / n))
    assert design_effect([(3, 12)]) == 12.0  # one patient, some of his slices flagged: one observation
    assert design_effect([(0, 12), (0, 3)]) == 1.0 and design_effect([(5, 5), (2, 2)]) == 1.0


def test_wilson_interval():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) is None
    # the hand-written interval (it takes the fractional effective counts scipy's does not) agrees with scipy's
    from scipy.stats import binomtest

    for k, n in ((0, 7), (3, 40), (17, 176), (50, 50)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_appearance_comparison_uses_the_site_median():
    profile = {"version": 1, "images": 100, "features": {
        "mean": {"q01": 40, "q05": 45, "median": 60, "q95": 75, "q99": 80, "lo": 30, "hi": 90}}}
    rng = np.random.default_rng(0)
    assert compare_appearance({"mean": rng.normal(60, 5, 50)}, profile)["differs"] == []
    # every image within the per-image range (30-90), but the typical one brighter than 95 % of the training images
    moved = compare_appearance({"mean": rng.uniform(78, 88, 50)}, profile)
    assert moved["differs"] == ["mean"] and moved["statistics"]["mean"]["share_outside_accepted_range"] == 0.0
    assert not compare_appearance({"mean": np.ones(3)}, {})["compared"]


def test_run_folder_lists_the_latest_check_per_site(tmp_path):
    run = tmp_path / "run"
    for folder, site, date, verdict in (("check-a", "a", "2025-01-01T00:00:00+00:00", "matches"),
                                        ("check-a-again", "a", "2025-02-01T00:00:00+00:00", "does not match"),
                                        ("check-b", "b", "2025-01-05T00:00:00+00:00", "matches")):
        (run / folder).mkdir(parents=True)
        (run / folder / "check.json").write_text(json.dumps({
            "site": site, "date": date, "verdict": verdict, "images": 10, "flagged": {"share": 0.1},
            "shift": {"p_value": 0.5}, "reasons": []}))
    (run / "check-broken").mkdir()
    (run / "check-broken" / "check.json").write_text("{not json")
    checks = RunFolder(run).site_checks()
    assert [(c["site"], c["verdict"], c["folder"]) for c in checks] == [("a", "does not match", "check-a-again"),
                                                                         ("b", "matches", "check-b")]
    assert checks[1]["flagged_share"] == 0.1 and checks[1]["p_value"] == 0.5
    assert RunFolder(tmp_path / "nothing").site_checks() == []


@pytest.mark.slow
def test_fold_ensemble_is_checked_against_out_of_fold_reference(tmp_path, site_ok):
    data = make_dataset(tmp_path / "data", patients=4, slices=3, size=48)
    cv = tmp_path / "cv"
    assert main(["train", "--data", str(data), "--out", str(cv), "--pretrained", "none", "--image-size", "32",
                 "--epochs", "1", "--folds", "2", "--batch-size", "8", "--no-progress"]) == 0
    main(["check", str(cv), str(site_ok), "--no-progress"])
    report = json.loads((cv / "check-hospital-b" / "check.json").read_text())
    assert report["ensemble_members"] == 2 and report["reference"]["kind"] == "development images, out-of-fold"
    assert report["reference"]["images"] == 36  # every development image, each scored by the member that never saw it
    assert "never saw it" in report["reference"]["description"]
    assert [s["site"] for s in report["shift"]["strata"]] == [18, 18]  # the site shared among the members
    assert report["shift"]["tested"]
    assert main(["check", str(cv), str(colour_tiles(tmp_path / "tiles")), "--no-progress"]) == 3


def test_a_patient_with_many_slices_counts_once_in_the_site_median():
    """A site of 5 patients where one unusual patient has 40 slices and the others 3 each: over
    images that patient is the site's median; over patients' medians it is one of five."""
    profile = {"version": 1, "images": 100, "features": {
        "mean": {"q01": 40, "q05": 45, "median": 60, "q95": 75, "q99": 80, "lo": 30, "hi": 90}}}
    values = np.r_[np.full(40, 85.0), np.tile([55.0, 60.0, 62.0, 58.0], 3)]
    patients = np.r_[np.zeros(40, int), np.tile([1, 2, 3, 4], 3)]
    by_image = compare_appearance({"mean": values}, profile)
    assert by_image["differs"] == ["mean"] and by_image["statistics"]["mean"]["site_median"] == 85.0
    by_patient = compare_appearance({"mean": values}, profile, patients)
    assert by_patient["differs"] == [] and by_patient["patients"] == 5
    assert by_patient["statistics"]["mean"]["site_median"] == 60.0  # median of 85, 55, 60, 62, 58
    # a whole site that is unusual still differs
    assert compare_appearance({"mean": values + 20}, profile, patients)["differs"] == ["mean"]


def test_the_check_counts_image_files_by_their_inferred_patients(first_check, site_ok):
    """site_ok: 36 PNGs of 4 synthetic patients per class, 3 numbered slices each: counted by the
    patient proxies training would infer for them (12 slice runs, or fewer where two synthetic
    patients look alike), not by image."""
    from lungcad.data.discovery import Sample
    from lungcad.data.grouping import assign_groups, scan_images

    samples = [Sample(f, "") for f in sorted(site_ok.rglob("*.png"))]
    proxies = len(set(assign_groups(samples, scan_images(samples)[0])))
    a = first_check["report"]["appearance"]
    assert a["images"] == 36 and 9 <= a["patients"] == proxies <= 12
    assert a["patients_from"].startswith("inferred as for training")
    assert a["rule"].startswith("a statistic differs when the median of the site's patients' medians")


def test_site_patients_are_its_dicom_studies_when_every_image_has_one():
    from lungcad.inference.results import Prediction
    from lungcad.inference.site_check import _site_patient_ids

    def pred(name: str, study: str | None) -> Prediction:
        dicom = {"StudyInstanceUID": study} if study else {}
        return Prediction(name, {}, "normal", 0.1, "not malignant", False, 0.5, dicom=dicom)

    preds = [pred("a.dcm", "1.2.1"), pred("b.dcm", "1.2.1"), pred("c.dcm", "1.2.2")]
    ids, source = _site_patient_ids(preds, ["a.dcm", "b.dcm", "c.dcm"])
    assert ids.tolist() == ["1.2.1", "1.2.1", "1.2.2"] and source == "DICOM studies"
