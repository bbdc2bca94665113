"""The human gate on a schedule: every version the promote stage left `awaiting_human_evaluation` is decided once
people have finished its campaign (rlhf/human_gate.py; `rlhf gate --version N` does the same for one version).

    python -m flows.human_gate            # serve it: a run every 15 minutes (Ctrl-C stops it)

or deploy `flows/human_gate.py:human_gate` beside the cycle in infra/prefect.yaml with an interval schedule.
"""
from __future__ import annotations

import os
from datetime import timedelta

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402

from rlhf.human_gate import awaiting_versions, decide  # noqa: E402
from rlhf.params import load_params  # noqa: E402


@task(retries=3, retry_delay_seconds=[2, 5, 15])
def versions_awaiting_people(model_name: str) -> list[str]:
    """The registry's versions whose gate decision waits for a human campaign."""
    return awaiting_versions(model_name)


@task
def decide_version(model_name: str, version: str, database: str, params_file: str) -> str:
    """Read the version's campaign and, once it is complete, record the gate's decision; a summary either way."""
    params = load_params(params_file)
    result = decide(model_name, version, database, params.promote, params.evaluate.win_rate_confidence)
    print(result.summary())
    return result.summary()


@flow(name="rlhf-human-gate", log_prints=True)
def human_gate(model_name: str | None = None, database: str | None = None,
               params_file: str = "params.yaml") -> dict[str, str]:
    """Every version awaiting people, decided where its campaign is complete. One version's error (a campaign
    deleted, a database moved) leaves the others decided and fails the run, with the error, at the end."""
    params = load_params(params_file)
    name = model_name or params.promote.model_name
    states = {v: decide_version(name, v, database or params.evaluate.human_database, params_file, return_state=True)
              for v in versions_awaiting_people(name)}
    failed = {v: s for v, s in states.items() if not s.is_completed()}
    if failed:
        raise RuntimeError("; ".join(f"v{v}: {s.result(raise_on_failure=False)}" for v, s in failed.items()))
    return {v: s.result() for v, s in states.items()}


if __name__ == "__main__":
    human_gate.serve(name="rlhf-human-gate", interval=timedelta(minutes=15))
