"""Issue 15 hardening of the web app: revocable sessions, expiring tokens, persisted sign-in back-off,
password change, owner-only files, HSTS, audit of rejected uploads and study views.

Time never passes in these tests: expiry is exercised by moving the stored timestamps back, and
back-off by a policy whose first wait (10 min) no test could outlast.
"""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from conftest import TRAIN_FAST
from test_web import PASSWORD, FakePredictor, csrf_of, login, png_bytes, users_database

from lungcad.cli import main
from lungcad.web.app import create_app
from lungcad.web.db import ApiToken, AuditEvent, LoginSession, User, open_database
from lungcad.web.security import SessionPolicy, add_user, create_token
from lungcad.web.throttle import DEVICE_COOKIE, BackoffPolicy

try:  # the end-to-end tests' throw-away PostgreSQL cluster (skips itself when PostgreSQL is absent)
    from test_web_e2e import postgres_server  # noqa: F401
except (ImportError, pytest.skip.Exception):  # that module skipping must not skip this one

    @pytest.fixture(scope="module")
    def postgres_server():
        pytest.skip("tests/test_web_e2e.py (the PostgreSQL fixture) cannot be imported here")


NEW_PASSWORD = "another long passphrase"
# Deterministic back-off: few free failures, and a first wait far longer than any test takes.
STRICT = BackoffPolicy(address_free=5, account_free=3, base_s=600)


@pytest.fixture
def site(tmp_path: Path):
    """A data folder with alice (clinician) and root (admin); `make(...)` builds an app on it."""
    data = tmp_path / "webdata"
    sessions = users_database(data)

    def make(**kwargs):
        return create_app(tmp_path / "run", data_dir=data, predictor=FakePredictor(), **kwargs)

    return make, sessions, data


def client_at(app, address: str = "testclient", **kwargs) -> TestClient:
    return TestClient(app, client=(address, 50000), **kwargs)


def is_signed_in(client: TestClient) -> bool:
    r = client.get("/", follow_redirects=False)
    assert r.status_code in (200, 303)
    return r.status_code == 200


def logout(client: TestClient) -> None:
    r = client.post("/logout", data={"csrf_token": csrf_of(client.get("/").text)}, follow_redirects=False)
    assert r.status_code == 303


def sessions_of(sessions, username: str) -> list[LoginSession]:
    with sessions() as s:
        return list(s.scalars(select(LoginSession).join(User).where(User.username == username)))


def actions(sessions) -> list[str]:
    with sessions() as s:
        return [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]


# ---------------------------------------------------------------- 1. sessions


def test_cookie_copied_before_logout_stops_working_after_it(site):
    make, sessions, _ = site
    app = make()
    client = client_at(app)
    assert login(client).status_code == 303
    copied = client.cookies.get("lungcad_session")
    assert len(sessions_of(sessions, "alice")) == 1
    logout(client)
    thief = client_at(app)
    thief.cookies.set("lungcad_session", copied)
    assert not is_signed_in(thief)
    assert thief.get("/api/me").status_code == 401
    assert sessions_of(sessions, "alice") == []


def test_idle_timeout_and_absolute_lifetime(site):
    make, sessions, _ = site
    client = client_at(make(session_policy=SessionPolicy(idle_minutes=20, hours=8)))

    def age(**back) -> None:
        with sessions() as s:
            row = s.scalar(select(LoginSession))
            for column, delta in back.items():
                setattr(row, column, getattr(row, column) - delta)
            s.commit()

    login(client)
    age(last_seen_at=dt.timedelta(minutes=19))  # still inside the idle timeout: the request renews it
    assert is_signed_in(client)
    age(last_seen_at=dt.timedelta(minutes=19))
    assert is_signed_in(client)  # 19 + 19 min since sign-in, but never 20 idle
    age(last_seen_at=dt.timedelta(minutes=21))
    assert not is_signed_in(client)
    assert sessions_of(sessions, "alice") == []  # the expired session is gone, not just refused

    login(client)
    age(created_at=dt.timedelta(hours=8, minutes=1))  # active all along, but past the lifetime
    assert not is_signed_in(client)
    assert sessions_of(sessions, "alice") == []


def test_session_policy_is_validated():
    from lungcad.errors import LungcadError

    with pytest.raises(LungcadError, match="idle <= lifetime"):
        SessionPolicy(idle_minutes=600, hours=2)
    with pytest.raises(LungcadError):
        SessionPolicy(idle_minutes=0)


