"""The persistent outbound queue: DICOM results waiting to be sent to a PACS, by C-STORE (pynetdicom) or
DICOMweb STOW-RS (dicomweb-client), as the destination says (`AE@HOST:PORT` or `http(s)://...`).

Each result file is a row of `dicom_outbox` (the web app's database, so it survives a restart and
an admin can see what is waiting). `Outbox.send_due` sends every row whose time has come, one
association per destination; a file the PACS accepted (success or warning status) is deleted (it
carries the patient's identity) and its row marked `sent`; on a failure the row stays `pending` and
is retried with exponential back-off (BACKOFF_FIRST doubling up to BACKOFF_MAX), the last error kept
in one line. Nothing is ever dropped: a PACS that is down for a day receives the results when it
comes back.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lungcad.errors import LungcadError, first_line

__all__ = [
    "BACKOFF_FIRST", "BACKOFF_MAX", "DICOMWEB_TOKEN_ENV", "Destination", "Outbox", "WebDestination", "backoff_seconds",
    "c_store", "parse_destination", "send_files", "stow_rs", "valid_ae_title",
]

log = logging.getLogger(__name__)

BACKOFF_FIRST = 2.0  # seconds before the first retry; doubles with each failure
BACKOFF_MAX = 300.0  # never wait more than five minutes between attempts
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 printable characters, no backslash
_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # C-STORE success and warnings (the PACS kept the object)


def valid_ae_title(title: str) -> bool:
    return bool(_AE.match(title)) and bool(title.strip())


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class WebDestination:
    """A DICOMweb server's base URL (STOW-RS posts to URL/studies); a bearer token comes from the environment."""

    url: str

    def __str__(self) -> str:
        return self.url


DICOMWEB_TOKEN_ENV = "LUNGCAD_DICOMWEB_TOKEN"  # bearer token for --forward/--send https://... (never stored)


def parse_destination(text: str, option: str = "--forward") -> Destination | WebDestination:
    """`AE@HOST:PORT` (DIMSE C-STORE, e.g. PACS@[::1]:104) or `http(s)://HOST/PATH` (DICOMweb STOW-RS);
    LungcadError on anything else."""
    if text.startswith(("http://", "https://")):
        url = urlsplit(text)
        if not url.hostname:
            raise LungcadError(f"{option}: not a DICOMweb URL: {text!r}")
        if url.username or url.password:  # the URL is stored in the queue and shown on the admin page
            raise LungcadError(f"{option}: no credentials in the URL; put a bearer token in ${DICOMWEB_TOKEN_ENV}")
        return WebDestination(text.rstrip("/"))
    usage = f"{option} must be AE@HOST:PORT (e.g. PACS@10.0.0.5:104) or a DICOMweb URL, not {text!r}"
    ae, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (at and colon and host and port.isdigit()) or not valid_ae_title(ae):
        raise LungcadError(usage)
    if not 0 < int(port) < 65536:
        raise LungcadError(f"{option} port must be 1-65535, not {port}")
    return Destination(ae.strip(), host, int(port))


