"""Durability: outputs are never half-written or mixed, checkpoints survive a bad save, killed runs end KILLED."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch

from rlhf import outputs, resume, tracking

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_together_replaces_every_file_or_none(in_tmp, monkeypatch):
    a, b = in_tmp / "train.txt", in_tmp / "test.txt"
    a.write_text("old a"), b.write_text("old b")
    with pytest.raises(RuntimeError):  # the writer dies before the journal: the old set stays whole
        with outputs.together(a, b) as (ta, tb):
            ta.write_text("new a")
            raise RuntimeError("killed while writing")
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in in_tmp.iterdir()) == ["test.txt", "train.txt"]  # no temporary left

    real_replace, calls = os.replace, []

    def dies_after_the_first_rename(src, dst):
        if str(dst).endswith("test.txt"):
            raise KeyboardInterrupt("killed between the renames")
        calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", dies_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        with outputs.together(a, b) as (ta, tb):
            ta.write_text("new a"), tb.write_text("new b")
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert (a.read_text(), b.read_text()) == ("new a", "old b")  # mixed on disk until the next start ...
    # ... where the next stage's start rolls the journal forward
    assert outputs.finish_interrupted() == [f"{a.resolve()}, {b.resolve()}"]
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert not list(outputs.JOURNAL_DIR.glob("*.json"))


def test_replace_folder_rolls_forward_after_a_kill_between_its_renames(in_tmp, monkeypatch):
    out, new = in_tmp / "models" / "sft", in_tmp / "models" / ".sft.new"
    out.mkdir(parents=True), new.mkdir()
    (out / "weights").write_text("old"), (new / "weights").write_text("new")
    real_replace = os.replace

    def dies_before_the_second_rename(src, dst):
        if Path(src) == new:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", dies_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        outputs.replace_folder(new, out)
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert not out.exists()  # the old checkpoint moved aside, the new one not yet in place
    outputs.finish_interrupted()
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sft"]


def test_a_checkpoint_that_does_not_load_back_keeps_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    resume.save_state(folder, {"iteration": 1, "fingerprint": "f", "w": torch.ones(2)})
    real_load = torch.load

    def broken(path, *args, **kwargs):
        if Path(path).name == "iter-000002.pt":
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "load", broken)
    with pytest.raises(RuntimeError):
        resume.save_state(folder, {"iteration": 2, "fingerprint": "f", "w": torch.zeros(2)})
    assert sorted(p.name for p in folder.iterdir()) == ["iter-000001.pt", "iter-000002.pt"]
    state = resume.load_latest_state(folder, "f")  # the damaged newest is skipped for the one before it
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(2))


def test_runs_left_running_by_a_dead_process_of_this_machine_end_killed(in_tmp, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = tracking.use_project_store()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runs = {}
    for name, tags in (("dead", {"rlhf.host": tracking.owner_tags()["rlhf.host"], "rlhf.pid": str(dead.pid)}),
                       ("alive", tracking.owner_tags()),
                       ("elsewhere", {"rlhf.host": "another-machine", "rlhf.pid": str(dead.pid)})):
        runs[name] = mlflow.MlflowClient().create_run(experiment, tags=tags).info.run_id
    assert tracking.end_stale_runs(experiment) == [runs["dead"]]
    status = {name: mlflow.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}


def test_sigterm_ends_the_stage_run_killed_with_exit_143(in_tmp):
    script = in_tmp / "slow_stage.py"
    script.write_text(textwrap.dedent("""
        import time
        from rlhf import tracking
        from rlhf.stage import run_stage

        def main():
            with tracking.stage_run("slow", {"x": 1}) as run:
                open("run_id", "w").write(run.info.run_id)
                time.sleep(60)
            return 0

        run_stage(main)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{in_tmp / 'mlflow.db'}"}
    process = subprocess.Popen([sys.executable, str(script)], cwd=in_tmp, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (in_tmp / "run_id").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert mlflow.get_run((in_tmp / "run_id").read_text()).info.status == "KILLED"
