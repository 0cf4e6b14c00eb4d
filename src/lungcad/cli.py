"""The `lungcad` command line: one subcommand per job. `main(argv)` is what tests call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lungcad import __version__
from lungcad.errors import LungcadError
from lungcad.utils import atomic_write_json, setup_logging

log = logging.getLogger("lungcad")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--pretrained", choices=["imagenet", "none"], default="imagenet",
                   help="backbone initialisation (default imagenet; needs the weights cached or --weights)")
    p.add_argument("--weights", metavar="FILE", help="local torchvision ResNet-50 weights (.pth/.safetensors)")
    p.add_argument("--finetune", choices=["fc", "layer4", "all"], default="all")
    p.add_argument("--head-epochs", type=int, default=0, help="staged: train only the head first for N epochs")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 20)")
    p.add_argument("--patience", type=int, default=6, help="early stopping on validation macro-F1")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", metavar="FILE", help="reuse a split.csv (path,label,group,subset)")
    p.add_argument("--label-map", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--colour", choices=["auto", "grey", "rgb"], default="auto")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    _add_common(p)

    p = sub.add_parser("evaluate", help="metrics of a trained run on its test split or another folder")
    p.add_argument("run", metavar="RUNDIR")
    p.add_argument("--data", help="labelled folder to evaluate on instead of the run's test split")
    p.add_argument("--label-map", action="append", default=[], metavar="FOLDER=LABEL")
    p.add_argument("--out", metavar="DIR", help="write metrics.json here")
    _add_common(p)
    return parser


def cmd_audit(args: argparse.Namespace) -> int:
    from lungcad.data.audit import format_audit, run_audit
    from lungcad.data.discovery import discover, parse_label_map
    from lungcad.data.grouping import assign_groups, near_duplicate_pairs, scan_images

    samples = discover(args.data, parse_label_map(args.label_map))
    infos, unreadable = scan_images(samples, progress=args.progress)
    near = near_duplicate_pairs(infos)  # computed once, shared by grouping and the report
    groups = assign_groups(samples, infos, near_pairs=near)
    report = run_audit(samples, infos, unreadable, groups, near_pairs=near)
    print(format_audit(report))
    if args.json:
        _writable_file(args.json)
        atomic_write_json(args.json, report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lungcad.training.trainer import TrainConfig, train

    if not args.resume and not args.data:
        raise LungcadError("train needs --data (or --resume with --out RUNDIR)")
    cfg = TrainConfig(
        data=str(args.data or ""), out=args.out, task=args.task, pretrained=args.pretrained, weights=args.weights,
        finetune=args.finetune, head_epochs=args.head_epochs, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, epochs=args.epochs if args.epochs is not None else 20,
        patience=args.patience, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
        split=args.split, label_map=args.label_map, colour=args.colour, workers=args.workers,
        threads=args.threads, progress=args.progress,
    )
    if cfg.weights:
        cfg.pretrained = "file"
    out = train(cfg, resume=args.resume, resume_epochs=args.epochs)
    print(f"run complete: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lungcad.evaluation.evaluate import evaluate_run
    from lungcad.evaluation.metrics import format_metrics

    metrics = evaluate_run(args.run, data=args.data, label_map=args.label_map, out=args.out, progress=args.progress)
    print(format_metrics(metrics))
    return 0


def _writable_file(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise LungcadError("folder does not exist", parent)


COMMANDS = {"audit": cmd_audit, "train": cmd_train, "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lungcad` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except LungcadError as exc:
        print(f"lungcad {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = f"; resume with: lungcad train --resume --out {args.out}" if args.command == "train" else ""
        print(f"lungcad {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
