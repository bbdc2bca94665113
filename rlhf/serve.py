"""The model server: the registry's champion behind an OpenAI-compatible API, every answer logged for the refeed.

    RLHF_API_KEYS=<key>[,<key>...] rlhf serve --port 8000

Routes (all but /health need `Authorization: Bearer <key>`; errors are JSON `{"error": {"message", "type", "code"}}`):
    POST /v1/chat/completions  messages, max_tokens, temperature, top_p, n (1 or 2), seed -> choices + usage
    GET  /v1/models            the served model's name and registry version
    POST /v1/feedback          {"id", "choice", "rating": "up"|"down"} or {"id", "preferred": 0|1|"tie"} (n=2 only)
    GET  /health               status, the served version and counts, no key needed; 503 if generation stopped

What a caller cannot do to the others:
- Bad input is answered alone, before it reaches a batch: a body over `serve.max_request_bytes` (413), not JSON,
  nested past MAX_JSON_DEPTH or holding text no UTF-8 encodes, such as a lone surrogate '\\ud800' (400), fields
  out of range, `seed` outside [0, 2**63) included (422). Each key has `serve.key_requests_per_minute` (429 and
  Retry-After past it). Inside a batch, a job the chat template refuses fails alone, and a batch whose generation
  fails is generated again job by job (see `Batcher`).

How it keeps serving while the champion changes:
- `Champion` serves `models:/<promote.model_name>@champion`. A thread polls the alias every `serve.poll_seconds`;
  a new version is downloaded and loaded fully beside the old one, then one reference is swapped. A batch
  takes the reference when it starts and keeps it to the end, so in-flight requests finish on the old model
  and every response names the version that wrote it. A version that fails to load is logged and retried;
  the old one keeps serving.
- `Batcher` is the only thread that runs the model: requests that arrive within `serve.batch_wait_ms` of each
  other share one forward pass per token (up to `serve.max_batch_size` sequences), each with its own
  temperature, top_p, max_tokens and seed.
- Every completion is committed to the feedback store (`rlhf/serve_store.py`, the labeling app's database layer)
  with its model version before the response is sent; when the commit fails the caller gets 503
  `store_unavailable` and nothing counts as served (/health: `served`, `store_write_failures`).

The OpenAPI schema is `create_app(...).openapi()` (no route serves it); tests/test_serve_fuzz.py fuzzes from it.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import math
import queue
import re
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

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import insert
from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from rlhf.chat import prompt_ids
from rlhf.decoding import decoder
from rlhf.labeling.db import utc_now
from rlhf.params import ServeParams
from rlhf.rollouts import last_position, mask_positions, pad_left
from rlhf.registry import CHAMPION, download_checkpoint
from rlhf.serve_store import Feedback, ServedChoice, ServedCompletion, open_store

log = logging.getLogger("rlhf.serve")
API_KEYS_ENV = "RLHF_API_KEYS"
MIN_KEY_CHARS = 16


class ApiError(Exception):
    """An HTTP error with an OpenAI-style JSON body; the message says what was wrong and what to send instead."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = {**({"WWW-Authenticate": "Bearer"} if status == 401 else {}), **(headers or {})}

    def response_body(self) -> dict:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def response(self) -> Response:
        # ASCII-escaped, so a message that quotes the caller's text is valid JSON even if that text is not valid Unicode
        return Response(json.dumps({"error": self.response_body()}), status_code=self.status, headers=self.headers,
                        media_type="application/json")


class ErrorBody(BaseModel):
    """Every error's body (for the OpenAPI schema)."""

    class Detail(BaseModel):
        message: str
        type: str
        param: str | None
        code: str

    error: Detail


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
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # torch generators take 64-bit seeds; n=2 uses seed + 1
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


MAX_JSON_DEPTH = 32  # the requests nest three deep ({"messages": [{...}]}); the JSON parser recurses once a level
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)  # to its closing quote, or the end
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in `body`, found without parsing it (the parser recurses a level at a
    time and 60,000 '[' exhaust Python's stack): strings are dropped, then the brackets are counted. Linear."""
    brackets = np.frombuffer(_JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not len(brackets):
        return 0
    opens = (brackets == ord("[")) | (brackets == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1)).max())