def backoff_seconds(attempts: int) -> float:
    """Wait after the `attempts`-th failed attempt."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, attempts - 1))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)  # SQLite returns naive datetimes


MISSING = "result file missing"


def c_store(dest: Destination, paths: list[Path], calling_ae: str = "LUNGCAD", timeout: float = 30.0,
            sop_classes: list[str] | None = None) -> list[str]:
    """C-STORE files to `dest` over one association; one error line per file ("" = stored)."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    if not paths:
        return []
    if sop_classes is None:
        sop_classes = []
        for path in paths:
            try:
                sop_classes.append(str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID))
            except Exception:
                sop_classes.append("")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for sop_class in sorted({c for c in sop_classes if c}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        # pynetdicom reports a refused TCP connection as an aborted association
        why = "association rejected" if assoc.is_rejected else "cannot connect or association aborted"
        return [f"{dest}: {why}"] * len(paths)
    errors = []
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(dcmread(path))
            except FileNotFoundError:
                errors.append(MISSING)
                continue
            except Exception as exc:  # an aborted association, a context the PACS refused, a broken file
                errors.append(f"{dest}: {first_line(exc, 200)}")
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            errors.append("" if code in _OK else f"{dest}: C-STORE status 0x{code & 0xFFFF:04X}" if code >= 0
                          else f"{dest}: no C-STORE response")
    finally:
        if assoc.is_established:
            assoc.release()
    return errors


def stow_rs(dest: WebDestination, paths: list[Path], timeout: float = 30.0) -> list[str]:
    """STOW-RS files to a DICOMweb server in one request (dicomweb-client); one error line per file."""
    import os

    from pydicom import dcmread

    try:
        from dicomweb_client.api import DICOMwebClient
        from requests.exceptions import RequestException
    except ImportError:
        return [f"{dest}: DICOMweb needs dicomweb-client: pip install 'lungcad[dicom]'"] * len(paths)
    if not paths:
        return []
    errors: list[str] = []
    datasets, index = [], {}
    for path in paths:
        try:
            ds = dcmread(path)
        except FileNotFoundError:
            errors.append(MISSING)
            continue
        index[str(ds.SOPInstanceUID)] = len(errors)
        errors.append("")
        datasets.append(ds)
    token = os.environ.get(DICOMWEB_TOKEN_ENV)
    client = DICOMwebClient(dest.url, headers={"Authorization": f"Bearer {token}"} if token else None, timeout=timeout)
    try:
        response = client.store_instances(datasets)
    except RequestException as exc:  # HTTPError included: the server refused the whole request
        status = getattr(getattr(exc, "response", None), "status_code", None)
        why = f"HTTP {status}" if status else first_line(exc, 200)
        return [e or f"{dest}: {why}" for e in errors]
    for item in (response.get("FailedSOPSequence") or []) if response is not None else []:
        i = index.get(str(item.get("ReferencedSOPInstanceUID", "")))
        if i is not None:
            errors[i] = f"{dest}: STOW-RS failure reason {int(item.get('FailureReason', 0)):#06x}"
    return errors


def send_files(dest: Destination | WebDestination, paths: list[Path], calling_ae: str = "LUNGCAD",
               timeout: float = 30.0, sop_classes: list[str] | None = None) -> list[str]:
    """C-STORE or STOW-RS, as the destination says; one error line per file ("" = stored)."""
    if isinstance(dest, WebDestination):
        return stow_rs(dest, paths, timeout)
    return c_store(dest, paths, calling_ae, timeout, sop_classes)


class Outbox:
    """Queue result files for a destination and send them (`send_due`, or a background thread: `start`)."""

    def __init__(self, sessions, data_dir: str | Path, calling_ae: str, timeout: float = 30.0):
        self.sessions = sessions
        self.root = Path(data_dir)
        self.calling_ae = calling_ae
        self.timeout = timeout
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def enqueue(self, session, destination: Destination | WebDestination, files: list[Path], study_id: str | None = None) -> None:
        """Add result files (under the data folder) to the session; committed with the caller's change.

        A file already waiting for the same destination is not queued twice: a re-scored series rewrites
        its unchanged key-slice captures in place, and two rows for one file would send it, delete it and
        then fail on the missing file.
        """
        import pydicom
        from sqlalchemy import select

        from lungcad.web.db import DicomOutbox

        waiting = set(session.scalars(select(DicomOutbox.file).where(DicomOutbox.status == "pending",
                                                                     DicomOutbox.destination == str(destination))))
        for path in files:
            if str(Path(path).relative_to(self.root)) in waiting:
                continue
            sop_class = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
            session.add(DicomOutbox(destination=str(destination), file=str(Path(path).relative_to(self.root)),
                                    sop_class_uid=sop_class, study_id=study_id, status="pending", attempts=0,
                                    next_attempt_at=_utcnow(), last_error=""))

    def wake(self) -> None:
        self._wake.set()

    def pending(self) -> int:
        from sqlalchemy import func, select

        from lungcad.web.db import DicomOutbox

        with self.sessions() as session:
            return session.scalar(select(func.count()).where(DicomOutbox.status == "pending")) or 0

    def send_due(self) -> int:
        """Send every pending row whose time has come; returns how many were delivered."""
        from sqlalchemy import select

        from lungcad.web.db import DicomOutbox

        now = _utcnow()
        with self.sessions() as session:
            rows = [r for r in session.scalars(select(DicomOutbox).where(DicomOutbox.status == "pending")
                                               .order_by(DicomOutbox.id)) if _aware(r.next_attempt_at) <= now]
            by_destination: dict[str, list] = defaultdict(list)
            for row in rows:
                by_destination[row.destination].append(row)
            delivered = 0
            for destination, batch in by_destination.items():
                delivered += self._send(parse_destination(destination), batch)
                session.commit()  # each destination's outcome is kept even if a later one fails
        return delivered

    def _send(self, dest: Destination | WebDestination, rows: list) -> int:
        errors = send_files(dest, [self.root / r.file for r in rows], self.calling_ae, self.timeout,
                            sop_classes=[r.sop_class_uid for r in rows])
        delivered = 0
        for row, error in zip(rows, errors):
            if not error:
                row.status, row.sent_at, row.last_error = "sent", _utcnow(), ""
                row.attempts += 1
                (self.root / row.file).unlink(missing_ok=True)  # it holds the patient's identity; the PACS has it
                delivered += 1
            elif error == MISSING:
                row.status, row.last_error = "failed", error
                log.error("outbox: result %d has no file any more; given up", row.id)
            else:
                self._failed(row, error)
        if delivered:
            log.info("outbox: %d result(s) sent to %s", delivered, dest)
        if delivered < len(rows):
            log.warning("outbox: %d result(s) for %s not sent (%s); next attempt in %.0f s", len(rows) - delivered,
                        dest, next(e for e in errors if e), backoff_seconds(max(r.attempts for r in rows)))
        return delivered

    def _failed(self, row, error: str) -> None:
        row.attempts += 1
        row.last_error = error[:500]
        row.next_attempt_at = _utcnow() + dt.timedelta(seconds=backoff_seconds(row.attempts))

    # ------------------------------------------------------------------------- background thread

    def start(self, interval: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.send_due()
                except Exception as exc:  # the database or the network failing must not end the sender
                    log.error("outbox: sending failed (%s); retrying", first_line(exc, 200))
                    log.debug("outbox failure", exc_info=True)
                self._wake.wait(interval)
                self._wake.clear()

        self._thread = threading.Thread(target=loop, name="dicom-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
