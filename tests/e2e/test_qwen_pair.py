"""The opt-in speculative pair (make install-qwen): both real models load, share one vocabulary and answer a coding
question coherently. Deselected unless `-m` names qwen; preparing both takes minutes the first time."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch

from blink.config import default_cache_dir
from blink.models import loader, source
from blink.models.llama import CausalAttention
from blink.models.tokenizer import Tokenizer

pytestmark = pytest.mark.qwen

DRAFT, TARGET = "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"


def prepared(name: str) -> Path:
    return loader.prepare(source.resolve(name), default_cache_dir(), progress=False)


def test_draft_and_target_share_one_vocabulary() -> None:
    draft, target = (Tokenizer.from_folder(prepared(n)) for n in (DRAFT, TARGET))
    assert draft.tokens == target.tokens
    assert draft.special_ids == target.special_ids
    assert draft.stop_token_ids == target.stop_token_ids
    assert {draft.token_id("<|im_end|>"), draft.token_id("<|endoftext|>")} <= draft.stop_token_ids
    chat = [{"role": "user", "content": "Reverse a list in Python."}]
    assert draft.apply_chat_template(chat) == target.apply_chat_template(chat)
    # the embedding tables have as many rows as tokens (GGUF pads the vocabulary to 151936 with [PAD] tokens)
    rows = {json.loads((prepared(n) / loader.BLINK_CONFIG).read_text())["vocab_size"] for n in (DRAFT, TARGET)}
    assert rows == {draft.vocab_size}


@torch.inference_mode()
def greedy(name: str, prompt: str, max_tokens: int) -> str:
    model, tok = loader.load(prepared(name))
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    out: list[int] = []
    for _ in range(max_tokens):  # the whole sequence again each step: no cache, the simplest correct backend
        n = len(ids)
        token = int(model(torch.tensor(ids), torch.arange(n), CausalAttention(), torch.tensor([n - 1]))[0].argmax())
        if token in tok.stop_token_ids:
            break
        ids.append(token)
        out.append(token)
    return tok.decode(out)


@pytest.mark.parametrize("name", [DRAFT, TARGET])
def test_greedy_answer_is_code(name: str) -> None:
    text = greedy(name, "Write a Python function is_prime(n) that returns True if n is prime.", max_tokens=28)
    gc.collect()  # the 1.5B model holds ~7 GB in fp32: let it go before the next test
    assert "def is_prime(n" in text, text


def test_the_target_by_its_file_name_is_the_same_prepared_model() -> None:
    """The 1.5B as a user would bring it (its .gguf path) resolves through the generic path to the same folder,
    keyed by the file's content, and names itself after the file."""
    path = source.resolve(TARGET).locate(default_cache_dir())
    by_path = source.resolve(str(path))
    assert by_path.spec is None and by_path.kind == "gguf" and by_path.name == path.name.removesuffix(".gguf")
    assert loader.prepare(by_path, default_cache_dir(), progress=False) == prepared(TARGET)
