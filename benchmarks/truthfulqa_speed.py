"""TruthfulQA MC1/MC2 of the embedded SmolLM2-135M-Instruct: the shared-prefix KV-cache path against
the naive one-forward-per-answer path (lm-evaluation-harness's way), and optionally against lm-eval itself.

Project venv, from the repository root:

    nice -n 10 python -m benchmarks.truthfulqa_speed
        all questions with `truthfulqa_scores` (timed), then the first --naive-subset questions both
        ways, side by side; writes benchmarks/results/truthfulqa_speed.json

A separate venv that has lm-eval (`pip install lm-eval`, never into the project venv) and sees the
project's packages:

    nice -n 10 /tmp/lmeval-venv/bin/python -m benchmarks.truthfulqa_speed --lm-eval --subset 40 --dtype fp32
        lm-eval's own truthfulqa_mc1/mc2 task configs (preamble, process_results) on the local
        mc_task.json, with the same model object, against `truthfulqa_scores` on the same questions;
        writes benchmarks/results/truthfulqa_lmeval_<dtype>.json

Compare numbers in fp32: in bf16 on CPU every path (lm-eval's too) moves answer log-likelihoods by
~0.1 nats on average (up to ~0.5) against fp32, and even with the batch size (measured on 5 questions:
naive bs 1 vs bs 16 differ by up to 0.26), so bf16 runs agree only to ~0.005 in mean MC2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.truthfulqa import (
    ANSWER_DELIMITER,
    MultipleChoiceQuestion,
    encode_context_continuation,
    load_truthfulqa_mc,
    loglikelihoods_full_sequence,
    mc1_score,
    mc2_score,
    truthfulqa_context,
    truthfulqa_scores,
)
from rlhf.checkpoints import load_source_model
from rlhf.params import ModelParams

RESULTS = Path(__file__).parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "mc_task.json"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_model(dtype: str):
    """The embedded SmolLM2-135M-Instruct (GGUF, dequantised to plain tensors), in `dtype`."""
    model, tokenizer = load_source_model(ModelParams())
    return model.to(DTYPES[dtype]).eval(), tokenizer


def naive_scores(model, tokenizer, questions: list[MultipleChoiceQuestion], batch_size: int):
    """lm-eval's request layout: mc1 and mc2 are separate tasks, every (context, answer) pair its own full sequence."""
    mc1, mc2, lls = [], [], []
    for q in questions:
        context = truthfulqa_context(q.question)
        pairs1 = [encode_context_continuation(tokenizer, context, ANSWER_DELIMITER + a) for a in q.mc1_choices]
        pairs2 = [encode_context_continuation(tokenizer, context, ANSWER_DELIMITER + a) for a in q.mc2_choices]
        ll1 = loglikelihoods_full_sequence(model, pairs1, batch_size)
        ll2 = loglikelihoods_full_sequence(model, pairs2, batch_size)
        mc1.append(mc1_score(ll1))
        mc2.append(mc2_score(ll2, q.mc2_labels))
        lls.append((ll1, ll2))
    return mc1, mc2, lls


def max_ll_difference(lls_a: list[list[float]], lls_b: list[list[float]]) -> float:
    return max(abs(x - y) for a, b in zip(lls_a, lls_b) for x, y in zip(a, b))


def mean(xs) -> float:
    return sum(xs) / len(xs)


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "load_average_at_end": os.getloadavg()}


