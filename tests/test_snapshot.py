"""The codebase snapshot: real repositories in temp dirs, read through GitRepo and build_snapshot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from scout_diff_cache.context.snapshot import (
    PREAMBLE,
    Snapshot,
    SnapshotLimits,
    build_snapshot,
    file_block,
    symlink_block,
)
from scout_diff_cache.git.errors import GitError
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.repo import GitRepo
from support import ROOT, Repo, listed_items

MakeRepo = Callable[..., Repo]

FILE_HEADER = re.compile(r'^<file path=("(?:[^"\\]|\\.)*")>$', re.MULTILINE)


def limits(
    max_file_bytes: int = 1 << 20,
    max_snapshot_bytes: int = 1 << 26,
    patterns: Sequence[str] = (),
    use_defaults: bool = True,
) -> SnapshotLimits:
    return SnapshotLimits(max_file_bytes, max_snapshot_bytes, PathFilter.build(patterns, use_defaults))


def snap(repo: Repo, lim: SnapshotLimits | None = None) -> Snapshot:
    git_repo = GitRepo(str(repo.path))
    return build_snapshot(git_repo, git_repo.head_commit(), lim or limits())


def file_paths(text: str) -> list[str]:
    """The path of every <file> block, in the order they appear (the preamble's example is not one)."""
    assert text.startswith(PREAMBLE)
    return [json.loads(m.group(1)) for m in FILE_HEADER.finditer(text, len(PREAMBLE))]


def footer(text: str) -> str:
    return text[text.index("<snapshot_info>") :]


def section(text: str, title_start: str) -> list[str]:
    """The items of the footer listing whose title starts with title_start."""
    return listed_items(footer(text), title_start)


# --- where the content comes from -----------------------------------------------------------------


def test_files_are_read_from_the_commit_not_the_working_tree(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "committed\n", "b.txt": "also committed\n"})
    repo.write({"a.txt": "edited in the working tree\n", "new.txt": "untracked\n"})
    (repo.path / "b.txt").unlink()
    repo.git("add", "a.txt")  # staged, still not committed

    text = snap(repo).text

    assert '<file path="a.txt">\ncommitted\n</file>\n' in text
    assert '<file path="b.txt">\nalso committed\n</file>\n' in text
    assert "edited in the working tree" not in text
    assert "new.txt" not in text


def test_snapshot_follows_the_commit_it_is_given(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "one\n"})
    first = repo.head()
    repo.write({"a.txt": "two\n"})
    second = repo.commit_all("second")
    git_repo = GitRepo(str(repo.path))

    old = build_snapshot(git_repo, first, limits())
    new = build_snapshot(git_repo, second, limits())

    assert old.commit == first and new.commit == second
    assert '<file path="a.txt">\none\n</file>' in old.text and "two" not in old.text
    assert '<file path="a.txt">\ntwo\n</file>' in new.text


def test_layout_is_preamble_blocks_then_footer(make_repo: MakeRepo) -> None:
    repo = make_repo({"x.py": "print(1)\n", "README": "hi\n"})
    snapshot = snap(repo)

    expected = (
        PREAMBLE
        + '<file path="README">\nhi\n</file>\n'
        + '<file path="x.py">\nprint(1)\n</file>\n'
        + "<snapshot_info>\n"
        + f"commit: {repo.head()}\n"
        + f"files included: 2, symbolic links: 0, bytes: {32 + 36}\n"
        + "</snapshot_info>\n"
    )
    assert len(file_block(b"README", b"hi\n")) == 32 and len(file_block(b"x.py", b"print(1)\n")) == 36
    assert snapshot.text == expected
    assert snapshot.file_count == 2 and snapshot.symlink_count == 0 and snapshot.skipped_count == 0


def test_message_json_is_a_system_message_holding_the_text(make_repo: MakeRepo) -> None:
    repo = make_repo({"ü.txt": 'quotes " and \\ and\ttabs, naïve ☃\n'})
    snapshot = snap(repo)

    assert json.loads(snapshot.message_json) == {"role": "system", "content": snapshot.text}
    assert list(json.loads(snapshot.message_json)) == ["role", "content"]
    assert "☃".encode() in snapshot.message_json  # UTF-8, not \u escapes
    assert snapshot.size == len(snapshot.message_json)


