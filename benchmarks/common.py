"""What every benchmark report carries (when, on what machine, where it is written), and the reference model."""

from __future__ import annotations

import json
import os
import platform
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from blink.models import native

# chat prompts every benchmark draws from (short user questions, as a chat box sends them)
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give me three tips for better sleep.",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "List the planets of the solar system.",
    "How do I boil an egg?",
    "What does a compiler do?",
    "Describe a cat to someone who has never seen one.",
    "What are the benefits of exercise?",
    "How does a bicycle stay upright?",
    "Translate 'good morning' into Spanish and French.",
    "What is photosynthesis?",
    "Give me a recipe for pancakes.",
    "Why do we have seasons?",
    "What is the difference between weather and climate?",
    "Explain recursion with an example.",
    "What causes earthquakes?",
    "Write a haiku about autumn.",
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine(model: str = "SmolLM2-135M-Instruct") -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{when}; {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; int8 kernel: "
        f"{native.describe()}; {model}."
    )


def write_report(out: Path, name: str, markdown: str, data: dict[str, Any]) -> None:
    """Print the report and keep it as results/<name>.md and .json."""
    out.mkdir(parents=True, exist_ok=True)
    print(markdown)
    (out / f"{name}.md").write_text(markdown)
    (out / f"{name}.json").write_text(json.dumps({"machine": machine(), **data}, indent=1))


def transformers_model() -> Any:
    """The default model as `transformers` loads it from the same GGUF (fp32): the reference engine to beat."""
    import torch
    import transformers

    from blink.models import registry

    path = registry.get("smollm2-135m-instruct").locate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()


def served_model(name: str, weights: str = "auto", *, context: int | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, weight format) loaded as `blink serve` loads `name`: `--weights` (auto: q4 for a
    Q4_0/Q4_1 GGUF, else w8a8), converted layer by layer while loading, a GGUF's own 4-bit blocks kept in q4."""
    from blink.config import EngineConfig, ModelConfig
    from blink.worker import loading

    config = ModelConfig(model=name)
    engine = EngineConfig(weights=weights, **({"max_model_len": context} if context else {}))
    chosen = loading.weights_for(name, engine, config.cache_dir)
    model, tok = loading.load_model(name, chosen, config, engine, progress=False)
    return model, tok, chosen
