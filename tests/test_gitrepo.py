"""GitRepo: opening, errors, and the read-only plumbing it wraps, on real repositories."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from scout_diff_cache.context.snapshot import SnapshotLimits, build_snapshot
from scout_diff_cache.context.workdiff import DiffLimits, build_working_diff
from scout_diff_cache.git import blobs
from scout_diff_cache.git.errors import GitError
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import EMPTY_TREE_SHA1, EMPTY_TREE_SHA256, GitRepo, read_all
from support import Repo

MakeRepo = Callable[..., Repo]

SNAPSHOT_LIMITS = SnapshotLimits(1 << 20, 1 << 26, PathFilter.build([], True))
DIFF_LIMITS = DiffLimits(1 << 20, 1 << 24, PathFilter.build([], True))


# --- opening --------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(GitError, match=f"^{missing} does not exist$"):
        GitRepo(str(missing))


def test_directory_outside_any_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitError, match=f"^{plain} is not inside a git repository$"):
        GitRepo(str(plain))


def test_bare_repository(tmp_path: Path) -> None:
    bare = Repo(tmp_path / "bare.git")
    bare.path.mkdir()
    bare.git("init", "-q", "--bare")
    with pytest.raises(GitError, match="is a bare repository; point GIT_REPO_PATH at a work tree"):
        GitRepo(str(bare.path))


def test_subdirectory_opens_the_work_tree_root(make_repo: MakeRepo) -> None:
    repo = make_repo({"a/b/c.txt": "c\n", "top.txt": "t\n"})
    git_repo = GitRepo(str(repo.path / "a" / "b"))

    assert git_repo.toplevel == repo.path
    assert git_repo.git_dir == repo.path / ".git"
    assert git_repo.head_commit() == repo.head()
    assert [e.path for e in git_repo.ls_tree(repo.head())] == [b"a/b/c.txt", b"top.txt"]


def test_object_format_and_empty_tree(make_repo: MakeRepo, tmp_path: Path) -> None:
    sha1 = GitRepo(str(make_repo({"a": "a\n"}).path))
    assert (sha1.object_format, sha1.empty_tree) == ("sha1", EMPTY_TREE_SHA1)

    repo256 = Repo(tmp_path / "r256")
    repo256.path.mkdir()
    repo256.git("init", "-q", "--object-format=sha256")
    sha256 = GitRepo(str(repo256.path))
    assert (sha256.object_format, sha256.empty_tree) == ("sha256", EMPTY_TREE_SHA256)
    assert repo256.git("hash-object", "-t", "tree", "/dev/null").strip() == EMPTY_TREE_SHA256


# --- HEAD -----------------------------------------------------------------------------------------


def test_head_commit_on_a_branch_detached_and_unborn(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "1\n"})
    first = repo.head()
    repo.write({"a": "2\n"})
    second = repo.commit_all("second")
    git_repo = GitRepo(str(repo.path))
    assert git_repo.head_commit() == second

    repo.git("checkout", "-q", "--detach", first)
    assert git_repo.head_commit() == first

    repo.git("checkout", "-q", "--orphan", "fresh")
    assert git_repo.head_commit() is None

    empty = make_repo(commit=False)
    assert GitRepo(str(empty.path)).head_commit() is None


def test_head_commit_follows_packed_refs(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "1\n"})
    repo.git("pack-refs", "--all")
    assert not (repo.path / ".git" / "refs" / "heads" / "main").exists()
    assert GitRepo(str(repo.path)).head_commit() == repo.head()


def test_head_pointing_at_a_tag_object_resolves_to_the_commit(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "1\n"})
    repo.git("tag", "-a", "-m", "tag", "v1")
    tag_object = repo.git("rev-parse", "v1").strip()
    (repo.path / ".git" / "HEAD").write_text(f"{tag_object}\n")

    assert GitRepo(str(repo.path)).head_commit() == repo.git("rev-parse", "v1^{commit}").strip() != tag_object


def test_head_on_a_broken_branch_raises(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "1\n"})
    blob = repo.git("rev-parse", "HEAD:a").strip()
    (repo.path / ".git" / "refs" / "heads" / "main").write_text(f"{blob}\n")

    with pytest.raises(GitError, match="does not point to a commit"):
        GitRepo(str(repo.path)).head_commit()


# --- plumbing -------------------------------------------------------------------------------------


def test_ls_tree_lists_every_entry_with_kind_and_size(make_repo: MakeRepo) -> None:
    inner = make_repo({"i": "i\n"}, name="inner")
    repo = make_repo({"dir/file.txt": "hello\n", "tab\tand\nnewline": "x", "empty": ""}, name="outer")
    os.symlink("dir/file.txt", repo.path / "link")
    (repo.path / "run.sh").write_text("#!/bin/sh\n")
    (repo.path / "run.sh").chmod(0o755)
    repo.git("submodule", "add", "-q", str(inner.path), "sub")
    commit = repo.commit_all("more")

    entries = {e.path: e for e in GitRepo(str(repo.path)).ls_tree(commit)}

    assert sorted(entries) == [
        b".gitmodules",
        b"dir/file.txt",
        b"empty",
        b"link",
        b"run.sh",
        b"sub",
        b"tab\tand\nnewline",
    ]
    assert (entries[b"dir/file.txt"].mode, entries[b"dir/file.txt"].kind, entries[b"dir/file.txt"].size) == (
        "100644",
        "blob",
        6,
    )
    assert entries[b"dir/file.txt"].oid == repo.git("rev-parse", "HEAD:dir/file.txt").strip()
    assert (entries[b"link"].mode, entries[b"link"].size) == ("120000", len("dir/file.txt"))
    assert entries[b"run.sh"].mode == "100755"
    assert (entries[b"sub"].kind, entries[b"sub"].size, entries[b"sub"].oid) == ("commit", None, inner.head())
    assert (entries[b"empty"].size, entries[b"tab\tand\nnewline"].size) == (0, 1)


def test_read_blobs_returns_contents_in_order(make_repo: MakeRepo) -> None:
    big = os.urandom(3 << 20)
    repo = make_repo({"a": "alpha\n", "b": b"", "c": big, "d": b"\0\n\n"})
    git_repo = GitRepo(str(repo.path))
    oid = {e.path: e.oid for e in git_repo.ls_tree(repo.head())}

    order = [oid[b"d"], oid[b"c"], oid[b"a"], oid[b"b"], oid[b"a"], oid[b"c"]]
    assert list(git_repo.read_blobs(order)) == [b"\0\n\n", big, b"alpha\n", b"", b"alpha\n", big]
    assert list(git_repo.read_blobs([])) == []


def test_read_blobs_many_objects_and_early_stop(make_repo: MakeRepo) -> None:
    repo = make_repo({f"f{i:02d}": f"{i}\n" * 500 for i in range(40)})
    git_repo = GitRepo(str(repo.path))
    oids = [e.oid for e in git_repo.ls_tree(repo.head())] * 100  # requests and replies both overflow a pipe

    blobs = list(git_repo.read_blobs(oids))
    assert len(blobs) == 4000
    assert [b.decode().split("\n", 1)[0] for b in blobs] == [str(i) for i in range(40)] * 100

    reader = git_repo.read_blobs(oids)
    assert next(reader) == b"0\n" * 500
    reader.close()  # stops the cat-file process; must not hang


def test_read_blobs_missing_object_raises(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "a\n"})
    git_repo = GitRepo(str(repo.path))
    oid = git_repo.ls_tree(repo.head())[0].oid

    reader = git_repo.read_blobs([oid, "1" * 40])
    assert next(reader) == b"a\n"
    with pytest.raises(GitError, match="could not read object 1111111111111111111111111111111111111111"):
        next(reader)


def test_blob_sizes(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "12345", "b": ""})
    git_repo = GitRepo(str(repo.path))
    oid = {e.path: e.oid for e in git_repo.ls_tree(repo.head())}

    assert git_repo.blob_sizes([oid[b"a"], oid[b"b"], "2" * 40]) == {oid[b"a"]: 5, oid[b"b"]: 0}
    assert git_repo.blob_sizes([]) == {}


def test_changed_paths_reports_every_kind_of_change(make_repo: MakeRepo) -> None:
    repo = make_repo({"mod": "1\n", "del": "d\n", "mode": "m\n", "touched": "t\n", "typechange": "f\n"})
    repo.write({"mod": "2\n", "added": "new\n", "untracked": "u\n"})
    repo.git("add", "added")
    (repo.path / "del").unlink()
    (repo.path / "mode").chmod(0o755)
    os.utime(repo.path / "touched", ns=(10**9, 10**9))
    (repo.path / "typechange").unlink()
    os.symlink("mod", repo.path / "typechange")

    git_repo = GitRepo(str(repo.path))
    git_repo.renew_index()
    changes = {c.path: c for c in git_repo.working_changes(repo.head(), 1 << 20)[0]}

    assert sorted(changes) == [b"added", b"del", b"mod", b"mode", b"touched", b"typechange"]
    assert {p: c.status for p, c in changes.items()} == {
        b"added": "A",
        b"del": "D",
        b"mod": "M",
        b"mode": "M",
        b"touched": "M",
        b"typechange": "T",
    }
    assert (changes[b"mode"].old_mode, changes[b"mode"].new_mode) == ("100644", "100755")
    assert changes[b"typechange"].new_mode == "120000"
    assert changes[b"touched"].new_oid == "0" * 40
    assert changes[b"touched"].old_oid == repo.git("rev-parse", "HEAD:touched").strip()


def test_untracked_paths(make_repo: MakeRepo) -> None:
    repo = make_repo({".gitignore": "*.log\n", "sub/tracked": "t\n"})
    repo.write({"a.log": "x", "top": "x", "sub/new file": "x", "sub/deeper/x": "x", "tab\tname": "x"})
    Repo.create(repo.path / "nested", {"n": "n"})

    from_sub = GitRepo(str(repo.path / "sub")).untracked_paths()

    assert sorted(from_sub) == [b"nested/", b"sub/deeper/x", b"sub/new file", b"tab\tname", b"top"]


def test_command_failure_names_the_command(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "a\n"})
    with pytest.raises(GitError, match=r"^git ls-tree failed in .*: fatal: not a tree object"):
        GitRepo(str(repo.path)).ls_tree("0" * 40)


# --- the repository goes away ---------------------------------------------------------------------


def every_operation(git_repo: GitRepo, commit: str, oid: str) -> list[Callable[[], object]]:
    return [
        git_repo.head_commit,
        lambda: git_repo.ls_tree(commit, sizes=False),  # with sizes, the last trees read are kept (immutable)
        lambda: list(git_repo.read_blobs([oid])),
        lambda: git_repo.blob_sizes([oid]),
        lambda: git_repo.working_changes(commit, 1 << 20),
        git_repo.untracked_paths,
        lambda: build_snapshot(git_repo, commit, SNAPSHOT_LIMITS),
        lambda: build_working_diff(git_repo, commit, DIFF_LIMITS),
    ]


def test_every_operation_raises_git_error_after_the_directory_is_deleted(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "a\n"})
    git_repo = GitRepo(str(repo.path))
    commit, oid = repo.head(), git_repo.ls_tree(repo.head())[0].oid
    shutil.rmtree(repo.path)

    for operation in every_operation(git_repo, commit, oid):
        with pytest.raises(GitError, match="no longer exists"):
            operation()


def test_every_operation_raises_git_error_when_the_directory_became_a_file(make_repo: MakeRepo) -> None:
    repo = make_repo({"a": "a\n"})
    git_repo = GitRepo(str(repo.path))
    commit, oid = repo.head(), git_repo.ls_tree(repo.head())[0].oid
    shutil.rmtree(repo.path)
    repo.path.write_text("not a directory any more\n")

    for operation in every_operation(git_repo, commit, oid):
        with pytest.raises(GitError, match="no longer a directory"):
            operation()


def test_a_deleted_git_dir_fails_instead_of_finding_an_enclosing_repository(make_repo: MakeRepo) -> None:
    outer = make_repo({"outer.txt": "outer\n"}, name="outer")
    inner = Repo.create(outer.path / "inner", {"inner.txt": "inner\n"})
    git_repo = GitRepo(str(inner.path))
    commit, oid = inner.head(), git_repo.ls_tree(inner.head())[0].oid
    shutil.rmtree(inner.path / ".git")

    for operation in every_operation(git_repo, commit, oid):
        with pytest.raises(GitError):
            operation()


def _git_children(repo: Repo) -> list[int]:
    """git processes this test process started in ``repo`` that are still running."""
    children = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "git" and Path(f"/proc/{pid}/cwd").resolve() == repo.path.resolve():
                        children.append(int(pid))
    return children


def test_many_blobs_come_in_order_and_an_early_close_or_a_bad_object_stops_every_reader(make_repo: MakeRepo) -> None:
    files = {f"d{i % 9}/f{i:04d}.txt": f"content {i}\n" * (i % 7 + 1) for i in range(700)}
    repo = make_repo(files)
    git_repo = GitRepo(str(repo.path))
    entries = [entry for entry in git_repo.ls_tree(repo.head()) if entry.kind == "blob"]
    oids = [entry.oid for entry in entries]
    assert len(oids) >= 2 * blobs.PARALLEL_MIN_OBJECTS  # read by two processes

    assert read_all(git_repo, oids) == [files[entry.path.decode()].encode() for entry in entries]

    reader = git_repo.read_blobs(oids)
    assert next(reader) == files[entries[0].path.decode()].encode()
    assert len(_git_children(repo)) == 2  # both processes run from the start
    reader.close()
    assert _git_children(repo) == []

    missing = [*oids[:600], "0" * 40, *oids[600:]]
    with pytest.raises(GitError, match="could not read object 0000000000"):
        read_all(git_repo, missing)
    assert _git_children(repo) == []