class Clock:
    """Wall and process-CPU seconds, summed over the timed blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *_):
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu

    def figures(self) -> dict:
        return {"wall_seconds": round(self.wall, 2), "cpu_seconds": round(self.cpu, 2)}


def chunks(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_project(args) -> dict:
    questions = load_truthfulqa_mc(args.data)
    model, tokenizer = load_model(args.dtype)

    full = Clock()
    with full:
        fast = truthfulqa_scores(model, tokenizer, questions, batch_size=args.batch_size)
    print(f"fast path, {len(questions)} questions: MC1 {fast.mc1_mean:.4f}  MC2 {fast.mc2_mean:.4f}  "
          f"{full.wall:.1f} s wall, {full.cpu:.1f} s CPU")

    # the machine is shared, so the two paths alternate on small chunks and see the same load
    subset = questions[:args.naive_subset]
    fast_clock, naive_clock = Clock(), Clock()
    fast_mc1, fast_mc2, fast_lls, naive_mc1, naive_mc2, naive_lls = [], [], [], [], [], []
    for chunk in tqdm(chunks(subset, args.chunk), desc="fast vs naive"):
        with fast_clock:
            scores = truthfulqa_scores(model, tokenizer, chunk, batch_size=args.batch_size, progress=False)
        with naive_clock:
            mc1, mc2, lls = naive_scores(model, tokenizer, chunk, args.naive_batch_size)
        fast_mc1 += scores.mc1; fast_mc2 += scores.mc2
        fast_lls += [a + b for a, b in zip(scores.mc1_loglikelihoods, scores.mc2_loglikelihoods)]
        naive_mc1 += mc1; naive_mc2 += mc2; naive_lls += [a + b for a, b in lls]
    print(f"first {len(subset)} questions: fast {fast_clock.wall:.1f} s wall / {fast_clock.cpu:.1f} s CPU "
          f"(MC1 {mean(fast_mc1):.4f} MC2 {mean(fast_mc2):.4f}); naive {naive_clock.wall:.1f} s / {naive_clock.cpu:.1f} s "
          f"(MC1 {mean(naive_mc1):.4f} MC2 {mean(naive_mc2):.4f}); naive/fast = {naive_clock.wall / fast_clock.wall:.1f}x wall, "
          f"{naive_clock.cpu / fast_clock.cpu:.1f}x CPU")
    return {
        "model": "embedded:SmolLM2-135M-Instruct", "dtype": args.dtype, "data": str(args.data),
        "batch_size": args.batch_size, "naive_batch_size": args.naive_batch_size, "machine": machine(),
        "full": {"questions": len(questions), "mc1": fast.mc1_mean, "mc2": fast.mc2_mean, **full.figures()},
        "subset": {
            "questions": len(subset),
            "fast": {"mc1": mean(fast_mc1), "mc2": mean(fast_mc2), **fast_clock.figures()},
            "naive": {"mc1": mean(naive_mc1), "mc2": mean(naive_mc2), **naive_clock.figures(),
                      "forward_sequences": sum(len(q.mc1_choices) + len(q.mc2_choices) for q in subset)},
            "naive_over_fast_wall": naive_clock.wall / fast_clock.wall,
            "naive_over_fast_cpu": naive_clock.cpu / fast_clock.cpu,
            "max_abs_loglikelihood_difference": max_ll_difference(fast_lls, naive_lls),
            "questions_with_different_mc1": sum(a != b for a, b in zip(fast_mc1, naive_mc1)),
            "max_abs_mc2_difference": max(abs(a - b) for a, b in zip(fast_mc2, naive_mc2)),
        },
    }


def lm_eval_tasks(rows: list[dict]):
    """lm-eval's own truthfulqa_mc1/mc2 configs (its yaml and utils.py), reading `rows` of mc_task.json instead of the hub."""
    import datasets
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    # the HF `truthful_qa/multiple_choice` layout: {choices: [answer texts in file order], labels: [...]}
    hf_rows = [{"question": r["question"],
                "mc1_targets": {"choices": list(r["mc1_targets"]), "labels": list(r["mc1_targets"].values())},
                "mc2_targets": {"choices": list(r["mc2_targets"]), "labels": list(r["mc2_targets"].values())}} for r in rows]

    def local_dataset(**_):
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(hf_rows)})

    tasks = []
    for name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        config = load_yaml(folder / f"{name}.yaml")
        for key in ("tag", "group", "dataset_path", "dataset_name"):
            config.pop(key, None)
        config["custom_dataset"] = local_dataset
        tasks.append(ConfigurableTask(config=config))
    return tasks


