"""Importing preference data: every fault quarantined with its reason and line, every line accounted for, the
mapping shapes (nested fields, winner index or label, scores, message lists, one row per rater, ties), the
README's worked examples, and a mixed-fault file through the `collect` stage itself."""
from __future__ import annotations

import base64
import gzip
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rlhf import importers
from rlhf.comparisons import CHOICES, SCHEMA, to_table
from rlhf.importers import REASONS, account, import_comparisons, majority, render_conversation, value_at
from rlhf.params import CollectParams, ParamError, load_params

REPO = Path(__file__).resolve().parents[1]
NOW = pd.Timestamp("2026-01-01", tz="UTC")


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item a dict (written as JSON) or bytes (written as they are); one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((item if isinstance(item, bytes) else json.dumps(item).encode()) + b"\n" for item in lines))
    return path


def mapped(path: Path, mapping: dict, **more) -> CollectParams:
    return CollectParams(sources=["import"], import_data=str(path), import_format="mapped", import_mapping=mapping, **more)


def chat(*turns: str) -> list[dict]:
    """An OpenAI-style message list, user and assistant in turn."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


# ---- the mixed-fault file: good rows among every kind of fault -------------------------------

NESTED = {"id": "id", "prompt": "meta.question", "response_a": "answers.0", "response_b": "answers.1",
          "winner": "preferred", "winner_values": {0: "a", 1: "b", 2: "tie"}}
MAX_CHARS = 1000


def good(i: int, preferred: int = 0, **fields) -> dict:
    return {"id": i, "meta": {"question": f"question {i}?", "lang": "en"},
            "answers": [f"a careful answer {i}", f"a short answer {i}"], "preferred": preferred, **fields}


def mixed_lines() -> list[tuple[bytes | dict, str | None]]:
    """(line, the reason it is quarantined for, or None when it is imported)."""
    return [
        (good(1, 0), None),
        (good(2, 1), None),
        (b"", "blank_line"),
        (b'{"id": 4, "meta": {"question": "cut sh', "invalid_json"),                                  # truncated
        ('{"id": 5, "meta": {"question": "caf\xe9?"}}'.encode("latin-1"), "invalid_utf8"),            # not UTF-8
        (b"[1, 2, 3]", "not_an_object"),
        (b"[" * 100_000, "invalid_json"),                                                              # too deep
        (good(8, 2, answers=[chat("hi", "a reply in a conversation"), "plain answer 8"]), None),       # a tie
        ({**good(9), "meta": {"lang": "en"}}, "missing_field"),
        ({**good(10), "meta": {"question": None}}, "null_field"),
        ({**good(11), "answers": [42, "x"]}, "not_text"),
        (b'{"id": 12, "meta": {"question": "q\\ud800?"}, "answers": ["x", "y"], "preferred": 0}', "invalid_text"),
        ({**good(13), "answers": ["x" * (MAX_CHARS + 1), "y"]}, "too_long"),
        ({**good(14), "id": "14"}, "mixed_types"),                                                     # ids are integers
        ({**good(15), "preferred": "1"}, "mixed_types"),                                               # winners too
        ({**good(16), "id": [16]}, "bad_id"),
        (good(1, 1), "duplicate_id"),
        (good(18, 5), "unknown_winner"),
        ({**good(19), "answers": [chat("hi"), "x"]}, "no_assistant_turn"),
        ({**good(20), "answers": [[{"role": "assistant"}], "x"]}, "bad_messages"),
        (b"null", "not_an_object"),
        (good(22, 1), None),
        (good(23, 0), None),
        (good(24, 2), None),
    ]


def write_mixed(path: Path) -> list[str | None]:
    lines = mixed_lines()
    write_jsonl(path, [line for line, _ in lines])
    return [reason for _, reason in lines]


def test_each_fault_is_quarantined_with_its_reason_and_line(tmp_path):
    expected = write_mixed(tmp_path / "mixed.jsonl")
    rows, quarantine, metrics = import_comparisons(mapped(tmp_path / "mixed.jsonl", NESTED, import_max_chars=MAX_CHARS), NOW)

    assert quarantine[["line", "reason"]].values.tolist() == [[n, r] for n, r in enumerate(expected, 1) if r]
    assert set(quarantine["file"]) == {str(tmp_path / "mixed.jsonl")}
    assert rows["pair_id"].tolist() == [f"{tmp_path.name}/mixed:{i}" for i in (1, 2, 8, 22, 23, 24)]
    assert rows["chosen"].tolist() == ["a", "b", "tie", "b", "a", "tie"]  # the data set's order and labels, ties kept
    assert rows.loc[2, "response_a"] == "a reply in a conversation"
    assert metrics["collect/import_lines"] == len(expected) == len(rows) + len(quarantine)
    assert {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("collect/import_quarantined/")} \
        == dict(Counter(r for r in expected if r))

    by_line = quarantine.set_index("line")
    # the raw line is kept: as text where it is UTF-8, as base64 of its bytes where it is not
    assert base64.b64decode(by_line.loc[5, "raw"]) == mixed_lines()[4][0] and by_line.loc[5, "raw_encoding"] == "base64"
    assert by_line.loc[4, "raw"] == '{"id": 4, "meta": {"question": "cut sh' and by_line.loc[4, "raw_encoding"] == "utf-8"
    assert "nested too deeply" in by_line.loc[7, "detail"]
    # the data set's own id, wherever the row has one
    assert by_line.loc[11, "source_id"] == "11" and by_line.loc[17, "source_id"] == "1" and pd.isna(by_line.loc[3, "source_id"])
    assert "`meta.question` is null" in by_line.loc[10, "detail"]
    assert "`answers.0` is an integer 42, not a text" in by_line.loc[11, "detail"]
    assert "1,001 characters, more than collect.import_max_chars (1,000)" in by_line.loc[13, "detail"]
    assert "`id` is a text '14' here, but an integer at" in by_line.loc[14, "detail"]
    assert "line 1, which is imported" in by_line.loc[17, "detail"]
    assert "winner_values does not list" in by_line.loc[18, "detail"]
    assert "\\ud800" in by_line.loc[12, "raw"]  # storable: the JSON escape as written
    # the quarantine is a valid Parquet file of its schema
    importers.write_quarantine(quarantine, tmp_path / "q.parquet")
    assert pq.read_schema(tmp_path / "q.parquet").remove_metadata() == importers.QUARANTINE_SCHEMA
    to_table(rows)  # and the rows fit the comparison schema


def test_a_field_type_is_set_by_the_first_imported_row_not_by_a_quarantined_one(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{**good(1), "answers": [None, "x"], "id": "one"}, good(2), good(3)])
    rows, quarantine, _ = import_comparisons(mapped(path, NESTED), NOW)
    assert quarantine["reason"].tolist() == ["null_field"] and len(rows) == 2


def test_the_count_check_fails_when_a_line_is_lost(tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match="lines read 5 != lines in pairs 3 \\+ lines quarantined 1"):
        account(5, 3, 1, 3, 3, 0)
    with pytest.raises(AssertionError, match="pairs made 3 != pairs imported 2"):
        account(4, 3, 1, 3, 2, 0)
    account(4, 3, 1, 3, 2, 1)

    path = write_jsonl(tmp_path / "pairs.jsonl", [good(i) for i in range(1, 6)])
    take = importers._take

    def loses_line_3(line, *args):
        if line.number != 3:
            take(line, *args)

    monkeypatch.setattr(importers, "_take", loses_line_3)
    with pytest.raises(AssertionError, match="lines read 5 != lines in pairs 4 \\+ lines quarantined 0"):
        import_comparisons(mapped(path, NESTED), NOW)


def test_the_limit_drops_pairs_counted_apart_from_the_quarantine(tmp_path):
    expected = write_mixed(tmp_path / "mixed.jsonl")
    params = mapped(tmp_path / "mixed.jsonl", NESTED, import_max_chars=MAX_CHARS, import_limit=4, seed=3)
    rows, quarantine, m = import_comparisons(params, NOW)
    assert (m["collect/imported"], m["collect/import_dropped_by_limit"], m["collect/import_quarantined"]) == (4, 2, 18)
    assert m["collect/import_lines"] == len(expected) == m["collect/imported"] + m["collect/import_dropped_by_limit"] \
        + m["collect/import_quarantined"]
    assert rows["pair_id"].tolist() == import_comparisons(params, NOW).rows["pair_id"].tolist()  # seeded


def test_pair_ids_keep_the_data_sets_ids_and_are_stable(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [good(7), good(3), good(12)])
    first = import_comparisons(mapped(path, NESTED), NOW).rows
    assert first["pair_id"].tolist() == [f"{tmp_path.name}/set:{i}" for i in (7, 3, 12)]
    write_jsonl(path, [good(12), good(99), good(7), good(3)])  # reordered, one row more
    again = import_comparisons(mapped(path, NESTED), NOW).rows.set_index("pair_id")
    assert again.loc[first["pair_id"], "chosen"].tolist() == first["chosen"].tolist()
    # ids of several fields, joined
    composite = import_comparisons(mapped(path, {**NESTED, "id": ["id", "meta.lang"]}), NOW).rows
    assert composite["pair_id"].tolist()[0] == f"{tmp_path.name}/set:12/en"


def test_dotted_paths_reach_nested_fields_and_list_items():
    record = {"meta": {"question": "q"}, "answers": ["x", {"text": "y"}], "a.b": "literal"}
    assert value_at(record, "meta.question") == "q"
    assert value_at(record, "answers.1.text") == "y" and value_at(record, "answers.-1.text") == "y"
    assert value_at(record, "a.b") == "literal"
    for path in ("answers.2", "meta.nothing", "answers.x"):
        with pytest.raises(importers.RowFault, match="no `") as fault:
            value_at(record, path)
        assert fault.value.reason == "missing_field"


# ---- the shapes ------------------------------------------------------------------------------

def test_winner_label_with_ties_and_message_list_conversations(tmp_path):
    def battle(i, winner, a, b, model_a="m1", model_b="m2"):
        return {"question_id": f"q{i}", "model_a": model_a, "model_b": model_b, "winner": winner,
                "conversation_a": a, "conversation_b": b}

    path = write_jsonl(tmp_path / "arena.jsonl", [
        battle(1, "model_a", chat("Name a fruit.", "An apple."), chat("Name a fruit.", "A car.")),
        battle(2, "tie (bothbad)", chat("2+2?", "5"), chat("2+2?", "22")),
        battle(3, "model_b", chat("Hi", "Hello!", "Name a colour.", "Blue."), chat("Hi", "Hello!", "Name a colour.", "Loud.")),
        battle(4, "model_b", chat("Hi", "Hey.", "And now?", "Now."), chat("Hi", "Hello!", "And now?", "Later.")),
        battle(5, "tie", [{"role": "system", "content": "Be brief."}, *chat("Why?", "Because.")],
               [{"role": "system", "content": "Be brief."}, *chat("Why?", "No idea.")]),
        battle(6, "model_a", [{"role": "user", "content": [{"type": "text", "text": "Look"},
                                                             {"type": "image_url", "image_url": "x"}]}], chat("Look", "ok")),
    ])
    mapping = {"id": "question_id", "response_a": "conversation_a", "response_b": "conversation_b", "winner": "winner",
               "winner_values": {"model_a": "a", "model_b": "b", "tie": "tie", "tie (bothbad)": "tie"}}
    rows, quarantine, _ = import_comparisons(mapped(path, mapping), NOW)
    rows = rows.set_index("pair_id")
    name = f"{tmp_path.name}/arena"
    assert rows.loc[f"{name}:q1", ["prompt", "response_a", "response_b", "chosen"]].tolist() == \
        ["Name a fruit.", "An apple.", "A car.", "a"]
    assert rows.loc[f"{name}:q2", "chosen"] == "tie"
    # a longer conversation before the answers is the prompt, as a transcript in hh-rlhf's spelling
    assert rows.loc[f"{name}:q3", "prompt"] == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour."
    assert rows.loc[f"{name}:q5", "prompt"] == "System: Be brief.\n\nHuman: Why?" and rows.loc[f"{name}:q5", "chosen"] == "tie"
    assert quarantine[["line", "reason"]].values.tolist() == [[4, "different_prompts"], [6, "bad_messages"]]
    assert set(rows["chosen"]) <= set(CHOICES)
    assert render_conversation([("user", "just this")]) == "just this"


def test_a_mapped_prompt_with_message_list_responses(tmp_path):
    # UltraFeedback-binarized-like rows that carry the prompt as text as well; a text part list is text
    row = {"prompt": "Say hi.", "chosen": chat("Say hi.", "Hi!"),
           "rejected": [{"role": "user", "content": "Say hi."},
                        {"role": "assistant", "content": [{"type": "text", "text": "Go"}, {"type": "text", "text": "away"}]}]}
    path = write_jsonl(tmp_path / "uf.jsonl", [row])
    rows = import_comparisons(mapped(path, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}), NOW).rows
    assert rows.iloc[0]["prompt"] == "Say hi."
    assert {rows.iloc[0]["response_a"], rows.iloc[0]["response_b"]} == {"Hi!", "Go\naway"}
    winner = rows.iloc[0]["response_a"] if rows.iloc[0]["chosen"] == "a" else rows.iloc[0]["response_b"]
    assert winner == "Hi!"


def test_two_scores_decide_the_winner(tmp_path):
    path = write_jsonl(tmp_path / "scores.jsonl", [
        {"q": "q1", "x": "one", "y": "two", "sx": 10, "sy": 3},
        {"q": "q2", "x": "one", "y": "two", "sx": 1.5, "sy": 4},
        {"q": "q3", "x": "one", "y": "two", "sx": 2, "sy": 2.0},
        {"q": "q4", "x": "one", "y": "two", "sx": "lots", "sy": 2},
        {"q": "q5", "x": "one", "y": "two", "sx": float("nan"), "sy": 2},
        {"q": "q6", "x": "one", "y": "two", "sx": True, "sy": 2},
    ])
    mapping = {"prompt": "q", "response_a": "x", "response_b": "y", "score_a": "sx", "score_b": "sy"}
    rows, quarantine, _ = import_comparisons(mapped(path, mapping), NOW)
    assert rows["chosen"].tolist() == ["a", "b", "tie"]
    assert quarantine["reason"].tolist() == ["not_a_number"] * 3


def test_one_row_per_rater_becomes_votes_and_agreement(tmp_path):
    def vote(pair, rater, winner, a="the first answer", b="the second answer", prompt=None):
        return {"pair": pair, "prompt": prompt or f"prompt {pair}", "a": a, "b": b, "rater": rater, "label": winner}

    path = write_jsonl(tmp_path / "raters.jsonl", [
        vote("p1", "ann", "A"), vote("p1", "bob", "A"), vote("p1", "cy", "B"),       # 2 of 3 say a
        vote("p2", "ann", "A"), vote("p2", "bob", "B"),                              # split: a tie, no agreement
        vote("p3", "ann", "tie"), vote("p3", "bob", "tie"), vote("p3", "cy", "A"),   # ties kept as ties
        vote("p4", "ann", "B"),
        vote("p1", "ann", "B"),                                                      # ann again on p1
        vote("p1", "dee", "A", b="another answer"),                                  # not p1's responses
        vote("p4", 7, "B"),                                                          # a rater id of another type
    ])
    mapping = {"id": "pair", "prompt": "prompt", "response_a": "a", "response_b": "b", "rater": "rater",
               "winner": "label", "winner_values": {"A": "a", "B": "b", "tie": "tie"}}
    rows, quarantine, m = import_comparisons(mapped(path, mapping), NOW)
    rows = rows.set_index("pair_id")
    name = f"{tmp_path.name}/raters"
    got = {pid.split(":")[1]: (r["chosen"], r["votes"], round(r["agreement"], 3)) for pid, r in rows.iterrows()}
    assert got == {"p1": ("a", 3, 0.667), "p2": ("tie", 2, 0.0), "p3": ("tie", 3, 0.667), "p4": ("b", 1, 1.0)}
    assert rows.loc[f"{name}:p1", "source"] == f"import:{name}"
    assert quarantine[["line", "reason"]].values.tolist() == [[10, "duplicate_vote"], [11, "conflicting_pair"],
                                                              [12, "mixed_types"]]
    assert m["collect/import_rater_rows_merged"] == 5 and m["collect/import_available"] == 4
    assert m["collect/import_lines"] == 12 == sum(rows["votes"]) + len(quarantine)


def test_raters_without_an_id_are_grouped_by_the_pair_in_either_order(tmp_path):
    path = write_jsonl(tmp_path / "raters.jsonl", [
        {"q": "Which?", "x": "left", "y": "right", "who": "ann", "won": 0},
        {"q": "Which?", "x": "right", "y": "left", "who": "bob", "won": 1},   # shown swapped: still a vote for 'left'
        {"q": "Which?", "x": "left", "y": "right", "who": "cy", "won": 1},
    ])
    mapping = {"prompt": "q", "response_a": "x", "response_b": "y", "rater": "who", "winner": "won",
               "winner_values": {0: "a", 1: "b"}}
    rows = import_comparisons(mapped(path, mapping), NOW).rows
    assert len(rows) == 1 and rows.iloc[0][["response_a", "chosen", "votes"]].tolist() == ["left", "a", 3]
    assert rows.iloc[0]["agreement"] == pytest.approx(2 / 3)


def test_majority():
    assert majority(["a", "a", "b"]) == ("a", pytest.approx(2 / 3))
    assert majority(["a", "b"]) == ("tie", 0.0)
    assert majority(["a", "b", "tie"]) == ("tie", pytest.approx(1 / 3))
    assert majority(["b"]) == ("b", 1.0)


def test_hh_rlhf_transcripts_without_a_shared_prompt_are_quarantined(tmp_path):
    path = tmp_path / "hh" / "test.jsonl.gz"
    path.parent.mkdir()
    with gzip.open(path, "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in [
            {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."},
            {"chosen": "no turns", "rejected": "none either"},
            {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": None},
        ]))
    rows, quarantine, _ = import_comparisons(CollectParams(sources=["import"], import_data=str(path)), NOW)
    assert rows[["prompt", "source"]].values.tolist() == [["Hi?", "import:hh/test"]]
    assert quarantine[["line", "reason"]].values.tolist() == [[2, "no_shared_prompt"], [3, "null_field"]]


def test_comparison_rows_are_checked_against_the_schema(tmp_path):
    def row(i, **change):
        return {"pair_id": f"c{i}", "prompt": f"p{i}", "response_a": "x", "response_b": "y", "chosen": "a",
                "source": "human:nov", "policy_version": None, "votes": 3, "agreement": 1.0,
                "created_at": "2026-11-02T10:00:00Z", **change}

    path = write_jsonl(tmp_path / "export.jsonl", [
        row(1), row(2, chosen="tie", votes=4.0, created_at="2026-11-02 10:00"),
        row(3, prompt=None),                         # the pyarrow traceback, now a quarantined row
        row(4, votes="three"), row(5, agreement=float("inf")), row(6, created_at="yesterday"),
        row(7, created_at=12), {k: v for k, v in row(8).items() if k != "source"}, row(1, prompt="again"),
    ])
    params = CollectParams(sources=["import"], import_data=str(path), import_format="comparisons")
    rows, quarantine, _ = import_comparisons(params, NOW)
    assert rows["pair_id"].tolist() == ["c1", "c2"] and rows["votes"].tolist() == [3, 4]
    assert rows["created_at"].tolist() == [pd.Timestamp("2026-11-02 10:00", tz="UTC")] * 2
    assert quarantine[["line", "reason", "source_id"]].values.tolist() == [
        [3, "null_field", "c3"], [4, "not_a_number", "c4"], [5, "not_a_number", "c5"], [6, "bad_timestamp", "c6"],
        [7, "bad_timestamp", "c7"], [8, "missing_field", "c8"], [9, "duplicate_id", "c1"]]
    assert to_table(rows).schema == SCHEMA


# ---- Parquet, unreadable files, the hub ------------------------------------------------------

def test_parquet_rows_with_nested_fields_and_a_value_that_is_not_utf8(tmp_path):
    table = pa.table({
        "id": [1, 2, 3],
        "meta": [{"question": "q1"}, {"question": "q2"}, {"question": "q3"}],
        "answers": [["x1", "y1"], ["x2", "y2"], ["x3", "y3"]],
        "preferred": [0, 1, 0],
        "note": pa.array([b"fine", b"\xffbad", b"ok"], pa.binary()).view(pa.string()),
    })
    pq.write_table(table, tmp_path / "set.parquet")
    rows, quarantine, _ = import_comparisons(mapped(tmp_path / "set.parquet", NESTED), NOW)
    assert rows["chosen"].tolist() == ["a", "a"] and rows["prompt"].tolist() == ["q1", "q3"]
    assert quarantine[["line", "reason", "raw_encoding"]].values.tolist() == [[2, "invalid_utf8", "base64"]]
    assert base64.b64decode(quarantine.iloc[0]["raw"]) == b"\xffbad" and "`note`" in quarantine.iloc[0]["detail"]


def test_a_parquet_row_that_fails_keeps_its_values_as_raw(tmp_path):
    pd.DataFrame({"id": [1, 2], "meta": [{"question": "q"}, {"question": None}], "answers": [["x", "y"]] * 2,
                  "preferred": [0, 1]}).to_parquet(tmp_path / "set.parquet")
    quarantine = import_comparisons(mapped(tmp_path / "set.parquet", NESTED), NOW).quarantine
    assert quarantine.iloc[0]["reason"] == "null_field"
    assert json.loads(quarantine.iloc[0]["raw"])["answers"] == ["x", "y"] and quarantine.iloc[0]["source_id"] == "2"


@pytest.mark.parametrize("kind", ["truncated gzip", "not gzip", "not parquet", "gzip named .jsonl", "no permission"])
def test_an_unreadable_file_is_one_paragraph_naming_it_and_the_fix(tmp_path, monkeypatch, kind):
    data = b"".join(json.dumps(good(i)).encode() + b"\n" for i in range(1, 2000))
    if kind == "truncated gzip":
        path, fix = tmp_path / "set.jsonl.gz", "gzip -t"
        path.write_bytes(gzip.compress(data)[:5000])
    elif kind == "not gzip":
        path, fix = tmp_path / "set.jsonl.gz", "gzip -t"
        path.write_bytes(data)
    elif kind == "not parquet":
        path, fix = tmp_path / "set.parquet", "Write it again"
        path.write_bytes(b"PAR1 not really")
    elif kind == "gzip named .jsonl":
        path, fix = tmp_path / "set.jsonl", "Rename it to set.jsonl.gz"
        path.write_bytes(gzip.compress(data))
    else:
        path, fix = tmp_path / "set.jsonl.gz", "chmod a+r"
        path.write_bytes(gzip.compress(data))

        def denied(name, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(name))

        monkeypatch.setattr(importers.gzip, "open", denied)
    with pytest.raises(ParamError) as error:
        import_comparisons(mapped(path, NESTED), NOW)
    message = str(error.value)
    assert str(path) in message and fix in message and "\n" not in message
    assert message.startswith("collect.import_data")


def test_a_hub_id_offline_says_to_export_the_data_set(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    params = CollectParams(sources=["import"], import_data="someone/no-such-preferences", import_format="pairs")
    with pytest.raises(ParamError, match=r"taken as a Hugging Face hub dataset id, .* Offline, export the data set"):
        import_comparisons(params, NOW)


def test_the_prompt_pool_reader_still_stops_at_a_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": "a?"}, b"", b'{"prompt": "b?"'])
    with pytest.raises(ParamError, match=r"pool.jsonl, line 3: not valid JSON.*collect.prompts is read whole"):
        importers.read_records(str(path), "train", "collect.prompts")
    write_jsonl(path, [{"prompt": "a?"}, b"", {"prompt": "b?"}])
    assert importers.read_records(str(path), "train", "collect.prompts") == [
        (f"{tmp_path.name}/pool", [{"prompt": "a?"}, {"prompt": "b?"}])]


# ---- the mapping param -----------------------------------------------------------------------

@pytest.mark.parametrize("mapping, message", [
    ({"prompt": "q", "chosn": "a", "rejected": "b"}, r"has the key `chosn`, which is not one it knows\. Did you mean `chosen`\?"),
    ({"prompt": "q", "chosen": "a"}, r"names `chosen` without its partner"),
    ({"prompt": "q", "response_a": "a", "response_b": "b"}, r"needs one way to tell the winner"),
    ({"prompt": "q", "response_a": "a", "response_b": "b", "winner": "w"}, r"has `winner` but no `winner_values`"),
    ({"prompt": "q", "response_a": "a", "response_b": "b", "winner": "w", "winner_values": {0: "first"}},
     r"each value of `winner` must map to 'a', 'b' or 'tie'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "winner": "w"}, r"names `winner` beside chosen/rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "rater": "r"}, r"names `rater` beside chosen/rejected"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"has `prompt: 3`, but `prompt` names a field"),
    ({"prompt": "q", "response_a": "a", "response_b": "b", "score_a": "s"}, r"one score without the other"),
])
def test_a_bad_mapping_stops_the_load_with_the_key_and_the_fix(tmp_path, mapping, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"collect": {"import_format": "mapped", "import_mapping": mapping}}))
    with pytest.raises(ParamError, match=message) as error:
        load_params(path)
    assert "README" in str(error.value) and "\n" not in str(error.value)


def test_the_mapping_and_the_format_must_agree(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [good(1)])
    with pytest.raises(ParamError, match="import_format is 'hh-rlhf', which does not read it"):
        import_comparisons(CollectParams(import_data=str(path), import_mapping=NESTED), NOW)
    with pytest.raises(ParamError, match="'mapped', but collect.import_mapping is empty"):
        import_comparisons(CollectParams(import_data=str(path), import_format="mapped"), NOW)
    with pytest.raises(ParamError, match="has the key `promt`"):  # made in code: checked at the import
        import_comparisons(mapped(path, {**NESTED, "promt": "x"}), NOW)


# ---- the README's worked examples ------------------------------------------------------------

def readme_examples() -> list[dict]:
    """The `collect:` blocks of the README's 'Importing preference data' section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Importing preference data", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return [yaml.safe_load(block)["collect"] for block in re.findall(r"```yaml\n(.*?)```", section, re.S)]


