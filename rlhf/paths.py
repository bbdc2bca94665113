"""Where the stages hand their outputs to each other (paths from the project root, as dvc.yaml names them).

A stage's private files (its metrics, plots and reports) are named in its own module; what another
stage reads is named here, once.
"""
BASE_DIR = "models/base"  # prepare: the policy's base model as a transformers checkpoint
SERVED_PROMPTS = "data/feedback/served_prompts.parquet"  # refeed: what users asked the served model
FEEDBACK_COMPARISONS = "data/feedback/comparisons.parquet"  # refeed: users' judgements as comparison rows
SAMPLING_POLICY = "data/feedback/sampling_policy.json"  # refeed: the checkpoint collect samples from (the champion?)
COLLECTED = "data/comparisons/collected.parquet"  # collect: every source's rows, before validation
TRAIN_COMPARISONS = "data/comparisons/train.parquet"  # validate: the splits (by prompt)
VAL_COMPARISONS = "data/comparisons/validation.parquet"
TEST_COMPARISONS = "data/comparisons/test.parquet"
SFT_DIR = "models/sft"  # sft
REWARD_DIR = "models/reward"  # reward_model
POLICY_DIR = "models/policy"  # the policy stage, whatever its algorithm: the challenger evaluate and promote read
POLICY_CURVES = "plots/policy.csv"  # the policy stage's per-iteration figures, plotted in the evaluation report
EVALUATION = "metrics/evaluate.json"  # evaluate: the figures the promotion gate reads
