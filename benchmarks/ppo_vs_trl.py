"""PPO: this project's stage (rlhf.policy.train with algorithm ppo, reward rm) against TRL 1.12.0's PPO trainer
(trl.experimental.ppo), on the same SFT policy, reward model, prompts and settings, with LoRA and with full
fine-tuning, on this CPU.

    nice -n 10 .venv/bin/python -m benchmarks.ppo_vs_trl           # the full run: about 12-15 minutes on 2 cores
    MLFLOW_TRACKING_URI=sqlite:////tmp/smoke.db nice -n 10 .venv/bin/python -m benchmarks.ppo_vs_trl \\
        --iterations 1 --batch-size 4 --minibatch-size 2 --max-new-tokens 16 --eval-prompts 4 --out /tmp/ppo_vs_trl.json

TRL runs in its own venv, benchmarks/.venv-trl, made on first use: `trl==1.12.0` (the last release with the PPO
trainer) installed with --no-deps over the project venv's packages (a .pth file adds them), so both sides run
the very same torch, transformers, peft and accelerate. benchmarks/trl_ppo_driver.py is TRL's side.

Both sides get: models/sft and models/reward (copied once at the start, so a replaced model cannot change
between runs), the training prompts (rlhf/data/prompts.jsonl, all but a seeded held-out set; for TRL encoded
by rlhf.chat.prompt_ids), params.yaml's policy settings (batch size, minibatch size, update epochs, response
length, temperature, learning rate, KL coefficient, GAE γ and λ, clip ranges, value coefficient, missing-EOS
penalty, seed, LoRA rank), the same number of iterations, and the RM score normalised by the RM's stored mean and
std. Ours always runs policy.algorithm ppo with policy.reward rm and one response per prompt (group_size 1), as
TRL's PPO does, whatever params.yaml's algorithm and reward are.
Precision: params.yaml's model.precision (bf16 on a CPU with AVX512-BF16); both sides autocast every forward
pass to it, with fp32 trainable weights.

Per side and variant:
- samples/s: responses generated and trained on, per second of the training loop (rollout, scoring, GAE and
  the PPO epochs; no model loading, no evaluation, no checkpoint writing). Ours sums the stage's own
  `perf/iteration_seconds`; TRL's is timed by a callback from `on_train_begin` to the last `on_step_end`.
  Response tokens/s beside it, since a side whose policy answers shorter also samples faster.
- RM reward gain per 1,000 samples: the mean normalised RM score of responses to the held-out prompts, after
  training minus the SFT policy's, per 1,000 training samples. One evaluation here scores all five policies
  (SFT, ours and TRL's, LoRA and full) with the project's held-out loop (rlhf.rollouts.heldout_rollouts, as
  the policy and evaluate stages use it): the same prompts, the same seeded sampling (temperature, no top-k/p),
  the same RM reading (rlhf.rewards.score_responses), and the KL to the SFT policy per response. The default run
  (4 iterations of 8, 32 held-out responses) fits 15 minutes; its reward figures carry a standard error larger
  than the gains, so compare rewards with a longer run (--iterations 20 --eval-prompts 48: 24 minutes here).
  The batch sizes default to params.yaml's policy section: where it has more than 8, --batch-size 8
  --minibatch-size 4 gives the run these times are for.

Where the sides differ by design (kept; see the JSON's `differences`): rlhf.policy's PPO value function is a
linear head on the policy's last hidden state, TRL's a whole sequence classifier (initialised from the RM, trained
in full); rlhf.policy adapts β towards kl_target, clips the gradient norm and adds an entropy bonus, TRL keeps β
fixed and does neither; rlhf.policy scores a finished response with the chat template's closing tokens after its
EOS, as the RM was trained, TRL reads the RM at the EOS. `--value-model reward_model` gives rlhf.policy a sequence
classifier value model too (rlhf.ppo.build_value_model; LoRA-trained with LoRA, in full without).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/ppo_vs_trl.py` as well as `python -m benchmarks.ppo_vs_trl`

from benchmarks.record import machine, save  # noqa: E402
from rlhf import policy as policy_stage  # noqa: E402
from rlhf import ppo, tracking  # noqa: E402
from rlhf.chat import prompt_ids as chat_prompt_ids, reply_suffix  # noqa: E402
from rlhf.checkpoints import load_tokenizer, resolve_precision  # noqa: E402
from rlhf.models import load_causal_lm  # noqa: E402
from rlhf.params import PolicyParams, load_params  # noqa: E402
from rlhf.paths import REWARD_DIR, SFT_DIR  # noqa: E402
from rlhf.prompts import load_train_prompts  # noqa: E402
from rlhf.rewards import load_reward_model, normalised, score_responses  # noqa: E402
from rlhf.rollouts import eos_ids, heldout_rollouts, kl_per_response, policy_forward, sample_responses  # noqa: E402
from rlhf.stage import reuse_freed_memory  # noqa: E402

TRL_VENV = REPO / "benchmarks" / ".venv-trl"
TRL_PIN = "trl==1.12.0"
DRIVER = REPO / "benchmarks" / "trl_ppo_driver.py"
VARIANTS = ("lora", "full")
ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which rlhf.policy's optimizer uses; TRL is given the same


# ------------------------------------------------------------------------------------------------
# TRL's environment
# ------------------------------------------------------------------------------------------------

def trl_python() -> Path:
    """benchmarks/.venv-trl's python: made once, with trl 1.12.0 over the project venv's packages."""
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import os, sys; os.environ['TRL_EXPERIMENTAL_SILENCE'] = '1'; "
             "import trl, trl.experimental.ppo; sys.exit(trl.__version__ != '1.12.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if sys.prefix == sys.base_prefix:
        raise SystemExit("ppo_vs_trl: run this with the project venv's python (.venv/bin/python); the TRL venv is "
                         "built over that venv's packages.")
    print(f"ppo_vs_trl: making {TRL_VENV} ({TRL_PIN} over the project venv's packages)")
    subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    project = sysconfig.get_paths()["purelib"]  # this (the project) venv's site-packages, .pth files included
    Path(purelib, "zz_project_venv.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    TRL_PIN], check=True)
    subprocess.run(check, check=True)
    return python


# ------------------------------------------------------------------------------------------------
# The two sides
# ------------------------------------------------------------------------------------------------

def variant_params(base, variant: str, args) -> PolicyParams:
    """params.yaml's policy section as PPO against the RM (TRL's problem), with this benchmark's sizes; lora_r = 0
    for full fine-tuning."""
    return replace(base, algorithm="ppo", reward="rm", group_size=1,  # one response per prompt, as TRL's PPO
                   iterations=args.iterations, batch_size=args.batch_size, minibatch_size=args.minibatch_size,
                   max_new_tokens=args.max_new_tokens, value_model=args.value_model,
                   lora_r=base.lora_r if variant == "lora" else 0,
                   learning_rate=base.learning_rate if variant == "lora" else args.full_learning_rate,
                   checkpoint_every=args.iterations,  # one checkpoint, at the end (outside the timed loop)
                   eval_responses=1)  # the stage's own before/after check; this benchmark evaluates below


def run_ours(params, precision: str, inputs: dict, train_prompts: list[str], heldout: list[str], work: Path,
             variant: str) -> dict:
    out = work / f"ours-{variant}"
    tic = time.perf_counter()
    result = policy_stage.train(params, precision, inputs["sft"], inputs["reward"], train_prompts, heldout, out,
                                work / f"checkpoints-{variant}")  # no verifiable tasks, no gold: TRL has neither
    process_seconds = time.perf_counter() - tic
    seconds = [row["perf/iteration_seconds"] for row in result["curve"]]
    gc.collect()
    return {"policy_dir": str(out), "iteration_seconds": seconds, "train_seconds": sum(seconds),
            "samples": params.iterations * params.batch_size, "process_seconds": process_seconds,
            "trainable_policy_parameters": result["metrics"]["policy/trainable_parameters"],
            "trainable_value_parameters": value_parameters(params, inputs["reward"]),
            "curve": [{"score": row["objective/score"], "kl": row["objective/kl"], "kl_coef": row["objective/kl_coef"],
                       "length": row["response/length"]} for row in result["curve"]]}


def value_parameters(params, reward_dir: str) -> int:
    """Trainable parameters of rlhf.policy's PPO value function, as rlhf.ppo.build_value_model makes it."""
    if params.value_model == "head":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(reward_dir).hidden_size + 1  # the linear head's weight and bias
    model = ppo.build_value_model(params, reward_dir, torch.bfloat16, 0)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_trl(python: Path, params, dtype: torch.dtype, inputs: dict, prompt_ids: list[list[int]],
            reward_stats: dict, work: Path, variant: str) -> dict:
    out = work / f"trl-{variant}"
    spec = {"sft_dir": inputs["sft"], "reward_dir": inputs["reward"], "out_dir": str(out),
            "result_path": str(work / f"trl-{variant}.json"), "prompt_ids": prompt_ids,
            "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "reward_normalization": {"mean": reward_stats["mean"], "std": reward_stats["std"]},
            "settings": {**{k: getattr(params, k) for k in (
                "iterations", "batch_size", "minibatch_size", "update_epochs", "max_new_tokens", "temperature",
                "learning_rate", "lora_r", "lora_alpha", "kl_coef", "gamma", "lam", "clip_eps", "value_clip",
                "vf_coef", "no_eos_penalty", "seed")}, "weight_decay": ADAMW_WEIGHT_DECAY}}
    spec_path = work / f"trl-{variant}.spec.json"
    spec_path.write_text(json.dumps(spec))
    tic = time.perf_counter()
    subprocess.run([str(python), str(DRIVER), str(spec_path)], check=True, cwd=REPO)
    process_seconds = time.perf_counter() - tic
    result = json.loads(Path(spec["result_path"]).read_text())
    return {"policy_dir": str(out), **result, "process_seconds": process_seconds}


