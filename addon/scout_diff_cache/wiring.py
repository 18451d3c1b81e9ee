"""From settings to the objects they configure: shared by the proxy's addons and the preview command."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from .context.buildcache import BuildCache, UnsafeCacheDir
from .context.fit import WindowBudget
from .context.history import HistoryLimits
from .context.provider import BuildObserver, ContextProvider
from .context.repobuilds import RepositoryBuilds
from .context.secrets import SecretPatternError, SecretScanner
from .context.snapshot import SnapshotLimits
from .context.tokens import BytesPerTokenRule, TokenMeasure
from .context.workdiff import DiffLimits
from .git.errors import GitError
from .git.exclusions import PathFilter
from .git.repo import GitRepo
from .git.watcher import ChangeMonitor
from .settings import ConfigError, Settings

logger = logging.getLogger(__name__)

BUILD_CACHE_RELATIVE = "scout-diff-cache"  # under $XDG_CACHE_HOME, else ~/.cache


def history_limits(settings: Settings) -> HistoryLimits | None:
    """The append layout's settings; None for the per-commit layout."""
    if settings.layout != "append":
        return None
    return HistoryLimits(settings.base_every_commits, settings.max_tail_percent, settings.history_full_files)


def build_cache_path(settings: Settings, environ: Mapping[str, str]) -> Path | None:
    """BUILD_CACHE_DIR as a path: ``auto`` is $XDG_CACHE_HOME/scout-diff-cache (else under ~/.cache); off: None."""
    value = settings.build_cache_dir
    if value == "off":
        return None
    if value != "auto":
        return Path(value).expanduser()
    cache_home = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(cache_home) / BUILD_CACHE_RELATIVE


def open_build_cache(settings: Settings, environ: Mapping[str, str] = os.environ) -> BuildCache | None:
    """The build cache BUILD_CACHE_DIR names. A directory the user named that cannot be used is a
    ConfigError; the automatic one is then only warned about (the proxy runs without it)."""
    path = build_cache_path(settings, environ)
    if path is None:
        return None
    try:
        return BuildCache.open(path, settings.build_cache_max_bytes)
    except UnsafeCacheDir as e:
        if settings.build_cache_dir != "auto":
            raise ConfigError(f"invalid setting build_cache_dir: {e}") from None
        logger.warning("build cache off: %s (set BUILD_CACHE_DIR to a directory of your own, or off)", e)
        return None


def context_provider(
    settings: Settings,
    observer: BuildObserver | None = None,
    watch: bool = True,
    build_cache: BuildCache | None = None,
) -> ContextProvider:
    """The repository context for these settings, its change monitor started when ``watch``; what it
    renders kept in ``build_cache`` when given.

    Raises GitError (not a repository), SecretPatternError (a SECRET_PATTERNS entry that does not
    compile) or ValueError (an exclusion pattern that does not compile).
    """
    path_filter = PathFilter.build(settings.exclude_path_patterns, settings.use_default_excludes)
    secrets = secret_scanner(settings)
    repo = GitRepo(settings.git_repo_path)
    monitor = ChangeMonitor(repo.toplevel, [repo.git_dir, repo.common_dir])
    snapshot_limits = SnapshotLimits(settings.max_file_bytes, settings.max_snapshot_bytes, path_filter, secrets)
    builds = None
    if build_cache is not None:
        builds = RepositoryBuilds(build_cache, repo, snapshot_limits, settings.history_full_files)
    provider = ContextProvider(
        repo,
        monitor,
        snapshot_limits,
        DiffLimits(settings.max_file_bytes, settings.max_diff_bytes, path_filter, secrets),
        observer=observer,
        history_limits=history_limits(settings),
        builds=builds,
    )
    if watch:
        monitor.start()
    return provider


def checked_context_provider(
    settings: Settings, observer: BuildObserver | None = None, watch: bool = True
) -> ContextProvider:
    """``context_provider`` with the build cache BUILD_CACHE_DIR names, its failures as a ConfigError
    naming the setting at fault (one readable line)."""
    build_cache = open_build_cache(settings)
    try:
        return context_provider(settings, observer, watch, build_cache)
    except SecretPatternError as e:
        raise ConfigError(f"invalid setting secret_patterns: {e}") from None
    except ValueError as e:  # an exclusion pattern pathspec cannot compile
        raise ConfigError(f"invalid setting exclude_path_patterns: {e}") from None
    except GitError as e:
        raise ConfigError(f"invalid setting git_repo_path: {e}") from None


def secret_scanner(settings: Settings) -> SecretScanner | None:
    """The scanner REDACT_SECRETS asks for; raises SecretPatternError for a bad SECRET_PATTERNS entry."""
    if not settings.redact_secrets:
        return None
    return SecretScanner(settings.secret_allow_paths, settings.secret_allow_values, settings.secret_patterns)


def message_share(settings: Settings, window_tokens: int) -> int:
    """Message 1's share of the window: SNAPSHOT_WINDOW_PERCENT of the window less the answer's reserve."""
    usable = max(window_tokens - settings.answer_reserve_tokens, window_tokens // 2)
    return usable * settings.snapshot_window_percent // 100


def window_budget(settings: Settings, window_tokens: int, measure: TokenMeasure) -> WindowBudget:
    include_first = PathFilter(settings.include_first) if settings.include_first else None
    return WindowBudget(message_share(settings, window_tokens), measure, include_first)


def estimate(settings: Settings) -> TokenMeasure:
    """The measure without the upstream's tokenizer."""
    return BytesPerTokenRule(settings.bytes_per_token)
