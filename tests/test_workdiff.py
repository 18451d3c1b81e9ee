"""The working diff: real repositories, compared with what git itself prints."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from watchdog.events import FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from scout_diff_cache.context.snapshot import SnapshotLimits, build_snapshot
from scout_diff_cache.context.workdiff import DiffLimits, WorkingDiff, build_working_diff
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.patches import git_quote, git_unquote, new_file_patch, patch_path, split_patch
from scout_diff_cache.git.repo import GitRepo
from support import GIT_COMMIT_ENV, Repo, git_processes, listed_items

MakeRepo = Callable[..., Repo]


def limits(
    max_file_bytes: int = 1 << 20,
    max_diff_bytes: int = 1 << 24,
    patterns: Sequence[str] = (),
    use_defaults: bool = True,
) -> DiffLimits:
    return DiffLimits(max_file_bytes, max_diff_bytes, PathFilter.build(patterns, use_defaults))


def wdiff(repo: Repo | Path, lim: DiffLimits | None = None) -> WorkingDiff:
    git_repo = GitRepo(str(repo.path if isinstance(repo, Repo) else repo))
    return build_working_diff(git_repo, git_repo.head_commit(), lim or limits())


def body(diff: WorkingDiff) -> bytes:
    """The patches: between the introduction (ends with a blank line) and <diff_info>."""
    text = diff.text
    return text[text.index("\n\n") + 2 : text.rindex("<diff_info>\n")].encode()


def patches(diff: WorkingDiff) -> dict[bytes, bytes]:
    """Per-file patches by path; a type change is two patches (delete, add) for one path: joined."""
    result: dict[bytes, bytes] = {}
    for path, chunk in split_patch(body(diff)):
        result[path] = result.get(path, b"") + chunk
    return result


def info(diff: WorkingDiff) -> str:
    return diff.text[diff.text.rindex("<diff_info>\n") :]


def listing(diff: WorkingDiff, title_start: str) -> list[str]:
    return listed_items(info(diff), title_start)


def git_bytes(repo: Repo | Path, *args: str, ok: Sequence[int] = (0,)) -> bytes:
    path = repo.path if isinstance(repo, Repo) else repo
    proc = subprocess.run(
        ["git", *args], cwd=path, capture_output=True, check=False, env={**os.environ, **GIT_COMMIT_ENV}
    )
    assert proc.returncode in ok, proc.stderr.decode(errors="replace")
    return proc.stdout


def no_index(repo: Repo, name: str | bytes) -> bytes:
    """What git itself prints for an untracked file (exit code 1: there is a difference)."""
    return git_bytes(
        repo,
        "-c",
        "core.quotePath=false",
        "diff",
        "--no-index",
        "--full-index",
        "/dev/null",
        os.fsdecode(name),
        ok=(1,),
    )


def porcelain_diff(repo: Repo, *args: str) -> bytes:
    """``git diff --full-index HEAD`` (porcelain; it may refresh the index, so call it last)."""
    return git_bytes(repo, "-c", "core.quotePath=false", "diff", "--full-index", *args)


# --- clean ----------------------------------------------------------------------------------------


def test_clean_tree_says_clean_and_names_the_commit(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", ".gitignore": "*.log\n"})
    repo.write({"ignored.log": "noise\n"})
    diff = wdiff(repo)

    assert diff.text == f"The working tree is clean: no uncommitted changes against commit {repo.head()}.\n"
    assert diff.commit == repo.head()
    assert diff.included_files == 0 and diff.left_out_files == 0
    assert json.loads(diff.message_json) == {"role": "system", "content": diff.text}
    assert diff.size == len(diff.message_json)


def test_touched_files_are_not_changes(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "big.txt": "b" * 500 + "\n", "package-lock.json": "{}\n"})
    os.symlink("a.txt", repo.path / ".env")
    repo.commit_all("link")
    for name in ("a.txt", "big.txt", "package-lock.json"):
        os.utime(repo.path / name, ns=(1_000_000_000, 1_000_000_000))
    os.utime(repo.path / ".env", ns=(1_000_000_000, 1_000_000_000), follow_symlinks=False)
    assert git_bytes(repo, "diff-index", "--name-only", "HEAD")  # git sees them as stat-dirty

    diff = wdiff(repo, limits(max_file_bytes=100))

    assert diff.text == f"The working tree is clean: no uncommitted changes against commit {repo.head()}.\n"


def test_same_size_edit_of_an_excluded_file_is_still_reported(make_repo: MakeRepo) -> None:
    repo = make_repo({"package-lock.json": "{1}\n", "big.txt": "b" * 500 + "\n"})
    repo.write({"package-lock.json": "{2}\n", "big.txt": "c" * 500 + "\n"})
    diff = wdiff(repo, limits(max_file_bytes=100))

    assert listing(diff, "changed files excluded by path pattern") == ["package-lock.json"]
    assert listing(diff, "changed files over the per-file limit of 100 bytes") == ["big.txt"]
    assert diff.included_files == 0 and diff.left_out_files == 2


def test_a_fifo_in_place_of_an_excluded_tracked_file_does_not_block(make_repo: MakeRepo) -> None:
    repo = make_repo({"package-lock.json": "", "a.txt": "a\n"})
    (repo.path / "package-lock.json").unlink()
    os.mkfifo(repo.path / "package-lock.json")
    result: list[WorkingDiff] = []
    worker = threading.Thread(target=lambda: result.append(wdiff(repo)), daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():
        with open(os.open(repo.path / "package-lock.json", os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass  # unblock the reader so the test process can end
        pytest.fail("building the diff blocked on a FIFO")

    assert listing(result[0], "changed files excluded by path pattern") == ["package-lock.json"]


# --- tracked changes ------------------------------------------------------------------------------


def test_tracked_changes_appear_as_patches_like_git_diff(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {
            "modified.txt": "one\ntwo\nthree\n",
            "long.txt": "".join(f"line {i}\n" for i in range(20)),
            "deleted.txt": "gone\n",
            "staged_deleted.txt": "rm\n",
            "both.txt": "base\n",
            "dir/nested.py": "x = 1\n",
        }
    )
    repo.write({"modified.txt": "one\nTWO\nthree\n", "dir/nested.py": "x = 2\n", "staged_new.txt": "fresh\n"})
    repo.write({"long.txt": "".join(f"line {i}\n" if i != 10 else "changed\n" for i in range(20))})
    (repo.path / "deleted.txt").unlink()
    repo.git("rm", "-q", "staged_deleted.txt")
    repo.write({"both.txt": "base\nstaged line\n"})
    repo.git("add", "staged_new.txt", "both.txt")
    repo.write({"both.txt": "base\nstaged line\nunstaged line\n"})

    diff = wdiff(repo)
    got = patches(diff)

    assert list(got) == [
        b"both.txt",
        b"deleted.txt",
        b"dir/nested.py",
        b"long.txt",
        b"modified.txt",
        b"staged_deleted.txt",
        b"staged_new.txt",
    ]
    assert b"+staged line\n+unstaged line\n" in got[b"both.txt"]
    assert b"deleted file mode 100644\n" in got[b"deleted.txt"] and b"-gone\n" in got[b"deleted.txt"]
    assert b"-two\n+TWO\n" in got[b"modified.txt"]
    assert b"new file mode 100644\n" in got[b"staged_new.txt"] and b"+fresh\n" in got[b"staged_new.txt"]
    assert got[b"long.txt"].endswith(
        b"@@ -8,7 +8,7 @@ line 6\n line 7\n line 8\n line 9\n-line 10\n+changed\n line 11\n line 12\n line 13\n"
    )
    assert diff.included_files == 7 and diff.left_out_files == 0
    assert f"against commit {repo.head()}:" in diff.text
    assert info(diff) == f"<diff_info>\nfiles included: 7, bytes: {len(body(diff))}\n</diff_info>\n"
    # The same bytes git's own porcelain diff prints against HEAD (run last: it may refresh the index).
    assert body(diff) == porcelain_diff(repo, "HEAD")


def test_mode_change(make_repo: MakeRepo) -> None:
    repo = make_repo({"run.sh": "#!/bin/sh\n", "both.sh": "echo\n"})
    (repo.path / "run.sh").chmod(0o755)
    (repo.path / "both.sh").chmod(0o755)
    repo.write({"both.sh": "echo hi\n"})

    got = patches(wdiff(repo))

    assert got[b"run.sh"] == (b"diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n")
    assert got[b"both.sh"].startswith(b"diff --git a/both.sh b/both.sh\nold mode 100644\nnew mode 100755\nindex ")
    assert b"-echo\n+echo hi\n" in got[b"both.sh"]


def test_tracked_symlink_retarget_and_type_change(make_repo: MakeRepo) -> None:
    repo = make_repo({"target_a": "a\n", "target_b": "b\n", "becomes_link": "file\n"})
    os.symlink("target_a", repo.path / "link")
    repo.commit_all("link")
    (repo.path / "link").unlink()
    os.symlink("target_b", repo.path / "link")
    (repo.path / "becomes_link").unlink()
    os.symlink("target_a", repo.path / "becomes_link")

    diff = wdiff(repo)
    got = patches(diff)

    assert b"-target_a\n\\ No newline at end of file\n+target_b\n" in got[b"link"]
    assert b"deleted file mode 100644" in got[b"becomes_link"] and b"new file mode 120000" in got[b"becomes_link"]
    assert body(diff) == porcelain_diff(repo, "HEAD")


def test_diff_is_against_the_given_commit_not_the_index(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "1\n"})
    first = repo.head()
    repo.write({"a.txt": "2\n"})
    repo.commit_all("second")
    repo.write({"a.txt": "3\n"})
    git_repo = GitRepo(str(repo.path))

    against_first = build_working_diff(git_repo, first, limits())
    against_head = build_working_diff(git_repo, repo.head(), limits())

    assert b"-1\n+3\n" in patches(against_first)[b"a.txt"]
    assert b"-2\n+3\n" in patches(against_head)[b"a.txt"]
    assert f"against commit {first}:" in against_first.text


@pytest.mark.parametrize(
    "racing_command", [("add", "-A"), ("rm", "-q", "--cached", "a.txt")], ids=["git add", "git rm --cached"]
)
def test_an_index_update_between_the_tracked_and_untracked_reads_is_not_torn(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch, racing_command: tuple[str, ...]
) -> None:
    """A user's `git add` (or `git rm --cached`) lands after diff-index and before ls-files.

    The file moved from untracked to tracked (or back) between the two reads, so it was in neither
    list (or in both). The diff must be the one of the index before or the one of the index after.
    """
    repo = make_repo({"a.txt": "1\n"})
    repo.write({"a.txt": "2\n", "new.txt": "new\n"})
    git_repo = GitRepo(str(repo.path))
    commit = repo.head()
    before = build_working_diff(git_repo, commit, limits()).text
    original = GitRepo.untracked_paths
    raced: list[bool] = []

    def untracked_after_a_racing_git_command(self: GitRepo) -> list[bytes]:
        if not raced:
            raced.append(True)
            repo.git(*racing_command)
        return original(self)

    monkeypatch.setattr(GitRepo, "untracked_paths", untracked_after_a_racing_git_command)
    during = build_working_diff(git_repo, commit, limits()).text
    monkeypatch.undo()
    after = build_working_diff(git_repo, commit, limits()).text

    assert raced
    assert during in (before, after), during


# --- untracked files as new-file patches ----------------------------------------------------------


UNTRACKED_CASES: dict[str, bytes] = {
    "plain.txt": b"one\ntwo\n",
    "single.txt": b"just one line\n",
    "no_newline.txt": b"first\nlast without newline",
    "one_no_newline": b"x",
    "empty.txt": b"",
    "only_newline": b"\n",
    "blank_lines": b"\n\n\n",
    "binary.bin": b"\x89PNG\r\n\x1a\n\0\0data",
    "late_nul.txt": b"a" * 9000 + b"\0" + b"\n",
    "crlf.txt": b"win\r\ndows\r\n",
    "lone_cr.txt": b"a\rb\rc",
    "latin1.txt": b"caf\xe9\n\xff\xfe\n",
    "with space.txt": b"spaced\n",
    "ünïcödé ☃.txt": "ünï\n".encode(),
    "tab\tname": b"tab\n",
    'quo"te': b"quote\n",
    "back\\slash": b"bs\n",
    "new\nline": b"nl\n",
    'sp ace"q': b"both\n",
    "dir/sub dir/deep.txt": b"deep\n",
    "trailing space ": b"ts\n",
    "ctrl\x01\x7f": b"ctl\n",
}


@pytest.mark.parametrize("name", list(UNTRACKED_CASES))
def test_untracked_file_patch_is_byte_identical_to_git_no_index(make_repo: MakeRepo, name: str) -> None:
    repo = make_repo({"committed.txt": "c\n"})
    repo.write({name: UNTRACKED_CASES[name]})

    diff = wdiff(repo)
    got = patches(diff)

    assert list(got) == [name.encode()]
    expected = no_index(repo, name)
    assert got[name.encode()].decode("utf-8", "replace") == expected.decode("utf-8", "replace")
    assert diff.included_files == 1


def test_untracked_executable_and_symlink_match_git_no_index(make_repo: MakeRepo, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET OUTSIDE\n")
    repo = make_repo({"committed.txt": "c\n"})
    repo.write({"tool.sh": "#!/bin/sh\necho hi\n"})
    (repo.path / "tool.sh").chmod(0o755)
    os.symlink(str(secret), repo.path / "outside")
    os.symlink("committed.txt", repo.path / "inside")
    os.symlink("nowhere", repo.path / "dangling")

    diff = wdiff(repo)
    got = patches(diff)

    assert sorted(got) == [b"dangling", b"inside", b"outside", b"tool.sh"]
    for name in ("tool.sh", "outside", "inside", "dangling"):
        assert got[name.encode()] == no_index(repo, name), name
    assert b"new file mode 100755\n" in got[b"tool.sh"]
    assert got[b"outside"].startswith(b"diff --git a/outside b/outside\nnew file mode 120000\n")
    assert f"+{secret}\n\\ No newline at end of file\n".encode() in got[b"outside"]
    assert "SECRET OUTSIDE" not in diff.text


def test_many_untracked_files_in_one_diff_each_match_git(make_repo: MakeRepo) -> None:
    repo = make_repo({"committed.txt": "c\n"})
    repo.write(UNTRACKED_CASES)
    got = patches(wdiff(repo))

    assert sorted(got) == sorted(name.encode() for name in UNTRACKED_CASES)
    assert list(got) == sorted(got)
    for name in UNTRACKED_CASES:
        assert got[name.encode()].decode("utf-8", "replace") == no_index(repo, name).decode("utf-8", "replace"), name


def test_byte_counts_are_those_of_the_text_sent(make_repo: MakeRepo) -> None:
    repo = make_repo({"tracked.txt": b"caf\xe9\n"})
    repo.write({"tracked.txt": b"caf\xe9 \xff\n", "new.txt": b"\xff\xfe\xfd\n" * 10, "ok.txt": "☃\n"})
    diff = wdiff(repo)
    sent = body(diff)

    assert f"files included: 3, bytes: {len(sent)}\n" in diff.text
    assert b"\xef\xbf\xbd" in sent  # U+FFFD, as UTF-8

    # The total limit is measured the same way: exactly the size of the text fits.
    assert wdiff(repo, limits(max_diff_bytes=len(sent))).included_files == 3
    assert wdiff(repo, limits(max_diff_bytes=len(sent) - 1)).included_files == 2


def test_new_file_patch_in_a_sha256_repository_matches_git(tmp_path: Path) -> None:
    repo = Repo(tmp_path / "sha256")
    repo.path.mkdir()
    repo.git("init", "-q", "--object-format=sha256", "-b", "main")
    repo.write({"tracked.txt": "t\n"})
    repo.commit_all("initial")
    repo.write({"new.txt": "hello\n", "empty": b"", "tracked.txt": "t2\n"})

    diff = wdiff(repo)
    got = patches(diff)

    assert len(repo.head()) == 64
    assert got[b"new.txt"] == no_index(repo, "new.txt")
    assert got[b"empty"] == no_index(repo, "empty")
    assert got[b"tracked.txt"] == porcelain_diff(repo, "HEAD", "--", "tracked.txt")


def test_new_file_patch_unit_cases() -> None:
    assert new_file_patch(b"a", b"", "100644", "sha1") == (
        "diff --git a/a b/a\nnew file mode 100644\nindex 0000000000000000000000000000000000000000.."
        "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391\n"
    )
    patch = new_file_patch(b"x y", b"1\n2", "100755", "sha1")
    assert patch.endswith("--- /dev/null\n+++ b/x y\t\n@@ -0,0 +1,2 @@\n+1\n+2\n\\ No newline at end of file\n")
    assert "new file mode 100755\n" in patch


# --- what is left out -----------------------------------------------------------------------------


def test_ignored_files_are_not_included(make_repo: MakeRepo) -> None:
    repo = make_repo({".gitignore": "*.log\nbuild/\n", "a.txt": "a\n"})
    (repo.path / ".git" / "info").mkdir(exist_ok=True)
    (repo.path / ".git" / "info" / "exclude").write_text("local-only.txt\n")
    repo.write(
        {"debug.log": "log\n", "build/out.o": "obj\n", "local-only.txt": "l\n", "sub/.gitignore": "x\n", "sub/x": "x\n"}
    )
    repo.write({"visible.txt": "v\n"})

    diff = wdiff(repo)

    assert list(patches(diff)) == [b"sub/.gitignore", b"visible.txt"]
    assert diff.left_out_files == 0
    for word in ("debug.log", "out.o", "local-only", "sub/x"):
        assert word not in diff.text


def test_ignored_but_tracked_file_changes_are_included(make_repo: MakeRepo) -> None:
    repo = make_repo({"keep.log": "1\n"})
    repo.write({".gitignore": "*.log\n"})
    repo.commit_all("ignore")
    repo.write({"keep.log": "2\n"})

    assert b"-1\n+2\n" in patches(wdiff(repo))[b"keep.log"]


def test_exclusions_apply_to_tracked_and_untracked_changes(make_repo: MakeRepo) -> None:
    repo = make_repo({"package-lock.json": "{}\n", "src/a.js": "a\n", "secrets/.env": "A=1\n", "gone.pem": "k\n"})
    repo.write(
        {
            "package-lock.json": '{"v": 2}\n',
            "secrets/.env": "A=2\n",
            "src/a.js": "b\n",
            "node_modules/lib/index.js": "lib\n",
            "dist/app.min.js": "min\n",
            "new.txt": "new\n",
            "notes.md": "n\n",
        }
    )
    (repo.path / "gone.pem").unlink()

    diff = wdiff(repo, limits(patterns=["*.md"]))

    assert list(patches(diff)) == [b"new.txt", b"src/a.js"]
    assert listing(diff, "changed files excluded by path pattern (6):") == [
        "dist/app.min.js",
        "gone.pem",
        "node_modules/lib/index.js",
        "notes.md",
        "package-lock.json",
        "secrets/.env",
    ]
    assert diff.included_files == 2 and diff.left_out_files == 6
    for word in ('"v": 2', "A=2", "+lib", "+min", "+n\n", "-k\n"):
        assert word not in diff.text

    reincluded = wdiff(repo, limits(patterns=["!package-lock.json"]))
    assert b'+{"v": 2}\n' in patches(reincluded)[b"package-lock.json"]

    no_defaults = wdiff(repo, limits(use_defaults=False))
    assert len(patches(no_defaults)) == 8 and "excluded" not in no_defaults.text


def test_per_file_limit_applies_to_tracked_and_untracked_changes(make_repo: MakeRepo) -> None:
    repo = make_repo({"grows.txt": "small\n", "was_big.txt": "B" * 200 + "\n", "deleted_big.txt": "D" * 200 + "\n"})
    repo.write(
        {
            "grows.txt": "G" * 101 + "\n",
            "was_big.txt": "now small\n",
            "exact.txt": "e" * 99 + "\n",
            "over.txt": "o" * 100 + "\n",
            "small.txt": "s\n",
        }
    )
    (repo.path / "deleted_big.txt").unlink()

    diff = wdiff(repo, limits(max_file_bytes=100))

    # A file of exactly the limit is in, even though its patch is longer than the limit.
    assert list(patches(diff)) == [b"exact.txt", b"small.txt"]
    assert len(patches(diff)[b"exact.txt"]) > 100
    assert listing(diff, "changed files over the per-file limit of 100 bytes (4):") == [
        "deleted_big.txt",
        "grows.txt",
        "over.txt",
        "was_big.txt",
    ]
    assert diff.left_out_files == 4
    for word in ("GGG", "BBB", "DDD", "ooo"):
        assert word not in diff.text


def test_over_total_limit_cuts_in_path_order_and_names_every_left_out_file(make_repo: MakeRepo) -> None:
    repo = make_repo({"b_tracked.txt": "old\n", "d_tracked.txt": "old\n"})
    repo.write(
        {
            "a_new.txt": "a\n" * 20,
            "b_tracked.txt": "new\n" * 20,
            "c_new.txt": "c\n" * 40,
            "d_tracked.txt": "tiny\n",
            "e_new.txt": "e\n",
            "f new.bin": b"\0",
        }
    )
    full = patches(wdiff(repo))
    assert list(full) == [b"a_new.txt", b"b_tracked.txt", b"c_new.txt", b"d_tracked.txt", b"e_new.txt", b"f new.bin"]
    budget = len(full[b"a_new.txt"]) + len(full[b"b_tracked.txt"]) + len(full[b"c_new.txt"]) - 1

    diff = wdiff(repo, limits(max_diff_bytes=budget))

    assert list(patches(diff)) == [b"a_new.txt", b"b_tracked.txt"]
    assert body(diff) == full[b"a_new.txt"] + full[b"b_tracked.txt"]
    assert listing(diff, f"changed files left out because the diff reached its limit of {budget} bytes") == [
        "c_new.txt",
        "d_tracked.txt",
        "e_new.txt",
        "f new.bin",
    ]
    assert "(every file from this one on, in path order)" in diff.text
    assert diff.included_files == 2 and diff.left_out_files == 4
    assert f"files included: 2, bytes: {budget + 1 - len(full[b'c_new.txt'])}\n" in diff.text

    exact = wdiff(repo, limits(max_diff_bytes=budget + 1))
    assert list(patches(exact)) == [b"a_new.txt", b"b_tracked.txt", b"c_new.txt"]
    assert listing(exact, "changed files left out because") == ["d_tracked.txt", "e_new.txt", "f new.bin"]


def test_total_limit_smaller_than_every_patch_leaves_all_out(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n"})
    repo.write({"a.txt": "b\n", "z.txt": "z\n"})
    diff = wdiff(repo, limits(max_diff_bytes=10))

    assert patches(diff) == {}
    assert listing(diff, "changed files left out because") == ["a.txt", "z.txt"]
    assert "files included: 0, bytes: 0\n" in diff.text
    assert not diff.text.startswith("The working tree is clean")


def test_nested_repository_is_listed_not_entered(make_repo: MakeRepo) -> None:
    outer = make_repo({"a.txt": "a\n"}, name="outer")
    Repo.create(outer.path / "vendor" / "inner", {"inner.txt": "INNER\n"}, commit=False)
    outer.write({"vendor/readme.txt": "r\n"})

    diff = wdiff(outer)

    assert list(patches(diff)) == [b"vendor/readme.txt"]
    assert listing(diff, "nested git repositories, not entered (1):") == ["vendor/inner"]
    assert "INNER" not in diff.text
    assert diff.left_out_files == 1


def test_submodule_changes_are_shown_as_commit_lines(make_repo: MakeRepo) -> None:
    inner = make_repo({"inner.txt": "1\n"}, name="inner")
    outer = make_repo({"a.txt": "a\n"}, name="outer")
    outer.git("submodule", "add", "-q", str(inner.path), "sub")
    outer.commit_all("submodule")
    old = Repo(outer.path / "sub").head()
    Repo(outer.path / "sub").write({"inner.txt": "2\n"})
    new = Repo(outer.path / "sub").commit_all("inner change")

    outer.git("config", "diff.ignoreSubmodules", "all")
    outer.git("config", "submodule.sub.ignore", "all")
    got = patches(wdiff(outer))

    assert list(got) == [b"sub"]
    assert f"-Subproject commit {old}\n+Subproject commit {new}\n".encode() in got[b"sub"]


# --- the repository is never written --------------------------------------------------------------


def test_serving_never_writes_to_the_git_directory(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "b.txt": "b\n", "package-lock.json": "{}\n", "big.txt": "x" * 300 + "\n"})
    repo.write({"a.txt": "changed\n", "untracked.txt": "u\n"})
    repo.write({"staged.txt": "s\n"})
    repo.git("add", "staged.txt")
    git_repo = GitRepo(str(repo.path))
    snapshot_limits = SnapshotLimits(1000, 1 << 20, PathFilter.build([], True))
    before = repo.git_dir_fingerprint()

    results = set()
    for round_ in range(3):
        os.utime(repo.path / "b.txt", ns=(2_000_000_000 + round_, 2_000_000_000 + round_))  # stat-dirty index
        os.utime(repo.path / "big.txt", ns=(2_000_000_000 + round_, 2_000_000_000 + round_))
        os.utime(repo.path / "package-lock.json", ns=(2_000_000_000 + round_, 2_000_000_000 + round_))
        commit = git_repo.head_commit()
        snapshot = build_snapshot(git_repo, commit, snapshot_limits)
        diff = build_working_diff(git_repo, commit, limits(max_file_bytes=100))
        results.add((snapshot.message_json, diff.message_json))

    assert repo.git_dir_fingerprint() == before
    assert len(results) == 1
    ((_, diff_json),) = results
    assert json.loads(diff_json)["content"].count("diff --git") == 3  # a.txt, staged.txt, untracked.txt
    assert "b.txt" not in json.loads(diff_json)["content"]


def _opened_work_tree_files(repo: Repo, action: Callable[[], object]) -> set[str]:
    """The work-tree files (not under .git) that anything opened while ``action`` ran, seen by inotify."""
    opened: set[str] = set()

    class Recorder(FileSystemEventHandler):
        def on_opened(self, event: FileSystemEvent) -> None:
            path = os.fsdecode(event.src_path)
            if "/.git/" not in path:
                opened.add(os.path.relpath(path, repo.path))

    observer = InotifyObserver()
    observer.schedule(Recorder(), str(repo.path), recursive=True, event_filter=[FileOpenedEvent])
    observer.start()
    try:
        action()
        time.sleep(0.3)  # let the last events arrive
    finally:
        observer.stop()
        observer.join(timeout=5)
    return opened


def test_racily_clean_files_are_read_once_then_never_again(make_repo: MakeRepo) -> None:
    """Files written in the same second as the index: git must hash them on every diff-index unless
    the index is refreshed, which a reader may not do to .git/index (a private copy is refreshed)."""
    repo = make_repo({f"src/m{i:02}.py": f"value = {i}\n" for i in range(40)})
    index = repo.path / ".git" / "index"
    newest = max((repo.path / "src" / f"m{i:02}.py").stat().st_mtime_ns for i in range(40))
    os.utime(index, ns=(newest, newest))  # every entry racily clean, whatever the clock did
    before = repo.git_dir_fingerprint()
    git_repo = GitRepo(str(repo.path))
    commit = git_repo.head_commit()
    assert commit is not None

    def read_then_read_a_second_later() -> None:
        build_working_diff(git_repo, commit, limits())
        time.sleep(1.1)  # the copy made in the same second as the files: racy too, until refreshed again
        build_working_diff(git_repo, commit, limits())

    first = _opened_work_tree_files(repo, read_then_read_a_second_later)
    repo.write({"src/m07.py": "value = 'edited'\n"})
    later = _opened_work_tree_files(repo, lambda: [build_working_diff(git_repo, commit, limits()) for _ in range(3)])

    assert len(first) >= 39  # the refresh read them (git's own check; this proves the test can fail)
    assert later == {"src/m07.py"}, later
    assert b"+value = 'edited'" in body(build_working_diff(git_repo, commit, limits()))
    assert repo.git_dir_fingerprint() == before


def test_a_same_size_edit_in_the_second_the_index_was_written_is_seen_later_too(make_repo: MakeRepo) -> None:
    """git re-reads a file whose mtime is not older than the index (it may have changed unseen): the
    private copy must keep the index's mtime, or the edit passes as clean by its stat data."""
    repo = make_repo({"a.txt": "a\n"})
    committed = (repo.path / "a.txt").stat()
    repo.write({"a.txt": "b\n"})  # same size; mtime set back to what the index recorded
    os.utime(repo.path / "a.txt", ns=(committed.st_atime_ns, committed.st_mtime_ns))
    os.utime(repo.path / ".git" / "index", ns=(committed.st_mtime_ns, committed.st_mtime_ns))
    time.sleep(1.05 - time.time() % 1)  # the copy is made in a later second than the index's mtime
    assert "a.txt" in repo.git("diff-index", "--name-only", "HEAD")  # git itself sees it (racy check)

    assert b"+b\n" in body(wdiff(repo))


