from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from blink.cli import build_parser, main
from blink.config import CacheConfig, EngineConfig, GatewayConfig, ModelConfig, RedisConfig


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_help_shows_the_operator_flags_and_help_all_every_flag(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = {}
    for option in ("--help", "--help-all"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, option])
        texts[option] = capsys.readouterr().out
    classes = (ModelConfig, EngineConfig, GatewayConfig, CacheConfig, RedisConfig)
    fields = [f for cls in classes for f in dataclasses.fields(cls) if f.name != "local_replica" or command == "serve"]
    worker_flags = {f.name for cls in (ModelConfig, EngineConfig, RedisConfig) for f in dataclasses.fields(cls)}
    advanced = 0
    for f in fields:
        if command == "worker" and f.name not in worker_flags:
            continue
        listed = {
            k: re.search(rf"^  --{f.name.replace('_', '-')}[ ,\n]", v, re.M) is not None for k, v in texts.items()
        }
        if "env" in f.metadata:  # a secret: from the environment only, named in the help of --redis
            assert not listed["--help-all"] and all(n in texts["--help"] for n in f.metadata["env"])
        else:
            assert listed["--help-all"], f.name
            assert listed["--help"] is not f.metadata["advanced"], f.name
            advanced += f.metadata["advanced"]
    assert advanced > 5
    assert build_parser().parse_args([command, "--warmup-steps", "1"]).warmup_steps == 1  # hidden, not gone


def test_flags_reach_the_config() -> None:
    args = build_parser().parse_args(["serve", "--port", "9001", "--threads", "2", "--max-num-seqs", "3"])
    from blink.cli.flags import from_flags

    assert from_flags(GatewayConfig, args).port == 9001
    assert from_flags(EngineConfig, args).max_num_seqs == 3


def test_models_lists_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blink: model 'nope' is neither a bundled model (smollm2-135m-instruct")
    assert err.endswith("nor a .gguf file or a model folder\n") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing.gguf", "no such file or folder"),
        ("weights.bin", "a model file must be a .gguf"),
        ("folder", "a model folder needs config.json"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "worker", "prepare"])
def test_a_model_path_that_cannot_be_served_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, path: str, message: str
) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "folder").mkdir()
    redis = ["--redis", "redis://127.0.0.1:1"] if command == "worker" else []  # checked, never reached
    assert main([command, "--model", str(tmp_path / path), *redis]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blink: model {str(tmp_path / path)!r}") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["serve", "worker", "prepare"])
def test_served_model_name_is_a_model_flag(command: str) -> None:
    from blink.cli.flags import from_flags

    named = from_flags(ModelConfig, build_parser().parse_args([command, "--served-model-name", "my-llama"]))
    assert named.served_model_name == "my-llama" and named.served_name() == "my-llama"
    derived = from_flags(ModelConfig, build_parser().parse_args([command, "--model", "/models/Phi-3-mini.Q4_0.gguf"]))
    assert derived.served_model_name == "" and derived.served_name() == "Phi-3-mini.Q4_0"


def test_models_help_says_model_also_takes_a_path(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["models", "--help"])
    assert "a .gguf file, or a Hugging Face model folder" in " ".join(capsys.readouterr().out.split())


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


def test_keys_add_prints_the_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blink.gateway.keys import KeyFile

    path = tmp_path / "keys.json"
    assert main(["keys", "add", "acme", "--file", str(path), "--max-concurrent-responses", "2"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert key.startswith("bk-") and " " not in key
    assert key not in path.read_text() and key.split("-")[2] not in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    tenant = KeyFile(path).authenticate(key)
    assert tenant.name == "acme" and tenant.limits.max_concurrent_responses == 2 and not tenant.admin
    assert main(["keys", "list", "--file", str(path)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["tenant"], e["limits"]["max_concurrent_responses"]) for e in listed] == [("acme", 2)]
    assert all("hash" not in e and "salt" not in e for e in listed)
    assert main(["keys", "revoke", listed[0]["id"], "--file", str(path)]) == 0
    assert main(["keys", "revoke", listed[0]["id"], "--file", str(path)]) == 1
    assert main(["keys", "add", "bad name", "--file", str(path)]) == 2


@pytest.mark.slow  # starts `blink serve` (~5 s)
def test_an_open_server_refuses_a_public_address_unless_told(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


@pytest.mark.slow  # starts `blink serve` (~5 s)
def test_a_broken_keys_file_stops_the_server_with_its_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keys.json").write_text('{"keys": [], "defaults": {"max_bananas": 1}}')
    assert main(["serve", "--api-keys", str(tmp_path / "keys.json")]) == 2
    assert "max_bananas" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["serve", "--redis", "http://:hunter2@127.0.0.1:6379"], "--redis"),
        (["worker", "--redis", "redis://:hunter2@127.0.0.1:notaport/0"], "--redis"),
        (["serve", "--cache-redis", "127.0.0.1:6379"], "--cache-redis"),
        (["cache-eval", "pairs.jsonl", "--redis", "redis://:hunter2@127.0.0.1/0?db=x"], "--redis"),
    ],
)
def test_a_bad_redis_url_is_a_clear_error_that_never_shows_its_password(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blink: {flag}: ") and "is not a Redis URL" in err and "hunter2" not in err


def test_the_redis_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from blink.cli import _redis_config

    args = build_parser().parse_args(["worker", "--redis", "rediss://127.0.0.1:6380/0"])
    monkeypatch.delenv("BLINK_REDIS_PASSWORD", raising=False)
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    assert _redis_config(args).redis_password == ""
    monkeypatch.setenv("REDIS_PASSWORD", "from-redis")
    assert _redis_config(args).redis_password == "from-redis"
    monkeypatch.setenv("BLINK_REDIS_PASSWORD", "from-blink")
    config = _redis_config(args)
    assert config.redis_password == "from-blink" and "from-blink" not in repr(config)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--redis-password", "x"])
