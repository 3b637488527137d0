"""Operator-declared shared prefixes (--shared-prefixes): system prompts whose prefix-cache blocks every tenant may
share. The rest of the cache is partitioned per tenant (engine/kv_cache.py).

The file is a JSON list of strings. Each is rendered as the chat template's system turn, as a request's messages
render it, so a request whose conversation starts with that system message starts with exactly those tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from blink.models.tokenizer import Tokenizer


def read(path: str) -> list[str]:
    """The system prompts in `path`. Raises ValueError saying what is wrong with the file."""
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"--shared-prefixes {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--shared-prefixes {path}: not JSON ({exc})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"--shared-prefixes {path}: expected a JSON list of non-empty strings (system prompts)")
    return prompts


def tokenize(prompts: list[str], tokenizer: Tokenizer) -> list[list[int]]:
    """Each prompt as the tokens of the chat template's system turn (what a request's prompt would start with)."""
    return [tokenizer.encode_chat([{"role": "system", "content": p}], add_generation_prompt=False) for p in prompts]
