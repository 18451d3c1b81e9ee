"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered to the client by the proxy itself."""

    def __init__(self, status: int, message: str, error_type: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def internal_error(error: Exception) -> ApiError:
    """A failure inside the proxy (a bug: the log has the traceback)."""
    return ApiError(500, f"internal proxy error: {type(error).__name__}: {error}", "server_error", "internal_error")


def proxy_error(status: int, message: str) -> ApiError:
    """The errors mitmproxy answers itself (upstream refused, dropped, broken; a bad client request)."""
    if status == 503:
        return ApiError(503, f"the upstream cannot be reached: {message}", "server_error", "upstream_unavailable")
    if status >= 500:
        return ApiError(status, f"the upstream failed: {message}", "server_error", "upstream_error")
    if status == 413:
        return ApiError(413, message, "invalid_request_error", "request_too_large")
    return ApiError(status, message, "invalid_request_error", "invalid_request")
