"""The `lungcad` command line: one subcommand per job. `main(argv)` is what tests call."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
from pathlib import Path

from lungcad import __version__
from lungcad.errors import LungcadError, os_error_message
from lungcad.utils import atomic_write_json, setup_logging, sigterm_as_ctrl_c

log = logging.getLogger("lungcad")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    from lungcad.training.config import TrainConfig  # defaults stated once, there (no torch import)

    parser = argparse.ArgumentParser(prog="lungcad", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lungcad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("audit", help="check a dataset: counts, unreadable files, duplicates, shortcuts, groups")
    p.add_argument("data", help="folder of class folders, or a CSV manifest path,label[,group]")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    p.add_argument("--label-map", action="append", default=[], metavar="FOLDER=LABEL")
    _add_common(p)

    p = sub.add_parser("train", help="train a ResNet-50 into a run folder")
    p.add_argument("--data", required=False, help="folder of class folders, or a CSV manifest")
    p.add_argument("--out", required=True, metavar="RUNDIR", help="run folder to create (or to resume)")
    p.add_argument("--task", choices=["multiclass", "binary"], default="multiclass")
    p.add_argument("--pretrained", choices=["imagenet", "none"], default=None,
                   help="backbone initialisation (default imagenet; needs the weights cached or --weights)")
    p.add_argument("--weights", metavar="FILE", help="local torchvision ResNet-50 weights (.pth/.safetensors)")
    p.add_argument("--init-from", metavar="RUNDIR",
                   help="site adaptation: fine-tune this lungcad run's model (a fold ensemble: its member fold-1); "
                        "image size, colour and window are the source's unless given here; task and classes must match")
    p.add_argument("--finetune", choices=["fc", "layer4", "all"], default="all")
    p.add_argument("--head-epochs", type=int, default=0, help="staged: train only the head first for N epochs")
    p.add_argument("--adapt-bn", action="store_true",
                   help="with --init-from: re-estimate every BatchNorm layer's statistics on the site's training "
                        "images before fine-tuning (AdaBN; with --finetune fc/layer4 the frozen layers keep them)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 20)")
    p.add_argument("--patience", type=int, default=6, help="early stopping on validation macro-F1")
    p.add_argument("--image-size", type=int, default=None, help="input size in px (default 224, or the --init-from source's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fold-seed", type=int, default=None, metavar="N",
                   help="with --folds: seed of the fold assignment (default: --seed); another --seed with the same "
                        "--fold-seed trains a replicate on the same folds")
    p.add_argument("--split", metavar="FILE", help="reuse a split.csv (path,label,group,subset)")
    p.add_argument("--label-map", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--colour", choices=["auto", "grey", "rgb"], default=None,
                   help="default auto (grey if every image is), or the --init-from source's")
    p.add_argument("--window", metavar="L,W",
                   help="the CT window (level,width in HU) the training images were rendered at, e.g. "
                        "--window=195,480 for IQ-OTH/NCCD (docs/window.md); stored in the model contract, DICOM "
                        "input is then rendered the same way (default: undeclared, lung window -600,1500 with a warning)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--extra-data", metavar="DIR", help="training-only extra images (e.g. feedback export)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no training augmentation")
    p.add_argument("--augment-policy", default=None, metavar="NAME",
                   help=f"training augmentation: geometry, intensity or strong (default {TrainConfig.augment_policy}; "
                        "lungcad.data.transforms.AUGMENT_POLICIES, chosen in docs/ablations.md)")
    p.add_argument("--balance", choices=["loss", "sampler"], default=None,
                   help=f"class imbalance: weighted loss or class-balanced batches (default {TrainConfig.balance})")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help=f"cross-entropy label smoothing (default {TrainConfig.label_smoothing})")
    p.add_argument("--ema-decay", type=float, default=None,
                   help=f"weight EMA decay per step, 0 = off (default {TrainConfig.ema_decay})")
    p.add_argument("--mixup", type=float, default=None, metavar="ALPHA",
                   help=f"MixUp on each batch with Beta(ALPHA, ALPHA) weights, 0 = off (default {TrainConfig.mixup})")
    p.add_argument("--cutmix", type=float, default=None, metavar="ALPHA",
                   help=f"CutMix likewise (default {TrainConfig.cutmix}); with --mixup too, one of them per batch")
    p.add_argument("--fusion", choices=["none", "texture"], default=None,
                   help="with --folds: fuse a texture head (intensity, GLCM, LBP features; logistic regression) "
                        f"with the network, equal weights (default {TrainConfig.fusion}; docs/ablations.md)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"validation share (default {TrainConfig.val_fraction}; with --folds 0: fixed epochs, "
                        "calibration on the pooled out-of-fold predictions)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: the rank's GPU)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision (auto: bf16/fp16 on GPUs, bf16 on CPUs with native bf16, else off)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    p.add_argument("--target-sensitivity", type=float, default=0.95,
                   help="malignant operating point: threshold chosen on validation for this sensitivity")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="grouped K-fold cross-validation: K members in --out, calibrated on their pooled "
                        "out-of-fold predictions; --out is then their ensemble (one model for predict/evaluate/"
                        "export/serve)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="with --folds: train N members at once, each in its own process with its share of the CPU "
                        "cores (faster where one process does not scale across cores; default 1)")
    _add_common(p)

    p = sub.add_parser("evaluate", help="metrics of a trained run on its test split or another folder")
    p.add_argument("run", metavar="RUNDIR")
    p.add_argument("--data", help="labelled folder to evaluate on instead of the run's test split")
    p.add_argument("--label-map", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--out", metavar="DIR",
                   help="write metrics.json + report.html here (default: RUNDIR, or RUNDIR/eval-NAME for --data)")
    p.add_argument("--compare", action="append", default=[], metavar="RUNDIR",
                   help="also score another run folder on the same images (e.g. a different initialisation)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the majority / texture / metadata baselines")
    p.add_argument("--no-report", dest="report", action="store_false", help="metrics.json only")
    p.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (>= 1000)")
    _add_common(p)

    p = sub.add_parser("export", help="export a run's model to ONNX or OpenVINO (optionally INT8) with its contract")
    p.add_argument("run", metavar="RUNDIR")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    p.add_argument("--int8", action="store_true",
                   help="post-training INT8, calibrated on training images; accuracy change measured on the test split")
    p.add_argument("--out", metavar="PATH", help="model file (.onnx / .xml) or folder (default RUNDIR/export/)")
    p.add_argument("--calibration-images", type=int, default=128, help="training images used to calibrate INT8")
    _add_common(p)

    p = sub.add_parser("predict", help="predict image / DICOM files and folders with a trained run")
    p.add_argument("run", metavar="RUNDIR")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image or DICOM files, or folders (recursive)")
    p.add_argument("--out", metavar="FILE", help="results as .csv or .json (default: CSV on stdout)")
    p.add_argument("--cam", metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="write each DICOM slice's Grad-CAM overlay and result into DIR as a DICOM Secondary "
                        "Capture a PACS can store (marked as decision support; needs highdicom)")
    p.add_argument("--send", metavar="AE@HOST:PORT|URL",
                   help="send the DICOM results (Secondary Captures, series SR) to this PACS afterwards: C-STORE, or "
                        "STOW-RS for a DICOMweb URL (bearer token from $LUNGCAD_DICOMWEB_TOKEN); a temporary folder "
                        "holds them when no --dicom-out is given")
    p.add_argument("--engine", default="torch", help="torch (default), onnx, openvino, onnx-int8, openvino-int8")
    p.add_argument("--window", metavar="L,W", help="DICOM window level,width in HU, e.g. --window=-600,1500 (default: the "
                   "model's; another window departs from training and is warned about)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--workers", type=int, default=0, help="threads decoding inputs in parallel (0: inline)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into the same --out, skipping inputs already done")
    _add_common(p)

    p = sub.add_parser("check", help="does a new site's or scanner's data look like the training data? (exit 3 if not)",
                       epilog="Exit status: 0 the site matches, 3 it does not (reasons printed and in check.json), "
                              "1 an error (missing folder, no readable image, ...).")
    p.add_argument("run", metavar="RUNDIR")
    p.add_argument("data", metavar="DATA", help="folder of the site's unlabelled images or DICOM (recursive)")
    p.add_argument("--out", metavar="DIR", help="where check.json and check.html go (default RUNDIR/check-<DATA's name>)")
    p.add_argument("--max-flagged", type=float, default=0.05, metavar="SHARE",
                   help="share of images flagged out of distribution above which the site does not match, when the "
                        "share's whole 95 %% interval lies above it (default 0.05)")
    p.add_argument("--alpha", type=float, default=0.01,
                   help="significance level of the OOD-score shift test against the reference images (default 0.01)")
    _add_common(p)

    p = sub.add_parser("adapt", help="label-free site adaptation: a copy of a run with its BatchNorm statistics "
                                     "re-estimated on a site's unlabelled images (AdaBN)",
                       epilog="No labels are used: the temperature, thresholds and operating point are the source's, "
                              "not validated at the site; re-fit them on labelled local cases (lungcad calibrate) before "
                              "clinical use.")
    p.add_argument("run", metavar="RUNDIR", help="a finished run or fold ensemble (left unchanged)")
    p.add_argument("data", metavar="DATA", help="folder of the site's unlabelled images or DICOM (recursive)")
    p.add_argument("--out", required=True, metavar="RUNDIR2", help="the adapted run folder to create")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="use at most N site images, a random sample with a fixed seed (default 2000; the site "
                        "cache takes N x C x S x S bytes, ~300 MB at 224 px in colour)")
    p.add_argument("--batch-size", type=int, default=32, help="images per pass while re-estimating (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_common(p)

    p = sub.add_parser("calibrate", help="re-fit the temperature and malignant threshold on a site's labelled cases "
                                         "(a copy of the run; the weights are unchanged)",
                       epilog="The site's figures at the source's operating point and at the re-fitted one (cross-fitted "
                              "over the site's patients, 95 %% group-bootstrap intervals) are printed and written to "
                              "RUNDIR2/calibration.json.")
    p.add_argument("run", metavar="RUNDIR", help="a finished run or fold ensemble, e.g. one made by adapt (left unchanged)")
    p.add_argument("data", metavar="DATA", help="the site's labelled images: class folders or a manifest, as evaluate "
                                                "--data reads them")
    p.add_argument("--out", required=True, metavar="RUNDIR2", help="the calibrated run folder to create")
    p.add_argument("--label-map", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="malignant sensitivity the threshold must reach on the site cases (default: the source's, "
                        "usually 0.95)")
    _add_common(p)

    from lungcad.web.commands import _db_args, add_web_commands  # argparse only: the web extra loads when run

    p = sub.add_parser("dicom-node", help="a DICOM node: receive CT series over the network (C-STORE), score each "
                       "series, file it on the web app's worklist and send SR + Secondary Captures to a PACS")
    p.add_argument("run", metavar="RUNDIR")
    p.add_argument("--ae-title", default="LUNGCAD", help="this node's AE title (default LUNGCAD)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default loopback only; 0.0.0.0 for the hospital network)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    p.add_argument("--forward", metavar="AE@HOST:PORT|URL",
                   help="send each series' SR and key-slice Secondary Captures to this PACS: C-STORE, or STOW-RS for a "
                        "DICOMweb URL (bearer token from $LUNGCAD_DICOMWEB_TOKEN); queued in the database, retried "
                        "with back-off")
    p.add_argument("--allow-ae", nargs="+", default=[], metavar="TITLE",
                   help="calling AE titles allowed to associate (default: any, with a warning)")
    p.add_argument("--quiet-seconds", type=float, default=10.0,
                   help="a series is complete when no instance of it arrived for this long (default 10)")
    p.add_argument("--keep-hours", type=float, default=24.0,
                   help="keep a scored series' instances this long, so that late instances re-score the whole "
                        "series (default 24; 0: delete them once scored)")
    p.add_argument("--engine", default="torch", help="torch (default), onnx, openvino, onnx-int8, openvino-int8")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per line (event, series hash, counts, durations; no PHI) for a log "
                        "collector (default text)")
    _db_args(p)
    _add_common(p)

    COMMANDS.update(add_web_commands(sub, _add_common))
    return parser


def cmd_audit(args: argparse.Namespace) -> int:
    from lungcad.data.audit import format_audit, run_audit
    from lungcad.data.discovery import discover, parse_label_map
    from lungcad.data.grouping import assign_groups, near_duplicate_pairs, scan_images

    if args.json:
        _writable_file(args.json)  # fail before the work, not after it
    samples = discover(args.data, parse_label_map(args.label_map))
    infos, unreadable = scan_images(samples, progress=args.progress)
    near = near_duplicate_pairs(infos)  # computed once, shared by grouping and the report
    groups = assign_groups(samples, infos, near_pairs=near)
    report = run_audit(samples, infos, unreadable, groups, near_pairs=near)
    print(format_audit(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lungcad.training.config import TrainConfig
    from lungcad.training.trainer import train

    if not args.resume and not args.data:
        raise LungcadError("train needs --data (or --resume with --out RUNDIR)")
    if args.fold_seed is not None and not args.folds:
        raise LungcadError("--fold-seed seeds the fold assignment of a cross-validation: it needs --folds K")
    if args.jobs != 1 and not args.folds:
        raise LungcadError("--jobs trains the members of a cross-validation side by side: it needs --folds K")
    if args.fusion == "texture" and not args.folds:
        raise LungcadError("--fusion texture fits its head and the fused threshold on out-of-fold predictions: "
                           "it needs --folds K")
    if args.window:
        from lungcad.dicom.reader import parse_window

        parse_window(args.window)  # refuse a malformed window before any work
    cfg = TrainConfig(
        data=str(args.data or ""), out=args.out, task=args.task, pretrained=args.pretrained or TrainConfig.pretrained,
        weights=args.weights, init_from=args.init_from,
        finetune=args.finetune, head_epochs=args.head_epochs, adapt_bn=args.adapt_bn, optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay, epochs=args.epochs if args.epochs is not None else 20,
        patience=args.patience, image_size=args.image_size if args.image_size is not None else TrainConfig.image_size,
        batch_size=args.batch_size, seed=args.seed, fold_seed=args.fold_seed, split=args.split,
        label_map=args.label_map,
        colour=args.colour or TrainConfig.colour, window=args.window, workers=args.workers,
        threads=args.threads, progress=args.progress, extra_data=args.extra_data, augment=args.augment,
        device=args.device, amp=args.amp, target_sensitivity=args.target_sensitivity,
        **{k: v for k, v in (("augment_policy", args.augment_policy), ("balance", args.balance),
                             ("label_smoothing", args.label_smoothing), ("ema_decay", args.ema_decay),
                             ("mixup", args.mixup), ("cutmix", args.cutmix), ("fusion", args.fusion))
           if v is not None},
    )
    if args.val_fraction is not None:
        cfg.val_fraction = args.val_fraction
    elif args.folds:
        cfg.val_fraction = 0.0  # cross-validation chooses the recipe; members train on every other fold
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise LungcadError(f"--mixup and --cutmix are Beta(alpha, alpha) alphas: 0 (off) or above, not "
                           f"{min(cfg.mixup, cfg.cutmix)}")
    if not 0.0 < cfg.target_sensitivity <= 1.0:
        raise LungcadError(f"--target-sensitivity must be in (0, 1], not {cfg.target_sensitivity}")
    if cfg.adapt_bn and not cfg.init_from:
        raise LungcadError("--adapt-bn re-estimates a trained model's BatchNorm statistics on a new site: it needs "
                           "--init-from RUNDIR")
    if cfg.init_from and not args.resume:  # the source's preprocessing where the command line says nothing
        from lungcad.training.init_from import inherit

        cfg = inherit(cfg, {k for k in ("image_size", "colour", "window", "pretrained") if getattr(args, k) is not None})
    elif cfg.weights:
        cfg.pretrained = "file"
    if args.folds:
        from lungcad.training.crossval import cross_validate, format_summary

        print(format_summary(cross_validate(cfg, args.folds, resume=args.resume, jobs=args.jobs)))
        return 0
    out = train(cfg, resume=args.resume, resume_epochs=args.epochs)
    print(f"run complete: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lungcad.evaluation.evaluate import evaluate_run, format_evaluation

    metrics = evaluate_run(args.run, data=args.data, label_map=args.label_map, out=args.out, progress=args.progress,
                           compare=args.compare, baselines=args.baselines, report=args.report, n_boot=args.bootstrap)
    print(format_evaluation(metrics))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lungcad.inference.export import export_model

    result = export_model(args.run, args.format, args.out, int8=args.int8,
                          calibration_images=args.calibration_images, progress=args.progress)
    int8 = result.contract["export"].get("int8")
    if int8:
        t = int8["test_split"]
        print(f"INT8 on the test split ({t['images']} images): accuracy {t['accuracy_fp32']:.3f} -> "
              f"{t['accuracy_int8']:.3f} ({t['accuracy_change_pp']:+.2f} pp)")
    print(f"exported: {result.path} (contract: {result.contract_path})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from lungcad.dicom.reader import parse_window

    window = parse_window(args.window) if args.window else None
    if args.out:
        _writable_file(args.out)
        if Path(args.out).suffix.lower() not in (".csv", ".json"):
            raise LungcadError("--out must end in .csv or .json", args.out)
    if args.batch_size < 1:
        raise LungcadError(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.dicom_out and Path(args.dicom_out).exists() and not Path(args.dicom_out).is_dir():
        raise LungcadError("--dicom-out must be a folder", args.dicom_out)
    destination = None
    if args.send:
        from lungcad.dicom.queue import parse_destination

        destination = parse_destination(args.send, "--send")
    with contextlib.ExitStack() as stack:
        if destination is not None and not args.dicom_out:
            args.dicom_out = stack.enter_context(tempfile.TemporaryDirectory(prefix="lungcad-send-"))
        return _predict(args, window, destination)


def _predict(args: argparse.Namespace, window, destination) -> int:
    from lungcad.inference.predictor import Predictor, write_predictions

    predictor = Predictor(args.run, engine=args.engine, window=window)
    if args.out:  # resumable part files, sharded across ranks under torchrun, merged at the end
        from lungcad.inference.batch import predict_archive

        rows, failed = predict_archive(predictor, args.inputs, args.out, batch_size=args.batch_size,
                                       workers=args.workers, cam_dir=args.cam, dicom_out=args.dicom_out,
                                       resume=args.resume, progress=args.progress)
    else:
        rows, failed = write_predictions(
            predictor.predict_paths(args.inputs, batch_size=args.batch_size, progress=args.progress,
                                    cam_dir=args.cam, workers=args.workers, dicom_out=args.dicom_out),
            args.out, predictor.columns)
    not_written = predictor.dicom_out_failures
    not_sent = 0
    if destination is not None:
        from lungcad.dicom.queue import send_files

        errors = send_files(destination, predictor.dicom_written)
        not_sent = sum(bool(e) for e in errors)
        if not_sent:
            print(f"lungcad predict: {not_sent} of {len(errors)} DICOM result(s) not sent ({next(e for e in errors if e)})",
                  file=sys.stderr)
    print(f"lungcad predict: {rows} result(s), {failed} failed" + (f"; written to {args.out}" if args.out else "")
          + (f"; {not_written} DICOM result(s) could not be written" if not_written else "")
          + (f"; {len(predictor.dicom_written) - not_sent} DICOM result(s) sent to {destination}" if destination else ""),
          file=sys.stderr)
    return 1 if failed or not_written or not_sent else 0  # any failure fails the run, after reporting every file


def cmd_check(args: argparse.Namespace) -> int:
    from lungcad.inference.site_check import EXIT_MISMATCH, format_check, run_check

    report = run_check(args.run, args.data, out=args.out, max_flagged=args.max_flagged, alpha=args.alpha,
                       progress=args.progress)
    print(format_check(report))
    return 0 if report["verdict"] == "matches" else EXIT_MISMATCH


def cmd_calibrate(args: argparse.Namespace) -> int:
    from lungcad.evaluation.site_calibration import calibrate_run, format_report

    report = calibrate_run(args.run, args.data, args.out, label_map=args.label_map,
                           target_sensitivity=args.target_sensitivity, progress=args.progress)
    print(format_report(report))
    print(f"calibrated: {args.out} (report: {Path(args.out) / 'calibration.json'})")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from lungcad.training.adapt import adapt_run

    limit = {"max_images": args.max_images} if args.max_images is not None else {}  # default: adapt.MAX_IMAGES
    r = adapt_run(args.run, args.data, args.out, batch_size=args.batch_size, device=args.device, **limit)
    print(f"adapted: {r['out']} ({r['models']} model(s), BatchNorm statistics from {r['images']} site images; "
          f"{r['unreadable']} unreadable files skipped); operating point inherited from the source, not validated "
          "at the site")
    return 0


def cmd_dicom_node(args: argparse.Namespace) -> int:
    from lungcad.web.commands import _need_web

    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise LungcadError("dicom-node needs pynetdicom: pip install 'lungcad[dicom]'") from None
    _need_web()  # the worklist is the web app's database
    from lungcad.dicom.node import DicomNode, NodeOptions
    from lungcad.dicom.queue import parse_destination

    if args.forward:
        parse_destination(args.forward)  # refuse a malformed address before loading the model
    opts = NodeOptions(run=args.run, ae_title=args.ae_title, host=args.host, port=args.port, forward=args.forward,
                       data_dir=args.data_dir, db=args.db, allow_ae=args.allow_ae, quiet_seconds=args.quiet_seconds,
                       engine=args.engine, keep_hours=args.keep_hours)
    DicomNode(opts).serve_forever()
    return 0


def _writable_file(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise LungcadError("folder does not exist", parent)


COMMANDS = {"audit": cmd_audit, "train": cmd_train, "evaluate": cmd_evaluate}
COMMANDS["export"] = cmd_export
COMMANDS["predict"] = cmd_predict
COMMANDS["check"] = cmd_check
COMMANDS["adapt"] = cmd_adapt
COMMANDS["calibrate"] = cmd_calibrate
COMMANDS["dicom-node"] = cmd_dicom_node


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lungcad` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, getattr(args, "log_format", "text"))
    try:
        # what a command keeps on Ctrl-C (train's checkpoint, predict's finished rows) it keeps on SIGTERM
        # too, and it says how to resume; servers (serve, dicom-node) install their own handlers over it
        with sigterm_as_ctrl_c():
            return COMMANDS[args.command](args)
    except LungcadError as exc:
        print(f"lungcad {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full or read-only disk under --out, a vanished file: one line, no traceback
        print(f"lungcad {args.command}: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        folds = f" --folds {args.folds}" if getattr(args, "folds", 0) else ""
        hint = {"train": f"; resume with: lungcad train --resume{folds} --out {getattr(args, 'out', '')}",
                "predict": "; run the same command with --resume to continue" if getattr(args, "out", None) else ""
                }.get(args.command, "")
        print(f"lungcad {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


def console_main() -> int:
    """The `lungcad` console script: main() under a faster allocator when one is installed."""
    from lungcad.allocator import reexec_with_fast_allocator

    reexec_with_fast_allocator()
    return main()


if __name__ == "__main__":
    sys.exit(main())
