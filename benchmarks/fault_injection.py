"""Fault injection: kill -9 each stage of the tiny pipeline at random points, rerun, and check what is left.

    python benchmarks/fault_injection.py --kills-per-stage 2            # ~15 minutes on 2 cores
    python benchmarks/fault_injection.py --stages validate sft --kills-per-stage 1

For every stage: one clean run measures how long it takes; then, `--kills-per-stage` times, the stage starts again
(`dvc repro --single-item <stage> --force`, its own process group) and the whole group gets SIGKILL at a uniformly
random moment of its run; then `dvc repro` runs the pipeline to the end. After each rerun these must hold:
  - `dvc repro` exits 0 and `dvc status` has nothing to rerun but the always-changed refeed;
  - every Parquet output reads, every checkpoint folder has its config and weights (the model loads);
  - the splits are consistent: no prompt in two splits, and each split is what validate's hash says (no new train
    split beside an old test split);
  - MLflow holds no run left RUNNING (the next stage start ends a killed process's runs as KILLED).
Writes benchmarks/results/fault_injection.json. The tiny project is the test suite's (tests/conftest.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def dvc(project: Path, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=stage_env(project), text=True,
                          capture_output=True, timeout=timeout)


def stage_env(project: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}


def tiny_project() -> Path:
    import tests.conftest as conftest

    work = Path(tempfile.mkdtemp(prefix="fault-injection-"))
    tokenizer = conftest.build_tiny_tokenizer()
    model = conftest.build_tiny_model(len(tokenizer))
    model.save_pretrained(work / "tiny-model")
    tokenizer.save_pretrained(work / "tiny-model")
    return conftest.make_tiny_project(work / "project", work / "tiny-model")


def kill_during(project: Path, stage: str, after: float) -> bool:
    """Start the stage afresh and SIGKILL its whole process group `after` seconds in; False if it ended first."""
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", "--force", stage], cwd=project,
                               env=stage_env(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        process.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def check(project: Path) -> list[str]:
    """What is wrong with the project's outputs after a rerun (an empty list when nothing is)."""
    import mlflow
    import pyarrow.parquet as pq

    from rlhf.params import load_params
    from rlhf.validate import split_of

    problems = []
    status = dvc(project, "status", "--json")
    stale = set(json.loads(status.stdout or "{}")) - {"refeed"}
    if status.returncode or stale:
        problems.append(f"dvc status: {sorted(stale) or status.stderr.strip()[:200]}")
    for path in sorted((project / "data").rglob("*.parquet")):
        try:
            pq.read_table(path)
        except Exception as error:  # noqa: BLE001 - any failure to read is the finding
            problems.append(f"{path.relative_to(project)} does not read: {error}")
    for folder in ("models/base", "models/sft", "models/reward", "models/policy"):
        files = {p.name for p in (project / folder).glob("*")}
        if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
            problems.append(f"{folder} is not a whole checkpoint: {sorted(files)}")
    leftovers = [p.name for p in (project / "models").glob(".*") if p.name != ".gitignore"]  # DVC's own
    leftovers += [p.name for p in (project / "data").rglob(".*.tmp")]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    v = load_params(project / "params.yaml").validate
    seen: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        for prompt in set(pq.read_table(project / "data" / "comparisons" / f"{split}.parquet")["prompt"].to_pylist()):
            if prompt in seen:
                problems.append(f"prompt in two splits ({seen[prompt]}, {split}): {prompt[:40]!r}")
            seen[prompt] = split
            if split_of(prompt, v.seed, v.val_fraction, v.test_fraction) != split:
                problems.append(f"prompt in the wrong split {split}: {prompt[:40]!r}")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    running = [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
               if r.info.status == "RUNNING"]
    if running:
        problems.append(f"{len(running)} MLflow runs left RUNNING")
    return problems


def main() -> int:
    from flows.cycle import PIPELINE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="*", default=list(PIPELINE))
    parser.add_argument("--kills-per-stage", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fault_injection.json"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    project = tiny_project()
    first = dvc(project, "repro")
    if first.returncode:
        raise SystemExit(f"the clean run failed:\n{first.stdout[-2000:]}\n{first.stderr[-2000:]}")
    results, started = [], time.perf_counter()
    for stage in args.stages:
        tic = time.perf_counter()
        clean = dvc(project, "repro", "--single-item", "--force", stage)
        duration = time.perf_counter() - tic
        if clean.returncode:
            raise SystemExit(f"stage {stage} failed on its own:\n{clean.stderr[-2000:]}")
        dvc(project, "repro")
        for kill in range(args.kills_per_stage):
            after = rng.uniform(0.05, 1.0) * duration
            killed = kill_during(project, stage, after)
            tic = time.perf_counter()
            rerun = dvc(project, "repro")
            problems = ([] if rerun.returncode == 0 else [f"dvc repro exited {rerun.returncode}: {rerun.stderr[-300:]}"])
            problems += check(project)
            results.append({"stage": stage, "kill": kill, "killed_after_s": round(after, 2), "stage_s": round(duration, 2),
                            "killed": killed, "rerun_s": round(time.perf_counter() - tic, 1), "problems": problems})
            print(f"{stage}: kill {kill + 1} at {after:.1f} of {duration:.1f} s ({'killed' if killed else 'had ended'}); "
                  f"rerun {'ok' if not problems else 'PROBLEMS: ' + '; '.join(problems)}", flush=True)
    summary = {"kills": sum(r["killed"] for r in results), "runs": len(results),
               "reruns_with_problems": sum(bool(r["problems"]) for r in results),
               "kills_per_stage": {s: sum(r["killed"] for r in results if r["stage"] == s) for s in args.stages},
               "seconds": round(time.perf_counter() - started, 1)}
    print(f"{summary['kills']} kills in {summary['runs']} tries over {len(args.stages)} stages; "
          f"{summary['reruns_with_problems']} reruns with problems")
    from benchmarks.record import command, machine, save

    save("fault_injection", {"command": command(), "machine": machine(), "summary": summary, "results": results},
         {k: v for k, v in summary.items() if not isinstance(v, dict)}, out=args.out)
    return 1 if summary["reruns_with_problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
