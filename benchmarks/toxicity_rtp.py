"""Toxicity of the SFT and the PPO policy on RealToxicityPrompts, side by side in one run.

Reads the RTP records in ../shared/data/toxicity-prompts where they are (never copied; see PROVENANCE.md
there), draws a seeded sample of prompts (half from toxic.jsonl, half from nontoxic.jsonl), samples k
continuations per prompt from each policy exactly as the evaluate stage does (`sample_continuations`:
temperature 1, top-p 0.9, up to 20 new tokens, the raw prompt text, as in RTP), scores them with the
stage's classifier (alt-profanity-check by default) and reports expected maximum toxicity and toxicity
probability, overall and per prompt file, with wall time and generated tokens/s.

    nice -n 5 .venv/bin/python -m benchmarks.toxicity_rtp                      # 500 prompts × k=25
    .venv/bin/python -m benchmarks.toxicity_rtp --prompts 8 --k 2 --out /tmp/tox.json   # a smoke run
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/toxicity_rtp.py` as well as `python -m benchmarks.toxicity_rtp`

from benchmarks.record import command, machine, save  # noqa: E402
from rlhf.checkpoints import load_tokenizer, resolve_precision  # noqa: E402
from rlhf.models import load_causal_lm  # noqa: E402
from rlhf.toxicity import (expected_maximum_toxicity, load_toxicity_classifier, load_toxicity_prompts,  # noqa: E402
                           sample_continuations, score_toxicity, toxicity_probability)

DATA = REPO.parent / "shared" / "data" / "toxicity-prompts"
FILES = ("toxic.jsonl", "nontoxic.jsonl")


def draw_prompts(n: int, seed: int) -> list[tuple[str, str]]:
    """(file, prompt) pairs: a seeded n // 2 from each file (the rest from the first)."""
    rng = random.Random(seed)
    drawn = []
    for i, name in enumerate(FILES):
        prompts = load_toxicity_prompts(DATA / name)
        take = n - n // 2 if i == 0 else n // 2
        drawn += [(name, p) for p in rng.sample(prompts, take)]
    return drawn


def summary(scores: list[list[float]]) -> dict:
    return {"expected_maximum_toxicity": round(expected_maximum_toxicity(scores), 4),
            "toxicity_probability": round(toxicity_probability(scores), 4), "prompts": len(scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=["models/sft", "models/policy"], help="checkpoints, in order")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--k", type=int, default=25, help="continuations per prompt (RealToxicityPrompts: 25)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100, help="sequences decoded together")
    parser.add_argument("--classifier", default="alt-profanity-check")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    drawn = draw_prompts(args.prompts, args.seed)
    prompts = [p for _, p in drawn]
    classifier = load_toxicity_classifier(args.classifier)
    dtype = resolve_precision(args.precision)
    results = {}
    for folder in args.policies:
        name = Path(folder).name
        model, tokenizer = load_causal_lm(REPO / folder, dtype).eval(), load_tokenizer(REPO / folder)
        tic = time.perf_counter()
        continuations = sample_continuations(model, tokenizer, prompts, args.k, args.max_new_tokens, 1.0, 0.9,
                                             args.seed, args.batch_size)
        scores = score_toxicity(continuations.texts, classifier)
        per_file = {f: summary([s for (g, _), s in zip(drawn, scores) if g == f]) for f in FILES}
        results[name] = {**summary(scores), "per_file": per_file, "generated_tokens": continuations.generated_tokens,
                         "generation_seconds": round(continuations.seconds, 1),
                         "tokens_per_s": round(continuations.tokens_per_second, 1),
                         "wall_seconds": round(time.perf_counter() - tic, 1),
                         "example": {"prompt": prompts[0], "continuation": continuations.texts[0][0],
                                     "toxicity": round(scores[0][0], 4)}}
        print(f"{name}: EMT {results[name]['expected_maximum_toxicity']:.4f}, toxicity probability "
              f"{results[name]['toxicity_probability']:.4f}, {results[name]['tokens_per_s']:.0f} tok/s, "
              f"{results[name]['wall_seconds']:.0f} s", flush=True)

    first, *rest = list(results)
    ratios = {f"{other}/{first}": {
        "expected_maximum_toxicity": round(results[other]["expected_maximum_toxicity"]
                                           / max(results[first]["expected_maximum_toxicity"], 1e-9), 3),
        "toxicity_probability": round(results[other]["toxicity_probability"]
                                      / max(results[first]["toxicity_probability"], 1e-9), 3)} for other in rest}
    for pair, r in ratios.items():
        print(f"ratio {pair}: EMT {r['expected_maximum_toxicity']:.3f}x, toxicity probability "
              f"{r['toxicity_probability']:.3f}x (same prompts, seed and sampler, one run)")
    report = {"what": "RealToxicityPrompts expected maximum toxicity and toxicity probability, policies side by side",
              "command": command(), "data": str(DATA.relative_to(REPO.parent)),
              "config": {"prompts": len(prompts), "k": args.k, "max_new_tokens": args.max_new_tokens,
                         "temperature": 1.0, "top_p": 0.9, "classifier": args.classifier, "seed": args.seed,
                         "batch_size": args.batch_size, "precision": str(dtype)},
              "policies": results, "ratios": ratios, "machine": machine()}
    path = save("toxicity_rtp", report, {"policies": results, "ratios": ratios}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
