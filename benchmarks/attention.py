"""Attention on this CPU: rlhf.attention (softmax(QKᵀ)V multiplied out, grouped heads, the batch in chunks
of SCORES_PER_CHUNK scores) against the same without chunks and against torch's SDPA (its CPU flash-attention
kernel, as transformers calls it): forward + backward and forward only, in the shapes the stages run:
SmolLM2-135M's 9 query heads on 3 key/value heads of 64, bf16, a causal mask with half the rows left-padded (as
PPO's batches are), and single-query decoding steps over a cache.

Each shape times the functions in turns (best of --repeats), so they see the same machine; the ratio is SDPA's
time over ours (> 1: ours is faster). Where one row's scores exceed SCORES_PER_CHUNK, ours hands over to SDPA
and both columns time the same kernel.

From the repository root (~2 minutes on 2 quiet cores):

    nice -n 10 .venv/bin/python benchmarks/attention.py

writes benchmarks/results/attention.json and logs the figures to the project's MLflow store, experiment
"benchmarks".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from benchmarks.record import command, machine, save  # noqa: E402
from rlhf import attention as kernel  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
TRAINING_SHAPES = ((4, 100), (4, 153), (8, 153), (4, 256), (8, 256), (4, 384), (8, 384), (4, 512), (8, 512),
                   (16, 512), (2, 1024), (1, 2048))
DECODING_SHAPES = ((8, 150), (8, 350), (32, 250))


class Layer(torch.nn.Module):
    is_causal, num_key_value_groups = True, HEADS // KV_HEADS


def inputs(batch: int, q_len: int, kv_len: int, grad: bool):
    query = torch.randn(batch, HEADS, q_len, HEAD_DIM, dtype=torch.bfloat16, requires_grad=grad)
    key, value = (torch.randn(batch, KV_HEADS, kv_len, HEAD_DIM, dtype=torch.bfloat16, requires_grad=grad)
                  for _ in range(2))
    mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len).expand(batch, 1, q_len, kv_len).clone()
    mask[: batch // 2, :, :, : kv_len // 10] = False  # half the rows left-padded by a tenth
    mask[: batch // 2, :, torch.arange(min(q_len, kv_len // 10)), torch.arange(min(q_len, kv_len // 10))] = True
    return query, key, value, mask


def seconds(function, query, key, value, mask, backward: bool, repeats: int) -> float:
    grad = torch.randn(query.size(0), query.size(2), HEADS, HEAD_DIM, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        if backward:
            out, _ = function(Layer(), query, key, value, mask, scaling=HEAD_DIM ** -0.5)
            out.backward(grad)
            query.grad = key.grad = value.grad = None
        else:
            with torch.no_grad():
                function(Layer(), query, key, value, mask, scaling=HEAD_DIM ** -0.5)
        best = min(best, time.perf_counter() - tic)
    return best


def ours(*args, **kwargs):
    return kernel.attention(*args, **kwargs)


def unchunked(*args, **kwargs):
    saved = kernel.SCORES_PER_CHUNK
    kernel.SCORES_PER_CHUNK = 1 << 62  # the whole batch in one matmul, at every size
    try:
        return kernel.attention(*args, **kwargs)
    finally:
        kernel.SCORES_PER_CHUNK = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    figures = {}
    cases = [("train", b, t, t, True) for b, t in TRAINING_SHAPES] + \
            [("forward", b, t, t, False) for b, t in TRAINING_SHAPES] + \
            [("decode", b, 1, t, False) for b, t in DECODING_SHAPES]
    functions = {"ours": ours, "unchunked": unchunked, "sdpa": sdpa_attention_forward}
    for kind, batch, q_len, kv_len, backward in cases:
        tensors = inputs(batch, q_len, kv_len, backward)
        for function in functions.values():  # warm-up
            seconds(function, *tensors, backward, 1)
        times = dict.fromkeys(functions, float("inf"))
        for _ in range(args.repeats):  # in turns
            for name, function in functions.items():
                times[name] = min(times[name], seconds(function, *tensors, backward, 1))
        name = f"{kind}_b{batch}_q{q_len}_kv{kv_len}"
        rows = kernel.SCORES_PER_CHUNK // (HEADS * q_len * kv_len)
        figures[name] = {**{f"{k}_ms": round(t * 1e3, 3) for k, t in times.items()},
                         "sdpa_over_ours": round(times["sdpa"] / times["ours"], 3),
                         "unchunked_over_ours": round(times["unchunked"] / times["ours"], 3),
                         "ours_runs": f"chunks of {min(rows, batch)} rows" if rows else "sdpa"}
        print(f"{name:24s} " + "  ".join(f"{k} {t * 1e3:8.2f} ms" for k, t in times.items())
              + f"  sdpa/ours {times['sdpa'] / times['ours']:5.2f}x  ({figures[name]['ours_runs']})", flush=True)
    print("ratio line: SDPA time / ours, forward+backward: "
          + ", ".join(f"{b}x{t} {figures[f'train_b{b}_q{t}_kv{t}']['sdpa_over_ours']:.2f}x" for b, t in TRAINING_SHAPES))
    slower = [n for n, f in figures.items() if f["ours_runs"] != "sdpa" and f["sdpa_over_ours"] < 1]
    print("shapes where ours is slower than SDPA: " + (", ".join(slower) or "none"))
    report = {"command": command(), "machine": machine(), "scores_per_chunk": kernel.SCORES_PER_CHUNK,
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
              "figures": figures, "ours_slower": slower}
    save("attention", report, {k: {"sdpa_over_ours": v["sdpa_over_ours"], "unchunked_over_ours": v["unchunked_over_ours"]}
                               for k, v in figures.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
