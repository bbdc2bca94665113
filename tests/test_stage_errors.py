"""A stage started by hand with a bad file or value answers with one paragraph and exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run_stage(module: str, folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    return subprocess.run([sys.executable, "-m", module], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def broken_truthfulqa(folder: Path) -> str:
    (folder / "mc_task.json").write_text(json.dumps([{"question": "q", "mc1_targets": ["not", "a", "mapping"]}]))
    (folder / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"truthfulqa": "mc_task.json"}}))
    return "mc_task.json, question 0: not in the mc_task.json format"


def broken_collected(folder: Path) -> str:
    (folder / "data" / "comparisons").mkdir(parents=True)
    (folder / "data" / "comparisons" / "collected.parquet").write_bytes(b"PAR1 this is no parquet file")
    (folder / "params.yaml").write_text(yaml.safe_dump({}))
    return "collected.parquet is not a readable Parquet file"


def broken_evaluation(folder: Path) -> str:
    (folder / "metrics").mkdir()
    (folder / "metrics" / "evaluate.json").write_text('{"eval/kl": 2.0,')  # cut off mid-write by hand
    (folder / "params.yaml").write_text(yaml.safe_dump({}))
    return "metrics/evaluate.json is not valid JSON"


@pytest.mark.parametrize("module, break_it", [("rlhf.evaluate", broken_truthfulqa), ("rlhf.validate", broken_collected),
                                              ("rlhf.promote", broken_evaluation)])
def test_a_value_error_is_one_paragraph_and_exit_code_2(tmp_path, module, break_it):
    expected = break_it(tmp_path)
    done = run_stage(module, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr
    assert "rerun" in errors[0] or "Use upstream's" in errors[0]  # it says how to fix it


def test_freed_large_blocks_stay_in_the_heap_for_the_next_allocation():
    """run_stage's allocator setting: a 64 MB block (over glibc's 32 MB mmap ceiling) freed is kept in the heap,
    so the next one of its size is served without page-faulting fresh memory; without it, glibc unmaps it."""
    script = """
import ctypes, sys
import torch
from rlhf.stage import reuse_freed_memory
if sys.argv[1] == "on":
    reuse_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = torch.empty(64 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
del block
print(mapped >= 64 << 20, libc.mallinfo2().fordblks >= 64 << 20)
"""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt and mallinfo2 are glibc's")
    runs = {setting: subprocess.run([sys.executable, "-c", script, setting], env={**os.environ, "PYTHONPATH": str(REPO)},
                                    capture_output=True, text=True, timeout=120) for setting in ("on", "off")}
    assert runs["on"].returncode == 0, runs["on"].stderr
    assert runs["on"].stdout.split() == ["False", "True"]  # from the heap, and kept there once freed
    assert runs["off"].stdout.split() == ["True", "False"]  # mapped on its own, and unmapped when freed
