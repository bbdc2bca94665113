"""Property-based fuzzing of the model server's HTTP API from its own OpenAPI schema (schemathesis).

The server runs over a real socket (tests/test_serve.py's fixture: uvicorn on 127.0.0.1, a tiny random
champion); schemathesis generates requests from `app.openapi()` (the routes declare their bodies and error
responses there), valid ones and ones that break the schema, and sends them with a valid key. Every answer
must be JSON, no answer may be a 5xx other than the documented 503s (overloaded, store_unavailable), and the
server must still answer afterwards.
"""
from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

from tests.test_serve import KEY, registry, running_app, server  # noqa: F401  (fixtures)

EXAMPLES = 200  # per operation and generation mode: 1,600 requests, about 20 s on two loaded cores
DOCUMENTED_5XX = {(503, "overloaded"), (503, "store_unavailable")}


def fuzz(base_url: str, schema: dict, examples: int) -> list[dict]:
    """Send what schemathesis generates for every operation, valid and invalid; one record per request."""
    records: list[dict] = []
    for result in schemathesis.openapi.from_dict(schema).get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case):
                response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
                try:
                    body = json.loads(response.content)
                except ValueError:
                    body = None
                content_type = response.headers.get("content-type", [""])  # schemathesis: each header's values
                records.append({"operation": operation.label, "mode": mode.value, "status": response.status_code,
                                "json": body is not None and content_type[0].startswith("application/json"),
                                "code": body.get("error", {}).get("code") if isinstance(body, dict) else None,
                                "sent": case.body if not isinstance(case.body, bytes) else case.body[:200]})

            send()
    return records


def test_fuzzing_the_http_api_from_its_openapi_schema(running_app):
    client, _, _, app = running_app
    schema = app.openapi()
    assert {"/v1/chat/completions", "/v1/feedback", "/v1/models", "/health"} <= set(schema["paths"])
    records = fuzz(str(client.base_url), schema, EXAMPLES)

    per_operation = Counter(r["operation"] for r in records)
    statuses = Counter((r["operation"], r["status"]) for r in records)
    print(f"\n{len(records)} requests: {dict(per_operation)}\n{dict(sorted(statuses.items()))}")
    assert len(records) == 8 * EXAMPLES  # four operations, valid and invalid data: every example was sent
    not_json = [r for r in records if not r["json"]]
    assert not not_json, not_json[:5]
    undocumented = [r for r in records if r["status"] >= 500 and (r["status"], r["code"]) not in DOCUMENTED_5XX]
    assert not undocumented, undocumented[:5]
    assert statuses[("POST /v1/chat/completions", 200)] > 0  # the valid requests were answered, not only refused
    assert httpx.get(client.base_url.join("/health")).json()["status"] == "ok"
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "still there?"}],
                                                      "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("body", [
    b"[" * 2000 + b"]" * 2000,
    b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1e999}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -0}',
    b'{"messages": null}', b"null", b"\xff\xfe", b"", b'{"messages": [{"role": "user", "content": "\\u0000"}]}',
])
def test_hand_written_edge_bodies_get_json_4xx_or_200(server, body):
    client, _, _ = server
    response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 422), response.text
    assert "error" in response.json() or response.status_code == 200
