"""Benchmark: import hh-rlhf comparisons, validate them, and measure the offline AI judge against the human labels.

    .venv/bin/python benchmarks/comparisons_hh.py            # 2,000 pairs imported and validated, 500 judged
    .venv/bin/python benchmarks/comparisons_hh.py --judge-pairs 0   # import + validate only

1. Import `--pairs` pairs (a seeded sample) from the hh-rlhf test files with the `collect` stage's importer
   (rlhf.importers), and validate them with the `validate` stage's suite: rows in / valid / quarantined by
   reason, rows per second.
2. Judge `--judge-pairs` of the valid pairs with the embedded SmolLM2-135M-Instruct (models/base, written
   by `dvc repro prepare`) in both orders, as `collect` does (rlhf.judges), and compare with the human
   label:
   - `debiased` is the stage's default rule (the judge's median first-position preference removed,
     both orders must agree); `strict` leaves the bias in; `rubric` adds MiniLM relevance and
     profanity-check toxicity (weights 2, 2); `mean` labels every pair by sign(m_ab − m_ba) and never abstains;
     `first_order_only` is a judge that reads one order and believes it.
   - accuracy is over the pairs a rule labels (Wilson 95% interval); coverage is the share it labels.
Judging is slow on a small shared CPU, so it stops after --max-minutes and keeps the margins it has under
--cache: run the same command again to go on (each run re-imports and re-validates, a minute or two).
Writes benchmarks/results/comparisons_hh.json. Needs the hh-rlhf files (../shared/data/hh-rlhf) and models/base.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from rlhf import judges, tracking, validate  # noqa: E402
from rlhf.checkpoints import load_tokenizer  # noqa: E402
from rlhf.comparisons import write_comparisons  # noqa: E402
from rlhf.importers import import_comparisons  # noqa: E402
from rlhf.params import CollectParams, ModelParams, ValidateParams  # noqa: E402
from rlhf.paths import BASE_DIR  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf"
OUT = REPO / "benchmarks" / "results" / "comparisons_hh.json"


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    # Wilson score interval: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n)
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round((centre - spread) / (1 + z * z / n), 4), round((centre + spread) / (1 + z * z / n), 4)]


def score_rule(chosen: list, human: list[str]) -> dict:
    labelled = [(c, h) for c, h in zip(chosen, human) if c in ("a", "b")]
    correct = sum(c == h for c, h in labelled)
    n = len(chosen)
    return {"pairs": n, "labelled": len(labelled), "coverage": round(len(labelled) / n, 4),
            "ties": sum(c == "tie" for c in chosen), "inconsistent": sum(c is None for c in chosen),
            "accuracy": round(correct / len(labelled), 4) if labelled else None, "accuracy_95ci": wilson(correct, len(labelled))}


def apply_rule(margin_ab: np.ndarray, margin_ba: np.ndarray, tie_margin: float, debias: bool) -> list:
    bias = judges.position_bias(margin_ab, margin_ba) if debias else 0.0
    return [judges.combine_orders(x, y, tie_margin, bias).chosen for x, y in zip(margin_ab, margin_ba)]


def judge_resumably(sample: pd.DataFrame, params: CollectParams, args, started: float):
    """Both orders' margins of every sampled pair, as `collect` computes them, cached per chunk under
    --cache so that a run stopped by --max-minutes continues where it left off. Returns (m_ab, m_ba,
    seconds spent judging over all runs), or (None, None, seconds) while pairs are left."""
    cache = Path(args.cache) / f"margins-seed{args.seed}-pairs{args.pairs}-chars{args.judge_max_chars}.parquet"
    done = pd.read_parquet(cache) if cache.exists() else pd.DataFrame(columns=["pair_id", "margin_ab", "margin_ba", "seconds"])
    todo = sample[~sample["pair_id"].isin(done["pair_id"])]
    if len(todo):
        margins = judges.make_judge(params, ModelParams())  # the embedded judge: models/base
        chunk = 4 * params.batch_size
        for start in range(0, len(todo), chunk):
            if time.perf_counter() - started > 60 * args.max_minutes:
                break
            part = todo.iloc[start:start + chunk]
            prompts, a, b = part["prompt"].tolist(), part["response_a"].tolist(), part["response_b"].tolist()
            tic = time.perf_counter()
            with tqdm(total=2 * len(part), desc=f"judge {len(done)}/{len(sample)}", unit="order") as progress:
                both = margins(prompts + prompts, a + b, b + a, progress)
            seconds = time.perf_counter() - tic
            new = pd.DataFrame({"pair_id": part["pair_id"], "margin_ab": both[:len(part)], "margin_ba": both[len(part):],
                                "seconds": seconds / len(part)})
            done = pd.concat([done, new], ignore_index=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            done.to_parquet(cache, index=False)
    left = len(sample) - int(sample["pair_id"].isin(done["pair_id"]).sum())
    if left:
        print(f"judged {len(sample) - left}/{len(sample)} pairs (cache {cache}); run the same command again to continue",
              file=sys.stderr)
        return None, None, float(done["seconds"].sum())
    by_id = done.set_index("pair_id").loc[sample["pair_id"]]
    return by_id["margin_ab"].to_numpy(), by_id["margin_ba"].to_numpy(), float(by_id["seconds"].sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--judge-pairs", type=int, default=500)
    parser.add_argument("--judge-max-chars", type=int, default=CollectParams().judge_max_chars)
    parser.add_argument("--batch-size", type=int, default=CollectParams().batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--max-minutes", type=float, default=13.0, help="stop judging after this long; rerun to go on")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "rlhf-comparisons-hh"),
                        help="where judged margins are kept between runs")
    args = parser.parse_args()
    started = time.perf_counter()
    if not HH.exists():
        print(f"no hh-rlhf data at {HH}; see /work/shared/data/hh-rlhf/PROVENANCE.md", file=sys.stderr)
        return 2
    os.chdir(REPO)
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "git_commit": tracking.git_commit(),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()},
              "data": str(HH.relative_to(REPO.parent))}

    # 1. import + validate
    tic = time.perf_counter()
    params = CollectParams(sources=["import"], import_data=str(HH), import_format="hh-rlhf", import_limit=args.pairs,
                           seed=args.seed)
    imported = import_comparisons(params, pd.Timestamp.now(tz="UTC"))
    frame, counts = imported.rows, imported.metrics
    import_seconds = time.perf_counter() - tic
    with tempfile.TemporaryDirectory() as tmp:
        write_comparisons(frame, Path(tmp) / "collected.parquet")
        tic = time.perf_counter()
        rows, utf8_valid = validate.read_collected(Path(tmp) / "collected.parquet")
        vparams = ValidateParams()
        checker = validate.Checker(validate.load_suite(), Path(tmp) / "docs")
        checked = validate.validate_comparisons(rows, utf8_valid, vparams, load_tokenizer(BASE_DIR),
                                                validate.load_embedder(), checker)
        validate_seconds = time.perf_counter() - tic
    m = checked["metrics"]
    result["import_validate"] = {
        "pairs_requested": args.pairs, **{k.split("/", 1)[1]: v for k, v in counts.items()},
        "rows_in": m["validate/rows_in"], "rows_valid": m["validate/rows_valid"],
        "rows_quarantined": m["validate/rows_quarantined"],
        "quarantined_by_reason": {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith("validate/quarantined/")},
        "splits": {s: m[f"validate/{s}_rows"] for s in ("train", "validation", "test")},
        "position_balance": m["validate/position_balance"], "validate_params": dataclasses.asdict(vparams),
        "import_seconds": round(import_seconds, 2), "validate_seconds": round(validate_seconds, 2),
        "import_rows_per_s": round(len(frame) / import_seconds, 1),
        "validate_rows_per_s": round(len(frame) / validate_seconds, 1),
        "conserved": m["validate/rows_in"] == m["validate/rows_valid"] + m["validate/rows_quarantined"],
    }
    print(json.dumps(result["import_validate"], indent=1), flush=True)

    # 2. the judge against the human labels
    if args.judge_pairs:
        valid = pd.concat(checked["splits"].values(), ignore_index=True)
        valid = valid[valid["chosen"].isin(["a", "b"])]
        pick = sorted(random.Random(args.seed).sample(range(len(valid)), min(args.judge_pairs, len(valid))))
        sample = valid.iloc[pick].reset_index(drop=True)
        jparams = CollectParams(judge_max_chars=args.judge_max_chars, batch_size=args.batch_size)
        margin_ab, margin_ba, judge_seconds = judge_resumably(sample, jparams, args, started)
        if margin_ab is None:
            return 3
        human = sample["chosen"].tolist()
        m_ab, m_ba = margin_ab, margin_ba
        tau = jparams.judge_tie_margin
        relevance, toxicity = judges.rubric_features(sample["prompt"].tolist() * 2,
                                                     sample["response_a"].tolist() + sample["response_b"].tolist())
        n = len(sample)
        delta = judges.rubric_margin(relevance[:n], relevance[n:], toxicity[:n], toxicity[n:], 2.0, 2.0)
        subsets = sample["source"].str.split("/").str[1]
        debiased = apply_rule(m_ab, m_ba, tau, debias=True)
        result["judge"] = {
            "judge": judges.judge_name(jparams), "pairs": n, "orders_per_pair": 2,
            "judge_max_chars": args.judge_max_chars, "tie_margin": tau,
            "position_bias_nats": round(judges.position_bias(m_ab, m_ba), 4),
            "share_of_orders_preferring_position_A": round(float(np.mean(np.r_[m_ab, m_ba] > 0)), 4),
            "rules": {
                "debiased (stage default)": score_rule(debiased, human),
                "strict (bias left in)": score_rule(apply_rule(m_ab, m_ba, tau, debias=False), human),
                "rubric (debiased + relevance/toxicity, weights 2/2)": score_rule(
                    apply_rule(m_ab + delta, m_ba - delta, tau, debias=True), human),
                "mean (sign of m_ab - m_ba, never abstains)": score_rule(
                    ["a" if d > 0 else "b" if d < 0 else "tie" for d in m_ab - m_ba], human),
                "first_order_only": score_rule(["a" if x > 0 else "b" if x < 0 else "tie" for x in m_ab], human),
            },
            "debiased_by_subset": {s: score_rule([c for c, t in zip(debiased, subsets) if t == s],
                                                 [h for h, t in zip(human, subsets) if t == s])
                                   for s in sorted(set(subsets))},
            "consistency_rate": round(float(np.mean([c is not None for c in debiased])), 4),
            "judge_seconds": round(judge_seconds, 1), "pairs_per_s": round(n / judge_seconds, 3),
            "orders_per_s": round(2 * n / judge_seconds, 3),
        }
        print(json.dumps(result["judge"], indent=1), flush=True)
    result["machine"]["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
