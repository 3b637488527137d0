"""Byte-level BPE tokenizer, chat template and incremental detokenizer, built from GGUF metadata.

Encoding uses the `tokenizers` library (Rust). Decoding maps every token to its bytes once, so streaming
decode is one table lookup and an incremental UTF-8 decoder per token: a character split across tokens is
emitted only when its last byte arrives.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

_CONTROL = 3
_USER_DEFINED = 4
_OPEN_END = "\x00blink-open-end\x00"  # marks where a still-typed last message ends in the rendered template

# Regexes of the pre-tokenizers that llama.cpp names in `tokenizer.ggml.pre`.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies are written in
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _pre_tokenizer(pre: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "qwen2":
        from tokenizers import Regex

        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level


class Tokenizer:
    """Encode text, render chat templates, and decode tokens (whole or streaming)."""

    def __init__(self, info: dict[str, Any]) -> None:
        tokens: list[str] = info["tokens"]
        types: list[int] = info["token_types"]
        self.vocab_size = len(tokens)
        self.tokens: tuple[str, ...] = tuple(tokens)  # id -> token text (two models share a vocabulary: equal)
        self.eos_token_id: int = info["eos_token_id"]
        self.bos_token_id: int | None = info["bos_token_id"]
        self.add_bos = bool(info["add_bos_token"])
        self.special_ids = frozenset(i for i, t in enumerate(types) if t == _CONTROL)
        merges = [tuple(m.split(" ", 1)) for m in info["merges"]]
        bpe = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
        self._hf = HFTokenizer(bpe)
        self._hf.pre_tokenizer = _pre_tokenizer(info["pre"])
        self._hf.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(self.special_ids)]
        )
        self._hf.add_tokens(
            [AddedToken(t, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED]
        )
        decode = {c: b for b, c in _bytes_to_unicode().items()}
        self._bytes: list[bytes] = []
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
            if i in self.special_ids:
                self._bytes.append(b"")  # control tokens never reach the user's text
            elif ty == _USER_DEFINED:
                self._bytes.append(t.encode())
            else:
                self._bytes.append(bytes(decode[c] for c in t) if all(c in decode for c in t) else t.encode())
        self.id_to_token = tokens
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(info["chat_template"]) if info["chat_template"] else None
        self.stop_token_ids = frozenset(
            i for i in (self.eos_token_id, self.token_id("<|im_end|>"), self.token_id("<|endoftext|>")) if i is not None
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(json.loads(text))

    def token_id(self, token: str) -> int | None:
        i = self._hf.token_to_id(token)
        return None if i is None else int(i)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._hf.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def encode_chat(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, open_last: bool = False
    ) -> list[int]:
        """The prompt of `messages` rendered with the chat template. With `open_last` the prompt ends where the
        last message's content ends (the user is still typing it; nothing of the template after it)."""
        messages = list(messages)
        if open_last and messages:
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + _OPEN_END}
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        if open_last and _OPEN_END in text:
            text = text[: text.rindex(_OPEN_END)]
        return self.encode(text)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{role, content}]) with the model's own chat template."""
        if self._template is None:
            raise ValueError("this model has no chat template; use the completions API")
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.id_to_token[self.bos_token_id] if self.bos_token_id is not None else "",
            eos_token=self.id_to_token[self.eos_token_id],
        )


class IncrementalDetokenizer:
    """Turns a token stream into text deltas that never split a UTF-8 character.

    `push(token_id)` returns the new complete text ('' while a character is still incomplete); `flush()` returns
    whatever bytes remain, with U+FFFD for an unfinished character, and is called once at the end.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
