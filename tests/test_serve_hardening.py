"""The model server under bad input and failures: each request answered on its own, the batcher alive, limits kept.

Over a real socket (the `running_app` fixture of tests/test_serve.py: uvicorn on 127.0.0.1, a tiny random
champion in a temporary registry), and the Batcher alone where a failure has to be placed inside a batch.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf.checkpoints import load_tokenizer
from rlhf.labeling.db import make_engine
from rlhf.models import load_causal_lm
from rlhf.serve import MAX_JSON_DEPTH, ApiError, Batcher, KeyRateLimit, Row, ServedModel, json_depth
from rlhf.serve_store import ServedCompletion
from tests.test_serve import OTHER_KEY, chat, registry, running_app, server  # noqa: F401  (fixtures)

LONE_SURROGATE = '{"messages": [{"role": "user", "content": "tell me about \\ud800 rain"}], "max_tokens": 4}'


def test_a_lone_surrogate_gets_400_while_its_batch_neighbours_get_200(server):
    """"\\ud800" is valid JSON but no UTF-8 encodes it; it used to make the tokenizer raise inside the batch and
    fail every request batched with it (500). Sent together, the neighbours arrive within the batch wait."""
    client, _, _ = server

    def neighbour(k: int) -> httpx.Response:
        return chat(client, f"write a short poem about rain number {k}", max_tokens=4, temperature=0)

    def surrogate() -> httpx.Response:
        return client.post("/v1/chat/completions", content=LONE_SURROGATE.encode(),
                           headers={"Content-Type": "application/json"})

    for _ in range(3):  # three rounds of one bad request among five good ones
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(neighbour, k) for k in range(5)] + [pool.submit(surrogate)]
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 5 + [400], [r.text for r in responses]
        error = responses[-1].json()["error"]
        assert error["code"] == "invalid_text" and error["param"] == "messages.0.content"
        assert "surrogate" in error["message"] and "UTF-8" in error["message"]
    assert client.get("/v1/models").status_code == 200


def test_a_job_that_fails_in_the_batch_fails_alone_over_http(server, monkeypatch):
    """A tokenizer error inside the batcher (past the HTTP checks) is that request's 500; its neighbours get 200."""
    import rlhf.serve

    client, _, _ = server
    real = rlhf.serve.prompt_ids

    def exploding(tokenizer, messages):
        if messages[-1]["content"] == "explode":
            raise RuntimeError("the tokenizer choked")
        return real(tokenizer, messages)

    monkeypatch.setattr(rlhf.serve, "prompt_ids", exploding)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(chat, client, f"rain {k}", max_tokens=4) for k in range(5)]
        futures.append(pool.submit(chat, client, "explode", max_tokens=4))
        statuses = [f.result().status_code for f in futures]
    assert statuses == [200] * 5 + [500]
    assert futures[-1].result().json()["error"]["code"] == "generation_failed"


def tiny_served(tiny_model_dir: Path) -> ServedModel:
    tokenizer = load_tokenizer(tiny_model_dir)
    return ServedModel("tiny", "1", load_causal_lm(tiny_model_dir).eval(), tokenizer, tiny_model_dir,
                       frozenset({tokenizer.eos_token_id}))


def run_batch(batcher: Batcher, conversations: list[list[dict]]) -> list:
    """Submit every conversation before the thread starts, so that they share one batch; their outcomes."""
    futures = [batcher.submit(messages, [Row(4, 0.0, 1.0, seed=0)]) for messages in conversations]
    batcher.start()
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=60))
        except Exception as error:  # noqa: BLE001  (the outcome under test)
            outcomes.append(error)
    batcher.stop()
    return outcomes


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_job_the_tokenizer_refuses_fails_alone_in_its_batch(tiny_model_dir):
    """Past the HTTP checks, a job whose text the tokenizer cannot take still fails only itself."""
    batcher = Batcher(SimpleNamespace(current=tiny_served(tiny_model_dir)), 8, 0.0, 16, 256)
    outcomes = run_batch(batcher, [user("rain"), user("tell me about \ud800"), user("the sky")])
    assert isinstance(outcomes[1], Exception) and not isinstance(outcomes[1], ApiError)
    assert [len(rows[0].tokens) for _, rows in (outcomes[0], outcomes[2])] == [4, 4]
    assert batcher.batches == 1


def test_a_generation_failure_of_one_job_fails_only_that_job(tiny_model_dir, monkeypatch):
    """When the batch's generation fails, every job is generated again alone: only the one that fails alone fails."""
    import rlhf.serve

    real = rlhf.serve.generate_rows
    poison = None

    def failing_with_the_poisoned_prompt(model, rows, pad_id, stop_ids):
        if any(row.prompt_ids == poison for row in rows):
            raise RuntimeError("CUDA out of memory (pretend)")
        return real(model, rows, pad_id, stop_ids)

    served = tiny_served(tiny_model_dir)
    poison = rlhf.serve.prompt_ids(served.tokenizer, user("the poisoned prompt"))
    monkeypatch.setattr(rlhf.serve, "generate_rows", failing_with_the_poisoned_prompt)
    alone = Batcher(SimpleNamespace(current=served), 8, 0.0, 16, 256)
    reference = run_batch(alone, [user("rain")])[0][1][0].tokens
    batcher = Batcher(SimpleNamespace(current=served), 8, 0.0, 16, 256)
    outcomes = run_batch(batcher, [user("rain"), user("the poisoned prompt"), user("the sky")])
    assert isinstance(outcomes[1], RuntimeError)
    assert outcomes[0][1][0].tokens == reference  # the retry starts over from the same seed: the same text


