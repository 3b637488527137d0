"""What `--model` names: a bundled model (`blink models`), a `.gguf` file, or a Hugging Face folder.

    resolve("smollm2-135m-instruct")            bundled: its GGUF inside an installed package (registry.py)
    resolve("~/models/Llama-3.2-1B-Q4_K_M.gguf") a GGUF file: prepared once into the cache, keyed by its content
    resolve("~/models/Qwen3-0.6B")               a folder as `transformers` saves one: config.json, *.safetensors,
                                                 tokenizer.json (+ tokenizer_config.json); read in place

The name clients use is `--served-model-name`, else `ModelSource.name`: the bundled name, the file's name without
`.gguf`, or the folder's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from blink.errors import ModelNotFound
from blink.models import registry


@dataclass(frozen=True)
class ModelSource:
    name: str  # the default name clients use
    kind: Literal["gguf", "folder"]
    spec: registry.ModelSpec | None = None  # a bundled model
    path: Path | None = None  # a user's file or folder

    def locate(self, cache_dir: Path | None = None) -> Path:
        """The GGUF file or the folder. Raises ModelNotFound when it is gone (or a bundled model's package is
        missing)."""
        if self.spec is not None:
            return self.spec.locate(cache_dir)
        assert self.path is not None
        if not self.path.exists():
            raise ModelNotFound(f"model {str(self.path)!r}: no such file or folder", param="model")
        return self.path


def resolve(model: str) -> ModelSource:
    """The source `model` names. Raises ModelNotFound with what `--model` accepts."""
    if model in registry.names():
        return ModelSource(model, "gguf", spec=registry.get(model))
    path = Path(model).expanduser()
    if path.is_file() or (path.suffix.lower() == ".gguf" and not path.is_dir()):
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"model {model!r}: a model file must be a .gguf", param="model")
        return ModelSource(Path(os.path.abspath(path)).name[: -len(".gguf")], "gguf", path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"model {model!r}: a model folder needs config.json, *.safetensors and tokenizer.json "
                "(as transformers saves them)",
                param="model",
            )
        return ModelSource(Path(os.path.abspath(path)).name, "folder", path=path.resolve())  # the name as given
    raise ModelNotFound(
        f"model {model!r} is neither a bundled model ({', '.join(registry.names())}) nor a .gguf file or a model "
        "folder",
        param="model",
    )
