"""The comparison schema: one row is one judged pair of responses to one prompt.

Every source (policy sampling + AI judge, human labeling campaigns, imported preference
sets, served-model feedback) writes rows of exactly this shape, and every stage that
reads comparisons reads them through `read_comparisons`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf.outputs import atomic_path
from rlhf.params import ParamError

CHOICES = ("a", "b", "tie")
SOURCE_KINDS = ("human", "judge", "import", "feedback")
VERIFIER_SOURCE = "judge:verifier"  # a verifiable task's pair, judged by its programmatic checker

# column -> (arrow type, nullable, meaning)
COLUMNS = {
    "pair_id": (pa.string(), False, "stable id of the pair, unique in a data set"),
    "prompt": (pa.string(), False, "the user prompt both responses answer"),
    "response_a": (pa.string(), False, "first response, in the order it was shown or sampled"),
    "response_b": (pa.string(), False, "second response"),
    "chosen": (pa.string(), True, "'a' | 'b' | 'tie'; null while unjudged"),
    "source": (pa.string(), False, "'human:<campaign>' | 'judge:<model>' | 'import:<dataset>' | 'feedback:<model version>'"),
    "policy_version": (pa.string(), True, "the model that sampled the pair, when one did"),
    "votes": (pa.int32(), True, "number of votes behind `chosen` (human rows)"),
    "agreement": (pa.float64(), True, "share of votes that agree with `chosen` (human rows)"),
    "created_at": (pa.timestamp("us", tz="UTC"), False, "when the row was made"),
}
SCHEMA = pa.schema([pa.field(name, typ, nullable=nullable) for name, (typ, nullable, _) in COLUMNS.items()])


def source_kind(source: str) -> str:
    """'judge:smollm2' -> 'judge'."""
    return source.split(":", 1)[0]


def empty_comparisons() -> pd.DataFrame:
    return SCHEMA.empty_table().to_pandas()


def to_table(frame: pd.DataFrame) -> pa.Table:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"comparison rows lack the column(s) {missing}. Every comparison row needs {list(COLUMNS)}; "
            "see rlhf/comparisons.py for what each holds, and add the missing ones at the source."
        )
    return pa.Table.from_pandas(frame[list(COLUMNS)], schema=SCHEMA, preserve_index=False)


def write_comparisons(frame: pd.DataFrame, path: str | Path) -> None:
    """Write atomically and durably (rlhf.outputs.atomic_path); `rlhf.outputs.together` for several files."""
    with atomic_path(path) as tmp:
        pq.write_table(to_table(frame), tmp)


def read_comparisons(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no comparisons at {path}. Run the stage that writes them (`dvc repro collect`) "
            "or point the param at an existing Parquet file."
        )
    return pq.read_table(path).to_pandas()


@dataclass(frozen=True)
class Pair:
    """A judged comparison as a preference: the prompt, the response chosen and the one rejected."""

    prompt: str
    chosen: str
    rejected: str


def preference_pairs(frame: pd.DataFrame, where: str) -> tuple[list[Pair], int]:
    """The (prompt, chosen, rejected) pairs of a comparisons frame, and how many ties were left out (a tie has no
    direction for a preference loss: −log σ(R₊ − R₋) and DPO's alike)."""
    unjudged = frame["chosen"].isna() | ~frame["chosen"].isin(CHOICES)
    if unjudged.any():
        row = frame[unjudged].iloc[0]
        shown = "no label" if row["chosen"] is None or row["chosen"] != row["chosen"] else repr(row["chosen"])
        raise ParamError(
            f"{where}: {int(unjudged.sum())} row(s) have no valid `chosen` (the first, pair_id {row['pair_id']!r}, has "
            f"{shown}), but a preference loss needs every pair judged 'a', 'b' or 'tie'. The validate stage quarantines "
            "such rows; run `dvc repro validate` and train on its output."
        )
    pairs = [Pair(prompt, a, b) if chosen == "a" else Pair(prompt, b, a)
             for prompt, a, b, chosen in zip(frame["prompt"], frame["response_a"], frame["response_b"], frame["chosen"])
             if chosen != "tie"]
    return pairs, int((frame["chosen"] == "tie").sum())