# --- order ----------------------------------------------------------------------------------------


def test_files_appear_in_bytewise_path_order(make_repo: MakeRepo) -> None:
    names = ["a.txt", "B.txt", "a.b", "a/c", "a0", "é.txt", "z.txt", "Z/y", "a-b", "ä/x", "_u", "~t"]
    repo = make_repo({name: f"{name}\n" for name in names})

    order = file_paths(snap(repo).text)

    assert order == sorted(names, key=lambda n: n.encode())
    assert order[:2] == ["B.txt", "Z/y"]
    assert order.index("a.b") < order.index("a/c") < order.index("a0")
    assert order[-3:] == ["~t", "ä/x", "é.txt"]


# --- content rendering ----------------------------------------------------------------------------


def test_binary_files_are_skipped_and_listed(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {
            "image.png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
            "late_nul.txt": b"x" * 7999 + b"\0tail",
            "after_8000.txt": b"y" * 8000 + b"\0tail\n",
            "plain.txt": "plain\n",
        }
    )
    snapshot = snap(repo)

    assert file_paths(snapshot.text) == ["after_8000.txt", "plain.txt"]
    assert section(snapshot.text, "binary files, not included") == [
        "image.png (16 bytes)",
        "late_nul.txt (8004 bytes)",
    ]
    assert "binary files, not included (2):" in snapshot.text
    assert "y" * 8000 + "\0tail\n</file>" in snapshot.text
    assert snapshot.file_count == 2 and snapshot.skipped_count == 2


def test_invalid_utf8_decodes_with_replacement_characters(make_repo: MakeRepo) -> None:
    repo = make_repo({"latin1.txt": b"caf\xe9 \xff\xfe ok\n", "cut.txt": b"snow \xe2\x98\n"})
    text = snap(repo).text

    assert '<file path="latin1.txt">\ncaf\ufffd \ufffd\ufffd ok\n</file>\n' in text
    assert '<file path="cut.txt">\nsnow \ufffd\n</file>\n' in text
    assert snap(repo).text == text


def test_crlf_empty_and_missing_final_newline(make_repo: MakeRepo) -> None:
    repo = make_repo({"crlf.txt": b"one\r\ntwo\r\n", "empty.txt": b"", "nonl.txt": b"no newline", "cr.txt": b"a\rb"})
    text = snap(repo).text

    assert '<file path="crlf.txt">\none\r\ntwo\r\n</file>\n' in text
    assert '<file path="empty.txt">\n</file>\n' in text
    assert '<file path="nonl.txt">\nno newline\n</file>\n' in text
    assert '<file path="cr.txt">\na\rb\n</file>\n' in text
    assert snap(repo).file_count == 4


def test_crlf_is_preserved_even_with_autocrlf_and_eol_attributes(make_repo: MakeRepo) -> None:
    repo = make_repo({".gitattributes": "*.txt eol=lf\n"})
    repo.git("config", "core.autocrlf", "false")
    repo.write({"w.txt": b"win\r\n"})
    repo.git("add", "--renormalize", ".")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "w")
    blob = subprocess.run(["git", "cat-file", "-p", "HEAD:w.txt"], cwd=repo.path, capture_output=True, check=True)
    repo.git("config", "core.autocrlf", "true")

    # Whatever git stored is what the snapshot shows; attributes do not change it on the way out.
    assert f'<file path="w.txt">\n{blob.stdout.decode()}</file>\n' in snap(repo).text


def test_attributes_and_filters_do_not_change_the_content(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {
            ".gitattributes": "*.txt filter=shout\nsubst.txt export-subst\nhidden.txt export-ignore\n",
            "hello.txt": "hello\n",
            "subst.txt": "$Format:%H$\n",
            "hidden.txt": "still here\n",
        }
    )
    repo.git("config", "filter.shout.smudge", "tr a-z A-Z")
    repo.git("config", "filter.shout.clean", "cat")

    text = snap(repo).text

    assert '<file path="hello.txt">\nhello\n</file>\n' in text
    assert '<file path="subst.txt">\n$Format:%H$\n</file>\n' in text
    assert '<file path="hidden.txt">\nstill here\n</file>\n' in text