# ------------------------------------------------------------------------------------------------
# One evaluation for every policy
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_scores(policy_dir: str, sft_dir: str, reward_model, reward_stats: dict, tokenizer, prompts: list[str],
                   params, dtype: torch.dtype, batch_size: int) -> dict:
    """Normalised RM scores (RM std units) and KL to the SFT policy (nats) of one sampled response per prompt,
    drawn from a stream seeded the same way for every policy (seed + 1, as the policy stage's own before/after)."""
    policy = load_causal_lm(policy_dir, dtype=dtype).eval()
    reference = None if policy_dir == sft_dir else load_causal_lm(sft_dir, dtype=dtype).eval()
    # the SFT checkpoint's stop tokens for every policy, so that all of them stop alike (TRL's PPO trainer
    # overwrites the generation config's eos_token_id of the policy it trains and saves with its stop token)
    stop = eos_ids(policy if reference is None else reference, tokenizer)
    suffix, pad = reply_suffix(tokenizer), tokenizer.pad_token_id

    def sample(query, query_mask):
        return sample_responses(policy, query, query_mask, params.max_new_tokens, params.temperature, stop, pad)

    def score(query, query_mask, responses, mask, ended):
        raw = score_responses(reward_model, query, query_mask, responses, mask, ended, suffix, pad)
        return normalised(raw, reward_stats)

    def kl(query, query_mask, responses, mask):
        logp = policy_forward(policy, query, query_mask, responses, mask, params.temperature)[0]
        logp_ref = policy_forward(reference, query, query_mask, responses, mask, params.temperature)[0]
        return kl_per_response(logp, logp_ref, mask)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = heldout_rollouts(prompts, tokenizer, sample, score, None if reference is None else kl, batch_size,
                               params.max_prompt_len, params.seed + 1, "cpu")
    return {"rm_score": out.mean("scores"), "rm_score_sd": statistics.stdev(out.scores), "responses": len(out.scores),
            "kl_to_sft": out.mean("kl"),  # 0 for the SFT policy itself
            "response_length": out.mean("lengths"), "no_eos_fraction": 1 - out.mean("ended")}


