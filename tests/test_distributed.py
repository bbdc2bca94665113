"""Data parallelism: two processes (gloo on CPU) take the same optimiser steps as one.

tests/distributed_driver.py runs a few steps of the SFT and reward-model stages' own `train()`, and of the policy
stage's for each online algorithm (ppo, grpo, rloo, reinforce_pp), twice, with
the same params, so the same global batch: once as one plain process, once under
`accelerate launch --multi_gpu --num_processes 2` with ACCELERATE_USE_CPU=1 (gloo; `accelerate launch --cpu`
starts a single process, whatever --num_processes says). In SFT and the reward model each process takes its
share of every micro-batch; the policy stage samples and updates on the whole batch in every process.

Tolerance. Everything is fp32 without dropout, so the runs differ only in the order of float sums (the batch
split over processes, narrower padding, gloo's all-reduce): about 1e-7 relative per operation, which a few steps
leave near 1e-7 (measured: at most 2e-7). Logged values (losses, accuracy, RM grad norm, every policy term) must
agree to LOSS_RTOL = 1e-5. Final weights must agree to WEIGHT_ATOL = 5e-5 absolute (measured: at most 3.4e-6, SFT):
AdamW moves every weight by about the learning rate (3e-3) per step whatever its gradient's size, so a weight whose
gradient is at rounding level may differ by a sizeable fraction of that. Errors of the kind this test is for,
a per-process mean in place of the step's global one, a gradient that is not all-reduced, a learning-rate
schedule stepped once per process, shift the next steps' losses by 1e-3 relative or more. A uniform scale error of
the gradient would hardly show (AdamW is scale-invariant) except in the reward model's logged grad_norm.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "distributed_driver.py"
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7  # the absolute floor is for terms that start at 0 (PPO's approx KL)
WEIGHT_ATOL = 5e-5
TIMEOUT = 300  # seconds per run; a process that dies mid all-reduce leaves the other waiting


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(work: Path, model_dir: Path, reward_dir: Path, processes: int) -> subprocess.CompletedProcess:
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(work / "hf"), "TOKENIZERS_PARALLELISM": "false"}  # HF_HOME: no accelerate default config
    args = [str(DRIVER), str(work), str(model_dir), str(reward_dir)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict:
    """{processes: (work folder, completed process)} for one and two processes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("distributed")
    reward_dir = root / "reward"  # a fixed reward model, so both policy runs score with the same one
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.reward_normalization = {"mean": 0.0, "std": 1.0, "responses": 2}
    rm.save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_dir)
    return {"base": tiny_model_dir,
            **{n: (root / f"p{n}", _run(root / f"p{n}", tiny_model_dir, reward_dir, n)) for n in (1, 2)}}


def _result(runs: dict, processes: int, stage: str) -> dict:
    work, proc = runs[processes]
    path = work / f"{stage}.json"
    assert path.exists(), f"{processes} process(es): no {stage} result; exit {proc.returncode}\n{proc.stderr[-4000:]}"
    result = json.loads(path.read_text())
    assert result["processes"] == processes
    return result


def _compare(runs: dict, stage: str) -> None:
    one, two = _result(runs, 1, stage)["rows"], _result(runs, 2, stage)["rows"]
    assert one, f"{stage}: no logged rows were caught, so the losses were not compared"
    assert [r["step"] for r in one] == [r["step"] for r in two]
    worst = 0.0
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in a:
            if key == "step" or key.startswith("perf/"):
                continue
            assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL, abs=LOSS_ATOL), f"{stage} step {a['step']}: {key}"
            worst = max(worst, abs(b[key] - a[key]) / max(abs(a[key]), 1e-12))
    weights = _weights(runs[1][0] / stage), _weights(runs[2][0] / stage)
    assert weights[0].keys() == weights[1].keys()
    diff = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    start = _weights(runs["base"])
    moved = max(float((weights[0][k] - start[k]).abs().max()) for k in weights[0].keys() & start.keys())
    print(f"{stage}: {len(one)} logged steps; logged values differ by at most {worst:.1e} (relative); "
          f"final weights by at most {diff:.1e} (absolute), after moving up to {moved:.1e}")
    assert moved > 10 * WEIGHT_ATOL, f"{stage}: the weights hardly moved ({moved:.1e}), so comparing them says little"
    assert diff <= WEIGHT_ATOL, f"{stage}: the final weights of one and two processes differ by up to {diff:.1e}"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_sft_two_processes_match_one(runs):
    _compare(runs, "sft")


def test_reward_model_two_processes_match_one(runs):
    _compare(runs, "reward_model")


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo", "reinforce_pp"])
def test_policy_two_processes_match_one(runs, algorithm):
    _compare(runs, algorithm)
