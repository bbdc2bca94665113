"""The `human` judge: a blind campaign in the labeling app that evaluate opens, whose human win-rate the gate reads
once people finish (`rlhf gate`), and, in a real Chromium, three annotators deciding a promotion.

Responses carry their truth in their text (GOOD beats bad, two SAME answers are equally good), and gold pairs are
arithmetic a careful annotator works out, so a simulated person judges only what the page shows.
"""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhf import human_eval, human_gate, promote, tracking
from rlhf.cli import main as rlhf_main
from rlhf.evaluate import check_judges, human_campaign
from rlhf.stats import win_rate_figures
from rlhf.labeling import accounts, campaigns
from rlhf.labeling.aggregate import Outcome, QualityPolicy, Vote, campaign_figures
from rlhf.labeling.db import Annotator, Campaign, make_engine, upgrade_database
from rlhf.params import EvaluateParams, ParamError, PromoteParams, TasksParams, load_params
from rlhf.rollouts import Rollouts
from rlhf.verifiers import heldout_tasks, is_correct, task_prompt

GATE = PromoteParams()
PROMPTS = ["How do I bake bread?", "Why is the sea salty?", "Name a ringed planet.", "What is recursion?",
           "How do vaccines work?", "Suggest a chess opening."]
# the challenger answers five prompts well and ties the last: 5 wins + 1 tie of 6 -> 0.917, Wilson lower 0.517 > 0.5
CHALLENGER_TEXTS = [f"GOOD answer {i}" for i in range(5)] + ["SAME answer, take one"]
CHAMPION_TEXTS = [f"bad answer {i}" for i in range(5)] + ["SAME answer, take two"]
FIGURES = {"compare/challenger/kl": 2.0, "compare/challenger/provocation_probe_toxicity_probability": 0.05,
           "compare/challenger/truthfulness_probe_mc2": 0.41, "compare/champion/kl": 1.5,
           "compare/champion/provocation_probe_toxicity_probability": 0.05,
           "compare/champion/truthfulness_probe_mc2": 0.40, "compare/sft/truthfulness_probe_mc2": 0.40,
           "compare/sft/provocation_probe_toxicity_probability": 0.05, "eval/proxy_rm/win_rate_vs_champion": 0.6,
           "eval/proxy_rm/win_rate_vs_sft": 0.6}


def majority(choice: str) -> Outcome:
    return Outcome("majority", choice, 3, 1.0)


def test_the_win_rate_maps_each_majority_back_through_the_randomised_sides():
    sides = {"q0": "a", "q1": "b", "q2": "b", "q3": "a", "q4": "a", "q5": "b", "q6": "a"}
    outcomes = {"q0": majority("a"),   # the challenger's side: a win
                "q1": majority("b"),   # the challenger was on b: a win
                "q2": majority("a"),   # the opponent's side: a loss
                "q3": majority("tie"),  # a tie
                "q4": majority("both_bad"),  # neither preferred: a tie
                "q5": Outcome("split", None, 3, None),  # no single top choice: a tie
                "q6": Outcome("too_few_votes", None, 2, None)}  # no verdict: left out
    figures = human_eval.human_figures(outcomes, sides, "champion", 0.95)
    assert figures["eval/human/wins_vs_champion"] == 2 and figures["eval/human/losses_vs_champion"] == 1
    assert figures["eval/human/ties_vs_champion"] == 3 and figures["eval/human/n_vs_champion"] == 6
    assert figures["eval/human/left_out_vs_champion"] == 1
    assert figures["eval/human/win_rate_vs_champion"] == pytest.approx((2 + 0.5 * 3) / 6, abs=1e-4)
    # the same equation and interval as every other judge's (rlhf.stats.win_rate_figures)
    reference = win_rate_figures(["win", "win", "loss", "tie", "tie", "tie"], 0.95)
    assert figures["eval/human/win_rate_vs_champion_lower"] == reference["win_rate_lower"]
    assert figures["eval/human/win_rate_vs_champion_upper"] == reference["win_rate_upper"]
    # the same verdicts with the sides swapped are the opposite result
    swapped = human_eval.human_figures(outcomes, {p: "b" if s == "a" else "a" for p, s in sides.items()}, "sft", 0.95)
    assert swapped["eval/human/wins_vs_sft"] == 1 and swapped["eval/human/losses_vs_sft"] == 2
    assert human_eval.human_figures({"q6": outcomes["q6"]}, {"q6": "a"}, "sft", 0.95) == {
        "eval/human/left_out_vs_sft": 1, "eval/human/n_vs_sft": 0}


