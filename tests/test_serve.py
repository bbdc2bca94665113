"""The model server over a real socket: uvicorn on 127.0.0.1, a tiny random champion in a temporary registry."""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import httpx
import mlflow
import pytest
import torch
import uvicorn
from mlflow import MlflowClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf import promote
from rlhf.checkpoints import load_tokenizer
from rlhf.labeling.db import make_engine
from rlhf.models import load_causal_lm
from rlhf.params import ServeParams
from rlhf.serve import Row, check_api_keys, create_app, generate_rows, sample_next_tokens
from rlhf.serve_store import Feedback, ServedCompletion, feedback_comparisons, served_prompts
from tests.conftest import build_tiny_model

NAME = "tiny-served"
KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
PROMPTS = ["explain why the sky is blue", "write a short poem about rain", "what is two plus two?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    """A temporary MLflow store with two registered versions of a tiny chat model; v1 is champion."""
    folder = tmp_path_factory.mktemp("registry")
    second = folder / "second-model"
    build_tiny_model(len(load_tokenizer(tiny_model_dir)), seed=1).save_pretrained(second)
    load_tokenizer(tiny_model_dir).save_pretrained(second)
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
        experiment = mlflow.create_experiment("rlhf", artifact_location=(folder / "artifacts").as_uri())
        versions = []
        for checkpoint in (tiny_model_dir, second):
            with mlflow.start_run(experiment_id=experiment):
                versions.append(promote.register_checkpoint(str(checkpoint), NAME, "text-generation", {}))
        MlflowClient().set_registered_model_alias(NAME, "champion", versions[0])
        yield folder, versions
    mlflow.set_tracking_uri(previous)  # later tests find MLflow as they would without this module


@pytest.fixture
def server(running_app):
    client, settings, versions, _app = running_app
    return client, settings, versions


@pytest.fixture
def running_app(registry, tmp_path, request):
    """The app on a free loopback port, champion v1, polling the registry every 0.2 s; no rate limit to speak of
    unless a test passes other settings (indirect parametrization)."""
    folder, versions = registry
    MlflowClient().set_registered_model_alias(NAME, "champion", versions[0])
    settings = ServeParams(**{
        "database": f"sqlite:///{tmp_path / 'feedback.db'}", "poll_seconds": 0.2, "max_new_tokens": 12,
        "max_prompt_tokens": 256, "max_request_bytes": 4096, "max_batch_size": 4, "batch_wait_ms": 5.0,
        "key_requests_per_minute": 60_000, **getattr(request, "param", {})})
    app = create_app(settings, NAME, [KEY, OTHER_KEY])
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    try:
        yield client, settings, versions, app
    finally:
        client.close()
        uv.should_exit = True
        thread.join(timeout=30)


def chat(client, prompt: str, **extra) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], **extra})


def test_chat_completion_models_and_health(server):
    client, settings, versions = server
    response = chat(client, PROMPTS[0], model=NAME, max_tokens=8, temperature=0)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == NAME and body["model_version"] == versions[0]
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = chat(client, PROMPTS[0], max_tokens=8, temperature=0).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]  # greedy is deterministic

    two = chat(client, PROMPTS[1], n=2, max_tokens=6, temperature=1.0, seed=3).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert 2 <= two["usage"]["completion_tokens"] <= 12  # both choices count

    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == NAME and models[0]["version"] == versions[0]
    health = httpx.get(client.base_url.join("/health")).json()
    assert health["status"] == "ok" and health["version"] == versions[0]

    engine = make_engine(settings.database)
    with Session(engine) as db:
        stored = db.get(ServedCompletion, body["id"])
        assert stored.model_version == versions[0] and stored.prompt == PROMPTS[0] and stored.single_turn
        assert stored.choices[0].text == choice["message"]["content"]
        assert len(db.get(ServedCompletion, two["id"]).choices) == 2
        assert KEY not in stored.api_key_id
    engine.dispose()


def test_feedback_thumbs_and_pairwise_become_comparisons(server):
    client, settings, versions = server
    single = chat(client, "my mail is ana@example.com, explain rain", max_tokens=4).json()
    pair = chat(client, PROMPTS[2], n=2, max_tokens=4).json()
    assert client.post("/v1/feedback", json={"id": single["id"], "rating": "up"}).status_code == 201
    recorded = client.post("/v1/feedback", json={"id": pair["id"], "preferred": 1})
    assert recorded.status_code == 201, recorded.text
    assert recorded.json()["model_version"] == versions[0]

    not_pair = client.post("/v1/feedback", json={"id": single["id"], "preferred": 0})
    assert not_pair.status_code == 422 and "n=2" in not_pair.json()["error"]["message"]
    no_choice = client.post("/v1/feedback", json={"id": single["id"], "rating": "down", "choice": 1})
    assert no_choice.status_code == 422 and no_choice.json()["error"]["code"] == "no_such_choice"
    both = client.post("/v1/feedback", json={"id": pair["id"], "rating": "up", "preferred": 0})
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
    unknown = client.post("/v1/feedback", json={"id": "chatcmpl-nope", "rating": "up"})
    assert unknown.status_code == 404
    foreign = client.post("/v1/feedback", json={"id": pair["id"], "rating": "up"},
                          headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert foreign.status_code == 404  # another key's completion reads as absent

    comparisons, _ = feedback_comparisons(settings.database, settings.scrub_max_chars)
    (row,) = comparisons.to_dict("records")
    assert row["pair_id"] == f"feedback-{pair['id']}" and row["chosen"] == "b"
    assert row["source"] == f"feedback:{NAME}/{versions[0]}"
    assert row["response_b"] == pair["choices"][1]["message"]["content"]
    prompts, _ = served_prompts(settings.database, settings.scrub_max_chars)
    assert "my mail is [EMAIL], explain rain" in set(prompts["prompt"])
    engine = make_engine(settings.database)
    with Session(engine) as db:
        assert len(db.scalars(select(Feedback)).all()) == 2
    engine.dispose()


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer wrong-key-0123456789abcdef"}, "invalid_api_key"),
    ({"Authorization": f"Basic {KEY}"}, "missing_api_key"),
])
def test_requests_without_a_valid_key_get_401(server, headers, code):
    client, _, _ = server
    response = httpx.post(client.base_url.join("/v1/chat/completions"), headers=headers,
                          json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 401 and response.json()["error"]["code"] == code
    assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(client.base_url.join("/v1/models"), headers=headers).status_code == 401


def test_oversized_and_bad_requests_get_clear_4xx(server):
    client, settings, _ = server
    big = chat(client, "rain " * 2000)
    assert big.status_code == 413 and "serve.max_request_bytes" in big.json()["error"]["message"]
    chunked = client.post("/v1/chat/completions", content=iter([b'{"messages": [', b"x" * 5000, b"]}"]))
    assert chunked.status_code == 413  # no Content-Length: counted while streaming
    long_prompt = chat(client, "rain taps the glass " * 100)  # under the byte limit, over the token limit
    assert long_prompt.status_code == 422 and long_prompt.json()["error"]["code"] == "context_length_exceeded"
    too_many = chat(client, "hi", max_tokens=settings.max_new_tokens + 1)
    assert too_many.status_code == 422 and "serve.max_new_tokens" in too_many.json()["error"]["message"]
    cases = {
        "n": ({"n": 3}, 422), "temperature": ({"temperature": -1}, 422), "tools": ({"tools": []}, 422),
        "stream": ({"stream": True}, 422), "model": ({"model": "gpt-4"}, 404),
    }
    for field, (extra, status) in cases.items():
        response = chat(client, "hi", **extra)
        assert response.status_code == status, (field, response.text)
        assert field in response.json()["error"]["message"], response.text
    last_not_user = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert last_not_user.status_code == 422 and "last message" in last_not_user.json()["error"]["message"]
    not_json = client.post("/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    assert client.get("/v2/anything").json()["error"]["code"] == "not_found"


def test_champion_switch_during_requests_fails_none(server):
    client, _, versions = server
    stop, lock = threading.Event(), threading.Lock()
    answers: dict[int, list[tuple[int, str | None]]] = {k: [] for k in range(4)}

    def user(k: int) -> None:
        while not stop.is_set():
            response = chat(client, PROMPTS[k % 3], max_tokens=8, n=1 + k % 2)
            with lock:
                answers[k].append((response.status_code, response.json().get("model_version")))

    def served() -> Counter:
        with lock:
            return Counter(version for seen in answers.values() for _, version in seen)

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"waited 60 s for {what}"
            time.sleep(0.05)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: served()[versions[0]] >= 4, "answers from the first champion")
        MlflowClient().set_registered_model_alias(NAME, "champion", versions[1])
        wait_for(lambda: served()[versions[1]] >= 4, "answers from the new champion")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    statuses = Counter(status for seen in answers.values() for status, _ in seen)
    assert statuses == Counter({200: sum(statuses.values())}), statuses
    for seen in answers.values():
        order = [version for _, version in seen]
        assert order == sorted(order, key=versions.index), order  # never back to the old model once switched
    assert client.get("/v1/models").json()["data"][0]["version"] == versions[1]
    assert httpx.get(client.base_url.join("/health")).json()["swaps"] == 1


# -- generation, without a server ----------------------------------------------------------------------------


def test_batched_greedy_generation_matches_one_prompt_at_a_time(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts = [tokenizer(p)["input_ids"] for p in ("the sky", "write a short poem about rain on a window", "rain")]
    rows = [Row(10, 0.0, 1.0, seed=0, prompt_ids=ids) for ids in prompts]
    generate_rows(model, rows, tokenizer.pad_token_id, frozenset({tokenizer.eos_token_id}))
    for ids, row in zip(prompts, rows):
        reference = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert row.tokens == reference[0, len(ids):].tolist()


def test_sampling_keeps_the_nucleus_and_greedy_takes_the_argmax():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]] * 3))
    temperature, top_p = torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 0.5, 0.05])
    drawn = Counter()
    for seed in range(300):
        gens = [torch.Generator().manual_seed(seed) for _ in range(3)]
        greedy, nucleus, tiny = sample_next_tokens(logits, temperature, top_p, gens).tolist()
        assert greedy == 1 and tiny == 1  # top_p below the top token's mass keeps only it
        drawn[nucleus] += 1
    assert set(drawn) == {1, 2}  # 0.4 + 0.3 is the smallest set reaching 0.5
    assert 0.45 < drawn[1] / 300 < 0.70  # 0.4 / 0.7 = 0.57
    again = sample_next_tokens(logits, torch.ones(3), torch.ones(3), [torch.Generator().manual_seed(7)] * 3)
    assert again.tolist() == sample_next_tokens(logits, torch.ones(3), torch.ones(3),
                                                [torch.Generator().manual_seed(7)] * 3).tolist()


def test_api_keys_are_required_and_not_trivially_short():
    with pytest.raises(ValueError, match="RLHF_API_KEYS"):
        check_api_keys(["", " "])
    with pytest.raises(ValueError, match="shorter than 16"):
        check_api_keys(["short"])


def test_a_failing_generation_is_a_json_500_and_the_server_keeps_serving(server, monkeypatch):
    client, _, _ = server
    import rlhf.serve

    real = rlhf.serve.generate_rows
    monkeypatch.setattr(rlhf.serve, "generate_rows", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    failed = chat(client, "hi", max_tokens=2)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "generation_failed"
    monkeypatch.setattr(rlhf.serve, "generate_rows", real)
    assert chat(client, "hi", max_tokens=2).status_code == 200
