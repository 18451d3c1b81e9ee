from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scout_diff_cache.launch import LaunchSettings, load_launch, reverse_mode
from scout_diff_cache.settings import (
    DEFAULT_CONFIG_FILE,
    LAUNCH_NAMES,
    SETTING_NAMES,
    ConfigError,
    Settings,
    load_settings,
    resolve_config_path,
)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_match_the_issue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings, sources = load_settings({}, {}, None)
    assert settings.git_repo_path == str(tmp_path.resolve())
    assert settings.max_file_bytes == 524288
    assert settings.max_snapshot_bytes == 67108864
    assert settings.max_diff_bytes == 1048576
    assert settings.inject_context is True
    assert settings.exclude_path_patterns == ()
    assert settings.model_id == "llama-4-scout"
    assert settings.target_api_key is None
    assert set(sources.values()) == {"default"}


def test_environment_names_of_the_seed_design(tmp_path: Path) -> None:
    env = {
        "GIT_REPO_PATH": str(tmp_path),
        "TARGET_API_KEY": "sk-upstream",
        "MAX_FILE_BYTES": "1000",
        "MAX_SNAPSHOT_BYTES": "2000",
        "MAX_DIFF_BYTES": "3000",
        "INJECT_CONTEXT": "false",
        "EXCLUDE_PATH_PATTERNS": "docs/, *.svg , !keep.svg,",
        "UPSTREAM_TIMEOUT_MS": "1500",
        "MODEL_ID": "scout",
    }
    settings, sources = load_settings({}, env, None)
    assert settings.git_repo_path == str(tmp_path.resolve())
    assert settings.target_api_key == "sk-upstream"
    assert (settings.max_file_bytes, settings.max_snapshot_bytes, settings.max_diff_bytes) == (1000, 2000, 3000)
    assert settings.inject_context is False
    assert settings.exclude_path_patterns == ("docs/", "*.svg", "!keep.svg")
    assert settings.upstream_timeout_ms == 1500
    assert settings.model_id == "scout"
    assert sources["max_file_bytes"] == "environment"


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("YES", True), ("on", True), ("0", False), ("off", False)])
def test_boolean_spellings(text: str, expected: bool) -> None:
    settings, _ = load_settings({}, {"INJECT_CONTEXT": text, "GIT_REPO_PATH": "."}, None)
    assert settings.inject_context is expected


