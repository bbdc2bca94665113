"""The refeed stage: what the model server logged, snapshotted as the next cycle's inputs.

    python -m rlhf.refeed      (dvc.yaml: `always_changed`, right before collect)

It reads the feedback store (`serve.database`, tables and reads in `rlhf/serve_store.py`) and writes two
Parquet snapshots that collect reads: the served prompts (scrubbed, deduplicated) and the users' judgements
as comparison rows. DVC reruns what reads them only when the served traffic brought something new.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.engine import make_url

from rlhf import tracking
from rlhf.comparisons import empty_comparisons, to_table
from rlhf.outputs import together
from rlhf.params import load_params
from rlhf.paths import FEEDBACK_COMPARISONS, SAMPLING_POLICY, SERVED_PROMPTS
from rlhf.registry import champion_version
from rlhf.serve_store import PROMPT_SCHEMA, feedback_comparisons, served_prompts, store_exists

METRICS = "metrics/refeed.json"


def sampling_policy_snapshot(collect_policy: str, model_name: str) -> str:
    """What collect will sample from, as JSON: with collect.policy 'champion' the registry's champion (version null
    before the first one), else the folder collect.policy names. DVC hashes the file, so a new champion reruns
    collect and a cycle with the same one, or with a fixed folder, does not."""
    snapshot = {"collect.policy": collect_policy}
    if collect_policy == "champion":
        snapshot.update(model_name=model_name, version=champion_version(model_name))
    return json.dumps(snapshot, sort_keys=True) + "\n"


def refeed(database_url: str, max_chars: int, collect_policy: str, model_name: str, prompts_out: str = SERVED_PROMPTS,
           comparisons_out: str = FEEDBACK_COMPARISONS, sampling_policy_out: str = SAMPLING_POLICY) -> dict:
    """Snapshot the store for the next cycle (served prompts, feedback comparisons) as Parquet, and what collect
    will sample from as JSON; return the counts.

    A SQLite store that does not exist yet (no server has run) gives empty snapshots and says so in the counts.
    Text longer than `max_chars` is not scrubbed and stays out of the snapshots (counted in refeed/too_long_*).
    The same store gives the same bytes (fixed schemas, rows in store order), so DVC sees an unchanged snapshot
    and leaves collect and everything after it alone.
    """
    found = store_exists(database_url)
    prompts, prompts_too_long = served_prompts(database_url, max_chars) if found else (
        PROMPT_SCHEMA.empty_table().to_pandas(), 0)
    comparisons, comparisons_too_long = feedback_comparisons(database_url, max_chars) if found else (
        empty_comparisons(), 0)
    for out in (prompts_out, comparisons_out):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    champion = sampling_policy_snapshot(collect_policy, model_name)
    with together(prompts_out, comparisons_out, sampling_policy_out) as (prompts_tmp, comparisons_tmp, champion_tmp):
        pq.write_table(pa.Table.from_pandas(prompts, schema=PROMPT_SCHEMA, preserve_index=False), prompts_tmp)
        pq.write_table(to_table(comparisons), comparisons_tmp)
        champion_tmp.write_text(champion)
    return {"refeed/store_found": int(found), "refeed/served_prompts": len(prompts),
            "refeed/prompts_with_pii": int((prompts["pii"] != "").sum()) if len(prompts) else 0,
            "refeed/feedback_comparisons": len(comparisons),
            "refeed/too_long_prompts": prompts_too_long, "refeed/too_long_comparisons": comparisons_too_long,
            "refeed/champion_version": int(json.loads(champion).get("version") or 0)}


def main() -> int:
    params = load_params()
    serve = params.serve
    shown = make_url(serve.database).render_as_string(hide_password=True)
    with tracking.stage_run("refeed", {"serve.database": shown, "serve.scrub_max_chars": serve.scrub_max_chars,
                                       "collect.policy": params.collect.policy,
                                       "promote.model_name": params.promote.model_name}):
        metrics = refeed(serve.database, serve.scrub_max_chars, params.collect.policy, params.promote.model_name)
        tracking.log_outputs("refeed", {"served_prompts": SERVED_PROMPTS, "feedback_comparisons": FEEDBACK_COMPARISONS,
                                        "sampling_policy": SAMPLING_POLICY})
        tracking.write_metrics(METRICS, metrics)
    note = "" if metrics["refeed/store_found"] else f" (no feedback store at {shown} yet: `rlhf serve` creates it)"
    too_long = metrics["refeed/too_long_prompts"] + metrics["refeed/too_long_comparisons"]
    if too_long:
        note += (f"; {metrics['refeed/too_long_prompts']} prompts and {metrics['refeed/too_long_comparisons']} "
                 f"comparisons left out, longer than serve.scrub_max_chars ({serve.scrub_max_chars} characters)")
    print(f"refeed: {metrics['refeed/served_prompts']} served prompts -> {SERVED_PROMPTS}, "
          f"{metrics['refeed/feedback_comparisons']} feedback comparisons -> {FEEDBACK_COMPARISONS}{note}")
    return 0


if __name__ == "__main__":
    from rlhf.stage import run_stage

    run_stage(main)
