"""collect: the position-swap verdicts, both judge backends, the policy sampler and the importers."""
from __future__ import annotations

import dataclasses
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf import judges
from rlhf.collect import load_prompts, sample_pairs
from rlhf.importers import import_comparisons, place_pair, split_hh_transcript
from rlhf.judges import combine_orders, http_margins, judge_pairs, position_bias, transformers_margins, verdict_margin
from rlhf.params import CollectParams, ParamError

from .conftest import SHARED_DATA

HH = SHARED_DATA / "hh-rlhf"
NOW = pd.Timestamp("2026-01-01", tz="UTC")


# ---- position swap ---------------------------------------------------------------------------

def test_orders_that_agree_give_the_label():
    # a judge with no position preference: order ba mirrors order ab
    assert combine_orders(2.0, -2.0, 0.05) == ("a", "a", "a", "consistent")
    assert combine_orders(-1.0, 1.0, 0.05) == ("b", "b", "b", "consistent")


def test_orders_that_disagree_are_recorded_as_inconsistent_without_a_label():
    # the judge prefers whatever is shown first, in both orders
    verdict = combine_orders(2.0, 2.0, 0.05)
    assert verdict.chosen is None and verdict.outcome == "inconsistent"
    assert (verdict.vote_ab, verdict.vote_ba) == ("a", "b")
    # a decisive order against an undecided one is not agreement either
    assert combine_orders(1.0, 0.01, 0.05).outcome == "inconsistent"


def test_both_orders_within_the_margin_are_a_tie():
    assert combine_orders(0.03, -0.02, 0.05) == ("tie", "tie", "tie", "tie")


def test_removing_the_first_position_bias_turns_a_biased_judge_consistent():
    # β = 2 nats for position A on top of a real preference of 1 nat for response a
    m_ab, m_ba = 2 + 1.0, 2 - 1.0
    assert combine_orders(m_ab, m_ba, 0.05).outcome == "inconsistent"
    assert position_bias(np.array([m_ab]), np.array([m_ba])) == pytest.approx(2.0)
    assert combine_orders(m_ab, m_ba, 0.05, bias=2.0).chosen == "a"
    assert position_bias(np.array([1.5, -0.3]), np.array([-1.5, 0.3])) == 0.0  # mirror images: no bias


def _longer_is_better(bias: float):
    """A fake judge: prefers the longer reply by 1 nat per 10 characters, plus `bias` for whatever is shown first."""
    def margins(prompts, firsts, seconds, progress):
        return np.array([(len(f) - len(s)) / 10 + bias for f, s in zip(firsts, seconds)])
    return margins


def test_judge_pairs_records_both_orders_and_the_label(tmp_path):
    triples = [("q1", "a long and careful answer", "short"), ("q2", "meh", "a longer, better answer"), ("q3", "same", "same")]
    params = CollectParams(judge_debias=False)
    judged = judge_pairs(triples, _longer_is_better(bias=0.0), params, "fake")
    assert judged["chosen"].tolist() == ["a", "b", "tie"]
    assert judged["outcome"].tolist() == ["consistent", "consistent", "tie"]
    assert np.allclose(judged["margin_ab"], -judged["margin_ba"])

    biased = judge_pairs(triples, _longer_is_better(bias=5.0), params, "fake")
    assert biased["outcome"].tolist() == ["inconsistent"] * 3  # whatever is shown first wins, in both orders
    debiased = judge_pairs(triples, _longer_is_better(bias=5.0), CollectParams(judge_debias=True), "fake")
    assert debiased["bias"].iloc[0] == pytest.approx(5.0)
    assert debiased["chosen"].tolist() == ["a", "b", "tie"]


# ---- judge backends --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    from rlhf.checkpoints import load_tokenizer
    from rlhf.models import load_causal_lm

    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_transformers_margins_do_not_depend_on_the_padding_of_the_batch(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = ["what is two plus two?", "explain why the sky is blue in one sentence, please, with care"]
    firsts, seconds = ["four", "light scatters more at short wavelengths"], ["five", "the sky is a lazy dog"]
    together = transformers_margins(model, tokenizer, prompts, firsts, seconds, 200, batch_size=2)
    alone = [transformers_margins(model, tokenizer, [p], [a], [b], 200, batch_size=1)[0]
             for p, a, b in zip(prompts, firsts, seconds)]
    assert np.isfinite(together).all()
    assert np.allclose(together, alone, atol=1e-4)  # left padding shifts no position


def test_transformers_margin_equals_the_log_softmax_difference(tiny_lm):
    model, tokenizer = tiny_lm
    prompt, first, second = "what is two plus two?", "four", "the quick brown fox"
    margin = transformers_margins(model, tokenizer, [prompt], [first], [second], 200, batch_size=1)[0]
    text = tokenizer.apply_chat_template(judges.judge_messages(prompt, first, second, 200), add_generation_prompt=True,
                                         tokenize=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1], -1)
    a, b = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in judges.VERDICT_TOKENS)
    assert margin == pytest.approx(float(logp[a] - logp[b]), abs=1e-5)


