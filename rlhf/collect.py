"""Stage `collect`: comparison pairs from the policy, judged by an AI judge, and from imported preference sets.

- Policy sampling: prompts drawn from a pool, two stochastic samples per prompt from the policy
  checkpoint (batched `generate`, KV cache on). A pair whose two responses are identical is sampled
  again; still identical after `resample_identical` rounds, it is dropped and counted.
- AI judge: each pair is read twice, once in each order (position swap). One order's verdict is
  log p('A') − log p('B') of the judge's next token. A label needs both orders to agree; a pair they
  disagree on is recorded as inconsistent with no label, never forced. Backends: a causal LM through
  transformers, or an OpenAI-compatible server. A rubric option adds prompt relevance and toxicity.
- Import: Anthropic hh-rlhf transcripts, generic prompt/chosen/rejected sets, rows already in the
  comparison schema (a labelling campaign's export, say), or any shape collect.import_mapping describes,
  from a file, a folder or the hub (rlhf/importers.py). A line that cannot be imported goes to
  data/comparisons/import_quarantine.parquet with its reason; it never stops the stage.

Every row has the shape rlhf/comparisons.py defines; the `validate` stage checks and splits them.
Per-pair judge scores go to data/comparisons/judgements.parquet, so every label can be audited.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import set_seed

from rlhf import tracking
from rlhf.chat import render_prompt
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.comparisons import COLUMNS, VERIFIER_SOURCE, read_comparisons, write_comparisons
from rlhf.importers import QUARANTINE_SCHEMA, import_comparisons, read_records, write_quarantine
from rlhf.judges import judge_name, judge_pairs, judge_summary, make_judge
from rlhf.models import load_causal_lm
from rlhf.outputs import together
from rlhf.params import EMBEDDED_PROMPTS, CollectParams, ParamError, load_params
from rlhf.paths import BASE_DIR, COLLECTED as OUT, FEEDBACK_COMPARISONS, SAMPLING_POLICY, SERVED_PROMPTS
from rlhf.prompts import embedded_prompt_records
from rlhf.registry import download_checkpoint
from rlhf.rollouts import sample_k
from rlhf.stage import run_stage
from rlhf.verifiers import Task, judge_pair, task_prompt, train_tasks

JUDGEMENTS = "data/comparisons/judgements.parquet"
CHAMPION_POLICY = "champion"  # collect.policy: the registry's champion, models/base before the first one
IMPORT_QUARANTINE = "data/comparisons/import_quarantine.parquet"  # lines of collect.import_data not imported, with why
METRICS = "metrics/collect.json"


# ------------------------------------------------------------------------------------------------
# Reading prompt pools (rlhf/importers.py reads the files)
# ------------------------------------------------------------------------------------------------

def load_prompts(params: CollectParams) -> list[str]:
    """The prompt pool, duplicates removed, then `num_prompts` of it drawn with the seed."""
    if params.prompts == EMBEDDED_PROMPTS:
        sources = [("the embedded prompt pool", embedded_prompt_records())]
    else:
        sources = read_records(params.prompts, params.hub_split, "collect.prompts")
    prompts = []
    for where, records in sources:
        for i, record in enumerate(records):
            value = record.get(params.prompt_field)
            if not isinstance(value, str) or not value.strip():
                raise ParamError(
                    f"{where}, row {i + 1}: `{params.prompt_field}` is {value!r}, but every prompt must be a non-empty text "
                    f"(the row has: {', '.join(sorted(map(str, record))) or 'nothing'}). Fix the row, or name the right "
                    "column with collect.prompt_field."
                )
            prompts.append(value)
    prompts = list(dict.fromkeys(prompts))
    # with 'feedback', what users asked the served model comes first, within two caps so that its callers cannot
    # decide alone what the policy trains on: the first max_prompts_per_key prompts of each API key, then at most
    # max_served_share of the draw (a seeded sample of the served prompts past it)
    served: list[str] = []
    over_key = 0
    if "feedback" in params.sources:
        snapshot = pd.read_parquet(_refeed_snapshot(SERVED_PROMPTS))
        if "api_key_id" not in snapshot.columns:
            raise ParamError(f"{SERVED_PROMPTS} was written before the refeed kept each prompt's API key, which "
                             "collect.max_prompts_per_key needs. Run `python -m rlhf.refeed` (or `dvc repro refeed`) again.")
        served = snapshot.groupby("api_key_id", sort=False).head(params.max_prompts_per_key)["prompt"].tolist()
        over_key = len(snapshot) - len(served)
    seen = set(served)
    pool = [p for p in prompts if p not in seen]
    share = params.max_served_share
    if params.num_prompts:
        cap = int(share * params.num_prompts)
    else:  # the whole pool: served / (served + pool) <= share
        cap = len(served) if share == 1 else int(share / (1 - share) * len(pool))
    rng = random.Random(params.seed)
    over_share = max(0, len(served) - cap)
    if over_share:
        served = rng.sample(served, cap)
    if over_key or over_share:
        print(f"collect: {len(served)} served prompts join the pool; left out: {over_key} past "
              f"collect.max_prompts_per_key ({params.max_prompts_per_key} a key), {over_share} past the {cap} that "
              f"collect.max_served_share ({share}) and collect.num_prompts allow")
    if params.num_prompts > len(served) + len(pool):
        raise ParamError(
            f"params.yaml: collect.num_prompts is {params.num_prompts}, but the prompt pool holds {len(pool)} distinct "
            f"prompts besides the {len(served)} served ones it may take (collect.max_served_share = {share}). Set "
            f"num_prompts to at most {len(served) + len(pool)} (0 takes them all), or point collect.prompts at a larger pool."
        )
    if not params.num_prompts:
        return served + pool
    return served + rng.sample(pool, params.num_prompts - len(served))


def _refeed_snapshot(path: str, why: str = "collect.sources includes 'feedback'") -> str:
    """`path`, a snapshot the refeed stage (`python -m rlhf.refeed`) wrote from the model server's feedback store
    and the registry."""
    if not Path(path).exists():
        raise ParamError(f"{why}, but {path} is missing. The refeed stage writes it from the model server's feedback "
                         "store (serve.database) and the registry: run `python -m rlhf.refeed` (or `dvc repro refeed`) "
                         "first, or drop 'feedback' from collect.sources and set collect.policy to a checkpoint folder.")
    return path


# ------------------------------------------------------------------------------------------------
# Policy sampling
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], params: CollectParams, progress=None) -> tuple[list[tuple[str, str]], int]:
    """Two samples per prompt, `batch_size` prompts a decoding call; and the number of tokens generated."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    samples = sample_k(model, tokenizer, texts, 2, params.max_new_tokens, params.temperature, 2 * params.batch_size,
                       params.top_k, params.top_p, add_special_tokens=False, progress=progress)
    return [(a.strip(), b.strip()) for a, b in samples.texts], samples.generated_tokens


