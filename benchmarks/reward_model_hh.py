"""Benchmark: the reward_model stage's training on real human preferences (Anthropic hh-rlhf).

Reads the four hh-rlhf test files in ../shared/data/hh-rlhf where they are (never copied into the
project; see PROVENANCE.md there), splits every pair by prompt into train and held-out (no prompt on
both sides), trains a reward model from models/base with `rlhf.reward_model.train` (the stage's own
code), and reports held-out pairwise accuracy overall and per subset, the training time and the
learning curve (on a fixed held-out subset) as JSON.

    nice -n 10 .venv/bin/python benchmarks/reward_model_hh.py                # the full run
    .venv/bin/python benchmarks/reward_model_hh.py --train-pairs 16 --held-out-pairs 1200 --score-pairs 24 \\
        --curve-pairs 8 --out /tmp/rm_hh.json                                 # a smoke run
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf.checkpoints import resolve_precision  # noqa: E402
from rlhf.params import RewardModelParams  # noqa: E402
from rlhf.reward_model import Pair, encode_pairs, score_pairs, train  # noqa: E402
from rlhf.rewards import load_reward_model  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "hh-rlhf"
SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
ASSISTANT = "\n\nAssistant:"


def parse_row(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """(prompt, chosen reply, rejected reply), or the reason the row cannot be a pair.

    The prompt is the dialogue up to the last "\\n\\nAssistant:", which both transcripts share.
    """
    cut_c, cut_r = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        return "no assistant turn"
    if chosen[:cut_c] != rejected[:cut_r]:
        return "chosen and rejected differ before the last assistant turn"
    reply_c, reply_r = chosen[cut_c + len(ASSISTANT):].strip(), rejected[cut_r + len(ASSISTANT):].strip()
    if not reply_c or not reply_r:
        return "empty reply"
    if reply_c == reply_r:
        return "identical replies"
    return chosen[:cut_c].strip(), reply_c, reply_r


def load_hh() -> tuple[list[tuple[str, Pair]], Counter]:
    """Every usable pair as (subset, Pair), and the count of rows left out per reason."""
    rows, skipped = [], Counter()
    for subset in SUBSETS:
        with gzip.open(DATA / subset / "test.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                parsed = parse_row(record["chosen"], record["rejected"])
                if isinstance(parsed, str):
                    skipped[f"{subset}: {parsed}"] += 1
                else:
                    rows.append((subset, Pair(*parsed)))
    return rows, skipped


def split_by_prompt(rows: list[tuple[str, Pair]], held_out_pairs: int, seed: int):
    """Held-out = whole prompt groups in a seeded order until at least `held_out_pairs` pairs; train = the rest."""
    groups = defaultdict(list)
    for row in rows:
        groups[row[1].prompt].append(row)
    prompts = sorted(groups)
    random.Random(seed).shuffle(prompts)
    held_out, train_rows = [], []
    for prompt in prompts:
        (held_out if len(held_out) < held_out_pairs else train_rows).extend(groups[prompt])
    assert not {r[1].prompt for r in held_out} & {r[1].prompt for r in train_rows}
    return train_rows, held_out


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson interval of a proportion."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=str(REPO / "models" / "base"), help="model to start from")
    parser.add_argument("--held-out-pairs", type=int, default=1300, help="at least this many held-out pairs")
    parser.add_argument("--train-pairs", type=int, default=1600, help="train on this many (time budget); 0 = all")
    parser.add_argument("--score-pairs", type=int, default=0, help="score only this many held-out pairs (smoke runs); 0 = all")
    parser.add_argument("--curve-pairs", type=int, default=200, help="held-out pairs scored for the learning curve")
    parser.add_argument("--max-seq-len", type=int, default=192)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=40)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reward_model_hh.json"))
    args = parser.parse_args(argv)
    wall = time.perf_counter()

    rows, skipped = load_hh()
    train_rows, held_out = split_by_prompt(rows, args.held_out_pairs, args.seed)
    random.Random(args.seed + 1).shuffle(train_rows)
    if args.train_pairs:
        train_rows = train_rows[:args.train_pairs]
    scored = held_out[:args.score_pairs] if args.score_pairs else held_out
    curve_rows = scored[:args.curve_pairs]
    rest = scored[args.curve_pairs:]
    params = RewardModelParams(epochs=1, learning_rate=args.learning_rate, batch_size=args.batch_size,
                               max_seq_len=args.max_seq_len, lora_r=args.lora_r, lora_alpha=2 * max(args.lora_r, 1),
                               eval_every=args.eval_every, seed=args.seed)
    print(f"hh-rlhf: {len(rows)} usable pairs ({sum(skipped.values())} rows left out), train on {len(train_rows)}, "
          f"held-out {len(held_out)} (scoring {len(scored)}), curve on {len(curve_rows)}", flush=True)

    out_dir = Path(tempfile.mkdtemp(prefix="rm-hh-"))  # a scratch model, not a pipeline output
    try:
        result = train(params, args.base, args.precision, [p for _, p in train_rows], [p for _, p in curve_rows],
                       out_dir / "reward")
        tic = time.perf_counter()
        from accelerate import Accelerator

        dtype = resolve_precision(args.precision)
        accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
        model, stats = load_reward_model(out_dir / "reward", dtype)
        from rlhf.checkpoints import load_tokenizer

        tokenizer = load_tokenizer(out_dir / "reward")
        rest_scores = score_pairs(model.to(accelerator.device), accelerator,
                                  encode_pairs(tokenizer, [p for _, p in rest], args.max_seq_len),
                                  args.batch_size, tokenizer.pad_token_id, progress=True)
        eval_seconds = time.perf_counter() - tic
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    scores = torch.cat([result["val_scores"], rest_scores])
    correct = (scores[:, 0] > scores[:, 1]).tolist()
    per_subset = {}
    for subset in SUBSETS:
        hits = [c for (s, _), c in zip(scored, correct) if s == subset]
        per_subset[subset] = {"pairs": len(hits), "accuracy": round(sum(hits) / max(len(hits), 1), 4),
                              "ci95": wilson(sum(hits), len(hits))}
    # the baseline a reward model must beat to have learned more than length: "the longer reply wins"
    longer = [len(p.chosen) > len(p.rejected) for _, p in scored]
    length_baseline = {"overall": round(sum(longer) / len(longer), 4),
                       **{s: round(sum(w for (t, _), w in zip(scored, longer) if t == s)
                                   / max(sum(t == s for t, _ in scored), 1), 4) for s in SUBSETS}}
    m = result["metrics"]
    report = {
        "what": "held-out pairwise accuracy of the reward_model stage trained on hh-rlhf test files, split by prompt",
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + "nice -n 10 .venv/bin/python benchmarks/reward_model_hh.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"source": str(DATA.relative_to(REPO.parent)), "usable_pairs": len(rows),
                 "left_out": dict(skipped), "train_pairs_available": len(rows) - len(held_out),
                 "train_pairs_used": len(train_rows), "held_out_pairs": len(held_out), "held_out_scored": len(scored),
                 "train_subsets": dict(Counter(s for s, _ in train_rows)),
                 "shared_prompts_train_held_out": 0},
        "config": {**vars(params), "base": Path(args.base).name, "precision": str(resolve_precision(args.precision))},
        "held_out_accuracy": round(sum(correct) / len(correct), 4),
        "held_out_ci95": wilson(sum(correct), len(correct)),
        "per_subset": per_subset,
        "longer_reply_wins_baseline": length_baseline,
        "accuracy_before_training_on_curve_pairs": m["rm/val_accuracy_before"],
        "train_accuracy_after": m["rm/train_accuracy"],
        "reward_normalization": {"mean": round(stats["mean"], 4), "std": round(stats["std"], 4)},
        "held_out_margin": {k.removeprefix("rm/val_"): v for k, v in m.items() if k.startswith("rm/val_margin")},
        "train_seconds": m["perf/train_seconds"],
        "train_tokens_per_s": m["perf/train_tokens_per_s"],
        "eval_seconds_rest_of_held_out": round(eval_seconds, 1),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "learning_curve": result["curve"],
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("held_out_accuracy", "held_out_ci95", "per_subset",
                                             "longer_reply_wins_baseline", "train_seconds", "wall_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
