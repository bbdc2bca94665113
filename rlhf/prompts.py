"""Prompts for the policy: the pool it trains on, batches dealt from it, and the held-out prompts it is measured on.

The held-out prompts are the validate stage's test split: no policy trains on them, whatever the pool.
"""
from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path

from rlhf.comparisons import read_comparisons
from rlhf.params import EMBEDDED_PROMPTS, ParamError
from rlhf.paths import TEST_COMPARISONS, TRAIN_COMPARISONS


def embedded_prompt_records() -> list[dict]:
    """The project's own prompt pool (rlhf/data/prompts.jsonl), one record a prompt."""
    text = resources.files("rlhf.data").joinpath("prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def distinct_prompts(path: str | Path) -> list[str]:
    """The distinct prompts of a comparisons file, in order of first appearance."""
    return list(dict.fromkeys(read_comparisons(path)["prompt"]))


def load_train_prompts(source: str) -> list[str]:
    if source == "comparisons":
        return distinct_prompts(TRAIN_COMPARISONS)
    if source == EMBEDDED_PROMPTS:
        return list(dict.fromkeys(record["prompt"] for record in embedded_prompt_records()))
    path = Path(source)
    if not path.exists() or path.suffix not in (".jsonl", ".parquet"):
        raise ParamError(
            f"params.yaml: policy.prompts is '{source}', which is neither '{EMBEDDED_PROMPTS}', 'comparisons' nor an existing "
            ".jsonl/.parquet file. Use '{EMBEDDED_PROMPTS}' (the project's prompt pool), 'comparisons' (the prompts of the "
            "comparisons' train split) or a file with a `prompt` column."
        )
    import pandas as pd

    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True)
    if "prompt" not in frame.columns:
        raise ParamError(f"{path} has no `prompt` column (it has: {', '.join(map(str, frame.columns))}). Rename the column.")
    return list(dict.fromkeys(p for p in frame["prompt"] if isinstance(p, str) and p.strip()))


def held_out_prompts(train_prompts: list[str], n: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts without any test prompt, up to n test prompts in a seeded order)."""
    test = distinct_prompts(TEST_COMPARISONS)
    test_set = set(test)
    random.Random(seed).shuffle(test)
    return [p for p in train_prompts if p not in test_set], test[:n]


class PromptSampler:
    """Batches of prompts: a seeded shuffle, dealt out in order, reshuffled when used up."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.rng, self.queue = prompts, random.Random(seed), []

    def next_batch(self, n: int) -> list[str]:
        batch = []
        while len(batch) < n:
            if not self.queue:
                self.queue = list(range(len(self.prompts)))
                self.rng.shuffle(self.queue)
            batch.append(self.prompts[self.queue.pop()])
        return batch

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "queue": list(self.queue)}

    def restore(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.queue = list(state["queue"])