def test_a_long_lived_reader_sees_what_a_fresh_one_sees_as_the_user_changes_the_index(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "b.txt": "b\n", "c.txt": "c\n"})
    long_lived = GitRepo(str(repo.path))

    def same_as_fresh() -> str:
        commit = long_lived.head_commit()
        seen = build_working_diff(long_lived, commit, limits()).text
        assert seen == build_working_diff(GitRepo(str(repo.path)), commit, limits()).text
        return seen

    steps: list[Callable[[], object]] = [
        lambda: repo.write({"a.txt": "a edited\n", "new.txt": "new\n"}),
        lambda: repo.git("add", "new.txt"),
        lambda: repo.git("rm", "-q", "--cached", "b.txt"),
        lambda: repo.git("add", "-A"),
        lambda: repo.git("commit", "-q", "-m", "second"),
        lambda: repo.write({"c.txt": "c edited\n"}),
        lambda: repo.git("reset", "-q", "--hard", "HEAD~1"),
        lambda: repo.write({"c.txt": "C\n"}),  # same size as the committed "c\n"
    ]
    seen = [same_as_fresh()]
    for step in steps:
        step()
        seen.append(same_as_fresh())
    assert "new.txt" in seen[2] and "a edited" in seen[4]
    assert "c edited" in seen[6] and "c edited" not in seen[7] and "+C" in seen[8]


