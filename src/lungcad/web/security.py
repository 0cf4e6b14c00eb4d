"""Passwords (argon2), API tokens, the session secret and CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from lungcad.errors import LungcadError
from lungcad.web.db import ROLES, ApiToken, User, audit

_hasher = PasswordHasher()  # argon2id with the library's maintained default cost parameters
TOKEN_PREFIX = "lcd_"
MIN_PASSWORD = 8
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
    if len(password) < MIN_PASSWORD:
        raise LungcadError(f"password too short (at least {MIN_PASSWORD} characters)")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise LungcadError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    session.flush()
    audit(session, "user_add", actor, target=username, username="cli" if actor is None else "", role=role)
    return user


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, user: User, name: str = "script", actor: User | None = None) -> str:
    """A new API token for `user`; only its sha256 is stored, so this is the one time it is seen."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, name=name[:64], token_sha256=token_digest(token), revoked=False))
    audit(session, "token_create", actor, target=user.username, username="cli" if actor is None else "", name=name[:64])
    return token


def user_for_token(session: Session, token: str) -> User | None:
    """The active user owning this unrevoked token, or None (one query: it runs on every API call)."""
    return session.scalar(
        select(User).join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_sha256 == token_digest(token), ApiToken.revoked.is_(False), User.active.is_(True))
    )


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
    Path(data_dir).mkdir(parents=True, exist_ok=True)
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