def test_verdict_margin_from_top_logprobs():
    top = [{"token": " A", "logprob": -0.2}, {"token": "B", "logprob": -1.9}, {"token": "The", "logprob": -3.0}]
    assert verdict_margin(top) == pytest.approx(1.7)
    # a letter missing from the list gets the lowest listed log-probability
    assert verdict_margin([{"token": "B", "logprob": -0.1}, {"token": "x", "logprob": -4.0}]) == pytest.approx(-3.9)
    assert verdict_margin([]) == 0.0


class _FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/chat/completions whose judge prefers the reply that says 'good', whatever its position."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        first = text.split("Reply A:\n", 1)[1].split("\n\nReply B:", 1)[0]
        p_a = -0.1 if "good" in first else -2.5
        top = [{"token": "A", "logprob": p_a}, {"token": "B", "logprob": -2.6 - p_a}]
        reply = {"choices": [{"logprobs": {"content": [{"token": "A", "logprob": p_a, "top_logprobs": top}]}}],
                 "model": body["model"]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_judge_against_an_openai_compatible_server():
    server = HTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        params = CollectParams(judge="http", judge_url=url, judge_model="served-judge")
        margins = lambda p, a, b, progress: http_margins(url, "served-judge", p, a, b, 200, progress)  # noqa: E731
        judged = judge_pairs([("q", "a good answer", "bad"), ("q2", "bad", "good one")], margins, params, "served-judge")
    finally:
        server.shutdown()
    assert judged["chosen"].tolist() == ["a", "b"] and set(judged["outcome"]) == {"consistent"}


def test_unreachable_judge_server_is_a_transient_error(monkeypatch):
    monkeypatch.setattr(judges.time, "sleep", lambda s: None)
    with pytest.raises(judges.JudgeUnreachable, match="did not answer after 3 tries"):
        http_margins("http://127.0.0.1:9/v1", "m", ["q"], ["a"], ["b"], 100)


# ---- policy sampling -------------------------------------------------------------------------

def test_sampler_is_seeded_and_drops_identical_pairs_with_a_count(tiny_lm):
    from transformers import set_seed

    model, tokenizer = tiny_lm
    prompts = ["what is two plus two?", "write a short poem about rain", "explain why the sky is blue"]
    params = CollectParams(max_new_tokens=8, batch_size=2, temperature=1.0, top_p=1.0)
    set_seed(0)
    first, counts = sample_pairs(model, tokenizer, prompts, params)
    set_seed(0)
    again, _ = sample_pairs(model, tokenizer, prompts, params)
    assert first == again and counts["collect/prompts"] == 3
    assert counts["collect/pairs_sampled"] + counts["collect/dropped_identical"] == 3
    assert all(a != b for _, a, b in first)

    # near-greedy sampling makes both samples the same: resampled twice, then dropped and counted
    greedy = dataclasses.replace(params, temperature=1e-6, resample_identical=2)
    kept, counts = sample_pairs(model, tokenizer, prompts, greedy)
    assert kept == [] and counts["collect/dropped_identical"] == 3 and counts["collect/resampled_identical"] == 6


def test_prompt_pool_is_drawn_with_the_seed(tmp_path):
    embedded = load_prompts(CollectParams(sources=("policy",), num_prompts=5, seed=1))
    assert embedded == load_prompts(CollectParams(sources=("policy",), num_prompts=5, seed=1)) and len(set(embedded)) == 5
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a?", "b?", "a?"]))
    assert sorted(load_prompts(CollectParams(sources=("policy",), prompts=str(pool), prompt_field="text", num_prompts=0))) == ["a?", "b?"]
    with pytest.raises(ParamError, match="collect.num_prompts is 3, but the prompt pool holds 2 distinct"):
        load_prompts(CollectParams(sources=("policy",), prompts=str(pool), prompt_field="text", num_prompts=3))
    with pytest.raises(ParamError, match=r"`prompt` is None"):
        load_prompts(CollectParams(sources=("policy",), prompts=str(pool), num_prompts=0))


# ---- import ----------------------------------------------------------------------------------

def test_hh_transcript_split_into_prompt_and_final_turns():
    chosen = "\n\nHuman: Hi, can you help?\n\nAssistant: Sure.\n\nHuman: Name a fruit.\n\nAssistant: An apple."
    rejected = "\n\nHuman: Hi, can you help?\n\nAssistant: Sure.\n\nHuman: Name a fruit.\n\nAssistant: A car."
    prompt, good, bad = split_hh_transcript(chosen, rejected)
    assert prompt == "Human: Hi, can you help?\n\nAssistant: Sure.\n\nHuman: Name a fruit."
    assert (good, bad) == ("An apple.", "A car.")
    # one question loses its label; replies that share their first words still split at the turn
    assert split_hh_transcript("\n\nHuman: Why?\n\nAssistant: I think so", "\n\nHuman: Why?\n\nAssistant: I think not") \
        == ("Why?", "I think so", "I think not")
    assert split_hh_transcript("no turns here", "none here either") is None


def test_imported_preferences_are_balanced_between_positions():
    labels = [place_pair(f"set:{i}", "good", "bad", seed=0)[2] for i in range(400)]
    assert 0.4 < labels.count("a") / 400 < 0.6
    for i in range(20):
        a, b, label = place_pair(f"set:{i}", "good", "bad", seed=0)
        assert {"a": a, "b": b}[label] == "good"


@pytest.mark.skipif(not HH.exists(), reason=f"the hh-rlhf test files are not at {HH} (see /work/shared/data)")
def test_hh_rlhf_parser_on_real_rows():
    files = sorted(HH.glob("*/test.jsonl.gz"))
    assert len(files) == 4
    parsed = identical = 0
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for _, line in zip(range(300), f)]
        for row in rows:
            prompt, chosen, rejected = split_hh_transcript(row["chosen"], row["rejected"])
            multi_turn = row["chosen"].count("\n\nHuman:") > 1
            assert prompt.startswith("Human: ") == multi_turn and prompt in row["chosen"]
            # the prompt, then an Assistant turn holding the reply
            assert row["chosen"].strip().endswith(chosen) and row["rejected"].strip().endswith(rejected)
            shared = row["chosen"][:row["chosen"].index(prompt) + len(prompt)]
            assert row["rejected"].startswith(shared)
            parsed += 1
            identical += chosen == rejected
            assert (chosen == rejected) == (row["chosen"] == row["rejected"])
    assert parsed == 1200 and identical >= 1  # hh-rlhf has a few identical pairs; validate quarantines them

    params = CollectParams(sources=["import"], import_data=str(HH), import_limit=500, seed=0)
    frame, quarantine, counts = import_comparisons(params, NOW)
    assert counts["collect/import_lines"] == counts["collect/import_available"] == 8552
    assert counts["collect/import_quarantined"] == 0 and quarantine.empty
    assert len(frame) == 500 and frame["pair_id"].is_unique
    assert set(frame["source"]) == {f"import:hh-rlhf/{s}/test" for s in
                                    ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")}
    assert 0.4 < (frame["chosen"] == "a").mean() < 0.6
    first = frame.iloc[0]
    line = int(first["pair_id"].rsplit(":", 1)[1])
    subset = first["source"].split("/")[1]
    with gzip.open(HH / subset / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        row = json.loads(next(line_text for n, line_text in enumerate(f, start=1) if n == line))
    winner = first["response_a"] if first["chosen"] == "a" else first["response_b"]
    assert row["chosen"].strip().endswith(winner)


def test_generic_pairs_import_with_a_field_mapping(tmp_path):
    rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(6)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "more.parquet")
    params = CollectParams(sources=["import"], import_data=str(tmp_path), import_format="pairs",
                           import_prompt_field="question", import_chosen_field="good", import_rejected_field="bad")
    frame, _, counts = import_comparisons(params, NOW)
    assert counts["collect/imported"] == 12
    assert set(frame["source"]) == {f"import:{tmp_path.name}/pairs", f"import:{tmp_path.name}/more"}
    for _, row in frame.iterrows():
        winner = row["response_a"] if row["chosen"] == "a" else row["response_b"]
        assert winner.startswith("yes")

    # a field no row has: every line is quarantined alike, which is a mapping to fix, not data to skip
    with pytest.raises(ParamError, match=r"none of the 12 lines .*\(missing_field: 12\).*no `prompt` in the row"):
        import_comparisons(dataclasses.replace(params, import_prompt_field="prompt"), NOW)
    # a line that is not UTF-8 is quarantined with its bytes; the other twelve are imported
    (tmp_path / "broken.jsonl").write_bytes(b'{"question": "q", "good": "\xff", "bad": "x"}\n')
    frame, quarantine, counts = import_comparisons(params, NOW)
    assert counts["collect/imported"] == 12 and counts["collect/import_quarantined/invalid_utf8"] == 1
    assert quarantine[["file", "line", "reason", "raw_encoding"]].values.tolist() == [
        [str(tmp_path / "broken.jsonl"), 1, "invalid_utf8", "base64"]]


def test_verifiable_prompts_join_the_pool_and_the_verifier_judges_their_pairs(tmp_path, monkeypatch, tiny_model_dir):
    import yaml

    from rlhf import collect
    from rlhf.params import load_params
    from rlhf.verifiers import is_correct, task_prompt, train_tasks

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"precision": "fp32"},  # judge_model is then not model.policy, so it loads from its own folder
        "collect": {"sources": ["policy"], "num_prompts": 2, "verifiable_prompts": 3, "policy": str(tiny_model_dir),
                    "judge_model": str(tiny_model_dir), "judge_rubric": False, "max_new_tokens": 4}}))
    params = load_params(tmp_path / "params.yaml")
    tasks = {task_prompt(t, params.tasks.instruction): t for t in train_tasks(params.tasks, 3)}

    def scripted_pairs(model, tokenizer, prompts, p):  # a right and a wrong answer to each task, in turn
        triples = []
        for i, prompt in enumerate(prompts):
            if prompt in tasks:
                right, wrong = tasks[prompt].answer, str(int(tasks[prompt].answer) + 1)
                triples.append((prompt, right, wrong) if i % 2 else (prompt, wrong, right))
            else:
                triples.append((prompt, "one reply", "another reply"))
        return triples, {}

    monkeypatch.setattr(collect, "sample_pairs", scripted_pairs)
    rows, judged, metrics = collect.policy_comparisons(params, pd.Timestamp("2026-01-01", tz="UTC"))
    verified = rows[rows["source"] == "judge:verifier"]
    assert len(rows) == 5 and len(verified) == 3 and set(verified["prompt"]) == set(tasks)
    for _, row in verified.iterrows():  # the verifier picked the correct answer every time
        winner = row["response_a"] if row["chosen"] == "a" else row["response_b"]
        assert is_correct(tasks[row["prompt"]], winner)
    assert metrics["verifier/decisive"] == 3 and metrics["collect/verifiable_pairs"] == 3
    assert list(judged["pair_id"]) == list(rows["pair_id"])
    assert set(judged.loc[judged["judge"] == "verifier", "outcome"]) == {"consistent"}
    assert metrics["collect/policy_version"].startswith(tiny_model_dir.name)