def _arena(question_id, winner, a, b, judge="arena_user_1", turn=1, **more):
    return {"question_id": question_id, "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner,
            "judge": judge, "conversation_a": a, "conversation_b": b, "turn": turn, **more}


def fixture_rows(name: str) -> tuple[list[dict], dict]:
    """Rows in the named data set's format, and what importing them must give: {reason or 'chosen': count}."""
    if name == "hh-rlhf":
        return [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go away."},
                {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}], {"pairs": 2}
    if name == "chatbot_arena_conversations":
        return [_arena("58210e39", "model_a", chat("Name a fruit.", "An apple."), chat("Name a fruit.", "A car.")),
                _arena("2564acd0", "tie (bothbad)", chat("2+2?", "5"), chat("2+2?", "22")),
                _arena("90bfd142", "tie", chat("Hi", "Hello"), chat("Hi", "Hey")),
                _arena("a1b2c3d4", "model_b", chat("Hi", "Yo.", "More?", "No."), chat("Hi", "Hello.", "More?", "Yes."),
                       turn=2)], {"pairs": 3, "tie": 2, "different_prompts": 1}
    if name == "mt_bench_human_judgments":
        rows = [_arena(81, w, chat("Write a poem.", "Roses are red."), chat("Write a poem.", "No."), judge=j)
                for j, w in (("author_0", "model_a"), ("expert_3", "model_a"), ("expert_7", "model_b"))]
        rows += [_arena(82, w, chat("Sum 2 and 2.", "4"), chat("Sum 2 and 2.", "four"), judge=j)
                 for j, w in (("author_0", "model_a"), ("expert_3", "model_b"))]
        return rows, {"pairs": 2, "tie": 1, "votes": 5}
    if name == "pku_saferlhf":
        return [{"prompt": "How do I pick a lock?", "response_0": "Call a locksmith.", "response_1": "Use a pin.",
                 "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0},
                {"prompt": "Name a colour.", "response_0": "Loud.", "response_1": "Blue.", "is_response_0_safe": True,
                 "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 1}], {"pairs": 2}
    if name == "shp":
        return [{"post_id": "himc90", "domain": "askculinary_train", "history": "Why does bread go stale?",
                 "c_root_id_A": "fusj3f8", "c_root_id_B": "fusl1ip", "human_ref_A": "Starch retrogradation.",
                 "human_ref_B": "Magic.", "labels": 1, "score_A": 52, "score_B": 3},
                {"post_id": "himc90", "domain": "askculinary_train", "history": "Why does bread go stale?",
                 "c_root_id_A": "fusl1ip", "c_root_id_B": "fut0a2k", "human_ref_A": "Magic.",
                 "human_ref_B": "It dries out.", "labels": 0, "score_A": 3, "score_B": 9}], {"pairs": 2}
    if name == "ultrafeedback_binarized":
        return [{"prompt": "Say hi.", "prompt_id": "0a1b", "chosen": chat("Say hi.", "Hi!"),
                 "rejected": chat("Say hi.", "No."), "messages": chat("Say hi.", "Hi!"), "score_chosen": 8.0,
                 "score_rejected": 2.0}], {"pairs": 1}
    raise KeyError(name)


def test_the_readme_examples_import_their_data_sets_format(tmp_path):
    examples = readme_examples()
    assert len(examples) >= 3
    for example in examples:
        target = Path(example["import_data"])
        name = target.name.split(".")[0]
        rows, expect = fixture_rows(name)
        if name == "hh-rlhf":  # a folder of .jsonl.gz files, as the data set ships
            local = tmp_path / name / "helpful-base" / "test.jsonl.gz"
            local.parent.mkdir(parents=True)
            local.write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows)))
            local = local.parent.parent
        elif target.suffix == ".parquet":
            local = tmp_path / target.name
            pd.DataFrame(rows).to_parquet(local)
        else:
            local = write_jsonl(tmp_path / target.name, rows)
        params_file = tmp_path / f"{name}.yaml"
        params_file.write_text(yaml.safe_dump({"collect": {**example, "import_data": str(local)}}))
        params = load_params(params_file).collect  # the block as params.yaml would hold it
        imported, quarantine, m = import_comparisons(params, NOW)
        assert len(imported) == expect["pairs"], name
        assert (imported["chosen"] == "tie").sum() == expect.get("tie", 0), name
        assert Counter(quarantine["reason"]) == {k: v for k, v in expect.items() if k in REASONS}, name
        if "votes" in expect:
            assert imported["votes"].sum() == expect["votes"] and imported["agreement"].notna().all()
        assert imported["pair_id"].is_unique and to_table(imported).num_rows == len(imported)
        for _, row in imported.iterrows():  # every winner is the response the data set preferred
            winner = {"a": row["response_a"], "b": row["response_b"]}.get(row["chosen"])
            assert winner is None or winner in {"Hello there.", "4", "An apple.", "Roses are red.", "Call a locksmith.",
                                                "Blue.", "Starch retrogradation.", "It dries out.", "Hi!", "Yes."}, (name, winner)