def test_flagged_annotators_are_left_out_as_the_apps_aggregation_does():
    # dan fails all three gold pairs and is flagged; without him q0 is 2-1 for the challenger, with him a 2-2 split
    gold = {"g0": "a", "g1": "b", "g2": "a"}
    votes = [Vote(g, who, answer) for g, answer in gold.items() for who in ("ann", "bob", "cy")]
    votes += [Vote(g, "dan", {"a": "b", "b": "a"}[answer]) for g, answer in gold.items()]
    votes += [Vote("q0", "ann", "a"), Vote("q0", "bob", "a"), Vote("q0", "cy", "b"), Vote("q0", "dan", "b")]
    result = campaign_figures(votes, gold, ["q0"], QualityPolicy(), min_votes=3)
    assert result.flagged == {"dan"}
    figures = human_eval.human_figures(result.outcomes, {"q0": "a"}, "sft", 0.95)
    assert figures["eval/human/wins_vs_sft"] == 1 and figures["eval/human/ties_vs_sft"] == 0
    counted = campaign_figures(votes, gold, ["q0"], QualityPolicy(gold_accuracy_threshold=0.0), min_votes=3)
    assert human_eval.human_figures(counted.outcomes, {"q0": "a"}, "sft", 0.95)["eval/human/ties_vs_sft"] == 1


def test_pairs_put_the_challenger_on_a_seeded_side_that_only_the_pair_records():
    pairs = human_eval.evaluation_pairs(PROMPTS, CHALLENGER_TEXTS, CHAMPION_TEXTS, "champion:v1", seed=0)
    again = human_eval.evaluation_pairs(PROMPTS, CHALLENGER_TEXTS, CHAMPION_TEXTS, "champion:v1", seed=0)
    pd.testing.assert_frame_equal(pairs, again)
    sides = [human_eval.challenger_side(label) for label in pairs["policy_version"]]
    assert set(sides) == {"a", "b"}  # both sides used
    for row, side, mine in zip(pairs.itertuples(), sides, CHALLENGER_TEXTS):
        assert getattr(row, f"response_{side}") == mine and "challenger" not in row.prompt
    assert set(pairs["policy_version"]) <= {"a=challenger,b=champion:v1", "a=champion:v1,b=challenger"}
    other = human_eval.evaluation_pairs(PROMPTS, CHALLENGER_TEXTS, CHAMPION_TEXTS, "champion:v1", seed=1)
    assert list(other["policy_version"]) != list(pairs["policy_version"])
    assert human_eval.challenger_side("policy-v1") is None and human_eval.challenger_side("a=sft,b=sft") is None
    assert human_eval.campaign_name("0123456789abcdef0123.dir", "champion", "3") == "human-0123456789ab-vs-v3"
    assert human_eval.campaign_name("0123456789abcdef0123.dir", "sft", None) == "human-0123456789ab-vs-sft"


def test_gold_pairs_are_a_right_and_a_wrong_answer_the_verifier_tells_apart():
    tasks = heldout_tasks(TasksParams(heldout_size=12))
    gold = human_eval.gold_pairs(tasks, "Give only the final answer.", 8, seed=0)
    assert len(gold) == 8 and set(gold["chosen"]) == {"a", "b"}
    by_prompt = {task_prompt(t, "Give only the final answer."): t for t in tasks}
    for row in gold.itertuples():
        task = by_prompt[row.prompt]
        assert is_correct(task, getattr(row, f"response_{row.chosen}"))
        assert not is_correct(task, getattr(row, f"response_{'b' if row.chosen == 'a' else 'a'}"))
    assert human_eval.gold_count(32, 0.1) == 5 and human_eval.gold_count(2, 0.1) == human_eval.MIN_GOLD
    with pytest.raises(human_eval.HumanEvalError, match="tasks.heldout_size"):
        human_eval.gold_pairs(tasks[:2], "Give only the final answer.", 3, seed=0)


