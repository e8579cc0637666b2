import re

import pytest

from qloraner import QloranerError
from qloraner.config import EvalConfig, TrainConfig, from_args


@pytest.mark.parametrize(("cls", "settings", "message"), [
    (TrainConfig, {"lora_r": 0}, "--lora-r: must be > 0"),
    (TrainConfig, {"lora_dropout": 1.0}, "--lora-dropout: must be in [0, 1)"),
    (TrainConfig, {"epochs": 0, "max_steps": 0}, "--epochs or --max-steps: one must be > 0"),
    (TrainConfig, {"target_modules": " , "}, "--target-modules: name at least one module"),
    (TrainConfig, {"micro_batch_size": -1}, "--micro-batch-size: must be >= 0"),
    (TrainConfig, {"response_format": "yaml"}, "--response-format: 'yaml' is not one of lines, json"),
    (EvalConfig, {"response_format": "xml"}, "--response-format: 'xml' is not one of lines, json"),
    (TrainConfig, {"prompt": "chatty"}, "--prompt: 'chatty' is not one of simple, typed, fewshot"),
    (EvalConfig, {"split": "dev"}, "--split: 'dev' is not one of train, valid, test"),
    (EvalConfig, {"merge": True}, "--merge: needs --adapter"),
    (EvalConfig, {"compare_base": True}, "--compare-base: needs --adapter"),
    (EvalConfig, {"batch_size": 0}, "--batch-size: must be > 0"),
])
def test_invalid_setting_is_named(cls, settings, message):
    """Each invalid setting is refused with its flag named."""
    with pytest.raises(QloranerError, match="invalid settings: .*" + re.escape(message)):
        cls(**settings)


def test_all_errors_are_reported_at_once():
    """Three bad flags give one error that names all three."""
    with pytest.raises(QloranerError) as err:
        from_args(TrainConfig, ["--lora-r", "0", "--lr", "-1", "--lora-dropout", "1"], "test")
    assert all(flag in str(err.value) for flag in ("--lora-r", "--lr", "--lora-dropout"))
