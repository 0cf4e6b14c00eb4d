"""`lungcad dicom-node`: a DICOM node in the hospital network (pynetdicom), scoring each CT series it receives.

    modality / PACS --C-STORE--> spool (one file per instance, fsync'd before the success status)
        --quiet period: no new instance of the series for `quiet_seconds`--> series complete
        --Predictor (the run's contract: window, OOD check; the series rule of `lungcad predict`)-->
            worklist study in the web app's database (de-identified key slice + series result)
            SR (TID 1500, `lungcad.dicom.sr`) + Secondary Captures of the key slices (`lungcad.dicom.writer`)
        --outbound queue (`lungcad.dicom.queue`, in the database)--C-STORE--> --forward PACS

Acknowledged means on disk: an instance is fsync'd into the spool before the node answers
success, and the spool is scanned at start, so a node killed mid-series completes the series
after a restart. The spool holds the original instances (the results go back to the PACS under
the patient's identity) and is emptied once a series is processed; the database and the web
app's folders only ever hold de-identified data. Logs name series by a keyed hash, never by
patient, UID or accession number. Non-CT series are accepted (a PACS may route a whole study),
stored de-identified under `dicom-node/not-scored/`, not scored, and the reason is logged and audited.
"""

from __future__ import annotations

import errno
import logging
import os
import queue as queue_mod
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungcad.dicom.queue import Destination, Outbox, WebDestination, parse_destination, valid_ae_title
from lungcad.errors import LungcadError, first_line
from lungcad.utils import atomic_path, keyed_hash, sha256_bytes

__all__ = ["DEFAULT_PORT", "NODE_USER", "QUIET_SECONDS", "DicomNode", "NodeOptions", "storage_contexts"]

log = logging.getLogger(__name__)
# pynetdicom logs every association and DIMSE message at INFO; lungcad logs what matters itself.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

DEFAULT_PORT = 11112  # the registered DICOM port for non-privileged use (104 needs root)
QUIET_SECONDS = 10.0  # a series is complete when no instance of it arrived for this long
NODE_USER = "dicom-node"  # the (inactive, no-login) account that received studies are filed under
SCORED_MODALITIES = ("CT",)


@dataclass
class NodeOptions:
    run: str
    ae_title: str = "LUNGCAD"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    forward: str | None = None
    data_dir: str = "lungcad-data"
    db: str | None = None
    allow_ae: list[str] = field(default_factory=list)
    quiet_seconds: float = QUIET_SECONDS
    engine: str = "torch"


def storage_contexts() -> list[tuple[str, list[str]]]:
    """(SOP class, transfer syntaxes) the node accepts: CT (scored) and a few image classes a PACS may
    route along with a study (stored, not scored); compressed syntaxes only where a decoder is installed."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        JPEG2000,
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )
    from pynetdicom.sop_class import (
        CTImageStorage,
        MRImageStorage,
        SecondaryCaptureImageStorage,
    )

    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]
    compressed = [JPEGLosslessSV1, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless,
                  JPEG2000Lossless, JPEG2000, RLELossless]
    usable = native + [ts for ts in compressed if _decodable(get_decoder, ts)]
    # Enhanced (multi-frame) CT keeps its rescale in per-frame functional groups, which the reader
    # does not apply: refused at association rather than scored on the wrong Hounsfield scale.
    return [(str(c), usable) for c in (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage)]


def _port_error(host: str, port: int, exc: OSError) -> LungcadError:
    reason = "is in use" if exc.errno in (errno.EADDRINUSE, 10048) else f"cannot be opened ({exc.strerror or exc})"
    return LungcadError(f"port {port} on {host} {reason}")


def _check_port(host: str, port: int) -> None:
    """Bind and release the port (as the server will, with SO_REUSEADDR); LungcadError if that fails."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(info[0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
    except socket.gaierror:
        raise LungcadError(f"--host: unknown interface {host!r}") from None
    except OSError as exc:
        raise _port_error(host, port, exc) from None


def _decodable(get_decoder, ts) -> bool:
    try:
        return get_decoder(ts).is_available
    except NotImplementedError:
        return False