def test_params_take_the_human_judge_and_refuse_what_cannot_work(tmp_path):
    from rlhf.labeling.cli import DEFAULT_DB

    assert EvaluateParams().human_database == DEFAULT_DB  # `rlhf label serve` finds the campaign by default
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"judges": ["verifier", "human"], "gate_judge": "human"}}))
    assert load_params(path).evaluate.gate_judge == "human"
    for bad in ({"human_annotators": 2}, {"human_gold_rate": 0.0}, {"judges": ["people"]}):
        path.write_text(yaml.safe_dump({"evaluate": bad}))
        with pytest.raises(ParamError, match=f"evaluate.{next(iter(bad))}"):
            load_params(path)
    with pytest.raises(ParamError, match="add 'human' to evaluate.judges"):
        check_judges(EvaluateParams(judges=["verifier"], gate_judge="human"))
    with pytest.raises(ParamError, match="human_prompts is 40"):
        check_judges(EvaluateParams(judges=["human"], gate_judge="human", human_prompts=40, heldout_prompts=32))


def test_the_gate_waits_for_people_only_after_the_absolute_limits():
    waiting = {"judge": "human", "opponent": "champion", "win_rate": None, "win_rate_lower": None,
               "proxy_win_rate": 0.6, "truthfulness_mc2": 0.4, "toxicity_probability": 0.05, "kl": 2.0,
               "human_campaign": "human-abc-vs-v1"}
    decision = promote.should_promote(waiting, {}, GATE)
    assert (decision.promote, decision.rule, decision.judge) == (False, promote.AWAITING_HUMAN, "human")
    assert "human-abc-vs-v1" in decision.reason and "rlhf gate" in decision.reason
    assert promote.should_promote({**waiting, "kl": 50.0}, {}, GATE).rule == "max_kl"  # no need to wait for people
    evaluation = {"eval/gate_judge": "human", "eval/human/campaign": "human-abc-vs-sft", "eval/human/opponent": "sft"}
    assert promote.gate_figures(evaluation, "sft")["human_campaign"] == "human-abc-vs-sft"
    assert "human_campaign" not in promote.gate_figures(evaluation, "champion")  # a campaign against someone else


def test_a_campaign_against_yesterdays_opponent_decides_nothing():
    assert human_gate.stale_opponent({"human.opponent_version": "1"}, "1") is None
    assert human_gate.stale_opponent({"human.opponent_version": ""}, None) is None
    moved = human_gate.stale_opponent({"human.opponent_version": "1"}, "2")
    assert moved.rule == "stale_evaluation" and moved.judge == "human" and "v2 is the champion now" in moved.reason
    assert "the SFT policy" in human_gate.stale_opponent({"human.opponent_version": ""}, "1").reason


# ------------------------------------------------------------------------------------------------
# Through evaluate, the registry and the labeling database
# ------------------------------------------------------------------------------------------------

