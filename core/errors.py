"""The one exception tree; api/errors.py renders it to the SPEC's error shape."""
from __future__ import annotations


class BatchRouterError(Exception):
    """Base of every error the API can answer with."""

    status = 500
    type = "api_error"
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 details: list[dict] | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.details = details
        self.headers = headers or {}


class InvalidJSON(BatchRouterError):
    status, type, code = 400, "invalid_request_error", "invalid_json"


class InvalidRequest(BatchRouterError):
    """A body or query that parses but breaks a rule."""
    status, type, code = 422, "invalid_request_error", "invalid_request"


class UnsupportedMediaType(BatchRouterError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class PayloadTooLarge(BatchRouterError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class MethodNotAllowed(BatchRouterError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class AuthenticationError(BatchRouterError):
    status, type, code = 401, "authentication_error", "invalid_credentials"


class PermissionDenied(BatchRouterError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(BatchRouterError):
    status, type, code = 404, "not_found_error", "not_found"


class Gone(BatchRouterError):
    status, type, code = 410, "invalid_request_error", "expired"


class Conflict(BatchRouterError):
    status, type, code = 409, "conflict_error", "conflict"


class IdempotencyError(BatchRouterError):
    status, type, code = 400, "idempotency_error", "invalid_idempotency_key"


class BillingError(BatchRouterError):
    status, type, code = 402, "billing_error", "spend_limit_exceeded"


class RateLimited(BatchRouterError):
    status, type, code = 429, "rate_limit_error", "rate_limited"

    def __init__(self, message: str, *, retry_after: int, **kw) -> None:
        super().__init__(message, **kw)
        self.headers["Retry-After"] = str(max(1, int(retry_after)))


class ServiceUnavailable(BatchRouterError):
    status, type, code = 503, "api_error", "unavailable"


class ConfigError(Exception):
    """The configuration has problems; `problems` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class ProviderError(Exception):
    """A provider call failed. Never reaches the API: workers record it on the item."""

    def __init__(self, message: str, *, code: str = "provider_error", status_code: int | None = None,
                 retryable: bool = False, retry_after: float | None = None,
                 pause_s: float = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after
        self.pause_s = pause_s          # the provider's rate budget is spent for this long
