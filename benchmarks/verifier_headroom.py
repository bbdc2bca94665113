"""Headroom of the verifiable tasks: where the embedded default policy is sometimes right greedily and far more
often within 8 samples, the room RL can turn into pass@1 (issue 16, item 3).

For each candidate generator setting, N held-out tasks (rlhf.verifiers.generate_tasks, seed tasks.heldout_seed,
prompt as rlhf.verifiers.task_prompt with tasks.instruction, rendered by the chat template) are answered by the
embedded SmolLM2-135M-Instruct (rlhf.checkpoints.load_source_model, fp32) with plain `model.generate`:

  greedy     one greedy response a task: accuracy with its 95% Wilson interval
  pass@8     8 samples a task at temperature 1 from the full distribution (top_k=0, top_p=1): the unbiased pass@8
             (rlhf.verifiers.pass_at_k), and the share of all samples that are right (sampled pass@1)

A response is right when the last number it gives gets full credit from the dataset's score_answer. A good default
setting has greedy between ~0.1 and ~0.6 and pass@8 far above it.

From the repository root, on 1 thread (~3-4 minutes a setting for 48 items on this CPU):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/verifier_headroom.py --items 48

writes benchmarks/results/verifier_headroom.json and logs the figures to the project's MLflow store, experiment
"benchmarks".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import RESULTS, command, machine, save  # noqa: E402
from rlhf.chat import render_prompt  # noqa: E402
from rlhf.checkpoints import load_source_model  # noqa: E402
from rlhf.params import EMBEDDED_POLICY, ModelParams, load_params  # noqa: E402
from rlhf.verifiers import generate_tasks, gold_accuracy, sampled_pass_at_k  # noqa: E402

CANDIDATES = {
    # the measurement (greedy 0.21, pass@8 0.54 on 48 items); the generator still adds negations and brackets
    "basic_arithmetic_2x1_plus": {"name": "basic_arithmetic", "config": {
        "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+"]}},
    # two operands 0-9, + or -, no brackets or negations
    "chain_sum_2x1": {"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
    # two operands 0-10, + or -, flat ("Calculate 7 - 3."): basic_arithmetic without its brackets and negations
    "basic_arithmetic_2x1_flat": {"name": "basic_arithmetic", "config": {
        "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
        "allow_parentheses": False}},
}


def make_generate(model, tokenizer, max_new_tokens: int, batch_size: int, sample: bool, label: str):
    """prompts -> responses with plain model.generate, `batch_size` left-padded prompts at a time."""
    options = ({"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False})

    def generate(prompts: list[str]) -> list[str]:
        responses = []
        bar = tqdm(range(0, len(prompts), batch_size), desc=label, unit="batch", leave=False)
        for start in bar:
            texts = [render_prompt(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            began = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     **options)
            steps = out.shape[1] - batch["input_ids"].shape[1]
            bar.set_postfix(steps=steps, steps_per_s=f"{steps / (time.perf_counter() - began):.1f}")
            responses += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return responses

    return generate


def measure(name: str, generator: dict, model, tokenizer, args, seed: int, instruction: str) -> dict:
    tasks = generate_tasks([generator], seed=seed, count=args.items)
    began = time.perf_counter()
    greedy = gold_accuracy(make_generate(model, tokenizer, args.max_new_tokens, args.batch_size, False,
                                         f"{name} greedy"), tasks, instruction)
    greedy_seconds = time.perf_counter() - began
    torch.manual_seed(args.seed)
    sampled = sampled_pass_at_k(make_generate(model, tokenizer, args.max_new_tokens, args.batch_size, True,
                                              f"{name} x{args.samples}"), tasks, instruction, args.samples, args.k)
    return {
        "generator": generator,
        "greedy": {"accuracy": greedy.accuracy, "lower": round(greedy.lower, 4), "upper": round(greedy.upper, 4),
                   "correct": sum(greedy.correct)},
        f"pass_at_{args.k}": round(sampled.value, 4),
        "sampled_pass_at_1": round(sampled.sampled_accuracy, 4),
        "tasks_with_a_correct_sample": sum(c > 0 for c in sampled.correct_counts),
        "seconds": {"greedy": round(greedy_seconds, 1), "sampled": round(time.perf_counter() - began - greedy_seconds, 1)},
        "examples": [{"question": t.question, "gold": t.answer, "greedy": r, "correct": c}
                     for t, r, c in list(zip(tasks, greedy.responses, greedy.correct))[:6]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--items", type=int, default=48, help="tasks per setting")
    parser.add_argument("--samples", type=int, default=8, help="samples a task at temperature 1")
    parser.add_argument("--k", type=int, default=8, help="the k of pass@k (at most --samples)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="a reply to these tasks is a sentence at most")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the sampling")
    parser.add_argument("--out", type=Path, default=RESULTS / "verifier_headroom.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tasks_params = load_params(REPO / "params.yaml").tasks
    began = time.perf_counter()
    model, tokenizer = load_source_model(ModelParams(policy=EMBEDDED_POLICY, precision="auto"))
    model.eval()
    tokenizer.padding_side = "left"
    results = {}
    for name in args.settings:
        results[name] = measure(name, CANDIDATES[name], model, tokenizer, args, tasks_params.heldout_seed,
                                tasks_params.instruction)
        r = results[name]
        print(f"{name}: greedy {r['greedy']['accuracy']:.2f} [{r['greedy']['lower']:.2f}, {r['greedy']['upper']:.2f}], "
              f"pass@{args.k} {r[f'pass_at_{args.k}']:.2f}, sampled pass@1 {r['sampled_pass_at_1']:.2f} "
              f"({sum(r['seconds'].values()):.0f} s)", flush=True)

    print(f"\n{'setting':<28} {'greedy [95% Wilson]':>22} {f'pass@{args.k}':>8} {'sampled@1':>10}")
    for name, r in results.items():
        g = r["greedy"]
        print(f"{name:<28} {g['accuracy']:>6.2f} [{g['lower']:.2f}, {g['upper']:.2f}]    "
              f"{r[f'pass_at_{args.k}']:>8.2f} {r['sampled_pass_at_1']:>10.2f}")
    wall = time.perf_counter() - began
    print(f"wall time {wall:.0f} s")

    config = {"policy": EMBEDDED_POLICY, "dtype": str(model.dtype), "items": args.items, "samples": args.samples,
              "k": args.k, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "heldout_seed": tasks_params.heldout_seed, "instruction": tasks_params.instruction,
              "sampling": "temperature 1, top_k 0, top_p 1", "torch_seed": args.seed,
              "scoring": "last number of the reply, full credit from the dataset's score_answer"}
    report = {"command": command(), "config": config, "machine": machine(), "wall_seconds": round(wall, 1),
              "settings": results}
    figures = {name: {"greedy": r["greedy"]["accuracy"], "greedy_lower": r["greedy"]["lower"],
                      "greedy_upper": r["greedy"]["upper"], f"pass_at_{args.k}": r[f"pass_at_{args.k}"],
                      "sampled_pass_at_1": r["sampled_pass_at_1"]} for name, r in results.items()}
    save(args.out.stem, report, figures, args.out, params=config)


if __name__ == "__main__":
    main()