def _not_unicode(data) -> str | None:
    """Where `data` (parsed JSON) holds a string that is not valid Unicode, such as a lone surrogate '\\ud800'
    (valid JSON, but no UTF-8 encodes it, so the tokenizer and the store cannot take it); None if nowhere."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # the whole body at C speed; the walk only on failure
        return None
    except UnicodeEncodeError:
        pass
    stack = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((f"a key in `{where or 'the body'}`", key))
                stack.append((f"{where}.{key}".lstrip(".") if _printable(key) else f"a field of `{where}`", item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}".lstrip("."), item) for i, item in enumerate(value))
    return "the body"


def _printable(key: str) -> bool:
    try:
        key.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _not_a_json_constant(name: str):
    raise ValueError(f"{name} is not JSON (it is a JavaScript constant); send a number")


async def _read_json(request: Request, model: type[BaseModel], limit: int):
    """The body, refused with 413 past `limit` bytes (declared or streamed), 400 if not JSON (or nested past
    MAX_JSON_DEPTH, or holding text that is not valid Unicode), 422 if not `model`."""
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
    depth = json_depth(bytes(body))
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"The request body nests arrays and objects {depth} levels deep; this server reads at most "
                            f"{MAX_JSON_DEPTH} (its requests need three). Send one JSON object as the API describes.",
                       "json_too_deep")
    try:
        data = json.loads(body, parse_constant=_not_a_json_constant)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, NaN/Infinity, integers past 4,300 digits
        raise ApiError(400, f"The request body is not valid JSON ({error}). Send a JSON object with "
                            "Content-Type: application/json.", "invalid_json") from None
    where = _not_unicode(data)
    if where is not None:
        raise ApiError(400, f"{where if where.startswith('a ') else f'`{where}`'} holds text that is not valid Unicode "
                            "(a lone surrogate escape such as \\ud800, with no low surrogate after it), which no UTF-8 "
                            "encodes. Send characters beyond U+FFFF as a surrogate pair (\\ud83d\\ude00) or as "
                            "UTF-8 bytes.", "invalid_text", param=None if where.startswith("a ") else where)
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


def load_version(name: str, version: str, dtype: torch.dtype) -> ServedModel:
    from rlhf.checkpoints import load_tokenizer
    from rlhf.models import load_causal_lm

    scratch = Path(tempfile.mkdtemp(prefix=f"rlhf-serve-{name}-v{version}-"))
    try:
        folder = download_checkpoint(f"models:/{name}/{version}", scratch)
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
    seed: int  # the row's own generator starts here, so its text does not depend on what shares its batch
    prompt_ids: list[int] = field(default_factory=list)  # set by the batch, with its model's tokenizer
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    text: str = ""


@torch.inference_mode()
def generate_rows(model, rows: list[Row], pad_id: int, stop_ids: frozenset[int]) -> None:
    """Fill each row's tokens: left-padded prompts, one decoding step (`rlhf.decoding`) per new token over the
    KV cache.

    The padding, the position ids and the decoding step are the rollouts' (`pad_left`, `mask_positions`,
    `decoder`); the loop is not
    `rollouts.sample_responses`, because a batch here mixes requests that each carry their own settings:
    temperature (0 is greedy for that row alone), top_p, max_tokens (a row stops at its own), and a seed
    whose text must not depend on its batch neighbours. So each row samples with its own torch.Generator on
    the CPU, where `sample_responses` takes one temperature and top_p for the batch and draws from the global
    generator. A row's tokens start empty, so a retried batch starts over from the same seeds.
    """
    device = next(model.parameters()).device
    input_ids, attention = pad_left([r.prompt_ids for r in rows], pad_id)
    positions = mask_positions(attention)  # (B, T): pads share position 0, prompts start at 0
    input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
    temperature = torch.tensor([r.temperature for r in rows])
    top_p = torch.tensor([r.top_p for r in rows])
    generators = [torch.Generator().manual_seed(r.seed) for r in rows]
    for row in rows:
        row.tokens, row.finish_reason = [], "length"
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=last_position(input_ids))
    max_new_tokens = max(r.max_new_tokens for r in rows)
    step, logits = decoder(model, out.past_key_values, attention, max_new_tokens), out.logits[:, -1, :]
    next_position = positions[:, -1:] + 1
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        tokens = sample_next_tokens(logits.float().cpu(), temperature, top_p, generators)
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
        logits, next_position = step(tokens.to(device), next_position), next_position + 1


@dataclass
class Job:
    messages: list[dict]
    rows: list[Row]
    future: Future = field(default_factory=Future)


class Batcher:
    """The one thread that runs the model. Jobs that arrive close together share a batch; each batch uses the
    champion it found when it started, and the job's future gets (that ServedModel, the filled rows).

    Each job is answered on its own: a job whose request was cancelled (its client went away) is dropped when
    its batch starts; a job the tokenizer or the chat template refuses fails alone; and when generating the
    batch fails, each job is generated again alone, so only the one that fails by itself gets the error.
    Whatever a batch raises, the thread goes on to the next (`alive` is what /health reports)."""

    def __init__(self, champion: Champion, max_batch_size: int, wait_seconds: float, max_pending: int,
                 max_prompt_tokens: int):
        self.champion, self.max_batch_size, self.wait_seconds = champion, max_batch_size, wait_seconds
        self.max_prompt_tokens = max_prompt_tokens
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_pending)
        self.batches = 0
        self.cancelled = 0  # jobs dropped because their request was cancelled before their batch
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self.alive:
            self.jobs.put(None, timeout=60)
            self._thread.join(timeout=60)

    def submit(self, messages: list[dict], rows: list[Row]) -> Future:
        if self._thread.ident is not None and not self.alive:  # started, and ended
            raise ApiError(503, "The server's generation thread has stopped, so no request can be answered; its log "
                                "says why. Tell the operator: the server needs a restart.", "batcher_stopped",
                           kind="server_error")
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
            try:
                self._run(batch)
            except Exception as error:  # a bug in a batch must not stop the only thread that runs the model
                log.exception("batch of %d jobs failed", len(batch))
                for job in batch:
                    if not job.future.done() and (job.future.running() or job.future.set_running_or_notify_cancel()):
                        job.future.set_exception(error)
            if stopping:
                return

    def _run(self, batch: list[Job]) -> None:
        served = self.champion.current  # this batch stays on this model, whatever the poller swaps meanwhile
        # a future that is running can no longer be cancelled, so answering it later cannot raise
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        self.cancelled += len(batch) - len(live)
        ready = []
        for job in live:  # the tokenizer is used on this thread only
            try:
                ids = prompt_ids(served.tokenizer, job.messages)
            except TemplateError as error:
                job.future.set_exception(ApiError(
                    422, f"The served model's chat template refuses this conversation: {error}. Change the messages "
                         "(their roles and order) as it asks.", "invalid_conversation", param="messages"))
                continue
            except Exception as error:
                job.future.set_exception(error)
                continue
            if len(ids) > self.max_prompt_tokens:
                job.future.set_exception(ApiError(
                    422, f"The conversation is {len(ids)} tokens with the chat template; this server takes at most "
                         f"{self.max_prompt_tokens} (serve.max_prompt_tokens). Shorten it or drop earlier messages.",
                    "context_length_exceeded", param="messages"))
                continue
            for row in job.rows:
                row.prompt_ids = ids
            ready.append(job)
        self._generate(served, ready)
        self.batches += 1

    def _generate(self, served: ServedModel, jobs: list[Job]) -> None:
        """Every job's rows in one batch; if that fails, each job alone, so that only a failing job fails."""
        rows = [row for job in jobs for row in job.rows]
        if not rows:
            return
        try:
            generate_rows(served.model, rows, served.tokenizer.pad_token_id, served.stop_ids)
            for row in rows:
                row.text = served.tokenizer.decode(row.tokens, skip_special_tokens=True)
        except Exception as error:
            if len(jobs) == 1:
                jobs[0].future.set_exception(error)
                return
            log.warning("a batch of %d jobs failed (%s: %s); generating each alone", len(jobs), type(error).__name__, error)
            for job in jobs:
                self._generate(served, [job])
            return
        for job in jobs:
            job.future.set_result((served, job.rows))


