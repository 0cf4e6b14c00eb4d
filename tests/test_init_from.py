"""Site adaptation: `lungcad train --init-from RUNDIR` (lungcad.training.init_from).

A source run is trained once (32 px, window 40,400, 1 epoch); fine-tuning runs start from it on
another synthetic dataset. With `--finetune fc --lr 0` nothing may move (frozen trunk with its
BatchNorm in eval mode, a zero learning rate for the head), so the fine-tuned weights equal the
source's exactly if, and only if, they were loaded from it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import make_dataset

from lungcad.cli import main
from lungcad.run import RunFolder
from lungcad.training.config import TrainConfig
from lungcad.training.init_from import inherit

pytestmark = pytest.mark.slow

FAST = ["--batch-size", "8", "--no-progress"]
FROZEN = ["--finetune", "fc", "--lr", "0", "--epochs", "1", "--no-augment"]  # nothing can move


@pytest.fixture(scope="module")
def source(module_tmp) -> tuple[Path, Path]:
    """(source run, a site's labelled data folder)."""
    root = module_tmp("init_from")
    data = make_dataset(root / "data", patients=4, slices=3, size=48)
    run = root / "source"
    assert main(["train", "--data", str(data), "--out", str(run), "--pretrained", "none", "--image-size", "32",
                 "--window=40,400", "--epochs", "1", *FAST]) == 0
    return run, make_dataset(root / "site", patients=4, slices=3, size=48, seed=1)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_fine_tuning_inherits_preprocessing_records_lineage_and_starts_from_the_source(source, tmp_path):
    src, site = source
    out = tmp_path / "adapted"
    assert main(["train", "--init-from", str(src), "--data", str(site), "--out", str(out), *FROZEN, *FAST]) == 0
    new, old = RunFolder(out).contract(), RunFolder(src).contract()
    pp = new.preprocessing
    assert pp.image_size == 32 and pp.window == (40.0, 400.0) and pp.window_source == "declared"  # no --image-size
    assert pp.colour == old.preprocessing.colour == "grey"
    assert new.init == {
        "pretrained": "lungcad-run", "source": str(src.resolve()), "source_model_sha256": old.model_sha256,
        "source_data_fingerprint_sha256": old.training["data_fingerprint_sha256"], "source_init": {"pretrained": "none"},
    }
    assert json.loads((out / "init.json").read_text()) == new.init
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(src) and config["pretrained"] == "lungcad-run" and config["image_size"] == 32
    assert new.training["data_fingerprint_sha256"] != old.training["data_fingerprint_sha256"]
    assert _same_weights(out, src)  # the weights were loaded, head included
    # the control: the same recipe from random initialisation does not give the source's weights
    control = tmp_path / "control"
    assert main(["train", "--pretrained", "none", "--image-size", "32", "--data", str(site), "--out", str(control),
                 *FROZEN, *FAST]) == 0
    assert not _same_weights(control, src)


def test_command_line_overrides_win_over_the_source(source):
    src, _ = source
    cfg = TrainConfig(data="d", out="o", init_from=str(src), image_size=48)
    assert inherit(cfg, {"image_size"}).image_size == 48
    inherited = inherit(cfg, set())
    assert (inherited.image_size, inherited.window, inherited.colour) == (32, "40,400", "grey")
    assert inherit(TrainConfig(data="d", out="o", init_from=str(src), window="0,100"), {"window"}).window == "0,100"


def test_mismatched_task_and_conflicting_options_are_refused(source, tmp_path, capsys):
    src, site = source
    cases = [
        (["--task", "binary"], "the source model is multiclass (normal, benign, malignant), this run would train binary"),
        (["--pretrained", "none"], "--init-from replaces --pretrained"),
        (["--weights", str(src / "model.safetensors")], "--init-from and --weights are alternatives"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        out = tmp_path / "refused"
        assert main(["train", "--init-from", str(src), "--data", str(site), "--out", str(out), *extra, *FAST]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not out.exists()  # nothing left behind
    assert main(["train", "--init-from", str(tmp_path / "nope"), "--data", str(site), "--out", str(tmp_path / "x"),
                 *FAST]) == 1
    assert "run folder not found" in capsys.readouterr().err
    other = tmp_path / "other-arch"  # a run of an architecture lungcad train does not build
    shutil.copytree(src, other)
    contract = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**contract, "arch": "vit_b_16"}))
    assert main(["train", "--init-from", str(other), "--data", str(site), "--out", str(tmp_path / "y"), *FAST]) == 1
    assert "the source is a vit_b_16; lungcad train builds resnet50" in capsys.readouterr().err


def test_folds_start_from_the_source_and_an_ensemble_source_gives_its_first_member(source, tmp_path, caplog):
    src, site = source
    cv = tmp_path / "cv"
    assert main(["train", "--init-from", str(src), "--data", str(site), "--out", str(cv), "--folds", "2",
                 "--epochs", "1", *FAST]) == 0
    sha = RunFolder(src).contract().model_sha256
    for k in (1, 2):
        member = RunFolder(cv / f"fold-{k}").contract()
        assert member.init["source_model_sha256"] == sha and member.preprocessing.image_size == 32
    ensemble = RunFolder(cv).contract()
    assert ensemble.init["pretrained"] == "lungcad-run" and ensemble.preprocessing.window == (40.0, 400.0)
    # fine-tuning from a fold ensemble starts from its member fold-1, and says so
    caplog.set_level(logging.WARNING)
    out = tmp_path / "from-ensemble"
    assert main(["train", "--init-from", str(cv), "--data", str(site), "--out", str(out), *FROZEN, *FAST]) == 0
    assert "is a fold ensemble: fine-tuning starts from its member fold-1" in caplog.text
    init = RunFolder(out).contract().init
    assert init["source_member"] == "fold-1" and init["source_ensemble_sha256"] == ensemble.model_sha256
    assert init["source_model_sha256"] == RunFolder(cv / "fold-1").contract().model_sha256
    assert _same_weights(out, cv / "fold-1")


def test_adapt_bn_re_estimates_only_the_batchnorm_statistics(source, tmp_path, capsys):
    """--adapt-bn with nothing else able to move: every weight is the source's, every BatchNorm
    running statistic is the site's; the contract says how many images they came from."""
    src, site = source
    out = tmp_path / "adabn"
    assert main(["train", "--init-from", str(src), "--data", str(site), "--out", str(out), "--adapt-bn",
                 *FROZEN, *FAST]) == 0
    new, old = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    stats = [k for k in new if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not new[k].equal(old[k]) for k in stats)
    assert all(new[k].equal(old[k]) for k in new if k not in stats and not k.endswith("num_batches_tracked"))
    train_images = json.loads((out / "data.json").read_text())["split"]["train"]["images"]
    assert RunFolder(out).contract().init["adapt_bn_images"] == train_images
    # without a source there is nothing to adapt
    capsys.readouterr()
    assert main(["train", "--data", str(site), "--out", str(tmp_path / "no-source"), "--pretrained", "none",
                 "--adapt-bn", *FAST]) == 1
    assert "--adapt-bn re-estimates a trained model's BatchNorm statistics on a new site: it needs --init-from" \
        in capsys.readouterr().err
    assert not (tmp_path / "no-source").exists()


def test_adapt_batchnorm_gives_the_first_layer_the_mean_of_the_site_images():
    """The first BatchNorm's running mean is the mean of conv1's output over the images (equal-size
    batches: the cumulative average of batch means is the overall mean)."""
    import torch

    from lungcad.data.transforms import Preprocessing, normalise
    from lungcad.models.factory import create_model
    from lungcad.training.init_from import adapt_batchnorm

    torch.manual_seed(0)
    model = create_model(outputs=3)[0].eval()
    pp = Preprocessing(image_size=32)
    cache = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    assert adapt_batchnorm(model, cache, pp, batch_size=4) == 12
    with torch.no_grad():
        expected = model.conv1(torch.stack([normalise(x, pp) for x in cache])).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    assert not model.training  # the mode it came in