# --- repository states ----------------------------------------------------------------------------


def test_unborn_head_shows_staged_and_untracked_files_as_new(make_repo: MakeRepo) -> None:
    repo = make_repo({"staged.txt": "staged\n", "sp ace.txt": "s\n"}, commit=False)
    repo.git("add", "staged.txt", "sp ace.txt")
    repo.write({"untracked.txt": "untracked\n", "staged.txt": "staged\nthen edited\n"})
    git_repo = GitRepo(str(repo.path))

    assert git_repo.head_commit() is None
    diff = build_working_diff(git_repo, None, limits())
    got = patches(diff)

    assert diff.commit is None
    assert "against an empty repository (no commits yet):" in diff.text
    assert list(got) == [b"sp ace.txt", b"staged.txt", b"untracked.txt"]
    for name in ("sp ace.txt", "staged.txt", "untracked.txt"):
        assert got[name.encode()] == no_index(repo, name), name


def test_unborn_head_with_nothing_is_clean(make_repo: MakeRepo) -> None:
    repo = make_repo(commit=False)
    diff = build_working_diff(GitRepo(str(repo.path)), None, limits())
    assert (
        diff.text == "The working tree is clean: no uncommitted changes against an empty repository (no commits yet).\n"
    )


def test_detached_head(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "v1\n"})
    first = repo.head()
    repo.write({"a.txt": "v2\n"})
    repo.commit_all("second")
    repo.git("checkout", "-q", "--detach", first)
    repo.write({"a.txt": "v1 edited\n"})
    git_repo = GitRepo(str(repo.path))

    assert git_repo.head_commit() == first
    diff = build_working_diff(git_repo, first, limits())
    assert b"-v1\n+v1 edited\n" in patches(diff)[b"a.txt"]
    assert "in progress" not in diff.text


