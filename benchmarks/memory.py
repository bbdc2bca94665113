"""Peak resident memory of the SFT and policy (PPO) stages, each in its own process.

Each case runs the stage's own `train()` (rlhf.sft.train, rlhf.policy.train) with params.yaml's settings, cut
to a few steps, in a fresh subprocess writing into a temporary folder; its peak RSS is the kernel's
high-water mark (VmHWM in /proc/self/status at the end, checked against ru_maxrss from os.wait4).

  floor      python + torch + transformers + peft + the rlhf stage modules imported, nothing loaded
  sft_lora   rlhf.sft.train, params.yaml's sft section (LoRA), one epoch over --sft-demos demonstrations
  sft_full   the same with sft.lora_r = 0
  ppo_lora   rlhf.policy.train, params.yaml's policy section with algorithm ppo, reward rm and group_size 1
             (PPO against the reward model, what these cases measured before the stage had other algorithms;
             LoRA: the reference is the adapter disabled, no second copy), the stage's training prompts and gold
             tasks, --ppo-iterations iterations, eval_responses = policy.batch_size
  ppo_full   the same with policy.lora_r = 0 (fp32 policy, a frozen bf16 reference copy, a bf16 sampler copy)
  sft_step_lora_logits 2 optimiser steps of the sft stage's step before the fused LM-head loss
                       (benchmarks/training_efficiency.py sft_lora_logits: full logits, then response_nll)
  sft_step_lora        the same with the stage's step now (sft_lora there: rlhf.sft.ResponseNll); both on full rows
                       of sft.max_seq_len tokens, sft.batch_size rows x sft.grad_accum_steps: the worst batch

Target (issue 8): ppo_lora's peak under 1.5x sft_lora's.

From the repository root (full run ~6-8 minutes on 2 quiet cores; models/sft and models/reward must exist):

    nice -n 10 .venv/bin/python benchmarks/memory.py
    nice -n 10 .venv/bin/python benchmarks/memory.py --smoke    # 16 demonstrations, 1 PPO iteration, 16 new tokens

writes benchmarks/results/memory.json (memory_smoke.json) and logs the figures to the project's MLflow store, experiment "benchmarks".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CASES = ("floor", "sft_lora", "sft_full", "ppo_lora", "ppo_full", "sft_step_lora_logits", "sft_step_lora")
MARK = "MEMORY_RESULT "


def high_water_mark_mib() -> float:
    """VmHWM of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------------------------------------
# One case, in the child process
# ------------------------------------------------------------------------------------------------

def run_case(case: str, args, work: Path) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from rlhf import policy as policy_stage
    from rlhf import sft
    from rlhf.params import load_params
    from rlhf.paths import REWARD_DIR, SFT_DIR
    from rlhf.prompts import held_out_prompts
    from rlhf.verifiers import heldout_tasks

    params = load_params(REPO / "params.yaml")
    if case == "floor":
        return {}
    if case.startswith("sft_step"):
        from accelerate import Accelerator

        from benchmarks import training_efficiency as te
        from rlhf.checkpoints import load_tokenizer, resolve_precision

        p = params.sft
        accelerator = Accelerator(mixed_precision="bf16" if resolve_precision(params.model.precision) == torch.bfloat16
                                  else "no")
        rows = te.packed_rows(load_tokenizer(te.BASE), p, p.batch_size * p.grad_accum_steps, p.max_seq_len)
        micro = [{k: v[i * p.batch_size:(i + 1) * p.batch_size] for k, v in rows.items()} for i in range(p.grad_accum_steps)]
        variant = case.removeprefix("sft_step_")
        _, _, step = te.build(variant, argparse.Namespace(loss_chunk_tokens=sft.LOSS_CHUNK_TOKENS), params, accelerator)
        for _ in range(2):
            step(micro)
        return {"tokens_per_step": int(rows["input_ids"].numel())}
    if case.startswith("sft"):
        p = params.sft
        demos = [json.loads(line) for line in (REPO / "rlhf" / "data" / "demonstrations.jsonl").read_text().splitlines()
                 if line.strip()]
        data = work / "demonstrations.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in demos[:args.sft_demos or None]))
        p = dataclasses.replace(p, data=str(data), epochs=1, eval_every=10_000,
                                lora_r=p.lora_r if case == "sft_lora" else 0)
        result = sft.train(p, str(REPO / "models" / "base"), params.model.precision, str(work / "sft"))
        return {"steps": result["metrics"]["sft/steps"], "tokens_per_s": result["metrics"]["perf/train_tokens_per_s"]}
    p = params.policy
    p = dataclasses.replace(p, algorithm="ppo", reward="rm", group_size=1, iterations=args.ppo_iterations,
                            eval_responses=p.batch_size, checkpoint_every=10_000,
                            lora_r=p.lora_r if case == "ppo_lora" else 0,
                            max_new_tokens=args.max_new_tokens or p.max_new_tokens)
    os.chdir(REPO)  # the stage reads data/comparisons/*.parquet relative to the repository
    # the prompts and gold tasks as the stage's main() deals them
    pool, tasks, _ = policy_stage.training_prompts(p, params.tasks)
    train_prompts, heldout = held_out_prompts(pool, p.eval_responses, p.seed)
    gold = heldout_tasks(params.tasks)[:p.gold_tasks]
    result = policy_stage.train(p, params.model.precision, SFT_DIR, REWARD_DIR, train_prompts, heldout,
                                work / "policy", work / "checkpoints", tasks=tasks, gold=gold,
                                instruction=params.tasks.instruction)
    return {"iterations": p.iterations, "max_new_tokens": p.max_new_tokens,
            "tokens_per_s": result["metrics"]["perf/tokens_per_s"]}


