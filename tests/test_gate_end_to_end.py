"""The promotion gate on tiny checkpoints whose behaviour is set by hand: each cycle runs the evaluate stage's
`main()` (the verifier judge's gold accuracy and win-rate, the proxy RM's win-rate) and then the promote stage's,
in a throwaway project folder with its own MLflow registry. No training.

The models are the fixtures' tiny Llama after weight surgery (see `answering_policy` and `proxy_reward_model`):
- a policy replies with one fixed string to every prompt ("True", "False" or "False!");
- the held-out verifiable tasks are reasoning-gym's isomorphic_strings with p_solvable 1.0, so every gold answer is
  "True": a policy that says "True" is right on all of them, one that says "False" on none;
- the proxy reward model's score grows with a reply's share of "!" tokens, so it prefers the "False!" policy's replies to
  anyone's, whatever the verifier says: the reward model a policy could game.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from rlhf import evaluate, promote
from rlhf.chat import prompt_and_reply_ids, prompt_ids
from rlhf.checkpoints import load_tokenizer
from rlhf.models import load_causal_lm
from rlhf.params import TasksParams
from rlhf.registry import CHAMPION
from rlhf.rewards import NORMALIZATION_KEY, load_reward_model, pad_right, rewards
from rlhf.rollouts import eos_ids, greedy_replies
from rlhf.verifiers import heldout_tasks, task_prompt
from tests.conftest import build_tiny_model, build_tiny_tokenizer, write_tiny_comparisons

LOGIT = 30.0  # the chosen next token's logit, every other token's is 0: p(chosen) ≥ 1 − V·e^−30 ≈ 1 − 4e-11
RIGHT, WRONG, HACK = "True", "False", "False!"  # the policies' replies; the proxy RM likes "!"
LIKED = "!"
TASKS = {"heldout_size": 12, "generators": [{"name": "isomorphic_strings", "config": {"p_solvable": 1.0}}]}
TRUTHFULNESS = "truthfulness.json"  # the probe's first 4 questions: all 116 take ~25 s a model on a 2-core CPU
PARAMS = {
    "model": {"precision": "fp32"},
    "tasks": TASKS,
    "evaluate": {"judges": ["verifier"], "gate_judge": "verifier", "truthfulqa": TRUTHFULNESS,
                 "heldout_prompts": 2, "max_new_tokens": 8, "max_prompt_len": 64, "batch_size": 4,
                 "toxicity_prompt_count": 3, "toxicity_k": 2, "toxicity_max_new_tokens": 4,
                 "verifier_max_new_tokens": 8},
    # the real win-rate bound (0.5); the KL limit is wide because a crafted policy's next-token distribution is
    # near one-hot, so its KL to another crafted policy is ~LOGIT nats a reply
    "promote": {"model_name": "tiny-policy", "reward_model_name": "tiny-reward", "min_win_rate_lower_bound": 0.5,
                "max_kl": 1000.0},
}


# ------------------------------------------------------------------------------------------------
# Weight surgery
# ------------------------------------------------------------------------------------------------

def zero_block_outputs(model) -> None:
    """Every layer's attention output (o_proj) and MLP output (down_proj) set to 0: each position's residual
    stream is then its own token's embedding, all the way to the final norm."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@torch.no_grad()
def answering_policy(tokenizer, reply: str) -> LlamaForCausalLM:
    """A tiny Llama whose reply to every chat prompt is `reply`, then EOS: a bigram table in its weights.

    With `zero_block_outputs` the next token depends on the current token only. The chain's tokens (the
    generation prompt's last token, then the reply's) get one-hot embeddings in dimensions no other token uses,
    and the untied LM head maps each to its successor with logit LOGIT (the final RMSNorm scales a one-hot to √H),
    every other token getting 0; so sampling at temperature 1 follows the chain as greedy decoding does. After
    any other token the next one is uniform.
    """
    chain = [prompt_ids(tokenizer, "any prompt")[-1], *tokenizer(reply, add_special_tokens=False)["input_ids"],
             tokenizer.eos_token_id]
    successor = {}
    for token, following in zip(chain, chain[1:]):
        if successor.setdefault(token, following) != following:
            raise ValueError(f"the reply {reply!r} repeats token {token} with another token after it; a bigram table "
                             "holds one successor a token. Choose a reply whose tokens differ.")
    config = build_tiny_model(len(tokenizer)).config  # the fixtures' tiny Llama, with an LM head of its own
    config.tie_word_embeddings = False
    model = LlamaForCausalLM(config)
    zero_block_outputs(model)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight.zero_()
    embed[:, :len(successor)] = 0
    for dim, (token, following) in enumerate(successor.items()):
        embed[token] = 0
        embed[token, dim] = 1.0
        head[following, dim] = LOGIT / config.hidden_size ** 0.5
    return model.eval()


