"""Policy rollouts: the sampler's generated tokens/s against plain `model.generate`, and the honest speed-ups.

The policy is built as the policy stage builds it (rlhf.policy.build_policy: models/sft in the compute dtype with
an unmerged LoRA adapter from params.yaml's policy section). Its LoRA B matrices start at zero, which would make merging free
of rounding, so they get small seeded random values first (as after some PPO updates). Every variant samples
the same prompts (the comparisons' train-split prompts, cycled, left-padded, rlhf.rollouts.encode_queries) at
temperature 1 from the full distribution (top_k=0, top_p=1), max_new_tokens from params.yaml, KV cache on,
the same seed. Variants, timed in turns so they see the same machine:

  generate       plain model.generate on the PEFT-wrapped policy (no autocast): the reference
  sampler        rlhf.rollouts.sample_responses inside accelerator.autocast() (rlhf.policy.rollout now samples
                 without autocast, from the LoRA-merged policy: merged_noac is the stage's way)
  sampler_noac   sample_responses without autocast (the base is already bf16; the LoRA weights stay fp32)
  premerged      sample_responses on the policy with LoRA already merged (merging not timed): the ceiling
  merged         merge_adapter() before sample_responses and unmerge_adapter() after, both inside the timing
  merged_exact   as merged, but the base weights are saved before the merge and copied back after, so the
                 policy ends bit-identical (unmerge in bf16 leaves rounding drift: reported as `unmerge_drift`)
  merged_noac    merged_exact without autocast (every weight the generation touches is then bf16 already)
  merged_static  merged_exact + a static KV cache (cache_implementation="static")

Throughput is decoded positions per second (batch × steps the batch ran, prefill included in the time);
response tokens (up to the first EOS) per second are reported too, but they depend on where EOS was sampled.

`merged` (peft's unmerge) is left out by default: its drift and its merge + unmerge time are reported apart.

From the repository root (estimates for 2 quiet cores):

    nice -n 10 .venv/bin/python benchmarks/rollouts.py                  # ~4-5 minutes; --rounds 2: ~8
    nice -n 10 .venv/bin/python benchmarks/rollouts.py --smoke          # batch 1 and 8, 16 new tokens, ~1 minute
    nice -n 10 .venv/bin/python benchmarks/rollouts.py --profile-ppo    # ~10 minutes: a PPO iteration (rollout +
        update) of the policy stage's code (policy.algorithm ppo, policy.reward rm, one response per prompt) and
        of its earlier versions (PPO_VARIANTS), each under torch.profiler, then --ppo-rounds unprofiled iterations
        of each, in turns, every one from the same weights and optimizer state; the ratio line compares the
        medians. --ppo-full for policy.lora_r = 0, --shapes to list ops by input shape

writes benchmarks/results/rollouts.json (rollouts_smoke.json, rollouts_profile_ppo[_full].json) and logs the figures to the project's
MLflow store, experiment "benchmarks".
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.record import command, machine, save  # noqa: E402
from rlhf import attention as rlhf_attention  # noqa: E402
from rlhf import policy as rlhf_policy  # noqa: E402
from rlhf import ppo  # noqa: E402
from rlhf import rollouts as rlhf_rollouts  # noqa: E402
from rlhf.chat import reply_suffix  # noqa: E402
from rlhf.checkpoints import load_tokenizer, resolve_precision  # noqa: E402
from rlhf.params import load_params  # noqa: E402
from rlhf.paths import REWARD_DIR, SFT_DIR, TRAIN_COMPARISONS  # noqa: E402
from rlhf.policy import build_policy  # noqa: E402
from rlhf.prompts import distinct_prompts  # noqa: E402
from rlhf.reward_sources import RewardSources, weighted_reward  # noqa: E402
from rlhf.rewards import load_reward_model  # noqa: E402
from rlhf.decoding import TransformersDecoder  # noqa: E402
from rlhf.rollouts import build_sampler, cut_at_eos, encode_queries, eos_ids, sample_responses  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SFT = REPO / SFT_DIR
VARIANTS = ("generate", "sampler", "sampler_noac", "premerged", "merged", "merged_exact", "merged_noac", "merged_static")
DEFAULT_VARIANTS = ("generate", "sampler", "sampler_noac", "premerged", "merged_exact", "merged_noac", "merged_static")


# ------------------------------------------------------------------------------------------------
# The ways to sample
# ------------------------------------------------------------------------------------------------

def plain_generate(policy, query, query_mask, max_new_tokens: int, eos: list[int], pad_id: int, **extra):
    return policy.generate(input_ids=query, attention_mask=query_mask, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_id, **extra)


def lora_layers(policy):
    from peft.tuners.lora import LoraLayer

    return [m for m in policy.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def merged(policy, exact: bool):
    """LoRA folded into the base weights while inside; afterwards unmerged (peft), or restored bit-exactly."""
    saved = [(m.get_base_layer().weight, m.get_base_layer().weight.detach().clone()) for m in lora_layers(policy)] if exact else []
    policy.merge_adapter()
    try:
        yield
    finally:
        if exact:
            for layer in lora_layers(policy):
                layer.merged_adapters = []
            with torch.no_grad():
                for weight, copy in saved:
                    weight.copy_(copy)
        else:
            policy.unmerge_adapter()


def sample(variant: str, policy, accelerator, query, query_mask, max_new_tokens: int, eos: list[int], pad_id: int):
    """The sampled ids (B, steps) of one rollout batch, the `variant` way (prompt cut off)."""
    if variant == "generate":
        return plain_generate(policy, query, query_mask, max_new_tokens, eos, pad_id)[:, query.size(1):]
    if variant == "sampler_noac":
        return sample_responses(policy, query, query_mask, max_new_tokens, 1.0, eos, pad_id)[0]
    if variant == "sampler":
        with accelerator.autocast():
            return sample_responses(policy, query, query_mask, max_new_tokens, 1.0, eos, pad_id)[0]
    if variant == "premerged":  # measure() merged it outside the timing
        with accelerator.autocast():
            return sample_responses(policy, query, query_mask, max_new_tokens, 1.0, eos, pad_id)[0]
    if variant == "merged_noac":
        with merged(policy, exact=True):
            return sample_responses(policy, query, query_mask, max_new_tokens, 1.0, eos, pad_id)[0]
    with merged(policy, exact=variant != "merged"), accelerator.autocast():
        if variant == "merged_static":
            return plain_generate(policy, query, query_mask, max_new_tokens, eos, pad_id,
                                  cache_implementation="static")[:, query.size(1):]
        return sample_responses(policy, query, query_mask, max_new_tokens, 1.0, eos, pad_id)[0]


def unmerge_drift(policy, rounds: int) -> dict:
    """How far `rounds` peft merge_adapter()/unmerge_adapter() cycles move the bf16 base weights."""
    layers = lora_layers(policy)
    before = [m.get_base_layer().weight.detach().clone() for m in layers]
    for _ in range(rounds):
        policy.merge_adapter()
        policy.unmerge_adapter()
    diffs = [(m.get_base_layer().weight.detach().float() - b.float()) for m, b in zip(layers, before)]
    changed = sum(int((d != 0).sum()) for d in diffs)
    total = sum(d.numel() for d in diffs)
    with torch.no_grad():  # put the weights back so later variants sample from the same policy
        for m, b in zip(layers, before):
            m.get_base_layer().weight.copy_(b)
    return {"rounds": rounds, "weights_changed_share": round(changed / total, 4),
            "max_abs_change": float(max(d.abs().max() for d in diffs)),
            "mean_abs_change": float(sum(d.abs().sum() for d in diffs) / total)}


def merge_seconds(policy, repeats: int) -> dict:
    """Best wall time of one merge + unmerge cycle: peft's unmerge, and the exact save/restore."""
    figures = {}
    for name, exact in (("merge_unmerge_seconds", False), ("merge_restore_seconds", True)):
        best = float("inf")
        for _ in range(repeats):
            tic = time.perf_counter()
            with merged(policy, exact=exact):
                pass
            best = min(best, time.perf_counter() - tic)
        figures[name] = round(best, 4)
    return figures