def test_password_change_requires_current_password_and_ends_other_sessions(site):
    make, sessions, _ = site
    app = make()
    here, elsewhere = client_at(app), client_at(app)
    login(here)
    login(elsewhere)
    assert len(sessions_of(sessions, "alice")) == 2

    def change(current: str, new: str, confirm: str | None = None):
        token = csrf_of(here.get("/account").text)
        return here.post(
            "/account/password",
            follow_redirects=False,
            data={
                "csrf_token": token,
                "current_password": current,
                "new_password": new,
                "confirm_password": new if confirm is None else confirm,
            },
        )

    r = change("wrong password", NEW_PASSWORD)
    assert r.status_code == 422 and "current password is wrong" in r.text
    assert change(PASSWORD, NEW_PASSWORD, "typo").status_code == 422
    r = change(PASSWORD, "short")
    assert r.status_code == 422 and "too short" in r.text
    assert is_signed_in(elsewhere)  # nothing changed yet
    r = here.post(
        "/account/password",
        data={"current_password": PASSWORD, "new_password": NEW_PASSWORD, "confirm_password": NEW_PASSWORD},
    )
    assert r.status_code == 403  # CSRF
    r = change(PASSWORD, NEW_PASSWORD)
    assert r.status_code == 303 and r.headers["location"] == "/account?changed=1"
    assert is_signed_in(here) and not is_signed_in(elsewhere)
    assert len(sessions_of(sessions, "alice")) == 1
    fresh = client_at(app)
    assert login(fresh).status_code == 401  # the old password no longer works
    assert login(fresh, password=NEW_PASSWORD).status_code == 303
    assert actions(sessions).count("password_change_failed") == 3 and "password_change" in actions(sessions)


def test_wrong_current_passwords_earn_a_backoff(site):
    make, _, _ = site
    client = client_at(make(backoff=STRICT))
    login(client)

    def change(current: str, confirm: str = NEW_PASSWORD):
        data = {
            "csrf_token": csrf_of(client.get("/account").text),
            "current_password": current,
            "new_password": NEW_PASSWORD,
            "confirm_password": confirm,
        }
        return client.post("/account/password", data=data, follow_redirects=False)

    for _ in range(STRICT.account_free + 2):
        assert change(PASSWORD, confirm="typo").status_code == 422  # typos in the new one are not guesses
    for _ in range(STRICT.account_free):
        assert change("guess").status_code == 422
    r = change(PASSWORD)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert login(client_at(client.app, "10.9.9.9")).status_code == 303  # signing in is a separate counter


def test_deactivating_a_user_ends_her_sessions(site):
    make, sessions, _ = site
    app = make()
    alice, admin = client_at(app), client_at(app)
    login(alice)
    login(admin, "root")
    with sessions() as s:
        alice_id = s.scalar(select(User.id).where(User.username == "alice"))
    page = admin.get("/users").text
    r = admin.post(
        f"/users/{alice_id}/active", data={"active": "no", "csrf_token": csrf_of(page)}, follow_redirects=False
    )
    assert r.status_code == 303
    assert sessions_of(sessions, "alice") == []
    admin.post(f"/users/{alice_id}/active", data={"active": "yes", "csrf_token": csrf_of(page)})
    assert not is_signed_in(alice)  # reactivation does not bring the old session back
    assert login(alice).status_code == 303 and is_signed_in(alice)


# ---------------------------------------------------------------- 2. API tokens


def test_tokens_expire_record_last_use_and_are_listed_without_their_secret(site):
    make, sessions, _ = site
    client = client_at(make())
    login(client)
    r = client.post(
        "/account/tokens", data={"name": "pacs", "days": "30", "csrf_token": csrf_of(client.get("/account").text)}
    )
    token = r.text.split('<pre id="new-token">')[1].split("</pre>")[0]
    assert token.startswith("lcd_")
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.post("/account/tokens", data={"days": "400", "csrf_token": csrf_of(r.text)}).status_code == 422
    with sessions() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.name == "pacs"))
        assert row.last_used_at is None
        assert dt.timedelta(days=29) < row.expires_at - row.created_at <= dt.timedelta(days=30)
    api = client_at(client.app)  # no cookie: the token alone
    assert api.get("/api/me", headers=bearer).status_code == 200
    listed = api.get("/api/tokens", headers=bearer).json()
    assert [t["name"] for t in listed] == ["pacs"] and listed[0]["last_used_at"] is not None
    assert token not in str(listed) and listed[0]["expired"] is False
    assert "pacs" in client.get("/account").text
    with sessions() as s:
        s.execute(update(ApiToken).values(expires_at=ApiToken.created_at - dt.timedelta(seconds=1)))
        s.commit()
    r = api.get("/api/me", headers=bearer)
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")