# ---- the acceptance test: the mixed file through the `collect` stage -------------------------

@pytest.mark.slow
def test_the_collect_stage_imports_a_mixed_fault_file_and_accounts_for_every_line(tmp_path):
    expected = write_mixed(tmp_path / "mixed.jsonl")
    # a winner label MLflow would not take as (part of) a param name: the mapping is logged as one JSON text
    mapping = {**NESTED, "winner_values": {**NESTED["winner_values"], "tie (bothbad)": "tie"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"collect": {
        "sources": ["import"], "import_data": "mixed.jsonl", "import_format": "mapped", "import_mapping": mapping,
        "import_max_chars": MAX_CHARS}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "rlhf.collect"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    lines = len(expected)
    collected = pd.read_parquet(tmp_path / "data/comparisons/collected.parquet")
    quarantine = pd.read_parquet(tmp_path / "data/comparisons/import_quarantine.parquet")
    metrics = json.loads((tmp_path / "metrics/collect.json").read_text())
    assert len(collected) + len(quarantine) == lines == metrics["collect/import_lines"]
    assert len(collected) == expected.count(None) == metrics["collect/imported"] == metrics["collect/rows"]
    assert quarantine[["line", "reason"]].values.tolist() == [[n, r] for n, r in enumerate(expected, 1) if r]
    per_reason = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("collect/import_quarantined/")}
    assert per_reason == dict(Counter(r for r in expected if r))
    print(f"\n{lines} lines: {len(collected)} imported + {len(quarantine)} quarantined; per reason: "
          + ", ".join(f"{r}: {n}" for r, n in sorted(per_reason.items())))
    assert f"{len(collected)} imported of {lines} lines, {len(quarantine)} quarantined (" in done.stdout

    from mlflow import MlflowClient

    from rlhf.tracking import EXPERIMENT

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])[0]
    assert json.loads(run.data.params["collect.import_mapping"])["winner_values"]["tie (bothbad)"] == "tie"
    assert run.data.params["collect.import_max_chars"] == str(MAX_CHARS)