def test_precedence_option_over_environment_over_file_over_default(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", "max_file_bytes: 10\nmax_diff_bytes: 20\nmodel_id: from-file\n")
    env = {"MAX_FILE_BYTES": "11", "MODEL_ID": "from-env", "GIT_REPO_PATH": str(tmp_path)}
    settings, sources = load_settings({"max_file_bytes": 12, "model_id": None}, env, config)
    assert settings.max_file_bytes == 12
    assert sources["max_file_bytes"] == "option"
    assert settings.model_id == "from-env"
    assert sources["model_id"] == "environment"
    assert settings.max_diff_bytes == 20
    assert sources["max_diff_bytes"] == "config file"
    assert settings.max_snapshot_bytes == 67108864
    assert sources["max_snapshot_bytes"] == "default"


def test_empty_option_sequence_means_unset(tmp_path: Path) -> None:
    settings, _ = load_settings(
        {"exclude_path_patterns": []}, {"EXCLUDE_PATH_PATTERNS": "a/", "GIT_REPO_PATH": "."}, None
    )
    assert settings.exclude_path_patterns == ("a/",)
    settings, _ = load_settings(
        {"exclude_path_patterns": ["b/"]}, {"EXCLUDE_PATH_PATTERNS": "a/", "GIT_REPO_PATH": "."}, None
    )
    assert settings.exclude_path_patterns == ("b/",)


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"MAX_FILE_BYTES": "abc"}, ["max_file_bytes", "environment variable MAX_FILE_BYTES", "integer"]),
        ({"MAX_SNAPSHOT_BYTES": "0"}, ["max_snapshot_bytes", "greater than or equal to 1"]),
        ({"MAX_DIFF_BYTES": "-5"}, ["max_diff_bytes"]),
        ({"INJECT_CONTEXT": "maybe"}, ["inject_context", "true/false"]),
        ({"UPSTREAM_TIMEOUT_MS": "-1"}, ["upstream_timeout_ms"]),
        ({"MODEL_ID": "has space"}, ["model_id", "without spaces"]),
        ({"TARGET_API_KEY": "sk-1\r\nX-Evil: 1"}, ["target_api_key", "HTTP header"]),
        ({"GIT_REPO_PATH": "/nonexistent/scout/path"}, ["git_repo_path", "not an existing directory"]),
    ],
)
def test_bad_values_name_the_setting_and_where_it_came_from(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({}, {"GIT_REPO_PATH": ".", **env}, None)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_bad_option_value_names_the_option() -> None:
    with pytest.raises(ConfigError, match="option scout_inject_context"):
        load_settings({"inject_context": "perhaps"}, {"GIT_REPO_PATH": "."}, None)


def test_bad_config_file_value_names_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", "max_file_bytes: lots\n")
    with pytest.raises(ConfigError, match=r"key 'max_file_bytes' in .*c\.yaml"):
        load_settings({}, {"GIT_REPO_PATH": "."}, config)


def test_unknown_config_key_is_rejected(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", "max_file_byte: 10\n")
    with pytest.raises(ConfigError, match=r"unknown setting.*max_file_byte"):
        load_settings({}, {}, config)


@pytest.mark.parametrize("text", ["max_file_bytes: [1\n", "- a list\n"])
def test_malformed_config_file(tmp_path: Path, text: str) -> None:
    config = write_config(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match="config file"):
        load_settings({}, {}, config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings({}, {}, tmp_path / "nope.yaml")


def test_config_path_resolution(tmp_path: Path) -> None:
    assert resolve_config_path("x.yaml", {"SCOUT_CONFIG": "y.yaml"}) == Path("x.yaml")
    assert resolve_config_path(None, {"SCOUT_CONFIG": "y.yaml"}) == Path("y.yaml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_FILE


def test_the_users_config_file_comes_after_scout_config_and_before_the_projects(tmp_path: Path) -> None:
    user_file = tmp_path / "xdg" / "scout-diff-cache" / "config.yaml"
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert resolve_config_path(None, environ) == DEFAULT_CONFIG_FILE  # no user file yet
    user_file.parent.mkdir(parents=True)
    user_file.write_text("max_file_bytes: 1\n")
    assert resolve_config_path(None, environ) == user_file
    assert resolve_config_path(None, {**environ, "SCOUT_CONFIG": "y.yaml"}) == Path("y.yaml")
    home_file = tmp_path / "home" / ".config" / "scout-diff-cache" / "config.yaml"
    home_file.parent.mkdir(parents=True)
    home_file.write_text("{}\n")
    assert resolve_config_path(None, {"HOME": str(tmp_path / "home")}) == home_file


@pytest.mark.parametrize(
    ("url", "mode"),
    [
        ("http://127.0.0.1:8000", "reverse:http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1", "reverse:http://127.0.0.1:8000"),
        ("https://models.internal/v1/", "reverse:https://models.internal"),
        ("http://[::1]:8000/", "reverse:http://[::1]:8000"),
    ],
)
def test_target_api_url_becomes_mitmproxys_reverse_mode(url: str, mode: str) -> None:
    launch, sources = load_launch({}, {"TARGET_API_URL": url}, None)
    assert reverse_mode(launch) == mode
    assert sources["target_api_url"] == "environment"


@pytest.mark.parametrize(
    "url",
    ["127.0.0.1:8000", "ftp://h/", "http://h:8000/openai/v1", "http://h/v1?x=1", "http://u:p@h/", "http://h:99999"],
)
def test_a_target_api_url_the_proxy_cannot_forward_to_is_refused_by_name(url: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid setting target_api_url \(flag --target-api-url\)"):
        load_launch({"target_api_url": url}, {}, None)


def test_launch_settings_precedence_flag_environment_file(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", "port: 1001\nhost: 127.0.0.2\ntarget_api_url: http://a:1\n")
    launch, sources = load_launch({"port": "1003"}, {"PORT": "1002", "HOST": "127.0.0.3"}, config)
    assert (launch.port, launch.host, launch.target_api_url) == (1003, "127.0.0.3", "http://a:1")
    assert sources == {"port": "option", "host": "environment", "target_api_url": "config file"}
    assert LaunchSettings() == load_launch({}, {}, None)[0]


def test_project_config_yaml_lists_every_setting_with_its_default() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text(encoding="utf-8"))
    assert list(data) == [*LAUNCH_NAMES, *SETTING_NAMES]
    assert {name: data.pop(name) for name in LAUNCH_NAMES} == LaunchSettings().model_dump()
    defaults = Settings.model_fields
    for name, value in data.items():
        expected = defaults[name].default
        if name == "git_repo_path":
            assert value == "."
        elif isinstance(expected, tuple):
            assert tuple(value) == expected
        else:
            assert value == expected, name
    text = DEFAULT_CONFIG_FILE.read_text(encoding="utf-8")
    for name in (*LAUNCH_NAMES, *SETTING_NAMES):
        # one line of help directly above each key
        before = text.split(f"\n{name}:")[0].rstrip().splitlines()[-1]
        assert before.startswith("# "), name


def test_loading_the_project_config_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from_file, _ = load_settings({}, {}, DEFAULT_CONFIG_FILE)
    built_in, _ = load_settings({}, {}, None)
    assert from_file == built_in
