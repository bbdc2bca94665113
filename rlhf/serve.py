"""The model server: the registry's champion behind an OpenAI-compatible API, every answer logged for the refeed.

    RLHF_API_KEYS=<key>[,<key>...] rlhf serve --port 8000

Routes (all but /health need `Authorization: Bearer <key>`; errors are JSON `{"error": {"message", "type", "code"}}`):
    POST /v1/chat/completions  messages, max_tokens, temperature, top_p, n (1 or 2), seed -> choices + usage
    GET  /v1/models            the served model's name and registry version
    POST /v1/feedback          {"id", "choice", "rating": "up"|"down"} or {"id", "preferred": 0|1|"tie"} (n=2 only)
    GET  /health               status and the served version, no key needed

How it keeps serving while the champion changes:
- `Champion` serves `models:/<promote.model_name>@champion`. A thread polls the alias every `serve.poll_seconds`;
  a new version is downloaded and loaded fully beside the old one, then one reference is swapped. A batch
  takes the reference when it starts and keeps it to the end, so in-flight requests finish on the old model
  and every response names the version that wrote it. A version that fails to load is logged and retried;
  the old one keeps serving.
- `Batcher` is the only thread that runs the model: requests that arrive within `serve.batch_wait_ms` of each
  other share one forward pass per token (up to `serve.max_batch_size` sequences), each with its own
  temperature, top_p, max_tokens and seed.
- Every completion is committed to the feedback store (`rlhf/feedback.py`, the labeling app's database layer)
  with its model version before the response is sent.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from rlhf.feedback import Feedback, ServedChoice, ServedCompletion, open_store
from rlhf.params import ServeParams

log = logging.getLogger("rlhf.serve")
API_KEYS_ENV = "RLHF_API_KEYS"
MIN_KEY_CHARS = 16
CHAMPION = "champion"


class ApiError(Exception):
    """An HTTP error with an OpenAI-style JSON body; the message says what was wrong and what to send instead."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- requests ------------------------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours; any other field is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer OpenAI name of max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=2)
    seed: int | None = None
    stream: Literal[False] = False
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _ends_with_a_user_message(self):
        if self.messages[-1].role != "user" or not self.messages[-1].content.strip():
            raise ValueError("the last message must come from the user and hold some text: it is what the model answers")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(max_length=64)
    rating: Literal["up", "down"] | None = None
    choice: int = Field(default=0, ge=0, le=1)
    preferred: Literal[0, 1, "tie"] | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.rating is None) == (self.preferred is None):
            raise ValueError("send either `rating` ('up' or 'down', on `choice`) or `preferred` (0, 1 or 'tie'), not both or neither")
        return self


