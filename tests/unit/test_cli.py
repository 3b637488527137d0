from __future__ import annotations

import dataclasses

import pytest

from blink.cli import build_parser, main
from blink.config import CacheConfig, EngineConfig, GatewayConfig, ModelConfig, RedisConfig


def test_serve_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for cls in (ModelConfig, EngineConfig, GatewayConfig, CacheConfig, RedisConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text


def test_flags_reach_the_config() -> None:
    args = build_parser().parse_args(["serve", "--port", "9001", "--threads", "2", "--max-num-seqs", "3"])
    from blink.config import from_flags

    assert from_flags(GatewayConfig, args).port == 9001
    assert from_flags(EngineConfig, args).max_num_seqs == 3


def test_models_lists_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "message"),
    [("magic", "expected ngram, draft:<model> or off"), ("draft:", "expected ngram"), ("draft:nope", "unknown model")],
)
def test_a_bad_speculative_setting_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], value: str, message: str
) -> None:
    assert main(["serve", "--speculative", value]) == 2
    assert message in capsys.readouterr().err


def test_scale_out_flags_are_checked_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker"]) == 2
    assert "--redis is required" in capsys.readouterr().err
    assert main(["serve", "--no-local-replica"]) == 2
    assert "--no-local-replica needs --redis" in capsys.readouterr().err
