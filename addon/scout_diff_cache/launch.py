"""Where the ``scout-diff-cache`` command listens and which server it fronts: TARGET_API_URL, HOST, PORT.

These three are the seed design's environment. The command turns them into mitmproxy's own
arguments (``--mode reverse:URL --listen-host HOST -p PORT``); under a plain ``mitmdump -s``
those arguments decide instead. Precedence, highest first: the command's flag, the environment
variable, the key in the config file, the default.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .settings import LAUNCH_NAMES, ConfigError, SettingSource, read_config_file

UPSTREAM_PATHS = ("", "/", "/v1", "/v1/")


class LaunchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    target_api_url: str = Field(
        "http://127.0.0.1:8000",
        description="The model server's OpenAI-compatible base URL, with or without /v1 (vLLM, llama-server, "
        "SGLang, TGI).",
    )
    host: str = Field("127.0.0.1", min_length=1, description="Address the proxy listens on.")
    port: int = Field(8787, ge=1, le=65535, description="Port the proxy listens on.")

    @field_validator("target_api_url")
    @classmethod
    def _server_url(cls, value: str) -> str:
        """``scheme://host[:port]``: mitmproxy's reverse mode forwards the client's path as it is."""
        try:
            parts = urlsplit(value.strip())
            port = parts.port
        except ValueError as e:
            raise ValueError(f"{value!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r}: expected http://HOST[:PORT] or https://HOST[:PORT], optionally ending in /v1")
        if parts.path not in UPSTREAM_PATHS or parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                f"{value!r}: only the path /v1 is allowed (clients call /v1/... through the proxy, "
                "and it forwards those paths unchanged); no query, fragment or credentials (use TARGET_API_KEY)"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def launch_env_name(name: str) -> str:
    return name.upper()


def load_launch(
    flags: Mapping[str, object], environ: Mapping[str, str], config_path: Path | None
) -> tuple[LaunchSettings, dict[str, SettingSource]]:
    """TARGET_API_URL, HOST and PORT from the flags, the environment and the config file (in that order)."""
    merged: dict[str, Any] = {}
    sources: dict[str, SettingSource] = {name: "default" for name in LAUNCH_NAMES}
    file_values = read_config_file(config_path) if config_path is not None else {}
    for name in LAUNCH_NAMES:
        for source, value in (
            ("config file", file_values.get(name)),
            ("environment", environ.get(launch_env_name(name))),
            ("option", flags.get(name)),
        ):
            if value is not None and value != "":
                merged[name], sources[name] = value, source  # type: ignore[assignment]
    try:
        return LaunchSettings.model_validate(merged), sources
    except ValidationError as e:
        problems = []
        for item in e.errors():
            name = str(item["loc"][0]) if item["loc"] else "?"
            where = {
                "option": f"flag --{name.replace('_', '-')}",
                "environment": f"environment variable {launch_env_name(name)}",
                "config file": f"key {name!r} in {config_path}",
                "default": f"default of {name}",
            }[sources.get(name, "default")]
            problems.append(f"invalid setting {name} ({where}): {str(item['msg']).removeprefix('Value error, ')}")
        raise ConfigError("; ".join(problems)) from None


def reverse_mode(launch: LaunchSettings) -> str:
    """mitmproxy's ``--mode`` for the upstream."""
    return f"reverse:{launch.target_api_url}"


def launch_help(name: str) -> str:
    return LaunchSettings.model_fields[name].description or ""
