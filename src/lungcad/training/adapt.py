"""`lungcad adapt RUNDIR DATA --out RUNDIR2`: label-free site adaptation of a finished run (AdaBN).

A new site's scanner or export shifts the intensities of its images, which shifts the activation
statistics of every layer; the BatchNorm layers keep normalising with the training site's. AdaBN
(Li et al., "Revisiting batch normalization for practical domain adaptation", 2016) re-estimates
each BatchNorm layer's running mean and variance on the site's own unlabelled images; every learnt
weight stays. Measured (benchmarks/site_adaptation.py, docs/ood.md): 25 unseen patients re-rendered
at a lung window instead of the training soft-tissue window took a member's malignant ROC-AUC from
0.949 to 0.738 and its balanced accuracy to 0.350; AdaBN on their unlabelled images brought them
back to 0.943 and 0.581 (fine-tuning on 4-8 labelled patients did worse).

What RUNDIR2 is:

- **A copy of RUNDIR** (single run or fold ensemble) with every file the loaders read, except the
  results computed from the source's weights that would describe a model RUNDIR2 no longer holds:
  `SKIPPED` (site-check reports and their cached reference scores, evaluation folders of other
  data, exported ONNX/OpenVINO models; exports are rebuilt on demand, the reference cache is keyed
  by the weights' sha256 anyway).
- **Each model adapted**: every ensemble member (or the single model) gets `adapt_batchnorm` on
  the same site images and is saved with `save_model` (new sha256); the ensemble's contract gets its
  members' new sha256 and `ensemble_sha256` of them, as `lungcad train --folds` writes it.
- **Lineage** in every contract's `init` (and a single run's init.json): the source folder and its
  weights' sha256, the method, the number of site images and their fingerprint, what the source
  itself started from, and the caveats below.
- **Appearance profile re-fitted** on the site images: the adapted model expects the site's
  appearance now; with the source's profile every site image would be flagged "rendered at a
  different window".
- **Feature-space OOD detector kept** as it is: after AdaBN the site's features are centred the
  way the training features were, so the source's detector should still describe them;
  `lungcad check RUNDIR2 DATA` measures whether that holds: its flagged share. (Its score-shift
  test compares the site with the source's reference images, which the adapted model no longer
  normalises for: there a site scoring *lower* than the reference is expected, not a shift.)

What it does not do: no labels are used, so the temperature, the thresholds and the operating
point are the source's, not validated at the site (a warning, and `init["operating_point"]`);
labelled local cases must confirm the operating point before clinical use (`lungcad calibrate
RUNDIR2 LOCAL --out RUNDIR3` re-fits it on them: lungcad.evaluation.site_calibration). The metrics in
model.json, metrics.json and crossval.json are the source's, measured before adaptation
(`init["metrics"]`). The site images should be a sample of its usual case mix: the statistics
follow whatever they are given.

Site images are found exactly as `lungcad check` finds them (`iter_inputs`: recursive, by
content) and read through the source's `Predictor` (DICOM rendered at the contract's window,
one frame per file, the middle one of a multi-frame file, as the check's appearance statistics);
unreadable files are skipped and counted. Memory: the site cache is uint8 at the model's input
size, N x C x S x S bytes (C = 1 for a greyscale model, 3 for colour; 2000 images at 224 px x 3
channels = 301 MB), N capped by `--max-images` (a random sample, fixed seed).

Nothing half-written: RUNDIR2 is built in a hidden sibling folder and renamed at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lungcad.errors import LungcadError, first_line
from lungcad.inference.appearance import fit_profile
from lungcad.inference.inputs import iter_inputs
from lungcad.models.contract import (
    CONTRACT_FILE,
    ensemble_members,
    ensemble_sha256,
    load_model,
    read_contract,
    save_model,
)
from lungcad.training.init_from import SOURCE_KIND, adapt_batchnorm
from lungcad.utils import atomic_write_json, sha256_file

__all__ = ["MAX_IMAGES", "METHOD", "MIN_IMAGES", "SKIPPED", "SiteImages", "adapt_run", "check_copy_out", "read_site",
           "run_copy", "site_fingerprint"]

log = logging.getLogger(__name__)

MIN_IMAGES = 32  # fewer images estimate the deep layers' statistics (2048 channels x 7 x 7 px) too noisily
MAX_IMAGES = 2000  # default cap of --max-images: ~300 MB of uint8 at 224 px in colour
SEED = 0  # the random sample of a site with more images than --max-images
METHOD = "AdaBN (BatchNorm statistics re-estimated, no labels)"
OPERATING_POINT = "inherited from the source, not validated at the site"
METRICS = "the source's, measured before adaptation"
# results of the source's weights (see the module docstring); matched against every folder's entries
SKIPPED = ("check-*", "eval-*", "export", "site-check-reference.json")


@dataclass
class SiteImages:
    cache: torch.Tensor  # uint8 (N, C, S, S), prepared under the source's contract
    files: list[Path]  # the N files, in cache order
    unreadable: list[tuple[Path, str]]  # (file, reason) of the files skipped
    found: int  # files discovered in DATA


def read_site(predictor, data: Path, max_images: int = MAX_IMAGES, seed: int = SEED) -> SiteImages:
    """The site's readable images, prepared as the predictor's model expects (see module docstring).

    Files are read in a random order (fixed seed) until `max_images` are readable, so a cap keeps a
    random sample and costs no decoding beyond it.
    """
    found = list(iter_inputs([data]))
    if len(found) == 1 and found[0][1] and found[0][0] == data:
        raise LungcadError(found[0][1], data)  # "folder holds no image or DICOM files"
    paths = [p for p, _ in found]
    order = np.random.default_rng(seed).permutation(len(paths)) if len(paths) > max_images else range(len(paths))
    pp = predictor.pp
    cache = torch.zeros((min(len(paths), max_images), pp.channels, pp.image_size, pp.image_size), dtype=torch.uint8)
    files: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for i in order:
        if len(files) == len(cache):
            break
        try:
            pixels, _ = predictor.load_pixels(paths[i])
            prepared = predictor.prepare(pixels)
        except LungcadError as exc:
            bad.append((paths[i], str(exc)))
            continue
        except Exception as exc:  # a decoder bug on one odd file must not stop the site (as predict)
            bad.append((paths[i], f"unexpected error while reading ({type(exc).__name__}: {first_line(exc, 250)})"))
            continue
        cache[len(files)] = prepared
        files.append(paths[i])
    for path, reason in bad:
        log.warning("unreadable: %s: %s", path, reason)
    return SiteImages(cache[: len(files)], files, bad, len(paths))


def site_fingerprint(files: list[Path]) -> str:
    """sha256 over the sorted (file name, content sha256) of the site images used: the same
    images give the same fingerprint wherever they are (like training's data fingerprint)."""
    h = hashlib.sha256()
    for name, sha in sorted((f.name, sha256_file(f)) for f in files):
        h.update(f"{name},{sha}\n".encode())
    return h.hexdigest()


def check_copy_out(out: Path, run_dir: Path) -> None:
    """--out must be new (or an empty folder), outside RUNDIR, somewhere writable."""
    from lungcad.training.trainer import check_out_dir

    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise LungcadError("--out must be outside the source run folder", out)
    if out.exists():
        if not out.is_dir() or any(out.iterdir()):
            raise LungcadError("--out already exists and is not empty (choose a new folder)", out)
        return
    check_out_dir(out)


def _skip_source_results(folder: str, names: list[str]) -> set[str]:
    """`shutil.copytree`'s ignore: the entries of SKIPPED (results of the source's weights)."""
    import fnmatch

    return {n for n in names for pattern in SKIPPED if fnmatch.fnmatch(n, pattern)}


@contextlib.contextmanager
def run_copy(run_dir: Path, out: Path, doing: str) -> Iterator[Path]:
    """A copy of `run_dir` without SKIPPED, under a temporary name beside `out`, to be edited in the
    block; renamed to `out` when the block completes (an empty `out` folder is replaced), removed on
    any error or interruption: nothing half-written. `doing` names the temporary folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{doing}-"))
    try:
        shutil.copytree(run_dir, tmp, ignore=_skip_source_results, dirs_exist_ok=True)
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapt_run(run_dir: str | Path, data: str | Path, out: str | Path, max_images: int = MAX_IMAGES,
              batch_size: int = 32, device: str = "auto", seed: int = SEED) -> dict:
    """Write RUNDIR2 = `out` (module docstring); returns a summary: out, images, unreadable, models."""
    from lungcad.distributed import resolve_device
    from lungcad.inference.predictor import Predictor

    run_dir, data, out = Path(run_dir), Path(data), Path(out)
    if max_images < MIN_IMAGES:
        raise LungcadError(f"--max-images must be at least {MIN_IMAGES}, not {max_images}")
    if batch_size < 2:
        raise LungcadError(f"--batch-size must be at least 2 (BatchNorm statistics need a batch), not {batch_size}")
    contract = read_contract(run_dir)  # one-line errors for a missing or unfinished run folder
    if not data.exists():
        raise LungcadError("site folder not found", data)
    if not data.is_dir():
        raise LungcadError("not a folder (lungcad adapt takes the folder of a site's unlabelled images)", data)
    check_copy_out(out, run_dir)
    dev = resolve_device(device)

    predictor = Predictor(run_dir)  # the source's reading path: DICOM at the contract's window
    site = read_site(predictor, data, max_images, seed)
    del predictor
    n = len(site.files)
    log.info("site %s: %d image(s) read of %d file(s) found, %d unreadable skipped", data, n, site.found,
             len(site.unreadable))
    if site.found - len(site.unreadable) > n:
        log.info("--max-images %d: a random sample (seed %d) of the site's images is used", max_images, seed)
    if n < MIN_IMAGES:
        raise LungcadError(f"only {n} readable image(s) ({len(site.unreadable)} unreadable); adapt needs at least "
                           f"{MIN_IMAGES} to re-estimate the BatchNorm statistics", data)
    c = site.cache
    log.info("site cache: %d x %d x %d x %d uint8 = %.1f MB", *c.shape, c.numel() / 1e6)
    lineage = {"pretrained": SOURCE_KIND, "method": METHOD, "site_images": n, "site_data": str(data.resolve()),
               "site_data_fingerprint_sha256": site_fingerprint(site.files), "operating_point": OPERATING_POINT,
               "metrics": METRICS}

    with run_copy(run_dir, out, "adapting") as tmp:
        models = _adapt_models(tmp, run_dir, contract, site.cache, lineage, fit_profile(site.cache), batch_size, dev)
    log.warning("%s: temperature, thresholds and operating point are the source's and were not validated at the "
                "site (no labels were used); re-fit it on labelled local cases (lungcad calibrate) before clinical use",
                out)
    return {"out": str(out), "images": n, "unreadable": len(site.unreadable), "files": site.found, "models": models}


def _adapt_models(tmp: Path, source: Path, contract, cache: torch.Tensor, lineage: dict, profile: dict,
                  batch_size: int, device: torch.device) -> int:
    """AdaBN on every model of the copied run folder `tmp`; returns how many were adapted."""
    pp = contract.preprocessing
    if not contract.ensemble:
        _adapt_one(tmp, source, cache, pp, lineage, profile, batch_size, device)
        return 1
    members = ensemble_members(tmp, contract)  # sha256 of each member's contract checked
    shas = []
    for (member_dir, _), entry in zip(members, contract.ensemble["members"], strict=True):
        shas.append(_adapt_one(member_dir, source / entry["path"], cache, pp, lineage, profile, batch_size, device))
        entry["model_sha256"] = shas[-1]
    _record_adaptation(contract, source, lineage, profile)
    contract.model_sha256 = ensemble_sha256(shas)
    atomic_write_json(tmp / CONTRACT_FILE, contract.to_dict())
    ensemble_members(tmp, read_contract(tmp))  # the ensemble loads: its record matches every member
    return len(shas)


def _adapt_one(model_dir: Path, source: Path, cache: torch.Tensor, pp, lineage: dict, profile: dict, batch_size: int,
               device: torch.device) -> str:
    """AdaBN on one run folder's model, saved in place; returns its new sha256."""
    model, contract = load_model(model_dir)  # the weights' sha256 checked
    if contract.preprocessing != pp:
        raise LungcadError("this model preprocesses its input differently from the run's contract; "
                           "the site images cannot be prepared for both", model_dir)
    source_sha = contract.model_sha256
    adapt_batchnorm(model.to(device), cache, pp, batch_size=batch_size, device=device)
    _record_adaptation(contract, source, lineage, profile)
    save_model(model_dir, model, contract)
    if (model_dir / "init.json").is_file():
        atomic_write_json(model_dir / "init.json", contract.init)
    log.info("%s: BatchNorm statistics re-estimated (weights sha256 %s -> %s)", source, source_sha[:16],
             contract.model_sha256[:16])
    return contract.model_sha256


def _record_adaptation(contract, source: Path, lineage: dict, profile: dict) -> None:
    """The contract's lineage (`init`: what it was adapted from, on what) and, where it has one, its
    appearance profile replaced by the site's `profile`, before it is saved."""
    contract.init = {**lineage, "adapted_from": str(source.resolve()), "source_model_sha256": contract.model_sha256,
                     "source_init": contract.init}
    if contract.appearance:
        contract.appearance = profile
