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