# -- the app -------------------------------------------------------------------------------------------------


def api_key_id(key: str) -> str:
    """What the store keeps of a caller's key: a sha256 prefix, enough to tell callers apart."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRateLimit:
    """A token bucket per API key: it refills at `per_minute` tokens a minute and holds at most `burst`; each
    request takes one token, and a request that finds none is refused with how long until the next one."""

    def __init__(self, per_minute: int, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = per_minute / 60, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when counted); one per configured key
        self._lock = threading.Lock()

    def wait_seconds(self, key_id: str) -> float:
        """0 when this request may go ahead (its token taken), else the seconds until the key has a token again."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate


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
    limit = KeyRateLimit(serve.key_requests_per_minute, serve.key_burst)
    counts = {"served": 0, "store_write_failures": 0}  # completions committed and answered; commits that failed

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

    # no /docs and no /openapi.json route: `app.openapi()` gives the schema (the fuzz tests read it)
    app = FastAPI(title="RLHF model server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.champion, app.state.batcher, app.state.engine = champion, batcher, engine
    app.openapi = lambda: _openapi_schema(app)

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
        key_id = api_key_id(token)
        wait = limit.wait_seconds(key_id)
        if wait:
            retry = math.ceil(wait)
            raise ApiError(429, f"This API key sent more than {serve.key_requests_per_minute} requests a minute (bursts "
                                f"of {serve.key_burst}; serve.key_requests_per_minute). Retry in {retry} s, or spread "
                                "the requests out.", "rate_limited", kind="rate_limit_error",
                           headers={"Retry-After": str(retry)})
        return key_id

    def model_card(served: ServedModel) -> dict:
        return {"id": served.name, "object": "model", "owned_by": "rlhf", "version": served.version,
                "alias": CHAMPION, "registry_uri": f"models:/{served.name}/{served.version}"}

    @app.get("/health", responses={503: {"model": ErrorBody, "description": "the generation thread has stopped"}})
    def health():
        served = champion.current
        figures = {"model": served.name, "version": served.version, "swaps": champion.swaps, "batches": batcher.batches,
                   "cancelled": batcher.cancelled, **counts, "last_poll_error": champion.last_error}
        if not batcher.alive:
            failing = ApiError(503, "The generation thread has stopped, so no request can be answered; the server's "
                                    "log says why. Restart the server.", "batcher_stopped", kind="server_error")
            return JSONResponse({"status": "failing", **figures, "error": failing.response_body()}, status_code=503)
        return {"status": "ok", **figures}

    @app.get("/v1/models", responses=_errors(401, 429))
    def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [model_card(champion.current)]}

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatRequest),
              responses=_errors(400, 401, 404, 413, 422, 429, 500, 503))
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
        rows = [Row(max_tokens, body.temperature, body.top_p, seed + i) for i in range(body.n)]
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
        completion = {
            "id": f"chatcmpl-{secrets.token_hex(16)}", "model_name": served.name, "model_version": served.version,
            "messages": json.dumps(messages), "prompt": messages[-1]["content"],
            "single_turn": [m["role"] for m in messages if m["role"] != "system"] == ["user"],
            "temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_tokens,
            "prompt_tokens": len(rows[0].prompt_ids), "api_key_id": key_id}
        choices = [{"completion_id": completion["id"], "index": i, "text": t, "finish_reason": r.finish_reason,
                    "completion_tokens": len(r.tokens)} for i, (t, r) in enumerate(zip(texts, rows))]
        try:
            await run_in_threadpool(_commit, engine, completion, choices)
        except Exception as error:  # the promise is: every response served is logged; no log, no response
            counts["store_write_failures"] += 1
            log.error("feedback store write failed: %s", error)
            raise ApiError(503, "The feedback store is unavailable, so the response was not kept and is not sent. "
                                "Retry shortly.", "store_unavailable", kind="server_error") from None
        counts["served"] += 1
        completion_tokens = sum(len(r.tokens) for r in rows)
        return {
            "id": completion["id"], "object": "chat.completion", "created": int(completion["created_at"].timestamp()),
            "model": served.name, "model_version": served.version,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r.finish_reason,
                         "logprobs": None} for i, (t, r) in enumerate(zip(texts, rows))],
            "usage": {"prompt_tokens": completion["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": completion["prompt_tokens"] + completion_tokens},
        }

    @app.post("/v1/feedback", status_code=201, openapi_extra=_body(FeedbackRequest),
              responses=_errors(400, 401, 404, 413, 422, 429))
    async def feedback(request: Request):
        key_id = authorise(request)
        body: FeedbackRequest = await _read_json(request, FeedbackRequest, serve.max_request_bytes)
        return await run_in_threadpool(_record_feedback, open_session, key_id, body)

    return app


