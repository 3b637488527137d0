"""The engine's own exceptions: what `add_request` refuses. The engine knows nothing of the API; the replica
translates these into its errors (worker/requests.py)."""

from __future__ import annotations


class RequestRejected(ValueError):
    """`add_request` refused the request; `param` names the part at fault (prompt, max_tokens)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextTooLong(RequestRejected):
    """The prompt, or the prompt plus max_tokens, does not fit the model's context: the one place blink checks
    it (the gateway checks only that max_tokens alone is in range)."""

    def __init__(self, prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
        asked = f" + {max_tokens} to generate" if max_tokens is not None else ""
        fits = prompt_tokens < max_model_len
        super().__init__(
            f"this model's context is {max_model_len} tokens; the request has {prompt_tokens} prompt tokens{asked}",
            param="max_tokens" if fits else "messages",
        )
