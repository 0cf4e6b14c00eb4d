"""Sign-in back-off, kept in the database: it survives a restart and is shared by every worker.

Failed sign-ins are counted under keys, and each key earns its own exponential back-off:

- the client address (`ip:...`) bounds guessing from one place, also when it is spread over many
  user names;
- the account (`user:<name>`) bounds guessing at one account from many places;
- a trusted device (`device:<id>`): a browser that has signed in to an account before carries a
  signed device cookie for it (OWASP, "Slow down online guessing attacks with device cookies").
  Its attempts at that account are counted against the device alone, so an attacker who drives the
  account, or the address of a shared proxy, into back-off does not lock the clinician out of her
  usual workstation; a stolen device cookie earns its own back-off.

An attempt is counted *before* the password is checked (and taken back from the address on
success), so parallel requests cannot slip guesses past the counter. After `free` failures of a key,
the next attempt must wait `base_s`, doubling with every further failure up to `cap_s`; a key
forgets its failures after `reset_s` without one. A waiting client gets 429 with Retry-After.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lungcad.web.db import LoginThrottle, as_utc

__all__ = [
    "DEVICE_COOKIE",
    "BackoffPolicy",
    "Keys",
    "device_cookie",
    "device_id",
    "keys_for",
    "record_attempt",
    "retry_after",
    "succeeded",
]

DEVICE_COOKIE = "lungcad_device"


@dataclass(frozen=True)
class BackoffPolicy:
    address_free: int = 10  # failures from one address before any wait (a ward behind one proxy mistypes)
    account_free: int = 5  # failures at one account (or from one trusted device) before any wait
    base_s: int = 1  # first wait; doubles with every further failure
    cap_s: int = 900  # longest wait (15 min): slows guessing to a few tries an hour per key
    reset_s: int = 3600  # a key with no failure for this long starts again from zero
    device_days: int = 90  # lifetime of a device cookie

    def delay(self, failures: int, free: int) -> int:
        """Seconds a key with `failures` recent failures must wait after the last one."""
        if failures < free:
            return 0
        return min(self.cap_s, self.base_s * 2 ** min(failures - free, 30))


@dataclass(frozen=True)
class Keys:
    """The throttle keys of one sign-in attempt: [(key, free failures)]; `address` is only decremented on success."""

    items: tuple[tuple[str, int], ...]
    address: str | None


def keys_for(address: str, username: str, device: str | None, policy: BackoffPolicy) -> Keys:
    if device:  # a trusted browser for this account: only its own counter applies
        return Keys(((f"device:{device}", policy.account_free),), None)
    ip = f"ip:{address}"[:160]
    return Keys(((ip, policy.address_free), (f"user:{username.lower()}"[:160], policy.account_free)), ip)


def retry_after(session: Session, keys: Keys, policy: BackoffPolicy, now: dt.datetime) -> int:
    """Seconds until an attempt with these keys may be checked (0: now)."""
    free = dict(keys.items)
    wait = 0.0
    for row in session.scalars(select(LoginThrottle).where(LoginThrottle.key.in_(list(free)))):
        if now - as_utc(row.last_failure_at) > dt.timedelta(seconds=policy.reset_s):
            continue
        until = as_utc(row.last_failure_at) + dt.timedelta(seconds=policy.delay(row.failures, free[row.key]))
        wait = max(wait, (until - now).total_seconds())
    return int(wait) + (wait % 1 > 0)  # whole seconds, rounded up


def record_attempt(session: Session, keys: Keys, policy: BackoffPolicy, now: dt.datetime) -> None:
    """Count an attempt as a failure under every key (atomic increments); `succeeded` takes it back."""
    stale = now - dt.timedelta(seconds=policy.reset_s)
    session.execute(delete(LoginThrottle).where(LoginThrottle.last_failure_at < stale))
    for key, _ in keys.items:
        bump = (
            update(LoginThrottle)
            .where(LoginThrottle.key == key)
            .values(failures=LoginThrottle.failures + 1, last_failure_at=now)
        )
        if session.execute(bump).rowcount:
            continue
        try:
            with session.begin_nested():
                session.add(LoginThrottle(key=key, failures=1, last_failure_at=now))
        except IntegrityError:  # a concurrent attempt created the row first
            session.execute(bump)


def succeeded(session: Session, keys: Keys) -> None:
    """The password was right: the account's (or device's) failures are forgotten, the address's attempt undone."""
    others = [key for key, _ in keys.items if key != keys.address]
    session.execute(delete(LoginThrottle).where(LoginThrottle.key.in_(others)))
    if keys.address:
        session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.key == keys.address, LoginThrottle.failures > 0)
            .values(failures=LoginThrottle.failures - 1)
        )


def _serializer(secret: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret, salt="lungcad-device")


def device_cookie(secret: str, username: str) -> str:
    """A new device cookie: this browser signed in to `username` (the id is random, the cookie signed)."""
    return _serializer(secret).dumps({"u": username.lower(), "d": secrets.token_urlsafe(16)})


def device_id(secret: str, cookie: str | None, username: str, policy: BackoffPolicy) -> str | None:
    """The device id if `cookie` is a valid, unexpired device cookie for `username`, else None."""
    if not cookie:
        return None
    try:
        data = _serializer(secret).loads(cookie, max_age=policy.device_days * 86400)
    except BadSignature:  # also SignatureExpired
        return None
    if not isinstance(data, dict) or data.get("u") != username.lower() or not isinstance(data.get("d"), str):
        return None
    return data["d"][:64]
