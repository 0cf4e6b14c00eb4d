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
the patient's identity). Once a series is scored its instances move (a rename) to
`dicom-node/scored/<series hash>/`, kept `--keep-hours` (default 24) after the series was last
scored: late instances of the series (a modality sending the rest after the quiet period) are
scored together with them, so the series result always rests on every slice received, and an
amended SR supersedes the earlier one (`DicomNode.process_series`). The web app's folders hold
de-identified data only; the database's identifying tables (`exam_identifiers`, `image_identifiers`)
keep what returning results to the PACS needs (lungcad.web.pacs). Logs name series by a keyed hash, never by
patient, UID or accession number. Non-CT series are accepted (a PACS may route a whole study),
stored de-identified under `dicom-node/not-scored/`, not scored, and the reason is logged and audited.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import queue as queue_mod
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungcad.dicom.queue import Destination, Outbox, WebDestination, parse_destination, valid_ae_title
from lungcad.errors import LungcadError, first_line
from lungcad.utils import atomic_path, keyed_hash, sha256_bytes

__all__ = [
    "DEFAULT_PORT", "KEEP_HOURS", "NODE_USER", "QUIET_SECONDS", "DicomNode", "NodeOptions", "storage_contexts",
]

log = logging.getLogger(__name__)
# pynetdicom logs every association and DIMSE message at INFO; lungcad logs what matters itself.
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