def perturb_lora(policy, scale: float, seed: int) -> None:
    """LoRA B starts at zero; give it seeded values of a trained adapter's size so merging is not a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


# ------------------------------------------------------------------------------------------------
# The measurement
# ------------------------------------------------------------------------------------------------

def measure(args, policy, accelerator, tokenizer, prompts, max_prompt_len: int) -> dict:
    eos, pad = eos_ids(policy, tokenizer), tokenizer.pad_token_id  # the stop tokens the stage samples with
    figures = {}
    for batch in args.batches:
        query, query_mask = encode_queries(tokenizer, [prompts[i % len(prompts)] for i in range(batch)],
                                           max_prompt_len, accelerator.device)
        for variant in args.variants:  # warm-up: first calls allocate caches and pick kernels
            torch.manual_seed(0)
            with merged(policy, exact=True) if variant == "premerged" else contextlib.nullcontext():
                sample(variant, policy, accelerator, query[:, -8:], query_mask[:, -8:], 4, eos, pad)
        sums = {v: {"seconds": 0.0, "decoded": 0, "responses": 0} for v in args.variants}
        for r in range(args.rounds):
            for variant in args.variants:  # in turns, so a change in the machine's load hits every variant alike
                torch.manual_seed(args.seed + r)
                with merged(policy, exact=True) if variant == "premerged" else contextlib.nullcontext():
                    tic = time.perf_counter()
                    responses = sample(variant, policy, accelerator, query, query_mask, args.max_new_tokens, eos, pad)
                    sums[variant]["seconds"] += time.perf_counter() - tic
                sums[variant]["decoded"] += responses.numel()
                is_eos = torch.isin(responses, torch.tensor(eos, device=responses.device))
                first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, responses.size(1))
                sums[variant]["responses"] += int(first.sum())
        base = sums["generate"]["decoded"] / sums["generate"]["seconds"] if "generate" in sums else None
        figures[f"batch_{batch}"] = {
            v: {"seconds": round(s["seconds"], 3), "decoded_tokens": s["decoded"], "response_tokens": s["responses"],
                "decoded_tokens_per_s": round(s["decoded"] / s["seconds"], 1),
                "response_tokens_per_s": round(s["responses"] / s["seconds"], 1),
                **({"over_generate": round(s["decoded"] / s["seconds"] / base, 3)} if base else {})}
            for v, s in sums.items()}
        print(f"batch {batch:3d}: " + "  ".join(f"{v} {f['decoded_tokens_per_s']:.0f} tok/s"
                                                + (f" ({f['over_generate']:.2f}x)" if base else "")
                                                for v, f in figures[f"batch_{batch}"].items()), flush=True)
    return figures


def _full_vocab_policy_forward(model, query, query_mask, responses, response_mask, temperature: float):
    """rlhf.rollouts.policy_forward as it was before LinearLogprobEntropy: the model's own LM head on the response
    positions, the (B, N, V) logits in fp32, one log-softmax over them that log π(y) and H both read."""
    input_ids = torch.cat([query, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = rlhf_rollouts.mask_positions(attention_mask)
    n, width = responses.size(1), input_ids.size(1)
    keep = torch.arange(width - n - 1, width, device=input_ids.device)
    with rlhf_rollouts.adapter_inputs_uncast(model, input_ids.device.type):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    output_hidden_states=-1, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits.div_(temperature)
    logp_all = logits.log_softmax(dim=-1)
    return (rlhf_rollouts.token_logprobs(logp_all, responses), rlhf_rollouts.token_entropy(logp_all),
            out.hidden_states[-1][:, -n - 1:-1])


@torch.no_grad()
def _hf_generate_sample_responses(model, query, query_mask, max_new_tokens: int, temperature: float,
                                  eos: list[int], pad_id: int, top_k: int = 0, top_p: float = 1.0):
    """rlhf.rollouts.sample_responses as it was before its own decoding loop: transformers' generate (whose sampling
    calls torch.multinomial)."""
    out = model.generate(input_ids=query, attention_mask=query_mask, do_sample=True, temperature=temperature,
                         top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                         pad_token_id=pad_id, use_cache=True)
    return cut_at_eos(out[:, query.size(1):], eos, pad_id)


# What each variant puts in place of (module, name), inside this process only. A name is patched in the module
# whose global the stage's code reads at call time: rlhf.policy imports policy_forward and sample_responses from
# rlhf.rollouts, so rlhf.policy's rollout, reference_logprobs and policy_update look them up in rlhf.policy (a
# patch in rlhf.rollouts would not reach them); adapter_inputs_uncast is read by rlhf.rollouts.policy_forward, the
# policy's forward pass, as the old rlhf.ppo.policy_forward read it (the value model's rlhf.rewards.token_scores
# keeps its own, as before); SCORES_PER_CHUNK by rlhf.attention.attention.
PPO_VARIANTS = {
    "stage": {},
    # before LinearLogprobEntropy: the (B, N, V) fp32 logits and their log-softmax held, forward and backward
    "full_vocab_logits": {(rlhf_policy, "policy_forward"): _full_vocab_policy_forward},
    # before adapter_inputs_uncast: peft casts every adapter input to fp32, autocast casts it back
    "adapter_inputs_cast": {
        (rlhf_rollouts, "adapter_inputs_uncast"): lambda model, device_type: contextlib.nullcontext()},
    # before sample_responses had its own decoding loop and inverse-CDF sampling: transformers' generate
    "hf_generate": {(rlhf_policy, "sample_responses"): _hf_generate_sample_responses},
    # before rlhf.decoding's LlamaDecoder: each decoding step through the model's own forward
    "transformers_decoding": {(rlhf_rollouts, "decoder"): lambda model, cache, query_mask, max_new_tokens:
                              TransformersDecoder(model, cache, query_mask)},
    # before rlhf.attention multiplied short attention out: torch's SDPA (its CPU flash kernel) throughout
    "sdpa_attention": {(rlhf_attention, "SCORES_PER_CHUNK"): 0},
}


def ppo_params(params, args):
    """params.yaml's policy section as --profile-ppo runs it: PPO against the reward model, one response per
    prompt (what the ppo stage ran before the policy stage had other algorithms and reward sources)."""
    p = params.policy
    return dataclasses.replace(p, algorithm="ppo", reward="rm", group_size=1,
                               max_new_tokens=args.max_new_tokens or p.max_new_tokens,
                               lora_r=0 if args.ppo_full else p.lora_r)


def profile_ppo_iteration(args, params) -> dict:
    """PPO iterations (rollout + update), built as rlhf.policy.train builds them: each variant in PPO_VARIANTS
    gets a warm-up iteration and a timed one under torch.profiler."""
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile, record_function

    p = ppo_params(params, args)
    dtype = resolve_precision(params.model.precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(SFT)
    policy, reference = build_policy(str(SFT), dtype, p)
    reward_model, stats = load_reward_model(REPO / REWARD_DIR, dtype)
    reward_model.eval().requires_grad_(False)
    value_model = ppo.build_value_model(p, str(REPO / REWARD_DIR), dtype, policy.config.hidden_size)
    trainable = list(rlhf_policy._trainable(policy).values()) + list(rlhf_policy._trainable(value_model).values())
    optimizer = torch.optim.AdamW(trainable, lr=p.learning_rate, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    policy, value_model, optimizer, scheduler = accelerator.prepare(policy, value_model, optimizer, scheduler)
    if reference is not None:
        reference.to(accelerator.device)
    sampler = build_sampler(str(SFT), dtype, p.uses_lora)
    if sampler is not None:
        sampler.to(accelerator.device)
    suffix = reply_suffix(tokenizer)
    rewards = RewardSources(p.reward_weights, reward_model, stats, suffix)
    models = rlhf_policy.Models(accelerator, policy, reference, value_model, rewards, tokenizer, suffix,
                                eos_ids(accelerator.unwrap_model(policy), tokenizer), sampler)
    prompts = distinct_prompts(REPO / TRAIN_COMPARISONS)
    originals = {(module, name): getattr(module, name) for variant in PPO_VARIANTS.values() for module, name in variant}

    def trainable_state() -> dict:
        return {f"{prefix}.{name}": p for prefix, module in (("policy", policy), ("value", value_model))
                for name, p in rlhf_policy._trainable(module).items()}

    def iteration(i: int) -> dict:
        torch.manual_seed(p.seed + i)
        tic = time.perf_counter()
        with record_function("ppo/rollout"):
            batch = rlhf_policy.rollout(models, p, [prompts[(i * p.batch_size + k) % len(prompts)]
                                                    for k in range(p.batch_size)], {})
        rollout_s = time.perf_counter() - tic
        mask = batch["mask"].float()
        # the score and the advantages as rlhf.policy.train makes them, at β = kl_coef (its first iteration's)
        score = weighted_reward(batch["parts"], p.reward_weights) - p.no_eos_penalty * (~batch["ended"]).float()
        advantages, returns, _ = rlhf_policy.advantages_of(p, batch, score, p.kl_coef)
        tic = time.perf_counter()
        with record_function("ppo/update"):
            rlhf_policy.policy_update(models, p, optimizer, scheduler, trainable, batch, advantages, returns, p.kl_coef)
        update_s = time.perf_counter() - tic
        return {"generation_seconds": round(batch["generation_seconds"], 2), "rollout_seconds": round(rollout_s, 2),
                "update_seconds": round(update_s, 2), "iteration_seconds": round(rollout_s + update_s, 2),
                "response_tokens": int(mask.sum())}

    # every timed iteration starts from the same weights and optimizer state, so every variant samples the
    # same responses (up to its own rounding)
    start = {"model": {k: v.detach().clone() for k, v in trainable_state().items()},
             "optimizer": copy.deepcopy(optimizer.state_dict())}

    def use(variant: str) -> None:
        for (module, name), replacement in {**originals, **PPO_VARIANTS[variant]}.items():
            setattr(module, name, replacement)
        with torch.no_grad():
            for name, value in trainable_state().items():
                value.copy_(start["model"][name])
        optimizer.load_state_dict(copy.deepcopy(start["optimizer"]))

    results = {}
    for variant in args.ppo_variants:
        use(variant)
        iteration(1)  # warm-up
        use(variant)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            phases = iteration(1)
        averages = [e for e in prof.key_averages() if not e.key.startswith("ppo/")]
        averages.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in averages)
        top = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
                "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in averages[:args.top]]
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        if args.shapes:
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=30, max_shapes_column_width=70))
        print(f"{variant}: one PPO iteration, profiled (lora_r={p.lora_r}, batch {p.batch_size}, "
              f"{p.max_new_tokens} new tokens): {phases}", flush=True)
        results[variant] = {"profiled": phases, "self_cpu_ms_total": round(total / 1e3, 1), "top": top}
    # unprofiled, the variants in turns within each round, so that they see the same machine
    for round_ in range(args.ppo_rounds):
        for variant in args.ppo_variants:
            use(variant)
            results[variant].setdefault("rounds", []).append(iteration(1))
            print(f"round {round_ + 1}/{args.ppo_rounds} {variant}: {results[variant]['rounds'][-1]}", flush=True)
    for variant in args.ppo_variants:
        rounds = results[variant].get("rounds") or [results[variant]["profiled"]]
        results[variant]["phases"] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    for (module, name), original in originals.items():
        setattr(module, name, original)
    ratios = {f"{v}_over_stage": round(results[v]["phases"]["iteration_seconds"]
                                       / results["stage"]["phases"]["iteration_seconds"], 3)
              for v in results if v != "stage" and "stage" in results}
    print(f"PPO iteration time of each variant over the stage's (median of {args.ppo_rounds} unprofiled rounds; "
          "> 1: the stage is faster): " + "  ".join(f"{k} {x:.2f}x" for k, x in ratios.items()))
    return {"max_new_tokens": p.max_new_tokens, "lora_r": p.lora_r, "variants": results, "ratios": ratios}


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: policy.max_new_tokens")
    parser.add_argument("--rounds", type=int, default=1, help="timed rollouts per variant and batch size")
    parser.add_argument("--lora-b-scale", type=float, default=0.01, help="std of the seeded LoRA B values")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="batches 1 and 8, 16 new tokens, 1 round")
    parser.add_argument("--profile-ppo", action="store_true", help="profile one PPO iteration instead")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--shapes", action="store_true", help="--profile-ppo: also list ops by input shape")
    parser.add_argument("--ppo-variants", default=",".join(PPO_VARIANTS), help="--profile-ppo: which code to time")
    parser.add_argument("--ppo-full", action="store_true", help="--profile-ppo: policy.lora_r = 0 (full fine-tuning)")
    parser.add_argument("--ppo-rounds", type=int, default=3, help="--profile-ppo: unprofiled iterations per variant")
    args = parser.parse_args(argv)
    params = load_params(REPO / "params.yaml")

    if args.profile_ppo:
        args.ppo_variants = [v for v in args.ppo_variants.split(",") if v]
        if set(args.ppo_variants) - set(PPO_VARIANTS):
            parser.error(f"--ppo-variants: choose from {', '.join(PPO_VARIANTS)}")
        result = profile_ppo_iteration(args, params)
        out = RESULTS / ("rollouts_profile_ppo_full.json" if args.ppo_full else "rollouts_profile_ppo.json")
        config = {"policy": params.section("policy"),
                  "overrides": {k: getattr(ppo_params(params, args), k) for k in ("algorithm", "reward", "group_size")},
                  "ppo_variants": args.ppo_variants}
        metrics = {f"{v}/{k}": float(x) for v, r in result["variants"].items() for k, x in r["phases"].items()}
        metrics.update({f"ratio/{k}": float(x) for k, x in result["ratios"].items()})
        save(out.stem, {"command": command(), "config": config, "machine": machine(), **result}, metrics, out,
             params={"ppo_variants": ",".join(args.ppo_variants), "lora_r": result["lora_r"],
                     "max_new_tokens": result["max_new_tokens"]})
        return 0

    if args.smoke:
        args.batches, args.max_new_tokens, args.rounds = "1,8", args.max_new_tokens or 16, 1
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    if set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    args.max_new_tokens = args.max_new_tokens or params.policy.max_new_tokens

    from accelerate import Accelerator

    dtype = resolve_precision(params.model.precision)
    accelerator = Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    tokenizer = load_tokenizer(SFT)
    policy, _ = build_policy(str(SFT), dtype, params.policy)
    perturb_lora(policy, args.lora_b_scale, args.seed)
    policy.eval()
    prompts = distinct_prompts(REPO / TRAIN_COMPARISONS)
    drift = unmerge_drift(policy, rounds=20)
    drift.update(merge_seconds(policy, repeats=3))
    print(f"peft merge_adapter/unmerge_adapter x20 in {dtype}: {drift}", flush=True)
    figures = measure(args, policy, accelerator, tokenizer, prompts, params.policy.max_prompt_len)

    config = {"policy": "models/sft + LoRA (rlhf.policy.build_policy)", "dtype": str(dtype), "lora_r": params.policy.lora_r,
              "lora_b_scale": args.lora_b_scale, "max_new_tokens": args.max_new_tokens, "temperature": 1.0,
              "batches": args.batches, "rounds": args.rounds, "prompts": f"{len(prompts)} distinct, cycled"}
    report = {"command": command(), "config": config, "machine": machine(), "unmerge_drift": drift,
              "throughput": figures}
    out = RESULTS / ("rollouts_smoke.json" if args.smoke else "rollouts.json")
    metrics = {f"b{b}/{v}/{k}": float(f[k]) for b in args.batches for v, f in figures[f"batch_{b}"].items()
               for k in ("decoded_tokens_per_s", "over_generate") if k in f}
    save(out.stem, report, metrics, out, params=config)
    best = {b: max((v for v in args.variants if v != "generate"),
                   key=lambda v: figures[f"batch_{b}"][v]["decoded_tokens_per_s"]) for b in args.batches}
    print("rollout tokens/s over plain generate on the PEFT policy: " + "; ".join(
        f"batch {b}: sampler {figures[f'batch_{b}']['sampler']['over_generate']:.2f}x, best {best[b]} "
        f"{figures[f'batch_{b}'][best[b]]['over_generate']:.2f}x" for b in args.batches
        if "generate" in args.variants and "sampler" in args.variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