def sample_pairs(model, tokenizer, prompts: list[str], params: CollectParams) -> tuple[list[tuple[str, str, str]], dict]:
    """(prompt, response_a, response_b) for each prompt whose two samples differ, and the counts.

    A prompt whose two samples are identical is sampled again, up to `resample_identical` rounds;
    still identical, it is dropped and counted (`collect/dropped_identical`).
    """
    tic = time.perf_counter()
    with tqdm(total=2 * len(prompts), desc="sample", unit="response") as progress:
        first, n_tokens = sample_responses(model, tokenizer, prompts, params, progress)
    pairs = dict(enumerate(first))
    resampled = 0
    for _ in range(params.resample_identical):
        same = [i for i, (a, b) in pairs.items() if a == b]
        if not same:
            break
        resampled += len(same)
        again, more_tokens = sample_responses(model, tokenizer, [prompts[i] for i in same], params)
        pairs.update(zip(same, again))
        n_tokens += more_tokens
    kept = [(prompts[i], a, b) for i, (a, b) in sorted(pairs.items()) if a != b]
    seconds = time.perf_counter() - tic
    return kept, {
        "collect/prompts": len(prompts),
        "collect/pairs_sampled": len(kept),
        "collect/resampled_identical": resampled,
        "collect/dropped_identical": len(prompts) - len(kept),
        "perf/generation_tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
        "perf/generation_seconds": round(seconds, 1),
    }