def _validation_message(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        if item["type"] == "extra_forbidden":
            parts.append(f"`{where}` is not supported by this server")
        else:
            parts.append(f"`{where}`: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts) + "."


async def _read_json(request: Request, model: type[BaseModel], limit: int):
    """The body, refused with 413 past `limit` bytes (declared or streamed), 400 if not JSON, 422 if not `model`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is {declared} bytes; this server accepts at most {limit} "
                            "(serve.max_request_bytes). Send a shorter conversation.", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"The request body is over {limit} bytes (serve.max_request_bytes). "
                                "Send a shorter conversation.", "request_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"The request body is not valid JSON ({error}). Send a JSON object with "
                            "Content-Type: application/json.", "invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ApiError(422, _validation_message(error), "invalid_request") from None


# -- the champion --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    model: torch.nn.Module
    tokenizer: object
    folder: Path  # the downloaded checkpoint, removed once the next version is swapped in
    stop_ids: frozenset[int]


def download_version(name: str, version: str, into: Path) -> Path:
    """Download `models:/<name>/<version>` and return the folder holding its transformers checkpoint."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(into)))
    configs = sorted(local.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise FileNotFoundError(f"models:/{name}/{version} holds no transformers checkpoint (no config.json in {local}).")
    return configs[0].parent


def load_version(name: str, version: str, dtype: torch.dtype) -> ServedModel:
    from rlhf.models import load_causal_lm, load_tokenizer

    scratch = Path(tempfile.mkdtemp(prefix=f"rlhf-serve-{name}-v{version}-"))
    try:
        folder = download_version(name, version, scratch)
        tokenizer = load_tokenizer(folder)
        model = load_causal_lm(folder, dtype=dtype).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    stop = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    stop.update(configured if isinstance(configured, list) else [configured])
    return ServedModel(name, str(version), model, tokenizer, scratch, frozenset(i for i in stop if i is not None))


class Champion:
    """The model that serves: `current` is swapped whole when the registry's champion alias moves."""

    def __init__(self, name: str, poll_seconds: float, dtype: torch.dtype):
        from mlflow import MlflowClient

        self.name, self.poll_seconds, self.dtype = name, poll_seconds, dtype
        self.client = MlflowClient()
        self.last_error: str | None = None
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        version = self.registry_version()
        if version is None:
            raise FileNotFoundError(
                f"the registry has no models:/{name}@{CHAMPION}, so there is nothing to serve. Run a cycle that ends in "
                f"the promotion gate, or make a registered version champion by hand: `rlhf promote --version N --reason ...`."
            )
        self.current = load_version(name, version, dtype)

    def registry_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(self.name, CHAMPION).version)
        except MlflowException as error:
            if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code) or "not found" in str(error).lower():
                return None
            raise

    def poll_once(self) -> bool:
        """Swap in the registry's champion if it changed; True when a swap happened."""
        version = self.registry_version()
        if version is None or version == self.current.version:
            return False
        new = load_version(self.name, version, self.dtype)  # fully loaded before anyone sees it
        old, self.current = self.current, new
        self.swaps += 1
        log.warning("serving %s v%s (was v%s)", self.name, new.version, old.version)
        shutil.rmtree(old.folder, ignore_errors=True)  # the weights are in memory; batches still on `old` keep them
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll_once()
                self.last_error = None
            except Exception as error:  # the registry or a download is away: keep serving, say so on /health
                self.last_error = f"{type(error).__name__}: {error}"
                log.error("champion poll failed, still serving v%s: %s", self.current.version, self.last_error)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="champion-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        shutil.rmtree(self.current.folder, ignore_errors=True)


# -- generation ----------------------------------------------------------------------------------------------


def sample_next_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row: argmax where temperature is 0; else nucleus sampling from softmax(logits / T),
    keeping the smallest set of most likely tokens whose probability reaches top_p.  logits (B, V) -> (B,)"""
    greedy = logits.argmax(-1)
    probs = F.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above this one
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p[:, None], 0.0)  # the top token always stays
    picked = torch.stack([torch.multinomial(sorted_probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
    sampled = order.gather(-1, picked[:, None])[:, 0]
    return torch.where(temperature == 0, greedy, sampled)


@dataclass
class Row:
    """One sequence to generate: a request with n=2 becomes two rows with the same prompt."""

    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator
    prompt_ids: list[int] = field(default_factory=list)  # set by the batch, with its model's tokenizer
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


@torch.inference_mode()
def generate_rows(model, rows: list[Row], pad_id: int, stop_ids: frozenset[int]) -> None:
    """Fill each row's tokens: left-padded prompts, one forward pass per new token over the KV cache.
    Sampling runs on the CPU with each row's own generator, wherever the model is."""
    device = next(model.parameters()).device
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
        attention[i, width - len(row.prompt_ids):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (B, T): pads share position 0, prompts start at 0
    input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
    temperature = torch.tensor([r.temperature for r in rows])
    top_p = torch.tensor([r.top_p for r in rows])
    generators = [r.generator for r in rows]
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, next_position = out.past_key_values, positions[:, -1:] + 1
    done = [False] * len(rows)
    for _ in range(max(r.max_new_tokens for r in rows)):
        tokens = sample_next_tokens(out.logits[:, -1, :].float().cpu(), temperature, top_p, generators)
        for i, row in enumerate(rows):
            if done[i]:
                continue
            token = int(tokens[i])
            row.tokens.append(token)
            if token in stop_ids:
                done[i], row.finish_reason = True, "stop"
            elif len(row.tokens) >= row.max_new_tokens:
                done[i] = True
        if all(done):
            break
        attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=torch.long, device=device)], dim=1)
        out = model(input_ids=tokens[:, None].to(device), attention_mask=attention, position_ids=next_position,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, next_position = out.past_key_values, next_position + 1


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The messages rendered with the model's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Job:
    messages: list[dict]
    rows: list[Row]
    future: Future = field(default_factory=Future)


class Batcher:
    """The one thread that runs the model. Jobs that arrive close together share a batch; each batch uses the
    champion it found when it started, and the job's future gets (that ServedModel, the filled rows)."""

    def __init__(self, champion: Champion, max_batch_size: int, wait_seconds: float, max_pending: int,
                 max_prompt_tokens: int):
        self.champion, self.max_batch_size, self.wait_seconds = champion, max_batch_size, wait_seconds
        self.max_prompt_tokens = max_prompt_tokens
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_pending)
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.jobs.put(None, timeout=60)
        self._thread.join(timeout=60)

    def submit(self, messages: list[dict], rows: list[Row]) -> Future:
        job = Job(messages, rows)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "The server is at capacity (serve.max_batch_size x 8 requests waiting). "
                                "Retry in a few seconds.", "overloaded", kind="server_error") from None
        return job.future

    def _loop(self) -> None:
        held: Job | None = None  # a job that did not fit in the last batch opens the next one
        while True:
            first, held = held or self.jobs.get(), None
            if first is None:
                return
            batch, size, stopping = [first], len(first.rows), False
            deadline = time.monotonic() + self.wait_seconds
            while size < self.max_batch_size:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if size + len(job.rows) > self.max_batch_size:
                    held = job
                    break
                batch.append(job)
                size += len(job.rows)
            self._run(batch)
            if stopping:
                return

    def _run(self, batch: list[Job]) -> None:
        served = self.champion.current  # this batch stays on this model, whatever the poller swaps meanwhile
        try:
            ready = []
            for job in batch:  # the tokenizer is used on this thread only
                ids = chat_prompt_ids(served.tokenizer, job.messages)
                if len(ids) > self.max_prompt_tokens:
                    job.future.set_exception(ApiError(
                        422, f"The conversation is {len(ids)} tokens with the chat template; this server takes at most "
                             f"{self.max_prompt_tokens} (serve.max_prompt_tokens). Shorten it or drop earlier messages.",
                        "context_length_exceeded", param="messages"))
                    continue
                for row in job.rows:
                    row.prompt_ids = ids
                ready.append(job)
            rows = [row for job in ready for row in job.rows]
            if rows:
                generate_rows(served.model, rows, served.tokenizer.pad_token_id, served.stop_ids)
            for row in rows:
                row.text = served.tokenizer.decode(row.tokens, skip_special_tokens=True)
        except Exception as error:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.batches += 1
        for job in ready:
            job.future.set_result((served, job.rows))