# --- limits ---------------------------------------------------------------------------------------


def test_per_file_limit_is_inclusive(make_repo: MakeRepo) -> None:
    repo = make_repo({"exact.txt": "x" * 99 + "\n", "over.txt": "y" * 100 + "\n", "small.txt": "s\n"})
    snapshot = snap(repo, limits(max_file_bytes=100))

    assert file_paths(snapshot.text) == ["exact.txt", "small.txt"]
    assert "yyyy" not in snapshot.text
    assert "files over the per-file limit of 100 bytes, not included (1):\n  over.txt (101 bytes)\n" in snapshot.text
    assert snapshot.skipped_count == 1


def test_per_file_limit_does_not_apply_to_symlink_targets_or_excluded_files(make_repo: MakeRepo) -> None:
    repo = make_repo({"big.pem": "k" * 50 + "\n"})
    os.symlink("t" * 40, repo.path / "link")
    repo.commit_all("link")
    snapshot = snap(repo, limits(max_file_bytes=10))

    assert section(snapshot.text, "files excluded by path pattern") == ["big.pem"]
    assert section(snapshot.text, "files over the per-file limit") == []
    assert f'<symlink path="link" target="{"t" * 40}"/>' in snapshot.text


def test_total_limit_omits_the_first_overflowing_block_and_everything_after(make_repo: MakeRepo) -> None:
    files = {
        "a.txt": "a" * 30 + "\n",
        "b.txt": "b" * 30 + "\n",
        "c.txt": "c" * 60 + "\n",
        "d.bin": b"\0binary",
        "e.txt": "e\n",
    }
    repo = make_repo(files)
    size = {name: len(file_block(name.encode(), content.encode())) for name, content in files.items() if name[0] != "d"}
    budget = size["a.txt"] + size["b.txt"] + size["c.txt"] - 1

    snapshot = snap(repo, limits(max_snapshot_bytes=budget))

    # c.txt does not fit; e.txt would fit in what is left but the rule is a prefix in path order.
    assert file_paths(snapshot.text) == ["a.txt", "b.txt"]
    omitted = section(snapshot.text, "files omitted because the snapshot reached its limit")
    assert omitted == ["c.txt (61 bytes)", "d.bin (7 bytes)", "e.txt (2 bytes)"]
    assert f"limit of {budget} bytes" in snapshot.text
    assert section(snapshot.text, "binary files") == []  # d.bin was never read
    assert f"files included: 2, symbolic links: 0, bytes: {size['a.txt'] + size['b.txt']}\n" in snapshot.text
    assert snapshot.skipped_count == 3

    exact = snap(repo, limits(max_snapshot_bytes=budget + 1))
    assert file_paths(exact.text) == ["a.txt", "b.txt", "c.txt"]
    # c.txt filled the budget exactly: d.bin is read (and found binary), e.txt no longer fits.
    assert section(exact.text, "files omitted because") == ["e.txt (2 bytes)"]
    assert section(exact.text, "binary files") == ["d.bin (7 bytes)"]


def test_total_limit_smaller_than_the_first_block_omits_everything(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "b.txt": "b\n"})
    snapshot = snap(repo, limits(max_snapshot_bytes=5))

    assert file_paths(snapshot.text) == []
    assert section(snapshot.text, "files omitted because") == ["a.txt (2 bytes)", "b.txt (2 bytes)"]
    assert "files included: 0, symbolic links: 0, bytes: 0\n" in snapshot.text


def test_total_limit_counts_utf8_bytes_not_characters(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "é" * 10 + "\n", "b.txt": "b\n"})
    block_a = file_block(b"a.txt", ("é" * 10 + "\n").encode())
    assert len(block_a.encode()) == len(block_a) + 10

    snapshot = snap(repo, limits(max_snapshot_bytes=len(block_a) + 5))

    assert file_paths(snapshot.text) == []
    assert section(snapshot.text, "files omitted because") == ["a.txt (21 bytes)", "b.txt (2 bytes)"]


