"""Stage `prepare`: turn `model.policy` into a plain safetensors checkpoint, once.

The embedded SmolLM2 ships as GGUF; reading it dequantises every tensor (~15 s). Every later
stage loads models/base instead (a fraction of a second), with the same logits.
"""
from __future__ import annotations

import time

from rlhf import tracking
from rlhf.checkpoints import count_parameters, load_source_model, resolve_precision, save_checkpoint
from rlhf.params import load_params
from rlhf.paths import BASE_DIR as OUT_DIR
from rlhf.stage import run_stage

METRICS = "metrics/prepare.json"


def main() -> int:
    params = load_params()
    dtype = resolve_precision(params.model.precision)
    with tracking.stage_run("prepare", {"model": params.section("model")}) as run:
        start = time.perf_counter()
        model, tokenizer = load_source_model(params.model)
        _, total = count_parameters(model)
        save_checkpoint(model, tokenizer, OUT_DIR, dtype)
        tracking.log_outputs("prepare", {"base": OUT_DIR})
        tracking.write_metrics(METRICS, {
            "model/parameters": total,
            "model/dtype": str(dtype).removeprefix("torch."),
            "prepare/seconds": round(time.perf_counter() - start, 2),
        })
        run_id = run.info.run_id
    print(f"prepare: {params.model.policy} -> {OUT_DIR} ({total / 1e6:.1f} M parameters, {dtype}); MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    run_stage(main)