def test_users_revoke_their_tokens_and_admins_anyones(site):
    make, sessions, _ = site
    app = make()
    with sessions() as s:
        alice = s.scalar(select(User).where(User.username == "alice"))
        root = s.scalar(select(User).where(User.username == "root"))
        a1, a2, r1 = create_token(s, alice, "one"), create_token(s, alice, "two"), create_token(s, root, "admin's")
        s.commit()
        ids = {t.name: t.id for t in s.scalars(select(ApiToken))}
    api = client_at(app)
    h = lambda t: {"Authorization": f"Bearer {t}"}

    # alice cannot see or revoke root's token (404: ids are not probed), nor list everyone's
    assert api.delete(f"/api/tokens/{ids['admin' + chr(39) + 's']}", headers=h(a1)).status_code == 404
    assert api.get("/api/tokens?all=true", headers=h(a1)).status_code == 403
    assert api.get("/api/me", headers=h(r1)).status_code == 200
    # her own: revoked through the API, refused from then on
    assert api.delete(f"/api/tokens/{ids['one']}", headers=h(a2)).status_code == 204
    assert api.get("/api/me", headers=h(a1)).status_code == 401
    assert {t["name"]: t["revoked"] for t in api.get("/api/tokens", headers=h(a2)).json()} == {
        "one": True,
        "two": False,
    }
    # an administrator revokes alice's other token from the users page
    admin = client_at(app)
    login(admin, "root")
    assert len(api.get("/api/tokens?all=true", headers=h(r1)).json()) == 3
    page = admin.get("/users").text
    assert f'action="/tokens/{ids["two"]}/revoke"' in page and f'action="/tokens/{ids["one"]}/revoke"' not in page
    r = admin.post(f"/tokens/{ids['two']}/revoke", data={"csrf_token": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/users"
    assert api.get("/api/me", headers=h(a2)).status_code == 401
    with sessions() as s:
        revokes = s.scalars(select(AuditEvent).where(AuditEvent.action == "token_revoke").order_by(AuditEvent.id)).all()
        assert [(e.username, e.target) for e in revokes] == [("alice", "alice"), ("root", "alice")]


def test_cli_token_lifetime(tmp_path, capsys):
    data = str(tmp_path / "d")
    assert main(["users", "add", "bob", "--role", "clinician", "--password", PASSWORD, "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["users", "token", "bob", "--days", "7", "--data-dir", data]) == 0
    assert capsys.readouterr().out.strip().startswith("lcd_")
    assert main(["users", "token", "bob", "--days", "0", "--data-dir", data]) == 1
    err = capsys.readouterr().err
    assert "token lifetime must be 1 to 365 days" in err and "Traceback" not in err
    _, sessions = open_database(None, data)
    with sessions() as s:
        row = s.scalar(select(ApiToken))
        assert dt.timedelta(days=6) < row.expires_at - row.created_at <= dt.timedelta(days=7)


def test_migration_gives_existing_tokens_an_expiry(tmp_path):
    from sqlalchemy import text

    from lungcad.web.db import make_db_engine
    from lungcad.web.migrate import upgrade_database
    from lungcad.web.security import token_digest, user_for_token

    engine = make_db_engine(f"sqlite:///{tmp_path / 'old.sqlite3'}")
    upgrade_database(engine, "0002")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                "VALUES (1, 'old', 'x', 'clinician', 1, '2025-01-01 00:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO api_tokens (user_id, name, token_sha256, created_at, revoked) "
                "VALUES (1, 'legacy', :d, '2025-01-01 00:00:00', 0)"
            ),
            {"d": token_digest("lcd_legacy")},
        )
    upgrade_database(engine)
    _, sessions = open_database(f"sqlite:///{tmp_path / 'old.sqlite3'}", tmp_path)
    with sessions() as s:
        row = s.scalar(select(ApiToken))
        assert row.expires_at is not None
        assert user_for_token(s, "lcd_legacy").username == "old"  # still valid, for 90 days


# ---------------------------------------------------------------- 3. sign-in back-off


def attempt(client: TestClient, user: str = "alice", password: str = PASSWORD):
    return login(client, user, password)


def test_account_backoff_does_not_lock_out_the_clinicians_own_browser(site):
    make, _, _ = site
    app = make(backoff=STRICT)
    ward = client_at(app, "10.1.1.20")  # alice's workstation: she has signed in from it before
    assert attempt(ward).status_code == 303
    assert ward.cookies.get(DEVICE_COOKIE)
    logout(ward)

    attacker = client_at(app, "203.0.113.9")
    for _ in range(STRICT.account_free):
        assert attempt(attacker, password="guess").status_code == 401
    r = attempt(attacker)  # even the right password is not checked while the account waits
    assert r.status_code == 429 and "try again" in r.text
    assert 590 <= int(r.headers["Retry-After"]) <= 600
    assert not is_signed_in(attacker)

    # alice, elsewhere, from her usual browser: signed in at once
    assert attempt(ward).status_code == 303 and is_signed_in(ward)
    # a browser that never signed in to her account waits like the attacker (slowed, not let in)
    assert attempt(client_at(app, "10.1.1.21")).status_code == 429


def test_backoff_is_persisted_across_restarts(site):
    make, _, _ = site
    attacker = client_at(make(backoff=STRICT), "203.0.113.9")
    for _ in range(STRICT.account_free):
        attempt(attacker, password="guess")
    assert attempt(attacker, password="guess").status_code == 429
    restarted = client_at(make(backoff=STRICT), "203.0.113.9")  # a new process on the same database
    r = attempt(restarted)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0


def test_failures_spread_over_many_user_names_are_limited_per_address(site):
    make, _, _ = site
    app = make(backoff=STRICT)
    sprayer = client_at(app, "198.51.100.7")
    for i in range(STRICT.address_free):
        assert attempt(sprayer, f"user{i}", "Winter2025!").status_code == 401
    assert attempt(sprayer, "root", "Winter2025!").status_code == 429  # a fresh user name does not help
    assert attempt(client_at(app, "10.1.1.30"), "root").status_code == 303  # other addresses are unaffected


def test_trusted_browser_behind_the_attackers_proxy_still_signs_in(site):
    make, _, _ = site
    app = make(backoff=STRICT)
    ward = client_at(app, "10.0.0.1")  # the hospital's outgoing proxy, shared with the attacker
    attempt(ward)
    logout(ward)
    attacker = client_at(app, "10.0.0.1")
    for i in range(STRICT.address_free):
        attempt(attacker, f"user{i}", "guess")
    assert attempt(attacker, "alice").status_code == 429
    assert attempt(ward).status_code == 303


def test_device_cookie_of_another_account_or_forged_does_not_bypass(site):
    make, _, _ = site
    app = make(backoff=STRICT)
    mallory = client_at(app, "203.0.113.9")
    attempt(mallory, "root")  # mallory knows root's password, so her browser is trusted for root
    logout(mallory)
    cookie = mallory.cookies.get(DEVICE_COOKIE)
    for _ in range(STRICT.account_free):
        attempt(client_at(app, "203.0.113.10"), password="guess")
    for value in (cookie, cookie[:-2] + "xx", "garbage"):
        other = client_at(app, "203.0.113.11")
        other.cookies.set(DEVICE_COOKIE, value, path="/login")
        assert attempt(other).status_code == 429


def test_successful_sign_ins_do_not_count_against_the_address(site):
    make, _, _ = site
    app = make(backoff=STRICT)
    for _ in range(STRICT.address_free + 2):  # a ward signing in all day from one proxy
        c = client_at(app, "10.0.0.1")
        assert attempt(c).status_code == 303


# ---------------------------------------------------------------- 4. files, HSTS, audit


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid"), reason="POSIX permissions")
def test_data_folder_and_database_are_owner_only(site, tmp_path):
    make, _, data = site
    make()
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(data) == 0o700
    for sub in ("images", "dicom", "explain"):
        assert mode(data / sub) == 0o700
    assert mode(data / "lungcad.sqlite3") == 0o600
    assert mode(data / "secret_key") == 0o600
    # an existing installation's world-readable database is tightened at the next start
    (data / "lungcad.sqlite3").chmod(0o644)
    data.chmod(0o755)
    make()
    assert mode(data / "lungcad.sqlite3") == 0o600 and mode(data) == 0o700


def test_hsts_only_over_https(site):
    make, _, _ = site
    app = make()
    assert "strict-transport-security" not in client_at(app).get("/login").headers
    hsts = client_at(app, base_url="https://lungcad.example").get("/login").headers["strict-transport-security"]
    assert hsts == "max-age=31536000"
    assert "strict-transport-security" in client_at(make(secure_cookies=True)).get("/health").headers


def test_audit_records_rejected_api_uploads_and_study_views(site):
    make, sessions, _ = site
    app = make()
    with sessions() as s:
        token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
        s.commit()
    api = client_at(app)
    bearer = {"Authorization": f"Bearer {token}"}
    r = api.post("/api/predict", files={"file": ("x.png", b"not an image", "image/png")}, headers=bearer)
    assert r.status_code in (415, 422)
    r = api.post("/api/predict", files={"file": ("x.png", png_bytes(90), "image/png")}, headers=bearer)
    study_id = r.json()["id"]
    assert api.get(f"/api/studies/{study_id}", headers=bearer).status_code == 200
    browser = client_at(app)
    login(browser, "root")
    assert browser.get(f"/studies/{study_id}").status_code == 200
    with sessions() as s:
        rows = s.scalars(
            select(AuditEvent).where(AuditEvent.action.in_(["upload_rejected", "study_view"])).order_by(AuditEvent.id)
        ).all()
    assert [(e.action, e.username, e.target) for e in rows] == [
        ("upload_rejected", "alice", ""),
        ("study_view", "alice", study_id),
        ("study_view", "root", study_id),
    ]
    assert rows[0].detail["via"] == "api" and rows[0].detail["reason"]


# ---------------------------------------------------------------- 8. clean failures on bad DICOM

DS_TAGS = {
    "RescaleSlope": b"\x28\x00\x53\x10",
    "RescaleIntercept": b"\x28\x00\x52\x10",
    "WindowCenter": b"\x28\x00\x50\x10",
}


def ct_with(keyword: str, value: bytes, modality: bytes = b"CT") -> bytes:
    """pydicom's CT_small.dcm with one DS attribute's raw value replaced (pydicom will not write a bad DS)."""
    import io

    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # explicit VR little endian
    raw = buf.getvalue()
    start = raw.index(DS_TAGS[keyword] + b"DS")
    length = int.from_bytes(raw[start + 6 : start + 8], "little")
    value += b" " * (len(value) % 2)
    element = DS_TAGS[keyword] + b"DS" + len(value).to_bytes(2, "little") + value
    raw = raw[:start] + element + raw[start + 8 + length :]
    return raw.replace(b"\x08\x00\x60\x00CS\x02\x00CT", b"\x08\x00\x60\x00CS\x02\x00" + modality)


@pytest.mark.parametrize(
    ("keyword", "value", "modality"),
    [
        ("RescaleSlope", b"abc", b"CT"),
        ("RescaleSlope", b"inf", b"CT"),
        ("RescaleIntercept", b"1e999", b"CT"),
        ("WindowCenter", b"abc", b"MR"),
    ],
)
def test_invalid_dicom_attribute_is_a_one_line_error(keyword, value, modality):
    from lungcad.dicom import read_dicom
    from lungcad.dicom.reader import DicomReadError

    with pytest.raises(DicomReadError, match=f"bad.dcm: invalid {keyword}"):
        read_dicom(ct_with(keyword, value, modality), name="bad.dcm")


class DicomReadingPredictor(FakePredictor):
    """The fake, but DICOM goes through the real reader (lungcad.dicom.read_dicom), as in Predictor."""

    def load_pixels(self, data, name=None):
        from lungcad.dicom import read_dicom

        if data[128:132] == b"DICM":
            return read_dicom(data, name=name).frames[0], {}
        return super().load_pixels(data, name)


def test_bad_dicom_upload_is_422_on_the_api_and_a_per_file_result_in_the_form(site):
    make, sessions, data = site
    app = make()
    app.state.store.predictor = DicomReadingPredictor()
    bad = ct_with("RescaleSlope", b"abc")
    with sessions() as s:
        token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
        s.commit()
    r = client_at(app).post(
        "/api/predict",
        files={"file": ("bad.dcm", bad, "application/dicom")},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 422 and "invalid RescaleSlope" in r.json()["detail"]
    browser = client_at(app)
    login(browser)
    files = [("first.png", png_bytes(60)), ("bad.dcm", bad), ("last.png", png_bytes(200))]
    r = browser.post(
        "/upload",
        data={"csrf_token": csrf_of(browser.get("/").text)},
        files=[("files", (n, raw, "application/octet-stream")) for n, raw in files],
    )
    assert r.status_code == 200
    rows = r.text.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert len(rows) == 3
    assert "first.png" in rows[0] and "/studies/" in rows[0]
    assert "bad.dcm" in rows[1] and "invalid RescaleSlope" in rows[1] and "/studies/" not in rows[1]
    assert "last.png" in rows[2] and "/studies/" in rows[2]
    assert len(list((data / "images").iterdir())) == 2 and not list((data / "dicom").iterdir())


def test_unexpected_failure_of_one_file_does_not_drop_the_others(site):
    make, _, data = site
    app = make()

    class FailsOnBright(FakePredictor):
        def predict_prepared(self, tensors, sources=None, pixels=None):
            if any(t.mean() > 180 for t in tensors):
                raise RuntimeError("secret internal detail")
            return super().predict_prepared(tensors, sources, pixels)

    app.state.store.predictor = FailsOnBright()
    browser = client_at(app, raise_server_exceptions=False)
    login(browser)
    files = [("dark.png", png_bytes(40)), ("bright.png", png_bytes(230)), ("dim.png", png_bytes(80))]
    r = browser.post(
        "/upload",
        data={"csrf_token": csrf_of(browser.get("/").text)},
        files=[("files", (n, raw, "application/octet-stream")) for n, raw in files],
    )
    assert r.status_code == 200 and "secret internal detail" not in r.text
    rows = r.text.split("<tbody>")[1].split("</tbody>")[0].split("<tr>")[1:]
    assert "/studies/" in rows[0] and "/studies/" in rows[2]
    assert "Something went wrong" in rows[1] and "reference" in rows[1]
    assert len(list((data / "images").iterdir())) == 2


# ---------------------------------------------------------------- 9. full or read-only storage


def _ct_small() -> bytes:
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def test_disk_full_between_the_two_files_of_a_dicom_upload_leaves_neither(site, monkeypatch):
    import errno

    from lungcad.web import service

    make, sessions, data = site
    app = make()
    real = service.atomic_path

    def dicom_disk_full(path):
        if str(path).endswith(".dcm"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(service, "atomic_path", dicom_disk_full)
    with sessions() as s:
        token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
        s.commit()
    r = client_at(app).post(
        "/api/predict",
        files={"file": ("ct.dcm", _ct_small(), "application/dicom")},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "data folder cannot be written (No space left on device)" in r.json()["detail"]
    assert not any((data / "images").iterdir()) and not any((data / "dicom").iterdir())


def _storage_scenario(data: str) -> dict:
    """Run inside a private mount namespace (see the test below): the data folder is a 4 MB tmpfs."""
    import subprocess

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", data], check=True)
    engine, sessions = open_database(None, data)
    with sessions() as s:
        token = create_token(s, add_user(s, "alice", PASSWORD, "clinician"))
        s.commit()
    engine.dispose()
    app = create_app(Path(data) / "run", data_dir=data, predictor=FakePredictor())
    out: dict = {}
    with TestClient(app, raise_server_exceptions=False) as client:
        bearer = {"Authorization": f"Bearer {token}"}

        def upload(value: int):
            r = client.post("/api/predict", files={"file": ("x.png", png_bytes(value), "image/png")}, headers=bearer)
            return [r.status_code, r.text]

        out["before"] = upload(100)
        try:  # fill the disk
            with open(Path(data) / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        except OSError:
            pass
        h = client.get("/health")
        out["health_full"] = [h.status_code, h.json()]
        out["upload_full"] = upload(150)
        out["images_full"] = sorted(p.name for p in (Path(data) / "images").iterdir())
        (Path(data) / "filler").unlink()
        app.state.engine.dispose()  # files open for writing would make the remount fail ("busy")
        subprocess.run(["mount", "-o", "remount,ro", data], check=True)
        h = client.get("/health")
        out["health_ro"] = [h.status_code, h.json()]
        out["upload_ro"] = upload(200)
        page = client.get("/login").text
        r = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": csrf_of(page)})
        out["login_ro"] = [r.status_code, r.text]
    return out


@pytest.mark.slow  # mounts and fills a tmpfs: ~10 s
def test_full_and_read_only_data_folder_answer_503_and_health_degrades(tmp_path):
    """A real tmpfs, filled up and then remounted read-only, in a mount namespace of its own."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("cannot create a mount namespace here (unshare not permitted)")
    data = tmp_path / "mnt"
    data.mkdir()
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    code = f"import json, test_hardening as t; print(json.dumps(t._storage_scenario({str(data)!r})))"
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode and "mount" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip("mounting a tmpfs is not permitted here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    assert out["before"][0] == 201
    status, body = out["health_full"]
    assert status == 503 and body["status"] == "degraded" and body["data_dir"] != "ok"
    status, text = out["upload_full"]
    assert status == 503 and "cannot be written" in text and "Traceback" not in text
    assert len(out["images_full"]) == 1  # only the upload from before; no half-written file or temp file
    status, body = out["health_ro"]
    assert status == 503 and body["status"] == "degraded"
    assert "Read-only file system" in body["data_dir"] and body["database"] != "ok"
    assert out["upload_ro"][0] == 503
    status, text = out["login_ro"]
    assert status == 503 and "Storage unavailable" in text


# ---------------------------------------------------------------- 11. one-class training, pydicom tracebacks


def test_pydicom_decoder_tracebacks_go_to_debug_not_error(caplog):
    import logging

    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from lungcad.dicom import read_dicom
    from lungcad.dicom.reader import DicomReadError

    name = "MR_small_jpeg_ls_lossless.dcm"
    raw = bytearray(Path(get_testdata_file(name)).read_bytes())
    start = bytes(raw).index(bytes(pydicom.dcmread(get_testdata_file(name)).PixelData)[:64])
    raw[start + 16 : start + 20] = b"\xff\xff\xff\x7f"  # the first fragment's JPEG-LS start marker: garbage
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomReadError) as err:
            read_dicom(bytes(raw), name="broken.dcm")
    if "not installed" in str(err.value):
        pytest.skip("no JPEG-LS decoder plugin installed")
    assert "cannot decode pixel data" in str(err.value) and "marker" in str(err.value)  # the plugin's reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info]
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info]  # kept for --verbose


@pytest.mark.parametrize(
    ("keep", "task"), [(["Normal cases"], "multiclass"), (["Normal cases", "Bengin cases"], "binary")]
)
def test_training_on_one_class_refuses_and_writes_nothing(tmp_path, capsys, keep, task):
    import shutil

    from conftest import make_dataset

    data = make_dataset(tmp_path / "data")
    for folder in data.iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder)
    out = tmp_path / "run"
    args = [
        "--data",
        str(data),
        "--out",
        str(out),
        "--task",
        task,
        "--epochs",
        "1",
        "--pretrained",
        "none",
        "--image-size",
        "64",
        "--no-progress",
    ]
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err
    assert "training images hold one class only" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["train", *args, "--folds", "3"]) == 1
    assert "one class only" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------- 12. reproducible weights files


def test_same_weights_give_the_same_model_sha256(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from lungcad.data.transforms import Preprocessing
    from lungcad.models.contract import ModelContract, save_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    shas, orders = set(), set()
    for i in range(12):  # the metadata order used to change with the Rust HashMap's random state
        run = tmp_path / f"r{i}"
        run.mkdir()
        contract = ModelContract(
            arch="resnet50", task="multiclass", classes=["a", "b", "c"], preprocessing=Preprocessing(image_size=32)
        )
        save_model(run, model, contract)
        shas.add(contract.model_sha256)
        raw = (run / "model.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert n % 8 == 0
        orders.add(tuple(json.loads(raw[8 : 8 + n])["__metadata__"]))
        loaded = load_file(str(run / "model.safetensors"))
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert orders == {("arch", "task")} and len(shas) == 1


@pytest.mark.slow
def test_resumed_training_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, monkeypatch):
    from conftest import make_dataset

    import lungcad.training.trainer as trainer
    from lungcad.models.contract import read_contract

    data = make_dataset(tmp_path / "data", size=32)
    args = ["--data", str(data), "--epochs", "2", *TRAIN_FAST, "--image-size", "32", "--seed", "3"]
    assert main(["train", *args, "--out", str(tmp_path / "straight")]) == 0

    real = trainer._fault_injection

    def interrupt_at_second_epoch(ctx, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # Ctrl-C after the first epoch's checkpoint
        real(ctx, epoch)

    monkeypatch.setattr(trainer, "_fault_injection", interrupt_at_second_epoch)
    assert main(["train", *args, "--out", str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(trainer, "_fault_injection", real)
    assert main(["train", "--resume", "--out", str(tmp_path / "resumed"), "--no-progress"]) == 0
    straight, resumed = read_contract(tmp_path / "straight"), read_contract(tmp_path / "resumed")
    assert straight.model_sha256 == resumed.model_sha256


# ---------------------------------------------------------------- 10. CLI on a disk that refuses writes


@pytest.mark.slow
def test_train_that_fails_writing_leaves_no_folder_and_one_line(tmp_path, monkeypatch, capsys):
    import os
    from types import SimpleNamespace

    from safetensors import SafetensorError

    from conftest import make_dataset

    import lungcad.training.trainer as trainer

    data = make_dataset(tmp_path / "data", size=32)
    out = tmp_path / "run"

    def disk_full(state, path, *a, **k):  # what safetensors raises on a full disk: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(trainer, "save_file", disk_full)  # the first weights file of the first epoch
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=0, f_frsize=4096))
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", *TRAIN_FAST, "--image-size", "32"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing that would block a rerun (or a --resume that could not work)


def test_predict_and_evaluate_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    import os

    from conftest import make_run
    from test_predict import _ct_png

    target = Path("/proc/self")  # a folder nobody, root included, can create files in
    if not target.is_dir() or os.access("/proc/self/lungcad.csv", os.F_OK):
        pytest.skip("no /proc")
    run = make_run(tmp_path / "run")
    image = tmp_path / "x.png"
    image.write_bytes(_ct_png())
    assert main(["predict", str(run), str(image), "--out", str(target / "lungcad.csv"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lungcad predict: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 6. special files


@pytest.mark.timeout(300)  # a regression would block on the FIFO: fail instead of hanging the suite
@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="POSIX FIFOs")
def test_fifo_and_device_inputs_are_error_rows_not_hangs(tmp_path, capsys):
    import json
    import os

    from conftest import make_run
    from test_predict import _ct_png

    run = make_run(tmp_path / "run")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(_ct_png())
    os.mkfifo(folder / "b.jpg")  # named like an image: reported
    os.mkfifo(folder / "c")  # not named like one: skipped quietly (sniffing would open it)
    (folder / "d.png").symlink_to("/dev/zero")  # would be read until memory runs out
    out = tmp_path / "res.json"
    assert main(["predict", str(run), str(folder), "--out", str(out), "--no-progress"]) == 1
    rows = {Path(r["source"]).name: r for r in json.loads(out.read_text())}
    assert sorted(rows) == ["a.png", "b.jpg", "d.png"]
    assert rows["a.png"]["error"] == "" and rows["a.png"]["label"]
    for name in ("b.jpg", "d.png"):
        assert "not a regular file" in rows[name]["error"] and not rows[name]["label"]
    assert "Traceback" not in capsys.readouterr().err


def test_oversized_file_is_refused_before_it_is_read(tmp_path):
    from lungcad.data.images import ImageReadError, read_regular_file

    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(3 << 20)  # sparse: 3 MiB that take no disk space
    with pytest.raises(ImageReadError, match=r"big.png: file too large \(3 MiB, limit 2 MiB\)"):
        read_regular_file(big, limit=2 << 20)
    assert len(read_regular_file(big, limit=4 << 20)) == 3 << 20


# ---------------------------------------------------------------- the same on PostgreSQL


@pytest.mark.slow  # starts PostgreSQL
def test_sessions_tokens_and_backoff_on_postgresql(postgres_server, tmp_path):  # noqa: F811
    """Migration 0002 -> head with an existing token, sessions, back-off and token use on a real PostgreSQL."""
    from sqlalchemy import text

    from lungcad.web.db import make_db_engine
    from lungcad.web.migrate import upgrade_database
    from lungcad.web.security import token_digest

    db = postgres_server()
    engine = make_db_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    upgrade_database(engine, "0002")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                "VALUES (100, 'old', 'x', 'clinician', true, now())"
            )
        )
        conn.execute(
            text(
                "INSERT INTO api_tokens (user_id, name, token_sha256, created_at, revoked) "
                "VALUES (100, 'legacy', :d, now(), false)"
            ),
            {"d": token_digest("lcd_legacy")},
        )
    engine.dispose()
    _, sessions = open_database(db, tmp_path)  # upgrades to head
    with sessions() as s:
        add_user(s, "alice", PASSWORD, "clinician")
        s.commit()
    app = create_app(tmp_path / "run", data_dir=tmp_path, db=db, predictor=FakePredictor(), backoff=STRICT)
    api = client_at(app)
    r = api.get("/api/tokens", headers={"Authorization": "Bearer lcd_legacy"})
    assert r.status_code == 200 and r.json()[0]["last_used_at"] is not None and r.json()[0]["expired"] is False

    browser = client_at(app, "10.1.1.20")
    assert login(browser).status_code == 303
    copied = browser.cookies.get("lungcad_session")
    logout(browser)
    thief = client_at(app)
    thief.cookies.set("lungcad_session", copied)
    assert not is_signed_in(thief)

    attacker = client_at(app, "203.0.113.9")
    for _ in range(STRICT.account_free):
        assert attempt(attacker, password="guess").status_code == 401
    assert attempt(attacker).status_code == 429
    assert attempt(browser).status_code == 303  # the trusted browser
