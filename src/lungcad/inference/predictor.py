"""Predicting from files: what `lungcad predict` and the web application call.

    bytes --sniff--> DICOM (windowed, per frame) | image (decode_image)
          --prepare/normalise (the contract's preprocessing)--> engine --> logits, features
          --temperature--> calibrated probabilities --thresholds--> label, decision
          features --OOD detector--> ood flag, score
          decoded + prepared pixels --appearance check (the contract's profile)--> ood reasons

Label: the one decision rule (`lungcad.evaluation.metrics.predict_labels`) at the contract's
`decision_threshold()`, the same as `lungcad evaluate`: with an operating point, "malignant" if
p(malignant) >= the threshold, otherwise the most probable other class; a multiclass model without
one takes the argmax. `decision` is "malignant" exactly when the label is, so they never disagree.

Series (several DICOM slices or frames sharing a SeriesInstanceUID): every slice gets its own row,
then one row with level "series" follows at the end of the stream. Aggregation rule: the series'
probabilities are the mean of the probabilities of its SERIES_TOP_K slices with the highest
malignant probability, among the slices that are not out of distribution (all slices if every
one is). A nodule shows on a few slices only: a mean over the whole series would dilute it to
nothing, the single highest slice would follow one noisy slice. The series is flagged OOD when
more than half of its slices are; its ood_score is the median slice score.

Around it: the result record and CSV/JSON output (`lungcad.inference.results`), finding and
sniffing inputs (`lungcad.inference.inputs`), engines (`lungcad.inference.engine_factory`) and
DICOM Secondary Capture results (`lungcad.dicom.writer`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lungcad.data.images import check_min_side, decode_image, read_regular_file
from lungcad.data.transforms import normalise, prepare, to_source_geometry
from lungcad.dicom.reader import read_dicom
from lungcad.dicom.writer import write_secondary_capture
from lungcad.errors import LungcadError, first_line
from lungcad.inference.appearance import check as appearance_check
from lungcad.inference.engine_factory import make_engine
from lungcad.inference.explain import Explanation, grad_cam
from lungcad.inference.inputs import HEAD_BYTES, _common_source, is_dicom, iter_inputs, sniff
from lungcad.inference.ood import load_ood_detector
from lungcad.inference.results import (
    SERIES_TOP_K,
    Prediction,
    add_to_series,
    aggregate_series,
    decide,
    prediction_columns,
    series_key_indices,
    write_predictions,
)
from lungcad.models.contract import load_model
from lungcad.models.fusion import contract_probs

# Prediction, write_predictions, iter_inputs and sniff moved to lungcad.inference.results / .inputs;
# they are re-exported here for the callers that import them from the predictor.
__all__ = ["SERIES_TOP_K", "Prediction", "Predictor", "iter_inputs", "sniff", "write_predictions"]

log = logging.getLogger(__name__)



@dataclass
class _Item:
    """One image (or frame) on its way through a batch."""

    source: str
    tensor: torch.Tensor | None  # prepared uint8 (C, S, S); None when decoding failed
    error: str = ""
    dicom: dict = field(default_factory=dict)
    level: str = "image"
    reasons: list[str] = field(default_factory=list)  # appearance check (lungcad.inference.appearance)


class Predictor:
    """A trained run, loaded once, predicting and explaining files under its model contract."""

    def __init__(self, run_dir: str | Path, engine: str = "torch", window: tuple[float, float] | None = None):
        """`window` (level, width in HU) overrides the contract's CT window for DICOM input."""
        t0 = time.perf_counter()
        self.run_dir = Path(run_dir)
        self.model, self.contract = load_model(self.run_dir)
        self.engine = make_engine(engine, self.run_dir, self.model, self.contract)
        self.window = window
        self.pp = self.contract.preprocessing
        self.appearance = self.contract.appearance or {}
        self._warned_window = False
        if window is not None:
            trained = (f"the window the model was trained at ({self.pp.window_level:g},{self.pp.window_width:g} HU)"
                       if self.pp.window_source == "declared" else
                       "the training images' window, which model.json does not declare")
            if self.pp.window_source != "declared" or tuple(map(float, window)) != self.pp.window:
                log.warning("--window %g,%g departs from %s: DICOM input will not look like the training images",
                            window[0], window[1], trained)
        self.classes = list(self.contract.classes)
        if "malignant" not in self.classes:
            raise LungcadError(f"model classes {self.classes} have no 'malignant' class", self.run_dir)
        self.threshold = self.contract.decision_threshold()  # None: argmax (multiclass, no operating point)
        self.ood_detector = load_ood_detector(self.run_dir, self.contract.ood)
        if self.ood_detector is None:
            log.warning("%s: no out-of-distribution detector in model.json; nothing will be flagged OOD", run_dir)
        self.dicom_out_failures = 0  # DICOM results that could not be written (see predict_paths)
        self.dicom_written: list[Path] = []  # DICOM results written (`predict --send` sends them)
        self.load_seconds = time.perf_counter() - t0
        log.debug("model loaded in %.2f s (engine %s)", self.load_seconds, engine)

    # ---------------------------------------------------------------------------------- decoding

    @property
    def model_sha256(self) -> str:
        return self.contract.model_sha256

    @property
    def columns(self) -> list[str]:
        """CSV columns of `Prediction.to_row` for this model (fixed, whatever the rows hold)."""
        return prediction_columns(self.classes)

    def _frames(self, data: bytes | Path | str, name: str | None) -> list[tuple[np.ndarray, dict]]:
        """Decoded uint8 frames with their DICOM metadata (one frame for ordinary images)."""
        label = name if name is not None else (str(data) if isinstance(data, (str, Path)) else "<bytes>")
        if isinstance(data, (str, Path)):
            path = Path(data)
            if path.is_dir():
                raise LungcadError("is a folder (use predict_paths for folders)", label)
            raw = read_regular_file(path, label)  # no FIFO, device or oversized file
        else:
            raw = bytes(data)
        if not raw:
            raise LungcadError("empty file (0 bytes)", label)
        if is_dicom(raw[:HEAD_BYTES]):
            dcm = read_dicom(raw, label, window=self.window, ct_window=self.pp.window)
            if self.window is None and dcm.window == self.pp.window and self.pp.window_source != "declared":
                self._warn_default_window()
            check_min_side(dcm.frames[0].shape[1], dcm.frames[0].shape[0], label)
            if len(dcm.frames) == 1:
                return [(dcm.frames[0], dict(dcm.metadata))]
            return [(f, {**dcm.metadata, "frame": i}) for i, f in enumerate(dcm.frames)]
        # greyscale models: colour files are decoded in colour, so the appearance check can see them
        pixels = decode_image(raw, "auto" if self.pp.colour == "grey" else self.pp.colour, name=label)
        check_min_side(pixels.shape[1], pixels.shape[0], label)
        return [(pixels, {})]

    def _warn_default_window(self) -> None:
        if not self._warned_window:
            self._warned_window = True
            log.warning("%s: model.json does not declare the window its training images were rendered at; DICOM CT "
                        "is rendered at lungcad's default %g,%g HU, which may not match them (train with --window "
                        "L,W, or pass predict --window)", self.run_dir, *self.pp.window)

    def load_pixels(self, data: bytes | Path, name: str | None = None, frame: int | None = None
                    ) -> tuple[np.ndarray, dict]:
        """Decoded (DICOM: windowed) uint8 pixels and the DICOM UIDs; raises LungcadError.

        For a multi-frame DICOM, `frame` picks one (default: the middle frame).
        """
        frames = self._frames(data, name)
        index = len(frames) // 2 if frame is None else frame
        if not 0 <= index < len(frames):
            raise LungcadError(f"frame {index} out of range (the file has {len(frames)})", name or str(data))
        pixels, meta = frames[index]
        if len(frames) > 1:
            meta = {**meta, "frames": len(frames)}
        return pixels, meta

    # --------------------------------------------------------------------------------- inference

    def _run(self, tensors: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Prepared uint8 tensors -> (probabilities (N, C), ood flags, ood scores)."""
        cache = torch.stack(tensors)
        logits, features = self.engine.run(normalise(cache, self.pp).numpy())
        probs = contract_probs(logits, cache, self.contract)
        if self.ood_detector is None:
            return probs, None, None
        flags, scores = self.ood_detector.is_ood(np.asarray(features))
        return probs, flags, scores

    def _decide(self, probs: np.ndarray) -> tuple[str, float, str]:
        """(label, p(malignant), decision) under the one decision rule at the contract's threshold."""
        return decide(probs, self.classes, self.contract.task, self.threshold)

    def _prediction(self, item: _Item, probs: np.ndarray, flag, score) -> Prediction:
        label, p_mal, decision = self._decide(probs)
        reasons = list(item.reasons)
        if flag is not None and bool(flag):
            reasons.append(f"feature-space score {float(score):.3g} above threshold {self.ood_detector.threshold:.3g}")
        return Prediction(
            source=item.source, probabilities={c: float(p) for c, p in zip(self.classes, probs)}, label=label,
            malignant_probability=p_mal, decision=decision, ood=bool(reasons),
            ood_score=float(score) if score is not None else None, model_sha256=self.model_sha256,
            dicom=item.dicom, level=item.level, ood_reasons=reasons,
        )

    def _item(self, source: str, pixels: np.ndarray | None, tensor: torch.Tensor, **kw) -> _Item:
        """An item with its appearance check (`pixels`: the decoded pixels, None if not at hand)."""
        return _Item(source, tensor, reasons=appearance_check(pixels, tensor, self.appearance, self.pp), **kw)

    def _items(self, data: bytes | Path | str, name: str | None) -> list[_Item]:
        """Decode and prepare; a failure becomes one error item instead of an exception."""
        source = name if name is not None else str(data) if isinstance(data, (str, Path)) else "<bytes>"
        try:
            frames = self._frames(data, name)
            many = len(frames) > 1
            return [self._item(f"{source}#{meta['frame']}" if many else source, pixels, prepare(pixels, self.pp),
                               dicom=meta, level="frame" if many else "image") for pixels, meta in frames]
        except LungcadError as exc:
            return [_Item(source, None, error=_strip_path(str(exc), source))]
        except Exception as exc:  # a decoder bug on one odd file must not stop a batch of thousands
            log.debug("unexpected error on %s", source, exc_info=True)
            return [_Item(source, None, error=f"unexpected error while reading ({type(exc).__name__}: {first_line(exc, 250)})")]

    def _predict_items(self, ok: list[_Item]) -> dict[int, Prediction]:
        """One forward pass over decoded items -> Prediction by id(item)."""
        if not ok:
            return {}
        probs, flags, scores = self._run([it.tensor for it in ok])
        return {id(it): self._prediction(it, probs[i], None if flags is None else flags[i],
                                         None if scores is None else scores[i]) for i, it in enumerate(ok)}

    def prepare(self, pixels: np.ndarray) -> torch.Tensor:
        """Decoded pixels (from `load_pixels`) -> the model's uint8 input under this contract."""
        return prepare(pixels, self.pp)

    def predict_prepared(self, tensors: list[torch.Tensor], sources: list[str] | None = None,
                         pixels: list[np.ndarray] | None = None) -> list[Prediction]:
        """Predictions for images already decoded and prepared (`prepare`), in one forward pass.

        The web app decodes each upload once in its request thread (it also stores those pixels)
        and micro-batches preparation and this step on its inference workers. `pixels`: the decoded
        pixels the tensors came from, for the appearance check (without them only the prepared
        tensors are checked: no size or colour rule).
        """
        sources = sources or ["<image>"] * len(tensors)
        raws = pixels if pixels is not None else [None] * len(tensors)
        items = [self._item(src, raw, t) for src, t, raw in zip(sources, tensors, raws, strict=True)]
        results = self._predict_items(items)
        return [results[id(it)] for it in items]

    def predict(self, data: bytes | Path, name: str | None = None) -> Prediction:
        """Predict one file or upload; never raises for bad input (the error field is set).

        A multi-frame DICOM gives its series-level result (see the module docstring).
        """
        items = self._items(data, name)
        if items[0].tensor is None:
            return Prediction.failed(items[0].source, items[0].error, self.model_sha256)
        probs, flags, scores = self._run([it.tensor for it in items])
        preds = [self._prediction(it, probs[i], None if flags is None else flags[i],
                                  None if scores is None else scores[i]) for i, it in enumerate(items)]
        if len(preds) == 1:
            return preds[0]
        source = name if name is not None else str(data) if isinstance(data, (str, Path)) else "<bytes>"
        return self._aggregate(source, preds)

    def predict_paths(self, paths: Iterable[str | Path], batch_size: int = 16, progress: bool = True,
                      cam_dir: str | Path | None = None, workers: int = 0, series_rows: bool = True,
                      total: int | None = None, dicom_out: str | Path | None = None) -> Iterator[Prediction]:
        """Stream predictions over files and folders (recursive), `batch_size` images per forward pass.

        Yields rows in input order, then (with `series_rows`) one series row per DICOM series of
        two or more slices. Only one batch of prepared images (plus a bounded read-ahead when
        `workers` threads decode in parallel) is held in memory. With `cam_dir`, a Grad-CAM
        overlay of the predicted label is written there for every image (`cam_path`); with
        `dicom_out`, every DICOM slice's overlay is written there as a DICOM Secondary Capture
        (`lungcad.dicom.writer`; failures are logged and counted in `dicom_out_failures`).
        """
        for folder in (cam_dir, dicom_out):
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
        series: dict[str, dict[tuple, Prediction]] = {}  # SeriesInstanceUID -> (SOP, frame) -> slice
        pending: list[_Item] = []
        n_tensors = 0
        bar = tqdm(desc="predicting", unit="file", disable=not progress, total=total)
        try:
            for items in self._decode_all(iter_inputs(paths), workers):
                bar.update(1)
                pending.extend(items)
                n_tensors += sum(it.tensor is not None for it in items)
                if n_tensors >= batch_size:
                    yield from self._flush(pending, series, cam_dir, dicom_out)
                    pending, n_tensors = [], 0
            yield from self._flush(pending, series, cam_dir, dicom_out)
        finally:
            bar.close()
        if series_rows:
            for group in series.values():
                for row in self.series_predictions([group]):
                    if dicom_out is not None:  # the series result as a Structured Report beside the overlays
                        self._save_series_report(row, list(group.values()), Path(dicom_out))
                    yield row

    def series_predictions(self, series: Iterable[Iterable[Prediction] | dict]) -> Iterator[Prediction]:
        """One series-level row per group of two or more slice predictions."""
        for slices in series:
            preds = list(slices.values()) if isinstance(slices, dict) else list(slices)
            if len(preds) >= 2:
                yield self._aggregate(_common_source(p.source for p in preds), preds)

    def _decode_all(self, inputs: Iterable[tuple[Path, str]], workers: int) -> Iterator[list[_Item]]:
        """Decoded items per input, in input order; `workers` > 1 decodes in a thread pool
        (JPEG/PNG decoders and pydicom's codecs release the GIL) with a bounded read-ahead."""

        def decode(entry: tuple[Path, str]) -> list[_Item]:
            path, problem = entry
            return [_Item(str(path), None, error=problem)] if problem else self._items(path, None)

        if workers <= 1:
            yield from map(decode, inputs)
            return
        from concurrent.futures import ThreadPoolExecutor
        from itertools import islice

        it = iter(inputs)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            while chunk := list(islice(it, 4 * workers)):
                yield from pool.map(decode, chunk)

    def _flush(self, pending: list[_Item], series: dict[str, dict[tuple, Prediction]],
               cam_dir: str | Path | None, dicom_out: str | Path | None = None) -> Iterator[Prediction]:
        ok = [it for it in pending if it.tensor is not None]
        results = self._predict_items(ok)
        for it in pending:
            if it.tensor is None:
                yield Prediction.failed(it.source, it.error, self.model_sha256, it.dicom)
                continue
            pred = results[id(it)]
            to_dicom = dicom_out is not None and bool(it.dicom)
            if cam_dir is not None or to_dicom:
                exp = self._explain_tensor(it.tensor, pred.label)
                if cam_dir is not None:
                    pred.cam_path = str(self._save_cam(it, exp, Path(cam_dir)))
                if to_dicom:
                    self._save_dicom(it, exp, pred, Path(dicom_out))
            add_to_series(series, pred)
            yield pred

    def _top(self, preds: list[Prediction]) -> np.ndarray:
        """Indices of the SERIES_TOP_K slices the series result is the mean of (module docstring)."""
        return series_key_indices(preds)

    def key_slices(self, preds: list[Prediction]) -> list[Prediction]:
        """The slices a series result rests on (its key images), most malignant first."""
        return [preds[i] for i in self._top(preds)]

    def _aggregate(self, source: str, preds: list[Prediction]) -> Prediction:
        """One series-level Prediction from its slices (rule in the module docstring;
        `lungcad.inference.results.aggregate_series`, which the web app uses too)."""
        return aggregate_series(source, preds, self.classes, self.contract.task, self.threshold, self.model_sha256)

    # ------------------------------------------------------------------------------ explanation

    def _explain_tensor(self, tensor: torch.Tensor, target: str | None) -> Explanation:
        probs, _, _ = self._run([tensor])
        if target is None:
            target = self._decide(probs[0])[0]
        image = tensor.permute(1, 2, 0).numpy()
        image = image[..., 0] if image.shape[2] == 1 else image
        x = normalise(tensor, self.pp)
        exp = grad_cam(self.model, x, np.ascontiguousarray(image), self.classes, self.contract.task, target)
        exp.probabilities = {c: float(p) for c, p in zip(self.classes, probs[0])}
        return exp

    def explain(self, data: bytes | Path, target: str | None = None, name: str | None = None,
                frame: int | None = None) -> Explanation:
        """Grad-CAM for one file (default target: the predicted label); raises LungcadError on bad input."""
        pixels, _ = self.load_pixels(data, name, frame)
        return self._explain_tensor(prepare(pixels, self.pp), target)

    def _save_cam(self, item: _Item, exp: Explanation, cam_dir: Path) -> Path:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(item.source.split("#")[0]).name)[:80] or "image"
        frame = f"_f{item.dicom['frame']}" if "frame" in item.dicom else ""
        self._cam_count = getattr(self, "_cam_count", 0) + 1  # keeps names unique across same-named files
        path = cam_dir / f"{self._cam_count:06d}_{stem}{frame}_cam.png"
        return exp.save_overlay(path)

    def source_heatmap(self, exp: Explanation, pixels: np.ndarray) -> np.ndarray:
        """The explanation's heatmap mapped back onto the decoded slice's rows and columns."""
        return to_source_geometry(exp.heatmap, pixels, self.pp)

    def _save_dicom(self, item: _Item, exp: Explanation, pred: Prediction, out_dir: Path) -> None:
        path, frame = item.source.split("#")[0], item.dicom.get("frame")
        try:
            pixels, _ = self.load_pixels(Path(path), frame=frame)  # the slice at its own rows and columns
            self.dicom_written.append(write_secondary_capture(path, pixels, self.source_heatmap(exp, pixels), pred,
                                                              out_dir, frame=frame, threshold=self.threshold))
        except Exception as exc:  # the prediction stands; the missing DICOM result is reported
            self.dicom_out_failures += 1
            log.error("--dicom-out: %s", first_line(exc, 250))

    def _save_series_report(self, series_pred: Prediction, slices: list[Prediction], out_dir: Path) -> None:
        from lungcad.dicom.sr import write_series_report

        try:
            self.dicom_written.append(write_series_report(series_pred, slices, self.key_slices(slices), out_dir,
                                                          self.report_info()))
        except Exception as exc:  # highdicom validates and raises ValueError on what it refuses
            self.dicom_out_failures += 1
            log.error("--dicom-out: series report: %s", first_line(exc, 250))

    def report_info(self) -> dict:
        """What a Structured Report says about the algorithm and its operating point."""
        return {"model_sha256": self.model_sha256, "threshold": self.threshold, "classes": self.classes,
                "engine": getattr(self.engine, "name", "")}


# --------------------------------------------------------------------------------- helpers


def _strip_path(message: str, source: str) -> str:
    """LungcadError messages start with the path; the row already has it in `source`."""
    prefix = f"{source}: "
    return message[len(prefix):] if message.startswith(prefix) else message