def project_params(folder: Path, database: str, prompts: int = 6, gold_rate: float = 0.34):
    (folder / "params.yaml").write_text(yaml.safe_dump({
        "tasks": {"heldout_size": 20},
        "evaluate": {"judges": ["human"], "gate_judge": "human", "human_database": database,
                     "heldout_prompts": prompts, "human_prompts": prompts, "human_gold_rate": gold_rate},
        "promote": {"model_name": "tiny-policy", "reward_model_name": "tiny-reward"}}))
    return load_params(folder / "params.yaml")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder as cwd, with its own MLflow store and a challenger checkpoint folder to hash."""
    folder = tmp_path / "project"
    (folder / "models" / "policy").mkdir(parents=True)
    (folder / "models" / "policy" / "weights.bin").write_bytes(b"the challenger")
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def rollouts(challenger=CHALLENGER_TEXTS, opponent=CHAMPION_TEXTS, name="sft") -> dict:
    return {"challenger": Rollouts(texts=list(challenger)), name: Rollouts(texts=list(opponent))}


def label_all(database: str, campaign: str, people: dict, tasks) -> None:
    """Each person works through their queue with `people[name](prompt, left, right) -> 'A' | 'B' | 'tie'`; gold
    arithmetic is worked out right by everyone."""
    engine = make_engine(database)
    by_prompt = {task_prompt(t, "Give only the final answer."): t for t in tasks}
    with Session(engine) as db:
        found = campaigns.find_campaign(db, campaign)
        for name, decide in people.items():
            accounts.invite(db, name)
            annotator = db.scalar(select(Annotator).where(Annotator.name == name))
            while (item := campaigns.next_assignment(db, found, annotator)) is not None:
                left, right = campaigns.shown_responses(item)
                prompt = item.pair.prompt
                shown = (("A" if is_correct(by_prompt[prompt], left) else "B") if prompt in by_prompt
                         else decide(prompt, left, right))
                campaigns.record_vote(db, item, shown, None)
    engine.dispose()


def careful(prompt: str, left: str, right: str) -> str:
    return "tie" if "SAME" in left and "SAME" in right else "A" if "GOOD" in left else "B"


def test_evaluate_opens_one_campaign_per_challenger_and_a_rerun_keeps_it(project, tmp_path):
    database = f"sqlite:///{tmp_path / 'labeling.db'}"
    params = project_params(project, database)
    first = human_campaign(params, PROMPTS, rollouts())
    name = first["metrics"]["eval/human/campaign"]
    assert name == f"human-{tracking.dvc_md5('models/policy')[:12]}-vs-sft"
    assert first["mapping"]["created_by_this_run"] and first["metrics"]["eval/human/pairs"] == 6
    assert first["metrics"]["eval/human/votes"] == 0 and first["metrics"]["eval/human/votes_needed"] == 18
    assert "eval/human/win_rate_vs_sft" not in first["metrics"]
    assert [p["prompt"] for p in first["mapping"]["pairs"]] == PROMPTS
    # a rerun whose sampling gave other texts finds the campaign and keeps its pairs and their sides
    again = human_campaign(params, PROMPTS, rollouts(challenger=["other"] * 6, opponent=["texts"] * 6))
    assert again["metrics"]["eval/human/campaign"] == name and not again["mapping"]["created_by_this_run"]
    assert again["mapping"]["pairs"] == first["mapping"]["pairs"]
    engine = make_engine(database)
    with Session(engine) as db:
        assert db.scalar(select(func.count()).select_from(Campaign)) == 1
    engine.dispose()
    # once people have finished, a rerun carries the human win-rate, and the gate could decide at once
    label_all(database, name, {"ann": careful, "bob": careful, "cy": careful}, heldout_tasks(params.tasks))
    done = human_campaign(params, PROMPTS, rollouts())
    assert done["metrics"]["eval/human/win_rate_vs_sft"] == pytest.approx(5.5 / 6, abs=1e-4)
    assert done["metrics"]["eval/human/votes"] == 18


def register_awaiting(client: MlflowClient, params, evaluation: dict) -> str:
    """What the promote stage does for a challenger judged by people, without logging a model."""
    name = params.promote.model_name
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = str(client.create_model_version(name, source=str(Path("models/policy").resolve())).version)
    figures = promote.gate_figures(evaluation, "sft")
    decision = promote.should_promote(figures, promote.policy_figures(evaluation, "sft"), params.promote)
    promote.record_decision(client, name, version, decision, by="gate")
    for key, value in promote.awaiting_tags(evaluation, figures, promote.policy_figures(evaluation, "sft")).items():
        client.set_model_version_tag(name, version, key, value)
    return version


def test_an_open_campaign_leaves_the_version_waiting_and_a_complete_one_is_decided_by_people(project, tmp_path, capsys):
    database = f"sqlite:///{tmp_path / 'labeling.db'}"
    params = project_params(project, database)
    opened = human_campaign(params, PROMPTS, rollouts())
    evaluation = {**FIGURES, "eval/gate_judge": "human", **opened["metrics"]}
    tracking.use_project_store()
    client = MlflowClient()
    version = register_awaiting(client, params, evaluation)
    assert human_gate.awaiting_versions("tiny-policy") == [version]

    # two people of three have voted: not complete, nothing recorded
    label_all(database, opened["metrics"]["eval/human/campaign"], {"ann": careful, "bob": careful},
              heldout_tasks(params.tasks))
    assert rlhf_main(["gate", "--version", version]) == 0
    assert "not complete, 12 of 18 votes (0 of 6 pairs complete" in capsys.readouterr().out
    tags = client.get_model_version("tiny-policy", version).tags
    assert tags["gate.rule"] == promote.AWAITING_HUMAN and tags["gate.judge"] == "human"
    assert "gate.mlflow_run" not in tags
    started = time.monotonic()
    waited = human_gate.decide_when_complete("tiny-policy", version, database, params.promote, 0.95,
                                             wait_seconds=0.3, poll_seconds=0.1, report=lambda line: None)
    assert waited.decision is None and time.monotonic() - started < 5

    # the third person prefers the opponent once: still a majority for the challenger on every pair but the tie
    label_all(database, opened["metrics"]["eval/human/campaign"],
              {"cy": lambda p, left, right: ("B" if "GOOD" in left else "A") if p == PROMPTS[0] else careful(p, left, right)},
              heldout_tasks(params.tasks))
    result = human_gate.decide("tiny-policy", version, database, params.promote, 0.95)
    assert result.decision.judge == "human" and result.decision.rule == "beats_sft" and result.decision.promote
    assert result.figures["eval/human/wins_vs_sft"] == 5 and result.figures["eval/human/ties_vs_sft"] == 1
    tags = client.get_model_version("tiny-policy", version).tags
    assert tags["gate.rule"] == "beats_sft" and tags["gate.judge"] == "human"
    assert tags["human.win_rate_vs_sft"] == str(result.figures["eval/human/win_rate_vs_sft"])
    assert str(client.get_model_version_by_alias("tiny-policy", "champion").version) == version
    run = client.get_run(tags["gate.mlflow_run"])
    assert run.data.tags["registry.version"] == version and run.data.tags["gate.judge"] == "human"
    assert run.data.metrics["eval/human/win_rate_vs_sft"] == pytest.approx(5.5 / 6, abs=1e-4)
    assert human_gate.awaiting_versions("tiny-policy") == []
    with pytest.raises(human_eval.HumanEvalError, match="is not awaiting a human decision: its gate decision is "
                                                        "'beats_sft' by the human judge"):
        human_gate.decide("tiny-policy", version, database, params.promote, 0.95)


def test_what_a_user_can_get_wrong_is_one_paragraph_naming_the_fix(project, tmp_path, capsys):
    database = f"sqlite:///{tmp_path / 'labeling.db'}"
    params = project_params(project, database)
    opened = human_campaign(params, PROMPTS, rollouts())
    tracking.use_project_store()
    client = MlflowClient()
    version = register_awaiting(client, params, {**FIGURES, "eval/gate_judge": "human", **opened["metrics"]})

    assert rlhf_main(["gate", "--version", "99"]) == 2
    assert "has no version '99'" in capsys.readouterr().err
    assert rlhf_main(["gate", "--version", version, "--db", f"sqlite:///{tmp_path / 'elsewhere.db'}"]) == 2
    err = capsys.readouterr().err
    assert "there is no labeling database at" in err and "rlhf gate --db" in err
    assert not (tmp_path / "elsewhere.db").exists()  # reading never creates an empty database
    other = f"sqlite:///{tmp_path / 'other.db'}"
    make_engine(other).dispose()
    human_eval.open_campaign(other, "something-else", human_eval.evaluation_pairs(
        PROMPTS[:1], ["x"], ["y"], "sft", 0), human_eval.gold_pairs(heldout_tasks(params.tasks), "", 3, 0), 3, 0.1, 0)
    assert rlhf_main(["gate", "--version", version, "--db", other]) == 2
    assert f"there is no campaign '{opened['metrics']['eval/human/campaign']}'" in capsys.readouterr().err
    assert rlhf_main(["gate", "--version", version, "--wait", "-1"]) == 2
    assert "--wait is -1.0" in capsys.readouterr().err
    with pytest.raises(human_eval.HumanEvalError, match="is not a database URL"):
        human_eval.read_campaign("not a url", "x", QualityPolicy())
    # a campaign of the same name that evaluate did not open is not read as one
    plain = f"sqlite:///{tmp_path / 'plain.db'}"
    rows = human_eval.evaluation_pairs(PROMPTS[:2], ["x", "y"], ["z", "w"], "sft", 0).assign(policy_version="v1")
    engine = make_engine(plain)
    upgrade_database(engine)
    with Session(engine) as db:
        campaigns.create_campaign(db, "human-0000-vs-sft", rows, gold_rate=0.0)
    engine.dispose()
    with pytest.raises(human_eval.HumanEvalError, match="was not opened by evaluate"):
        human_eval.read_campaign(plain, "human-0000-vs-sft", QualityPolicy())


# ------------------------------------------------------------------------------------------------
# The browser: three annotators decide a promotion through the real app
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) is not installed")
    from tests.labeling.test_browser import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` provides it")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def serve_app(app):
    """uvicorn with the labeling app in a thread on a free loopback port; returns (base URL, server, thread)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 20 s"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def vote_in_browser(page, base_url: str, campaign: str, decide) -> list[str]:
    """Judge with the keyboard until the done page; returns the prompts seen."""
    keys = {"A": "a", "B": "b", "tie": "t"}
    page.goto(f"{base_url}/campaigns/{campaign}/label")
    seen = []
    while page.query_selector("#vote-form"):
        prompt = page.inner_text(".prompt .text")
        seen.append(prompt)
        with page.expect_navigation():
            page.keyboard.press(keys[decide(prompt, page.inner_text("#response-A"), page.inner_text("#response-B"))])
    assert page.query_selector("#done")
    return seen


