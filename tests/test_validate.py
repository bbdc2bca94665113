"""validate: each kind of bad row lands in quarantine with its reason, or stops the stage with a clear
message; nothing is lost; the split never straddles a prompt."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rlhf.comparisons import COLUMNS, read_comparisons, write_comparisons
from rlhf.params import ValidateParams
from rlhf.validate import (Checker, DatasetRejected, load_embedder, load_suite, position_balance_bounds,
                           leak_similarity, read_collected, split_of, token_count, validate_comparisons)

from .conftest import build_tiny_tokenizer

PARAMS = ValidateParams(max_tokens=256, val_fraction=0.2, test_fraction=0.3, seed=0)
NOW = pd.Timestamp("2026-01-01", tz="UTC")
PROMPTS = [
    "How do I bake sourdough bread at home?", "What causes the seasons on Earth?", "Write a haiku about autumn leaves.",
    "Explain recursion to a ten-year-old.", "How can I fix a flat bicycle tire?", "What is the capital of Australia?",
    "Give me three tips for a job interview.", "Why do cats purr?", "Summarise the plot of Hamlet in two lines.",
    "How does a refrigerator keep food cold?", "Translate 'good morning' into Spanish.", "What is compound interest?",
    "Suggest a name for a pet turtle.", "How do vaccines train the immune system?", "Write a SQL query counting users.",
    "Is it safe to look at a solar eclipse?", "What are prime numbers?", "Plan a one-day trip to Kyoto.",
    "How do I apologise to a friend?", "Why is the ocean salty?", "Describe the taste of a mango.",
    "How many legs does a spider have?", "What does a project manager do?", "Recommend a beginner chess opening.",
]


def row(pair_id: str, prompt: str, i: int = 0, **changes) -> dict:
    base = {"pair_id": pair_id, "prompt": prompt, "response_a": f"A careful answer ({i}).",
            "response_b": f"A short reply ({i}).", "chosen": "a" if i % 2 == 0 else "b", "source": "judge:test",
            "policy_version": "base@0000", "votes": None, "agreement": None, "created_at": NOW}
    return {**base, **changes}


def good_rows() -> list[dict]:
    return [row(f"good-{i}", p, i) for i, p in enumerate(PROMPTS)]


def leak_prompts() -> tuple[str, str]:
    """A training prompt and a near-copy of it that the hash sends to a held-out split."""
    base = "How should I store fresh basil so it lasts longer"
    variants = [base + ending for ending in ("?", "??", "!", " please?", " then?", " now?", " exactly?", "...")]
    splits = [split_of(v, PARAMS.seed, PARAMS.val_fraction, PARAMS.test_fraction) for v in variants]
    return variants[splits.index("train")], variants[next(i for i, s in enumerate(splits) if s != "train")]


BAD = {  # pair_id -> the reason validate must give
    "empty-response": "empty_response_a",
    "identical": "identical_responses",
    "unknown-chosen": "unknown_chosen",
    "unjudged": "unjudged",
    "bad-utf8": "invalid_utf8",
    "huge": "too_long",
    "dup": "duplicate_pair_id",
    "leak": "prompt_leak",
    "few-votes": "too_few_votes",
    "robot": "unknown_source",
    "two-faults": "empty_response_b; unknown_chosen",  # every failed expectation, in the suite's order
}


def bad_rows() -> list[dict]:
    train_prompt, leaked = leak_prompts()
    return [
        row("empty-response", "Name a warm colour.", response_a="  \n"),
        row("identical", "Name a cold colour.", response_a="Blue.", response_b="Blue."),
        row("unknown-chosen", "Name a primary colour.", chosen="c"),
        row("unjudged", "Name a green fruit.", chosen=None),
        row("bad-utf8", "Name a French drink.", response_b="café au lait"),  # its bytes are broken on disk below
        row("huge", "Say something very long.", response_a="x " * 5_000_000),  # a 10 MB string
        row("dup", "Name a mammal.", response_a="A whale."),
        row("dup", "Name a bird.", response_a="A robin."),
        row("basil", train_prompt, 1),
        row("leak", leaked, 2),
        row("few-votes", "Name a river.", source="human:campaign-1", votes=2, agreement=1.0),
        row("human-ok", "Name a mountain.", source="human:campaign-1", votes=5, agreement=0.8),
        row("robot", "Name a planet.", source="robot:r2d2"),
        row("two-faults", "Name a moon.", response_b="", chosen="yes"),
    ]


def write_with_broken_utf8(rows: list[dict], path: Path) -> None:
    """Write comparison rows, then replace 'é' in the bad-utf8 row by a lone Latin-1 byte, as a non-UTF-8 writer would."""
    write_comparisons(pd.DataFrame(rows), path)
    table = pq.read_table(path)
    values = [v.encode() for v in table.column("response_b").to_pylist()]
    broken = [v.replace("é".encode(), b"\xe9") for v in values]
    column = pa.array(broken, pa.binary()).view(pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("response_b"), "response_b", column), path)


@pytest.fixture(scope="module")
def embed():
    return load_embedder()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def run(frame, utf8_valid, tokenizer, embed, docs: Path, params: ValidateParams = PARAMS):
    return validate_comparisons(frame, utf8_valid, params, tokenizer, embed, Checker(load_suite(), docs))


def test_bad_rows_are_quarantined_with_their_reason_and_nothing_is_lost(tmp_path, tokenizer, embed):
    rows = good_rows() + bad_rows()
    write_with_broken_utf8(rows, tmp_path / "collected.parquet")
    with pytest.raises(pa.ArrowException):  # what a plain reader does with such a file
        pd.read_parquet(tmp_path / "collected.parquet")["response_b"].tolist()
    frame, utf8_valid = read_collected(tmp_path / "collected.parquet")
    assert utf8_valid.sum() == len(rows) - 1

    checker = Checker(load_suite(), tmp_path / "docs")
    result = validate_comparisons(frame, utf8_valid, PARAMS, tokenizer, embed, checker)
    quarantine, m = result["quarantine"], result["metrics"]
    reasons = dict(zip(quarantine["pair_id"], quarantine["reason"]))
    assert reasons == BAD  # each bad row with exactly its own reason, and no good row
    assert (quarantine["pair_id"] == "dup").sum() == 2  # both copies of a duplicated id
    assert "caf\\xe9 au lait" in quarantine.loc[quarantine["pair_id"] == "bad-utf8", "response_b"].item()

    assert m["validate/rows_in"] == len(rows) == m["validate/rows_valid"] + m["validate/rows_quarantined"]
    assert m["validate/rows_quarantined"] == len(BAD) + 1
    assert m["validate/quarantined/duplicate_pair_id"] == 2 and m["validate/quarantined/too_long"] == 1
    valid_ids = set().union(*(set(s["pair_id"]) for s in result["splits"].values()))
    assert valid_ids == {r["pair_id"] for r in rows} - set(BAD)
    assert {"basil", "human-ok"} <= valid_ids

    docs = checker.write_report()
    assert (docs / "index.html").exists() and (docs / "validation_results.json").exists()


def test_a_missing_column_stops_with_its_name(tmp_path, tokenizer, embed):
    frame = pd.DataFrame(good_rows()).drop(columns=["chosen"])
    with pytest.raises(DatasetRejected, match=r"lacks the column\(s\) \['chosen'\]"):
        run(frame, np.ones(len(frame), bool), tokenizer, embed, tmp_path)


def test_a_position_biased_source_stops_the_stage(tmp_path, tokenizer, embed):
    rows = [row(f"g{i}", p, 0) for i, p in enumerate(PROMPTS * 3)]  # 'a' every time
    for i, r in enumerate(rows):
        r["prompt"] = f"{r['prompt']} (variant {i // len(PROMPTS)})" if i >= len(PROMPTS) else r["prompt"]
    frame = pd.DataFrame(rows)
    with pytest.raises(DatasetRejected, match=r"100.0% of the 72 a/b labels say 'a', outside \[0\.3"):
        run(frame, np.ones(len(frame), bool), tokenizer, embed, tmp_path, dataclasses_replace(near_duplicate_threshold=1.0))


def test_all_rows_quarantined_stops_with_the_reasons(tmp_path, tokenizer, embed):
    frame = pd.DataFrame([row(f"u{i}", p, i, chosen=None) for i, p in enumerate(PROMPTS[:5])])
    with pytest.raises(DatasetRejected, match=r"all 5 rows were quarantined \(unjudged: 5\)"):
        run(frame, np.ones(len(frame), bool), tokenizer, embed, tmp_path)


def test_a_split_without_prompts_stops_the_stage(tmp_path, tokenizer, embed):
    frame = pd.DataFrame([row(f"one{i}", PROMPTS[0], i, response_a=f"answer {i}") for i in range(4)])
    with pytest.raises(DatasetRejected, match="distinct prompts fall into the splits as"):
        run(frame, np.ones(len(frame), bool), tokenizer, embed, tmp_path)


def dataclasses_replace(**changes) -> ValidateParams:
    import dataclasses

    return dataclasses.replace(PARAMS, **changes)


def test_the_split_never_straddles_a_prompt(tmp_path, tokenizer, embed):
    # each prompt three times, once in other case and spacing
    rows = []
    for i, p in enumerate(PROMPTS):
        for k, text in enumerate((p, p, "  " + p.upper().replace(" ", "   "))):
            rows.append(row(f"p{i}-{k}", text, i + k, response_a=f"answer {i}.{k}"))
    result = run(pd.DataFrame(rows), np.ones(len(rows), bool), tokenizer, embed, tmp_path)
    assert result["metrics"]["validate/rows_valid"] == len(rows)
    where = {}
    for name, split in result["splits"].items():
        for prompt in split["prompt"]:
            where.setdefault(" ".join(prompt.casefold().split()), set()).add(name)
    assert len(where) == len(PROMPTS) and all(len(s) == 1 for s in where.values())
    assert {n for s in where.values() for n in s} == {"train", "validation", "test"}


def test_split_is_a_stable_function_of_the_prompt():
    prompts = [f"prompt number {i}" for i in range(4000)]
    splits = [split_of(p, 0, 0.1, 0.2) for p in prompts]
    assert splits == [split_of(p, 0, 0.1, 0.2) for p in reversed(prompts)][::-1]  # no dependence on order or data
    assert abs(splits.count("test") / 4000 - 0.2) < 0.03 and abs(splits.count("validation") / 4000 - 0.1) < 0.03
    assert split_of("Why is the sky blue?", 0, 0.1, 0.2) == split_of("  why is the SKY   blue?", 0, 0.1, 0.2)
    assert [split_of(p, 1, 0.1, 0.2) for p in prompts] != splits  # the seed matters


def test_token_count_is_exact_below_the_cap_and_cheap_above_it(tokenizer):
    text = "the quick brown fox jumps over the lazy dog " * 3
    exact = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert token_count(tokenizer, text, cap=1000) == exact
    assert token_count(tokenizer, "x " * 5_000_000, cap=100) > 100


def test_position_balance_band_widens_for_small_sets():
    assert position_balance_bounds(10_000, 0.1) == pytest.approx((0.4, 0.6))
    low, high = position_balance_bounds(8, 0.1)
    assert low < 0.1 and high > 0.9  # eight labels all 'a' happen by chance 1 time in 256


def test_every_expectation_has_a_level_and_a_reason():
    suite = load_suite()
    for spec in suite["expectations"]:
        assert spec["meta"]["level"] in ("table", "row", "dataset") and spec["meta"]["reason"]
    row_columns = {s["kwargs"].get("column") for s in suite["expectations"] if s["meta"]["level"] == "row"}
    assert {"pair_id", "prompt", "response_a", "response_b", "chosen", "source", "votes", "created_at"} <= row_columns


@pytest.mark.slow
def test_stage_main_writes_splits_quarantine_and_mlflow_artifacts(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow

    from rlhf import tracking, validate
    from tests.conftest import TINY_PARAMS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "base")
    Path("params.yaml").write_text(yaml.safe_dump({"validate": {**TINY_PARAMS["validate"], "max_tokens": 256}}))
    write_with_broken_utf8(good_rows() + bad_rows(), tmp_path / "data" / "comparisons" / "collected.parquet")

    assert validate.main() == 0
    quarantine = pd.read_parquet("data/comparisons/quarantine.parquet")
    assert set(quarantine["pair_id"]) == set(BAD) and "reason" in quarantine
    sizes = {name: len(read_comparisons(path)) for name, path in validate.SPLITS.items()}
    assert sum(sizes.values()) + len(quarantine) == len(good_rows()) + len(bad_rows())
    assert all(list(read_comparisons(path).columns) == list(COLUMNS) for path in validate.SPLITS.values())

    mlflow.set_tracking_uri(tracking.tracking_uri())
    run = mlflow.search_runs(experiment_names=[tracking.EXPERIMENT], output_format="list")[0]
    assert run.data.metrics["validate/rows_quarantined"] == len(quarantine)
    assert run.data.metrics["validate/quarantined/invalid_utf8"] == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data_docs")}
    assert {"data_docs/index.html", "data_docs/validation_results.json"} <= artifacts


def test_verifiable_tasks_that_differ_only_in_their_numbers_are_not_leaks(embed):
    # two arithmetic tasks share their template, so MiniLM finds them near-copies; they are different questions
    task = "Calculate {} + {}. Give only the final answer."
    prompts = [task.format(a, b) for a in range(1, 10) for b in range(1, 10)]
    splits = [split_of(p, PARAMS.seed, PARAMS.val_fraction, PARAMS.test_fraction) for p in prompts]
    assert {"train", "test"} <= set(splits)
    as_text = leak_similarity(prompts, splits, embed)
    assert np.nanmax(as_text) > PARAMS.near_duplicate_threshold  # what quarantined held-out tasks before
    as_tasks = leak_similarity(prompts, splits, embed, templated=[True] * len(prompts))
    assert np.isnan(as_tasks).all()
    # an open-ended held-out prompt is still checked, against the open-ended training prompts (none here: -1)
    mixed = leak_similarity(prompts + ["What is a good name for a cat?"], splits + ["test"], embed,
                            templated=[True] * len(prompts) + [False])
    assert np.isnan(mixed[:-1]).all() and mixed[-1] == -1.0
