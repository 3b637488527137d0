"""The name clients use for the model: `ModelConfig.served_name()` (no disk read) agrees with the name
`models/source.py` resolves, and a replica joins the pool of that name."""

from __future__ import annotations

from pathlib import Path

import pytest

from blink.config import EngineConfig, ModelConfig
from blink.models import source


def _model_at(tmp_path: Path, kind: str) -> str:
    """--model for a bundled model, a .gguf file or a Hugging Face folder (the last two made under tmp_path)."""
    if kind == "bundled":
        return "smollm2-135m-instruct"
    if kind == "gguf":
        (tmp_path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf").write_bytes(b"GGUF")
        return str(tmp_path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf")
    (tmp_path / "Qwen3-0.6B").mkdir()
    (tmp_path / "Qwen3-0.6B" / "config.json").write_text("{}")
    return str(tmp_path / "Qwen3-0.6B") + "/"


@pytest.mark.parametrize(
    ("kind", "name"),
    [("bundled", "smollm2-135m-instruct"), ("gguf", "Llama-3.2-1B-Instruct-Q4_K_M"), ("folder", "Qwen3-0.6B")],
)
def test_the_derived_name_agrees_with_the_resolved_source(tmp_path: Path, kind: str, name: str) -> None:
    model = _model_at(tmp_path, kind)
    assert ModelConfig(model=model).served_name() == source.resolve(model).name == name


def test_a_relative_or_home_path_names_the_folder_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = Path(_model_at(tmp_path, "folder"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(model)
    for given in (".", "../Qwen3-0.6B", "~/Qwen3-0.6B"):
        assert ModelConfig(model=given).served_name() == source.resolve(given).name == "Qwen3-0.6B", given


def test_the_served_model_name_replaces_the_derived_one(tmp_path: Path) -> None:
    config = ModelConfig(model=_model_at(tmp_path, "gguf"), served_model_name="my-llama")
    assert config.served_name() == "my-llama"


def test_a_replica_joins_the_pool_of_the_served_name(tmp_path: Path) -> None:
    from blink.bus.memory import MemoryBus
    from blink.worker.replica import Replica

    config = ModelConfig(model=_model_at(tmp_path, "gguf"), served_model_name="my-llama")
    assert Replica(MemoryBus(), config, EngineConfig()).model_name == "my-llama"
    assert Replica(MemoryBus(), ModelConfig(model=config.model), EngineConfig()).model_name == (
        "Llama-3.2-1B-Instruct-Q4_K_M"
    )