def test_merge_in_progress(make_repo: MakeRepo) -> None:
    repo = make_repo({"f.txt": "base\n", "other.txt": "o\n"})
    repo.git("checkout", "-q", "-b", "other")
    repo.write({"f.txt": "theirs\n", "other.txt": "o2\n"})
    repo.commit_all("theirs")
    repo.git("checkout", "-q", "main")
    repo.write({"f.txt": "mine\n"})
    repo.commit_all("mine")
    repo.git("merge", "-q", "other", check=False)
    assert (repo.path / ".git" / "MERGE_HEAD").exists()

    diff = wdiff(repo)
    got = patches(diff)

    assert "Note: a merge is in progress in this repository.\n" in diff.text
    assert b"+<<<<<<< HEAD\n mine\n+=======\n+theirs\n+>>>>>>> other\n" in got[b"f.txt"]
    assert b"-o\n+o2\n" in got[b"other.txt"]


def test_rebase_in_progress(make_repo: MakeRepo) -> None:
    repo = make_repo({"f.txt": "base\n"})
    repo.git("checkout", "-q", "-b", "topic")
    repo.write({"f.txt": "topic\n"})
    repo.commit_all("topic")
    repo.git("checkout", "-q", "main")
    repo.write({"f.txt": "main\n"})
    repo.commit_all("main")
    repo.git("checkout", "-q", "topic")
    repo.git("rebase", "main", check=False)

    git_repo = GitRepo(str(repo.path))
    diff = build_working_diff(git_repo, git_repo.head_commit(), limits())

    assert "Note: a rebase is in progress in this repository.\n" in diff.text
    assert b"+=======\n" in patches(diff)[b"f.txt"]