def test_cancelled_requests_do_not_stop_the_batcher(tiny_model_dir):
    """A request whose client went away has its future cancelled; answering it used to raise and kill the thread."""
    batcher = Batcher(SimpleNamespace(current=tiny_served(tiny_model_dir)), 8, 0.0, 16, 256)
    gone = batcher.submit(user("rain"), [Row(4, 0.0, 1.0, seed=0)])
    assert gone.cancel()
    batcher.start()
    try:
        later = batcher.submit(user("the sky"), [Row(4, 0.0, 1.0, seed=0)])
        assert len(later.result(timeout=60)[1][0].tokens) == 4
        assert batcher.alive and batcher.cancelled == 1
    finally:
        batcher.stop()


def test_health_fails_and_requests_get_503_when_the_batcher_stops(running_app):
    client, _, _, app = running_app
    assert httpx.get(client.base_url.join("/health")).json()["status"] == "ok"
    app.state.batcher.stop()  # as if the thread had died
    health = httpx.get(client.base_url.join("/health"))
    assert health.status_code == 503 and health.json()["status"] == "failing"
    assert health.json()["error"]["code"] == "batcher_stopped"
    refused = chat(client, "hi", max_tokens=2)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "batcher_stopped"


@pytest.mark.parametrize("running_app", [{"max_request_bytes": 65536}], indirect=True)  # the default limit
def test_deep_json_and_json_constants_get_400_not_500(running_app):
    client, _, _, _ = running_app
    deep = client.post("/v1/chat/completions", content=b"[" * 60_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "json_too_deep", deep.text
    assert "60000 levels" in deep.json()["error"]["message"]
    for body in (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', b'{"seed": ' + b"9" * 5000 + b"}"):
        response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text
    bad_key = client.post("/v1/chat/completions", content='{"\\udfff": 1}'.encode(),
                          headers={"Content-Type": "application/json"})
    assert bad_key.status_code == 400 and bad_key.json()["error"]["code"] == "invalid_text"


def test_json_depth_is_counted_without_recursion_and_ignores_strings():
    assert json_depth(b"[" * 60_000) == 60_000  # linear, no parser: Python's would raise RecursionError
    assert json_depth(b'{"messages": [{"role": "user", "content": "[[[[ {{{{ \\" [[["}]}') == 3
    assert json_depth(b'"' + b'\\"' * 30_000) == 0  # an unterminated string with escaped quotes: still linear
    assert json_depth(b"[]" * 1000) == 1 and MAX_JSON_DEPTH >= 3


@pytest.mark.parametrize("seed, status", [(0, 200), (2**63 - 1, 200), (-1, 422), (2**63, 422), (10**30, 422)])
def test_seed_is_bounded(server, seed, status):
    client, _, _ = server
    response = chat(client, "hi", max_tokens=2, seed=seed)
    assert response.status_code == status, response.text
    if status == 422:
        assert "seed" in response.json()["error"]["message"]


@pytest.mark.parametrize("running_app", [{"key_requests_per_minute": 6}], indirect=True)
def test_each_key_is_rate_limited_with_retry_after(running_app):
    client, settings, _, _ = running_app
    assert settings.key_burst == 1
    assert client.get("/v1/models").status_code == 200
    limited = client.get("/v1/models")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["retry-after"]) <= 10 and "serve.key_requests_per_minute" in limited.text
    other = client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 200  # the bucket is per key


def test_the_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = KeyRateLimit(per_minute=60, burst=3, clock=lambda: now[0])
    assert [bucket.wait_seconds("k") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.wait_seconds("k") == pytest.approx(1.0)  # one token a second
    now[0] = 0.5
    assert bucket.wait_seconds("k") == pytest.approx(0.5)
    now[0] = 1.0
    assert bucket.wait_seconds("k") == 0.0 and bucket.wait_seconds("other") == 0.0
    now[0] = 100.0
    assert [bucket.wait_seconds("k") for _ in range(4)][-1] > 0  # refilled to the burst, not past it


def test_a_failed_store_write_is_503_and_not_served(running_app, monkeypatch):
    """No log, no response: a completion the store did not keep is not sent and not counted as served."""
    import rlhf.serve

    client, settings, _, _ = running_app
    real = rlhf.serve._commit
    monkeypatch.setattr(rlhf.serve, "_commit", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    failed = chat(client, "hi", max_tokens=2)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "store_unavailable"
    monkeypatch.setattr(rlhf.serve, "_commit", real)
    answered = chat(client, "hi", max_tokens=2)
    assert answered.status_code == 200
    health = httpx.get(client.base_url.join("/health")).json()
    assert health["served"] == 1 and health["store_write_failures"] == 1
    engine = make_engine(settings.database)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(ServedCompletion)) == 1
        assert db.get(ServedCompletion, answered.json()["id"]) is not None
    engine.dispose()


def test_the_completion_commit_waits_for_the_write_lock_not_for_cpu_work(running_app):
    """A writer holding the store's lock delays a completion; once it lets go, the completion is kept and sent."""
    import sqlite3

    client, settings, _, _ = running_app
    holder = sqlite3.connect(settings.database.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Timer(1.0, lambda: holder.execute("ROLLBACK"))
    released.start()
    started = time.monotonic()
    response = chat(client, "hi", max_tokens=2)
    released.join()
    holder.close()
    assert response.status_code == 200 and time.monotonic() - started >= 0.9
