"""A human labeling campaign's export enters the pipeline: `collect` imports it as comparisons
(source 'human:<campaign>', votes and agreement kept) and `validate` passes every row of it."""
from __future__ import annotations

import re

import pandas as pd
from fastapi.testclient import TestClient

from rlhf.collect import import_comparisons
from rlhf.comparisons import COLUMNS, write_comparisons
from rlhf.labeling.app import create_app
from rlhf.labeling.cli import main
from rlhf.params import CollectParams, ValidateParams
from rlhf.validate import Checker, load_embedder, load_suite, read_collected, split_of, validate_comparisons

from .conftest import build_tiny_tokenizer
from .labeling.support import PASSWORD, csrf_token, label_everything, pair_rows

CAMPAIGN = "nov"
TRUTHS = {"p0": "a", "p1": "b", "p2": "both_bad", "p3": "tie", "p4": "b", "p5": "a", "p6": "a", "p7": "b"}
EXPORTED = sorted(p for p, t in TRUTHS.items() if t != "both_bad")  # both_bad pairs are left out of the export
# Distinct, unrelated prompts: a campaign's prompts are not near-copies of each other (validate's leak check).
PROMPTS = {
    "p0": "How do I bake sourdough bread at home?", "p1": "What causes the seasons on Earth?",
    "p2": "Write a haiku about autumn leaves.", "p3": "Explain recursion to a ten-year-old.",
    "p4": "How can I fix a flat bicycle tire?", "p5": "Why is the ocean salty?",
    "p6": "Recommend a beginner chess opening.", "p7": "How do vaccines train the immune system?",
}
NOW = pd.Timestamp("2026-11-02", tz="UTC")


def invite_and_join(database_url: str, app, name: str, capsys) -> TestClient:
    assert main(["invite", name, "--db", database_url, "--base-url", "http://testserver"]) == 0
    link = capsys.readouterr().out.strip()
    assert re.fullmatch(r"http://testserver/invite/[A-Za-z0-9_-]{43}", link)
    client = TestClient(app)
    form = client.get(link)
    client.post(link, data={"password": PASSWORD, "confirm": PASSWORD, "csrf_token": csrf_token(form.text)})
    return client


def labelled_campaign_export(tmp_path, capsys):
    """Create a campaign from Parquet, have three annotators (overlap 3) label it over HTTP, export it."""
    database_url = f"sqlite:///{tmp_path / 'labeling.db'}"
    pairs = pair_rows(TRUTHS)
    pairs["prompt"] = pairs["pair_id"].map(PROMPTS)
    write_comparisons(pairs, tmp_path / "pairs.parquet")
    gold = pair_rows({"g0": "b", "g1": "a"}, chosen_is_truth=True)
    gold["prompt"] = ["Name a planet with rings.", "What is compound interest?"]
    write_comparisons(gold, tmp_path / "gold.parquet")
    assert main(["create-campaign", CAMPAIGN, "--db", database_url, "--pairs", str(tmp_path / "pairs.parquet"),
                 "--gold", str(tmp_path / "gold.parquet"), "--gold-rate", "0.2", "--seed", "1"]) == 0
    assert f"campaign {CAMPAIGN}: {len(TRUTHS)} pairs, 2 gold, overlap 3" in capsys.readouterr().out

    app = create_app(database_url, secure_cookies=False)  # TestClient: plain HTTP to 'testserver'
    for name in ("ann", "bob", "cy"):
        label_everything(invite_and_join(database_url, app, name, capsys), CAMPAIGN)

    out = tmp_path / "export" / f"human-{CAMPAIGN}.parquet"
    assert main(["export", CAMPAIGN, "--db", database_url, "--out", str(out)]) == 0
    assert f"exported {len(EXPORTED)} comparisons" in capsys.readouterr().out
    return out


def seed_with_every_split(prompts: list[str], params: ValidateParams) -> int:
    """The first split seed that gives each of train / validation / test at least one of these few prompts
    (validate's empty_split expectation: a tiny campaign needs its split seed chosen, as small data does)."""
    for seed in range(10_000):
        if {split_of(p, seed, params.val_fraction, params.test_fraction) for p in prompts} == {"train", "validation", "test"}:
            return seed
    raise AssertionError("no seed splits the prompts three ways")


def test_campaign_export_is_collected_as_human_comparisons_and_passes_validate(tmp_path, capsys):
    export = labelled_campaign_export(tmp_path, capsys)

    # collect, source 'import' with import_format 'comparisons': the export is read as comparison rows.
    collect_params = CollectParams(sources=["import"], import_data=str(export), import_format="comparisons")
    collected, quarantined, counts = import_comparisons(collect_params, NOW)
    assert len(quarantined) == 0
    assert counts["collect/import_available"] == counts["collect/imported"] == len(EXPORTED)
    assert counts["collect/import_quarantined"] == 0
    assert list(collected.columns) == list(COLUMNS)
    collected = collected.sort_values("pair_id").reset_index(drop=True)
    assert list(collected["pair_id"]) == EXPORTED
    assert list(collected["chosen"]) == [TRUTHS[p] for p in EXPORTED]
    assert list(collected["prompt"]) == [PROMPTS[p] for p in EXPORTED]
    assert set(collected["source"]) == {f"human:{CAMPAIGN}"}
    assert set(collected["policy_version"]) == {"policy-v1"}
    assert (collected["votes"] >= 3).all() and collected["votes"].notna().all()
    assert collected["agreement"].notna().all() and (collected["agreement"] == 1.0).all()  # honest annotators agree

    # the collected file as collect writes it, then validate's checks on it.
    write_comparisons(collected, tmp_path / "collected.parquet")
    frame, utf8_valid = read_collected(tmp_path / "collected.parquet")
    base = ValidateParams(max_tokens=256, val_fraction=0.2, test_fraction=0.3)
    params = ValidateParams(max_tokens=256, val_fraction=0.2, test_fraction=0.3,
                            seed=seed_with_every_split(frame["prompt"].tolist(), base))
    result = validate_comparisons(frame, utf8_valid, params, build_tiny_tokenizer(), load_embedder(),
                                  Checker(load_suite(), tmp_path / "docs"), where=str(tmp_path / "collected.parquet"))

    metrics = result["metrics"]
    assert result["quarantine"].empty, result["quarantine"][["pair_id", "reason"]].to_dict("records")
    assert metrics["validate/rows_quarantined"] == 0
    assert metrics["validate/rows_in"] == len(EXPORTED) == metrics["validate/rows_valid"]
    assert metrics["validate/rows_in"] == metrics["validate/rows_valid"] + metrics["validate/rows_quarantined"]
    valid = pd.concat(result["splits"].values(), ignore_index=True).sort_values("pair_id").reset_index(drop=True)
    assert list(valid["pair_id"]) == EXPORTED
    assert set(valid["source"]) == {f"human:{CAMPAIGN}"} and (valid["votes"] >= params.min_votes).all()
    assert all(len(split) for split in result["splits"].values())
    assert metrics["validate/ties"] == sum(TRUTHS[p] == "tie" for p in EXPORTED)

