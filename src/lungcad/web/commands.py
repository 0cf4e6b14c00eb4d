"""CLI subcommands of the web app (`serve`, `users`, `feedback`); heavy imports happen only when run."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lungcad.errors import LungcadError

__all__ = ["DEFAULT_DATA_DIR", "add_web_commands", "cmd_feedback", "cmd_serve", "cmd_users"]

log = logging.getLogger("lungcad")
# Where the web app keeps its SQLite database, uploaded (de-identified) images and session secret.
DEFAULT_DATA_DIR = os.environ.get("LUNGCAD_DATA_DIR", "lungcad-data")


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help=f"web app data folder (default {DEFAULT_DATA_DIR}; $LUNGCAD_DATA_DIR)")
    p.add_argument("--db", metavar="URL", default=os.environ.get("LUNGCAD_DB"),
                   help="database URL, e.g. postgresql://user:pw@host/db (default: SQLite in --data-dir; $LUNGCAD_DB)")


def add_web_commands(sub: argparse._SubParsersAction, add_common: Callable[[argparse.ArgumentParser], None]) -> dict:
    """Register the subcommands on the main parser; returns {command: handler}."""
    p = sub.add_parser("serve", help="run the clinicians' web application")
    p.add_argument("run", metavar="RUNDIR", help="trained run folder (model.json + model.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--secure-cookies", action="store_true",
                   help="served over HTTPS: mark the cookies Secure and send Strict-Transport-Security")
    # Defaults: lungcad.web.security.SessionPolicy (30 min idle, 12 h lifetime).
    p.add_argument("--session-idle-minutes", type=int, default=30, metavar="MIN",
                   help="end a sign-in after this many minutes without a request (default 30)")
    p.add_argument("--session-hours", type=int, default=12, metavar="H",
                   help="end a sign-in this many hours after it started, active or not (default 12: a shift)")
    p.add_argument("--pacs", metavar="AE@HOST:PORT|URL",
                   help="let clinicians send an exam's results (series SR, key-slice Secondary Captures, filed under the "
                        "original patient and study) to this PACS from the exam page or POST /api/studies/{id}/send: "
                        "C-STORE, or STOW-RS for a DICOMweb URL (bearer token from $LUNGCAD_DICOMWEB_TOKEN); queued "
                        "in the database, retried with back-off, shown on /dicom-outbox")
    p.add_argument("--ae-title", default="LUNGCAD", help="the web app's calling AE title for --pacs (default LUNGCAD)")
    _db_args(p)
    add_common(p)

    p = sub.add_parser("users", help="manage web app accounts")
    users = p.add_subparsers(dest="users_command", required=True)
    q = users.add_parser("add", help="create an account")
    q.add_argument("name")
    q.add_argument("--role", choices=["clinician", "admin"], required=True)
    q.add_argument("--password", help="password (prompted for when not given; avoid on shared machines)")
    _db_args(q)
    add_common(q)
    q = users.add_parser("token", help="create an API token for a user (printed once)")
    q.add_argument("name")
    q.add_argument("--label", default="script", help="what the token is for")
    q.add_argument("--days", type=int, default=90, help="days until the token expires (1-365, default 90)")
    _db_args(q)
    add_common(q)

    p = sub.add_parser("feedback", help="clinician feedback collected by the web app")
    fb = p.add_subparsers(dest="feedback_command", required=True)
    q = fb.add_parser("export", help="write clinician-labelled images as a training-data folder (manifest.csv)")
    q.add_argument("--out", required=True, metavar="DIR")
    _db_args(q)
    add_common(q)
    return {"serve": cmd_serve, "users": cmd_users, "feedback": cmd_feedback}


def _need_web() -> None:
    try:
        import fastapi  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise LungcadError("the web app needs the 'web' extra: pip install 'lungcad[web]'") from None


def cmd_serve(args: argparse.Namespace) -> int:
    _need_web()
    import uvicorn

    from lungcad.web.app import create_app
    from lungcad.web.security import SessionPolicy

    policy = SessionPolicy(idle_minutes=args.session_idle_minutes, hours=args.session_hours)
    if args.pacs:
        from lungcad.dicom.queue import parse_destination

        parse_destination(args.pacs, "--pacs")  # refuse a malformed address before loading the model
    app = create_app(args.run, data_dir=args.data_dir, db=args.db, secure_cookies=args.secure_cookies,
                     session_policy=policy, pacs=args.pacs, ae_title=args.ae_title)
    log.info("serving on http://%s:%d (data folder %s)%s", args.host, args.port, Path(args.data_dir).resolve(),
             f"; results may be sent to {args.pacs}" if args.pacs else "")
    # One process: the model is loaded once and inference is serialised anyway (2-core CPU machines).
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False, server_header=False)
    return 0


def _existing_database(args: argparse.Namespace) -> None:
    """Reading commands must not silently create an empty SQLite database in a mistyped folder."""
    if not args.db and not (Path(args.data_dir) / "lungcad.sqlite3").is_file():
        raise LungcadError("no web app database here (wrong --data-dir, or pass --db URL)", args.data_dir)


def cmd_users(args: argparse.Namespace) -> int:
    _need_web()
    if args.users_command != "add":
        _existing_database(args)
    from sqlalchemy import select

    from lungcad.web.db import User, open_database
    from lungcad.web.security import add_user, create_token

    _, sessions = open_database(args.db, args.data_dir)
    with sessions() as session:
        if args.users_command == "add":
            password = args.password
            if password is None:
                if not sys.stdin.isatty():
                    raise LungcadError("no --password given and no terminal to prompt on")
                password = getpass.getpass(f"password for {args.name}: ")
                if password != getpass.getpass("again: "):
                    raise LungcadError("passwords do not match")
            add_user(session, args.name, password, args.role)
            session.commit()
            print(f"user {args.name} ({args.role}) added")
        else:
            user = session.scalar(select(User).where(User.username == args.name))
            if user is None:
                raise LungcadError(f"no user {args.name!r}")
            token = create_token(session, user, args.label, days=args.days)
            session.commit()
            print(token)
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    _need_web()
    from lungcad.web.db import open_database
    from lungcad.web.feedback_export import export_feedback

    _existing_database(args)
    _, sessions = open_database(args.db, args.data_dir)
    with sessions() as session:
        summary = export_feedback(session, args.data_dir, args.out, progress=args.progress)
    print(
        f"exported {summary['exported']} labelled images to {args.out} ({summary['per_label']}); "
        f"left out: {summary['conflicting']} with conflicting labels, {summary['missing']} missing images"
    )
    return 0
