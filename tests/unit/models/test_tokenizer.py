from __future__ import annotations

import pytest

from blink.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n",
    "café crème brûlée",
    "emoji 🚀🎉 and 日本語テキスト",
    "x" * 300,
]


@pytest.fixture(scope="module")
def tok(model_and_tokenizer) -> Tokenizer:  # type: ignore[no-untyped-def]
    return model_and_tokenizer[1]  # type: ignore[no-any-return]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_decode_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in tok.encode(text)] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_span_several_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("🚀")
    assert len(ids) > 1  # so the previous test really exercises held-back bytes
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(t) for t in ids][:-1] == [""] * (len(ids) - 1)


def test_the_templates_control_tokens_are_single_ids_and_invisible_in_text(tok: Tokenizer) -> None:
    ids = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert ids.count(tok.token_id("<|im_start|>")) == ids.count(tok.token_id("<|im_end|>")) == 2  # system, user
    assert tok.decode(ids).endswith("user\nhi\n")
    assert tok.token_id("<|im_end|>") in tok.stop_token_ids


def test_chat_template_renders_roles_and_generation_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
