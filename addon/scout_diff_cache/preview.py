"""``scout-diff-cache preview``: what the proxy would send for a repository, without any server.

Reads the settings the proxy would (environment, config file, and the flags given here), builds
the snapshot and the working diff exactly as the addon does, fitted to a context window
(``--window``, else MAX_CONTEXT_TOKENS, else the proxy's default; tokens estimated with
BYTES_PER_TOKEN, as the proxy does for an upstream without a tokenizer), and prints a summary:
commit, files, bytes, tokens, the plan per priority tier (in full, outlined, omitted), and every
file left out with the reason (the snapshot's and the diff's own closing listings).
``--write-snapshot`` and ``--write-diff`` write the exact message texts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .context.snapshot import Snapshot
from .context.tiers import TIER_NAMES
from .git.errors import GitError
from .observe.window import ContextWindow, effective_window
from .settings import CONFIG_ENV_VAR, ConfigError, load_settings, resolve_config_path
from .text import human_bytes
from .wiring import checked_context_provider, estimate, window_budget


def parser(prog: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        prog=prog,
        description="Show what scout-diff-cache would send for a repository, without any server.",
    )
    result.add_argument("--repo", help="git work tree (default: GIT_REPO_PATH, else the current directory)")
    result.add_argument("--config", help=f"config file (default: ${CONFIG_ENV_VAR}, else the project's config.yaml)")
    result.add_argument("--max-file-bytes", type=int)
    result.add_argument("--max-snapshot-bytes", type=int)
    result.add_argument("--max-diff-bytes", type=int)
    result.add_argument("--exclude", action="append", default=[], help="extra exclusion (gitignore syntax); repeat")
    result.add_argument("--window", type=int, help="the model's context window in tokens (default: MAX_CONTEXT_TOKENS)")
    result.add_argument("--bytes-per-token", type=float, help="token estimate: UTF-8 bytes per token")
    result.add_argument("--include-first", action="append", default=[], help="kept in full first (glob); repeat")
    result.add_argument("--write-snapshot", type=Path, help="write the exact snapshot message text here")
    result.add_argument("--write-diff", type=Path, help="write the exact working-diff message text here")
    return result


def plan_lines(snapshot: Snapshot) -> list[str]:
    """How message 1 was fitted: the planned tokens, and per tier the tokens in full, outlined, omitted."""
    fit = snapshot.fit
    assert fit is not None
    lines = [
        f"tokens counted by: {fit.measure}",
        f"message 1: {snapshot.planned_tokens:,} tokens planned ({fit.planned_tokens:,} base"
        + (f" + {snapshot.tail_tokens:,} history" if snapshot.tail_commits else "")
        + f"); the repository's files: {fit.repository_tokens:,} tokens",
    ]
    if not fit.cut:
        return [*lines, "plan: every file in full (the repository fits its share)"]
    lines.append(
        f"plan: cut to fit: {snapshot.file_count:,} files in full, {snapshot.outline_count:,} outlined, "
        f"{len(fit.omitted):,} omitted"
    )
    lines.append(f"  {'tier':<28}{'in full':>14}{'outlined':>14}{'omitted':>14}   (tokens of the files in full)")
    for name in TIER_NAMES:
        if name in fit.tiers:
            full, outlined, omitted = fit.tiers[name]
            lines.append(f"  {name:<28}{full:>14,}{outlined:>14,}{omitted:>14,}")
    return lines


def closing_block(text: str, tag: str) -> str:
    start = text.rfind(f"<{tag}>")
    return text[start:] if start >= 0 else ""


def run(argv: Sequence[str], prog: str = "scout-diff-cache preview") -> int:
    args = parser(prog).parse_args(argv)
    options = {
        "git_repo_path": args.repo,
        "max_context_tokens": args.window,
        "bytes_per_token": args.bytes_per_token,
        "include_first": args.include_first,
        "max_file_bytes": args.max_file_bytes,
        "max_snapshot_bytes": args.max_snapshot_bytes,
        "max_diff_bytes": args.max_diff_bytes,
        "exclude_path_patterns": args.exclude,
    }
    try:
        settings, _ = load_settings(options, os.environ, resolve_config_path(args.config, os.environ))
        # The proxy's own provider, its change monitor not started: one read, as the proxy would make it.
        provider = checked_context_provider(settings, watch=False)
        repo = provider.repo
        window = effective_window(settings.max_context_tokens, ContextWindow(None, "the preview asks no server"))
        assert window.tokens is not None
        budget = window_budget(settings, window.tokens, estimate(settings))
        context = asyncio.run(provider.current(budget))
    except (ConfigError, GitError, ValueError) as e:
        print(f"preview: {e}", file=sys.stderr)
        return 2
    snapshot, diff, commit = context.snapshot, context.diff, context.snapshot.commit

    snapshot_bytes = len(snapshot.text.encode("utf-8"))
    diff_bytes = len(diff.text.encode("utf-8"))
    print(f"repository: {repo.toplevel}")
    print(f"commit: {commit or 'none (no commits yet)'}")
    if snapshot.tail_commits:
        print(f"layout: append: base {snapshot.base_commit} + {snapshot.tail_commits} commits of history")
    elif settings.layout == "append":
        print(f"layout: append: base {snapshot.base_commit} (no history after it yet)")
    else:
        print("layout: per-commit")
    print(
        f"snapshot: {snapshot.file_count} files, {snapshot.symlink_count} symbolic links, "
        f"{snapshot.skipped_count} left out; {human_bytes(snapshot_bytes)}"
    )
    print(
        f"working diff: {diff.included_files} files, {diff.left_out_files} left out; "
        f"{human_bytes(diff_bytes)}, ~{budget.measure.count([diff.text])[0]:,} tokens"
    )
    if settings.redact_secrets:
        print(
            f"secrets redacted: {snapshot.redacted} in message 1 (files and history), {diff.redacted} in the "
            "working diff; each listed at the end of its message (the files' below)"
        )
    else:
        print("secrets redacted: none (REDACT_SECRETS=false)")
    print(f"window: {window.tokens} tokens ({window.source}); message 1's share: {budget.tokens} tokens")
    print("\n".join(plan_lines(snapshot)))
    print()
    print(closing_block(snapshot.base_text, "snapshot_info"), end="")
    info = closing_block(diff.text, "diff_info")
    print(info if info else diff.text, end="")
    for target, text in ((args.write_snapshot, snapshot.text), (args.write_diff, diff.text)):
        if target is not None:
            target.write_bytes(text.encode("utf-8"))
            print(f"wrote {human_bytes(len(text.encode('utf-8')))} to {target}")
    return 0