def run_lm_eval(args) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    rows = json.loads(Path(args.data).read_text(encoding="utf-8"))[:args.subset]
    questions = load_truthfulqa_mc(args.data)[:args.subset]
    model, tokenizer = load_model(args.dtype)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.naive_batch_size, device=str(model.device))

    lm_clock, fast_clock = Clock(), Clock()
    lm_mc1, lm_mc2, lm_lls, fast_mc1, fast_mc2, fast_lls = [], [], [], [], [], []
    for row_chunk, q_chunk in tqdm(list(zip(chunks(rows, args.chunk), chunks(questions, args.chunk))), desc="lm-eval vs fast"):
        tasks = lm_eval_tasks(row_chunk)
        with lm_clock:
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, bootstrap_iters=0)
        with fast_clock:
            scores = truthfulqa_scores(model, tokenizer, q_chunk, batch_size=args.batch_size, progress=False)
        mc1_samples = sorted(results["samples"]["truthfulqa_mc1"], key=lambda s: s["doc_id"])
        mc2_samples = sorted(results["samples"]["truthfulqa_mc2"], key=lambda s: s["doc_id"])
        lm_mc1 += [float(s["acc"]) for s in mc1_samples]
        lm_mc2 += [float(s["acc"]) for s in mc2_samples]
        lm_lls += [[float(r[0][0]) for r in a["resps"]] + [float(r[0][0]) for r in b["resps"]]
                   for a, b in zip(mc1_samples, mc2_samples)]
        fast_mc1 += scores.mc1; fast_mc2 += scores.mc2
        fast_lls += [a + b for a, b in zip(scores.mc1_loglikelihoods, scores.mc2_loglikelihoods)]
    versions = results["versions"]
    max_diff = max_ll_difference(lm_lls, fast_lls)
    print(f"{len(questions)} questions, {args.dtype}: lm-eval {lm_eval.__version__} MC1 {mean(lm_mc1):.4f} MC2 {mean(lm_mc2):.4f} "
          f"in {lm_clock.wall:.1f} s wall / {lm_clock.cpu:.1f} s CPU; truthfulqa_scores MC1 {mean(fast_mc1):.4f} "
          f"MC2 {mean(fast_mc2):.4f} in {fast_clock.wall:.1f} s / {fast_clock.cpu:.1f} s; lm-eval/ours = "
          f"{lm_clock.wall / fast_clock.wall:.1f}x wall, {lm_clock.cpu / fast_clock.cpu:.1f}x CPU; "
          f"max |Δ log-likelihood| = {max_diff:.2e}")
    return {
        "model": "embedded:SmolLM2-135M-Instruct", "dtype": args.dtype, "data": str(args.data),
        "batch_size": args.batch_size, "lm_eval_batch_size": args.naive_batch_size,
        "questions": len(questions), "lm_eval_version": lm_eval.__version__, "machine": machine(),
        "lm_eval": {"mc1": mean(lm_mc1), "mc2": mean(lm_mc2), **lm_clock.figures(),
                    "task_versions": {t: versions[t] for t in ("truthfulqa_mc1", "truthfulqa_mc2")}},
        "ours": {"mc1": mean(fast_mc1), "mc2": mean(fast_mc2), **fast_clock.figures()},
        "lm_eval_over_ours_wall": lm_clock.wall / fast_clock.wall,
        "lm_eval_over_ours_cpu": lm_clock.cpu / fast_clock.cpu,
        "max_abs_loglikelihood_difference": max_diff,
        "questions_with_different_mc1": sum(a != b for a, b in zip(lm_mc1, fast_mc1)),
        "max_abs_mc2_difference": max(abs(a - b) for a, b in zip(lm_mc2, fast_mc2)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mc_task.json (817 questions)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch-size", type=int, default=4, help="questions packed into one forward pass (fast path)")
    parser.add_argument("--naive-batch-size", type=int, default=16, help="sequences per forward pass (naive path, lm-eval)")
    parser.add_argument("--naive-subset", type=int, default=60, help="questions timed both ways")
    parser.add_argument("--chunk", type=int, default=5, help="questions per turn when the two paths alternate")
    parser.add_argument("--lm-eval", action="store_true", help="compare with lm-eval itself (needs lm-eval installed)")
    parser.add_argument("--subset", type=int, default=40, help="questions for the lm-eval comparison")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.lm_eval:
        figures, out = run_lm_eval(args), RESULTS / f"truthfulqa_lmeval_{args.dtype}.json"
    else:
        figures, out = run_project(args), RESULTS / "truthfulqa_speed.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
