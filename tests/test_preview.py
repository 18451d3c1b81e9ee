"""``python -m scout_diff_cache preview``: the snapshot and diff a repository would get, no server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from scout_diff_cache.context.snapshot import PREAMBLE, SnapshotLimits, append_preamble, build_snapshot
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from support import ROOT, SETTING_ENV_NAMES, Repo


def preview(args: list[str], env: Mapping[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    base = {k: v for k, v in os.environ.items() if k not in SETTING_ENV_NAMES}
    return subprocess.run(
        [sys.executable, "-m", "scout_diff_cache", *args],
        env={
            **base,
            "PYTHONPATH": str(ROOT / "addon"),
            "SCOUT_CONFIG": str(config),
            "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),  # a build cache of the test's own
            **env,
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_preview_lists_what_is_sent_and_what_is_left_out(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo(
        {
            "src/app.py": "print('hi')\n",
            "big.txt": "x" * 300 + "\n",
            "logo.bin": b"\x00\x01\x02",
            "package-lock.json": "{}\n",
        }
    )
    repo.write({"src/app.py": "print('hello')\n", "notes.md": "untracked\n"})
    snapshot_file, diff_file = tmp_path / "snapshot.txt", tmp_path / "diff.txt"

    result = preview(
        ["preview", "--repo", str(repo.path), "--write-snapshot", str(snapshot_file), "--write-diff", str(diff_file)],
        {"MAX_FILE_BYTES": "200"},
        tmp_path,
    )

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"commit: {repo.head()}" in out
    assert "snapshot: 1 files, 0 symbolic links, 3 left out" in out
    assert "working diff: 2 files, 0 left out" in out
    assert "window: 131072 tokens (default; not learned: the preview asks no server; set MAX_CONTEXT_TOKENS)" in out
    assert "tokens counted by: byte bound (1 token per byte)" in out  # fits by its bytes: nothing to count
    assert "plan: every file in full (the repository fits its share)" in out
    assert "binary files, not included (1):\n  logo.bin (3 bytes)" in out
    assert "files over the per-file limit of 200 bytes, not included (1):\n  big.txt (301 bytes)" in out
    assert "files excluded by path pattern (1):\n  package-lock.json" in out

    git_repo = GitRepo(str(repo.path))
    path_filter = PathFilter.build((), True)
    # One commit: in the append layout (the default) the base is HEAD and there is no history yet.
    assert f"layout: append: base {repo.head()} (no history after it yet)" in out
    limits = SnapshotLimits(200, 67108864, path_filter)
    expected_snapshot = build_snapshot(git_repo, repo.head(), limits, append_preamble(repo.head()))
    expected_diff = build_working_diff(git_repo, repo.head(), DiffLimits(200, 1048576, path_filter))
    assert snapshot_file.read_bytes() == expected_snapshot.text.encode("utf-8")
    assert diff_file.read_bytes() == expected_diff.text.encode("utf-8")
    assert "+print('hello')" in diff_file.read_text()
    assert "+untracked" in diff_file.read_text()


def test_preview_shows_the_layout_the_proxy_would_send(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"a.py": "A = 1\n", "big.md": "words " * 2000})  # the history must stay under 10% of it
    base = repo.head()
    repo.write({"a.py": "A = 2\n"})
    repo.commit_all("second")
    snapshot_file = tmp_path / "snapshot.txt"

    result = preview(["preview", "--repo", str(repo.path), "--write-snapshot", str(snapshot_file)], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"layout: append: base {base} + 1 commits of history" in result.stdout
    text = snapshot_file.read_text()
    assert text.startswith(append_preamble(base)) and f'<commit id="{repo.head()}" parent="{base}">' in text
    assert f"<snapshot_info>\ncommit: {base}\n" in result.stdout  # the base's footer, not the history

    result = preview(
        ["preview", "--repo", str(repo.path), "--write-snapshot", str(snapshot_file)],
        {"LAYOUT": "per-commit"},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "layout: per-commit" in result.stdout
    assert snapshot_file.read_text().startswith(PREAMBLE)
    assert "<commit id=" not in snapshot_file.read_text()


def test_preview_flags_override_the_environment(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    repo = make_repo({"docs/a.md": "a\n", "src/b.py": "b\n"})
    result = preview(
        ["preview", "--repo", str(repo.path), "--exclude", "docs/", "--max-file-bytes", "100"],
        {"MAX_FILE_BYTES": "1", "GIT_REPO_PATH": "/nonexistent"},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "snapshot: 1 files" in result.stdout
    assert "files excluded by path pattern (1):\n  docs/a.md" in result.stdout
    assert "The working tree is clean" in result.stdout


def test_preview_errors_are_clear(tmp_path: Path) -> None:
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    result = preview(["preview", "--repo", str(not_a_repo)], {}, tmp_path)
    assert result.returncode == 2
    assert "is not inside a git repository" in result.stderr

    result = preview(["preview", "--repo", str(tmp_path), "--max-diff-bytes", "0"], {}, tmp_path)
    assert result.returncode == 2
    assert "max_diff_bytes" in result.stderr

    result = preview(["frobnicate"], {}, tmp_path)
    assert result.returncode == 2
    assert "unrecognized arguments: frobnicate" in result.stderr  # not a command: an argument of run
    assert preview(["preview", "--help"], {}, tmp_path).returncode == 0


def test_preview_prints_the_plan_for_a_window(make_repo: Callable[..., Repo], tmp_path: Path) -> None:
    """--window: the repository cut to fit, the plan per tier, what was outlined and omitted."""
    files = {f"src/mod{i}.py": "".join(f"def f{i}_{n}(x):\n    return x * {n}\n" for n in range(60)) for i in range(12)}
    files.update({f"tests/test_mod{i}.py": "def test_it():\n    assert True\n" * 40 for i in range(4)})
    files["README.md"] = "# Project\n" + "Some words.\n" * 200
    repo = make_repo(files)
    result = preview(
        ["preview", "--repo", str(repo.path), "--window", "8192", "--include-first", "tests/test_mod2.py"], {}, tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "window: 8192 tokens (MAX_CONTEXT_TOKENS); message 1's share: 3072 tokens" in out
    assert "tokens counted by: estimate (3 bytes per token; the upstream offers no tokenizer)" in out
    plan = re.search(r"plan: cut to fit: (\d+) files in full, (\d+) outlined, (\d+) omitted", out)
    assert plan is not None, out
    assert int(plan.group(1)) > 0 and int(plan.group(2)) > 0 and int(plan.group(3)) > 0
    assert re.search(r"^  include_first +[1-9][\d,]* +0 +0$", out, flags=re.MULTILINE), out
    assert re.search(r"^  source +[1-9][\d,]* +[1-9]", out, flags=re.MULTILINE), out
    assert "files outlined to fit the context window (signatures only)" in out
    assert "files omitted to fit the context window" in out
