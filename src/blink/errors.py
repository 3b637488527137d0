"""The exception tree, translated to HTTP status codes and WebSocket error events in one place.

    BlinkError                      500 server_error / internal_error
    ├── InvalidRequest              400 invalid_request_error / invalid_request (and the codes in WS_ONLY_CODES)
    │   ├── ContextLengthExceeded   400 invalid_request_error / context_length_exceeded
    │   ├── RequestTooLarge         413 invalid_request_error / request_too_large
    │   └── UnsupportedMediaType    415 invalid_request_error / unsupported_media_type (a body not application/json)
    ├── AuthenticationError         401 invalid_request_error / invalid_api_key
    ├── PermissionDenied            403 invalid_request_error / permission_denied (an admin operation)
    ├── OriginNotAllowed            403 invalid_request_error / origin_not_allowed (a WebSocket from another site)
    ├── NotFound                    404 invalid_request_error / not_found (an unknown path)
    ├── MethodNotAllowed            405 invalid_request_error / method_not_allowed
    ├── OriginNotAllowed            403 invalid_request_error / origin_not_allowed (a WebSocket handshake from a
    │                               web page of a site not allowed: --allowed-origins)
    ├── ModelNotFound               404 invalid_request_error / model_not_found
    ├── NotReady                    503 server_error / model_not_ready
    │   └── ShuttingDown            503 server_error / server_shutdown
    ├── Overloaded                  429 server_error / overloaded
    ├── RateLimited                 429 requests / rate_limit_exceeded (a tenant's limit; see gateway/limits.py)
    ├── SlowConsumer                503 server_error / slow_consumer
    ├── DeadlineExceeded            504 server_error / deadline_exceeded
    ├── EngineFailure               500 server_error / engine_failure
    └── CacheUnavailable            503 server_error / cache_unavailable (the semantic cache's backend is down:
                                    the gateway treats it as a miss and logs it; no client ever sees it)

Every code blink sends is a key of `CODES`, so its HTTP status is fixed by the code alone. Replicas report
failures on the bus as (code, message, param); `from_wire` rebuilds the same exception at the gateway, so the
status depends only on the error, not on where it happened.
"""

from __future__ import annotations

from typing import Any


class BlinkError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    retry_after: float | None = None  # seconds a client should wait before retrying (HTTP Retry-After), if known

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            assert CODES.get(code) is type(self), f"error code {code!r} is not a code of {type(self).__name__}"
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-style error object (`{"message", "type", "param", "code"}`)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidRequest(BlinkError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class AuthenticationError(BlinkError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(BlinkError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class OriginNotAllowed(BlinkError):
    status = 403
    type = "invalid_request_error"
    code = "origin_not_allowed"


class NotFound(BlinkError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(BlinkError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelNotFound(BlinkError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotReady(BlinkError):
    status = 503
    code = "model_not_ready"


class ShuttingDown(NotReady):
    code = "server_shutdown"


class Overloaded(BlinkError):
    status = 429
    code = "overloaded"


class RateLimited(BlinkError):
    """A tenant's limit (gateway/limits.py) refused the request; `retry_after` says when it would pass.
    `type` is OpenAI's: "requests" or "tokens" for per-minute limits, else "rate_limit_exceeded"."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        kind: str = "requests",
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.type = kind
        self.retry_after = retry_after


class SlowConsumer(BlinkError):
    """The response's bounded stream overflowed (its reader fell behind) and the replica dropped it."""

    status = 503
    code = "slow_consumer"


class DeadlineExceeded(BlinkError):
    """The request's deadline passed before a replica finished it; the replica dropped it."""

    status = 504
    code = "deadline_exceeded"


class EngineFailure(BlinkError):
    code = "engine_failure"


class CacheUnavailable(BlinkError):
    status = 503
    code = "cache_unavailable"


class CoreUnreachable(NotReady):
    """An edge's link to its core is down (or lost a response), and the routing policy does not let the edge answer
    in the core's place (edge/policy.py)."""

    code = "core_unreachable"


# InvalidRequest codes that only the realtime protocol sends (as `error` events, never as an HTTP status)
WS_ONLY_CODES = (
    "invalid_event",
    "unknown_event_type",
    "binary_frame",
    "empty_message",
    "empty_conversation",
    "conversation_already_has_active_response",
    "response_cancel_not_active",
    "unknown_session",
    "conversation_full",
    "audio_not_supported",  # an audio event or modality: blink serves text
    "unsupported_item_position",  # conversation.item.create's previous_item_id other than the last item
)

CODES: dict[str, type[BlinkError]] = {
    **{
        cls.code: cls
        for cls in (
            BlinkError,
            InvalidRequest,
            ContextLengthExceeded,
            RequestTooLarge,
            AuthenticationError,
            PermissionDenied,
            UnsupportedMediaType,
            OriginNotAllowed,
            NotFound,
            MethodNotAllowed,
            ModelNotFound,
            NotReady,
            ShuttingDown,
            Overloaded,
            RateLimited,
            SlowConsumer,
            DeadlineExceeded,
            EngineFailure,
            CacheUnavailable,
            CoreUnreachable,
        )
    },
    "invalid_json": InvalidRequest,
    "response_not_found": NotFound,  # nothing to resume under that id (for this key, on this gateway)
    "session_not_found": NotFound,  # no realtime session to continue under that id (for this key)
    "item_not_found": NotFound,  # no conversation item under that id in this session
    **dict.fromkeys(WS_ONLY_CODES, InvalidRequest),
}


def from_wire(code: str, message: str, param: str | None = None) -> BlinkError:
    """Rebuild the error a replica or the bus reported. A code this build does not know is an internal error
    (status 500) whose message names the code."""
    cls = CODES.get(code)
    if cls is None:
        return BlinkError(f"{message} ({code or 'no code'})", param=param)
    return cls(message, param=param, code=code)
