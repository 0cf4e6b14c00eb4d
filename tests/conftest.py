"""Shared fixtures: tiny synthetic lung-like datasets and run folders written to tmp folders, and
DICOM series built from pydicom's CT test slice (`ct_slice`).

Run folders come two ways: `make_run` writes a random-init model and its contract (no training:
predict, explain and the OOD and appearance checks need only the contract), and the
session-scoped `trained_run` is one real `lungcad train` of one epoch, built once and shared
read-only (a test that writes into a run folder copies it first).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny models on tiny images: one intra-op thread is about as fast as two on an idle machine and many
# times faster on a busy one (OpenMP threads spin at every barrier for a sibling that the scheduler
# gave to another process: a 64 px ResNet-50 forward pass took 4 s instead of 0.1 s on this project's
# 2-core machines while a training job ran). LUNGCAD_TEST_THREADS=N overrides; the CLI subprocesses
# the tests start inherit it through OMP_NUM_THREADS.
TEST_THREADS = int(os.environ.get("LUNGCAD_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))

SHARED_DATA = Path(os.environ.get("LUNGCAD_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IQOTH = SHARED_DATA / "iqothnccd"
LC25000 = SHARED_DATA / "lc25000_lung_sample"

FOLDERS = {"normal": "Normal cases", "benign": "Bengin cases", "malignant": "Malignant cases"}
CLASSES = ["normal", "benign", "malignant"]
# `lungcad train` options for the tiny test runs: random init, 64 px, no progress bars
TRAIN_FAST = ["--pretrained", "none", "--image-size", "64", "--batch-size", "8", "--no-progress"]
ACCESSION = "ACC-7734-SECRET"  # ct_slice's Accession Number: an identifier that must not leave the system
# ct_slice's patient module and General Study attributes: kept (ExamIdentifiers) to file results in the
# PACS, and like the accession number never to leave the system otherwise
PATIENT = {"PatientName": "Doe^Jane^Quinn-SECRET", "PatientID": "PID-4471-SECRET", "IssuerOfPatientID": "HOSP-SECRET",
           "PatientBirthDate": "19470312", "PatientSex": "F", "StudyDate": "20240229", "StudyTime": "081502.250",
           "ReferringPhysicianName": "Welby^Marcus-SECRET", "StudyID": "SID-SECRET"}


def ct_slice(study: str, series: str, number: int, *, sop: str | None = None, modality: str = "CT",
             accession: str = ACCESSION, bright: int = 0) -> bytes:
    """pydicom's CT_small.dcm as slice `number` of `series` in `study` (distinct pixels per slice): a
    multi-slice series is `[ct_slice(study, series, i) for i in 1..n]` with `generate_uid()` UIDs."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber, ds.Modality, ds.AccessionNumber = number, modality, accession
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    arr = ds.pixel_array.astype(np.int32) + number * 7 + bright
    ds.PixelData = np.clip(arr, 0, 4000).astype(ds.pixel_array.dtype).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def synthetic_slice(rng: np.random.Generator, label: str, patient_seed: int, slice_no: int, size: int = 64) -> np.ndarray:
    """A grey 'CT slice': a bright ellipse (body) on black, with a class-dependent blob.

    Slices of one patient differ only slightly (neighbouring slices), different patients a lot.
    """
    prng = np.random.default_rng(patient_seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + prng.uniform(-4, 4), size / 2 + prng.uniform(-4, 4)
    ry, rx = size * prng.uniform(0.28, 0.36), size * prng.uniform(0.38, 0.45)
    body = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) <= 1
    img = np.where(body, 90 + prng.uniform(-20, 20), 0).astype(np.float64)
    texture = prng.normal(0, 25, (size, size))
    img += np.where(body, texture, 0) + rng.normal(0, 2, (size, size)) + slice_no * 0.5
    blob = {"normal": 0, "benign": 60, "malignant": 140}[label]
    if blob:
        by, bx = cy + prng.uniform(-6, 6), cx + prng.uniform(-8, 8)
        r = 4 if label == "benign" else 7
        img += np.where(((yy - by) ** 2 + (xx - bx) ** 2) <= r * r, blob, 0)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: Path, patients: int = 5, slices: int = 3, size: int = 64, seed: int = 0) -> Path:
    """IQ-OTH/NCCD-like layout: `<Class> cases/<Class> case (N).jpg`, N in slice order per patient."""
    rng = np.random.default_rng(seed)
    for ci, (label, folder) in enumerate(FOLDERS.items()):
        d = root / folder
        d.mkdir(parents=True)
        n = 1
        stem = folder.split()[0]
        for p in range(patients):
            for s in range(slices):
                arr = synthetic_slice(rng, label, seed * 1000 + ci * 100 + p, s, size)
                Image.fromarray(arr, "L").save(d / f"{stem} case ({n}).png")
                n += 1
            n += 3  # a gap in numbering between patients, like withheld slices
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