# -- the app -------------------------------------------------------------------------------------------------


def api_key_id(key: str) -> str:
    """What the store keeps of a caller's key: a sha256 prefix, enough to tell callers apart."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def check_api_keys(keys: list[str]) -> list[str]:
    keys = [k.strip() for k in keys if k.strip()]
    if not keys:
        raise ValueError(
            f"the model server needs at least one API key and none was given. Set {API_KEYS_ENV} to a comma-separated "
            f"list (for example `export {API_KEYS_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')`) "
            "or pass --api-keys-file with one key per line; clients send it as `Authorization: Bearer <key>`."
        )
    short = [k for k in keys if len(k) < MIN_KEY_CHARS]
    if short:
        raise ValueError(f"{len(short)} API key(s) are shorter than {MIN_KEY_CHARS} characters and easy to guess. "
                         "Use random keys such as `secrets.token_urlsafe(32)`.")
    return keys


def create_app(serve: ServeParams, model_name: str, api_keys: list[str], dtype: torch.dtype = torch.float32) -> FastAPI:
    """The server for `models:/<model_name>@champion`, logging to `serve.database`. Loads the champion now, so a
    missing champion or an unreachable registry fails before the port is bound."""
    import mlflow

    from rlhf import tracking

    keys = [k.encode() for k in check_api_keys(api_keys)]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    champion = Champion(model_name, serve.poll_seconds, dtype)
    context = getattr(champion.current.model.config, "max_position_embeddings", None)
    if context is not None and serve.max_prompt_tokens + serve.max_new_tokens > context:
        champion.stop()
        raise ValueError(
            f"serve.max_prompt_tokens ({serve.max_prompt_tokens}) + serve.max_new_tokens ({serve.max_new_tokens}) is more "
            f"than the {context} positions {model_name} v{champion.current.version} can attend to. Lower either in params.yaml."
        )
    try:
        engine = open_store(serve.database)
    except Exception:
        champion.stop()
        raise
    open_session = sessionmaker(engine, expire_on_commit=False)
    batcher = Batcher(champion, serve.max_batch_size, serve.batch_wait_ms / 1000, serve.max_pending,
                      serve.max_prompt_tokens)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        champion.start()
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            champion.stop()
            engine.dispose()

    app = FastAPI(title="RLHF model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.champion, app.state.batcher, app.state.engine = champion, batcher, engine

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError):
        return error.response()

    @app.exception_handler(404)
    async def not_found(request: Request, _error):
        return ApiError(404, f"There is no route {request.method} {request.url.path}. The routes are POST "
                             "/v1/chat/completions, GET /v1/models, POST /v1/feedback and GET /health.",
                        "not_found").response()

    @app.exception_handler(405)
    async def wrong_method(request: Request, _error):
        return ApiError(405, f"{request.url.path} does not take {request.method}.", "method_not_allowed").response()

    def authorise(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "No API key: send `Authorization: Bearer <key>` with a key the server's operator gave you.",
                           "missing_api_key", "authentication_error")
        matches = [hmac.compare_digest(token.encode(), key) for key in keys]  # every key compared: no timing hint
        if not any(matches):
            raise ApiError(401, "This API key is not valid for this server. Check it, or ask the operator for one.",
                           "invalid_api_key", "authentication_error")
        return api_key_id(token)

    def model_card(served: ServedModel) -> dict:
        return {"id": served.name, "object": "model", "owned_by": "rlhf", "version": served.version,
                "alias": CHAMPION, "registry_uri": f"models:/{served.name}/{served.version}"}

    @app.get("/health")
    def health():
        served = champion.current
        return {"status": "ok", "model": served.name, "version": served.version, "swaps": champion.swaps,
                "batches": batcher.batches, "last_poll_error": champion.last_error}

    @app.get("/v1/models")
    def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [model_card(champion.current)]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key_id = authorise(request)
        body: ChatRequest = await _read_json(request, ChatRequest, serve.max_request_bytes)
        if body.model not in (None, model_name, f"{model_name}@{CHAMPION}"):
            raise ApiError(404, f"This server serves `{model_name}` (its registry champion), not `{body.model}`. "
                                f"Send \"model\": \"{model_name}\" or leave it out.", "model_not_found", param="model")
        max_tokens = body.max_completion_tokens or body.max_tokens or serve.max_new_tokens
        if max_tokens > serve.max_new_tokens:
            raise ApiError(422, f"`max_tokens` is {max_tokens}; this server generates at most {serve.max_new_tokens} "
                                "tokens per response (serve.max_new_tokens). Ask for fewer.", "max_tokens_too_large",
                           param="max_tokens")
        messages = [m.model_dump() for m in body.messages]
        seed = body.seed if body.seed is not None else secrets.randbits(62)
        rows = [Row(max_tokens, body.temperature, body.top_p, torch.Generator().manual_seed(seed + i))
                for i in range(body.n)]
        try:
            served, rows = await asyncio.wrap_future(batcher.submit(messages, rows))
        except ApiError:
            raise
        except Exception as error:  # generation failed (out of memory, say); the next batch may well succeed
            log.error("generation failed: %s: %s", type(error).__name__, error)
            raise ApiError(500, f"Generating the answer failed ({type(error).__name__}); the server's log has the "
                                "details. Retry; if it keeps failing, tell the operator.", "generation_failed",
                           kind="server_error") from None
        texts = [r.text for r in rows]
        completion = ServedCompletion(
            id=f"chatcmpl-{secrets.token_hex(16)}", model_name=served.name, model_version=served.version,
            messages=json.dumps(messages), prompt=messages[-1]["content"],
            single_turn=[m["role"] for m in messages if m["role"] != "system"] == ["user"],
            temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
            prompt_tokens=len(rows[0].prompt_ids), api_key_id=key_id,
            choices=[ServedChoice(index=i, text=t, finish_reason=r.finish_reason, completion_tokens=len(r.tokens))
                     for i, (t, r) in enumerate(zip(texts, rows))])
        try:
            await run_in_threadpool(_commit, open_session, completion)
        except Exception as error:  # the promise is: every response served is logged; no log, no response
            log.error("feedback store write failed: %s", error)
            raise ApiError(503, "The feedback store is unavailable, so the response was not kept and is not sent. "
                                "Retry shortly.", "store_unavailable", kind="server_error") from None
        completion_tokens = sum(len(r.tokens) for r in rows)
        return {
            "id": completion.id, "object": "chat.completion", "created": int(completion.created_at.timestamp()),
            "model": served.name, "model_version": served.version,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r.finish_reason,
                         "logprobs": None} for i, (t, r) in enumerate(zip(texts, rows))],
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": completion.prompt_tokens + completion_tokens},
        }

    @app.post("/v1/feedback", status_code=201)
    async def feedback(request: Request):
        key_id = authorise(request)
        body: FeedbackRequest = await _read_json(request, FeedbackRequest, serve.max_request_bytes)
        return await run_in_threadpool(_record_feedback, open_session, key_id, body)

    return app


def _commit(open_session: sessionmaker, completion: ServedCompletion) -> None:
    from rlhf.labeling.db import utc_now

    completion.created_at = utc_now()
    with open_session() as db:
        db.add(completion)
        db.commit()


def _record_feedback(open_session: sessionmaker, key_id: str, body: FeedbackRequest) -> dict:
    with open_session() as db:
        completion = db.get(ServedCompletion, body.id)
        # another caller's completion reads as absent: ids are not secrets, feedback is per caller
        if completion is None or not hmac.compare_digest(completion.api_key_id, key_id):
            raise ApiError(404, f"No completion `{body.id}` was served to this API key. Send the `id` of a chat "
                                "completion response you received.", "completion_not_found", param="id")
        n = len(completion.choices)
        if body.preferred is not None:
            if n != 2:
                raise ApiError(422, f"`preferred` compares two responses, and completion `{body.id}` has {n}. Ask for "
                                    "n=2 to get two to compare, or send a thumbs `rating`.", "not_pairwise",
                               param="preferred")
            item = Feedback(completion_id=body.id, kind="pairwise", preferred={0: "a", 1: "b", "tie": "tie"}[body.preferred])
        else:
            if body.choice >= n:
                raise ApiError(422, f"`choice` is {body.choice}, but completion `{body.id}` has {n} choice(s), "
                                    f"numbered from 0.", "no_such_choice", param="choice")
            item = Feedback(completion_id=body.id, kind="thumbs", choice_index=body.choice, rating=body.rating)
        db.add(item)
        db.commit()
        return {"id": item.id, "object": "feedback", "completion_id": body.id, "kind": item.kind,
                "model_version": completion.model_version}


def api_keys_from(env: dict, keys_file: str | None) -> list[str]:
    """Keys from --api-keys-file (one per line, '#' comments) or else the RLHF_API_KEYS variable (comma-separated)."""
    if keys_file:
        lines = Path(keys_file).read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return env.get(API_KEYS_ENV, "").split(",")


def main(host: str, port: int, params_file: str, keys_file: str | None) -> int:
    """`rlhf serve`: load params, the keys and the champion, then serve until interrupted."""
    import uvicorn

    from rlhf.models import resolve_precision
    from rlhf.params import load_params

    params = load_params(params_file)
    app = create_app(params.serve, params.promote.model_name, api_keys_from(os.environ, keys_file),
                     resolve_precision(params.model.precision))
    served = app.state.champion.current
    print(f"serving {served.name} v{served.version} on http://{host}:{port} (feedback store: {params.serve.database})")
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
    return 0
