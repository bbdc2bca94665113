"""Property-based fuzzing of the labeling app's HTTP API from its OpenAPI schema (schemathesis), over real
sockets against uvicorn on 127.0.0.1.

The app serves no schema (openapi_url=None), so the test takes it from `app.openapi()`. Every operation gets
schema-conforming and schema-violating requests, each sent as a random persona: anonymous, an annotator or
an admin (a live session), with the right CSRF token or a fuzzed one, from a random client address (through
X-Forwarded-For, which uvicorn trusts from 127.0.0.1), so the throttle does not turn every login into a 429.
Half the requests aim at something that exists (the campaign, one of ann's items, a live invite link), so the
fuzzed form fields reach the code behind the checks. Passes when no answer is a 5xx (the schema documents
none, so any 5xx is undocumented) and the server still logs people in and takes votes afterwards. Bounded:
EXAMPLES per operation and mode (680 requests), about 20-40 s.
"""
import socket
import threading
import time
from collections import Counter

import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.labeling import accounts
from rlhf.labeling.app import LOGIN_CSRF_COOKIE, SESSION_COOKIE, create_app
from rlhf.labeling.campaigns import create_campaign
from rlhf.labeling.db import Annotator, Assignment, LoginSession
from tests.labeling.support import create_account, current_item, login, pair_rows, vote

EXAMPLES = 40  # per operation and per generation mode (12 operations x 2 modes)
PERSONAS = ("anonymous", "ann", "boss")


@pytest.fixture
def server(tmp_path):
    """uvicorn serving the app on a free loopback port, in a thread; yields (base_url, app, thread)."""
    database_url = f"sqlite:///{tmp_path / 'labeling.db'}"
    app = create_app(database_url, gold_min_answers=1)
    with Session(app.state.engine) as db:
        create_campaign(db, "fuzz", pair_rows({f"p{i}": "ab"[i % 2] for i in range(30)}),
                        pair_rows({"g0": "a", "g1": "b"}, chosen_is_truth=True), gold_rate=0.2, seed=3)
    create_account(database_url, "ann")
    create_account(database_url, "boss", role="admin")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app, thread
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    app.state.engine.dispose()


def live_session(app, name: str) -> tuple[str, str]:
    """(cookie token, CSRF token) of a fresh login session, made directly: no scrypt per fuzzed request."""
    with Session(app.state.engine, expire_on_commit=False) as db:
        annotator = db.scalar(select(Annotator).where(Annotator.name == name))
        token = accounts.start_session(db, annotator, hours=1)
        return token, db.get(LoginSession, accounts.token_hash(token)).csrf_token


def real_targets(app, address: int) -> dict:
    """Path parameters that name something real: the campaign, ann's newest item, a fresh invite link."""
    with Session(app.state.engine) as db:
        ann = db.scalar(select(Annotator.id).where(Annotator.name == "ann"))
        item = db.scalar(select(Assignment.id).where(Assignment.annotator_id == ann).order_by(Assignment.id.desc()))
        token = accounts.invite(db, f"invitee{address}")
    return {"name": "fuzz", "assignment_id": item or 1, "token": token}


def test_fuzzed_requests_never_get_a_5xx_and_the_server_survives(server):
    base_url, app, thread = server
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 12
    http = requests.Session()
    sent: Counter = Counter()
    statuses: Counter = Counter()
    server_errors: list[str] = []
    non_json_server_errors = 0

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode), persona=st.sampled_from(PERSONAS),
                   valid_csrf=st.booleans(), real_target=st.booleans(), address=st.integers(1, 2**24 - 2))
            def fuzz(case, persona, valid_csrf, real_target, address):
                nonlocal non_json_server_errors
                if real_target and case.path_parameters:
                    targets = real_targets(app, address)
                    case.path_parameters = {key: targets[key] for key in case.path_parameters}
                cookies, csrf = {}, f"fuzz-{address}"
                if persona != "anonymous":
                    cookies[SESSION_COOKIE], csrf = live_session(app, persona)
                cookies[LOGIN_CSRF_COOKIE] = csrf  # the double-submit cookie of the forms before login
                if valid_csrf and isinstance(case.body, dict):
                    case.body["csrf_token"] = csrf
                forwarded = f"10.{address >> 16}.{(address >> 8) & 255}.{address & 255}"
                response = case.call(base_url=base_url, session=http, cookies=cookies, allow_redirects=False,
                                     headers={"X-Forwarded-For": forwarded}, timeout=30)
                sent[operation.label] += 1
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    server_errors.append(f"{operation.label} -> {response.status_code}: {response.text[:200]!r}")
                    if "json" not in response.headers.get("content-type", ""):
                        non_json_server_errors += 1

            try:
                fuzz()
            except Unsatisfiable:  # no parameter and no body: nothing can violate the schema
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label

    total = sum(sent.values())
    print(f"\nfuzzed {total} requests over {len(operations)} operations; statuses {dict(sorted(statuses.items()))}; "
          f"5xx {len(server_errors)} (non-JSON {non_json_server_errors}); per operation {dict(sent)}")
    assert server_errors == [] and non_json_server_errors == 0
    assert all(sent[operation.label] >= 2 for operation in operations)  # every operation was reached

    assert thread.is_alive()
    survivor = requests.Session()
    assert survivor.get(f"{base_url}/login", timeout=10).status_code == 200
    browser = _SocketClient(base_url)  # after the fuzzing, a person still logs in and votes
    login(browser, "ann")
    item = current_item(browser, "fuzz")  # 30 pairs: fuzzed votes with a valid choice are far fewer
    assert item is not None and vote(browser, item, "A").status_code == 303


class _SocketClient(requests.Session):
    """The support helpers' client interface (get, post with follow_redirects) over a real socket."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url

    def request(self, method, url, *args, follow_redirects=True, **kwargs):
        kwargs.setdefault("allow_redirects", follow_redirects)
        kwargs.setdefault("timeout", 30)
        return super().request(method, self.base_url + url if url.startswith("/") else url, *args, **kwargs)
