"""A request's prompt tokens: the chat template over its messages, or its completion prompt.

Client text is data: a control token's name in a message, an instruction, a document, a draft or a completion
prompt is encoded as plain text; control tokens come only from the chat template (see Tokenizer.encode_chat).
"""

from __future__ import annotations

from blink.bus.messages import GenerateRequest
from blink.errors import InvalidRequest
from blink.models.tokenizer import Tokenizer


def prompt_ids(tokenizer: Tokenizer, req: GenerateRequest) -> list[int]:
    """The prompt of `req`. A chat with `open_last` ends where its last message's text ends (the user is still
    typing it), so its tokens are a prefix of the finished message's prompt up to the word being typed.
    Raises InvalidRequest for a model without a chat template and for an empty prompt."""
    if req.messages is not None:
        try:
            ids = tokenizer.encode_chat(req.messages, open_last=req.open_last)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from None
    else:
        ids = tokenizer.encode(req.prompt or "")
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids
