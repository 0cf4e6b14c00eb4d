"""report.html: one self-contained page (figures embedded as PNG data URIs, no network, no
scripts) rendering the numbers of metrics.json. Every number shown comes from that dict.

Heatmaps: example predictions carry Grad-CAM overlays (`lungcad.inference.predictor.Predictor.explain`);
when they cannot be made the examples are shown without them and the report says why.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from lungcad.errors import LungcadError, first_line
from lungcad.evaluation.metrics import malignant_index
from lungcad.run import RunFolder
from lungcad.utils import atomic_write_text

__all__ = [
    "HEADLINE", "examples", "figures", "fmt", "fmt_ci", "heatmap_overlays", "pick_examples", "render",
    "write_report",
]

log = logging.getLogger(__name__)

N_EXAMPLES = 8  # example predictions in the report: the most confident errors first, then hits
TEMPLATE = "report.html.j2"


def fmt(v, digits: int = 3) -> str:
    """The one number format of the report (the Chromium test looks for these strings)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def fmt_ci(entry: dict | None) -> str:
    if not entry:
        return ""
    if entry.get("low") is None:
        return "no interval"  # the reasons are listed once under the table (interval_notes)
    return f"[{fmt(entry['low'])}, {fmt(entry['high'])}]"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _array_png(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figures(metrics: dict, y: np.ndarray, probs: np.ndarray, history: list[dict], classes: list[str],
            task: str) -> dict[str, str]:
    """Confusion matrix, ROC and PR curves, reliability diagram, training curves (PNG data URIs)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    figs = {}
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=20)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (images)")
    figs["confusion"] = _png(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    curves = [(1, "malignant")] if task == "binary" else list(enumerate(classes))
    for c, name in curves:
        pos = y == c
        if pos.any() and (~pos).any():
            fpr, tpr, _ = roc_curve(pos, probs[:, c])
            prec, rec, _ = precision_recall_curve(pos, probs[:, c])
            auc = metrics["per_class"][classes[c]]["roc_auc"]
            ap = metrics["per_class"][classes[c]]["pr_auc"]
            a1.plot(fpr, tpr, label=f"{name} (AUC {fmt(auc)})")
            a2.plot(rec, prec, label=f"{name} (AP {fmt(ap)})")
    a1.plot([0, 1], [0, 1], ":", color="grey")
    a1.set(xlabel="false positive rate", ylabel="sensitivity", title="ROC (one-vs-rest)")
    a2.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall (one-vs-rest)")
    m = malignant_index(classes)
    op = metrics.get("malignant_vs_rest")
    if m is not None and op and op["specificity"] is not None and op["sensitivity"] is not None:
        a1.plot([1 - op["specificity"]], [op["sensitivity"]], "k*", markersize=12, label="operating point")
    for a in (a1, a2):
        a.legend(fontsize=8, loc="lower right" if a is a1 else "lower left")
    figs["curves"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for key, style in (("before", "o--"), ("after", "s-")):
        bins = [b for b in metrics["calibration"][key]["bins"] if b["count"]]
        ece = metrics["calibration"][key]["ece"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style,
                label=f"{'raw' if key == 'before' else 'temperature-scaled'} (ECE {fmt(ece)})")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy", title="Reliability diagram", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    figs["reliability"] = _png(fig)

    if history:
        ep = [int(h["epoch"]) for h in history]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for key in ("train_loss", "val_loss"):
            if key in history[0]:
                a1.plot(ep, [float(h[key]) for h in history], "o-", label=key.replace("_", " "))
        for key in ("train_accuracy", "val_accuracy", "val_macro_f1"):
            if key in history[0]:
                a2.plot(ep, [float(h[key]) for h in history], "o-", label=key.replace("_", " "))
        a1.set(xlabel="epoch", title="Loss")
        a2.set(xlabel="epoch", title="Accuracy / macro-F1", ylim=(0, 1))
        a1.legend(fontsize=8)
        a2.legend(fontsize=8)
        figs["training"] = _png(fig)
    return figs


def pick_examples(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, classes: list[str], n: int = N_EXAMPLES) -> list[int]:
    """Indices worth a look: confident false positives and false negatives first, then hits."""
    m = malignant_index(classes)
    if m is None:
        return list(np.argsort(-probs.max(axis=1))[:n])
    pos, flag, pm = y == m, pred == m, probs[:, m]
    order = []
    for mask, key in ((~pos & flag, -pm), (pos & ~flag, pm), (pos & flag, -pm), (~pos & ~flag, pm)):
        idx = np.flatnonzero(mask)
        order.append(list(idx[np.argsort(key[idx])][: max(1, n // 4)]))
    picked = [i for group in order for i in group][:n]
    return [int(i) for i in picked]


def heatmap_overlays(run_dir: Path, paths: list[Path]) -> tuple[dict[int, str], str]:
    """Grad-CAM overlays of `paths` (by index) and "", or ({}, the reason they were left out)."""
    from lungcad.inference.predictor import Predictor  # (lazy: the report is also written without a model)

    try:
        predictor = Predictor(run_dir)
        return {i: _array_png(predictor.explain(p).overlay) for i, p in enumerate(paths)}, ""
    except Exception as exc:  # noqa: BLE001 - a report without heatmaps beats no report
        reason = first_line(exc)
        log.warning("heatmaps omitted: %s", reason)
        return {}, f"heatmaps omitted: {reason}"


def examples(run_dir: Path, y, probs, pred, cache: torch.Tensor, paths: list[Path], classes: list[str]) -> tuple[list[dict], str]:
    idx = pick_examples(y, probs, pred, classes)
    overlays, note = heatmap_overlays(run_dir, [paths[i] for i in idx])
    out = []
    for k, i in enumerate(idx):
        img = cache[i].permute(1, 2, 0).numpy()
        img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
        out.append({"name": Path(paths[i]).name, "true": classes[y[i]], "predicted": classes[pred[i]],
                    "probs": {c: fmt(probs[i, j]) for j, c in enumerate(classes)},
                    "correct": bool(y[i] == pred[i]), "image": _array_png(img), "heatmap": overlays.get(k)})
    return out, note


def render(context: dict) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("lungcad.evaluation", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), undefined=StrictUndefined)
    env.filters["fmt"] = fmt
    env.filters["ci"] = fmt_ci
    return env.get_template(TEMPLATE).render(**context)


def write_report(path: Path, metrics: dict, *, contract, run_dir: Path, y: np.ndarray, probs: np.ndarray,
                 raw: np.ndarray, pred: np.ndarray, cache: torch.Tensor, paths: list[Path], history: list[dict],
                 audit: dict) -> Path:
    """Render and atomically write report.html."""
    classes = contract.classes
    try:
        data_summary = RunFolder(run_dir).data_summary() or {}
    except LungcadError:
        data_summary = {}
    ex, heat_note = examples(run_dir, y, probs, pred, cache, paths, classes)
    html = render({
        "m": metrics, "classes": classes, "task": contract.task, "run_dir": str(run_dir),
        "contract_json": json.dumps(contract.to_dict(), indent=2, default=str),
        "figs": figures(metrics, y, probs, history, classes, contract.task),
        "data": data_summary, "audit": audit, "examples": ex, "heatmap_note": heat_note,
        "headline": HEADLINE, "per_class_keys": PER_CLASS, "fused": bool(contract.fusion),
        "interval_notes": sorted({v["note"] for part in (metrics, metrics["group_level"])
                                  for v in part["intervals"].values() if v.get("note")}),
    })
    atomic_write_text(path, html)
    log.info("report: %s", path)
    return path


HEADLINE = [  # (dotted metric key, label)
    ("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"), ("macro_f1", "Macro-F1"),
    ("roc_auc", "ROC-AUC (macro, one-vs-rest)"), ("pr_auc", "PR-AUC (macro, one-vs-rest)"),
    ("malignant_vs_rest.sensitivity", "Malignant sensitivity"),
    ("malignant_vs_rest.specificity", "Malignant specificity"), ("malignant_vs_rest.ppv", "Malignant PPV"),
    ("malignant_vs_rest.npv", "Malignant NPV"), ("malignant_vs_rest.roc_auc", "Malignant-vs-rest ROC-AUC"),
    ("malignant_vs_rest.pr_auc", "Malignant-vs-rest PR-AUC"),
]
PER_CLASS = [("precision", "Precision"), ("recall", "Sensitivity"), ("specificity", "Specificity"),
             ("false_positive_rate", "FP rate"), ("f1", "F1"), ("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")]
