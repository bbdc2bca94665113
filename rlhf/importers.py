"""Importing preference data as comparison rows, one line at a time: a line that cannot be imported is
quarantined with its reason, never the end of the import.

Sources (collect.import_data): a .jsonl / .jsonl.gz / .parquet file, a folder of them, or a hub
dataset id. A Parquet or hub row counts as a line. Shapes (collect.import_format):
- 'hh-rlhf': Anthropic's chosen / rejected transcripts; the prompt is their shared start.
- 'pairs': prompt / chosen / rejected fields (collect.import_*_field).
- 'comparisons': rows already in the comparison schema (a labelling campaign's export).
- 'mapped': collect.import_mapping says where each part of a pair is: nested fields (`meta.question`,
  `answers.0`), two responses with a winner index or label, or with two scores; message-list
  conversations; one row per rater, whose rows of one pair become its votes and agreement.

Every line read ends up in exactly one place, and `account` checks it on each import:
    lines read = lines in the pairs made + lines quarantined
    pairs made = pairs imported + pairs left out by collect.import_limit (a seeded sample)
A quarantined line keeps its file, line number, reason, the raw line (base64 where it is not UTF-8)
and the data set's own id of the row. A file that cannot be read at all (a broken gzip stream, not
Parquet, no permission) stops the import with one paragraph that names the file and the fix.
"""
from __future__ import annotations

import base64
import codecs
import datetime as dt
import gzip
import hashlib
import json
import math
import os
import random
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf.comparisons import COLUMNS
from rlhf.outputs import atomic_path
from rlhf.params import CollectParams, ParamError, _import_mapping_ok

TABLE_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
PARAM = "collect.import_data"

# why a line was not imported: the `reason` of its quarantine row and of the metric collect/import_quarantined/<reason>
REASONS = {
    "blank_line": "the line holds nothing",
    "invalid_utf8": "the line (or a Parquet value) is not valid UTF-8; `raw` holds its bytes in base64",
    "invalid_json": "the line is not valid JSON (cut short, say, or nested too deeply to read)",
    "not_an_object": "the line is JSON, but not an object with named fields",
    "missing_field": "a field the format or the mapping reads is not in the row",
    "null_field": "a field the format or the mapping reads is null",
    "not_text": "a field that must hold a text holds a number, a list, an object or true/false",
    "invalid_text": "a text holds a lone surrogate (\\ud800-\\udfff): valid JSON, but no character, so not storable",
    "too_long": "a text is longer than collect.import_max_chars",
    "mixed_types": "a field holds another type than in the rows before it (an id 7 here, '7' there)",
    "bad_id": "the data set's id is not a text or an integer, or is empty",
    "duplicate_id": "the row's id (its pair_id) was seen before in the same file; the first row is imported",
    "unknown_winner": "the winner field holds a value collect.import_mapping.winner_values does not list",
    "not_a_number": "a score, votes or agreement that must be a number is not one",
    "bad_timestamp": "created_at is not a timestamp",
    "bad_messages": "a message list is empty, or a message lacks a text role or content",
    "no_assistant_turn": "a conversation does not end with the assistant's response",
    "different_prompts": "the two conversations differ before their final assistant messages",
    "no_shared_prompt": "hh-rlhf: the transcripts share no start that ends with an Assistant turn",
    "conflicting_pair": "a rater row's prompt or responses differ from the earlier rows of its pair id",
    "duplicate_vote": "the same rater judged the same pair twice; the first vote counts",
}
QUARANTINE_SCHEMA = pa.schema([
    pa.field("file", pa.string(), nullable=False),          # the file, or 'hub:<dataset id> [<split>]'
    pa.field("line", pa.int64(), nullable=False),           # 1-based line of a JSON Lines file, row of a Parquet file or hub split
    pa.field("reason", pa.string(), nullable=False),        # a key of REASONS
    pa.field("detail", pa.string(), nullable=False),        # the reason with the field and the value
    pa.field("raw", pa.string(), nullable=False),           # the line as read (a Parquet or hub row: its JSON)
    pa.field("raw_encoding", pa.string(), nullable=False),  # 'utf-8', or 'base64' where the bytes are not UTF-8
    pa.field("source_id", pa.string(), nullable=True),      # the data set's own id of the row, where it has one
])
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
ROLE_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}  # a transcript spelled as hh-rlhf's


class RowFault(Exception):
    """Why one line cannot be imported: a key of REASONS and a detail naming the field and the value."""

    def __init__(self, reason: str, detail: str, raw: bytes | None = None):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.detail, self.raw = reason, detail, raw


