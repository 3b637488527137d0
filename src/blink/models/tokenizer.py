"""The tokenizer, chat template and incremental detokenizer of a model folder, read as `transformers` reads them.

A folder holds Hugging Face's files: `tokenizer.json` (the `tokenizers` pipeline: byte-level BPE as Llama 3 or
Qwen, SentencePiece-style BPE with byte fallback as Llama 2, Mistral, Gemma or Phi-3), `tokenizer_config.json`
(the named special tokens and the chat template), and optionally `chat_template.jinja` (the template, saved apart
by transformers 5) and `generation_config.json` (more end-of-sequence ids). A GGUF's tokenizer is first written
as these files (gguf_tokenizer.py).

Encoding uses the `tokenizers` library (Rust). Decoding maps every token to its bytes once, so streaming
decode is one table lookup and an incremental UTF-8 decoder per token: a character split across tokens is
emitted only when its last byte arrives.

Client text is data: control tokens (<|im_start|>, <|im_end|>, ...) come only from the chat template. `encode`
reads a control token's name as the characters it is; `encode_chat` renders the template with each such name in
the messages swapped for a marker, so the rendering's only control-token names are the template's own, then
encodes it as one text (exactly the tokens transformers' `apply_chat_template` gives) and, only in the pieces
that held a marker, puts the names back and encodes them as plain text.
"""

from __future__ import annotations

import codecs
import copy
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

# private-use code points that frame a marker (no template writes them): start, end, "a name's number follows",
# "the open end of a still-typed message"
_MARK, _MARK_END, _MARK_NAME, _MARK_OPEN = "\ue000", "\ue001", "\ue002", "\ue003"
_MARK_TRIES = 16  # random nonces tried until one is in no message (each try fails with odds of 1e-12)
# an added token that stands for "a special token came just before" when a piece is encoded again on its own
_ANCHOR = "\ue004blink-anchor\ue004"
# transformers' named special tokens: the template sees each one set in tokenizer_config.json as a string
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# end-of-turn tokens that stop generation too, where the vocabulary has them as special tokens
_TURN_ENDS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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


