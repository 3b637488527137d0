"""`blink inspect MODEL` reads a model's headers and says whether blink can serve it, and why not; `blink serve`
refuses what it cannot serve before anything starts, with that one line."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from blink.cli import main
from tests.tiny_models import TINY, hf_model, write_gguf
from tests.tiny_tokenizers import family_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("Tiny-Gemma-3")
    family_tokenizer("gemma3", folder)
    model = hf_model(TINY["gemma3"], 1100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder))
    write_gguf(TINY["gemma3"], model, folder, folder.parent / "tiny-gemma3.Q8_0.gguf", "Q8_0")
    return folder


def _inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    status = main(["inspect", *argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_a_folder_and_its_gguf(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, folder = _inspect(capsys, str(tiny_folder))
    assert status == 0 and folder["servable"] and folder["format"] == "folder"
    assert folder["family"] == "gemma3" and folder["architecture"] == "Gemma3ForCausalLM"
    assert folder["head_dim"] == 256 and folder["sliding_window"] == 512 and folder["chat_template"]
    assert folder["weights"] == {"F32": folder["weights"]["F32"]}  # saved in fp32
    status, gguf = _inspect(capsys, str(tiny_folder.parent / "tiny-gemma3.Q8_0.gguf"))
    assert status == 0 and gguf["name"] == "tiny-gemma3.Q8_0" and gguf["tokenizer"] == "llama"
    assert "Q8_0" in gguf["weights"] and gguf["parameters"] == folder["parameters"] - 256 * 1100 * 0  # tied: once
    for key in ("layers", "hidden_size", "vocab_size", "context_length", "memory"):
        assert gguf[key] == folder[key], key


def test_the_kv_budget_is_checked_against_the_model(tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, info = _inspect(capsys, str(tiny_folder), "--kv-cache-mb", "1", "--max-model-len", "4096")
    per_token = 2 * 6 * 1 * 256 * 2  # K and V, 6 layers, 1 KV head of 256, fp16 (the default for quantized weights)
    assert info["memory"]["kv_bytes_per_token"] == per_token
    assert status == 1 and not info["servable"] and "--kv-cache-mb 1" in info["reason"]
    _, info = _inspect(capsys, str(tiny_folder), "--kv-cache-mb", "1", "--kv-cache-dtype", "fp32")
    assert info["memory"]["kv_bytes_per_token"] == 2 * per_token
    _, info = _inspect(capsys, str(tiny_folder), "--kv-cache-mb", "1", "--weights", "fp32")
    assert info["memory"]["kv_bytes_per_token"] == 2 * per_token  # fp32 weights keep an fp32 cache


def test_an_unsupported_architecture_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    status, info = _inspect(capsys, str(tmp_path))
    assert status == 1 and "FalconForCausalLM is not supported" in info["reason"]
    assert "Qwen3ForCausalLM" in info["reason"]  # the supported list
    serve = subprocess.run(
        [sys.executable, "-m", "blink.cli", "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode == 2 and serve.stderr.strip().count("\n") == 0
    assert "FalconForCausalLM is not supported" in serve.stderr