@torch.no_grad()
def proxy_reward_model(tokenizer, liked: str) -> LlamaForSequenceClassification:
    """A tiny Llama reward model whose score grows with the share of `liked` (one token) in the text it reads.

    Layer 0's attention has q = k = 0, so its last position attends uniformly to every position; its value reads
    the one dimension `liked` is embedded in, and its output writes that mean into a pooling dimension, which the
    score head reads (`zero_block_outputs` first, so nothing else reaches the residual stream). No other token has
    anything in those two dimensions: a text without `liked` scores exactly 0, one with it above 0.
    """
    (token,) = tokenizer(liked, add_special_tokens=False)["input_ids"]
    config = build_tiny_model(len(tokenizer)).config
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    zero_block_outputs(model)
    liked_dim, pool_dim = 0, 1
    embed = model.model.embed_tokens.weight
    embed[:, [liked_dim, pool_dim]] = 0
    embed[token] = 0
    embed[token, liked_dim] = 1.0
    attention = model.model.layers[0].self_attn
    attention.q_proj.weight.zero_()
    attention.k_proj.weight.zero_()
    attention.v_proj.weight.zero_()[0, liked_dim] = 1.0  # key/value head 0, channel 0
    attention.o_proj.weight[pool_dim, 0] = 1.0  # query head 0 (reading key/value head 0), channel 0
    model.score.weight.zero_()[0, pool_dim] = 1.0
    setattr(model.config, NORMALIZATION_KEY, {"mean": 0.0, "std": 1.0, "responses": 1})  # scores as they come
    return model.eval()


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    """Saved checkpoints: a policy folder per reply, and the proxy reward model under 'reward'."""
    root = tmp_path_factory.mktemp("crafted")
    tokenizer = build_tiny_tokenizer()
    models = {reply: answering_policy(tokenizer, reply) for reply in (RIGHT, WRONG, HACK)}
    models["reward"] = proxy_reward_model(tokenizer, LIKED)
    folders = {name: root / name.replace("!", "-hack") for name in models}
    for name, model in models.items():
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def test_the_crafted_models_answer_and_score_as_built(crafted):
    tokenizer = load_tokenizer(crafted[RIGHT])
    tasks = heldout_tasks(TasksParams(**TASKS))
    assert {t.answer for t in tasks} == {"True"} and len({t.question for t in tasks}) == 12
    prompts = ["why is rain wet?", "name a colour", task_prompt(tasks[0], "Give only the final answer.")]
    for reply in (RIGHT, WRONG, HACK):
        model = load_causal_lm(crafted[reply]).eval()  # as the stages load it
        replies = greedy_replies(model, tokenizer, prompts, 8, 4, 64, eos_ids(model, tokenizer), "cpu")
        assert replies == [reply] * len(prompts)
    reward_model, stats = load_reward_model(crafted["reward"])
    rows = [sum(prompt_and_reply_ids(tokenizer, prompt, reply), []) for reply in (RIGHT, WRONG, HACK)
            for prompt in prompts]
    scores = rewards(reward_model, *pad_right(rows, tokenizer.pad_token_id)).view(3, len(prompts))
    assert stats["std"] == 1.0
    assert scores[0].abs().max() == 0 and scores[1].abs().max() == 0 and scores[2].min() > 0.05, scores