DEFAULT_PORT = 11112  # the registered DICOM port for non-privileged use (104 needs root)
QUIET_SECONDS = 10.0  # a series is complete when no instance of it arrived for this long
NODE_USER = "dicom-node"  # the (inactive, no-login) account that received studies are filed under
SCORED_MODALITIES = ("CT",)
KEEP_HOURS = 24.0  # scored instances are kept this long for late instances of their series to join
PRUNE_EVERY = 60.0  # seconds between two looks for scored series past --keep-hours
STATE = "state.json"  # in a scored folder: when the series was last scored and its last SR
_PRUNE = "\0prune"  # a work item: prune the scored folders (on the worker, never beside a series being scored)


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
    keep_hours: float = KEEP_HOURS


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
        if not opts.keep_hours >= 0:
            raise LungcadError(f"--keep-hours must be 0 or more, not {opts.keep_hours}")
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
        self.scored = self.data_dir / "dicom-node" / "scored"  # original instances of scored series, --keep-hours
        for folder in (self.spool, self.results, self.not_scored, self.scored, self.data_dir / "images",
                       self.data_dir / "dicom"):
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

    def spool_path(self, series_uid: str, sop_uid: str) -> Path:
        """Where an instance is spooled: a folder per series, a file per SOP instance (keyed hashes), so a
        re-sent instance replaces its earlier copy."""
        folder = keyed_hash(self.secret, f"series:{series_uid}")
        return self.spool / folder / f"{keyed_hash(self.secret, f'sop:{sop_uid}')}.dcm"

    def _on_store(self, event) -> int:
        """C-STORE: the instance is on disk (fsync'd) before success is answered."""
        try:
            ds = event.dataset
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:
            log.warning("C-STORE from %s refused: no readable Series/SOP Instance UID (%s)",
                        event.assoc.requestor.ae_title, first_line(exc, 120))
            return 0xC000  # cannot understand
        path = self.spool_path(series_uid, sop_uid)
        folder = path.parent.name
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
        next_prune = 0.0
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if now >= next_prune:
                self._work.put(_PRUNE)
                next_prune = now + PRUNE_EVERY
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
            if key == _PRUNE:
                self._prune_quietly()
                continue
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
        """Score one complete series; returns the worklist study id (None if not scored).

        The series is its new instances in the spool together with those scored before and still
        kept (`scored/<key>/`, one file per SOP Instance UID: a re-sent instance replaces its copy),
        so late instances re-score the whole series: the worklist row is updated over all slices
        and, with --forward, an amended SR (a new instance in the same SR series, referencing the
        one it supersedes) is queued. A result never replaces one over more slices: late instances
        whose earlier ones are gone leave the earlier result in place (`_keep_earlier_result`).
        """
        import pydicom

        folder = self.spool / key
        spooled = sorted(folder.glob("*.dcm"))
        if not spooled:
            return None
        tag = key[:12]
        head = pydicom.dcmread(spooled[0], stop_before_pixels=True)
        modality = str(head.get("Modality", "") or "?")
        if modality not in SCORED_MODALITIES:
            stored = self._store_not_scored(spooled, key, modality)
            log.warning("series %s: not CT: modality %s, not scored; %d of %d instance(s) stored de-identified "
                        "under %s", tag, modality, stored, len(spooled), self.not_scored / key,
                        extra={"event": "series-not-scored", "series": tag, "modality": modality,
                               "reason": f"not CT: modality {modality}, not scored", "instances": len(spooled),
                               "stored": stored})
            self._discard(spooled, folder)
            return None
        t0 = time.perf_counter()
        kept = self.scored / key
        files = self._series_files(spooled, kept)
        earlier = len(files) - len(spooled)  # instances scored before, not re-sent
        p = self.predictor
        slices = list(p.predict_paths(files, progress=False, series_rows=False))
        ok = [s for s in slices if not s.error]
        for bad in (s for s in slices if s.error):
            log.warning("series %s: an instance could not be read (%s)", tag, bad.error)
        if not ok:
            log.warning("series %s: no readable slice among %d; not scored", tag, len(files),
                        extra={"event": "series-not-scored", "series": tag, "reason": "no readable slice",
                               "instances": len(files)})
            self._discard(spooled, folder)
            return None
        series = next(iter(p.series_predictions([ok])), None) if len(ok) >= 2 else ok[0]
        state = self._scored_state(kept)
        recorded, recorded_study = self._recorded(ok[0])
        if len(ok) < recorded:
            self._keep_earlier_result(key, series, ok, recorded, recorded_study)
            self._save_state(kept, {**(state or {"revision": 0, "sr": "", "predecessor": ""}), "digest": ""})
            self._keep_scored(spooled, kept, folder)
            return recorded_study
        keys = p.key_slices(ok)
        report = self._report_plan(state, self._digest(files), recorded)
        results = self._write_results(key, series, ok, keys, report) if self.destination else []
        sr_uid = self._sr_uid(results)
        self._save_state(kept, {**report, "sr": sr_uid or (state or {}).get("sr", "")})  # before the commit: a retry
        with self.sessions() as session:  # after a crash finds the same revision, so writes the same objects
            study_id = self._record(session, series, ok, keys, key)
            if self.outbox is not None and results:
                self.outbox.enqueue(session, self.destination, results, study_id)
            session.commit()
        self._keep_scored(spooled, kept, folder)
        if self.outbox is not None:
            self.outbox.wake()
        seconds = time.perf_counter() - t0
        log.info("series %s: %d slice(s) scored in %.1f s%s: %s, p(malignant) %.3f%s; study %s%s", tag, len(ok),
                 seconds, f" ({len(spooled)} late instance(s) with {earlier} scored before)" if earlier else "",
                 series.decision, series.malignant_probability,
                 " (OUT OF DISTRIBUTION)" if series.ood else "", study_id,
                 f"; {len(results)} result object(s) queued for {self.destination}" if results else "",
                 extra={"event": "series-scored", "series": tag, "instances": len(files), "slices": len(ok),
                        "unreadable": len(slices) - len(ok), "seconds": round(seconds, 3),
                        "late": len(spooled) if earlier else 0, "decision": series.decision,
                        "probability": round(float(series.malignant_probability), 4),
                        "ood": bool(series.ood), "study": study_id, "queued": len(results)})
        if sr_uid and report["revision"]:
            log.info("series %s: amended SR (revision %d, over %d slices) supersedes the earlier report%s", tag,
                     report["revision"], len(ok), "" if report["predecessor"] else " (not referenced: unknown)",
                     extra={"event": "sr-amended", "series": tag, "revision": report["revision"], "slices": len(ok)})
        return study_id

    # ----------------------------------------------------------------------------- scored instances

    @staticmethod
    def _series_files(spooled: list[Path], kept: Path) -> list[Path]:
        """The series' instances: those kept from earlier scoring and those just received, one per SOP
        Instance UID (the file name is its keyed hash: a re-sent instance replaces its earlier copy), in
        name order, as if one folder held them all (so the result equals the one of a single sending)."""
        by_name = {path.name: path for path in kept.glob("*.dcm")}
        by_name.update({path.name: path for path in spooled})
        return [by_name[name] for name in sorted(by_name)]

    @staticmethod
    def _digest(files: list[Path]) -> str:
        """Names what a result was computed from (instance names, sizes and times; no PHI): the same
        instances give the same digest, so a retried series writes the same amended SR."""
        h = hashlib.sha256()
        for path in files:
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    @staticmethod
    def _report_plan(state: dict | None, digest: str, recorded: int) -> dict:
        """Revision, amendment (the SR UID's salt) and predecessor of the series' SR.

        The first result is revision 0 (the SR UID `lungcad predict` gives the series). The same
        instances as last time (a retry after a crash or a failure) keep their revision; new ones
        amend the last SR. With no state but a result on the worklist (instances pruned), it is an
        amendment whose predecessor is not known.
        """
        if state and state.get("digest") == digest:
            revision, predecessor = int(state["revision"]), state.get("predecessor", "")
        elif state:
            revision, predecessor = int(state["revision"]) + 1, state.get("sr", "")
        else:
            revision, predecessor = (1 if recorded else 0), ""
        return {"revision": revision, "amendment": digest if revision else "", "predecessor": predecessor,
                "digest": digest}

    @staticmethod
    def _sr_uid(results: list[Path]) -> str:
        """SOP Instance UID of the SR just written (the last result file), "" without --forward."""
        if not results:
            return ""
        import pydicom

        return str(pydicom.dcmread(results[-1], stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                   .SOPInstanceUID)

    @staticmethod
    def _scored_state(kept: Path) -> dict | None:
        try:
            return json.loads((kept / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _save_state(self, kept: Path, state: dict) -> None:
        """When the series was scored (the retention counts from it) and its last SR (the next one's predecessor)."""
        if self.opts.keep_hours <= 0:
            return
        kept.mkdir(parents=True, exist_ok=True)
        with atomic_path(kept / STATE) as tmp:
            tmp.write_text(json.dumps({**state, "scored_at": time.time()}), encoding="utf-8")

    def _keep_scored(self, files: list[Path], kept: Path, folder: Path) -> None:
        """Move scored instances out of the spool into the series' scored folder (a rename on the same
        file system: each file is in one folder or the other, even if the node is killed meanwhile)."""
        if self.opts.keep_hours <= 0:
            self._discard(files, folder)
            return
        kept.mkdir(parents=True, exist_ok=True)
        for path in files:
            try:
                os.replace(path, kept / path.name)
            except FileNotFoundError:
                pass
        self._remove_if_empty(folder)

    def prune_scored(self, now: float | None = None) -> int:
        """Delete the kept instances (they carry the patient's identity) of series last scored more than
        --keep-hours ago, except where late instances of the series wait in the spool; returns how many
        series were pruned. The worker runs it between series, so it never pulls files from under one."""
        now = time.time() if now is None else now
        pruned = 0
        for kept in sorted(d for d in self.scored.iterdir() if d.is_dir()):
            waiting = any((self.spool / kept.name).glob("*.dcm"))  # late instances of it, not scored yet
            if waiting or now - self._scored_at(kept) < self.opts.keep_hours * 3600:
                continue
            for path in kept.glob("*.dcm"):
                path.unlink(missing_ok=True)
            shutil.rmtree(kept, ignore_errors=True)  # the state goes last: an interrupted prune is redone
            pruned += 1
        if pruned:
            log.info("%d scored series older than %g h pruned", pruned, self.opts.keep_hours,
                     extra={"event": "scored-pruned", "series_count": pruned})
        return pruned

    def _scored_at(self, kept: Path) -> float:
        state = self._scored_state(kept)
        try:
            return float(state["scored_at"]) if state else kept.stat().st_mtime
        except (KeyError, TypeError, ValueError):
            return kept.stat().st_mtime

    def _prune_quietly(self) -> None:
        try:
            self.prune_scored()
        except Exception as exc:  # a full or read-only disk must not stop the worker; the next round retries
            log.error("scored instances not pruned (%s)", first_line(exc, 200))

    def _recorded(self, pred) -> tuple[int, str | None]:
        """Slices and exam id of the result the worklist already holds for this slice's series (0, None)."""
        from sqlalchemy import select

        from lungcad.web.db import Series

        series_uid = pred.dicom.get("SeriesInstanceUID")
        if not series_uid:
            return 0, None
        series_key = keyed_hash(self.secret, f"series:{series_uid}")
        with self.sessions() as session:
            row = session.scalars(select(Series).where(Series.series_key == series_key)
                                  .order_by(Series.images_count.desc())).first()
            return (int(row.images_count or 0), row.study_id) if row is not None else (0, None)

    def _keep_earlier_result(self, key: str, series, ok: list, recorded: int, study_id: str | None) -> None:
        """Late instances whose earlier ones are gone (pruned after --keep-hours, or never kept with
        --keep-hours 0) give a result over fewer slices than the one on the worklist. Replacing it
        would make a 300-slice series read as a 3-slice one, and a separate series row would split
        one acquisition in two; so the earlier result stays, nothing is sent to the PACS, the late
        result is audited (`dicom-series-late-instances`, with its slices and decision) and a warning
        logged. The late instances are kept like scored ones: more of them may follow."""
        from lungcad.web.db import audit

        tag = key[:12]
        log.warning("series %s: %d late slice(s) arrived after the earlier instances were deleted (--keep-hours "
                    "%g); the worklist keeps its result over %d slice(s); the late result (%s, p(malignant) %.3f) "
                    "is audited, not recorded", tag, len(ok), self.opts.keep_hours, recorded, series.decision,
                    series.malignant_probability,
                    extra={"event": "series-late-not-recorded", "series": tag, "slices": len(ok),
                           "recorded_slices": recorded, "study": study_id})
        with self.sessions() as session:
            audit(session, "dicom-series-late-instances", self._node_user(session), target=study_id or "",
                  slices=len(ok), recorded_slices=recorded, label=series.label, decision=series.decision,
                  malignant_probability=round(float(series.malignant_probability), 4), ood=bool(series.ood),
                  calling_ae=self._callers.pop(key, ""))
            session.commit()

    def _write_results(self, key: str, series, ok: list, keys: list, report: dict) -> list[Path]:
        """SR of the series + a Secondary Capture per key slice, under the data folder (until sent);
        `report`: revision, amendment and predecessor of the SR (`_report_plan`)."""
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
        info = {**p.report_info(), **{k: report[k] for k in ("revision", "amendment", "predecessor")}}
        files.append(write_series_report(series, ok, keys, out, info))
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
        else:  # the key slice of an earlier result: it now stands for more slices
            image.dicom_meta = {**(image.dicom_meta or {}), "slices": len(ok), "key_slices": len(keys)}
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
        DicomNode._remove_if_empty(folder)

    @staticmethod
    def _remove_if_empty(folder: Path) -> None:
        try:
            folder.rmdir()  # only if nothing new arrived meanwhile
        except OSError:
            pass
