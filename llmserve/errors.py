"""The one exception hierarchy. Every layer raises these; `api.errors` maps them to the
OpenAI error envelope `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations


class LLMServeError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(LLMServeError):
    status_code = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(LLMServeError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotFound(LLMServeError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(LLMServeError):
    """A stored object (a response, a chat completion) that does not exist, or no longer."""

    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class RouteNotFound(LLMServeError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(LLMServeError):
    status_code = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTooLarge(LLMServeError):
    """The body is over --max-request-bytes; refused before it is read in full."""

    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(LLMServeError):
    status_code = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class MisdirectedRequest(LLMServeError):
    """A Host this server does not answer to (DNS rebinding against a loopback server)."""

    status_code = 421
    type = "invalid_request_error"
    code = "misdirected_request"


class ServerBusy(LLMServeError):
    """The waiting line is full: come back later (429 with Retry-After)."""

    status_code = 429
    type = "rate_limit_error"
    code = "server_busy"


class QueueTimeout(LLMServeError):
    """Waited too long for a free sequence slot."""

    status_code = 503
    type = "server_error"
    code = "queue_timeout"


class EngineFailure(LLMServeError):
    status_code = 500
    type = "server_error"
    code = "engine_error"


class EngineUnavailable(LLMServeError):
    """The engine is down (crashed, restarting, or given up on): retry later."""

    status_code = 503
    type = "server_error"
    code = "engine_error"


class ClientGone(Exception):
    """The client hung up before its answer was ready; nobody is left to answer."""


class ModelNotLoaded(LLMServeError):
    """A servable model that cannot be loaded now: its load failed (the reason in the
    message), it would not fit in memory (the numbers in the message), or no loaded model
    could make room for it in time."""

    status_code = 503
    type = "server_error"
    code = "model_not_loaded"


class ModelListError(ValueError):
    """The model list (--model, --models-dir, --models-file) is wrong: the server does not
    start, and says why."""