class Line(NamedTuple):
    """One line of a source: its record, or the fault that leaves it without one."""
    file: str            # where it is, for people: the path, or 'hub:<dataset id> [<split>]'
    name: str            # the file's name in the data set; its rows' source is 'import:<name>'
    number: int          # 1-based line (JSON Lines) or row (Parquet, hub)
    record: dict | None
    raw: bytes | None    # the bytes of a JSON Lines line, without its line break; None for a Parquet or hub row
    fault: RowFault | None


class Imported(NamedTuple):
    rows: pd.DataFrame        # the comparison schema (rlhf/comparisons.py)
    quarantine: pd.DataFrame  # QUARANTINE_SCHEMA
    metrics: dict


# ------------------------------------------------------------------------------------------------
# Reading files line by line
# ------------------------------------------------------------------------------------------------

def iter_lines(source: str, hub_split: str, param: str = PARAM) -> Iterator[Line]:
    """Every line of `source` (a .jsonl/.jsonl.gz/.parquet file, a folder of them, or a hub id), parsed or faulted.

    A file's name is its folder and its path without suffixes (hh-rlhf/helpful-base/test); `param`
    names the setting in error messages.
    """
    files = local_files(source, param)
    if files is None:
        yield from _hub_lines(source, hub_split, param)
        return
    for name, path in files:
        yield from (_parquet_lines if path.name.endswith(".parquet") else _jsonl_lines)(path, name, param)


