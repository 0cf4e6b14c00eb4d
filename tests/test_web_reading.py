"""The reading pilot (issue 13 item 4) and the polish of item 6, through httpx (FastAPI TestClient)
with the fake predictor of test_web: reading mode hides the AI result until the unaided read,
one read per reader and study with history, agree derived, the API's feedback integrity,
dashboard figures on a hand-computed pilot, SUS scoring, the migration of old feedback rows,
model and audit pages without JSON or server paths, error pages with navigation.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import func, select, text  # noqa: E402

from test_web import FakePredictor, csrf_of, login, png_bytes, upload, users_database  # noqa: E402

from lungcad.web.app import create_app  # noqa: E402
from lungcad.web.db import Read, ReadRevision, Study, User, open_database  # noqa: E402
from lungcad.web.security import create_token  # noqa: E402

CLASSES = ["normal", "benign", "malignant"]


@pytest.fixture
def site(tmp_path: Path):
    data = tmp_path / "webdata"
    sessions = users_database(data)
    fake = FakePredictor()
    app = create_app(tmp_path / "run", data_dir=data, predictor=fake)
    with TestClient(app) as client:
        yield client, sessions, data, fake


def set_reading_mode(sessions, username: str, on: bool = True) -> None:
    with sessions() as s:
        s.scalar(select(User).where(User.username == username)).reading_mode = on
        s.commit()


def token_of(sessions, username: str) -> str:
    with sessions() as s:
        token = create_token(s, s.scalar(select(User).where(User.username == username)))
        s.commit()
    return token


def form_section(page: str, form_id: str) -> str:
    start = page.index(f'id="{form_id}"')
    return page[start:page.index("</form>", start)]


AI_MARKERS = ('id="result-headline"', 'id="result-probabilities"', "Calibrated probabilities", "overlay.png",
              "operating threshold", "P(malignant)", "p(malignant)", 'id="heatmap"', "heatmap.npy",
              'id="series-1-headline"', 'id="strip-', "Key slices", 'class="keys"')


def ai_values(sessions, study_id: str) -> list[str]:
    """The stored AI numbers of a study as the study page and the API would print them."""
    with sessions() as s:
        st = s.get(Study, study_id)
        out = [f"{st.malignant_probability:.3f}", repr(st.malignant_probability)]
        out += [f"{p * 100:.1f} %" for p in st.probabilities.values()]
    return out


# ------------------------------------------------------------------------------------ reading mode


def test_admin_turns_reading_mode_on_and_off(site):
    client, sessions, _, _ = site
    login(client, "root")
    page = client.get("/users").text
    with sessions() as s:
        alice = s.scalar(select(User).where(User.username == "alice"))
    assert client.post(f"/users/{alice.id}/reading-mode", data={"reading_mode": "yes"}).status_code == 403  # CSRF
    r = client.post(f"/users/{alice.id}/reading-mode", data={"reading_mode": "yes", "csrf_token": csrf_of(page)},
                    follow_redirects=False)
    assert r.status_code == 303
    with sessions() as s:
        assert s.get(User, alice.id).reading_mode is True
    assert 'id="reading-mode-alice">Turn off' in client.get("/users").text
    client.post(f"/users/{alice.id}/reading-mode", data={"reading_mode": "no", "csrf_token": csrf_of(page)})
    with sessions() as s:
        assert s.get(User, alice.id).reading_mode is False


def test_unaided_read_before_reveal_then_final_read_with_history(site):
    client, sessions, _, _ = site
    set_reading_mode(sessions, "alice")
    login(client)
    url = upload(client, [("a.png", png_bytes(220))]).headers["location"]  # the fake says malignant
    study_id = url.rsplit("/", 1)[1]
    values = ai_values(sessions, study_id)
    page = client.get(url).text
    # hidden: nothing of the AI result in the HTML, no preselected answer
    for needle in AI_MARKERS + tuple(values):
        assert needle not in page, needle
    assert 'id="ai-hidden"' in page and 'id="unaided-form"' in page and 'id="aided-form"' not in page
    assert "checked" not in form_section(page, "unaided-form")
    assert "malignant" not in page.replace(form_section(page, "unaided-form"), "")  # the AI's label: only an option
    assert client.get(f"{url}/overlay.png").status_code == 403
    assert client.get(f"{url}/heatmap.npy").status_code == 403  # nor the viewer's heatmap
    assert client.get(f"{url}/image.png").status_code == 200  # the image itself is what the reader reads
    assert client.get(f"{url}/pixels.npy").status_code == 200
    # nor in the API, nor on the worklist
    api = client.get(f"/api/studies/{study_id}")
    assert api.status_code == 200 and api.json()["ai_hidden"] is True
    assert api.json()["label"] is None and api.json()["probabilities"] is None and api.json()["decision"] is None
    listed = client.get("/api/studies").text
    worklist = client.get("/worklist").text
    for needle in values:
        assert needle not in api.text and needle not in listed and needle not in worklist
    assert ">malignant</span>" not in worklist and "hidden until your read" in worklist
    csrf = csrf_of(page)
    # the final read cannot come first
    r = client.post(f"{url}/read", data={"stage": "aided", "label": "malignant", "confidence": "4", "csrf_token": csrf})
    assert r.status_code == 409
    # the unaided read reveals the AI result
    r = client.post(f"{url}/read", data={"stage": "unaided", "label": "benign", "confidence": "3", "csrf_token": csrf},
                    follow_redirects=False)
    assert r.status_code == 303
    page = client.get(r.headers["location"]).text
    assert 'id="result-headline">malignant' in page and "heatmap.npy" in page
    assert all(v in page for v in values[2:])  # the calibrated probabilities (the result panel's bars)
    assert 'id="unaided-summary"' in page and "checked" not in form_section(page, "aided-form")
    assert client.get(f"{url}/overlay.png").status_code == 200 and client.get(f"{url}/heatmap.npy").status_code == 200
    assert client.get(f"/api/studies/{study_id}").json()["label"] == "malignant"
    # the unaided read is frozen now
    r = client.post(f"{url}/read", data={"stage": "unaided", "label": "normal", "confidence": "3", "csrf_token": csrf})
    assert r.status_code == 409
    final = {"stage": "aided", "label": "malignant", "confidence": "4", "comment": "changed my mind", "csrf_token": csrf}
    assert client.post(f"{url}/read", data=final, follow_redirects=False).status_code == 303
    assert client.post(f"{url}/read", data=final, follow_redirects=False).status_code == 303  # same again: no revision
    r = client.post(f"{url}/read", data={**final, "label": "benign", "comment": "on reflection"}, follow_redirects=False)
    page = client.get(r.headers["location"]).text
    with sessions() as s:
        reads = list(s.scalars(select(Read)))
        assert len(reads) == 1
        read = reads[0]
        assert (read.mode, read.unaided_label, read.final_label, read.model_label) == ("pilot", "benign", "benign",
                                                                                       "malignant")
        assert read.agree is False and read.changed is False and read.revisions == 3
        history = [(h.stage, h.label) for h in s.scalars(select(ReadRevision).order_by(ReadRevision.id))]
        assert history == [("unaided", "benign"), ("aided", "malignant"), ("aided", "benign")]
    assert "3 revisions" in page and "differs from" in page
    # the form shows the reader's own current answer (editing), never the model's
    assert 'value="benign" required checked' in form_section(page, "aided-form")


def test_read_revisions_are_append_only(site):
    client, sessions, _, _ = site
    login(client)
    url = upload(client, [("a.png", png_bytes(40))]).headers["location"]
    client.post(f"{url}/read", data={"stage": "aided", "label": "normal", "confidence": "2",
                                     "csrf_token": csrf_of(client.get(url).text)})
    with sessions() as s:
        rev = s.scalar(select(ReadRevision))
        rev.label = "malignant"
        with pytest.raises(PermissionError):
            s.commit()
    with sessions() as s, pytest.raises(Exception, match="append-only"):
        s.execute(text("UPDATE read_revisions SET label = 'forged'"))
        s.commit()


def test_api_feedback_cannot_rewrite_agree_or_duplicate(site):
    client, sessions, _, _ = site
    h = {"Authorization": f"Bearer {token_of(sessions, 'alice')}"}
    study = client.post("/api/predict", files={"file": ("x.png", png_bytes(220), "image/png")}, headers=h).json()
    assert study["label"] == "malignant"
    body = {"study_id": study["id"], "label": "benign", "confidence": 3}
    r = client.post("/api/feedback", json={**body, "agree": True}, headers=h)  # contradicts the labels
    assert r.status_code == 422 and "contradicts the labels" in r.json()["detail"]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Read)) == 0
    r = client.post("/api/feedback", json={**body, "label": "malignant"}, headers=h)
    assert r.status_code == 201 and r.json()["agree"] is True
    read_id = r.json()["id"]
    for _ in range(20):  # a script resubmitting: the same read, nothing new
        r = client.post("/api/feedback", json={**body, "label": "malignant", "agree": True}, headers=h)
        assert r.status_code == 200 and r.json()["id"] == read_id and r.json()["revisions"] == 1
    r = client.post("/api/feedback", json={**body, "agree": False, "usability": 5}, headers=h)  # a revision
    assert r.status_code == 200 and r.json()["id"] == read_id
    assert (r.json()["label"], r.json()["agree"], r.json()["revisions"]) == ("benign", False, 2)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Read)) == 1
        assert s.scalar(select(func.count()).select_from(ReadRevision)) == 2
    got = client.get(f"/api/studies/{study['id']}", headers=h).json()
    assert got["feedback_count"] == 1 and got["disagreement"] is True and got["feedback"][0]["agree"] is False
    # an unaided read makes no sense with the AI result already in view
    assert client.post("/api/feedback", json={**body, "stage": "unaided"}, headers=h).status_code == 409
    # a reader in reading mode through the API: hidden, unaided first, then the final read
    set_reading_mode(sessions, "root")
    hr = {"Authorization": f"Bearer {token_of(sessions, 'root')}"}
    got = client.get(f"/api/studies/{study['id']}", headers=hr).json()
    assert got["ai_hidden"] is True and got["label"] is None and got["feedback"] == []
    assert client.get("/api/studies?status=disagree", headers=hr).json() == []
    assert client.post("/api/feedback", json=body, headers=hr).status_code == 409
    r = client.post("/api/feedback", json={**body, "stage": "unaided"}, headers=hr)
    assert r.status_code == 201 and r.json()["model_label"] == "" and r.json()["unaided_label"] == "benign"
    assert client.get(f"/api/studies/{study['id']}", headers=hr).json()["label"] == "malignant"
    r = client.post("/api/feedback", json={**body, "label": "malignant"}, headers=hr)
    assert r.status_code == 200 and r.json()["changed"] is True and r.json()["agree"] is True
    schema = client.get("/openapi.json", headers=h).json()
    op = schema["paths"]["/api/feedback"]["post"]
    assert {"200", "201", "409"} <= set(op["responses"])


# ------------------------------------------------------------------------------------ dashboard


def wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


def make_study(s, owner: User, sid: str, ai_label: str) -> Study:
    """An exam of one series of one image whose AI result (the series', hence the exam's) is `ai_label`."""
    from lungcad.web.db import Image, Series

    result = dict(label=ai_label, decision=ai_label, malignant_probability=0.5,
                  probabilities={c: 1 / 3 for c in CLASSES}, model_sha256="f" * 64)
    st = Study(id=sid, user_id=owner.id, kind="png", group_key=sid, model_sha256="f" * 64)
    s.add(st)
    s.add(Series(id=f"{sid}-s", study_id=sid, series_key="case", number=1, images_count=1,
                 key_images=[f"{sid}-i"], **result))
    s.add(Image(id=f"{sid}-i", series_id=f"{sid}-s", study_id=sid, user_id=owner.id, kind="png",
                input_sha256="0" * 64, image_file="x.png", width=8, height=8, **result))
    return st


def test_dashboard_figures_on_a_small_pilot(site):
    """Two readers in reading mode, four studies with references, one direct read; every figure by hand."""
    from lungcad.web import reading

    client, sessions, _, _ = site
    with sessions() as s:
        root = s.scalar(select(User).where(User.username == "root"))
        a = User(username="reader_a", password_hash="x", role="clinician", reading_mode=True)
        b = User(username="reader_b", password_hash="x", role="clinician", reading_mode=True)
        s.add_all([a, b])
        ai = {"s1": "malignant", "s2": "benign", "s3": "malignant", "s4": "normal"}
        ref = {"s1": "malignant", "s2": "benign", "s3": "benign", "s4": "normal"}
        studies = {sid: make_study(s, root, sid, label) for sid, label in ai.items()}
        s.flush()
        plan = {  # reader: study -> (own read, final decision)
            a: {"s1": ("benign", "malignant"), "s2": ("benign", "benign"), "s3": ("benign", "malignant"),
                "s4": ("normal", "normal")},
            b: {"s1": ("malignant", "malignant"), "s2": ("malignant", "benign"), "s3": ("malignant", "malignant"),
                "s4": ("normal", "normal")},
        }
        for reader, reads in plan.items():
            for sid, (own, final) in reads.items():
                reading.save_read(s, studies[sid], reader, "unaided", own, 3, CLASSES)
                reading.save_read(s, studies[sid], reader, "aided", final, 4, CLASSES, comment=f"{sid} ok")
        reading.save_read(s, studies["s1"], root, "aided", "benign", 2, CLASSES)  # direct read, not paired
        for sid, label in ref.items():
            reading.set_reference(s, studies[sid], root, label, "pathology", "2026-01-15", "", CLASSES)
        s.commit()
        stats = reading.pilot_stats(s, CLASSES)
    # 9 final reads; all agree with the AI's label but root's benign on s1
    assert (stats["reads"], stats["agree"]) == (9, 8)
    # paired reads: 8; changed: a/s1 benign->malignant, a/s3 benign->malignant, b/s2 malignant->benign
    assert stats["paired"] == 8 and (stats["changed"].k, stats["changed"].n) == (3, 8)
    assert (stats["changed_toward_ai"], stats["changed_away_from_ai"]) == (3, 0)
    assert {(d["from"], d["to"]): d["n"] for d in stats["directions"]} == {("benign", "malignant"): 2,
                                                                          ("malignant", "benign"): 1}
    # transitions, rows own read, columns final (normal, benign, malignant)
    assert stats["transitions"] == [[2, 0, 0], [0, 1, 2], [0, 1, 2]]
    # against the references: unaided a: s2, s3, s4 right; b: s1, s4 right -> 5/8. Aided: 3 + 3 -> 6/8
    un, ai_ = stats["unaided"], stats["aided"]
    assert (un["accuracy"].k, un["accuracy"].n, ai_["accuracy"].k, ai_["accuracy"].n) == (5, 8, 6, 8)
    # sensitivity on s1 (the one malignant): unaided a benign, b malignant -> 1/2; aided 2/2
    assert (un["sensitivity"].k, un["sensitivity"].n, ai_["sensitivity"].k) == (1, 2, 2)
    # specificity on s2, s3, s4 (6 reads): unaided b said malignant on s2 and s3 -> 4/6; aided s3 twice -> 4/6
    assert (un["specificity"].k, un["specificity"].n, ai_["specificity"].k) == (4, 6, 4)
    assert stats["changes_judged"] == {"wrong_to_right": 2, "right_to_wrong": 1, "wrong_to_wrong": 0}
    # 4 studies: Wilson intervals, said so
    assert un["accuracy"].ci == pytest.approx(wilson_by_hand(5, 8), abs=1e-9)
    assert ai_["sensitivity"].ci == pytest.approx(wilson_by_hand(2, 2), abs=1e-9)
    assert "Wilson" in un["accuracy"].method
    # the AI's effect, paired on the same reads: accuracy +1/8, sensitivity +1/2, specificity 0; 4 studies: no interval
    eff = stats["ai_effect"]
    assert (eff["accuracy"].n, eff["accuracy"].value) == (8, pytest.approx(0.125))
    assert (eff["sensitivity"].value, eff["specificity"].value) == (pytest.approx(0.5), pytest.approx(0.0))
    assert eff["accuracy"].ci is None and eff["accuracy"].method == "no interval: 4 studies < 10"
    # the page shows the counts
    login(client, "root")
    dash = client.get("/dashboard").text
    assert 'id="feedback-count">9<' in dash and 'id="changed-count">3/8<' in dash
    row = dash[dash.index('id="acc-unaided"'):]
    assert "5/8" in row[:row.index("</tr>")] and "62 %" in row[:row.index("</tr>")]
    row = dash[dash.index('id="sens-aided"'):]
    assert "2/2" in row[:row.index("</tr>")]
    assert "wrong → right 2" in dash
    row = dash[dash.index('id="acc-effect"'):]
    assert "+12 pp" in row[:row.index("</tr>")] and "no interval" in row[:row.index("</tr>")]
    csv_text = client.get("/dashboard/feedback.csv").text
    assert csv_text.count("\n") == 10 and "reference_label" in csv_text.splitlines()[0]


def test_grouped_interval_uses_the_study_bootstrap_from_ten_studies():
    import numpy as np

    from lungcad.web.reading import grouped_proportion_ci

    groups = np.repeat([f"s{i}" for i in range(12)], 2)  # 12 studies read by 2 readers
    hits = np.array([1, 1] * 6 + [0, 0] * 6, dtype=float)
    ci, method = grouped_proportion_ci(hits, groups, n_boot=2000)
    assert "bootstrap" in method and ci[0] < 0.5 < ci[1]
    # two identical reads per study are 12 observations, not 24: the study bootstrap is wider than
    # Wilson over the 24 reads (which pretends they are independent)
    low, high = wilson_by_hand(12, 24)
    assert ci[1] - ci[0] > (high - low) * 1.2
    assert grouped_proportion_ci(np.ones(24), groups, n_boot=500)[0] == (1.0, 1.0)
    _, method_few = grouped_proportion_ci(hits[:8], groups[:8])  # 4 studies
    assert "Wilson" in method_few


# ------------------------------------------------------------------------------------ SUS


def test_sus_scoring_worked_example():
    from lungcad.errors import LungcadError
    from lungcad.web.reading import SUS_ITEMS, sus_score

    # odd items 4, 4, 4, 5, 4 -> 3+3+3+4+3 = 16; even items 2, 1, 2, 1, 2 -> 3+4+3+4+3 = 17; 33 x 2.5
    assert sus_score([4, 2, 4, 1, 4, 2, 5, 1, 4, 2]) == 82.5
    assert sus_score([3] * 10) == 50.0
    assert sus_score([5, 1] * 5) == 100.0 and sus_score([1, 5] * 5) == 0.0
    for bad in ([3] * 9, [3] * 9 + [6], [3] * 9 + [0]):
        with pytest.raises(LungcadError):
            sus_score(bad)
    assert len(SUS_ITEMS) == 10
    assert SUS_ITEMS[0] == "I think that I would like to use this system frequently."
    assert SUS_ITEMS[9] == "I needed to learn a lot of things before I could get going with this system."


def test_sus_questionnaire_one_per_user_and_period_on_the_dashboard(site):
    from lungcad.web.db import SusResponse
    from lungcad.web.reading import SUS_ITEMS

    client, sessions, _, _ = site
    login(client)
    page = client.get("/sus").text
    assert all(item in page for item in SUS_ITEMS) and page.count('class="choice sus-item"') == 10
    assert "checked" not in form_section(page, "sus-form")
    answers = dict(zip([f"q{i}" for i in range(1, 11)], map(str, [3] * 10)))
    r = client.post("/sus", data={**answers, "csrf_token": csrf_of(page)}, follow_redirects=False)
    assert r.status_code == 303
    answers.update(q1="4", q2="2", q3="4", q4="1", q5="4", q6="2", q7="5", q8="1", q9="4", q10="2")  # edited: 82.5
    page = client.get("/sus").text
    r = client.post("/sus", data={**answers, "csrf_token": csrf_of(page)}, follow_redirects=False)
    assert "score 82.5 of 100" in client.get(r.headers["location"]).text
    assert client.post("/sus", data={"q1": "3", "csrf_token": csrf_of(page)}).status_code == 422  # incomplete
    client.cookies.clear()
    login(client, "root")
    page = client.get("/sus").text
    client.post("/sus", data={**{f"q{i}": "3" for i in range(1, 11)}, "csrf_token": csrf_of(page)})  # 50
    with sessions() as s:
        assert sorted(r.score for r in s.scalars(select(SusResponse))) == [50.0, 82.5]
    dash = client.get("/dashboard").text
    # mean 66.25; 95 % t interval, 1 degree of freedom: 66.25 +- 12.706 * 22.98 / sqrt(2)
    half = 12.7062047 * (32.5 / math.sqrt(2)) / math.sqrt(2)
    assert 'id="sus-mean">66.2<' in dash
    assert f"{66.25 - half:.1f}–{66.25 + half:.1f}" in dash
    # a new period starts a new questionnaire for everyone; the old ones stay
    client.post("/dashboard/period", data={"period": "pilot-2", "csrf_token": csrf_of(dash)})
    assert "checked" not in form_section(client.get("/sus").text, "sus-form")
    dash = client.get("/dashboard").text
    assert "pilot-1" in dash and "pilot-2" in dash and 'id="sus-mean">–<' in dash


# ------------------------------------------------------------------------------------ migration


def test_migration_copies_old_feedback_rows(tmp_path):
    check_feedback_migration(f"sqlite:///{tmp_path / 'old.sqlite3'}", tmp_path)


def check_feedback_migration(url: str, tmp_path: Path) -> None:
    """A database at 0004 with old feedback rows, upgraded to head (also run on PostgreSQL by test_web_e2e)."""
    from lungcad.web.db import database_url, make_db_engine
    from lungcad.web.migrate import upgrade_database
    from lungcad.web.reading import pilot_stats

    engine = make_db_engine(database_url(url, tmp_path))
    upgrade_database(engine, "0004")
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    with engine.begin() as c:
        for uid, name in ((1, "alice"), (2, "bob")):
            c.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at) "
                           "VALUES (:i, :n, 'x', 'clinician', :yes, :t)"), {"i": uid, "n": name, "t": t0, "yes": True})
        c.execute(text(
            "INSERT INTO studies (id, created_at, user_id, kind, input_sha256, group_key, image_file, width, height, "
            "label, decision, probabilities, ood, error, model_sha256, dicom_meta) VALUES ('s1', :t, 1, 'png', "
            "'0', 'g', 'images/s1.png', 8, 8, 'malignant', 'malignant', '{}', :no, '', 'f', '{}')"),
            {"t": t0, "no": False})
        rows = [  # alice twice (the second with a contradicting agree), bob once with a usability rating
            (1, 1, "benign", True, 2, None, t0), (2, 1, "malignant", False, 4, 3, t0 + dt.timedelta(hours=1)),
            (3, 2, "malignant", True, 5, 5, t0 + dt.timedelta(hours=2))]
        for fid, uid, label, agree, conf, usab, at in rows:
            c.execute(text("INSERT INTO feedback (id, study_id, user_id, created_at, agree, label, confidence, comment, "
                           "usability, model_label, model_sha256) VALUES (:f, 's1', :u, :t, :a, :l, :c, 'c', :us, "
                           "'malignant', 'f')"), {"f": fid, "u": uid, "t": at, "a": agree, "l": label, "c": conf,
                                                  "us": usab})
    engine.dispose()
    _, sessions = open_database(url, tmp_path)  # upgrades to head
    with sessions() as s:
        reads = {r.user.username: r for r in s.scalars(select(Read))}
        assert set(reads) == {"alice", "bob"}
        alice = reads["alice"]
        assert (alice.mode, alice.final_label, alice.final_confidence, alice.unaided_label) == ("legacy", "malignant",
                                                                                               4, None)
        assert alice.agree is True and alice.revisions == 2  # derived: malignant == malignant, whatever was stored
        revs = list(s.scalars(select(ReadRevision).where(ReadRevision.read_id == alice.id).order_by(ReadRevision.id)))
        assert [(r.legacy_feedback_id, r.label, r.source) for r in revs] == [(1, "benign", "legacy"),
                                                                           (2, "malignant", "legacy")]
        assert s.scalar(text("SELECT count(*) FROM feedback")) == 3  # the old rows stay readable
        assert s.scalar(select(User).where(User.username == "bob")).reading_mode is False
        stats = pilot_stats(s, CLASSES)
        assert stats["reads"] == 2 and stats["paired"] == 0
        assert (stats["legacy_usability_n"], stats["legacy_usability_mean"]) == (2, 4.0)


# ------------------------------------------------------------------------------------ polish


def test_model_and_audit_pages_are_tables_without_json_or_paths(site):
    client, _, data, fake = site
    secret = "/srv/hospital/lungcad/runs"
    fake.contract.init = {"source": "file", "weights": f"{secret}/resnet50-11ad3fa6.pth", "sha256": "ab" * 32}
    fake.contract.training = {"data": f"{secret}/data", "epochs": 3, "operating_point": {"threshold": 0.5}}
    run = data.parent / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "per_class": {"malignant": {"recall": 0.8}},
                                                 "data": f"{secret}/test"}))
    (run / "data.json").write_text(json.dumps({"images": 10, "groups": 4, "skipped": 0, "colour": "grey",
                                               "extra_data": {"path": f"{secret}/extra"}}))
    (run / "report.md").write_text(f"# Report\nevaluated {secret}/test on 2026-01-01\n")
    login(client, "root")
    page = client.get("/model").text
    assert secret not in page and "/srv/" not in page
    assert "resnet50-11ad3fa6.pth" in page  # the file's name stays: what it was, not where
    assert 'id="all-metrics"' in page and "per_class.malignant.recall" in page and 'id="contract-table"' in page
    assert not re.search(r'\{\s*"', page) and "&#34;" not in page  # no JSON text, escaped or not
    client.post("/account/tokens", data={"name": "script", "days": "7", "csrf_token": csrf_of(page)})
    audit = client.get("/audit").text
    assert "<table" in audit and not re.search(r'\{\s*"|&#34;', audit)
    assert 'class="kv-item"' in audit


def test_error_pages_keep_the_navigation(site):
    client, _, _, _ = site
    r = client.get("/no/such/page")
    assert r.status_code in (303, 404)
    login(client)
    r = client.get("/studies/nope")
    assert r.status_code == 404
    assert 'href="/worklist"' in r.text and "alice" in r.text and "Sign out" in r.text
    r = client.post("/studies/nope/read", data={"stage": "aided"})
    assert r.status_code == 403 and 'href="/worklist"' in r.text
    client.cookies.clear()
    r = client.get("/static/nope.css")
    assert r.status_code == 404 and 'href="/login"' in r.text  # signed out: the fallback links


def test_reference_diagnosis_entered_later(site):
    client, sessions, _, _ = site
    set_reading_mode(sessions, "alice")
    login(client)
    url = upload(client, [("a.png", png_bytes(220))]).headers["location"]
    page = client.get(url).text
    assert 'id="reference-form"' not in page  # a pilot reader sees no reference before their own reads
    csrf = csrf_of(page)
    ref = {"label": "benign", "source": "pathology", "diagnosed_on": "2026-02-03", "csrf_token": csrf}
    assert client.post(f"{url}/reference", data=ref).status_code == 403
    client.post(f"{url}/read", data={"stage": "unaided", "label": "benign", "confidence": "3", "csrf_token": csrf})
    client.post(f"{url}/read", data={"stage": "aided", "label": "benign", "confidence": "3", "csrf_token": csrf})
    assert client.post(f"{url}/reference", data={**ref, "source": "rumour"}).status_code == 422
    assert client.post(f"{url}/reference", data={**ref, "diagnosed_on": "2999-01-01"}).status_code == 422
    r = client.post(f"{url}/reference", data=ref, follow_redirects=False)
    assert r.status_code == 303
    page = client.get(r.headers["location"]).text
    assert 'id="reference">benign (pathology, 2026-02-03)' in page
    client.post(f"{url}/reference", data={**ref, "label": "malignant", "source": "follow-up"})
    with sessions() as s:
        from lungcad.web.db import AuditEvent, ReferenceDiagnosis

        refs = list(s.scalars(select(ReferenceDiagnosis)))
        assert [(r.label, r.source) for r in refs] == [("malignant", "follow-up")]
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "reference").order_by(AuditEvent.id)))
        assert events[-1].detail["previous"]["label"] == "benign"


def test_feedback_export_uses_the_final_aided_label(site, tmp_path):
    import csv

    from lungcad.cli import main

    client, sessions, data, _ = site
    set_reading_mode(sessions, "alice")
    login(client)
    url = upload(client, [("a.png", png_bytes(220))]).headers["location"]
    csrf = csrf_of(client.get(url).text)
    client.post(f"{url}/read", data={"stage": "unaided", "label": "normal", "confidence": "3", "csrf_token": csrf})
    client.post(f"{url}/read", data={"stage": "aided", "label": "benign", "confidence": "3", "comment": "alice's note",
                                     "csrf_token": csrf})
    out = tmp_path / "export"
    assert main(["feedback", "export", "--out", str(out), "--data-dir", str(data), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["label"] for r in rows] == ["benign"]  # the final decision, not the unaided read
    dump = "".join(p.read_text(errors="ignore") for p in out.rglob("*.csv"))
    assert "alice" not in dump and "note" not in dump  # de-identified: no reader, no comment


def test_reading_mode_switched_on_after_a_direct_read(site):
    """A reader who already gave a final read with the AI in view is not asked for a fake unaided read."""
    client, sessions, _, _ = site
    h = {"Authorization": f"Bearer {token_of(sessions, 'alice')}"}
    study = client.post("/api/predict", files={"file": ("x.png", png_bytes(40), "image/png")}, headers=h).json()
    other = client.post("/api/predict", files={"file": ("y.png", png_bytes(41), "image/png")}, headers=h).json()
    body = {"study_id": study["id"], "label": "normal", "confidence": 3}
    assert client.post("/api/feedback", json=body, headers=h).status_code == 201
    set_reading_mode(sessions, "alice")
    assert client.get(f"/api/studies/{study['id']}", headers=h).json()["ai_hidden"] is False
    assert client.get(f"/api/studies/{other['id']}", headers=h).json()["ai_hidden"] is True
    assert client.post("/api/feedback", json={**body, "stage": "unaided"}, headers=h).status_code == 409
    r = client.post("/api/feedback", json={**body, "label": "benign"}, headers=h)
    assert r.status_code == 200 and r.json()["mode"] == "direct" and r.json()["revisions"] == 2


def test_paired_difference_interval_resamples_studies_with_their_pairs():
    """With enough studies the interval is the group bootstrap of the per-read differences; the
    pairing matters: a reader who is right both times contributes nothing to the spread."""
    from lungcad.evaluation.bootstrap import group_weights
    from lungcad.web.reading import paired_difference

    rng = np.random.default_rng(3)
    groups = [f"s{i // 2}" for i in range(40)]  # 20 studies, 2 reads each
    own = list(rng.random(40) < 0.6)
    final = [o or bool(r < 0.3) for o, r in zip(own, rng.random(40))]  # the AI only fixes errors here
    d = paired_difference(own, final, groups, n_boot=500, seed=7)
    diffs = np.array(final, float) - np.array(own, float)
    w = group_weights(np.array(groups), 500, np.random.default_rng(7))
    by_hand = np.quantile((w @ diffs) / w.sum(axis=1), [0.025, 0.975])
    assert d.value == pytest.approx(diffs.mean()) and d.ci == pytest.approx(tuple(by_hand))
    assert d.ci[0] >= 0 and d.method.startswith("paired group bootstrap by study (20 studies")
    same = paired_difference(own, own, groups, n_boot=200)
    assert (same.value, same.ci) == (0.0, (0.0, 0.0))
