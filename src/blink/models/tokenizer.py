"""Byte-level BPE tokenizer, chat template and incremental detokenizer, built from GGUF metadata.

Encoding uses the `tokenizers` library (Rust). Decoding maps every token to its bytes once, so streaming
decode is one table lookup and an incremental UTF-8 decoder per token: a character split across tokens is
emitted only when its last byte arrives.

Client text is data: control tokens (<|im_start|>, <|im_end|>, ...) come only from the chat template. `encode`
reads a control token's name as the characters it is; `encode_chat` renders the template with each such name in
the messages swapped for a marker, so the rendering's only control-token names are the template's own, then
encodes it as one text (exactly the tokens it always had) and, only in the pieces that held a marker, puts the
names back and encodes them as plain text.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from collections.abc import Sequence
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

_CONTROL = 3
_USER_DEFINED = 4
# private-use code points that frame a marker (no template writes them): start, end, "a name's number follows",
# "the open end of a still-typed message"
_MARK, _MARK_END, _MARK_NAME, _MARK_OPEN = "\ue000", "\ue001", "\ue002", "\ue003"
_MARK_TRIES = 16  # random nonces tried until one is in no message (each try fails with odds of 1e-12)

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
        self._plain = HFTokenizer.from_str(self._hf.to_str())  # the same, reading control tokens' names as text
        self._plain.encode_special_tokens = True
        names = sorted((tokens[i] for i in self.special_ids), key=len, reverse=True)  # longest first, as matched
        self._control_names = re.compile("|".join(map(re.escape, names))) if names else None
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
        """The tokens of `text` read as plain text (a completion prompt, any client text): a control token's name
        is encoded as its characters, never as the control token. The model's BOS comes first if it wants one."""
        return self._bos() + list(self._plain.encode(text, add_special_tokens=False).ids)

    def _bos(self) -> list[int]:
        return [self.bos_token_id] if self.add_bos and self.bos_token_id is not None else []

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def encode_chat(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, open_last: bool = False
    ) -> list[int]:
        """The prompt of `messages` ([{role, content}]) rendered with the chat template. Its control tokens are
        exactly those the template writes: one spelled in a message (its content or any other field) is encoded
        as plain text. Messages that spell none give the tokens of the rendered text, encoded whole. With
        `open_last` the prompt ends where the last message's content ends (the user is still typing it), so it is
        a prefix of the finished message's prompt up to the word being typed. Raises ValueError for a model
        without a chat template."""
        marks = _Marks.new(messages, self._control_names)
        escaped = [marks.escape(m) for m in messages]
        if open_last and escaped:
            escaped[-1] = {**escaped[-1], "content": escaped[-1]["content"] + marks.open_end}
        text = self.apply_chat_template(escaped, add_generation_prompt=add_generation_prompt)
        if open_last and marks.open_end in text:
            text = text[: text.rindex(marks.open_end)]
        return self._bos() + self._encode_rendered(text, marks)

    def _encode_rendered(self, text: str, marks: _Marks) -> list[int]:
        # `tokenizers` cuts the text at control tokens, then encodes each piece between two of them on its own;
        # a piece with a marker is encoded again with the names put back, as plain text, and nothing else changes
        encoding = self._hf.encode(text, add_special_tokens=False)
        ids: list[int] = encoding.ids
        if not marks.escaped:
            return ids
        out: list[int] = []
        start, first = 0, 0  # where the current piece starts: in the text, in `ids`
        for k, (token, (begin, end)) in enumerate(zip(ids, encoding.offsets, strict=True)):
            if token in self.special_ids:
                out += self._piece(text[start:begin], ids[first:k], marks)
                out.append(token)
                start, first = end, k + 1
        return out + self._piece(text[start:], ids[first:], marks)

    def _piece(self, text: str, ids: list[int], marks: _Marks) -> list[int]:
        if not marks.found_in(text):
            return ids
        return list(self._plain.encode(marks.restore(text), add_special_tokens=False).ids)

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


class _Marks:
    """Markers that stand in for control tokens' names in the messages of one render.

    A marker is private-use code points around a random nonce (digits: no filter changes them) and the name's
    number, so it cannot come from a template, and a client cannot write one of this render: the nonce is drawn
    again until no message contains it."""

    def __init__(self, nonce: str, names: re.Pattern[str] | None) -> None:
        self._names = names
        self._prefix = _MARK + nonce
        self._found = re.compile(re.escape(self._prefix + _MARK_NAME) + "([0-9]+)" + _MARK_END)
        self.open_end = self._prefix + _MARK_OPEN + _MARK_END  # where a still-typed last message ends
        self.escaped: list[str] = []  # the names swapped out, by marker number

    @classmethod
    def new(cls, messages: Sequence[dict[str, str]], names: re.Pattern[str] | None) -> _Marks:
        texts = [v for m in messages for v in m.values() if isinstance(v, str)]
        for _ in range(_MARK_TRIES):
            nonce = str(secrets.randbelow(10**12))
            if not any(_MARK + nonce in t for t in texts):
                return cls(nonce, names)
        raise ValueError("the messages contain too many private-use markers")

    def escape(self, message: dict[str, str]) -> dict[str, str]:
        """`message` with every control token's name in its text fields replaced by a marker."""
        if self._names is None:
            return dict(message)
        return {k: self._names.sub(self._swap, v) if isinstance(v, str) else v for k, v in message.items()}

    def _swap(self, match: re.Match[str]) -> str:
        self.escaped.append(match.group())
        return f"{self._prefix}{_MARK_NAME}{len(self.escaped) - 1}{_MARK_END}"

    def found_in(self, text: str) -> bool:
        return self._prefix + _MARK_NAME in text

    def restore(self, text: str) -> str:
        return self._found.sub(lambda m: self.escaped[int(m.group(1))], text)


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
