"""Passwords (argon2), server-side sessions, API tokens, the session secret and CSRF tokens."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from lungcad.errors import LungcadError
from lungcad.web.db import ROLES, ApiToken, LoginSession, User, as_utc, audit, private_dir, utcnow

__all__ = [
    "DEFAULT_TOKEN_DAYS",
    "MAX_TOKEN_DAYS",
    "MIN_PASSWORD",
    "TOKEN_PREFIX",
    "SessionPolicy",
    "add_user",
    "authenticate",
    "change_password",
    "check_new_password",
    "create_token",
    "csrf_ok",
    "end_session",
    "end_user_sessions",
    "hash_password",
    "load_secret",
    "new_csrf_token",
    "revoke_token",
    "start_session",
    "token_digest",
    "user_for_session",
    "user_for_token",
    "validate_password",
    "validate_username",
    "verify_password",
]

_hasher = PasswordHasher()  # argon2id with the library's maintained default cost parameters
TOKEN_PREFIX = "lcd_"
MIN_PASSWORD = 8
DEFAULT_TOKEN_DAYS = 90  # API tokens expire; a script's owner renews them on the account page
MAX_TOKEN_DAYS = 365
# last_seen_at / last_used_at are written at most this often: not one database write per request.
TOUCH_INTERVAL = dt.timedelta(seconds=60)
# Verified against when the username does not exist, so a login takes the same time either way.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with these credentials, or None."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        verify_password(_DUMMY_HASH, password)
        return None
    if not verify_password(user.password_hash, password) or not user.active:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def validate_username(name: str) -> str:
    name = name.strip()
    if not (1 <= len(name) <= 64) or not all(c.isalnum() or c in "._-@" for c in name):
        raise LungcadError(f"invalid user name {name!r}: use 1-64 letters, digits or . _ - @")
    return name


def add_user(session: Session, username: str, password: str, role: str, actor: User | None = None) -> User:
    """Create an account (or raise LungcadError); audited as a user change."""
    username = validate_username(username)
    if role not in ROLES:
        raise LungcadError(f"unknown role {role!r} (choose from {', '.join(ROLES)})")
    validate_password(password)
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise LungcadError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    session.flush()
    audit(session, "user_add", actor, target=username, username="cli" if actor is None else "", role=role)
    return user


def validate_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise LungcadError(f"password too short (at least {MIN_PASSWORD} characters)")


def check_new_password(current: str, new: str, confirm: str | None = None) -> None:
    """The checks of a password change that need no stored secret (so they are not counted as guesses)."""
    if confirm is not None and new != confirm:
        raise LungcadError("the new password and its confirmation differ")
    validate_password(new)
    if new == current:
        raise LungcadError("the new password is the same as the current one")


def change_password(session: Session, user: User, current: str, new: str, *, keep_session: str | None = None) -> None:
    """Set a new password (the current one must be given) and end the user's other sessions; audited."""
    check_new_password(current, new)
    if not verify_password(user.password_hash, current):
        raise LungcadError("the current password is wrong")
    user.password_hash = hash_password(new)
    ended = end_user_sessions(session, user.id, keep=keep_session)
    audit(session, "password_change", user, target=user.username, sessions_ended=ended)


# ---------------------------------------------------------------- server-side sessions


@dataclass(frozen=True)
class SessionPolicy:
    """How long a sign-in lasts: ended after `idle_minutes` without a request, and `hours` after sign-in."""

    idle_minutes: int = 30  # an unattended workstation on a ward
    hours: int = 12  # a clinical shift; then sign in again

    def __post_init__(self) -> None:
        if self.idle_minutes < 1 or self.hours < 1 or self.idle_minutes > self.hours * 60:
            raise LungcadError(f"session timeouts must be >= 1 and idle <= lifetime: idle {self.idle_minutes} min, "
                               f"lifetime {self.hours} h")


def start_session(session: Session, user: User) -> str:
    """A new session for `user`; returns the id the cookie carries (only its sha256 is stored)."""
    sid = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(LoginSession(id_sha256=token_digest(sid), user_id=user.id, created_at=now, last_seen_at=now))
    return sid


def user_for_session(session: Session, sid: str, policy: SessionPolicy, now: dt.datetime | None = None) -> User | None:
    """The active user of this live session, or None; an expired session is deleted on the way."""
    now = now or utcnow()
    row = session.get(LoginSession, token_digest(sid))
    if row is None:
        return None
    user = row.user
    idle = now - as_utc(row.last_seen_at)
    if (not user.active or idle > dt.timedelta(minutes=policy.idle_minutes)
            or now - as_utc(row.created_at) > dt.timedelta(hours=policy.hours)):
        session.delete(row)
        return None
    if idle > TOUCH_INTERVAL:
        row.last_seen_at = now
    return user


def end_session(session: Session, sid: str) -> None:
    session.execute(delete(LoginSession).where(LoginSession.id_sha256 == token_digest(sid)))


def end_user_sessions(session: Session, user_id: int, keep: str | None = None) -> int:
    """End every session of a user (but `keep`, the caller's own); returns how many were ended."""
    q = delete(LoginSession).where(LoginSession.user_id == user_id)
    if keep:
        q = q.where(LoginSession.id_sha256 != token_digest(keep))
    return session.execute(q).rowcount or 0


# ---------------------------------------------------------------- API tokens


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, user: User, name: str = "script", actor: User | None = None,
                 days: int = DEFAULT_TOKEN_DAYS) -> str:
    """A new API token for `user`; only its sha256 is stored, so this is the one time it is seen."""
    if not 1 <= days <= MAX_TOKEN_DAYS:
        raise LungcadError(f"token lifetime must be 1 to {MAX_TOKEN_DAYS} days (got {days})")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    session.add(ApiToken(user_id=user.id, name=name[:64], token_sha256=token_digest(token), revoked=False,
                         created_at=now, expires_at=now + dt.timedelta(days=days)))
    audit(session, "token_create", actor, target=user.username, username="cli" if actor is None else "",
          name=name[:64], days=days)
    return token


def user_for_token(session: Session, token: str, now: dt.datetime | None = None) -> User | None:
    """The active user owning this unrevoked, unexpired token, or None (one query: it runs on every API call)."""
    now = now or utcnow()
    found = session.execute(
        select(User, ApiToken).join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_sha256 == token_digest(token), ApiToken.revoked.is_(False), User.active.is_(True),
               ApiToken.expires_at > now)
    ).first()
    if found is None:
        return None
    user, row = found
    if row.last_used_at is None or now - as_utc(row.last_used_at) > TOUCH_INTERVAL:
        row.last_used_at = now
    return user


def revoke_token(session: Session, token: ApiToken, actor: User) -> None:
    """Revoke a token: its owner or an administrator (the caller checks which); audited."""
    if not token.revoked:
        token.revoked = True
        audit(session, "token_revoke", actor, target=token.user.username, token_id=token.id, name=token.name)


def load_secret(data_dir: str | Path) -> str:
    """Session-signing secret: $LUNGCAD_SECRET_KEY, else a random key kept (mode 0600) in the data folder.

    Kept on disk so that a restart does not log everybody out, and shared by every worker.
    """
    env = os.environ.get("LUNGCAD_SECRET_KEY")
    if env:
        return env
    path = Path(data_dir) / "secret_key"
    if path.is_file():
        return path.read_text(encoding="ascii").strip()
    private_dir(data_dir)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key)
    return key


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))