def local_files(source: str, param: str) -> list[tuple[str, Path]] | None:
    """(name, path) of each data file of a local `source`; None when `source` is a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith(TABLE_SUFFIXES))
        except PermissionError as error:
            raise ParamError(_unreadable(param, Path(error.filename or path), error, 0)) from None
        if not files:
            raise ParamError(f"{param} is '{source}', a folder with no {', '.join(TABLE_SUFFIXES)} file in it. "
                             "Point it at a data file, or at a folder that holds some.")
        return [(f"{path.resolve().name}/{_without_suffix(f.relative_to(path).as_posix())}", f) for f in files]
    if path.is_file():
        if not path.name.endswith(TABLE_SUFFIXES):
            raise ParamError(f"{param} is '{source}': a {path.suffix or 'suffix-less'} file. Use {', '.join(TABLE_SUFFIXES)}.")
        return [(f"{path.resolve().parent.name}/{_without_suffix(path.name)}", path)]
    if source.startswith((".", "/", "~")) or source.endswith(TABLE_SUFFIXES):
        raise ParamError(f"{param} is '{source}', but no file or folder is there. Fix the path (it is read from the project root).")
    return None


def _without_suffix(name: str) -> str:
    for suffix in TABLE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _jsonl_lines(path: Path, name: str, param: str) -> Iterator[Line]:
    compressed, number = path.name.endswith(".gz"), 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            if not compressed and f.read(2) == b"\x1f\x8b":
                raise ParamError(f"{param}: {path} is gzip-compressed, but its name ends in .jsonl. Rename it to "
                                 f"{path.name}.gz (or decompress it with `gunzip -c`), then run again.")
            f.seek(0)
            for number, raw in enumerate(f, start=1):
                yield parse_line(str(path), name, number, raw)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise ParamError(_unreadable(param, path, error, number)) from None


def parse_line(file: str, name: str, number: int, raw: bytes) -> Line:
    """One JSON Lines line: an object, or the fault that keeps it out."""
    body = raw.rstrip(b"\r\n")
    if number == 1 and body.startswith(codecs.BOM_UTF8):  # Windows tools start UTF-8 files with a byte-order mark
        body = body[len(codecs.BOM_UTF8):]

    def fault(reason, detail):
        return Line(file, name, number, None, body, RowFault(reason, detail))

    if not body.strip():
        return fault("blank_line", "the line is blank")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        return fault("invalid_utf8", f"not valid UTF-8: byte {error.start} of the line is 0x{body[error.start]:02x}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return fault("invalid_json", f"not valid JSON ({error.msg}, character {error.pos} of the line)")
    except RecursionError:
        return fault("invalid_json", "JSON nested too deeply to read")
    if not isinstance(value, dict):
        return fault("not_an_object", f"the line is {_kind(value)} in JSON, not an object with named fields")
    return Line(file, name, number, value, body, None)


def _parquet_lines(path: Path, name: str, param: str) -> Iterator[Line]:
    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            try:
                records = batch.to_pylist()
            except (UnicodeDecodeError, pa.ArrowException):  # a text that is not UTF-8: find its row
                records = None
            for i in range(batch.num_rows):
                number += 1
                yield (Line(str(path), name, number, records[i], None, None) if records is not None
                       else _parquet_row(str(path), name, number, batch.slice(i, 1)))
    except (OSError, pa.ArrowException) as error:
        raise ParamError(_unreadable(param, path, error, number)) from None


def _parquet_row(file: str, name: str, number: int, row: pa.RecordBatch) -> Line:
    try:
        return Line(file, name, number, row.to_pylist()[0], None, None)
    except (UnicodeDecodeError, pa.ArrowException):
        pass
    for column, values in zip(row.schema.names, row.columns):
        try:
            values.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):
            as_bytes = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}.get(values.type)
            raw = values.view(as_bytes).to_pylist()[0] if as_bytes is not None else b""
            return Line(file, name, number, None, None,
                        RowFault("invalid_utf8", f"field `{column}` is not valid UTF-8", raw=raw))
    raise AssertionError(f"{file}, row {number}: no column fails to convert, but the row does")


def _hub_lines(source: str, split: str, param: str) -> Iterator[Line]:
    try:
        import datasets

        rows = datasets.load_dataset(source, split=split)
    except Exception as error:  # the hub client raises many kinds; all mean the same to the user
        raise ParamError(
            f"{param} is '{source}', taken as a Hugging Face hub dataset id, and loading split '{split}' failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Offline, export the data set "
            f"to a local .jsonl or .parquet file and point {param} at it."
        ) from None
    for number, record in enumerate(rows, start=1):
        yield Line(f"hub:{source} [{split}]", source, number, dict(record), None, None)


def _unreadable(param: str, path: Path, error: Exception, lines_read: int) -> str:
    """One paragraph for a file that cannot be read at all."""
    after = f", after line {lines_read}" if lines_read else ""
    if isinstance(error, PermissionError):
        return (f"{param}: cannot read {path}: permission denied. Give the user who runs the pipeline read access "
                f"(for example `chmod a+r {path}`), or copy the file somewhere readable and point {param} at the copy.")
    if path.name.endswith(".gz"):
        return (f"{param}: {path} is not a readable gzip file ({type(error).__name__}: {error}{after}). It is cut short "
                f"or corrupt, or not gzip-compressed despite its .gz suffix. Check it with `gzip -t {path}`, then download "
                "or compress it again (a plain JSON Lines file should end in .jsonl).")
    if path.name.endswith(".parquet"):
        return (f"{param}: {path} is not a readable Parquet file ({type(error).__name__}: {error}{after}). It is cut "
                "short or corrupt, or not Parquet despite its suffix. Write it again (pandas: `frame.to_parquet(path)`), "
                "or export its rows to a .jsonl file and point the param at that.")
    return (f"{param}: cannot read {path} ({type(error).__name__}: {error}{after}). Check that it is a readable file, "
            "then run again.")


def read_records(source: str, hub_split: str, param: str) -> list[tuple[str, list[dict]]]:
    """(name, records) for each file of `source`, for sources that must be whole (the prompt pool): a bad line
    stops the run with its file and line; blank lines are skipped."""
    files: dict[str, list[dict]] = {}
    for line in iter_lines(source, hub_split, param):
        if line.fault is None:
            files.setdefault(line.name, []).append(line.record)
        elif line.fault.reason != "blank_line":
            raise ParamError(f"{line.file}, line {line.number}: {line.fault.detail}. {param} is read whole: fix or "
                             "remove the line (JSON Lines must be UTF-8, one object per line).")
    return list(files.items())


# ------------------------------------------------------------------------------------------------
# Reading the parts of a pair from a row
# ------------------------------------------------------------------------------------------------

def value_at(record: dict, path: str) -> Any:
    """The value at a dotted path: `meta.question`, `answers.0` (a list index; -1 is the last). A key that
    itself holds dots is read first."""
    if path in record:
        return record[path]
    value = record
    for step in path.split("."):
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.lstrip("-").isdigit() and -len(value) <= int(step) < len(value):
            value = value[int(step)]
        else:
            raise RowFault("missing_field", f"no `{path}` in the row (its fields: {_fields(record)})")
    return value


def text_value(value: Any, path: str, max_chars: int) -> str:
    if value is None:
        raise RowFault("null_field", f"`{path}` is null")
    if not isinstance(value, str):
        raise RowFault("not_text", f"`{path}` is {_kind(value)} {_show(value)}, not a text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RowFault("invalid_text", f"`{path}` holds the lone surrogate \\u{ord(value[error.start]):04x} at "
                                       f"character {error.start}, which is no character") from None
    if len(value) > max_chars:
        raise RowFault("too_long", f"`{path}` has {len(value):,} characters, more than collect.import_max_chars "
                                   f"({max_chars:,})")
    return value


def conversation(value: list, path: str, max_chars: int) -> list[tuple[str, str]]:
    """(role, text) of each message of an OpenAI-style message list: [{role, content}, ...]; a content given as
    parts keeps its text parts."""
    if not value:
        raise RowFault("bad_messages", f"`{path}` is an empty message list")
    messages = []
    for i, message in enumerate(value):
        at = f"{path}.{i}"
        if not isinstance(message, dict):
            raise RowFault("bad_messages", f"`{at}` is {_kind(message)} {_show(message)}, not a message {{role, content}}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RowFault("bad_messages", f"`{at}.role` is {_show(role)}; a message needs a role such as 'user' or 'assistant'")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise RowFault("bad_messages", f"`{at}.content` holds parts other than text ({_show(content)}); only text is imported")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RowFault("bad_messages", f"`{at}.content` is {_kind(content)} {_show(content)}, not a text")
        messages.append((role, text_value(content, f"{at}.content", max_chars)))
    return messages


def render_conversation(messages: list[tuple[str, str]]) -> str:
    """A prompt as a text: one user message is its text; a longer conversation is a transcript in hh-rlhf's
    spelling ("Human: …\\n\\nAssistant: …"), as the hh-rlhf importer writes multi-turn prompts."""
    if len(messages) == 1 and messages[0][0] == "user":
        return messages[0][1]
    return "\n\n".join(f"{ROLE_LABELS.get(role, role.capitalize())}: {text}" for role, text in messages)


def response_at(record: dict, path: str, max_chars: int) -> tuple[str, list[tuple[str, str]] | None]:
    """A response's text, and the conversation before it when the field holds a message list (the response is
    its final message, which must be the assistant's)."""
    value = value_at(record, path)
    if isinstance(value, list):
        messages = conversation(value, path, max_chars)
        role = messages[-1][0]
        if role != "assistant":
            raise RowFault("no_assistant_turn", f"`{path}` ends with a '{role}' message, not the assistant's response")
        return messages[-1][1], messages[:-1]
    return text_value(value, path, max_chars), None