def child(case: str, args) -> None:
    with tempfile.TemporaryDirectory(prefix=f"memory-{case}-") as work:
        tic = time.perf_counter()
        figures = run_case(case, args, Path(work))
        figures["seconds"] = round(time.perf_counter() - tic, 1)
    figures["vm_hwm_mib"] = round(high_water_mark_mib(), 1)
    print(MARK + json.dumps(figures), flush=True)


# ------------------------------------------------------------------------------------------------
# The parent: one subprocess per case
# ------------------------------------------------------------------------------------------------

def measure(case: str, args, argv_common: list[str]) -> dict:
    process = subprocess.Popen([sys.executable, __file__, "--child", case, *argv_common], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    found = [json.loads(line[len(MARK):]) for line in lines if line.startswith(MARK)]
    if process.returncode != 0 or not found:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"memory: case {case} failed (exit {process.returncode}); its last output is above.")
    figures = {**found[0], "ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1)}
    print(f"{case:9s} peak RSS {figures['vm_hwm_mib']:7.0f} MiB  ({figures.get('seconds', 0):.0f} s)", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--sft-demos", type=int, default=64, help="demonstrations (0 = all 206) for the SFT cases")
    parser.add_argument("--ppo-iterations", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = policy.max_new_tokens")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sft_demos, args.ppo_iterations, args.max_new_tokens = 16, 1, args.max_new_tokens or 16
    if args.child:
        child(args.child, args)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    common = ["--sft-demos", str(args.sft_demos), "--ppo-iterations", str(args.ppo_iterations),
              "--max-new-tokens", str(args.max_new_tokens)]
    figures = {case: measure(case, args, common) for case in cases}

    ratios = {}
    for a, b in (("sft_step_lora_logits", "sft_step_lora"), ("ppo_lora", "sft_lora"), ("ppo_full", "sft_full"), ("ppo_full", "ppo_lora"), ("sft_full", "sft_lora")):
        if a in figures and b in figures:
            ratios[f"{a}_over_{b}"] = round(figures[a]["vm_hwm_mib"] / figures[b]["vm_hwm_mib"], 3)
            if "floor" in figures:  # what the stage itself adds over the interpreter and libraries
                floor = figures["floor"]["vm_hwm_mib"]
                ratios[f"{a}_over_{b}_above_floor"] = round(
                    (figures[a]["vm_hwm_mib"] - floor) / (figures[b]["vm_hwm_mib"] - floor), 3)
    prefix = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    sys.path.insert(0, str(REPO))
    from benchmarks.record import machine, save

    report = {"command": prefix + "nice -n 10 .venv/bin/python benchmarks/memory.py " + " ".join(argv),
              "config": {"sft_demos": args.sft_demos, "ppo_iterations": args.ppo_iterations,
                         "max_new_tokens": args.max_new_tokens or "policy.max_new_tokens", "params": "params.yaml",
                         "ppo_cases": "policy section with algorithm ppo, reward rm, group_size 1"},
              "machine": machine(), "peak_rss_mib": figures, "ratios": ratios,
              "target": {"ppo_lora_over_sft_lora_below": 1.5,
                         "met": ratios.get("ppo_lora_over_sft_lora", float("inf")) < 1.5}}
    out = RESULTS / ("memory_smoke.json" if args.smoke else "memory.json")
    metrics = {f"{c}/peak_rss_mib": float(f["vm_hwm_mib"]) for c, f in figures.items()}
    metrics.update({f"ratio/{k}": float(v) for k, v in ratios.items()})
    save(out.stem, report, metrics, out, params=report["config"])
    print("peak RSS: " + "  ".join(f"{c} {f['vm_hwm_mib']:.0f} MiB" for c, f in figures.items()) + "; "
          + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
