"""Shared fixtures: the default model, prepared once per test session into the normal cache directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from blink.config import default_cache_dir

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from blink.models import loader, registry

    return loader.prepare(registry.get(MODEL), default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from blink.models import loader

    return loader.load(model_dir)