def test_symlinks_count_towards_the_total_limit(make_repo: MakeRepo) -> None:
    repo = make_repo({"z.txt": "z\n"})
    os.symlink("z.txt", repo.path / "a-link")
    repo.commit_all("link")
    link_block = symlink_block(b"a-link", b"z.txt")

    snapshot = snap(repo, limits(max_snapshot_bytes=len(link_block)))

    assert link_block in snapshot.text
    assert snapshot.symlink_count == 1 and snapshot.file_count == 0
    assert section(snapshot.text, "files omitted because") == ["z.txt (2 bytes)"]


# --- exclusions -----------------------------------------------------------------------------------


DEFAULT_EXCLUDED = [
    "package-lock.json",
    "web/node_modules/lib/index.js",
    "node_modules/x.js",
    "static/app.min.js",
    "styles.min.css",
    ".env",
    "config/.env.local",
    "certs/server.pem",
    "home/.ssh/id_rsa",
    "id_ed25519",
    "yarn.lock",
    "Cargo.lock",
    "go.sum",
    "app.js.map",
    ".npmrc",
    "server.key",
]


def test_default_exclusions_are_applied_and_listed(make_repo: MakeRepo) -> None:
    repo = make_repo({**{name: f"secret-{i}\n" for i, name in enumerate(DEFAULT_EXCLUDED)}, "src/app.js": "ok\n"})
    snapshot = snap(repo)

    assert file_paths(snapshot.text) == ["src/app.js"]
    assert section(snapshot.text, "files excluded by path pattern") == sorted(DEFAULT_EXCLUDED, key=str.encode)
    for i in range(len(DEFAULT_EXCLUDED)):
        assert f"secret-{i}\n" not in snapshot.text
    assert snapshot.skipped_count == len(DEFAULT_EXCLUDED)


def test_no_default_exclusions_when_turned_off(make_repo: MakeRepo) -> None:
    repo = make_repo({"package-lock.json": "{}\n", ".env": "A=1\n", "node_modules/m.js": "m\n"})
    snapshot = snap(repo, limits(use_defaults=False))

    assert file_paths(snapshot.text) == [".env", "node_modules/m.js", "package-lock.json"]
    assert "excluded" not in footer(snapshot.text)


def test_user_patterns_exclude_and_reinclude(make_repo: MakeRepo) -> None:
    repo = make_repo(
        {
            "docs/a.md": "a\n",
            "docs/keep.md": "keep\n",
            "gen/out.py": "out\n",
            "src/main.py": "main\n",
            "src/gen/x.py": "x\n",
            "package-lock.json": "{}\n",
            "dev.env": "E=1\n",
        }
    )
    snapshot = snap(repo, limits(patterns=["docs/*.md", "!docs/keep.md", "/gen/", "!package-lock.json"]))

    assert file_paths(snapshot.text) == ["docs/keep.md", "package-lock.json", "src/gen/x.py", "src/main.py"]
    assert section(snapshot.text, "files excluded by path pattern") == ["dev.env", "docs/a.md", "gen/out.py"]


