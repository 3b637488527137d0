"""The prompt a chat must tokenize to, built independently of Tokenizer.encode_chat (a test oracle).

Each message's content is replaced by a marker, the template is rendered, the rendering is split at the control
tokens' names (all of them the template's own), then the contents go back in and the text between two control
tokens is encoded as plain text. For text without control-token names this is how the tokenizer always encoded a
rendered prompt (`tokenizers` splits at added tokens first, then encodes the pieces one by one), so it is also
"the tokens as before". It assumes the template writes each content verbatim (no filters on it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from blink.models.tokenizer import Tokenizer


def control_names(tok: Tokenizer) -> list[str]:
    return sorted((tok.tokens[i] for i in tok.special_ids), key=len, reverse=True)


def reference_ids(tok: Tokenizer, messages: Sequence[dict[str, str]], *, open_last: bool = False) -> list[int]:
    marks = [f"\ue000ref{i}\ue001" for i in range(len(messages))]
    rendered = tok.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)])
    if open_last:
        rendered = rendered[: rendered.rindex(marks[-1]) + len(marks[-1])]
    parts = re.split("(" + "|".join(map(re.escape, control_names(tok))) + ")", rendered)
    ids: list[int] = []
    for k, part in enumerate(parts):
        if k % 2:
            control = tok.token_id(part)
            assert control is not None
            ids.append(control)
        elif part:
            for mark, message in zip(marks, messages, strict=True):
                part = part.replace(mark, message["content"])
            plain = tok.encode(part)
            assert not set(plain) & tok.special_ids, "Tokenizer.encode must read control tokens' names as text"
            ids += plain
    return ids


def controls(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
    """The control tokens of `ids`, in order."""
    return [i for i in ids if i in tok.special_ids]


def recognising_ids(tok: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt as blink encoded it before control tokens in client text became data: the whole rendering,
    every control token's name recognised wherever it is."""
    rendered = tok.apply_chat_template(messages)
    parts = re.split("(" + "|".join(map(re.escape, control_names(tok))) + ")", rendered)
    return [i for k, part in enumerate(parts) for i in ([tok.token_id(part)] if k % 2 else tok.encode(part))]