@pytest.mark.browser
def test_three_annotators_in_chromium_decide_the_promotion_and_mlflow_records_it(
        project, tmp_path, tiny_model_dir, chromium, capsys):
    from rlhf.labeling.app import create_app
    from tests.conftest import build_tiny_model
    from tests.labeling.support import create_account
    from tests.labeling.test_browser import log_in

    database = f"sqlite:///{tmp_path / 'labeling.db'}"
    params = project_params(project, database)
    tracking.use_project_store()
    client = MlflowClient()
    import mlflow

    # the champion: v1 of tiny-policy, promoted by the gate long ago
    with mlflow.start_run(run_name="earlier-cycle"):
        champion = promote.register_checkpoint(str(tiny_model_dir), "tiny-policy", "text-generation", {})
    promote.record_decision(client, "tiny-policy", champion, promote.Decision(True, "beats_sft", "earlier", "verifier"),
                            by="gate")
    # the challenger: another tiny model in models/policy, with a reward model beside it
    shutil.rmtree("models/policy")
    shutil.copytree(tiny_model_dir, "models/policy")
    vocab_size = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_model(vocab_size, seed=1).save_pretrained("models/policy")
    shutil.copytree(tiny_model_dir, "models/reward")

    # evaluate's human judge opens the campaign: challenger vs champion v1 on six held-out prompts
    opened = human_campaign(params, PROMPTS, rollouts(name="champion"))
    campaign = opened["metrics"]["eval/human/campaign"]
    assert campaign.endswith("-vs-v1") and opened["metrics"]["eval/human/opponent_version"] == "1"
    Path("metrics").mkdir()
    Path("metrics/evaluate.json").write_text(json.dumps({**FIGURES, "eval/gate_judge": "human", **opened["metrics"]}))
    # the promote stage registers the challenger and leaves it waiting for people
    assert promote.main() == 0
    version = str(json.loads(Path("metrics/promote.json").read_text())["promote/version"])
    tags = client.get_model_version("tiny-policy", version).tags
    assert (tags["gate.rule"], tags["gate.judge"], tags["human.campaign"]) == (promote.AWAITING_HUMAN, "human", campaign)
    assert str(client.get_model_version_by_alias("tiny-policy", "champion").version) == champion
    assert rlhf_main(["gate", "--version", version]) == 0
    assert "not complete, 0 of 18 votes" in capsys.readouterr().out

    # three annotators log in and vote in Chromium; gold arithmetic comes between the pairs
    for name in ("ann", "bob", "cy"):
        create_account(database, name)
    tasks = {task_prompt(t, params.tasks.instruction): t for t in heldout_tasks(params.tasks)}

    def person(contrary_on: str | None):
        def decide(prompt: str, left: str, right: str) -> str:
            if prompt in tasks:  # gold: work the sum out
                return "A" if is_correct(tasks[prompt], left) else "B"
            choice = careful(prompt, left, right)
            return {"A": "B", "B": "A"}[choice] if prompt == contrary_on else choice
        return decide

    base_url, server, thread = serve_app(create_app(database))
    try:
        seen = {}
        for name, contrary_on in (("ann", None), ("bob", None), ("cy", PROMPTS[0])):
            page = chromium.new_context(viewport={"width": 1200, "height": 800}).new_page()
            log_in(page, base_url, name)
            seen[name] = vote_in_browser(page, base_url, campaign, person(contrary_on))
            page.context.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    for prompts in seen.values():
        assert sorted(p for p in prompts if p not in tasks) == sorted(PROMPTS)  # every pair, overlap 3
        assert sum(p in tasks for p in prompts) >= 2  # gold interleaved

    # the gate reads the human win-rate and records the decision
    assert rlhf_main(["gate", "--version", version]) == 0
    out = capsys.readouterr().out
    assert "18 of 18 votes" in out and "is the new champion, judged by human (beats_champion" in out, out
    tags = client.get_model_version("tiny-policy", version).tags
    assert (tags["gate.promote"], tags["gate.rule"], tags["gate.judge"]) == ("True", "beats_champion", "human")
    assert tags["human.win_rate_vs_champion"] == "0.9167" and tags["human.wins_vs_champion"] == "5"
    assert str(client.get_model_version_by_alias("tiny-policy", "champion").version) == version
    run = client.get_run(tags["gate.mlflow_run"])
    assert run.data.tags["registry.version"] == version and run.data.tags["rlhf.kind"] == "human_gate"
    metrics = run.data.metrics
    assert metrics["eval/human/win_rate_vs_champion"] == pytest.approx(0.9167)
    assert metrics["eval/human/win_rate_vs_champion_lower"] == pytest.approx(0.5168, abs=1e-4)
    assert (metrics["eval/human/wins_vs_champion"], metrics["eval/human/ties_vs_champion"],
            metrics["eval/human/losses_vs_champion"]) == (5, 1, 0)
    assert metrics["human/annotators"] == 3 and metrics["human/flagged"] == 0
    print(f"human win-rate {metrics['eval/human/win_rate_vs_champion']:.4f} "
          f"[{metrics['eval/human/win_rate_vs_champion_lower']:.4f}, "
          f"{metrics['eval/human/win_rate_vs_champion_upper']:.4f}]; {tags['gate.rule']}: {tags['gate.reason']}")


