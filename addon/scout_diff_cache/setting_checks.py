"""How raw setting values become settings (booleans, lists, unset) and which are refused: ``Settings``' base."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ValidationInfo, field_validator

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PROXY_OWNED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection", "authorization"}
)


_BOOLEANS = (
    "inject_context",
    "redact_secrets",
    "use_default_excludes",
    "allow_remote_without_key",
    "stream_usage",
    "count_snapshot_tokens",
    "history_full_files",
    "prewarm",
    "prefix_key_cache_salt",
)
_LISTS = (
    "exclude_path_patterns",
    "allowed_origins",
    "allowed_hosts",
    "include_first",
    "secret_allow_paths",
    "secret_allow_values",
    "secret_patterns",
    "prefix_key_headers",
)
_UNSET_WHEN_EMPTY = ("target_api_key", "proxy_api_key", "upstream_model", "max_context_tokens", "retrieval_tokens")


class SettingChecks(BaseModel):
    """How raw values become settings (booleans, lists, unset) and which are refused; for ``Settings``."""

    @field_validator(*_BOOLEANS, mode="before", check_fields=False)
    @classmethod
    def _parse_bool(cls, value: object) -> object:
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("expected one of true/false, yes/no, on/off, 1/0")
        return value

    @field_validator(*_LISTS, mode="before", check_fields=False)
    @classmethod
    def _split_patterns(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):  # regular expressions hold commas: one per line
            value = value.split("\n" if info.field_name == "secret_patterns" else ",")
        if isinstance(value, (list, tuple)):
            return tuple(str(p).strip() for p in value if str(p).strip())
        return value

    @field_validator(*_UNSET_WHEN_EMPTY, mode="before", check_fields=False)
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("target_api_key", "proxy_api_key", check_fields=False)
    @classmethod
    def _header_safe_key(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_SAFE.fullmatch(value):
            raise ValueError("must be printable ASCII without spaces (it becomes an HTTP header)")
        return value

    @field_validator("prefix_key_headers", check_fields=False)
    @classmethod
    def _routing_header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _HEADER_NAME.fullmatch(name) or name.lower() in _PROXY_OWNED_HEADERS:
                raise ValueError(f"{name!r} is not a header name the proxy may set (a token, not one of its own)")
        return value

    @field_validator("model_id", check_fields=False)
    @classmethod
    def _no_whitespace(cls, value: str) -> str:
        if not _HEADER_SAFE.fullmatch(value):
            raise ValueError("must be printable ASCII without spaces (it is sent in a response header)")
        return value

    @field_validator("git_repo_path", check_fields=False)
    @classmethod
    def _repo_dir_exists(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ValueError(f"{value!r} is not an existing directory")
        return str(path.resolve())
