"""Settings: one pydantic model, merged from config.yaml, the environment and mitmproxy options.

Precedence, highest first: ``--set scout_<name>=...`` (mitmproxy option), the environment
variable ``<NAME>``, the key ``<name>`` in the config file, the built-in default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError

from .setting_checks import SettingChecks

OPTION_PREFIX = "scout_"
CONFIG_ENV_VAR = "SCOUT_CONFIG"
CONFIG_OPTION = "scout_config"
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent.parent / "config.yaml"
USER_CONFIG_RELATIVE = Path("scout-diff-cache") / "config.yaml"  # under $XDG_CONFIG_HOME, else ~/.config
# Keys of the config file read by the scout-diff-cache command, not the addon (launch.py).
LAUNCH_NAMES = ("target_api_url", "host", "port")

SettingSource = Literal["option", "environment", "config file", "default"]


class ConfigError(Exception):
    """A setting has a bad value; the message names the setting, where it came from and why."""


class Settings(SettingChecks):
    """Every setting of the addon. Field descriptions are the one-line help used everywhere."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    git_repo_path: str = Field(".", description="Git work tree to snapshot (default: the current directory).")
    target_api_key: str | None = Field(
        None,
        description="Sent upstream as 'Authorization: Bearer ...' in place of the client's header.",
    )
    max_file_bytes: int = Field(524288, ge=1, description="Files larger than this are skipped and listed.")
    max_snapshot_bytes: int = Field(
        67108864,
        ge=1,
        description="Total size of the snapshot's file blocks; later files are omitted and listed.",
    )
    max_diff_bytes: int = Field(
        1048576,
        ge=1,
        description="Size of the working diff; past it, files are left out with a note naming them.",
    )
    max_body_bytes: int = Field(
        67108864,
        ge=1024,
        description="Largest client request body (also once gzip- or deflate-decoded: 413) and non-streamed "
        "answer (502) the proxy accepts; mitmproxy's body_size_limit. Streamed answers are not limited.",
    )
    inject_context: bool = Field(
        True,
        description="Inject snapshot and diff; false makes the proxy a pass-through.",
    )
    exclude_path_patterns: tuple[str, ...] = Field(
        (),
        description="Extra exclusions, gitignore syntax, comma-separated in the environment; '!pat' re-includes.",
    )
    use_default_excludes: bool = Field(
        True,
        description="Apply the built-in exclusions (lock files, node_modules/, bundles, .env, keys).",
    )
    upstream_timeout_ms: int = Field(
        900000,
        ge=0,
        description="No response headers from upstream within this many ms: 504 (0 disables).",
    )
    upstream_connect_timeout_ms: int = Field(
        3000, ge=0, description="Upstream refuses or does not accept a connection in this many ms: 503 (0: no check)."
    )
    stop_grace_ms: int = Field(
        8000,
        ge=0,
        description="On SIGTERM or Ctrl-C the proxy stops accepting connections and lets requests in flight "
        "(streams included) finish for this many ms; then a request still waiting for its answer gets a 503 "
        "and a stream still running ends with an error event. It exits with status 0; a second signal stops it "
        "at once.",
    )
    proxy_api_key: str | None = Field(
        None, description="If set, clients must send 'Authorization: Bearer <key>' (401 otherwise)."
    )
    allow_remote_without_key: bool = Field(
        False, description="Allow listening on a non-loopback address without PROXY_API_KEY (not recommended)."
    )
    allowed_origins: tuple[str, ...] = Field(
        (),
        description="Web page origins (scheme://host[:port]) allowed to call the proxy from a browser; a request "
        "with any other Origin is refused (403). Comma-separated in the environment.",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names clients may address the proxy by, besides localhost, IP addresses and the "
        "listen host; any other Host is refused (403, against DNS rebinding). Comma-separated in the environment.",
    )
    model_id: str = Field(
        "llama-4-scout",
        min_length=1,
        description="Model id answered by GET /v1/models.",
    )
    upstream_model: str | None = Field(
        None,
        description="If set, replaces the 'model' of every chat request sent upstream.",
    )
    stream_usage: bool = Field(
        True,
        description="Ask for usage in streamed answers (stream_options.include_usage) to read cache hits; "
        "the extra usage chunk is removed when the client did not ask for it.",
    )
    count_snapshot_tokens: bool = Field(
        True,
        description="Count tokens with the upstream's /tokenize: fitting to the window exactly, and each "
        "snapshot's exact count for the verdict (false: estimates, BYTES_PER_TOKEN).",
    )
    max_context_tokens: int | None = Field(
        None,
        ge=1024,
        description="The model's context window in tokens; unset: learned from the upstream (vLLM /v1/models "
        "max_model_len, llama.cpp /props n_ctx), else 131072.",
    )
    snapshot_window_percent: int = Field(
        75,
        ge=10,
        le=95,
        description="Message 1's share (base snapshot plus history) of the window less ANSWER_RESERVE_TOKENS; "
        "the rest is for the working diff and the conversation. A repository larger is cut to fit.",
    )
    answer_reserve_tokens: int = Field(
        4096, ge=0, description="Tokens kept for the answer when a request sets neither max_tokens nor its successor."
    )
    bytes_per_token: float = Field(
        3.0, gt=0.5, le=16, description="Without the upstream's tokenizer, tokens are estimated as bytes / this."
    )
    include_first: tuple[str, ...] = Field(
        (),
        description="Paths (gitignore syntax, comma-separated in the environment) kept in full first when the "
        "repository does not fit the window.",
    )
    redact_secrets: bool = Field(
        True,
        description="Replace secrets (vendor tokens, private keys, passwords in URLs and assignments) in every file, "
        "commit and patch sent with [redacted KIND], and list where at the end of the message.",
    )
    secret_allow_paths: tuple[str, ...] = Field(
        (), description="Paths (gitignore syntax, comma-separated in the environment) not scanned for secrets."
    )
    secret_allow_values: tuple[str, ...] = Field(
        (), description="Exact values never redacted (public test keys; comma-separated in the environment)."
    )
    secret_patterns: tuple[str, ...] = Field(
        (),
        description="Extra secret patterns (RE2 syntax; one per line in the environment); a group, if any, "
        "is the part redacted.",
    )
    retrieval_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens per request for left-out files retrieved in full for the question (after the "
        "working diff); unset: 10% of the window; 0: no retrieval.",
    )
    conversation_layout: Literal["append", "seed"] = Field(
        "append",
        description="append: a continuing conversation gets message 1 and every earlier context message as "
        "before, plus what changed since, before its new messages; seed: snapshot and diff first on every turn.",
    )
    max_conversations: int = Field(
        256, ge=0, description="Conversations remembered for the append conversation layout (LRU; 0: none)."
    )
    layout: Literal["append", "per-commit"] = Field(
        "append",
        description="append: a base snapshot plus one block per commit since it (a commit only appends); "
        "per-commit: a fresh snapshot of every commit.",
    )
    base_every_commits: int = Field(
        128, ge=1, description="append layout: the base moves to HEAD's first-parent ancestor at every E-th commit."
    )
    max_tail_percent: int = Field(
        10,
        ge=0,
        description="append layout: a history tail larger than this share of the base's files moves the base "
        "closer (E halved until it fits).",
    )
    history_full_files: bool = Field(
        False, description="append layout: commit blocks carry the full new text of changed files, not patches."
    )
    build_cache_dir: str = Field(
        "auto",
        description="Where rendered bases, history blocks and depths are kept across restarts, so a restart "
        "answers without reading the repository again; auto: $XDG_CACHE_HOME/scout-diff-cache (else "
        "~/.cache/scout-diff-cache); off: nowhere.",
    )
    build_cache_max_bytes: int = Field(
        2 << 30,
        ge=1 << 20,
        description="The build cache's size; past it the least recently used entries are removed.",
    )
    prewarm: bool = Field(
        False,
        description="When HEAD gets a new base (per-commit: every commit), send one max_tokens=1 request "
        "so the upstream caches it before the next question.",
    )
    prefix_key_headers: tuple[str, ...] = Field(
        (),
        description="Request headers that also carry x-scout-prefix-key, for a router that hashes on a header of "
        "its own (SGLang's gateway: X-SMG-Routing-Key; production-stack's router: the --session-key header); "
        "comma-separated in the environment.",
    )
    prefix_key_cache_salt: bool = Field(
        False,
        description="Also send x-scout-prefix-key as vLLM's cache_salt: a request then reuses cached blocks only "
        "of requests with the same repository content, base and settings (isolation between tenants).",
    )
    keep_full_bodies: int = Field(
        10,
        ge=0,
        description="Flows that keep their full request body in mitmweb; older ones get the snapshot "
        "replaced by a short placeholder so memory stays flat.",
    )


