"""Every stage's metrics on the tiny test project, from one code tree, for before/after comparisons of a refactor.

    python benchmarks/stage_parity.py --code /tmp/before --out benchmarks/results/stage_parity_before.json
    python benchmarks/stage_parity.py --code . --out benchmarks/results/stage_parity_after.json
    python benchmarks/stage_parity.py --compare benchmarks/results/stage_parity_before.json \
        benchmarks/results/stage_parity_after.json --rename compare/ppo/=compare/challenger/

The project is the test suite's tiny one (tests/conftest.py: a random 2-layer Llama, a 400-token BPE, tiny params),
run with `dvc repro` from the given tree's rlhf/, flows/, tasks/ and dvc.yaml. Timings (seconds, per-second rates)
are left out: they differ run to run whatever the code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOLATILE = ("seconds", "per_s", "perf/", "resumed_from")


def run_tiny_cycle(code: Path) -> dict:
    import tests.conftest as conftest

    conftest.REPO = code.resolve()
    work = Path(tempfile.mkdtemp(prefix="stage-parity-"))
    tokenizer = conftest.build_tiny_tokenizer()
    model = conftest.build_tiny_model(len(tokenizer))
    model.save_pretrained(work / "tiny-model")
    tokenizer.save_pretrained(work / "tiny-model")
    project = conftest.make_tiny_project(work / "project", work / "tiny-model")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dvc repro failed in {project}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    figures = {}
    for path in sorted((project / "metrics").glob("*.json")):
        for key, value in json.loads(path.read_text()).items():
            if not any(v in key for v in VOLATILE):
                figures[f"{path.stem}:{key}"] = value
    return figures


def compare(before: dict, after: dict, tolerance: float = 1e-6) -> int:
    keys = sorted(set(before) | set(after))
    differ = 0
    print(f"{'metric':<62} {'before':>14} {'after':>14}  same")
    for key in keys:
        a, b = before.get(key), after.get(key)
        same = a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                          and math.isclose(a, b, rel_tol=tolerance, abs_tol=tolerance))
        differ += not same
        print(f"{key:<62} {a!s:>14} {b!s:>14}  {'yes' if same else 'NO'}")
    print(f"{len(keys) - differ} of {len(keys)} figures identical within {tolerance}; {differ} differ")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, help="the code tree to run (its rlhf/, flows/, tasks/, dvc.yaml)")
    parser.add_argument("--out", type=Path, help="where to write the figures (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="a metric-name part BEFORE calls OLD and AFTER calls NEW (repeatable)")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        for rule in args.rename:
            old, new = rule.split("=", 1)
            before = {key.replace(old, new): value for key, value in before.items()}
        return compare(before, after)
    figures = run_tiny_cycle(args.code)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"{len(figures)} figures -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