def test_user_patterns_without_defaults(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.log": "log\n", ".env": "E=1\n"})
    snapshot = snap(repo, limits(patterns=["*.log"], use_defaults=False))

    assert file_paths(snapshot.text) == [".env"]
    assert section(snapshot.text, "files excluded by path pattern") == ["a.log"]


# --- symlinks and submodules ----------------------------------------------------------------------


def test_symlinks_are_rendered_and_never_followed(make_repo: MakeRepo, tmp_path: Path) -> None:
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("TOP SECRET CONTENT\n")
    repo = make_repo({"real.txt": "real content\n", "dir/inner.txt": "inner\n"})
    os.symlink(secret, repo.path / "outside")
    os.symlink("/etc/passwd", repo.path / "passwd")
    os.symlink("real.txt", repo.path / "rel")
    os.symlink("dir", repo.path / "dirlink")
    os.symlink("does/not/exist", repo.path / "dangling")
    os.symlink('we"ird\nname', repo.path / "odd")
    repo.commit_all("links")

    snapshot = snap(repo)

    assert f'<symlink path="outside" target="{secret}"/>\n' in snapshot.text
    assert '<symlink path="passwd" target="/etc/passwd"/>\n' in snapshot.text
    assert '<symlink path="rel" target="real.txt"/>\n' in snapshot.text
    assert '<symlink path="dirlink" target="dir"/>\n' in snapshot.text
    assert '<symlink path="dangling" target="does/not/exist"/>\n' in snapshot.text
    assert '<symlink path="odd" target="we\\"ird\\nname"/>\n' in snapshot.text
    assert "TOP SECRET" not in snapshot.text
    assert "root:" not in snapshot.text
    assert snapshot.text.count("real content") == 1 and snapshot.text.count("inner\n") == 1
    assert snapshot.symlink_count == 6 and snapshot.file_count == 2
    assert "files included: 2, symbolic links: 6," in snapshot.text


def test_symlink_to_an_excluded_file_is_itself_subject_to_exclusion(make_repo: MakeRepo) -> None:
    repo = make_repo({"notes.txt": "n\n"})
    os.symlink("notes.txt", repo.path / ".env")
    repo.commit_all("link")
    snapshot = snap(repo)

    assert "<symlink path=" not in snapshot.text
    assert section(snapshot.text, "files excluded by path pattern") == [".env"]


def test_submodules_are_listed_not_entered(make_repo: MakeRepo) -> None:
    inner = make_repo({"inner.txt": "INNER CONTENT\n"}, name="inner")
    outer = make_repo({"outer.txt": "outer\n"}, name="outer")
    outer.git("-c", "protocol.file.allow=always", "submodule", "add", "-q", str(inner.path), "sub")
    outer.commit_all("add submodule")

    snapshot = snap(outer)

    assert "INNER CONTENT" not in snapshot.text
    assert file_paths(snapshot.text) == [".gitmodules", "outer.txt"]
    assert section(snapshot.text, "submodules, listed but not entered") == [f"sub @ {inner.head()}"]
    assert snapshot.skipped_count == 1
    assert str(inner.path) in snapshot.text  # .gitmodules names it; that is the committed content


# --- names ----------------------------------------------------------------------------------------


ODD_NAMES = [
    "with space.txt",
    " leading space",
    'quo"te.txt',
    "back\\slash",
    "new\nline.txt",
    "tab\there.txt",
    "ünïcödé.txt",
    "日本語/ファイル.md",
    "emoji 🎉.txt",
    "x>y<z&.txt",
    "apos'trophe",
    "-dash",
    "bell\x07",
]


def test_odd_file_names_render_unambiguously(make_repo: MakeRepo) -> None:
    repo = make_repo({name: f"content of {name!r}\n" for name in ODD_NAMES})
    snapshot = snap(repo)

    assert file_paths(snapshot.text) == sorted(ODD_NAMES, key=str.encode)
    for name in ODD_NAMES:
        block = f"<file path={json.dumps(name, ensure_ascii=False)}>\ncontent of {name!r}\n</file>\n"
        assert block in snapshot.text
    # Every header is exactly one line, whatever the name holds.
    headers = [line for line in snapshot.text[len(PREAMBLE) :].splitlines() if line.startswith("<file ")]
    assert len(headers) == len(ODD_NAMES)
    assert '<file path="new\\nline.txt">' in snapshot.text
    assert '<file path="tab\\there.txt">' in snapshot.text
    assert '<file path="quo\\"te.txt">' in snapshot.text


def test_odd_names_in_the_footer_are_quoted_when_they_could_be_misread(make_repo: MakeRepo) -> None:
    repo = make_repo({"new\nline.bin": b"\0", "plain name.bin": b"\0", " lead.bin": b"\0", 'q"t.bin': b"\0"})
    listed = section(snap(repo).text, "binary files")

    assert listed == [
        '" lead.bin" (1 bytes)',
        '"new\\nline.bin" (1 bytes)',
        "plain name.bin (1 bytes)",
        '"q\\"t.bin" (1 bytes)',
    ]


def test_undecodable_file_name_is_shown_with_replacement_character(make_repo: MakeRepo) -> None:
    repo = make_repo({"ok.txt": "ok\n"})
    (repo.path / os.fsdecode(b"bad\xff.txt")).write_bytes(b"bad name\n")
    repo.commit_all("bad name")

    snapshot = snap(repo)

    assert '<file path="bad\ufffd.txt">\nbad name\n</file>\n' in snapshot.text
    assert json.loads(snapshot.message_json)["content"] == snapshot.text


# --- determinism ----------------------------------------------------------------------------------


DETERMINISM_FILES: dict[str, str | bytes] = {
    "src/main.py": "print('héllo ☃')\n",
    "src/util.py": "def f():\n    return 1\n",
    "B.md": "# big B\n",
    "data.bin": b"\0\1\2",
    "win.txt": b"a\r\nb\r\n",
    "bad.txt": b"\xff\xfe",
    "ünï/ç.txt": "ç\n",
    "package-lock.json": "{}\n",
    "huge.txt": "h" * 5000 + "\n",
}

BUILD_SCRIPT = """
import sys
from scout_diff_cache.git.exclusions import PathFilter
from scout_diff_cache.git.errors import GitError
from scout_diff_cache.git.repo import GitRepo
from scout_diff_cache.context.snapshot import SnapshotLimits, build_snapshot
repo = GitRepo(sys.argv[1])
snapshot = build_snapshot(repo, repo.head_commit(), SnapshotLimits(1000, 1 << 20, PathFilter.build([], True)))
sys.stdout.buffer.write(snapshot.message_json)
"""


def determinism_repo(make_repo: MakeRepo) -> Repo:
    repo = make_repo(DETERMINISM_FILES)
    os.symlink("src/main.py", repo.path / "link")
    repo.commit_all("link")
    return repo


def test_two_builds_in_one_process_are_byte_identical(make_repo: MakeRepo) -> None:
    repo = determinism_repo(make_repo)
    first, second = snap(repo, limits(max_file_bytes=1000)), snap(repo, limits(max_file_bytes=1000))

    assert first.text == second.text and first.message_json == second.message_json
    assert first.file_count == 6 and first.symlink_count == 1 and first.skipped_count == 3


def test_a_clone_at_another_path_gives_the_same_bytes(make_repo: MakeRepo, tmp_path: Path) -> None:
    repo = determinism_repo(make_repo)
    clone_path = tmp_path / "elsewhere" / "deeper" / "clone"
    clone_path.parent.mkdir(parents=True)
    repo.git("clone", "-q", str(repo.path), str(clone_path))

    original = snap(repo, limits(max_file_bytes=1000))
    cloned = snap(Repo(clone_path), limits(max_file_bytes=1000))

    assert original.message_json == cloned.message_json
    for text in (original.text, cloned.text):
        assert str(repo.path) not in text and str(clone_path) not in text and str(tmp_path) not in text


def test_another_process_with_other_locale_timezone_and_hash_seed_gives_the_same_bytes(make_repo: MakeRepo) -> None:
    repo = determinism_repo(make_repo)
    outputs = []
    for extra in (
        {"LC_ALL": "C", "LANG": "C", "TZ": "Asia/Tokyo", "PYTHONHASHSEED": "1", "PYTHONUTF8": "0"},
        {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "America/Los_Angeles", "PYTHONHASHSEED": "2"},
        {"LC_ALL": "", "LANG": "", "TZ": "UTC", "PYTHONHASHSEED": "3", "LANGUAGE": "de"},
    ):
        env = {**os.environ, **extra, "PYTHONPATH": str(ROOT / "addon")}
        proc = subprocess.run(
            [sys.executable, "-c", BUILD_SCRIPT, str(repo.path)], env=env, capture_output=True, check=False
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        outputs.append(proc.stdout)

    in_process = snap(repo, limits(max_file_bytes=1000, max_snapshot_bytes=1 << 20)).message_json
    assert outputs[0] == outputs[1] == outputs[2] == in_process
    assert "☃".encode() in in_process


def test_no_absolute_path_of_the_repository_appears(make_repo: MakeRepo) -> None:
    repo = determinism_repo(make_repo)
    snapshot = snap(repo, limits(max_file_bytes=1000, max_snapshot_bytes=200))

    for text in (snapshot.text, snapshot.message_json.decode()):
        assert str(repo.path) not in text
        assert repo.path.name not in text
        assert os.path.expanduser("~") + "/" not in text


# --- commit-specific content only at the end ------------------------------------------------------


def test_the_commit_id_appears_only_after_the_last_file(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "z.txt": "z\n"})
    commit = repo.head()
    text = snap(repo).text

    last_file_end = text.rindex("</file>\n") + len("</file>\n")
    assert commit not in text[:last_file_end]
    assert commit[:7] not in text[:last_file_end]
    assert text.index(commit) > last_file_end
    assert text[last_file_end:].startswith("<snapshot_info>\n")


def test_commits_sharing_their_first_file_share_the_prefix(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "shared first file\n", "m.txt": "version 1\n", "z.bin": b"\0"})
    first = repo.head()
    repo.write({"m.txt": "version 2\n", "zz.txt": "added\n"})
    second = repo.commit_all("second")
    git_repo = GitRepo(str(repo.path))

    old = build_snapshot(git_repo, first, limits()).text
    new = build_snapshot(git_repo, second, limits()).text

    first_end = old.index("</file>\n", len(PREAMBLE)) + len("</file>\n")
    assert old[:first_end] == new[:first_end]
    assert old[:first_end].endswith('<file path="a.txt">\nshared first file\n</file>\n')
    differ_at = next(i for i, (x, y) in enumerate(zip(old, new, strict=False)) if x != y)
    assert differ_at == old.index("version 1") + len("version ")


