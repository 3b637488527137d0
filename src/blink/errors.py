"""The exception tree, translated to HTTP status codes and WebSocket error events in one place.

    BlinkError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── ContextLengthExceeded   400 invalid_request_error / context_length_exceeded
    │   └── RequestTooLarge         413 invalid_request_error / request_too_large
    ├── ModelNotFound               404 invalid_request_error / model_not_found
    ├── NotReady                    503 server_error / model_not_ready
    ├── Overloaded                  429 server_error / overloaded
    └── EngineFailure               500 server_error

Replicas report failures on the bus as (type, code, message); `from_wire` rebuilds the same exception at the
gateway, so the HTTP status depends only on the error, not on where it happened.
"""

from __future__ import annotations

from typing import Any


class BlinkError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
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


class ModelNotFound(BlinkError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotReady(BlinkError):
    status = 503
    code = "model_not_ready"


class Overloaded(BlinkError):
    status = 429
    code = "overloaded"


class EngineFailure(BlinkError):
    code = "engine_failure"


_BY_CODE: dict[str, type[BlinkError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ContextLengthExceeded,
        RequestTooLarge,
        ModelNotFound,
        NotReady,
        Overloaded,
        EngineFailure,
    )
}


def from_wire(code: str, message: str, param: str | None = None) -> BlinkError:
    """Rebuild the error a replica reported on the bus."""
    cls = _BY_CODE.get(code, BlinkError)
    return cls(message, param=param, code=code)