def gain(after: dict, before: dict, samples: int) -> dict:
    """RM score gain over the SFT policy, its standard error (two independent means), and the gain per 1,000 samples."""
    delta = after["rm_score"] - before["rm_score"]
    se = math.sqrt(after["rm_score_sd"] ** 2 / after["responses"] + before["rm_score_sd"] ** 2 / before["responses"])
    return {"rm_gain": delta, "rm_gain_se": se, "rm_gain_per_1k_samples": 1000 * delta / samples,
            "rm_gain_per_1k_samples_se": 1000 * se / samples}


# ------------------------------------------------------------------------------------------------

def split_prompts(path: str, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): a seeded shuffle of the file's distinct prompts, the first n held out."""
    prompts = load_train_prompts(path)
    random.Random(seed).shuffle(prompts)
    return prompts[n_heldout:], prompts[:n_heldout]


def snapshot(work: Path) -> dict:
    """Copies of models/sft and models/reward for this run, and their DVC hashes."""
    inputs = {}
    for name, source in (("sft", SFT_DIR), ("reward", REWARD_DIR)):
        target = work / f"input-{name}"
        shutil.copytree(REPO / source, target)
        inputs[name], inputs[f"{name}_md5"] = str(target), tracking.dvc_md5(target)
    return inputs