def test_footer_lists_are_commit_specific_and_at_the_end(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n", "big.txt": "b" * 200 + "\n", "x.bin": b"\0", ".env": "E\n"})
    text = snap(repo, limits(max_file_bytes=100)).text
    body_end = text.index("<snapshot_info>")

    assert text[:body_end] == PREAMBLE + file_block(b"a.txt", b"a\n")
    for word in ("big.txt (201 bytes)", "x.bin (1 bytes)", ".env"):
        assert word in text[body_end:]
    assert text.endswith("</snapshot_info>\n")


# --- unborn HEAD ----------------------------------------------------------------------------------


def test_unborn_head_has_no_commit_and_an_empty_snapshot(make_repo: MakeRepo) -> None:
    repo = make_repo({"staged.txt": "staged\n"}, commit=False)
    repo.git("add", "-A")
    git_repo = GitRepo(str(repo.path))

    assert git_repo.head_commit() is None
    snapshot = build_snapshot(git_repo, None, limits())

    assert snapshot.commit is None
    assert snapshot.text == (
        PREAMBLE
        + "<snapshot_info>\ncommit: none (the repository has no commits yet)\n"
        + "files included: 0, symbolic links: 0, bytes: 0\n</snapshot_info>\n"
    )
    assert snapshot.file_count == 0 and snapshot.skipped_count == 0
    assert json.loads(snapshot.message_json) == {"role": "system", "content": snapshot.text}


def test_empty_commit_gives_an_empty_snapshot_with_its_id(make_repo: MakeRepo) -> None:
    repo = make_repo()
    commit = repo.commit_all("empty")
    snapshot = snap(repo)

    assert snapshot.commit == commit
    assert file_paths(snapshot.text) == []
    assert f"commit: {commit}\nfiles included: 0, symbolic links: 0, bytes: 0\n" in snapshot.text


def test_snapshot_of_an_unknown_commit_raises_git_error(make_repo: MakeRepo) -> None:
    repo = make_repo({"a.txt": "a\n"})
    with pytest.raises(GitError, match="ls-tree"):
        build_snapshot(GitRepo(str(repo.path)), "0" * 40, limits())


def test_many_files_are_all_read_in_order(make_repo: MakeRepo) -> None:
    files = {f"d{i % 7}/f{i:04d}.txt": f"{i}\n" * (i % 5) for i in range(150)}
    repo = make_repo(files)
    snapshot = snap(repo)

    assert file_paths(snapshot.text) == sorted(files)
    for name in ("d3/f0003.txt", "d2/f0149.txt"):
        assert f'<file path="{name}">\n{files[name]}</file>\n' in snapshot.text
    assert snapshot.file_count == 150