def prompt_at(record: dict, path: str, max_chars: int) -> str:
    value = value_at(record, path)
    prompt = render_conversation(conversation(value, path, max_chars)) if isinstance(value, list) else value
    return text_value(prompt, path, max_chars)


def shared_prompt(before_first, before_second, first: str, second: str, max_chars: int) -> str:
    """The prompt of two conversations: what comes before their final assistant messages, which must be the same."""
    for path, before in ((first, before_first), (second, before_second)):
        if before is None:
            raise RowFault("missing_field", f"collect.import_mapping names no `prompt`, and `{path}` is a text, not a "
                                            "conversation to take the prompt from: map `prompt` to the prompt's field")
    if before_first != before_second:
        raise RowFault("different_prompts", f"the conversations in `{first}` and `{second}` differ before their final "
                                            "assistant messages, so the two responses do not answer one prompt")
    return text_value(render_conversation(before_first) if before_first else "", f"{first} (before its response)", max_chars)


def _consistent(value: Any, path: str, kinds: dict, where: str) -> None:
    """A field keeps the type it had in the first row that held it (an id 7 and an id '7' would be one pair)."""
    kind = _kind(value)
    first_kind, first_where = kinds.setdefault(path, (kind, where))
    if kind != first_kind:
        raise RowFault("mixed_types", f"`{path}` is {kind} {_show(value)} here, but {first_kind} at {first_where}")


def source_id_at(record: dict, paths: tuple[str, ...], max_chars: int, kinds: dict, where: str) -> str:
    """The data set's own id of a row: the values at `paths`, joined with '/'."""
    parts = []
    for path in paths:
        value = value_at(record, path)
        if value is None:
            raise RowFault("null_field", f"`{path}` (the id) is null")
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise RowFault("bad_id", f"`{path}` (the id) is {_kind(value)} {_show(value)}; an id must be a text or an integer")
        if isinstance(value, str):
            text_value(value, path, max_chars)
        _consistent(value, path, kinds, where)
        parts.append(str(value))
    return "/".join(parts)