def _commit(engine, completion: dict, choices: list[dict]) -> None:
    """Two INSERTs, built beforehand, in one transaction: the write lock is held for them and nothing else."""
    completion["created_at"] = utc_now()
    with engine.begin() as connection:
        connection.execute(insert(ServedCompletion), [completion])
        connection.execute(insert(ServedChoice), choices)


_ERRORS = {400: "not JSON, nested too deep, or text that is not valid Unicode", 401: "no valid API key",
           404: "no such model, completion or route", 413: "the body is over serve.max_request_bytes",
           422: "a field out of range, or a conversation the model cannot take", 429: "the key's rate limit (Retry-After)",
           500: "generation failed (out of memory, say); retry", 503: "overloaded, the feedback store unavailable, or "
           "the generation thread stopped: retry shortly"}


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorBody, "description": _ERRORS[status]} for status in statuses}


def _body(model: type[BaseModel]) -> dict:
    """A route's JSON request body for the OpenAPI schema: the routes read it themselves (`_read_json`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi_schema(app: FastAPI) -> dict:
    """The API as OpenAPI 3.1, with the request models `_body` names among its components."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version="1", routes=app.routes,
                             description="An OpenAI-compatible chat API for the registry's champion, with feedback.")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatRequest, FeedbackRequest):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


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

    from rlhf.checkpoints import resolve_precision
    from rlhf.params import load_params

    params = load_params(params_file)
    app = create_app(params.serve, params.promote.model_name, api_keys_from(os.environ, keys_file),
                     resolve_precision(params.model.precision))
    served = app.state.champion.current
    print(f"serving {served.name} v{served.version} on http://{host}:{port} (feedback store: {params.serve.database})")
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")
    return 0