def policy_version(checkpoint: str) -> str:
    """The checkpoint's folder name and the start of its DVC hash: 'base@1f0e3dad'."""
    return f"{Path(checkpoint).name}@{tracking.dvc_md5(checkpoint)[:8]}"


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def sampling_policy(params: CollectParams) -> tuple[str, str]:
    """(checkpoint folder, the version each row records) of the policy that samples the pairs. With
    collect.policy 'champion': the registry's champion as the refeed stage found it (its sampling-policy snapshot),
    so each cycle's feedback is on what is deployed, and models/base before there is one (the first cycle);
    otherwise the folder collect.policy names."""
    if params.policy != CHAMPION_POLICY:
        return params.policy, policy_version(params.policy)
    snapshot = json.loads(Path(_refeed_snapshot(SAMPLING_POLICY, "collect.policy is 'champion'")).read_text())
    if snapshot.get("collect.policy") != CHAMPION_POLICY:
        raise ParamError(f"{SAMPLING_POLICY} was written for collect.policy {snapshot.get('collect.policy')!r}, but "
                         "collect.policy is 'champion' now. Run the refeed stage again (`dvc repro refeed`).")
    if snapshot["version"] is None:
        return BASE_DIR, policy_version(BASE_DIR)
    name, version = snapshot["model_name"], snapshot["version"]
    return str(download_checkpoint(f"models:/{name}/{version}")), f"{name}/{version}"


def verifier_judgements(triples: list[tuple[str, str, str]], tasks: dict[str, Task]) -> pd.DataFrame:
    """The verifier's verdicts on pairs of answers to verifiable tasks, in the judge record's columns: the
    correct answer is chosen; both right or both wrong is a tie (rlhf.verifiers.judge_pair)."""
    chosen = [judge_pair(tasks[prompt], a, b) for prompt, a, b in triples]
    return pd.DataFrame({"judge": "verifier", "margin_ab": float("nan"), "margin_ba": float("nan"),
                         "rubric_margin": 0.0, "bias": 0.0, "vote_ab": chosen, "vote_ba": chosen, "chosen": chosen,
                         "outcome": ["tie" if c == "tie" else "consistent" for c in chosen]})


def policy_comparisons(params, created_at: pd.Timestamp):
    """Sampled and judged pairs as comparison rows, the judges' per-pair record, and the metrics.

    The pool mixes open-ended prompts (judged by the AI judge) with `collect.verifiable_prompts` tasks of known
    answer (judged by their verifier, the offline AI feedback with a known truth); held-out tasks never join it.
    """
    p = params.collect
    set_seed(p.seed)
    tasks = {task_prompt(t, params.tasks.instruction): t for t in train_tasks(params.tasks, p.verifiable_prompts)} \
        if p.verifiable_prompts else {}
    open_prompts = load_prompts(p)
    prompts = open_prompts + [prompt for prompt in tasks if prompt not in set(open_prompts)]
    folder, version = sampling_policy(p)
    policy = load_causal_lm(folder, dtype=resolve_precision(params.model.precision)).eval()
    triples, metrics = sample_pairs(policy, load_tokenizer(folder), prompts, p)
    del policy
    open_ended = [t for t in triples if t[0] not in tasks]
    verifiable = [t for t in triples if t[0] in tasks]
    judge = judge_name(p)
    tic = time.perf_counter()
    judged_open = judge_pairs(open_ended, make_judge(p, params.model), p, judge) if open_ended else None
    seconds = time.perf_counter() - tic
    judged_verifiable = verifier_judgements(verifiable, tasks)
    ordered = open_ended + verifiable
    judged = pd.concat([j for j in (judged_open, judged_verifiable) if j is not None and len(j)], ignore_index=True) \
        if ordered else judge_pairs([], None, p, judge)
    rows = pd.DataFrame({
        "pair_id": [hashlib.sha256("\x00".join((version, *t)).encode()).hexdigest()[:16] for t in ordered],
        "prompt": [t[0] for t in ordered], "response_a": [t[1] for t in ordered], "response_b": [t[2] for t in ordered],
        "chosen": judged["chosen"].tolist(),
        "source": [f"judge:{judge}"] * len(open_ended) + [VERIFIER_SOURCE] * len(verifiable),
        "policy_version": version, "votes": None, "agreement": None, "created_at": created_at,
    }, columns=list(COLUMNS))
    judged.insert(0, "pair_id", rows["pair_id"])
    metrics.update(judge_summary(judged.iloc[:len(open_ended)]))
    outcome = judged_verifiable["chosen"].value_counts()
    metrics.update({"collect/policy_version": version, "collect/verifiable_pairs": len(verifiable),
                    "verifier/decisive": int(outcome.get("a", 0) + outcome.get("b", 0)),
                    "verifier/ties": int(outcome.get("tie", 0)),
                    "perf/judge_pairs_per_s": round(len(open_ended) / max(seconds, 1e-9), 3),
                    "perf/judge_seconds": round(seconds, 1)})
    return rows, judged, metrics