@pytest.mark.slow
def test_the_scheduled_flow_decides_every_version_awaiting_people_and_reports_the_rest(project, tmp_path):
    from flows.human_gate import human_gate as flow

    database = f"sqlite:///{tmp_path / 'labeling.db'}"
    params = project_params(project, database)
    opened = human_campaign(params, PROMPTS, rollouts())
    tracking.use_project_store()
    client = MlflowClient()
    evaluation = {**FIGURES, "eval/gate_judge": "human", **opened["metrics"]}
    decided, lost, waiting = (register_awaiting(client, params, evaluation) for _ in range(3))
    client.set_model_version_tag("tiny-policy", lost, "human.campaign", "human-deleted-vs-sft")
    label_all(database, opened["metrics"]["eval/human/campaign"], {"ann": careful, "bob": careful, "cy": careful},
              heldout_tasks(params.tasks))
    # the third version's campaign is still open in another database
    other = f"sqlite:///{tmp_path / 'other.db'}"
    human_eval.open_campaign(other, "human-open-vs-sft", human_eval.evaluation_pairs(PROMPTS, CHALLENGER_TEXTS,
                             CHAMPION_TEXTS, "sft", 0), human_eval.gold_pairs(heldout_tasks(params.tasks), "", 3, 0), 3,
                             0.1, 0)
    client.set_model_version_tag("tiny-policy", waiting, "human.campaign", "human-open-vs-sft")

    with pytest.raises(RuntimeError, match=f"v{lost}: there is no campaign 'human-deleted-vs-sft'"):
        flow(model_name="tiny-policy", database=database)
    assert client.get_model_version("tiny-policy", decided).tags["gate.rule"] == "beats_sft"
    # the open campaign lives elsewhere: the flow run with that database finds it open and leaves it waiting
    client.set_model_version_tag("tiny-policy", lost, "gate.rule", "stale_evaluation")  # someone dealt with it
    assert "not complete" in flow(model_name="tiny-policy", database=other)[waiting]
    assert human_gate.awaiting_versions("tiny-policy") == [waiting]
