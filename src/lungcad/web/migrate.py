"""Alembic migrations shipped inside the package, run programmatically (no alembic.ini needed)."""

from __future__ import annotations

import logging
from pathlib import Path

# alembic logs a dozen INFO lines on import and on every upgrade: they would drown the CLI's output.
logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.exc import OperationalError, SQLAlchemyError  # noqa: E402

from lungcad.errors import LungcadError, first_line  # noqa: E402

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
log = logging.getLogger(__name__)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; fails with one line (no credentials) if the server is unreachable."""
    try:
        command.upgrade(alembic_config(engine), revision)
    except OperationalError as exc:
        reason = first_line(exc.orig) if exc.orig else "cannot connect"
        raise LungcadError(f"database {engine.url.render_as_string(hide_password=True)}: {reason}") from None
    except SQLAlchemyError as exc:
        raise LungcadError(f"database migration failed: {first_line(exc)}") from None