def collect(params, out: str = OUT, judgements_out: str = JUDGEMENTS, quarantine_out: str = IMPORT_QUARANTINE) -> dict:
    """Make the comparison rows of every configured source, write them, and return the metrics."""
    p = params.collect
    tic = time.perf_counter()
    created_at = pd.Timestamp.now(tz="UTC")
    frames, metrics = [], {}
    quarantine = QUARANTINE_SCHEMA.empty_table().to_pandas()  # written even without 'import': a DVC output
    judged = pd.DataFrame(columns=["pair_id", "judge", "margin_ab", "margin_ba", "rubric_margin", "bias",
                                   "vote_ab", "vote_ba", "chosen", "outcome"])
    for source in p.sources:
        if source == "policy":
            rows, judged, m = policy_comparisons(params, created_at)
        elif source == "feedback":  # users' ratings, already comparison rows with source 'feedback:<model>/<version>'
            rows = read_comparisons(_refeed_snapshot(FEEDBACK_COMPARISONS))
            m = {"collect/feedback_comparisons": len(rows),
                 "collect/served_prompts": len(pd.read_parquet(_refeed_snapshot(SERVED_PROMPTS), columns=["prompt"]))}
        else:
            rows, quarantine, m = import_comparisons(p, created_at)
        frames.append(rows)
        metrics.update(m)
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    with together(out, judgements_out, quarantine_out) as (rows_tmp, judged_tmp, quarantine_tmp):
        write_comparisons(frame, rows_tmp)
        judged.to_parquet(judged_tmp, index=False)
        write_quarantine(quarantine, quarantine_tmp)
    metrics["collect/rows"] = len(frame)
    metrics["collect/seconds"] = round(time.perf_counter() - tic, 1)
    return metrics


def main() -> int:
    params = load_params()
    # the import mapping goes to MLflow as one JSON text: its keys hold the data set's values ('tie (bothbad)'),
    # which MLflow does not take in a param's name
    logged = {"collect": {**params.section("collect"), "import_mapping": json.dumps(params.collect.import_mapping)},
              "model.policy": params.model.policy, "model.precision": params.model.precision}
    with tracking.stage_run("collect", logged):
        metrics = collect(params)
        tracking.log_outputs("collect", {"collected": OUT, "judgements": JUDGEMENTS, "import_quarantine": IMPORT_QUARANTINE})
        tracking.write_metrics(METRICS, metrics)
    print(f"collect: {metrics['collect/rows']} rows -> {OUT}"
          + (f"; {metrics['collect/pairs_sampled']} sampled pairs ({metrics['collect/dropped_identical']} dropped as "
             f"identical), judge: {metrics['judge/labelled']} labelled, {metrics['judge/ties']} ties, "
             f"{metrics['judge/inconsistent']} inconsistent" if "judge/pairs" in metrics else "")
          + (f"; {metrics['collect/imported']} imported of {metrics['collect/import_lines']} lines, "
             f"{metrics['collect/import_quarantined']} quarantined ("
             + (", ".join(f"{k.rsplit('/', 1)[1]}: {v}" for k, v in metrics.items()
                          if k.startswith("collect/import_quarantined/")) or "none")
             + f") -> {IMPORT_QUARANTINE}" if "collect/imported" in metrics else ""))
    return 0


if __name__ == "__main__":
    run_stage(main)
