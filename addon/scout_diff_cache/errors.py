"""OpenAI-style error envelopes: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json

from mitmproxy import http


class ApiError(Exception):
    """An error answered to the client by the proxy itself."""

    def __init__(self, status: int, message: str, error_type: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param


def json_response(status: int, payload: object, headers: dict[str, str] | None = None) -> http.Response:
    body = json.dumps(payload, ensure_ascii=False, indent=None).encode("utf-8")
    return http.Response.make(status, body, {"content-type": "application/json", **(headers or {})})


def error_response(error: ApiError) -> http.Response:
    envelope = {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}
    return json_response(error.status, envelope)


def proxy_error_response(status: int, message: str) -> http.Response:
    """An envelope for the errors mitmproxy answers itself (upstream refused, dropped, broken)."""
    if status == 503:
        error = ApiError(503, f"the upstream cannot be reached: {message}", "server_error", "upstream_unavailable")
    elif status >= 500:
        error = ApiError(status, f"the upstream failed: {message}", "server_error", "upstream_error")
    elif status == 413:
        error = ApiError(413, message, "invalid_request_error", "request_too_large")
    else:
        error = ApiError(status, message, "invalid_request_error", "invalid_request")
    return error_response(error)