def test_linked_worktree(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = make_repo({"a.txt": "main\n"})
    worktree = tmp_path / "wt"
    repo.git("worktree", "add", "-q", "-b", "feature", str(worktree))
    wt = Repo(worktree)
    wt.write({"a.txt": "feature\n"})
    feature = wt.commit_all("feature")
    wt.write({"a.txt": "feature edited\n", "wt-new.txt": "n\n"})
    repo.write({"main-new.txt": "m\n"})

    git_repo = GitRepo(str(worktree))
    assert git_repo.toplevel == worktree
    assert git_repo.head_commit() == feature != repo.head()
    snapshot = build_snapshot(git_repo, feature, SnapshotLimits(1000, 1 << 20, PathFilter.build([], True)))
    diff = build_working_diff(git_repo, feature, limits())

    assert '<file path="a.txt">\nfeature\n</file>\n' in snapshot.text
    assert list(patches(diff)) == [b"a.txt", b"wt-new.txt"]
    assert b"-feature\n+feature edited\n" in patches(diff)[b"a.txt"]
    assert list(patches(wdiff(repo))) == [b"main-new.txt"]


def test_opened_from_a_subdirectory_shows_the_whole_tree(make_repo: MakeRepo) -> None:
    repo = make_repo({"top.txt": "t\n", "sub/inner.txt": "i\n"})
    repo.write({"top.txt": "t2\n", "sub/inner.txt": "i2\n", "new-top.txt": "n\n", "sub/new-inner.txt": "n\n"})

    diff = wdiff(repo.path / "sub")

    assert list(patches(diff)) == [b"new-top.txt", b"sub/inner.txt", b"sub/new-inner.txt", b"top.txt"]


def test_user_git_config_does_not_change_the_output(make_repo: MakeRepo) -> None:
    repo = make_repo({"é.txt": "1\n", "a b.txt": "x\n"})
    repo.write({"é.txt": "2\n", "a b.txt": "y\n", "new é.txt": "n\n"})
    plain = wdiff(repo)
    for key, value in (
        ("diff.noprefix", "true"),
        ("diff.mnemonicPrefix", "true"),
        ("color.ui", "always"),
        ("color.diff", "always"),
        ("core.quotePath", "true"),
        ("diff.external", "/bin/false"),
        ("diff.context", "0"),
        ("diff.relative", "true"),
        ("diff.algorithm", "patience"),
        ("diff.renames", "copies"),
    ):
        repo.git("config", key, value)

    configured = wdiff(repo)

    assert configured.text == plain.text
    assert b"diff --git a/\xc3\xa9.txt b/\xc3\xa9.txt\n" in patches(configured)[("é.txt").encode()]
    assert "\x1b[" not in configured.text


def test_environment_git_dir_does_not_redirect_reads(make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo({"mine.txt": "1\n"}, name="mine")
    other = make_repo({"other.txt": "1\n"}, name="other")
    repo.write({"mine.txt": "2\n"})
    git_repo = GitRepo(str(repo.path))
    head = repo.head()
    monkeypatch.setenv("GIT_DIR", str(other.path / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other.path))
    monkeypatch.setenv("GIT_INDEX_FILE", str(other.path / ".git" / "index"))

    diff = build_working_diff(git_repo, git_repo.head_commit(), limits())

    assert git_repo.head_commit() == head
    assert list(patches(diff)) == [b"mine.txt"]


# --- patch parsing helpers ------------------------------------------------------------------------


ODD_NAMES = [
    b"plain.txt",
    b"with space",
    b"a b/c d",
    b"x b/x",
    b'quo"te',
    b'q" b',
    b'" b/"',
    b'a" "b',
    b"back\\slash",
    b"tab\tname",
    b"new\nline",
    b"\xc3\xbcn\xc3\xafc\xc3\xb6d\xc3\xa9",
    b"ctrl\x01\x1f\x7f",
    b"del\x7f",
    b"bell\x07bs\x08vt\x0bff\x0ccr\r",
    b"trailing ",
    b"diff --git a",
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=repr)
def test_quote_helpers_round_trip(name: bytes) -> None:
    quoted = git_quote(b"b/" + name)
    if quoted.startswith('"'):
        assert git_unquote(quoted[1:-1].encode()) == b"b/" + name
    else:
        assert quoted.encode() == b"b/" + name
    header = f"diff --git {git_quote(b'a/' + name)} {quoted}".encode()
    assert patch_path(header) == name


def test_git_quote_matches_git_itself(make_repo: MakeRepo) -> None:
    repo = make_repo({os.fsdecode(name): "x\n" for name in ODD_NAMES})
    listed = git_bytes(repo, "-c", "core.quotePath=false", "ls-files").decode().splitlines()

    assert sorted(listed) == sorted(git_quote(name) for name in ODD_NAMES)


def test_split_patch_finds_every_odd_name_in_real_git_output(make_repo: MakeRepo) -> None:
    repo = make_repo({os.fsdecode(name): "before\n" for name in ODD_NAMES})
    repo.write({os.fsdecode(name): "after\n" for name in ODD_NAMES})
    repo.write({"plain.txt": "diff --git a/fake b/fake\n"})

    diff = wdiff(repo)
    got = patches(diff)

    assert list(got) == sorted(ODD_NAMES)
    for name, chunk in got.items():
        assert chunk.startswith(b"diff --git ")
        if name != b"plain.txt":
            assert chunk.endswith(b"-before\n+after\n")
    assert body(diff) == porcelain_diff(repo, "HEAD")


def test_over_total_listing_names_odd_tracked_paths_correctly(make_repo: MakeRepo) -> None:
    names = [b'q" b', b"tab\tname", b"z plain"]
    repo = make_repo({os.fsdecode(name): "before\n" for name in names})
    repo.write({os.fsdecode(name): "after\n" for name in names})

    diff = wdiff(repo, limits(max_diff_bytes=10))

    assert listing(diff, "changed files left out because") == ['"q\\" b"', '"tab\\tname"', "z plain"]


def test_split_patch_edge_cases() -> None:
    assert list(split_patch(b"")) == []
    one = b"diff --git a/x b/x\nindex 1..2\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-diff --git a/y b/y\n+z\n"
    two = b"diff --git a/y y b/y y\nnew file mode 100644\n"
    assert list(split_patch(one + two)) == [(b"x", one), (b"y y", two)]
    assert list(split_patch(b"diff --git a/only b/only")) == [(b"only", b"diff --git a/only b/only")]


def test_a_staged_excluded_file_where_a_tracked_file_was_stays_out(make_repo: Callable[..., Repo]) -> None:
    """A pathspec for 'conf' also matches 'conf/.env': only the paths asked for may be kept."""
    repo = make_repo({"conf": "plain = 1\n", "a.txt": "a\n"})
    (repo.path / "conf").unlink()
    (repo.path / "conf").mkdir()
    (repo.path / "conf" / ".env").write_text("SECRET=hunter2\n")
    repo.git("add", "-A")
    diff = wdiff(repo)
    assert "hunter2" not in diff.text
    assert set(patches(diff)) == {b"conf"}
    assert "conf/.env" in info(diff)


def test_the_working_diff_asks_git_without_a_pathspec(
    make_repo: MakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """git 2.39 spends time per index entry on a pathspec: one path took 24-26 s on a 100k-file index
    (0.07 s without). Paths are chosen from git's whole answer instead."""
    repo = make_repo({"a.txt": "a\n", "package-lock.json": "{}\n", "z.txt": "z\n"})
    repo.write({"a.txt": "b\n", "package-lock.json": '{"x": 1}\n', "new.txt": "n\n"})
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    diff = wdiff(repo)
    monkeypatch.delenv("GIT_TRACE")

    diff_index = [command for command in git_processes(trace) if " diff-index " in command]
    assert len(diff_index) == 1 and diff_index[0].endswith(" --"), diff_index
    assert list(patches(diff)) == [b"a.txt", b"new.txt"]
    assert listing(diff, "changed files excluded by path pattern") == ["package-lock.json"]