class DicomNode:
    """The node: a C-ECHO/C-STORE SCP, a series watcher, one inference worker and the outbound queue."""

    def __init__(self, opts: NodeOptions, predictor=None):
        self.opts = opts
        if not valid_ae_title(opts.ae_title):
            raise LungcadError(f"--ae-title must be 1-16 printable characters without a backslash, not {opts.ae_title!r}")
        for title in opts.allow_ae:
            if not valid_ae_title(title):
                raise LungcadError(f"--allow-ae: not an AE title: {title!r}")
        if not 0 < opts.port < 65536:
            raise LungcadError(f"--port must be 1-65535, not {opts.port}")
        if not opts.quiet_seconds > 0:
            raise LungcadError(f"--quiet-seconds must be positive, not {opts.quiet_seconds}")
        self.destination: Destination | WebDestination | None = (parse_destination(opts.forward) if opts.forward
                                                                   else None)
        from lungcad.web.db import open_database
        from lungcad.web.security import load_secret

        self.data_dir = Path(opts.data_dir)
        _, self.sessions = open_database(opts.db, self.data_dir)
        self.secret = load_secret(self.data_dir)
        self.spool = self.data_dir / "dicom-node" / "spool"
        self.results = self.data_dir / "dicom-node" / "results"
        self.not_scored = self.data_dir / "dicom-node" / "not-scored"  # de-identified non-CT series, kept
        for folder in (self.spool, self.results, self.not_scored, self.data_dir / "images", self.data_dir / "dicom"):
            folder.mkdir(parents=True, exist_ok=True)
        if predictor is None:
            from lungcad.inference.predictor import Predictor

            _check_port(opts.host, opts.port)  # before the model loads: a port in use is known at once

            predictor = Predictor(opts.run, engine=opts.engine)
        self.predictor = predictor
        self.outbox = Outbox(self.sessions, self.data_dir, opts.ae_title) if self.destination else None
        self._last_seen: dict[str, float] = {}  # spool folder -> monotonic time of its last instance
        self._callers: dict[str, str] = {}  # spool folder -> calling AE title (for the worklist)
        self._lock = threading.Lock()
        self._work: queue_mod.Queue[str | None] = queue_mod.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self.processed = 0  # series scored or set aside (tests wait on it)

    # ----------------------------------------------------------------------------- life cycle

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.opts.ae_title)
        ae.require_called_aet = True  # associations addressed to another AE title are rejected
        if self.opts.allow_ae:
            ae.require_calling_aet = list(self.opts.allow_ae)
        else:
            log.warning("no --allow-ae given: any calling AE title may store studies on this node",
                        extra={"event": "any-caller-allowed"})
        ae.add_supported_context(Verification)
        for sop_class, syntaxes in storage_contexts():
            ae.add_supported_context(sop_class, syntaxes)
        ae.maximum_associations = 16
        handlers = [(evt.EVT_C_ECHO, lambda event: 0x0000), (evt.EVT_C_STORE, self._on_store)]
        try:
            self._server = ae.start_server((self.opts.host, self.opts.port), block=False, evt_handlers=handlers)
        except OSError as exc:
            raise _port_error(self.opts.host, self.opts.port, exc) from None
        leftover = [d.name for d in self.spool.iterdir() if d.is_dir() and any(d.glob("*.dcm"))]
        with self._lock:
            for name in leftover:  # series received before a restart: their quiet period starts now
                self._last_seen[name] = time.monotonic()
        if leftover:
            log.info("%d series left in the spool from an earlier run; they will be processed", len(leftover),
                     extra={"event": "spool-resumed", "series_count": len(leftover)})
        for target, name in ((self._watch, "series-watcher"), (self._worker, "series-worker")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.outbox is not None:
            self.outbox.start()
        log.info("DICOM node %s listening on %s:%d; series complete after %.0f s without new instances%s",
                 self.opts.ae_title, self.opts.host, self.opts.port, self.opts.quiet_seconds,
                 f"; results forwarded to {self.destination}" if self.destination else "",
                 extra={"event": "node-started", "ae_title": self.opts.ae_title, "port": self.opts.port})

    def stop(self) -> None:
        """Stop listening and let the current series finish (idempotent)."""
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        self._work.put(None)
        for thread in self._threads:
            thread.join(timeout=60)
        if self.outbox is not None:
            self.outbox.stop()

    def serve_forever(self) -> None:
        import signal

        self.start()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            log.info("interrupted: stopping (received series stay in the spool for the next start)")
        finally:
            self.stop()
        log.info("DICOM node %s stopped", self.opts.ae_title, extra={"event": "node-stopped"})

    # ----------------------------------------------------------------------------- receiving

    def _on_store(self, event) -> int:
        """C-STORE: the instance is on disk (fsync'd) before success is answered."""
        try:
            ds = event.dataset
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:
            log.warning("C-STORE from %s refused: no readable Series/SOP Instance UID (%s)",
                        event.assoc.requestor.ae_title, first_line(exc, 120))
            return 0xC000  # cannot understand
        folder = keyed_hash(self.secret, f"series:{series_uid}")
        path = self.spool / folder / f"{keyed_hash(self.secret, f'sop:{sop_uid}')}.dcm"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(event.encoded_dataset())
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as exc:
            log.error("C-STORE: cannot spool an instance of series %s (%s)", folder[:12], exc.strerror or exc)
            return 0xA700  # out of resources
        with self._lock:
            self._last_seen[folder] = time.monotonic()
            self._callers[folder] = str(event.assoc.requestor.ae_title).strip()
        return 0x0000

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                done = [k for k, t in self._last_seen.items() if now - t >= self.opts.quiet_seconds]
                for key in done:
                    del self._last_seen[key]
            for key in done:
                log.info("series %s: complete (no new instance for %.0f s)", key[:12], self.opts.quiet_seconds,
                         extra={"event": "series-complete", "series": key[:12],
                                "instances": sum(1 for _ in (self.spool / key).glob("*.dcm"))})
                self._work.put(key)

    def _worker(self) -> None:
        while True:
            key = self._work.get()
            if key is None or self._stop.is_set():
                return
            try:
                self.process_series(key)
            except Exception as exc:  # one bad series must not stop the node; it stays in the spool
                log.error("series %s: not processed (%s); left in the spool", key[:12], first_line(exc, 250),
                          extra={"event": "series-failed", "series": key[:12]})
                log.debug("series failure", exc_info=True)
            finally:
                self.processed += 1

    # ----------------------------------------------------------------------------- processing

    def process_series(self, key: str) -> str | None:
        """Score one complete series from the spool; returns the worklist study id (None if not scored)."""
        import pydicom

        folder = self.spool / key
        files = sorted(folder.glob("*.dcm"))
        if not files:
            return None
        tag = key[:12]
        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        modality = str(head.get("Modality", "") or "?")
        if modality not in SCORED_MODALITIES:
            stored = self._store_not_scored(files, key, modality)
            log.warning("series %s: not CT: modality %s, not scored; %d of %d instance(s) stored de-identified "
                        "under %s", tag, modality, stored, len(files), self.not_scored / key,
                        extra={"event": "series-not-scored", "series": tag, "modality": modality,
                               "reason": f"not CT: modality {modality}, not scored", "instances": len(files),
                               "stored": stored})
            self._discard(files, folder)
            return None
        t0 = time.perf_counter()
        p = self.predictor
        slices = list(p.predict_paths(files, progress=False, series_rows=False))
        ok = [s for s in slices if not s.error]
        for bad in (s for s in slices if s.error):
            log.warning("series %s: an instance could not be read (%s)", tag, bad.error)
        if not ok:
            log.warning("series %s: no readable slice among %d; not scored", tag, len(files),
                        extra={"event": "series-not-scored", "series": tag, "reason": "no readable slice",
                               "instances": len(files)})
            self._discard(files, folder)
            return None
        series = next(iter(p.series_predictions([ok])), None) if len(ok) >= 2 else ok[0]
        keys = p.key_slices(ok)
        results = self._write_results(key, series, ok, keys) if self.destination else []
        with self.sessions() as session:
            study_id = self._record(session, series, ok, keys, key)
            if self.outbox is not None and results:
                self.outbox.enqueue(session, self.destination, results, study_id)
            session.commit()
        self._discard(files, folder)
        if self.outbox is not None:
            self.outbox.wake()
        seconds = time.perf_counter() - t0
        log.info("series %s: %d slice(s) scored in %.1f s: %s, p(malignant) %.3f%s; study %s%s", tag, len(ok),
                 seconds, series.decision, series.malignant_probability,
                 " (OUT OF DISTRIBUTION)" if series.ood else "", study_id,
                 f"; {len(results)} result object(s) queued for {self.destination}" if results else "",
                 extra={"event": "series-scored", "series": tag, "instances": len(files), "slices": len(ok),
                        "unreadable": len(slices) - len(ok), "seconds": round(seconds, 3),
                        "decision": series.decision, "probability": round(float(series.malignant_probability), 4),
                        "ood": bool(series.ood), "study": study_id, "queued": len(results)})
        return study_id

    def _write_results(self, key: str, series, ok: list, keys: list) -> list[Path]:
        """SR of the series + a Secondary Capture per key slice, under the data folder (until sent)."""
        from lungcad.dicom.sr import write_series_report
        from lungcad.dicom.writer import write_secondary_capture

        p = self.predictor
        out = self.results / key
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for pred in keys:
            path, frame = Path(pred.source.split("#")[0]), pred.dicom.get("frame")
            pixels, _ = p.load_pixels(path, frame=frame)
            exp = p.explain(path, target=pred.label, frame=frame)
            files.append(write_secondary_capture(path, pixels, p.source_heatmap(exp, pixels), pred, out, frame=frame,
                                                 threshold=p.threshold))
        files.append(write_series_report(series, ok, keys, out, p.report_info()))
        return files

    def _store_not_scored(self, files: list[Path], key: str, modality: str) -> int:
        """Keep a series the model does not read (de-identified, like every DICOM the data folder holds) and
        audit it with the reason; returns the number of instances stored."""
        from lungcad.web.db import audit
        from lungcad.web.uploads import deidentify_upload

        out = self.not_scored / key
        out.mkdir(parents=True, exist_ok=True)
        stored = 0
        for path in files:
            try:
                clean, _ = deidentify_upload(path.read_bytes(), self.secret, "instance")
            except LungcadError as exc:
                log.warning("series %s: an instance could not be de-identified (%s); not kept", key[:12], exc)
                continue
            with atomic_path(out / path.name) as tmp:
                tmp.write_bytes(clean)
            stored += 1
        with self.sessions() as session:
            caller = self._callers.pop(key, "")
            audit(session, "dicom-series-not-scored", self._node_user(session), target=key,
                  reason=f"not CT: modality {modality}, not scored", modality=modality, instances=stored,
                  calling_ae=caller)
            session.commit()
        return stored

    def _node_user(self, session):
        from sqlalchemy import select

        from lungcad.web.db import User
        from lungcad.web.security import hash_password

        user = session.scalar(select(User).where(User.username == NODE_USER))
        if user is None:  # inactive with an unknown password: it files studies, it never signs in
            user = User(username=NODE_USER, password_hash=hash_password(secrets.token_urlsafe(32)), role="clinician",
                        active=False)
            session.add(user)
            session.flush()
        return user

    def _record(self, session, series, ok: list, keys: list, key: str) -> str:
        """The worklist exam (found by its Study UID, or new) and series with the series result, and the
        de-identified key slice (PNG + DICOM) as its one stored image."""
        from PIL import Image as PILImage
        from sqlalchemy import select

        from lungcad.web.db import ExamIdentifiers, Image, ImageIdentifiers, Series, Study, audit, new_id
        from lungcad.web.uploads import deidentify_upload, inspect_upload

        raw = Path(keys[0].source.split("#")[0]).read_bytes()
        info = inspect_upload(raw, "key slice")
        clean, meta = deidentify_upload(raw, self.secret, "key slice")
        pixels, _ = self.predictor.load_pixels(clean, name="key slice", frame=keys[0].dicom.get("frame"))
        user = self._node_user(session)
        caller = self._callers.pop(key, "")
        exam_key = keyed_hash(self.secret, "study:" + (info.study_uid or key))
        exam = session.scalar(select(Study).where(Study.exam_key == exam_key))
        if exam is None:
            exam = Study(id=new_id(), user_id=user.id, kind="dicom", group_key=exam_key, exam_key=exam_key,
                         model_sha256=series.model_sha256 or self.predictor.model_sha256, series=[], feedback=[])
            exam.identifiers = ExamIdentifiers(**info.identifiers, case_label="")
            session.add(exam)
            session.flush()
        series_key = keyed_hash(self.secret, "series:" + (info.series_uid or key))
        row = session.scalar(select(Series).where(Series.study_id == exam.id, Series.series_key == series_key))
        if row is None:
            number = 1 + len(session.scalars(select(Series.id).where(Series.study_id == exam.id)).all())
            row = Series(id=new_id(), study_id=exam.id, series_key=series_key, number=number, images=[])
            session.add(row)
        image_id = new_id()
        image_file, dicom_file = f"images/{image_id}.png", f"dicom/{image_id}.dcm"
        sop_key = keyed_hash(self.secret, "sop:" + info.sop_uid) if info.sop_uid else None
        image = session.scalar(select(Image).where(Image.sop_key == sop_key)) if sop_key else None
        if image is None:
            with atomic_path(self.data_dir / image_file) as tmp:
                PILImage.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", compress_level=1)
            with atomic_path(self.data_dir / dicom_file) as tmp:
                tmp.write_bytes(clean)
            k = keys[0]
            image = Image(
                id=image_id, series_id=row.id, study_id=exam.id, user_id=user.id, kind="dicom",
                input_sha256=sha256_bytes(raw), sop_key=sop_key, instance_number=info.instance_number,
                position=float(info.instance_number or 0), image_file=image_file, dicom_file=dicom_file,
                width=int(pixels.shape[1]), height=int(pixels.shape[0]), label=k.label, decision=k.decision,
                malignant_probability=float(k.malignant_probability),
                probabilities={c: float(v) for c, v in k.probabilities.items()}, ood=bool(k.ood),
                ood_score=None if k.ood_score is None else float(k.ood_score), ood_reasons=list(k.ood_reasons or []),
                error="", model_sha256=k.model_sha256 or self.predictor.model_sha256,
                dicom_meta={**{k: v for k, v in meta.items() if v}, "source": "dicom-node", "slices": len(ok),
                            "key_slices": len(keys), **({"calling_ae": caller} if caller else {})},
            )
            session.add(image)
            session.add(ImageIdentifiers(image_id=image_id, **info.image_identifiers()))  # original UIDs
        # the series result is the node's (all slices); only the key slice is kept as an image
        row.modality = info.modality[:16] or "CT"
        row.images_count, row.label, row.decision = len(ok), series.label, series.decision
        row.malignant_probability = float(series.malignant_probability)
        row.probabilities = {c: float(v) for c, v in series.probabilities.items()}
        row.ood, row.ood_score = bool(series.ood), None if series.ood_score is None else float(series.ood_score)
        row.ood_reasons = list(series.ood_reasons or [])
        row.key_images = [image.id]
        key_sop = keys[0].dicom.get("SOPInstanceUID")
        row.slice_scores = [[image.id if p.dicom.get("SOPInstanceUID") == key_sop else None,
                             round(float(p.malignant_probability), 4), bool(p.ood)] for p in ok]
        row.model_sha256 = series.model_sha256 or self.predictor.model_sha256
        audit(session, "dicom-series", user, target=exam.id, input_sha256=image.input_sha256, slices=len(ok),
              calling_ae=caller)
        audit(session, "prediction", user, target=exam.id, input_sha256=image.input_sha256,
              model_sha256=row.model_sha256, label=row.label, decision=row.decision, ood=row.ood)
        return exam.id

    @staticmethod
    def _discard(files: list[Path], folder: Path) -> None:
        for path in files:
            path.unlink(missing_ok=True)
        try:
            folder.rmdir()  # only if nothing new arrived meanwhile
        except OSError:
            pass
