"""From settings to the objects they configure: shared by the proxy's addons and the preview command."""

from __future__ import annotations

from .context.fit import WindowBudget
from .context.history import HistoryLimits
from .context.provider import BuildObserver, ContextProvider
from .context.secrets import SecretPatternError, SecretScanner
from .context.snapshot import SnapshotLimits
from .context.tokens import BytesPerTokenRule, TokenMeasure
from .context.workdiff import DiffLimits
from .git.errors import GitError
from .git.exclusions import PathFilter
from .git.repo import GitRepo
from .git.watcher import ChangeMonitor
from .settings import ConfigError, Settings


def history_limits(settings: Settings) -> HistoryLimits | None:
    """The append layout's settings; None for the per-commit layout."""
    if settings.layout != "append":
        return None
    return HistoryLimits(settings.base_every_commits, settings.max_tail_percent, settings.history_full_files)


def context_provider(settings: Settings, observer: BuildObserver | None = None, watch: bool = True) -> ContextProvider:
    """The repository context for these settings, its change monitor started when ``watch``.

    Raises GitError (not a repository), SecretPatternError (a SECRET_PATTERNS entry that does not
    compile) or ValueError (an exclusion pattern that does not compile).
    """
    path_filter = PathFilter.build(settings.exclude_path_patterns, settings.use_default_excludes)
    secrets = secret_scanner(settings)
    repo = GitRepo(settings.git_repo_path)
    monitor = ChangeMonitor(repo.toplevel, [repo.git_dir, repo.common_dir])
    provider = ContextProvider(
        repo,
        monitor,
        SnapshotLimits(settings.max_file_bytes, settings.max_snapshot_bytes, path_filter, secrets),
        DiffLimits(settings.max_file_bytes, settings.max_diff_bytes, path_filter, secrets),
        observer=observer,
        history_limits=history_limits(settings),
    )
    if watch:
        monitor.start()
    return provider


def checked_context_provider(
    settings: Settings, observer: BuildObserver | None = None, watch: bool = True
) -> ContextProvider:
    """``context_provider``, its failures as a ConfigError naming the setting at fault (one readable line)."""
    try:
        return context_provider(settings, observer, watch)
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