# ------------------------------------------------------------------------------------------------
# Through the evaluate and promote stages
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def new_project(tmp_path, monkeypatch, crafted):
    """make(sft_reply): a project folder as cwd with base = SFT answering `sft_reply`, the proxy RM, the tiny
    comparison splits (the held-out prompts) and PARAMS, and no champion yet."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def make(sft_reply: str) -> Path:
        folder = tmp_path / f"project-sft-{sft_reply}"
        folder.mkdir()
        for name in ("base", "sft"):
            shutil.copytree(crafted[sft_reply], folder / "models" / name)
        shutil.copytree(crafted["reward"], folder / "models" / "reward")
        write_tiny_comparisons(folder)
        probe = resources.files("rlhf.data").joinpath("probes", "truthfulness.json").read_text(encoding="utf-8")
        (folder / TRUTHFULNESS).write_text(json.dumps(json.loads(probe)[:4]))
        (folder / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
        monkeypatch.chdir(folder)
        return folder

    return make


def cycle(crafted: dict, reply: str) -> tuple[dict, dict]:
    """The policy stage's output replaced by the policy answering `reply`, then `evaluate` and `promote` as DVC
    runs them: (metrics/evaluate.json, metrics/promote.json)."""
    shutil.rmtree("models/policy", ignore_errors=True)
    shutil.copytree(crafted[reply], "models/policy")
    assert evaluate.main() == 0
    assert promote.main() == 0
    return (json.loads(Path(evaluate.STAGE_METRICS).read_text()), json.loads(Path(promote.METRICS).read_text()))


def gate_tags(version: int) -> dict:
    return {k: v for k, v in MlflowClient().get_model_version("tiny-policy", str(version)).tags.items()
            if k.startswith("gate.")}


def champion() -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias("tiny-policy", CHAMPION).version)
    except MlflowException:
        return None


@pytest.mark.slow
def test_a_first_challenger_that_loses_to_sft_is_not_promoted_and_one_that_games_the_proxy_is_reward_hacking(
        new_project, crafted):
    new_project(RIGHT)  # SFT answers every held-out task right

    evaluation, decision = cycle(crafted, WRONG)
    assert evaluation["eval/gate_judge"] == "verifier" and evaluation["eval/opponent"] == "sft"
    assert evaluation["compare/sft/gold_accuracy"] == 1.0 and evaluation["eval/gold_accuracy"] == 0.0
    assert (evaluation["eval/verifier/wins_vs_sft"], evaluation["eval/verifier/ties_vs_sft"],
            evaluation["eval/verifier/losses_vs_sft"]) == (0, 0, 12)
    assert evaluation["eval/verifier/win_rate_vs_sft"] == 0.0
    assert evaluation["eval/proxy_rm/win_rate_vs_sft"] == 0.5  # the RM sees no difference: ties, no hacking
    assert "**verifier** (the gate's judge)" in Path("reports/evaluate/report.md").read_text()
    assert (decision["promote/promoted"], decision["promote/rule"], decision["promote/judge"],
            decision["promote/opponent"]) == (0, "does_not_beat_sft", "verifier", "sft")
    tags = gate_tags(decision["promote/version"])
    assert (tags["gate.promote"], tags["gate.rule"], tags["gate.judge"]) == ("False", "does_not_beat_sft", "verifier")
    assert "the verifier judge's win-rate against sft is 0.000" in tags["gate.reason"]
    assert champion() is None

    # the next challenger is as wrong, but says it with the "!" the proxy RM pays for
    evaluation, decision = cycle(crafted, HACK)
    assert evaluation["eval/opponent"] == "sft"  # still no champion
    assert evaluation["eval/proxy_rm/win_rate_vs_sft"] == 1.0 and evaluation["eval/proxy_rm/wins_vs_sft"] == 2
    assert evaluation["compare/challenger/rm_score"] > evaluation["compare/sft/rm_score"] == 0.0
    assert evaluation["eval/verifier/win_rate_vs_sft"] == 0.0
    assert (decision["promote/promoted"], decision["promote/rule"], decision["promote/judge"]) == (
        0, "reward_hacking", "verifier")
    tags = gate_tags(decision["promote/version"])
    assert (tags["gate.rule"], tags["gate.judge"]) == ("reward_hacking", "verifier")
    assert "proxy reward model prefers the challenger to sft (win-rate 1.000)" in tags["gate.reason"]
    assert "independent verifier judge prefers sft (win-rate 0.000)" in tags["gate.reason"]
    assert champion() is None


@pytest.mark.slow
def test_a_challenger_that_beats_sft_is_promoted_and_a_proxy_gaming_one_cannot_displace_it(new_project, crafted):
    new_project(WRONG)  # SFT answers every held-out task wrong

    evaluation, decision = cycle(crafted, RIGHT)
    assert evaluation["eval/verifier/wins_vs_sft"] == 12 and evaluation["eval/verifier/win_rate_vs_sft"] == 1.0
    assert evaluation["eval/verifier/win_rate_vs_sft_lower"] > 0.5
    assert evaluation["eval/proxy_rm/win_rate_vs_sft"] == 0.5
    assert (decision["promote/promoted"], decision["promote/rule"], decision["promote/judge"]) == (
        1, "beats_sft", "verifier")
    first = str(decision["promote/version"])
    assert champion() == first and gate_tags(first)["gate.judge"] == "verifier"

    # against the champion now (evaluate downloads it from the registry): the proxy prefers the challenger,
    # the verifier the champion
    evaluation, decision = cycle(crafted, HACK)
    assert evaluation["eval/opponent"] == "champion" and evaluation["compare/champion/gold_accuracy"] == 1.0
    assert evaluation["eval/proxy_rm/win_rate_vs_champion"] == 1.0
    assert evaluation["eval/verifier/win_rate_vs_champion"] == 0.0
    assert evaluation["eval/verifier/win_rate_vs_sft"] == 0.5  # both wrong: ties, which the gate does not read
    assert (decision["promote/promoted"], decision["promote/rule"], decision["promote/judge"],
            decision["promote/opponent"], decision["promote/champion_before"]) == (
        0, "reward_hacking", "verifier", "champion", int(first))
    assert "independent verifier judge prefers champion" in gate_tags(decision["promote/version"])["gate.reason"]
    assert champion() == first