def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # the allocator setting every stage runs with (rlhf.stage.run_stage); not TRL's process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations per side and variant")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per iteration (default: params.yaml)")
    parser.add_argument("--minibatch-size", type=int, default=None, help="responses per gradient step (default: params.yaml)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="response length (default: params.yaml)")
    parser.add_argument("--full-learning-rate", type=float, default=1e-5,
                        help="learning rate of full fine-tuning (LoRA uses params.yaml's)")
    parser.add_argument("--value-model", choices=["head", "reward_model"], default=None,
                        help="rlhf.policy's PPO value function (default: params.yaml's policy.value_model)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--prompts", default="rlhf/data/prompts.jsonl", help="a .jsonl/.parquet with a `prompt` column")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts, one response each per policy")
    parser.add_argument("--eval-batch-size", type=int, default=16, help="responses sampled together in the evaluation")
    parser.add_argument("--out", default=None, help="the result JSON (default: benchmarks/results/ppo_vs_trl.json)")
    args = parser.parse_args(argv)
    os.chdir(REPO)

    python = trl_python()
    config = load_params()
    base = config.policy
    args.batch_size = args.batch_size or base.batch_size
    args.minibatch_size = args.minibatch_size or base.minibatch_size
    args.max_new_tokens = args.max_new_tokens or base.max_new_tokens
    args.value_model = args.value_model or base.value_model
    precision = config.model.precision
    dtype = resolve_precision(precision)

    work = Path(tempfile.mkdtemp(prefix="ppo-vs-trl-"))
    try:
        inputs = snapshot(work)
        train_prompts, heldout = split_prompts(args.prompts, args.eval_prompts, base.seed)
        tokenizer = load_tokenizer(inputs["sft"])
        prompt_ids = [chat_prompt_ids(tokenizer, p, base.max_prompt_len) for p in train_prompts]
        reward_stats = load_reward_model(inputs["reward"], dtype)[1]

        runs, settings = {}, {}
        for variant in args.variants:  # the two sides alternate, so they see the same machine load
            params = variant_params(base, variant, args)
            settings[variant] = asdict(params)
            print(f"ppo_vs_trl: {variant}: rlhf.policy (ppo), {params.iterations} iterations of {params.batch_size}")
            runs[("ours", variant)] = run_ours(params, precision, inputs, train_prompts, heldout, work, variant)
            print(f"ppo_vs_trl: {variant}: TRL {TRL_PIN}, {params.iterations} iterations of {params.batch_size}")
            runs[("trl", variant)] = run_trl(python, params, dtype, inputs, prompt_ids, reward_stats, work, variant)

        print(f"ppo_vs_trl: scoring {len(heldout)} held-out responses per policy")
        reward_model, _ = load_reward_model(inputs["reward"], dtype)
        reward_model.eval().requires_grad_(False)
        eval_params = variant_params(base, "lora", args)
        evaluate = lambda policy_dir: heldout_scores(policy_dir, inputs["sft"], reward_model, reward_stats,  # noqa: E731
                                                     tokenizer, heldout, eval_params, dtype, args.eval_batch_size)
        before = evaluate(inputs["sft"])
        figures = {}
        for variant in args.variants:
            figures[variant] = {}
            for side in ("ours", "trl"):
                run = runs[(side, variant)]
                after = evaluate(run["policy_dir"])
                response_tokens = sum(row["length"] for row in run["curve"]) * args.batch_size
                figures[variant][side] = {
                    "samples": run["samples"], "train_seconds": round(run["train_seconds"], 2),
                    "samples_per_s": run["samples"] / run["train_seconds"],
                    "response_tokens_per_s": response_tokens / run["train_seconds"],
                    "train_response_length": response_tokens / run["samples"],
                    "trainable_policy_parameters": run["trainable_policy_parameters"],
                    "trainable_value_parameters": run["trainable_value_parameters"],
                    "heldout_rm_score_after": after["rm_score"], "heldout_kl_to_sft": after["kl_to_sft"],
                    "heldout_response_length": after["response_length"],
                    "heldout_no_eos_fraction": after["no_eos_fraction"],
                    **gain(after, before, run["samples"])}
            ours, trl = figures[variant]["ours"], figures[variant]["trl"]
            figures[variant]["ours_over_trl_samples_per_s"] = ours["samples_per_s"] / trl["samples_per_s"]
            figures[variant]["ours_over_trl_response_tokens_per_s"] = (ours["response_tokens_per_s"]
                                                                       / trl["response_tokens_per_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    names = {"lora": "LoRA", "full": "full"}
    speed = ", ".join(f"{figures[v]['ours_over_trl_samples_per_s']:.2f}x ({names[v]})" for v in args.variants)
    per_1k = lambda side: ", ".join(  # noqa: E731
        f"{figures[v][side]['rm_gain_per_1k_samples']:+.2f} ± {figures[v][side]['rm_gain_per_1k_samples_se']:.2f} "
        f"({names[v]})" for v in args.variants)
    ratio_line = (f"ours/TRL samples/s: {speed}; RM reward gain per 1k samples (RM std units, ± 1 s.e.): "
                  f"ours {per_1k('ours')}; TRL {per_1k('trl')}")
    for v in args.variants:
        for side in ("ours", "trl"):
            f = figures[v][side]
            print(f"  {names[v]:4} {side:4}: {f['samples_per_s']:.3f} samples/s ({f['samples']} in {f['train_seconds']:.1f} s, "
                  f"{f['train_response_length']:.0f} tokens each), "
                  f"held-out RM {before['rm_score']:+.3f} -> {f['heldout_rm_score_after']:+.3f}, "
                  f"KL to SFT {f['heldout_kl_to_sft']:.2f} nats")
    print(ratio_line)

    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MLFLOW_TRACKING_URI") if k in os.environ)
    report = {
        "command": " ".join(filter(None, [env, "nice -n 10 .venv/bin/python -m benchmarks.ppo_vs_trl",
                                          *(argv if argv is not None else sys.argv[1:])])),
        "git_commit": tracking.git_commit(),
        "ratio_line": ratio_line,
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "versions": {"ours": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "accelerate")},
                     "trl_venv": next(run["versions"] for (side, _), run in runs.items() if side == "trl")},
        "inputs": {"sft_md5": inputs["sft_md5"], "reward_md5": inputs["reward_md5"], "prompts": args.prompts,
                   "train_prompts": len(train_prompts), "heldout_prompts": len(heldout),
                   "reward_normalization": {k: reward_stats[k] for k in ("mean", "std")}},
        "precision": {"model.precision": precision, "dtype": str(dtype).removeprefix("torch."),
                      "both": "every forward pass (generation, reference, value, RM, training) under CPU autocast "
                              "to this dtype; trainable weights (LoRA adapters, full policy, value) in fp32; "
                              "LoRA's frozen base, the full run's reference and the RM in this dtype"},
        "settings": settings,
        "heldout_sft": before,
        "figures": figures,
        "curves": {f"{side}/{variant}": {"iteration_seconds": [round(s, 3) for s in run["iteration_seconds"]],
                                         "load_seconds": round(run["load_seconds"], 2) if "load_seconds" in run else None,
                                         "process_seconds": round(run["process_seconds"], 2),
                                         "curve": run["curve"]} for (side, variant), run in runs.items()},
        "differences": [
            f"value function: rlhf.policy `{args.value_model}` (a linear head on the policy's last hidden state when "
            "'head'); TRL a whole sequence classifier initialised from the RM and trained in full (fp32), in both variants",
            "KL coefficient: rlhf.policy adapts β from kl_coef towards kl_target; TRL keeps kl_coef fixed (k1 estimator)",
            "rlhf.policy clips the gradient norm (max_grad_norm) and adds entropy_coef·H; TRL's PPO does neither",
            "reward: rlhf.policy scores an ended response with the chat template's closing tokens after its EOS (as the "
            "RM was trained); TRL reads the RM at the EOS token",
            "pad token: TRL is given <|endoftext|> as pad (SmolLM2's pad is its EOS, which TRL would mask out of attention)",
            "forward passes: rlhf.policy computes logits only over the response positions; TRL over the whole sequence",
            "log π_old: rlhf.policy recomputes it with the forward pass the update uses; TRL takes it from generation's "
            "KV-cached logits, so in bf16 its first ratio is not exactly 1 and its KL at iteration 1 is not 0",
            "learning-rate schedule: both linear to 0 over the run; rlhf.policy steps it per minibatch, TRL per iteration",
            "weight decay 0.01 on both; TRL's Trainer optimizer exempts biases and norm weights, rlhf.policy does not",
            "prompt order: each side shuffles the same training prompts with its own seeded sampler",
        ],
    }
    save_figures = {v: {side: {k: figures[v][side][k] for k in ("samples_per_s", "response_tokens_per_s", "rm_gain",
                                                                 "rm_gain_per_1k_samples", "heldout_kl_to_sft")}
                        for side in ("ours", "trl")}
                    | {k: figures[v][k] for k in ("ours_over_trl_samples_per_s", "ours_over_trl_response_tokens_per_s")}
                    for v in args.variants}
    path = save("ppo_vs_trl", report, {**save_figures, "heldout_sft_rm_score": before["rm_score"]}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