def test_collect_samples_from_the_champion_the_refeed_stage_found(tmp_path, monkeypatch):
    from rlhf import collect

    monkeypatch.chdir(tmp_path)
    p = CollectParams(policy="champion")
    monkeypatch.setattr(collect, "policy_version", lambda folder: f"{folder}@hash")
    with pytest.raises(ParamError, match="collect.policy is 'champion', but data/feedback/sampling_policy.json is missing"):
        collect.sampling_policy(p)
    (tmp_path / "data" / "feedback").mkdir(parents=True)
    snapshot = tmp_path / "data" / "feedback" / "sampling_policy.json"
    snapshot.write_text(json.dumps({"collect.policy": "champion", "model_name": "rlhf-policy", "version": None}))
    assert collect.sampling_policy(p) == ("models/base", "models/base@hash")  # the first cycle
    snapshot.write_text(json.dumps({"collect.policy": "champion", "model_name": "rlhf-policy", "version": "3"}))
    monkeypatch.setattr(collect, "download_checkpoint", lambda uri: tmp_path / uri.replace(":/", "-").replace("/", "-"))
    assert collect.sampling_policy(p) == (str(tmp_path / "models-rlhf-policy-3"), "rlhf-policy/3")
    assert collect.sampling_policy(CollectParams(policy="models/other")) == ("models/other", "models/other@hash")
