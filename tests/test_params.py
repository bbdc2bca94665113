"""params.yaml is read once, and a bad value stops the run with a message naming key, value and fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf.params import ParamError, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.sft.uses_lora and params.sft.learning_rate > 0


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ParamError, match=r"`sft.learning_rat` is not a known setting\. Did you mean `sft.learning_rate`\?"):
        load_params(write(tmp_path, {"sft": {"learning_rat": 1e-4}}))


def test_unknown_section(tmp_path):
    with pytest.raises(ParamError, match=r"`stf` is not a known section\. Did you mean `sft`\?"):
        load_params(write(tmp_path, {"stf": {}}))


def test_wrong_type(tmp_path):
    with pytest.raises(ParamError, match=r"`sft.batch_size` is 'eight' \(str\), but it must be int"):
        load_params(write(tmp_path, {"sft": {"batch_size": "eight"}}))


def test_negative_learning_rate(tmp_path):
    with pytest.raises(ParamError, match=r"`sft.learning_rate` is -0.001\. .* must be > 0"):
        load_params(write(tmp_path, {"sft": {"learning_rate": -0.001}}))


def test_choice_outside_the_allowed_set(tmp_path):
    with pytest.raises(ParamError, match=r"`model.precision` is 'fp16' .* one of 'auto', 'bf16', 'fp32'"):
        load_params(write(tmp_path, {"model": {"precision": "fp16"}}))


def test_scientific_notation_without_a_dot_reads_as_float(tmp_path):
    assert load_params(write(tmp_path, {"sft": {"learning_rate": "2e-4"}})).sft.learning_rate == 2e-4


def test_missing_file(tmp_path):
    with pytest.raises(ParamError, match="no such file"):
        load_params(tmp_path / "nope.yaml")


def test_params_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception):
        params.sft.epochs = 3
