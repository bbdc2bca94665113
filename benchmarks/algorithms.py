"""The policy stage's algorithms side by side, and against TRL 1.12.0's GRPOTrainer, RLOOTrainer and DPOTrainer.

    nice -n 10 .venv/bin/python -m benchmarks.algorithms           # the full run (about 1.5-2 hours on 2 cores)
    nice -n 10 .venv/bin/python -m benchmarks.algorithms --quick   # a smoke run of a few minutes: its gold figures
                                                                   # are noise, its speeds only indicative
    bash benchmarks/device_grpo.sh stage; bash benchmarks/device_grpo.sh run   # grpo on a lent GPU (see there)

One process trains ppo, grpo, rloo, reinforce_pp and dpo with rlhf.policy's own `train`/`train_dpo`, one after the
other, from the same SFT start (--sft, default models/sft), then runs TRL's trainers in the TRL venv
(benchmarks/.venv-trl, made on first use as benchmarks/ppo_vs_trl.py makes it: trl==1.12.0 over this venv's
packages, so both sides run the same torch, transformers and peft), and measures every policy the same way.

The objective is the default objective's verifiable half with the verifier as the reward (issue 16's
"reward = the verifier directly" run): training prompts are tasks.* tasks from tasks.train_seed, rendered by
rlhf.verifiers.task_prompt; the reward of a response is 1 when the verifier finds its answer right, 0 otherwise,
for ours (rlhf.reward_sources) and TRL (the same function, as a TRL reward function) alike. The verifier, not a
reward model, because it is the one reward both sides compute identically (TRL's trainers read an RM their own
way), and because this checkout has no trained RM. Same budget: every online algorithm samples iterations ×
batch_size responses; DPO gets the same number of responses sampled from the SFT policy, two per task, judged by
the verifier into (correct, wrong) pairs (ties, both right or both wrong, left out and counted), and TRL's
DPOTrainer trains on the very same pairs.

Per policy:
- gold: greedy answers to the first --gold-tasks held-out tasks (tasks.heldout_seed, never trained on), the
  verifier's accuracy with its Wilson interval; the gain over SFT with the paired interval
  (rlhf.verifiers.accuracy_difference), and per 1,000 samples;
- samples/s and response tokens/s of the training loop (ours: the stage's `perf/iteration_seconds`, rollout and
  update, no loading or measurement; TRL: a callback from on_train_begin to the last on_step_end); ours also
  splits it: the rollouts' sampling (`generation_seconds`) against the rest (log-probs, reward, update);
- peak RSS: ours sampled every 10 ms during `train` in this process, and its rise over the RSS just before (each
  run starts after the previous one's memory is freed, but the process's baseline creeps up run by run, so the
  memory ratios compare the rises); TRL's is the driver process's VmHWM, its whole life, loading included.
  On a GPU, ours also reports the peak of torch's allocated CUDA memory during `train`.
Before the timed runs one untimed ppo iteration warms the process up (thread pools, kernel caches, heap growth),
which would otherwise land on whichever algorithm runs first.
DPO: wall time per epoch (ours: the steps' time; TRL: its loop's), pairs/s.
Writes benchmarks/results/algorithms.json (or --out) and an MLflow run in the `benchmarks` experiment (not with
--no-mlflow: a lent GPU machine carries mlflow-skinny, which imports but has no SQLite store).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from benchmarks.record import RESULTS, machine, save
from rlhf import policy, tracking
from rlhf.chat import render_prompt
from rlhf.checkpoints import load_tokenizer, resolve_precision
from rlhf.comparisons import Pair
from rlhf.models import load_causal_lm
from rlhf.params import load_params
from rlhf.paths import SFT_DIR
from rlhf.rollouts import encode_queries, eos_ids, sample_k, sample_responses
from rlhf.stage import reuse_freed_memory
from rlhf.verifiers import accuracy_difference, gold_accuracy, heldout_tasks, judge_pair, task_prompt, train_tasks

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / "benchmarks" / ".venv-trl"
TRL_PIN = "trl==1.12.0"
DRIVER = REPO / "benchmarks" / "trl_algorithms_driver.py"
ONLINE = ("ppo", "grpo", "rloo", "reinforce_pp")
TRAIN_TASKS = 320  # distinct training tasks at most (the stage's default task_prompts); a longer run deals them again
ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, which rlhf.policy's optimizer uses; TRL is given the same
SIZES = {  # iterations, batch (responses), group size of grpo/rloo, minibatch, update epochs, response tokens, gold tasks
    "full": dict(iterations=40, batch_size=16, group_size=4, minibatch_size=8, update_epochs=2, max_new_tokens=32,
                 gold_tasks=200, dpo_epochs=2),
    "quick": dict(iterations=4, batch_size=8, group_size=4, minibatch_size=4, update_epochs=1, max_new_tokens=32,
                  gold_tasks=32, dpo_epochs=1),
}


# ------------------------------------------------------------------------------------------------
# TRL's environment
# ------------------------------------------------------------------------------------------------

def trl_python() -> Path:
    """benchmarks/.venv-trl's python: made once, with trl 1.12.0 over the project venv's packages. Or this
    python, when trl 1.12.0 is installed in it already (a machine with no package index, given trl's wheel)."""
    try:
        if importlib.metadata.version("trl") == TRL_PIN.removeprefix("trl=="):
            return Path(sys.executable)
    except importlib.metadata.PackageNotFoundError:
        pass
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import sys, trl; sys.exit(trl.__version__ != '1.12.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if sys.prefix == sys.base_prefix:
        raise SystemExit("algorithms: run this with the project venv's python (.venv/bin/python); the TRL venv is "
                         "built over that venv's packages.")
    print(f"algorithms: making {TRL_VENV} ({TRL_PIN} over the project venv's packages)")
    subprocess.run([sys._base_executable, "-m", "venv", "--clear", str(TRL_VENV)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    project = sysconfig.get_paths()["purelib"]
    Path(purelib, "zz_project_venv.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                    TRL_PIN], check=True)
    subprocess.run(check, check=True)
    return python


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

class PeakRss:
    """The process's largest resident set size while inside, sampled every 10 ms, in MiB."""

    def __enter__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.before = self.process.memory_info().rss / 2**20
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss / 2**20)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss / 2**20)


def release_memory() -> None:
    gc.collect()
    try:  # return freed heap pages to the OS, so the next run's peak does not sit on this one's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@torch.no_grad()
def gold(policy_dir: str, tasks, instruction: str, dtype: torch.dtype, max_new_tokens: int, batch: int = 32):
    """Greedy answers to the held-out tasks, checked by the verifier: rlhf.verifiers.GoldAccuracy."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(policy_dir, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(policy_dir)
    stop = eos_ids(model, tokenizer)

    def generate(prompts):
        texts = []
        for start in range(0, len(prompts), batch):
            query, query_mask = encode_queries(tokenizer, prompts[start:start + batch], 256, device)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                responses, mask, _ = sample_responses(model, query, query_mask, max_new_tokens, 1.0, stop,
                                                      tokenizer.pad_token_id, top_k=1)
            texts += [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
        return texts

    return gold_accuracy(generate, tasks, instruction)


def gold_figures(after, before, samples: int) -> dict:
    gain, lower, upper = accuracy_difference(after, before)
    return {"gold_accuracy": after.accuracy, "gold_accuracy_interval": [after.lower, after.upper],
            "gold_gain": gain, "gold_gain_interval": [lower, upper],
            "gold_gain_per_1k_samples": 1000 * gain / samples,
            "gold_gain_per_1k_samples_interval": [1000 * lower / samples, 1000 * upper / samples]}


# ------------------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------------------

def run_ours(params, precision: str, sft: str, prompts: list[str], records: dict, heldout: list[str],
             work: Path) -> dict:
    out = work / f"ours-{params.algorithm}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as rss:
        result = policy.train(params, precision, sft, None, prompts, heldout, out, work / f"checkpoints-{params.algorithm}",
                              tasks=records)
    seconds = sum(row["perf/iteration_seconds"] for row in result["curve"])
    samples = params.iterations * params.batch_size
    tokens = sum(row["response/length"] for row in result["curve"]) * params.batch_size
    # each iteration's sampling time, from its response tokens and the stage's generation tokens/s
    generation = sum(row["response/length"] * params.batch_size / row["perf/generation_tokens_per_s"]
                     for row in result["curve"])
    figures = {"policy_dir": str(out), "samples": samples, "train_seconds": seconds, "samples_per_s": samples / seconds,
               "response_tokens_per_s": tokens / seconds, "response_length": tokens / samples,
               "generation_seconds": generation, "generation_fraction": generation / seconds,
               "train_reward": [row.get("reward/verifier") for row in result["curve"]],
               "peak_rss_mib": rss.peak, "rss_before_mib": rss.before, "rss_rise_mib": rss.peak - rss.before}
    if torch.cuda.is_available():
        figures["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del result
    release_memory()
    return figures


def verifier_pairs(sft: str, tasks, instruction: str, dtype: torch.dtype, params, seed: int) -> tuple[list[Pair], int, int]:
    """Two responses per task sampled from the SFT policy, judged by the verifier: (pairs, ties, samples)."""
    model = load_causal_lm(sft, dtype=dtype).eval()
    tokenizer = load_tokenizer(sft)
    torch.manual_seed(seed)
    prompts = [task_prompt(t, instruction) for t in tasks]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        sampled = sample_k(model, tokenizer, [render_prompt(tokenizer, p) for p in prompts], 2, params.max_new_tokens,
                           params.temperature, 16, add_special_tokens=False)
    pairs, ties = [], 0
    for task, prompt, (a, b) in zip(tasks, prompts, sampled.texts):
        verdict = judge_pair(task, a, b)
        if verdict == "tie":
            ties += 1
        else:
            pairs.append(Pair(prompt, a, b) if verdict == "a" else Pair(prompt, b, a))
    del model
    release_memory()
    return pairs, ties, 2 * len(tasks)


def run_ours_dpo(params, precision: str, sft: str, pairs: list[Pair], ties: int, heldout: list[str], work: Path) -> dict:
    out = work / "ours-dpo"
    with PeakRss() as rss:
        result = policy.train_dpo(params, precision, sft, pairs, [], heldout, out, work / "checkpoints-dpo", ties=ties)
    seconds = sum(row["perf/iteration_seconds"] for row in result["curve"])
    figures = {"policy_dir": str(out), "train_seconds": seconds, "seconds_per_epoch": seconds / params.dpo_epochs,
               "pairs_per_s": len(pairs) * params.dpo_epochs / seconds,
               "train_loss": [row["loss/dpo"] for row in result["curve"]],
               "peak_rss_mib": rss.peak, "rss_before_mib": rss.before, "rss_rise_mib": rss.peak - rss.before}
    del result
    release_memory()
    return figures


def run_trl(python: Path, trainer: str, params, dtype: torch.dtype, sft: str, work: Path, prompts=(), records=None,
            pairs=()) -> dict:
    out = work / f"trl-{trainer}"
    spec = {"trainer": trainer, "sft_dir": sft, "out_dir": str(out), "result_path": str(work / f"trl-{trainer}.json"),
            "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "prompts": list(prompts), "tasks": [records[p] for p in prompts] if records else [],
            "pairs": [dataclasses.asdict(p) for p in pairs],
            "settings": {**{k: getattr(params, k) for k in (
                "iterations", "batch_size", "group_size", "minibatch_size", "update_epochs", "max_new_tokens",
                "max_prompt_len", "temperature", "learning_rate", "lora_r", "lora_alpha", "kl_coef", "clip_eps",
                "max_grad_norm", "dpo_beta", "dpo_epochs", "seed")}, "weight_decay": ADAMW_WEIGHT_DECAY}}
    spec_path = work / f"trl-{trainer}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    tic = time.perf_counter()
    subprocess.run([str(python), str(DRIVER), str(spec_path)], check=True, cwd=REPO, env=env)
    result = json.loads(Path(spec["result_path"]).read_text())
    # TRL's own per-step wall time: the steps that generate (every update_epochs × batch/minibatch) include it
    result["step_seconds"] = [log["step_time"] for log in result.pop("logs") if "step_time" in log]
    return {"policy_dir": str(out), **result, "process_seconds": time.perf_counter() - tic}


# ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    reuse_freed_memory()  # the allocator setting every stage runs with (rlhf.stage.run_stage); not TRL's process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke size: a few minutes, figures are noise")
    parser.add_argument("--sft", default=SFT_DIR, help="the SFT checkpoint every algorithm starts from")
    parser.add_argument("--algorithms", nargs="+", choices=(*ONLINE, "dpo"), default=[*ONLINE, "dpo"])
    parser.add_argument("--trl", nargs="*", choices=("grpo", "rloo", "dpo"), default=["grpo", "rloo", "dpo"],
                        help="TRL trainers to run (none: --trl with no value)")
    for key, value in SIZES["full"].items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"default {value} ({SIZES['quick'][key]} with --quick)")
    parser.add_argument("--out", default=None, help="the result JSON (default: benchmarks/results/algorithms.json)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the result JSON only, no MLflow run")
    args = parser.parse_args(argv)
    sizes = {k: getattr(args, k) or v for k, v in SIZES["quick" if args.quick else "full"].items()}
    os.chdir(REPO)
    if not (Path(args.sft) / "config.json").exists():
        raise SystemExit(f"algorithms: no checkpoint at {args.sft}. Run `dvc repro sft` or pass --sft PATH.")

    python = trl_python() if args.trl else None
    config = load_params()
    precision = config.model.precision
    dtype = resolve_precision(precision)
    instruction = config.tasks.instruction
    budget = sizes["iterations"] * sizes["batch_size"]
    train = train_tasks(config.tasks, min(budget, TRAIN_TASKS))
    records = {task_prompt(t, instruction): t.to_dict() for t in train}
    prompts = list(records)
    gold_tasks = heldout_tasks(config.tasks)[:sizes["gold_tasks"]]
    heldout = [task_prompt(gold_tasks[0], instruction)]  # the stage's own before/after point: one response, unused here
    base = dataclasses.replace(
        config.policy, reward="verifier", iterations=sizes["iterations"], batch_size=sizes["batch_size"],
        minibatch_size=sizes["minibatch_size"], update_epochs=sizes["update_epochs"],
        max_new_tokens=sizes["max_new_tokens"], dpo_epochs=sizes["dpo_epochs"], checkpoint_every=sizes["iterations"],
        eval_every=10**6, eval_responses=1, gold_tasks=0)
    settings = {a: dataclasses.replace(base, algorithm=a, group_size=sizes["group_size"] if a in ("grpo", "rloo") else 1)
                for a in (*ONLINE, "dpo")}

    work = Path(tempfile.mkdtemp(prefix="algorithms-"))
    ours, trl = {}, {}
    pairs, ties, pair_samples = [], 0, 0
    if "dpo" in args.algorithms or "dpo" in (args.trl or []):
        pairs, ties, pair_samples = verifier_pairs(args.sft, train[:budget // 2], instruction, dtype, settings["dpo"],
                                                   config.policy.seed)
        print(f"algorithms: {len(pairs)} verifier-judged pairs from {pair_samples} SFT samples ({ties} ties left out)")
    print("algorithms: warming up (one untimed ppo iteration)")
    run_ours(dataclasses.replace(settings["ppo"], iterations=1, checkpoint_every=1), precision, args.sft, prompts,
             records, heldout, work / "warm-up")
    for algorithm in [a for a in ONLINE if a in args.algorithms]:
        print(f"algorithms: rlhf.policy {algorithm}: {sizes['iterations']} iterations of {sizes['batch_size']}")
        ours[algorithm] = run_ours(settings[algorithm], precision, args.sft, prompts, records, heldout, work)
    if "dpo" in args.algorithms and pairs:
        ours["dpo"] = {**run_ours_dpo(settings["dpo"], precision, args.sft, pairs, ties, heldout, work),
                       "samples": pair_samples}
    for trainer in args.trl or []:
        if trainer == "dpo" and not pairs:
            continue
        print(f"algorithms: TRL {TRL_PIN} {trainer}")
        trl[trainer] = run_trl(python, trainer, settings[trainer], dtype, args.sft, work,
                               prompts=prompts if trainer != "dpo" else (), records=records,
                               pairs=pairs if trainer == "dpo" else ())
        if trainer == "dpo":
            trl[trainer].update(samples=pair_samples, seconds_per_epoch=trl[trainer]["train_seconds"] / sizes["dpo_epochs"],
                                pairs_per_s=len(pairs) * sizes["dpo_epochs"] / trl[trainer]["train_seconds"])
        else:
            samples = budget
            length = (sum(trl[trainer]["completion_lengths"]) / len(trl[trainer]["completion_lengths"])
                      if trl[trainer]["completion_lengths"] else float("nan"))
            trl[trainer].update(samples=samples, samples_per_s=samples / trl[trainer]["train_seconds"],
                                response_tokens_per_s=samples * length / trl[trainer]["train_seconds"],
                                response_length=length)

    print(f"algorithms: gold accuracy of {1 + len(ours) + len(trl)} policies on {len(gold_tasks)} held-out tasks")
    before = gold(args.sft, gold_tasks, instruction, dtype, sizes["max_new_tokens"])
    for side in (ours, trl):
        for name, run in side.items():
            after = gold(run["policy_dir"], gold_tasks, instruction, dtype, sizes["max_new_tokens"])
            run.update(gold_figures(after, before, run["samples"]))

    ratios = {}
    for name in ("grpo", "rloo"):
        if name in ours and name in trl:
            ratios[f"{name}_ours_over_trl_samples_per_s"] = ours[name]["samples_per_s"] / trl[name]["samples_per_s"]
    if "dpo" in ours and "dpo" in trl:
        ratios["dpo_trl_over_ours_seconds_per_epoch"] = trl["dpo"]["seconds_per_epoch"] / ours["dpo"]["seconds_per_epoch"]
    for name in ("grpo", "rloo", "reinforce_pp"):
        if name in ours and "ppo" in ours:
            ratios[f"{name}_over_ppo_lora_rss_rise"] = ours[name]["rss_rise_mib"] / ours["ppo"]["rss_rise_mib"]

    def line(name, run):
        speed = (f"{run['samples_per_s']:.2f} samples/s, {run['response_tokens_per_s']:.0f} tokens/s"
                 if "samples_per_s" in run else f"{run['seconds_per_epoch']:.1f} s/epoch, {run['pairs_per_s']:.2f} pairs/s")
        lo, hi = run["gold_gain_per_1k_samples_interval"]
        rise = f" (+{run['rss_rise_mib']:.0f} during the run)" if "rss_rise_mib" in run else ""
        split = (f"; sampling {run['generation_seconds']:.1f} of {run['train_seconds']:.1f} s"
                 if "generation_seconds" in run else "")
        cuda = f", peak CUDA {run['peak_cuda_allocated_mib']:.0f} MiB" if "peak_cuda_allocated_mib" in run else ""
        return (f"  {name:18} gold {before.accuracy:.3f} -> {run['gold_accuracy']:.3f}, per 1k samples "
                f"{run['gold_gain_per_1k_samples']:+.2f} [{lo:+.2f}, {hi:+.2f}]; {speed}{split}; peak RSS "
                f"{run['peak_rss_mib']:.0f} MiB{rise}{cuda}")

    for name, run in ours.items():
        print(line(f"ours {name}", run))
    for name, run in trl.items():
        print(line(f"TRL {name}", run))
    ratio_line = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    print(ratio_line)

    strip = lambda run: {k: v for k, v in run.items() if k != "policy_dir"}  # noqa: E731
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MLFLOW_TRACKING_URI") if k in os.environ)
    report = {
        "command": " ".join(filter(None, [env, "nice -n 10 .venv/bin/python -m benchmarks.algorithms",
                                          *(argv if argv is not None else sys.argv[1:])])),
        "size": "quick (smoke: the gold figures are noise at this budget)" if args.quick else "full",
        "git_commit": tracking.git_commit(),
        "machine": machine(),
        "inputs": {"sft": args.sft, "sft_md5": tracking.dvc_md5(args.sft), "train_tasks": len(prompts),
                   "gold_tasks": len(gold_tasks), "tasks": dataclasses.asdict(config.tasks),
                   "dpo_pairs": len(pairs), "dpo_ties_left_out": ties, "dpo_pair_samples": pair_samples},
        "precision": {"model.precision": precision, "dtype": str(dtype).removeprefix("torch.")},
        "settings": {a: dataclasses.asdict(s) for a, s in settings.items()},
        "sft_gold": {"accuracy": before.accuracy, "interval": [before.lower, before.upper], "n": before.n},
        "ours": {k: strip(v) for k, v in ours.items()},
        "trl": {k: strip(v) for k, v in trl.items()},
        "ratios": ratios,
        "ratio_line": ratio_line,
        "differences": [
            "β: rlhf.policy adapts it from kl_coef towards kl_target (every online algorithm); TRL keeps beta fixed",
            "RLOO: rlhf.policy clips the per-token ratio (PPO's surrogate, averaged over tokens); TRL 1.12's RLOOTrainer "
            "clips the sequence-level ratio and averages over sequences",
            "GRPO: both aggregate per response then over responses (TRL loss_type='grpo'), k3 KL in the loss",
            "ppo and reinforce_pp have no TRL counterpart here (TRL's PPO is benchmarks/ppo_vs_trl.py)",
            "rlhf.policy adds an entropy bonus (entropy_coef) and a no-EOS penalty; TRL's GRPO/RLOO do neither",
            "pad token: TRL is given <|endoftext|> (SmolLM2's pad is its EOS, which TRL would mask out of attention)",
            "weight decay 0.01 on both; TRL's Trainer exempts biases and norm weights, rlhf.policy does not",
        ],
    }
    figures = {side: {name: {k: v for k, v in run.items() if isinstance(v, (int, float))} for name, run in runs.items()}
               for side, runs in (("ours", ours), ("trl", trl))}
    if args.no_mlflow:
        path = Path(args.out) if args.out else RESULTS / "algorithms.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json.partial").write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".json.partial").replace(path)
        print(f"wrote {path} (no MLflow run: --no-mlflow)")
    else:
        save("algorithms", report, {**figures, "ratios": ratios, "sft_gold_accuracy": before.accuracy}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