class Tokenizer:
    """Encode text, render chat templates, and decode tokens (whole or streaming).

    `special_ids` are the added tokens marked special (control tokens); `stop_token_ids` end a generation: EOS,
    generation_config.json's EOS ids, and the usual end-of-turn tokens the vocabulary has as special tokens.
    `strip_first_space`: the model's decoder drops the space SentencePiece puts before the first word, so
    `decode` and `IncrementalDetokenizer` drop one leading space of their text.

    Built from a tokenizer.json's text and tokenizer_config.json's fields (`from_folder` reads them); the named
    special tokens of the config are special tokens of the vocabulary, as transformers makes them."""

    def __init__(
        self,
        tokenizer_json: str,
        config: Mapping[str, Any],
        *,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._hf = HFTokenizer.from_str(tokenizer_json)
        self._hf.no_truncation()
        self._hf.no_padding()
        self._specials = {k: _content(config[k]) for k in _NAMED_SPECIALS if config.get(k) is not None}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        named = [*self._specials.values(), *map(_content, extra)]
        self._hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
        self.special_ids = frozenset(i for i, t in self._hf.get_added_tokens_decoder().items() if t.special)
        self._plain = HFTokenizer.from_str(self._hf.to_str())  # the same, reading control tokens' names as text
        self._plain.encode_special_tokens = True
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        tokens = [""] * self.vocab_size
        for token, i in vocab.items():
            tokens[i] = token
        self.tokens: tuple[str, ...] = tuple(tokens)  # id -> token text (two models share a vocabulary: equal)
        self.bos_token_id = self._id(self._specials.get("bos_token"))
        eos = self._id(self._specials.get("eos_token"))
        if eos is None and not eos_token_ids:
            raise ValueError("the tokenizer names no end-of-sequence token (tokenizer_config.json's eos_token)")
        self.eos_token_id: int = eos if eos is not None else eos_token_ids[0]
        self._prefix = self._post_processor_prefix()
        self.add_bos = bool(self._prefix)
        names = sorted((tokens[i] for i in self.special_ids), key=len, reverse=True)  # longest first, as matched
        self._control_names = re.compile("|".join(map(re.escape, names))) if names else None
        decoder = json.loads(tokenizer_json).get("decoder")
        self._bytes, self.strip_first_space = _byte_table(tokens, self.special_ids, decoder)
        self._template = _compile(chat_template) if chat_template else None
        turn_ends = [i for i in map(self.token_id, _TURN_ENDS) if i in self.special_ids]
        self.stop_token_ids = frozenset([self.eos_token_id, *eos_token_ids, *turn_ends])

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """The tokenizer of a Hugging Face model folder (see the module's docstring for the files read).
        Raises ValueError for a tokenizer blink cannot decode."""
        config_path = folder / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template_path = folder / "chat_template.jinja"
        template = template_path.read_text() if template_path.is_file() else _config_template(config)
        generation_path = folder / "generation_config.json"
        eos: Any = json.loads(generation_path.read_text()).get("eos_token_id") if generation_path.is_file() else None
        eos_ids = [int(i) for i in (eos if isinstance(eos, list) else [] if eos is None else [eos])]
        return cls((folder / "tokenizer.json").read_text(), config, chat_template=template, eos_token_ids=eos_ids)

    def with_chat_template(self, chat_template: str | None) -> Tokenizer:
        """This tokenizer with another chat template (None: none, so `encode_chat` raises ValueError)."""
        other = copy.copy(self)
        other._template = _compile(chat_template) if chat_template else None
        return other

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.token_id(token)

    def _post_processor_prefix(self) -> list[int]:
        # the special tokens the model's post-processor puts before a text (transformers 5 reads BOS from it, not
        # from add_bos_token, when a tokenizer.json is present); a trailing EOS is not ours to add to a prompt
        encoding = self._plain.encode("a", add_special_tokens=True)
        n = 0
        while n < len(encoding.ids) and encoding.special_tokens_mask[n]:
            n += 1
        return list(encoding.ids[:n])

    def token_id(self, token: str) -> int | None:
        i = self._hf.token_to_id(token)
        return None if i is None else int(i)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """The tokens of `text` read as plain text (a completion prompt, any client text): a control token's name
        is encoded as its characters, never as the control token. The model's BOS comes first if it wants one
        and `bos` (False: text that continues others, such as a predicted answer).
        (transformers: `encode(text, split_special_tokens=True)`, without an EOS its post-processor may add.)"""
        ids = list(self._plain.encode(text, add_special_tokens=False).ids)
        return self._prefix + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        text = b"".join(self._bytes[i] for i in ids)
        if self.strip_first_space and text.startswith(b" "):
            text = text[1:]
        return text.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def encode_chat(
        self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True, open_last: bool = False
    ) -> list[int]:
        """The prompt of `messages` ([{role, content}]) rendered with the chat template. Its control tokens are
        exactly those the template writes: one spelled in a message (its content or any other field) is encoded
        as plain text. Messages that spell none give the tokens of the rendered text, encoded whole, without a
        BOS of the post-processor (transformers' `apply_chat_template(..., tokenize=True)`; a template that wants
        BOS writes `bos_token`). With `open_last` the prompt ends where the last message's content ends (the
        user is still typing it), so it is a prefix of the finished message's prompt up to the word being typed.
        Raises ValueError for a model without a chat template, or when the template refuses the messages."""
        marks = _Marks.new(messages, self._control_names)
        escaped = [marks.escape(m) for m in messages]
        if open_last and escaped:
            escaped[-1] = {**escaped[-1], "content": escaped[-1]["content"] + marks.open_end}
        text = self.apply_chat_template(escaped, add_generation_prompt=add_generation_prompt)
        if open_last and marks.open_end in text:
            text = text[: text.rindex(marks.open_end)]
        return self._encode_rendered(text, marks)

    def _encode_rendered(self, text: str, marks: _Marks) -> list[int]:
        # `tokenizers` cuts the text at added tokens, then encodes each piece between two of them on its own;
        # a piece with a marker is encoded again with the names put back, as plain text, and nothing else changes
        encoding = self._hf.encode(text, add_special_tokens=False)
        ids: list[int] = encoding.ids
        if not marks.escaped:
            return ids
        out: list[int] = []
        start, first = 0, 0  # where the current piece starts: in the text, in `ids`
        for k, (token, (begin, end)) in enumerate(zip(ids, encoding.offsets, strict=True)):
            if token in self.special_ids:
                out += self._piece(text[start:begin], ids[first:k], marks, at_start=start == 0)
                out.append(token)
                start, first = end, k + 1
        return out + self._piece(text[start:], ids[first:], marks, at_start=start == 0)

    def _piece(self, text: str, ids: list[int], marks: _Marks, *, at_start: bool) -> list[int]:
        if not marks.found_in(text):
            return ids
        plain = marks.restore(text)
        if at_start or _ANCHOR in plain:
            return list(self._plain.encode(plain, add_special_tokens=False).ids)
        # after a special token: SentencePiece-style pre-tokenizers treat the text as not at the start (no
        # prefix space), so it is encoded after an added token that stands in for that special token
        return list(self._anchored.encode(_ANCHOR + plain, add_special_tokens=False).ids[1:])

    @cached_property
    def _anchored(self) -> HFTokenizer:
        anchored = HFTokenizer.from_str(self._plain.to_str())
        anchored.add_tokens([AddedToken(_ANCHOR, special=False, normalized=False)])
        anchored.encode_special_tokens = True
        return anchored

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{role, content}]) with the model's own chat template, with the variables
        transformers passes. Raises ValueError without a template, or with the template's own message when it
        calls `raise_exception` (the messages are not what the model accepts)."""
        if self._template is None:
            raise ValueError("this model has no chat template; use the completions API")
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        return str(
            self._template.render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self._specials
            )
        )


def _content(token: Any) -> str:
    # a special token in tokenizer_config.json: its text, or an AddedToken's fields
    return str(token["content"] if isinstance(token, dict) else token)


def _config_template(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        return next((str(t["template"]) for t in template if t.get("name") == "default"), None)
    return str(template) if template else None


def _byte_table(
    tokens: Sequence[str], special_ids: frozenset[int], decoder: dict[str, Any] | None
) -> tuple[list[bytes], bool]:
    """Every token's bytes as the model's decoder writes them (control tokens: none), and whether the decoder
    strips the first space of a text."""
    steps = (decoder.get("decoders") or []) if decoder and decoder["type"] == "Sequence" else [decoder or {}]
    kinds = {str(s.get("type")) for s in steps}
    if "ByteLevel" in kinds:
        unbyte = {c: b for b, c in _bytes_to_unicode().items()}
        table = [bytes(unbyte[c] for c in t) if all(c in unbyte for c in t) else t.encode() for t in tokens]
        strip = False
    elif kinds & {"Metaspace", "Replace", "ByteFallback"}:
        fallback = "ByteFallback" in kinds
        table = [_sentencepiece_bytes(t, fallback) for t in tokens]
        strip = any(
            (s["type"] == "Strip" and s.get("start", 0) > 0)
            or (s["type"] == "Metaspace" and s.get("prepend_scheme", "always") != "never")
            for s in steps
        )
    else:
        raise ValueError(f"tokenizer decoder {sorted(kinds)} is not supported (ByteLevel, SentencePiece-style)")
    for i in special_ids:
        table[i] = b""  # control tokens never reach the user's text
    return table, strip


def _sentencepiece_bytes(token: str, byte_fallback: bool) -> bytes:
    byte = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
    return bytes([int(byte.group(1), 16)]) if byte else token.replace("\u2581", " ").encode()


def _raise_exception(message: str) -> NoReturn:
    raise ValueError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' filter: no HTML escaping (Jinja's own escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks the assistant's tokens with it): its body."""

    tags = {"generation"}  # noqa: RUF012 - Extension declares it so

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _compile(template: str) -> Any:
    """`template` in the environment transformers builds (`_compile_jinja_template`): sandboxed, immutable,
    trim_blocks and lstrip_blocks, loop controls, its `tojson`, `raise_exception` and `strftime_now`."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


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
    whatever bytes remain, with U+FFFD for an unfinished character, and is called once at the end. The text is
    `tokenizer.decode` of the tokens pushed (its first space dropped where the decoder drops it).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = tokenizer.strip_first_space  # until the first byte has passed

    def push(self, token_id: int) -> str:
        data = self._tokenizer.token_bytes(token_id)
        if self._strip and data:
            self._strip = False
            data = data.removeprefix(b" ")
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