def winner_at(record: dict, path: str, values: dict, kinds: dict, where: str) -> str:
    """'a', 'b' or 'tie' from the winner field, through collect.import_mapping.winner_values."""
    value = value_at(record, path)
    if value is None:
        raise RowFault("null_field", f"`{path}` (the winner) is null")
    if not isinstance(value, (str, int, float, bool)):
        raise RowFault("unknown_winner", f"`{path}` (the winner) is {_kind(value)} {_show(value)}, not a label or an index")
    _consistent(value, path, kinds, where)
    for key, label in values.items():
        if type(key) is type(value) and key == value:  # True is not 1, '1' is not 1
            return label
    raise RowFault("unknown_winner", f"`{path}` is {_show(value)}, which collect.import_mapping.winner_values does not "
                                     f"list (it lists {', '.join(_show(k) for k in values)}); add it there")


def score_at(record: dict, path: str) -> float:
    value = value_at(record, path)
    if value is None:
        raise RowFault("null_field", f"`{path}` (a score) is null")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowFault("not_a_number", f"`{path}` (a score) is {_kind(value)} {_show(value)}, not a finite number")
    return float(value)


def rater_at(record: dict, path: str, kinds: dict, where: str) -> str:
    value = value_at(record, path)
    if value is None:
        raise RowFault("null_field", f"`{path}` (the rater) is null")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowFault("not_text", f"`{path}` (the rater) is {_kind(value)} {_show(value)}, not a text or an integer")
    _consistent(value, path, kinds, where)
    return str(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    return {str: "a text", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}")


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _fields(record: dict) -> str:
    keys = [str(k) for k in record]
    return ", ".join(keys[:12]) + (f" and {len(keys) - 12} more" if len(keys) > 12 else "") if keys else "none"


# ------------------------------------------------------------------------------------------------
# The shapes
# ------------------------------------------------------------------------------------------------

class Judged(NamedTuple):
    """A row read as a pair: the prompt, two responses and the label."""
    prompt: str
    response_a: str
    response_b: str
    chosen: str | None  # 'a' | 'b' | 'tie'; None: response_a is the preferred one, placed later by `place_pair`
    rater: str | None


def split_hh_transcript(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen reply, rejected reply) of an hh-rlhf pair, or None when the two transcripts share no
    prompt that ends with an Assistant turn.

    The prompt is the shared prefix up to its last "\\n\\nAssistant:"; each reply is what follows it
    (a reply that itself runs on into more turns keeps them). A one-question prompt loses its
    "Human:" label; a longer conversation stays a transcript.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    prompt = chosen[:cut]
    if prompt.count(HH_HUMAN) == 1 and prompt.startswith(HH_HUMAN) and HH_ASSISTANT not in prompt:
        prompt = prompt[len(HH_HUMAN):]
    start = cut + len(HH_ASSISTANT)
    return prompt.strip(), chosen[start:].strip(), rejected[start:].strip()


def place_pair(pair_id: str, chosen, rejected, seed: int) -> tuple[object, object, str]:
    """(response_a, response_b, label): the preferred response goes first or second by a seeded hash of the
    pair id, so imported labels are balanced across positions (data sets store the preferred one first)."""
    if hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[0] % 2 == 0:
        return chosen, rejected, "a"
    return rejected, chosen, "b"


def hh_judged(record: dict, params: CollectParams) -> Judged:
    chosen, rejected = (text_value(value_at(record, path), path, params.import_max_chars)
                        for path in (params.import_chosen_field, params.import_rejected_field))
    parts = split_hh_transcript(chosen, rejected)
    if parts is None:
        raise RowFault("no_shared_prompt", "the chosen and rejected transcripts share no start that ends with an "
                                           "'\\n\\nAssistant:' turn, so no prompt can be cut from them")
    return Judged(*parts, None, None)


def mapped_judged(record: dict, mapping: dict, max_chars: int, kinds: dict, where: str) -> Judged:
    """A row read through collect.import_mapping (import_format 'pairs' is the mapping prompt/chosen/rejected)."""
    first, second = ("chosen", "rejected") if "chosen" in mapping else ("response_a", "response_b")
    text_first, before_first = response_at(record, mapping[first], max_chars)
    text_second, before_second = response_at(record, mapping[second], max_chars)
    prompt = (prompt_at(record, mapping["prompt"], max_chars) if "prompt" in mapping
              else shared_prompt(before_first, before_second, mapping[first], mapping[second], max_chars))
    if first == "chosen":
        return Judged(prompt, text_first, text_second, None, None)
    if "winner" in mapping:
        chosen = winner_at(record, mapping["winner"], mapping["winner_values"], kinds, where)
    else:
        score_a, score_b = score_at(record, mapping["score_a"]), score_at(record, mapping["score_b"])
        chosen = "a" if score_a > score_b else "b" if score_b > score_a else "tie"
    rater = rater_at(record, mapping["rater"], kinds, where) if "rater" in mapping else None
    return Judged(prompt, text_first, text_second, chosen, rater)


def comparison_row(record: dict, max_chars: int) -> dict:
    """A row already in the comparison schema, each value checked against its column's type."""
    row = {}
    for column, (arrow_type, nullable, _) in COLUMNS.items():
        value = record.get(column)
        if value is None:
            if not nullable:
                raise RowFault("missing_field" if column not in record else "null_field",
                               f"`{column}` is {'missing' if column not in record else 'null'}; the comparison schema needs it")
            row[column] = None
        elif pa.types.is_string(arrow_type):
            row[column] = text_value(value, column, max_chars)
        elif pa.types.is_integer(arrow_type):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                raise RowFault("not_a_number", f"`{column}` is {_kind(value)} {_show(value)}, not a whole number")
            row[column] = int(value)
        elif pa.types.is_floating(arrow_type):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RowFault("not_a_number", f"`{column}` is {_kind(value)} {_show(value)}, not a finite number")
            row[column] = float(value)
        else:  # created_at
            row[column] = _timestamp(value, column)
    return row


def _timestamp(value: Any, column: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(value) if isinstance(value, (str, dt.datetime, pd.Timestamp)) else None
    except (ValueError, OverflowError):
        stamp = None
    if stamp is None or pd.isna(stamp):
        raise RowFault("bad_timestamp", f"`{column}` is {_kind(value)} {_show(value)}, not a timestamp such as "
                                        "'2026-01-31T12:00:00Z'")
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def majority(votes: list[str]) -> tuple[str, float]:
    """(chosen, agreement) of one pair's votes: the vote given most often, 'tie' when several share the top
    count; agreement is the share of votes equal to chosen (a 1-1 split is a tie with agreement 0)."""
    counts = Counter(votes)
    top = max(counts.values())
    leaders = [vote for vote, count in counts.items() if count == top]
    chosen = leaders[0] if len(leaders) == 1 else "tie"
    return chosen, counts[chosen] / len(votes)


def import_mapping(params: CollectParams) -> dict | None:
    """The mapping the import reads rows through: collect.import_mapping for 'mapped', prompt/chosen/rejected
    for 'pairs', None for 'hh-rlhf' and 'comparisons' (which have their own readers)."""
    mapping = params.import_mapping or {}
    if params.import_format != "mapped":
        if mapping:
            raise ParamError(f"params.yaml: collect.import_mapping is set, but collect.import_format is "
                             f"'{params.import_format}', which does not read it (only 'mapped' does). Set "
                             "collect.import_format to mapped to import through the mapping, or remove collect.import_mapping.")
        if params.import_format == "pairs":
            return {"prompt": params.import_prompt_field, "chosen": params.import_chosen_field,
                    "rejected": params.import_rejected_field}
        return None
    if not mapping:
        raise ParamError("params.yaml: collect.import_format is 'mapped', but collect.import_mapping is empty. Name the "
                         "field of each part of a pair, for example `import_mapping: {prompt: question, chosen: good, "
                         "rejected: bad}` (README, 'Importing preference data'), or pick another import_format.")
    _import_mapping_ok(mapping)  # CollectParams made in code skip params.yaml's load-time check
    return mapping


# ------------------------------------------------------------------------------------------------
# The import
# ------------------------------------------------------------------------------------------------

def account(lines_read: int, lines_in_pairs: int, lines_quarantined: int, pairs_made: int, pairs_imported: int,
            pairs_dropped: int) -> None:
    """Raise unless every line read is in a pair or in the quarantine, and every pair made is imported or
    left out by the limit: the import's promise, so a failure here is a bug."""
    if lines_read != lines_in_pairs + lines_quarantined:
        raise AssertionError(f"import: lines read {lines_read} != lines in pairs {lines_in_pairs} + lines quarantined "
                             f"{lines_quarantined}")
    if pairs_made != pairs_imported + pairs_dropped:
        raise AssertionError(f"import: pairs made {pairs_made} != pairs imported {pairs_imported} + pairs left out by "
                             f"collect.import_limit {pairs_dropped}")


def import_comparisons(params: CollectParams, created_at: pd.Timestamp) -> Imported:
    """Rows of the comparison schema from collect.import_data, the quarantined lines, and the counts."""
    if not params.import_data:
        raise ParamError("params.yaml: collect.sources includes 'import', but collect.import_data is empty. Point it at a "
                         "file, a folder or a hub dataset id (for example ../shared/data/hh-rlhf), or drop 'import'.")
    mapping = import_mapping(params)
    id_paths = _id_paths(params, mapping)
    pairs: dict[tuple[str, str], dict] = {}  # (file name, key) -> {"row", "lines", "votes", "raters", "where"}
    quarantine, kinds, lines_read = [], {}, 0
    for line in iter_lines(params.import_data, params.hub_split, PARAM):
        lines_read += 1
        typed = set(kinds)
        try:
            if line.fault is not None:
                raise line.fault
            _take(line, params, mapping, id_paths, kinds, pairs, created_at)
        except RowFault as fault:
            for path in set(kinds) - typed:  # a field's type is set by the first row that is imported
                del kinds[path]
            quarantine.append(_quarantine_row(line, fault, id_paths))

    made = list(pairs.values())
    for pair in made:
        if pair["votes"] is not None:  # one row per rater: the pair's label is their majority
            pair["row"]["chosen"], pair["row"]["agreement"] = majority(pair["votes"])
            pair["row"]["votes"] = len(pair["votes"])
    kept = made
    if params.import_limit and params.import_limit < len(made):
        kept = [made[i] for i in sorted(random.Random(params.seed).sample(range(len(made)), params.import_limit))]
    account(lines_read, sum(p["lines"] for p in made), len(quarantine), len(made), len(kept), len(made) - len(kept))
    if not made:
        raise ParamError(_nothing_imported(params, lines_read, quarantine))

    rows = pd.DataFrame([p["row"] for p in kept], columns=list(COLUMNS))
    quarantined = (pd.DataFrame(quarantine, columns=QUARANTINE_SCHEMA.names) if quarantine
                   else QUARANTINE_SCHEMA.empty_table().to_pandas())
    reasons = Counter(q["reason"] for q in quarantine)
    metrics = {
        "collect/import_lines": lines_read,
        "collect/import_quarantined": len(quarantine),
        **{f"collect/import_quarantined/{reason}": n for reason, n in sorted(reasons.items())},
        "collect/import_rater_rows_merged": sum(p["lines"] for p in made) - len(made),
        "collect/import_available": len(made),
        "collect/import_dropped_by_limit": len(made) - len(kept),
        "collect/imported": len(kept),
    }
    return Imported(rows, quarantined, metrics)


def _id_paths(params: CollectParams, mapping: dict | None) -> tuple[str, ...]:
    if params.import_format == "comparisons":
        return ("pair_id",)
    value = (mapping or {}).get("id")
    return tuple(value) if isinstance(value, list) else (value,) if value else ()


def _take(line: Line, params: CollectParams, mapping: dict | None, id_paths: tuple[str, ...], kinds: dict,
          pairs: dict, created_at: pd.Timestamp) -> None:
    """Put one parsed line into `pairs`, or raise RowFault."""
    record, where = line.record, f"{line.file} line {line.number}"
    if params.import_format == "comparisons":
        row = comparison_row(record, params.import_max_chars)
        _add(pairs, (line.name, row["pair_id"]), row, where, row["pair_id"])
        return
    source_id = source_id_at(record, id_paths, params.import_max_chars, kinds, where) if id_paths else None
    judged = (hh_judged(record, params) if mapping is None
              else mapped_judged(record, mapping, params.import_max_chars, kinds, where))
    if judged.rater is None:
        pair_id = f"{line.name}:{source_id if source_id is not None else line.number}"
        a, b, chosen = ((judged.response_a, judged.response_b, judged.chosen) if judged.chosen is not None
                        else place_pair(pair_id, judged.response_a, judged.response_b, params.seed))
        _add(pairs, (line.name, pair_id), _row(pair_id, judged.prompt, a, b, chosen, line.name, created_at), where, source_id)
        return
    # one row per rater: rows with one id (or, without an id, with the same prompt and responses) are one pair
    key = source_id if source_id is not None else hashlib.sha256(
        "\x00".join((judged.prompt, *sorted((judged.response_a, judged.response_b)))).encode()).hexdigest()[:16]
    pair = pairs.get((line.name, key))
    if pair is None:
        row = _row(f"{line.name}:{key}", judged.prompt, judged.response_a, judged.response_b, None, line.name, created_at)
        pairs[(line.name, key)] = {"row": row, "lines": 1, "votes": [judged.chosen], "raters": {judged.rater},
                                   "where": where}
        return
    row, vote = pair["row"], judged.chosen
    if (judged.prompt, judged.response_a, judged.response_b) == (row["prompt"], row["response_b"], row["response_a"]) \
            and judged.response_a != judged.response_b:
        vote = {"a": "b", "b": "a", "tie": "tie"}[vote]  # this rater saw the pair in the other order
    elif (judged.prompt, judged.response_a, judged.response_b) != (row["prompt"], row["response_a"], row["response_b"]):
        raise RowFault("conflicting_pair", f"id {source_id!r} has another prompt or other responses at {pair['where']}")
    if judged.rater in pair["raters"]:
        raise RowFault("duplicate_vote", f"rater {judged.rater!r} already judged this pair at {pair['where']}")
    pair["raters"].add(judged.rater)
    pair["votes"].append(vote)
    pair["lines"] += 1


def _row(pair_id: str, prompt: str, a: str, b: str, chosen: str | None, name: str, created_at: pd.Timestamp) -> dict:
    return {"pair_id": pair_id, "prompt": prompt, "response_a": a, "response_b": b, "chosen": chosen,
            "source": f"import:{name}", "policy_version": None, "votes": None, "agreement": None, "created_at": created_at}


def _add(pairs: dict, key: tuple[str, str], row: dict, where: str, source_id: str | None) -> None:
    if key in pairs:
        raise RowFault("duplicate_id", f"the id {source_id!r} is also at {pairs[key]['where']}, which is imported")
    pairs[key] = {"row": row, "lines": 1, "votes": None, "where": where}


def _quarantine_row(line: Line, fault: RowFault, id_paths: tuple[str, ...]) -> dict:
    raw = fault.raw if fault.raw is not None else line.raw
    if raw is None:  # a Parquet or hub row: its values as JSON
        text, encoding = json.dumps(line.record, ensure_ascii=False, default=str), "utf-8"
    else:
        try:
            text, encoding = raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return {"file": _storable(line.file), "line": line.number, "reason": fault.reason, "detail": _storable(fault.detail),
            "raw": _storable(text), "raw_encoding": encoding, "source_id": _id_of(line.record, id_paths)}


def _id_of(record: dict | None, id_paths: tuple[str, ...]) -> str | None:
    """The row's own id as far as it can be read, for its quarantine row."""
    if record is None or not id_paths:
        return None
    parts = []
    for path in id_paths:
        try:
            value = value_at(record, path)
        except RowFault:
            return None
        if value is None or isinstance(value, (bool, dict, list)):
            return None
        parts.append(_storable(str(value)))
    return "/".join(parts)


def _storable(text: str) -> str:
    """A text Parquet can store: a lone surrogate (valid in JSON, not in UTF-8) written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _nothing_imported(params: CollectParams, lines_read: int, quarantine: list[dict]) -> str:
    if not lines_read:
        return (f"{PARAM} is '{params.import_data}', which holds no rows. Point it at the data set's files (or check "
                "collect.hub_split for a hub id), or drop 'import' from collect.sources.")
    reasons = ", ".join(f"{reason}: {n}" for reason, n in Counter(q["reason"] for q in quarantine).most_common())
    first = quarantine[0]
    return (f"{PARAM}: none of the {lines_read} lines of '{params.import_data}' could be imported ({reasons}); the "
            f"first, {first['file']} line {first['line']}: {first['detail']}. When every line fails alike, the format "
            f"does not fit the data: check collect.import_format ('{params.import_format}') and the field settings "
            "(collect.import_mapping, import_*_field) against one row of the file (README, 'Importing preference data').")


def quarantine_table(frame: pd.DataFrame) -> pa.Table:
    """The quarantine's rows as a table of QUARANTINE_SCHEMA."""
    return pa.Table.from_pandas(frame[QUARANTINE_SCHEMA.names], schema=QUARANTINE_SCHEMA, preserve_index=False)


def write_quarantine(frame: pd.DataFrame, path: str | Path) -> None:
    """Write the import quarantine atomically and durably (rlhf.outputs.atomic_path)."""
    table = quarantine_table(frame)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