SETTING_NAMES: tuple[str, ...] = tuple(Settings.model_fields)
# Never shown as an option's default (mitmweb's Options page, ``mitmdump --options``) or logged.
SECRET_SETTINGS = frozenset({"target_api_key", "proxy_api_key"})


def env_name(setting: str) -> str:
    return setting.upper()


def option_name(setting: str) -> str:
    return OPTION_PREFIX + setting


def setting_help(setting: str) -> str:
    return Settings.model_fields[setting].description or ""


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a config.yaml; unknown keys are rejected later by the model."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of setting names to values")
    return {str(k): v for k, v in data.items()}


def user_config_path(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/scout-diff-cache/config.yaml``, else ``~/.config/scout-diff-cache/config.yaml``."""
    config_home = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(config_home) / USER_CONFIG_RELATIVE


def resolve_config_path(option_value: str | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read: the option (``--config``), else $SCOUT_CONFIG, else the user's config
    file if present, else the project's config.yaml if present (a checkout), else none."""
    if option_value:
        return Path(option_value).expanduser()
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR]).expanduser()
    for candidate in (user_config_path(environ), DEFAULT_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    return None


def changed_settings(settings: Settings, sources: dict[str, SettingSource]) -> str:
    """The settings that differ from the built-in defaults, with where each came from (keys never shown)."""
    built_in = Settings.model_validate({"git_repo_path": settings.git_repo_path})
    changed = []
    for name in SETTING_NAMES:
        value = getattr(settings, name)
        if value == getattr(built_in, name):
            continue
        shown = "(set)" if name in SECRET_SETTINGS else ",".join(value) if isinstance(value, tuple) else value
        changed.append(f"{name}={shown} ({sources[name]})")
    return "changed from the defaults: " + ", ".join(changed) if changed else "every other setting at its default"


def _option_is_set(value: object) -> bool:
    if value is None:
        return False
    if isinstance(value, Sequence) and not isinstance(value, str):
        return len(value) > 0
    return True


def load_settings(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    config_path: Path | None,
) -> tuple[Settings, dict[str, SettingSource]]:
    """Merge the sources by precedence and validate. Returns the settings and where each came from.

    ``options`` maps setting names (without prefix) to mitmproxy option values; None or an empty
    sequence means "not given".
    """
    merged: dict[str, object] = {}
    sources: dict[str, SettingSource] = {name: "default" for name in SETTING_NAMES}
    if config_path is not None:
        file_values = read_config_file(config_path)
        unknown = sorted(set(file_values) - set(SETTING_NAMES) - set(LAUNCH_NAMES))
        if unknown:
            raise ConfigError(
                f"config file {config_path}: unknown setting(s) {', '.join(unknown)}; known: "
                f"{', '.join((*LAUNCH_NAMES, *SETTING_NAMES))}"
            )
        for name, value in file_values.items():
            if value is not None and name not in LAUNCH_NAMES:
                merged[name] = value
                sources[name] = "config file"
    for name in SETTING_NAMES:
        if env_name(name) in environ:
            merged[name] = environ[env_name(name)]
            sources[name] = "environment"
        if _option_is_set(options.get(name)):
            merged[name] = options[name]
            sources[name] = "option"
    try:
        return Settings.model_validate(merged), sources
    except ValidationError as e:
        raise ConfigError(_describe_validation_error(e, sources, config_path)) from None


def _describe_validation_error(
    error: ValidationError,
    sources: Mapping[str, SettingSource],
    config_path: Path | None,
) -> str:
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "?"
        source = sources.get(name, "default")
        where = {
            "option": f"option {option_name(name)}",
            "environment": f"environment variable {env_name(name)}",
            "config file": f"key {name!r} in {config_path}",
            "default": f"default of {name}",
        }[source]
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"invalid setting {name} ({where}): {message}")
    return "; ".join(problems)