def make_run(run: Path, task: str = "multiclass", size: int = 64, *, pp=None, ood: tuple[int, int] | None = None,
             appearance: list[np.ndarray] | None = None, seed: int = 0, **contract) -> Path:
    """A run folder with a random-init ResNet-50 (no training) and its contract.

    `pp`: the Preprocessing (default: `size` px, the default window); `ood`: numbers of synthetic
    slices the feature-space detector is fitted / thresholded on; `appearance`: decoded training
    images for the appearance profile; `contract`: other ModelContract fields (temperature,
    thresholds). Seeded: the same arguments give the same model.
    """

    from lungcad.data.transforms import Preprocessing, prepare
    from lungcad.inference.appearance import fit_profile
    from lungcad.inference.ood import fit_ood
    from lungcad.models.contract import ModelContract, save_model
    from lungcad.models.factory import create_model

    torch.manual_seed(seed)
    run.mkdir(parents=True)
    classes = ["not_malignant", "malignant"] if task == "binary" else list(CLASSES)
    model, _ = create_model("resnet50", outputs=1 if task == "binary" else 3, pretrained="none")
    model.eval()
    pp = pp if pp is not None else Preprocessing(image_size=size)
    meta = ModelContract(arch="resnet50", task=task, classes=classes, preprocessing=pp, **contract)
    if ood is not None:
        rng = np.random.default_rng(seed)
        cache = lambda n, off: torch.stack(  # noqa: E731
            [prepare(synthetic_slice(rng, CLASSES[i % 3], off + i, i % 4), pp) for i in range(n)])
        meta.ood = fit_ood(run, model, cache(ood[0], 0), cache(ood[1], 1000), pp)
    if appearance is not None:
        meta.appearance = fit_profile(torch.stack([prepare(px, pp) for px in appearance]))
    save_model(run, model, meta)
    return run


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """`tmp_path_factory.mktemp` for module-scoped fixtures, whose directories go when the module is done.

    Most fixtures hold ResNet-50 run folders (about 100 MB each, a multiple of that with members or
    resumable checkpoints): kept to the end of the session they added up to 7 GB and filled a small disk.
    """
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory) -> Path:
    """A multiclass 64 px random-init run with a feature-space OOD detector, temperature 1.5 and a
    0.5 malignant threshold: what the prediction tests share. Read-only."""
    return make_run(tmp_path_factory.mktemp("predict") / "run", ood=(24, 8), temperature=1.5,
                    thresholds={"malignant": 0.5})


class TrainedRun(NamedTuple):
    data: Path  # make_dataset's default dataset (5 patients x 3 slices per class, 64 px)
    run: Path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> TrainedRun:
    """`lungcad train` for one epoch (TRAIN_FAST) on make_dataset's default dataset, once per session.

    Read-only: a test that writes into the run folder works on `copy_run(trained_run.run, ...)`.
    """
    from lungcad.cli import main

    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "data")
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TRAIN_FAST]) == 0
    return TrainedRun(data, run)


def copy_run(run: Path, dst: Path) -> Path:
    """A private copy of a shared run folder, for tests that write into it."""
    return Path(shutil.copytree(run, dst))
