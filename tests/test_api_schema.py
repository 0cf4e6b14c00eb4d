"""Schemathesis against the web app's own /openapi.json (issue 15).

Every API operation is fed schema-generated requests (valid, boundary and schema-violating ones,
undeclared HTTP methods, missing credentials) with a clinician's API token, and must answer with a
status code, content type, headers and body that its schema documents, and never with a 5xx.

Run through schemathesis's engine (what `schemathesis run` does), not its pytest plugin: the
schema needs a database and a token made by a fixture, and the plugin's lazy fixture loader does
not support pytest 9. Bounded and reproducible for CI: EXAMPLES per operation and phase, with
deterministic generation. The app has test_web's fake predictor, so no model is needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
schemathesis = pytest.importorskip("schemathesis")

from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events, from_schema
from sqlalchemy import select

from test_web import PASSWORD, FakePredictor

from lungcad.web.app import create_app
from lungcad.web.db import User, open_database
from lungcad.web.security import add_user, create_token, user_for_token

EXAMPLES = 6  # per operation and phase
PHASES = ["examples", "coverage", "fuzzing"]  # stateful: the API has no create-then-read links worth the time

# What the schema cannot say, and so what a schemathesis check cannot know:
# - an upload that is schema-valid (any bytes) but not a decodable image is rightly refused (422);
# - a STOW-RS body is read raw (multipart/related of DICOM instances), so the schema has no body for it.
CONFIG = {
    "operations": [
        {"include-name": "POST /api/predict", "checks": {"positive_data_acceptance": {"enabled": False}}},
        {"include-name": "POST /api/uploads", "checks": {"positive_data_acceptance": {"enabled": False}}},
        {"include-name": "POST /api/dicomweb/studies", "checks": {"positive_data_acceptance": {"enabled": False}}},
    ],
}


@pytest.fixture(scope="module")
def api(module_tmp):
    """The app on a fresh data folder, and a function giving a valid API token of a clinician."""
    tmp = module_tmp("schema")
    data = tmp / "webdata"
    _, sessions = open_database(None, data)
    with sessions() as s:
        add_user(s, "alice", PASSWORD, "clinician")
        s.commit()
    token = None

    def valid_token() -> str:
        # DELETE /api/tokens/{id} may revoke the token the run uses: then mint another one.
        nonlocal token
        with sessions() as s:
            if token is None or user_for_token(s, token) is None:
                token = create_token(s, s.scalar(select(User).where(User.username == "alice")))
            s.commit()
        return token

    app = create_app(Path(tmp) / "run", data_dir=data, predictor=FakePredictor())
    return app, valid_token


def run_schemathesis(app, valid_token) -> tuple[dict, int]:
    """Failures as {(operation, check, title): (message, curl)}, and the number of checked cases."""
    config = SchemathesisConfig.from_dict(CONFIG)
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=config, headers={"Authorization": f"Bearer {valid_token()}"}
    )

    @schema.auth(refresh_interval=None)
    class Bearer:
        def get(self, case, ctx):
            return valid_token()

        def set(self, case, data, ctx):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    schema.config.seed = 15
    schema.config.generation.update(max_examples=EXAMPLES, deterministic=True)
    schema.config.phases.update(phases=PHASES)
    failures: dict = {}
    cases = 0
    for event in from_schema(schema).execute():
        if isinstance(event, (events.NonFatalError, events.FatalError)):
            raise AssertionError(f"schemathesis could not run: {event}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        cases += len(event.recorder.cases)
        for nodes in event.recorder.checks.values():
            for node in nodes:
                if node.status.value == "failure":
                    info = node.failure_info
                    key = (event.recorder.label, node.name, info.failure.title if info else "")
                    failures.setdefault(key, (info.failure.message if info else "", info.code_sample if info else ""))
    return failures, cases


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_api_conforms_to_its_openapi_schema(api):
    app, valid_token = api
    failures, cases = run_schemathesis(app, valid_token)
    report = "\n\n".join(f"{op} [{check}] {title}\n{message}\n{curl}"
                         for (op, check, title), (message, curl) in sorted(failures.items()))
    assert not failures, f"{len(failures)} schemathesis failure(s) in {cases} cases:\n\n{report}"
    assert cases >= 8 * EXAMPLES  # every operation was exercised


def test_errors_are_documented_problem_documents(api):
    """The conformance items of issue 15, checked directly (fast tier): 405 carries Allow, and the
    400/404 problem+json answers are in the schema."""
    from fastapi.testclient import TestClient

    app, valid_token = api
    client = TestClient(app)
    bearer = {"Authorization": f"Bearer {valid_token()}"}
    r = client.request("TRACE", "/api/me", headers=bearer)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.headers["content-type"].startswith("application/problem+json")
    r = client.put("/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]

    spec = client.get("/openapi.json", headers=bearer).json()
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    assert spec["paths"]["/api/feedback"]["post"]["responses"]["400"]["content"] == problem
    assert spec["paths"]["/api/studies/{study_id}"]["get"]["responses"]["404"]["content"] == problem
    assert spec["paths"]["/api/feedback"]["post"]["responses"]["422"]["content"] == problem
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "session"}
    assert spec["paths"]["/health"]["get"]["security"] == []
    r = client.post("/api/feedback", content=b"{not json", headers={**bearer, "content-type": "application/json"})
    assert r.status_code in (400, 422) and r.json()["status"] == r.status_code
    r = client.get("/api/studies?status=nonsense", headers=bearer)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    r = client.get("/api/studies/nope", headers=bearer)
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
